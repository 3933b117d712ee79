"""Native Core ML through coremltools: one loaded function per scale, the KV cache as model state.

macOS only (Core ML prediction does not exist elsewhere); everywhere else the constructor raises one clear
error before touching coremltools. iOS18 artifacts keep the KV cache in a state made once per generation
and passed to every scale's function (`make_state` / `predict(..., state=)`); iOS17 artifacts pass it
as inputs/outputs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from evar.runtime.backends.base import BackendUnavailable, require_format, require_macos
from evar.contract import DECODER_GRAPH, STEP_GRAPH, Artifact, step_feeds

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


class CoremlBackend:
    name = "coreml"
    threads = None  # Core ML schedules its own threads

    def __init__(self, artifact: Artifact, compute_units: str = "cpuAndNeuralEngine", device: str = "ane"):
        ct = load_coremltools(artifact, device)
        self.artifact, self.compute_units = artifact, compute_units
        units = getattr(ct.ComputeUnit, CT_UNITS[compute_units])
        step = artifact.graph(STEP_GRAPH)
        path = str(artifact.graph_path(STEP_GRAPH))
        if any(f.get("file") for f in step["functions"]):  # iOS17: one package per scale
            self.functions = [ct.models.MLModel(str(artifact.root / artifact.function(STEP_GRAPH, si)["file"]),
                                                compute_units=units) for si in range(artifact.num_scales)]
        elif step.get("scale_selection") == "function":
            self.functions = [ct.models.MLModel(path, function_name=artifact.function(STEP_GRAPH, si)["name"], compute_units=units)
                              for si in range(artifact.num_scales)]
        else:  # one function for every scale
            self.functions = [ct.models.MLModel(path, compute_units=units)] * artifact.num_scales
        self.decoder = ct.models.MLModel(str(artifact.graph_path(DECODER_GRAPH)), compute_units=units)
        self.past_of = artifact.past_of_present()
        self.dec_in = artifact.function(DECODER_GRAPH)["inputs"][0]["name"]
        self.dec_out = artifact.function(DECODER_GRAPH)["outputs"][0]["name"]

    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        var = self.artifact.var
        H = var["patch_nums"][-1]
        self.values: dict[str, Any] = {"labels": labels, "cfg": np.array([cfg]),
                                       "f_hat": np.zeros((len(labels), var["cvae"], H, H), np.float32)}
        self.past: dict[str, np.ndarray] = {}
        self.state = self.functions[0].make_state() if self.artifact.kv_mode == "state" else None

    def scale(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        fn = self.artifact.function(STEP_GRAPH, si)
        # Core ML io artifacts give scale 0 no cache inputs at all: nothing empty is ever fed
        feeds = step_feeds(fn["inputs"], {**self.values, "uniforms": uniforms, "scale_index": np.array([si])},
                           self.past, lambda t: self.artifact.empty_past(t, len(self.values["labels"])))
        kw = {"state": self.state} if self.state is not None else {}
        outs = self.functions[si].predict(feeds, **kw)
        roles = {t["role"]: t["name"] for t in fn["outputs"]}
        self.values["f_hat"] = np.asarray(outs[roles["f_hat"]], np.float32)
        self.past = {self.past_of[k]: np.asarray(v) for k, v in outs.items() if k in self.past_of}
        return np.asarray(outs[roles["idx"]]).astype(np.int64)

    def decode(self) -> np.ndarray:
        return np.asarray(self.decoder.predict({self.dec_in: self.values["f_hat"]})[self.dec_out], np.float32)

    def close(self) -> None:
        self.functions, self.decoder, self.state = [], None, None
