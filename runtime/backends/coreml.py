"""Native Core ML through coremltools: one loaded function per scale, the KV cache as model state.

macOS only (Core ML prediction does not exist elsewhere); everywhere else the constructor raises one clear
error before touching coremltools. iOS18 artifacts keep the KV cache in a state made once per generation
and passed to every scale's function (`make_state` / `predict(..., state=)`); iOS17 artifacts pass it
as inputs/outputs. The recipe (CFG trimming, scale split: the manifest's `generation`) is followed by the loop
the onnxruntime backend runs too (`RecipeLoop`); here a state belongs to a package file: every function of one
file (decoder_step.mlpackage holds the compressed model's scale, unguided and prefill functions) gets the
state made for that file, the early model's package its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evar.runtime.backends.base import BackendUnavailable, require_format, require_macos
from evar.contract import DECODER_GRAPH, PREFILL_GRAPH, Artifact
from evar.runtime.backends.recipe import RecipeLoop

CT_UNITS = {"all": "ALL", "cpuOnly": "CPU_ONLY", "cpuAndGPU": "CPU_AND_GPU", "cpuAndNeuralEngine": "CPU_AND_NE"}


def load_coremltools(artifact: Artifact, device: str):
    """coremltools, once the platform and the artifact's format allow a Core ML run (both Core ML backends)."""
    require_macos(f"--device {device}")
    require_format(artifact.format, "coreml", device)
    try:
        import coremltools as ct
    except ImportError:
        raise BackendUnavailable("coremltools is not installed: pip install coremltools") from None
    return ct


def function_package(artifact: Artifact, role: str, function: dict[str, Any]) -> tuple[Path, str | None]:
    """(package, function name inside it) of a manifest function: its own `file` (iOS17: one package per function,
    whose only function is its default), else the role's multifunction package."""
    if function.get("file"):
        return artifact.root / function["file"], None
    graph = artifact.graph(role)
    named = graph.get("scale_selection") == "function" or len(graph["functions"]) > 1 or role == PREFILL_GRAPH
    return artifact.graph_path(role), function["name"] if named else None


class CoremlBackend(RecipeLoop):
    name = "coreml"
    threads = None  # Core ML schedules its own threads

    def __init__(self, artifact: Artifact, compute_units: str = "cpuAndNeuralEngine", device: str = "ane"):
        ct = load_coremltools(artifact, device)
        self.compute_units = compute_units
        units = getattr(ct.ComputeUnit, CT_UNITS[compute_units])
        self._init_recipe(artifact)
        roles = self.recipe.roles() + ([PREFILL_GRAPH] if self.recipe.split_scale is not None else [])
        self.functions: dict[tuple[str, int | None], Any] = {}  # (role, scale index or None) → loaded function
        self.package_of: dict[tuple[str, int | None], Path] = {}
        for role in roles:
            for f in artifact.graph(role)["functions"]:
                if role != PREFILL_GRAPH and self.recipe.role(f["scale_index"]) != role:
                    continue  # a function this recipe never runs (decoder_step's scales before the split)
                path, name = function_package(artifact, role, f)
                kw = {"function_name": name} if name else {}
                key = (role, f["scale_index"] if role != PREFILL_GRAPH else None)
                self.functions[key] = ct.models.MLModel(str(path), compute_units=units, **kw)
                self.package_of[key] = path
        self.stateful = artifact.kv_mode == "state"
        self.decoder = ct.models.MLModel(str(artifact.graph_path(DECODER_GRAPH)), compute_units=units)
        self.dec_in = artifact.function(DECODER_GRAPH)["inputs"][0]["name"]
        self.dec_out = artifact.function(DECODER_GRAPH)["outputs"][0]["name"]

    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        super().begin(labels, cfg, top_k, top_p)
        self.states: dict[Path, Any] = {}  # one per package file, made by its first function
        if self.stateful:
            for key, fn in self.functions.items():
                self.states.setdefault(self.package_of[key], fn.make_state())

    def _call(self, role: str, si: int | None, feeds: dict[str, Any]) -> dict[str, Any]:
        key = (role, si)
        state = self.states.get(self.package_of[key])
        kw = {"state": state} if state is not None else {}
        return {name: np.asarray(value) for name, value in self.functions[key].predict(feeds, **kw).items()}

    def decode(self) -> np.ndarray:
        f_hat = np.asarray(self.values["f_hat"], np.float32)
        return np.asarray(self.decoder.predict({self.dec_in: f_hat})[self.dec_out], np.float32)

    def close(self) -> None:
        self.functions, self.decoder, self.states = {}, None, {}
