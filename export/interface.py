"""The declared interface of every exported graph: names, shapes per scale, dtypes, KV layout.

Everything else derives from here: the wrappers' argument order (graphs.py), the ONNX input/output
names and dynamic axes, the Core ML input/state types, the dummy and parity inputs, the manifest's
per-scale function entries, and the structure checks of a saved package.

The decoder step of scale si (the same contract on every backend):
    inputs   labels (B,), f_hat (B, Cvae, H, H) (zeros at si = 0), uniforms (B, pn²), cfg (1,),
             [ONNX: scale_index (1,)], KV cache (io: past per layer; Core ML iOS18: state)
    outputs  logits (B, pn², V) after CFG, idx (B, pn²) sampled in-graph, next_f_hat = f_hat + Phi(up(embed(idx))),
             [io: present per layer = past ++ this scale]
f_hat is accumulated at the *end* of the step that sampled the tokens (not at the start of the next), so
every scale has the same inputs, scale 0 needs no empty "previous tokens", and the last step already
returns the f_hat the VQVAE decoder needs. The CFG batch (2B) is formed in-graph: only the KV cache has 2B rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from evar.config import ModelConfig
from evar.contract import NP_DTYPES

Dim = Union[int, str]
Backend = Literal["onnx", "coreml"]
KVMode = Literal["io", "state"]

BATCH, CFG_BATCH = "batch", "cfg_batch"
SEQ, PAST, TOTAL = "sequence_length", "past_sequence_length", "total_sequence_length"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[Dim, ...]
    dtype: str
    role: str
    layer: int | None = None
    range: tuple[float, float] | None = None
    doc: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "role": self.role}
        if self.layer is not None:
            out["layer"] = self.layer
        if self.range is not None:
            out["range"] = list(self.range)
        if self.doc:
            out["doc"] = self.doc
        return out

    def concrete(self, dims: dict[str, int]) -> TensorSpec:
        """This spec with every symbol that `dims` names replaced by its value."""
        shape = tuple(dims.get(d, d) if isinstance(d, str) else d for d in self.shape)
        return TensorSpec(self.name, shape, self.dtype, self.role, self.layer, self.range, self.doc)


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[TensorSpec, ...] = ()
    scale_index: int | None = None
    patch_num: int | None = None
    token_range: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "scale_index": self.scale_index, "patch_num": self.patch_num,
                               "token_range": list(self.token_range) if self.token_range else None,
                               "inputs": [t.to_json() for t in self.inputs],
                               "outputs": [t.to_json() for t in self.outputs]}
        if self.states:
            out["states"] = [t.to_json() for t in self.states]
        return out


@dataclass(frozen=True)
class KVNames:
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    state_key: str
    state_value: str


def kv_names(backend: Backend, layer: int) -> KVNames:
    """ONNX keeps the optimum/transformers convention; Core ML feature names stay plain identifiers."""
    if backend == "onnx":
        return KVNames(f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
                       f"present.{layer}.key", f"present.{layer}.value", "", "")
    return KVNames(f"past_key_{layer}", f"past_value_{layer}", f"present_key_{layer}", f"present_value_{layer}",
                   f"key_cache_{layer}", f"value_cache_{layer}")


@dataclass(frozen=True)
class StepInterface:
    """The decoder step's interface for one backend. `batch` None = symbolic (ONNX), an int = static (Core ML)."""

    config: ModelConfig
    backend: Backend
    kv_mode: KVMode = "io"
    batch: int | None = None
    kv_dtype: str = "float32"
    index_dtype: str = field(default="")
    guided: bool = True  # False: the unguided step of CFG trimming (B rows everywhere, no cfg input)

    def __post_init__(self) -> None:
        if self.kv_mode == "state" and self.backend != "coreml":
            raise ValueError("a KV cache as model state exists only in Core ML")
        if self.backend == "coreml" and self.batch is None:
            raise ValueError("Core ML functions have static shapes: give a batch size")
        if not self.index_dtype:  # Core ML has no int64 features
            object.__setattr__(self, "index_dtype", "int64" if self.backend == "onnx" else "int32")

    # ---- sizes
    @property
    def var(self):
        return self.config.var

    @property
    def full(self) -> int:
        return self.var.patch_nums[-1]

    @property
    def b(self) -> Dim:
        return BATCH if self.batch is None else self.batch

    @property
    def cfg_b(self) -> Dim:
        if not self.guided:
            return self.b
        return CFG_BATCH if self.batch is None else 2 * self.batch

    def function_name(self, si: int) -> str:
        return "main" if self.backend == "onnx" else f"scale_{si}"

    # ---- tensors
    def _fixed_inputs(self, seq: Dim) -> list[TensorSpec]:
        c = self.var
        ins = [
            TensorSpec("labels", (self.b,), self.index_dtype, "labels", doc=f"class ids in [0, {c.num_classes})"),
            TensorSpec("f_hat", (self.b, c.cvae, self.full, self.full), "float32", "f_hat",
                       doc="running VQVAE feature map after the previous scales; zeros at scale 0"),
            TensorSpec("uniforms", (self.b, seq), "float32", "uniforms", range=(0.0, 1.0),
                       doc="evar.rng.scale_uniforms(seed, si, batch, pn*pn, first_sample)"),
            TensorSpec("cfg", (1,), "float32", "cfg", doc="guidance scale at the last scale; ramped by si/(S-1) in-graph"),
        ]
        if not self.guided:
            ins.pop()  # no guidance, no cfg input
        if self.backend == "onnx":
            ins.append(TensorSpec("scale_index", (1,), "int64", "scale_index", doc="si: selects resize/Phi/position constants"))
        return ins

    def _fixed_outputs(self, seq: Dim) -> list[TensorSpec]:
        c = self.var
        return [
            TensorSpec("logits", (self.b, seq, c.vocab_size), "float32", "logits", doc="after CFG, before top-k/top-p"),
            TensorSpec("idx", (self.b, seq), self.index_dtype, "idx", doc="tokens sampled in-graph, row-major"),
            TensorSpec("next_f_hat", (self.b, c.cvae, self.full, self.full), "float32", "f_hat",
                       doc="f_hat + Phi_si(upsample(embed(idx))): feed to the next scale, or to the VQVAE decoder after the last"),
        ]

    def kv_tensor(self, layer: int, kind: str, length: Dim) -> TensorSpec:
        names = kv_names(self.backend, layer)
        shape = (self.cfg_b, self.var.num_heads[layer], length, self.var.head_dim)
        dtype = "float16" if kind.startswith("state") else self.kv_dtype  # Core ML states are fp16 buffers
        role = {"state_key": "key_cache", "state_value": "value_cache"}.get(kind, kind)
        return TensorSpec(getattr(names, kind), shape, dtype, role, layer=layer)

    def kv_inputs(self, past: Dim) -> list[TensorSpec]:
        return [self.kv_tensor(i, k, past) for i in range(self.var.depth) for k in ("past_key", "past_value")]

    def kv_outputs(self, total: Dim) -> list[TensorSpec]:
        return [self.kv_tensor(i, k, total) for i in range(self.var.depth) for k in ("present_key", "present_value")]

    def kv_states(self) -> list[TensorSpec]:
        L = self.var.seq_len
        return [self.kv_tensor(i, k, L) for i in range(self.var.depth) for k in ("state_key", "state_value")]

    # ---- the graph's own (symbolic) signature: ONNX
    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        if self.backend != "onnx":
            raise ValueError("only the ONNX step has one symbolic signature; Core ML has a function per scale")
        return self._fixed_inputs(SEQ) + self.kv_inputs(PAST), self._fixed_outputs(SEQ) + self.kv_outputs(TOTAL)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        ins, outs = self.signature()
        return {t.name: {a: d for a, d in enumerate(t.shape) if isinstance(d, str)} for t in ins + outs
                if any(isinstance(d, str) for d in t.shape)}

    # ---- one function per scale (concrete shapes)
    def function(self, si: int) -> FunctionSpec:
        pn = self.var.patch_nums[si]
        begin, end = self.var.scale_ranges()[si]
        n = pn * pn
        ins, outs, states = self._fixed_inputs(n), self._fixed_outputs(n), []
        if self.kv_mode == "io":
            if not (self.backend == "coreml" and begin == 0):  # Core ML has no zero-size inputs: scale 0 has no past
                ins += self.kv_inputs(begin)
            outs += self.kv_outputs(end)
        else:
            states = self.kv_states()
        return FunctionSpec(self.function_name(si), tuple(ins), tuple(outs), tuple(states), si, pn, (begin, end))

    def functions(self) -> list[FunctionSpec]:
        return [self.function(si) for si in range(self.var.num_scales)]

    def kv_json(self) -> dict[str, Any]:
        layers = []
        for i, heads in enumerate(self.var.num_heads):
            names = kv_names(self.backend, i)
            entry: dict[str, Any] = {"index": i, "heads": heads}
            if self.kv_mode == "io":
                entry.update(past_key=names.past_key, past_value=names.past_value,
                             present_key=names.present_key, present_value=names.present_value)
            else:
                entry.update(state_key=names.state_key, state_value=names.state_value)
            layers.append(entry)
        initial = ("empty (past length 0) at scale 0; feed each scale's present as the next scale's past"
                   if self.kv_mode == "io" else "make a fresh state per image batch; slots [0, end_si) are written by scale si")
        if self.backend == "coreml" and self.kv_mode == "io":
            initial = "scale 0 takes no past; feed each scale's present as the next scale's past"
        return {"mode": self.kv_mode, "layout": "per_layer", "dims": [CFG_BATCH, "heads", "sequence", "head_dim"],
                "dtype": "float16" if self.kv_mode == "state" else self.kv_dtype, "batch": "2*batch (rows [0, B) conditional, [B, 2B) unconditional)",
                "max_length": self.var.seq_len, "head_dim": self.var.head_dim, "initial": initial, "layers": layers}

    # ---- inputs for tracing and parity, derived from the specs
    def example_inputs(self, si: int, batch: int, seed: int, cfg: float = 1.5,
                       labels: np.ndarray | None = None, f_hat: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Random but valid inputs of scale si (KV filled with noise of the right shape)."""
        if self.batch is not None and batch != self.batch:
            raise ValueError(f"this interface has a static batch of {self.batch}, asked for {batch}")
        rs = np.random.default_rng(seed)
        fn = self.function(si)
        dims = {BATCH: batch, CFG_BATCH: 2 * batch}
        out: dict[str, np.ndarray] = {}
        for t in fn.inputs:
            shape = tuple(int(d) for d in t.concrete(dims).shape)
            dt = NP_DTYPES[t.dtype]
            if t.role == "labels":
                out[t.name] = (labels if labels is not None else rs.integers(0, self.var.num_classes, shape)).astype(dt)
            elif t.role == "f_hat":
                out[t.name] = (f_hat if f_hat is not None else
                               (np.zeros(shape) if si == 0 else rs.standard_normal(shape) * 0.5)).astype(dt)
            elif t.role == "uniforms":
                out[t.name] = rs.random(shape).astype(dt)
            elif t.role == "cfg":
                out[t.name] = np.full(shape, cfg, dtype=dt)
            elif t.role == "scale_index":
                out[t.name] = np.full(shape, si, dtype=dt)
            else:  # past KV: unit-norm-ish noise, as l2-normalised keys are
                out[t.name] = (rs.standard_normal(shape) * 0.3).astype(dt)
        return out


@dataclass(frozen=True)
class DecoderInterface:
    """The VQVAE decoder: f_hat (B, Cvae, H, H) → image (B, 3, S, S) in [-1, 1]."""

    config: ModelConfig
    backend: Backend
    batch: int | None = None

    def function(self) -> FunctionSpec:
        v = self.config.vqvae
        b: Dim = BATCH if self.batch is None else self.batch
        H, S = v.v_patch_nums[-1], v.image_size
        ins = (TensorSpec("f_hat", (b, v.z_channels, H, H), "float32", "f_hat", doc="next_f_hat of the last scale"),)
        outs = (TensorSpec("image", (b, 3, S, S), "float32", "image", range=(-1.0, 1.0),
                           doc="RGB, channels first; uint8 = round((x + 1) * 127.5)"),)
        return FunctionSpec("main", ins, outs)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"f_hat": {0: BATCH}, "image": {0: BATCH}} if self.batch is None else {}

    def example_inputs(self, batch: int, seed: int) -> dict[str, np.ndarray]:
        t = self.function().inputs[0]
        shape = (batch,) + tuple(int(d) for d in t.shape[1:])
        return {t.name: (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(np.float32)}
