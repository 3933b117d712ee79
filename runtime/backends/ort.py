"""onnxruntime: the CPU provider everywhere, the Core ML execution provider on macOS.

With IO binding (the default) the KV cache and f_hat stay OrtValues owned by onnxruntime from one scale
to the next: each scale's `present` outputs are bound as the next scale's `past` inputs without a trip
through numpy, and only the sampled tokens are copied out (the logits output is produced but never read).
`io_binding=False` feeds numpy arrays through `InferenceSession.run` (benchmarks compare the two).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from evar.runtime.backends.base import BackendUnavailable, require_format, require_macos
from evar.contract import (DECODER_GRAPH, EARLY_STEP_GRAPH, PREFILL_GRAPH, PRUNED_STEP_GRAPH,
                           PRUNED_UNGUIDED_STEP_GRAPH, STEP_GRAPH, UNGUIDED_STEP_GRAPH, Artifact, ManifestError)
from evar.runtime.backends.recipe import RecipeLoop, as_array

COREML_UNITS = {"all": "ALL", "cpuOnly": "CPUOnly", "cpuAndGPU": "CPUAndGPU", "cpuAndNeuralEngine": "CPUAndNeuralEngine"}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime "
                                 "(or `pip install -e '.[export]'`)") from None
    return onnxruntime


def open_session(ort, artifact: Artifact, role: str, providers: list[Any], threads: int):
    """The session of one graph role, sequential, `threads` intra-op threads; its inputs and outputs must be the
    manifest's (a graph file from another export is refused)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    path = artifact.graph_path(role)
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        raise ManifestError(f"onnxruntime cannot load {path}: {str(err).splitlines()[0]}") from None
    graph = artifact.graph(role)
    declared = graph.get("signature") or graph["functions"][0]
    for kind, actual in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
        want, got = [t["name"] for t in declared[kind]], [t.name for t in actual]
        if want != got:
            raise ManifestError(f"{path.name}: the graph's {kind} {got[:4]}… differ from the manifest's {want[:4]}…; "
                                "the graph file does not belong to this manifest")
    return sess


class OrtBackend(RecipeLoop):
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, threads: int | None = None, io_binding: bool = True,
                 execution_provider: str = "cpu", compute_units: str = "cpuOnly"):
        require_format(artifact.format, "onnx", "cpu" if execution_provider == "cpu" else "ort-coreml")
        ort = _ort()
        self.io_binding = io_binding
        self.threads = threads if threads else os.cpu_count() or 1
        if execution_provider == "coreml":
            require_macos("onnxruntime's Core ML execution provider")
            if "CoreMLExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("this onnxruntime build has no CoreMLExecutionProvider "
                                         "(pip install onnxruntime on macOS)")
            providers: list[Any] = [("CoreMLExecutionProvider", {"ModelFormat": "MLProgram",
                                                                 "MLComputeUnits": COREML_UNITS[compute_units]}),
                                    "CPUExecutionProvider"]
            self.compute_units = compute_units
        else:
            providers = ["CPUExecutionProvider"]
            self.compute_units = "cpuOnly"
        self.execution_provider = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        # the recipe's graphs (evar.contract.recipe): the step graph, and the unguided / early / prefill / pruned
        # graphs the manifest's `generation` names; the loop (RecipeLoop) says which runs when
        self._init_recipe(artifact)
        roles = self.recipe.roles() + ([PREFILL_GRAPH] if self.recipe.split_scale is not None else [])
        self.sessions = {role: open_session(ort, artifact, role, providers, self.threads) for role in roles}
        self.outputs = {role: [o.name for o in sess.get_outputs()] for role, sess in self.sessions.items()}
        self.decoder = open_session(ort, artifact, DECODER_GRAPH, providers, self.threads)
        self.keep = artifact.token_keep  # token pruning: scale → static keep count
        self.dec_in = artifact.function(DECODER_GRAPH)["inputs"][0]["name"]

    # each role's session by name (None where the recipe does not run it): benchmarks time them
    step = property(lambda self: self.sessions.get(STEP_GRAPH))
    unguided = property(lambda self: self.sessions.get(UNGUIDED_STEP_GRAPH))
    early = property(lambda self: self.sessions.get(EARLY_STEP_GRAPH))
    prefill = property(lambda self: self.sessions.get(PREFILL_GRAPH))
    pruned = property(lambda self: self.sessions.get(PRUNED_STEP_GRAPH))
    pruned_unguided = property(lambda self: self.sessions.get(PRUNED_UNGUIDED_STEP_GRAPH))

    def _step(self, role: str, si: int, uniforms: np.ndarray) -> np.ndarray:
        if role not in (PRUNED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH):
            return super()._step(role, si, uniforms)
        n = uniforms.shape[1]
        if si == self.recipe.cache_scale:  # zeros: every token of the cache scale runs and overwrites them
            var = self.artifact.var
            prev = var["patch_nums"][si - 1] ** 2
            rows = self.batch if role == PRUNED_UNGUIDED_STEP_GRAPH else 2 * self.batch  # trimmed: B rows
            self.values["cached_hidden"] = np.zeros((rows, prev, var["embed_dim"]), np.float32)
        self.values["keep_count"] = np.array([self.keep.get(si, n)], np.int64)
        outs = self._call(role, si, self._feeds(role, si, uniforms))
        self.values["cached_hidden"] = outs["hidden"]  # the next scale restores its pruned tokens from this update map
        return self._take(role, outs)

    def _call(self, role: str, si: int | None, feeds: dict[str, Any]) -> dict[str, Any]:
        sess, names = self.sessions[role], self.outputs[role]
        if not self.io_binding or role == PREFILL_GRAPH:
            return dict(zip(names, sess.run(None, feeds)))
        ort = _ort()
        binding = sess.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)
        return dict(zip(names, binding.get_outputs()))

    def decode(self) -> np.ndarray:
        return self.decoder.run(None, {self.dec_in: as_array(self.values["f_hat"])})[0]

    def close(self) -> None:
        self.sessions, self.decoder = {}, None
        self.values, self.past = {}, {}
