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
from evar.contract import (DECODER_GRAPH, EARLY_STEP_GRAPH, PREFILL_GRAPH, PRUNED_STEP_GRAPH, STEP_GRAPH,
                           UNGUIDED_STEP_GRAPH, Artifact, ManifestError, step_feeds)

COREML_UNITS = {"all": "ALL", "cpuOnly": "CPUOnly", "cpuAndGPU": "CPUAndGPU", "cpuAndNeuralEngine": "CPUAndNeuralEngine"}


def _array(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


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


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, threads: int | None = None, io_binding: bool = True,
                 execution_provider: str = "cpu", compute_units: str = "cpuOnly"):
        require_format(artifact.format, "onnx", "cpu" if execution_provider == "cpu" else "ort-coreml")
        ort = _ort()
        self.artifact, self.io_binding = artifact, io_binding
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
        self.step = self._session(ort, STEP_GRAPH, providers)
        self.decoder = self._session(ort, DECODER_GRAPH, providers)
        # CFG trimming: from cfg_until_scale on, the unguided graph runs on the conditional rows' cache
        self.cfg_until = artifact.cfg_until_scale
        self.unguided = self._session(ort, UNGUIDED_STEP_GRAPH, providers) if self.cfg_until is not None else None
        # scale split: the early model's graph before split_scale, then the prefill builds this model's cache
        self.split = artifact.split_scale
        self.early = self._session(ort, EARLY_STEP_GRAPH, providers) if self.split is not None else None
        self.prefill = self._session(ort, PREFILL_GRAPH, providers) if self.split is not None else None
        self.early_links = artifact.kv_links(EARLY_STEP_GRAPH) if self.split is not None else {}
        # token pruning: from the cache scale on the pruned graph runs with its static keep count
        self.keep, self.cache_si = artifact.token_keep, artifact.cache_scale
        self.pruned = self._session(ort, PRUNED_STEP_GRAPH, providers) if self.keep else None
        self.pruned_outputs = [o.name for o in self.pruned.get_outputs()] if self.pruned is not None else []
        self.step_outputs = [o.name for o in self.step.get_outputs()]
        self.early_outputs = [o.name for o in self.early.get_outputs()] if self.early is not None else []
        self.past_of = artifact.past_of_present()
        self.roles = {t["role"]: t["name"] for t in artifact.function(STEP_GRAPH, 0)["outputs"] if t.get("role")}
        self.dec_in = artifact.function(DECODER_GRAPH)["inputs"][0]["name"]

    def _session(self, ort, role: str, providers: list[Any]):
        return open_session(ort, self.artifact, role, providers, self.threads)

    # ---- one generation
    def begin(self, labels: np.ndarray, cfg: float, top_k: int, top_p: float) -> None:
        B = len(labels)
        var = self.artifact.var
        H = var["patch_nums"][-1]
        self.values = {"labels": labels, "cfg": np.array([cfg]), "f_hat": np.zeros((B, var["cvae"], H, H), np.float32)}
        self.past: dict[str, Any] = {}  # past input name → OrtValue / array; empty at scale 0
        self.batch = B
        self.tokens: list[np.ndarray] = []  # scale split: the early scales' tokens, for the prefill

    def _prefill(self) -> dict[str, Any]:
        """The compressed model's cache of the early scales, from their tokens in one pass."""
        names = [o.name for o in self.prefill.get_outputs()]
        outs = self.prefill.run(None, {"labels": self.values["labels"].astype(np.int64),
                                       "tokens": np.concatenate(self.tokens, 1)})
        return {self.past_of[name]: value for name, value in zip(names, outs) if name in self.past_of}

    def scale(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        if self.split is not None and si < self.split:
            idx = self._run(EARLY_STEP_GRAPH, self.early, self.early_outputs, self.early_links, si, uniforms,
                            lambda t: np.zeros((2 * self.batch, t["shape"][1], 0, t["shape"][3]), np.float32))
            self.tokens.append(idx)
            return idx
        if si == self.split:
            self.past = self._prefill()
        if self.keep and si >= self.cache_si:
            return self._pruned(si, uniforms)
        role, sess = STEP_GRAPH, self.step
        if self.cfg_until is not None and si >= self.cfg_until:
            role, sess = UNGUIDED_STEP_GRAPH, self.unguided
            if si == self.cfg_until:  # keep the conditional rows [0, B) of the cache
                self.past = {name: np.ascontiguousarray(_array(value)[: self.batch]) for name, value in self.past.items()}
        return self._run(role, sess, self.step_outputs, self.past_of, si, uniforms,
                         lambda t: self.artifact.empty_past(t, self.batch))

    def _pruned(self, si: int, uniforms: np.ndarray) -> np.ndarray:
        n = uniforms.shape[1]
        if si == self.cache_si:  # zeros: every token of the cache scale runs and overwrites them
            var = self.artifact.var
            prev = var["patch_nums"][si - 1] ** 2
            self.values["cached_hidden"] = np.zeros((2 * self.batch, prev, var["embed_dim"]), np.float32)
        self.values["keep_count"] = np.array([self.keep.get(si, n)], np.int64)
        idx = self._run(PRUNED_STEP_GRAPH, self.pruned, self.pruned_outputs, self.past_of, si, uniforms,
                        lambda t: self.artifact.empty_past(t, self.batch))
        self.values["cached_hidden"] = self._hidden  # the next scale restores its pruned tokens from this update map
        return idx

    def _run(self, role: str, sess, output_names: list[str], past_of: dict[str, str], si: int, uniforms: np.ndarray,
             empty) -> np.ndarray:
        feeds = step_feeds(self.artifact.function(role, si)["inputs"],
                           {**self.values, "uniforms": uniforms, "scale_index": np.array([si])}, self.past, empty)
        if not self.io_binding:
            outs = dict(zip(output_names, sess.run(None, feeds)))
            idx = outs[self.roles["idx"]]
        else:
            ort = _ort()
            binding = sess.io_binding()
            for name, value in feeds.items():
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_input(name, value)
                else:
                    binding.bind_cpu_input(name, value)
            for name in output_names:
                binding.bind_output(name, "cpu")
            sess.run_with_iobinding(binding)
            outs = dict(zip(output_names, binding.get_outputs()))
            idx = outs[self.roles["idx"]].numpy()
        self.values["f_hat"] = outs[self.roles["f_hat"]]
        self._hidden = outs.get("hidden")
        self.past = {past_of[name]: value for name, value in outs.items() if name in past_of}
        return idx.astype(np.int64, copy=False)

    def decode(self) -> np.ndarray:
        f_hat = self.values["f_hat"]
        f_hat = f_hat.numpy() if not isinstance(f_hat, np.ndarray) else f_hat
        return self.decoder.run(None, {self.dec_in: f_hat})[0]

    def close(self) -> None:
        self.step = self.decoder = self.unguided = self.early = self.prefill = self.pruned = None
        self.values, self.past = {}, {}
