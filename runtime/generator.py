"""`Generator`: images from an exported artifact, reading only manifest.json and the graph files.

    from evar.runtime import Generator
    gen = Generator("runs/export/dense-digits", backend="cpu")
    out = gen.generate([3, 3, 7], seed=0, cfg=1.5)      # out.images: uint8 (3, H, W, 3); out.tokens: per scale

The loop is the same for every backend: for each scale draw the uniforms of `evar.rng` (sample b of a
batch starting at `first_sample` takes numbers (first_sample + b)·pn² … of stream si), run the backend's
step, keep its tokens; then decode the final f_hat. So the same seed gives the tokens `evar sample` gives.
What the artifact bakes in (top-k, top-p, a static batch) is checked, what it takes as input (labels,
seed, cfg) is passed. No torch is imported unless the torch reference backend is chosen.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evar import rng
from evar.errors import EvarError
from evar.runtime import backends
from evar.contract import Artifact, load_artifact


@dataclass
class Timing:
    """Wall-clock milliseconds of one generation (one batch)."""

    scale_ms: list[float]  # per scale: uniforms + the backend's step
    decode_ms: float  # VQVAE decoder + conversion to uint8 pixels
    total_ms: float  # end to end: every scale and the decode
    # process CPU time of the same spans (all threads): on a loaded machine, what preemption does not inflate
    scale_cpu_ms: list[float] = field(default_factory=list)
    decode_cpu_ms: float = 0.0
    total_cpu_ms: float = 0.0


@dataclass
class GeneratedImages:
    """What the runtime returns (numpy, uint8 pixels); `evar.models.decoding.Generation` is PyTorch's."""

    images: np.ndarray  # uint8 (N, H, W, 3)
    tokens: list[np.ndarray]  # per scale (N, pn²) int64, coarse to fine
    labels: np.ndarray  # (N,) int64
    timings: list[Timing] = field(default_factory=list)  # one per batch the request was split into


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] → uint8 (N, H, W, 3), as `evar.data.to_uint8_nhwc` (clamp, round half to even)."""
    scaled = (np.clip(images.astype(np.float32), -1.0, 1.0) + np.float32(1.0)) * np.float32(127.5)
    return np.rint(scaled).astype(np.uint8).transpose(0, 2, 3, 1)


class Generator:
    """Runs an artifact on one backend. `backend` is an evar-bench device name: cpu (onnxruntime), torch-cpu
    (PyTorch eager reference; `model` overrides the model reference it loads), ort-coreml, coreml-cpu,
    coreml-gpu, ane (macOS)."""

    def __init__(self, artifact_dir: str | Path | Artifact, backend: str = "cpu", *, threads: int | None = None,
                 io_binding: bool = True, model: Any = None, verify_hashes: bool = False,
                 batch_size: int | None = None):
        self.device = backends.check_available(backend)
        self.artifact = artifact_dir if isinstance(artifact_dir, Artifact) else load_artifact(artifact_dir, verify_hashes)
        static = self.artifact.static_batch
        if static is not None and batch_size not in (None, static):
            raise EvarError(f"artifact {self.artifact.name} has a static batch of {static}; got batch size {batch_size}")
        if batch_size is not None and batch_size < 1:
            raise EvarError(f"batch size must be >= 1, got {batch_size}")
        self.batch_size = static or batch_size or 64
        t0 = time.perf_counter()
        if self.artifact.family == "dd":  # Distilled Decoding: a chain of student passes (evar.runtime.few_step)
            from evar.runtime.few_step import FewStepOrt

            self.backend = FewStepOrt(self.artifact, backend, threads)
        else:
            self.backend = backends.create(backend, self.artifact, threads, io_binding, model)
        self.load_ms = (time.perf_counter() - t0) * 1e3

    # ---- what a request may ask
    def _check(self, labels: np.ndarray, seed: int, cfg: float, top_k: int | None, top_p: float | None) -> tuple[int, float]:
        a = self.artifact
        if labels.ndim != 1 or not len(labels):
            raise EvarError("labels must be a non-empty list of class ids")
        bad = labels[(labels < 0) | (labels >= a.num_classes)]
        if len(bad):
            raise EvarError(f"class {int(bad[0])} is out of range: this model has classes 0..{a.num_classes - 1}")
        if not 0 <= seed < 2**64:
            raise EvarError(f"seed must be in [0, 2**64), got {seed}")
        if not (math.isfinite(cfg) and cfg >= 0):
            raise EvarError(f"cfg must be a finite number >= 0, got {cfg}")
        if a.family == "dd":  # the student learnt the teacher's guided, filtered tokens: nothing to bake or pass
            return top_k or 0, top_p or 0.0
        top_k = a.top_k if top_k is None else top_k
        top_p = a.top_p if top_p is None else top_p
        if a.sampling_where == "host":  # the host samples: the artifact's values are defaults, not constants
            if top_k < 0 or not 0.0 <= top_p < 1.0:
                raise EvarError(f"top-k must be >= 0 and top-p in [0, 1), got {top_k} and {top_p}")
        elif (top_k, float(top_p)) != (a.top_k, a.top_p):
            raise EvarError(f"artifact {a.name} bakes top-k {a.top_k} and top-p {a.top_p} into its graph, "
                            f"asked for top-k {top_k} and top-p {top_p}: pass --top-k {a.top_k} --top-p {a.top_p}, "
                            "or re-export with the values you want")
        return top_k, top_p

    def generate(self, labels: Sequence[int] | np.ndarray, seed: int = 0, cfg: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, first_sample: int = 0,
                 t_list: Sequence[int] | None = None) -> GeneratedImages:
        """Images for `labels`, split into batches of `batch_size` (numbered from `first_sample`, so splitting
        never changes an image). cfg None = the manifest's default; top-k/top-p None = the baked values.
        A Distilled Decoding artifact takes `t_list` (None: its default; cfg, top-k, top-p do not apply)."""
        labels = np.asarray(labels, dtype=np.int64)
        cfg = self.artifact.cfg_default if cfg is None else float(cfg)
        top_k, top_p = self._check(labels, seed, cfg, top_k, top_p)
        if self.artifact.family == "dd":
            t_list = list(self.artifact.data["few_step"]["default_t_list"] if t_list is None else t_list)
            self.artifact.few_step_graphs(t_list)  # refused here, before any batch runs
        elif t_list is not None:
            raise EvarError(f"a t-list goes with a Distilled Decoding artifact; {self.artifact.name} is a VAR export")
        images, tokens, timings = [], [], []
        for start in range(0, len(labels), self.batch_size):
            chunk = labels[start:start + self.batch_size]
            real = len(chunk)
            if self.artifact.static_batch and real < self.batch_size:  # pad; padded samples are dropped
                chunk = np.concatenate((chunk, np.full(self.batch_size - real, chunk[-1])))
            img, tok, timing = self.run_batch(chunk, seed, cfg, top_k, top_p, first_sample + start, t_list)
            images.append(img[:real])
            tokens.append([t[:real] for t in tok])
            timings.append(timing)
        per_scale = [np.concatenate([t[si] for t in tokens]) for si in range(self.artifact.num_scales)]
        return GeneratedImages(np.concatenate(images), per_scale, labels, timings)

    def run_batch(self, labels: np.ndarray, seed: int, cfg: float, top_k: int, top_p: float,
                  first_sample: int = 0, t_list: Sequence[int] | None = None
                  ) -> tuple[np.ndarray, list[np.ndarray], Timing]:
        """One batch through the backend, timed per scale and for the decode (what evar-bench measures)."""
        if self.artifact.family == "dd":
            default = self.artifact.data["few_step"]["default_t_list"]
            return self._few_step_batch(labels, seed, first_sample, list(default if t_list is None else t_list))
        b = self.backend
        B = len(labels)
        wall, cpu = time.perf_counter, time.process_time
        w_start, c_start = wall(), cpu()
        b.begin(labels, cfg, top_k, top_p)
        tokens, scale_ms, scale_cpu = [], [], []
        for si, pn in enumerate(self.artifact.patch_nums):
            w0, c0 = wall(), cpu()
            u = rng.scale_uniforms(seed, si, B, pn * pn, first_sample)
            tokens.append(b.scale(si, u))
            scale_ms.append((wall() - w0) * 1e3)
            scale_cpu.append((cpu() - c0) * 1e3)
        w0, c0 = wall(), cpu()
        images = to_uint8(b.decode())
        w_end, c_end = wall(), cpu()
        return images, tokens, Timing(scale_ms, (w_end - w0) * 1e3, (w_end - w_start) * 1e3,
                                      scale_cpu, (c_end - c0) * 1e3, (c_end - c_start) * 1e3)

    def close(self) -> None:
        self.backend.close()

    def _few_step_batch(self, labels: np.ndarray, seed: int, first_sample: int, t_list: list[int]
                        ) -> tuple[np.ndarray, list[np.ndarray], Timing]:
        """A DD artifact's batch: noise (part of the first pass's time), the passes, the decode. `scale_ms` holds one
        entry per pass."""
        from evar.contract.few_step import sequence_noise

        var = self.artifact.var
        wall, cpu = time.perf_counter, time.process_time
        w_start, c_start = wall(), cpu()
        noise = sequence_noise(seed, first_sample, len(labels), var["patch_nums"], var["cvae"])
        noise_ms = (wall() - w_start) * 1e3
        out, pass_ms = self.backend.passes(labels, noise, t_list)
        pass_ms[0] += noise_ms
        w0, c0 = wall(), cpu()
        images = to_uint8(self.backend.decode(out["f_hat"]))
        w_end, c_end = wall(), cpu()
        bounds = np.cumsum([0] + [pn * pn for pn in var["patch_nums"]])
        tokens = [out["tokens"][:, lo:hi].astype(np.int64) for lo, hi in zip(bounds[:-1], bounds[1:])]
        return images, tokens, Timing(pass_ms, (w_end - w0) * 1e3, (w_end - w_start) * 1e3, [], (c_end - c0) * 1e3,
                                      (c_end - c_start) * 1e3)
