"""What every backend does for the generator: start a batch, run one scale, decode.

The generator owns the loop, the random numbers (`evar.rng`) and the timing, so every backend draws
the same uniforms and is timed the same way; a backend only turns (scale, uniforms) into tokens and
keeps its own f_hat and KV cache between scales (as OrtValues, Core ML state or tensors).
"""
from __future__ import annotations

import platform
from typing import Protocol

import numpy as np

from evar.errors import EvarError


class BackendUnavailable(EvarError):
    """The chosen backend cannot run here (wrong OS, missing package, wrong artifact format)."""


class Backend(Protocol):
    name: str  # bench JSON `backend`
    compute_units: str  # bench JSON `compute_units`
    threads: int | None  # intra-op threads; None where the runtime schedules its own (Core ML)

    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        """Start a generation of len(labels) images: empty KV cache, zero f_hat."""

    def scale(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        """Run scale si with its uniforms (B, pn²) → sampled tokens (B, pn²) int64."""

    def decode(self) -> np.ndarray:
        """The VQVAE decoder on the final f_hat → float32 (B, 3, H, W) in [-1, 1]."""

    def close(self) -> None:
        """Release sessions / models."""


def require_macos(what: str) -> None:
    if platform.system() != "Darwin":
        raise BackendUnavailable(f"{what} needs macOS with Core ML (this is {platform.system()}); "
                                 "on this machine use --device cpu (onnxruntime) or --device torch-cpu")


def require_format(artifact_format: str, wanted: str, device: str) -> None:
    if artifact_format != wanted:
        hint = "evar-export onnx" if wanted == "onnx" else "evar-export coreml"
        raise BackendUnavailable(f"--device {device} runs {wanted} artifacts, this one is {artifact_format}: "
                                 f"export one with `{hint}`")
