"""Core ML artifacts that sample on the host (`evar-export coreml --target ane`): macOS only.

Per scale: the step function (transformer, on the device's compute units; its KV cache is one state made per
generation) returns raw logits, `HostSampledLoop` applies guidance, top-k/top-p and the inverse-CDF draw in
numpy (the decisions of `evar.models.sampling`), and the scale's `fhat_update` function adds the tokens to
f_hat on the CPU. Each graph runs on the units the manifest gives it: a `cpu_only` graph stays on the CPU
whatever the device, the others take the device's (`--device ane`: CPU and Neural Engine).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from evar.contract import DECODER_GRAPH, FHAT_GRAPH, NP_DTYPES, STEP_GRAPH, Artifact
from evar.contract.host_sampling import HostSampledLoop
from evar.runtime.backends.coreml import CT_UNITS, load_coremltools


def graph_units(artifact: Artifact, role: str, device_units: str) -> str:
    """The units a graph runs on: CPU for a graph the manifest pins there, else the device's."""
    return "cpuOnly" if artifact.graph(role).get("compute_units") == "cpu_only" else device_units


class CoremlHostBackend:
    name = "coreml"
    threads = None  # Core ML schedules its own threads

    def __init__(self, artifact: Artifact, compute_units: str = "cpuAndNeuralEngine", device: str = "ane"):
        ct = load_coremltools(artifact, device)
        self.artifact, self.compute_units = artifact, compute_units
        self.stage_units = {role: graph_units(artifact, role, compute_units) for role in (STEP_GRAPH, FHAT_GRAPH, DECODER_GRAPH)}
        self.stage_units["sampling"] = "host"

        def load(role: str, function: str | None = None):
            units = getattr(ct.ComputeUnit, CT_UNITS[self.stage_units[role]])
            kw = {"function_name": function} if function else {}
            return ct.models.MLModel(str(artifact.graph_path(role)), compute_units=units, **kw)

        n = artifact.num_scales
        self.steps = [load(STEP_GRAPH, artifact.function(STEP_GRAPH, si)["name"]) for si in range(n)]
        self.updates = [load(FHAT_GRAPH, artifact.function(FHAT_GRAPH, si)["name"]) for si in range(n)]
        self.decoder = load(DECODER_GRAPH)
        dec = artifact.function(DECODER_GRAPH)
        self.dec_in, self.dec_out = dec["inputs"][0], dec["outputs"][0]["name"]
        self.loop = HostSampledLoop(artifact.data, self._step, self._update)
        self.state: Any = None

    def _step(self, si: int, feeds: dict[str, Any]) -> dict[str, Any]:
        return self.steps[si].predict(feeds, state=self.state)

    def _update(self, si: int, feeds: dict[str, Any]) -> dict[str, Any]:
        return self.updates[si].predict(feeds)

    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        self.state = self.steps[0].make_state()  # zeros; padding past each scale's end is masked in-graph
        self.loop.begin(labels, cfg, top_k, top_p)

    def scale(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        return self.loop.scale(si, uniforms).idx

    def decode(self) -> np.ndarray:
        f_hat = np.ascontiguousarray(self.loop.f_hat, NP_DTYPES[self.dec_in["dtype"]])
        return np.asarray(self.decoder.predict({self.dec_in["name"]: f_hat})[self.dec_out], np.float32)

    def close(self) -> None:
        self.steps, self.updates, self.decoder, self.state = [], [], None, None
