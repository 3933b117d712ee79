"""Distilled Decoding artifacts (manifest family "dd") on onnxruntime: a chain of student passes, then the decoder.

`Generator` hands a DD artifact's batches here: the noise comes from `evar.contract.few_step` (numbered by sample,
so the same seed gives the same tokens as `evar sample --model DD_DIR`), the passes of the requested t-list run in
order (`few_step.run_passes`, inputs bound by the manifest's roles), the last pass's f_hat is decoded.
The student has no guidance and no sampling filters: cfg, top-k and top-p do not apply.
"""
from __future__ import annotations

import os
import time

import numpy as np
from evar.runtime.backends.base import BackendUnavailable, require_format

from evar.contract import DECODER_GRAPH, Artifact, few_step


class FewStepOrt:
    """Sessions of every pass graph and the decoder (CPU execution provider)."""

    name = "onnxruntime"
    compute_units = "cpuOnly"

    def __init__(self, artifact: Artifact, device: str, threads: int | None = None):
        if device != "cpu":
            raise BackendUnavailable(f"a Distilled Decoding artifact runs on --backend cpu (onnxruntime), not {device}")
        require_format(artifact.format, "onnx", device)
        from evar.runtime.backends.ort import _ort, open_session

        ort = _ort()
        self.artifact = artifact
        self.threads = threads if threads else os.cpu_count() or 1
        roles = [p["graph"] for p in artifact.data["few_step"]["passes"]] + [DECODER_GRAPH]
        self.sessions = {role: open_session(ort, artifact, role, ["CPUExecutionProvider"], self.threads) for role in roles}

    def _timed(self, role: str, times: list[float]):
        sess = self.sessions[role]
        names = [o.name for o in sess.get_outputs()]

        def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            out = dict(zip(names, sess.run(None, feeds)))
            times.append((time.perf_counter() - t0) * 1e3)
            return out

        return call

    def passes(self, labels: np.ndarray, noise: np.ndarray, t_list: list[int]) -> tuple[dict[str, np.ndarray], list[float]]:
        """The last pass's outputs by role (tokens, vectors, f_hat) and each pass's wall milliseconds."""
        a, times = self.artifact, []
        chain = [(a.function(role), self._timed(role, times)) for role in a.few_step_graphs(t_list)]
        return few_step.run_passes(chain, labels, noise)[-1], times

    def decode(self, f_hat: np.ndarray) -> np.ndarray:
        sess = self.sessions[DECODER_GRAPH]
        return sess.run(None, {self.artifact.function(DECODER_GRAPH)["inputs"][0]["name"]: f_hat})[0]

    def close(self) -> None:
        self.sessions = {}
