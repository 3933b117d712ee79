"""ONNX export: one decoder-step graph for every scale (symbolic lengths, per-layer past/present KV) and
the VQVAE decoder graph.

The step graph is traced once (legacy exporter, opset 17) at scale 1 so that every path of the graph
(past KV, slices by the symbolic token count, gathers by `scale_index`) is exercised with real sizes;
names and dynamic axes come from `interface.StepInterface`.

Precision: `fp16` stores every float initializer as float16 and casts it back to float32 where it is
used, so files halve while compute (and parity) stay fp32: onnxruntime's CPU provider has no fp16
kernels for most of these ops, and sampling must run in fp32 to keep the tokens of the reference.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evar.checkpoints import Model
from evar.errors import EvarError
from evar.export.graphs import DynamicStep, VQVAEDecoder
from evar.contract import DECODER_GRAPH, STEP_GRAPH
from evar.export.interface import DecoderInterface, StepInterface
from evar.export.onnx_class_tables import adaln_as_class_tables
from evar.export.onnx_fusion import fuse_tanh_gelu
from evar.export.onnx_layout import LAYOUTS, linears_as_convs
from evar.export.quantize import QUANTIZE_CHOICES, DecoderInt8Options, Int8Options

EXTERNAL_DATA_AUTO_BYTES = 1 << 30  # above 1 GiB of weights, weights go beside the graph (protobuf caps at 2 GiB)
PROTOBUF_LIMIT = 2 ** 31 - 1


class OnnxExportError(EvarError):
    """The ONNX exporter, simplifier or runtime refused a graph."""


@dataclass(frozen=True)
class OnnxOptions:
    precision: str = "fp32"  # fp32 | fp16 (fp16 weights, fp32 compute)
    opset: int = 17
    simplify: bool = True
    fuse_gelu: bool = True  # tanh GELU → com.microsoft.FastGelu (evar.export.onnx_fusion)
    linear_layout: str = "conv"  # conv: linears as 1×1 convolutions (evar.export.onnx_layout) | matmul
    class_tables: bool = True  # AdaLN looked up per class, not recomputed per scale (evar.export.onnx_class_tables)
    external_data: str = "auto"  # auto | always | never
    top_k: int = 0
    top_p: float = 0.0
    quantize: str = "none"  # none | int8 (the step graph's transformer linears, see evar.export.quantize)
    int8: Int8Options = field(default_factory=Int8Options)
    cfg_until_scale: int | None = None  # CFG trimming (evar.export.cfg_trim): scales >= N run unguided, batch B
    split_scale: int | None = None  # scale split (evar.export.split): the early model runs scales < N
    early_model: str | None = None  # its reference, as given
    token_keep: str | None = None  # late-scale token pruning (evar.export.token_keep): "4:0.6,5:0.4"
    quantize_decoder: str = "none"  # none | int8 (static int8 of the VQVAE decoder's convolutions)
    decoder_int8: DecoderInt8Options = field(default_factory=DecoderInt8Options)

    def int8_adaln(self) -> bool:
        """--quantize int8 with the AdaLN projections quantized too (then they stay Gemms for the quantizer)."""
        return self.quantize == "int8" and "adaln" not in self.int8.keep_fp32

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16"):
            raise EvarError(f"ONNX precision must be fp32 or fp16, got '{self.precision}'")
        if self.quantize not in QUANTIZE_CHOICES:
            raise EvarError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)} for ONNX, got '{self.quantize}'")
        if self.linear_layout not in LAYOUTS:
            raise EvarError(f"--linear-layout must be one of {', '.join(LAYOUTS)}, got '{self.linear_layout}'")
        if self.quantize == "int8":
            if self.precision != "fp32":
                raise EvarError("--quantize int8 quantizes the fp32 graph: it cannot be combined with --precision fp16")
            self.int8.validate()
        if self.quantize_decoder not in QUANTIZE_CHOICES:
            raise EvarError(f"--quantize-decoder must be one of {', '.join(QUANTIZE_CHOICES)}, got '{self.quantize_decoder}'")
        if self.quantize_decoder == "int8":
            if self.precision != "fp32":
                raise EvarError("--quantize-decoder int8 quantizes the fp32 decoder graph: drop --precision fp16")
            self.decoder_int8.validate()
        if self.opset < 17:
            raise EvarError(f"opset {self.opset} is too old: the step graph needs opset >= 17 (LayerNormalization)")
        if self.external_data not in ("auto", "always", "never"):
            raise EvarError(f"--external-data must be auto, always or never, got '{self.external_data}'")
        if (self.split_scale is None) != (self.early_model is None):
            raise EvarError("a scale split needs both --early-model and --split-scale")
        if (self.split_scale is not None or self.token_keep) and self.precision != "fp32":
            raise EvarError("--split-scale and --token-keep export fp32 graphs (checked token for token): "
                            "drop --precision fp16")
        if self.split_scale is not None and self.precision != "fp32":
            raise EvarError("--split-scale exports fp32 graphs (checked token for token): drop --precision fp16")


@dataclass
class OnnxGraph:
    file: str
    external_data: str | None
    simplified: bool
    nodes: int


def _torch_export(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python ints: sizes are symbolic via dynamic_axes
        try:
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
        except Exception as err:  # the exporter raises many types; all mean "this graph did not export"
            raise OnnxExportError(f"torch.onnx.export failed for {path.name}: {str(err).splitlines()[0]}") from err


def _load(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _weight_bytes(model) -> int:
    from onnx import numpy_helper

    total = 0
    for t in model.graph.initializer:
        total += numpy_helper.to_array(t).nbytes if not t.raw_data else len(t.raw_data)
    return total


def _simplify(model):
    """onnxsim, kept only when it shrinks the graph (it needs the whole model in memory: < 2 GiB)."""
    import onnxsim

    before = len(model.graph.node)
    try:
        simplified, ok = onnxsim.simplify(model)
    except Exception as err:  # onnxsim raises bare RuntimeErrors; an unsimplified graph is still correct
        return model, False, f"onnxsim failed: {str(err).splitlines()[0]}"
    if not ok or len(simplified.graph.node) >= before:
        return model, False, "onnxsim did not shrink the graph"
    return simplified, True, f"onnxsim: {before} → {len(simplified.graph.node)} nodes"


def _to_fp16_weights(model) -> None:
    """Store float32 initializers as float16 with a Cast back to float32 (in place)."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims, dtype=np.int64) < 16:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        if np.abs(arr).max(initial=0) > 65504:
            keep.append(init)  # would overflow in fp16
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), init.name + "__fp16")
        keep.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=init.name + "__cast"))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)


def _save(model, path: Path, external: str) -> str | None:
    import onnx

    size = _weight_bytes(model)
    use_external = external == "always" or (external == "auto" and size >= EXTERNAL_DATA_AUTO_BYTES)
    if external == "never" and size >= PROTOBUF_LIMIT:
        raise OnnxExportError(f"{path.name}: {size / 2**30:.2f} GiB of weights cannot be one protobuf; use external data")
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()
    if use_external:
        location = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=1024)
        return location
    onnx.save_model(model, str(path))
    return None


def _postprocess(raw: Path, final: Path, options: OnnxOptions, notes: list[str]) -> OnnxGraph:
    model = _load(raw)
    simplified = False
    if options.simplify:
        if _weight_bytes(model) >= PROTOBUF_LIMIT:
            notes.append(f"{final.name}: not simplified (onnxsim needs the model under 2 GiB)")
        else:
            model, simplified, msg = _simplify(model)
            notes.append(f"{final.name}: {msg}")
    if options.fuse_gelu and (fused := fuse_tanh_gelu(model)):
        notes.append(f"{final.name}: {fused} tanh GELUs fused into FastGelu")
    if options.class_tables and not options.int8_adaln() and (tables := adaln_as_class_tables(model)):
        notes.append(f"{final.name}: {tables} AdaLN projections as class tables (looked up by label, not "
                     "recomputed at every scale)")
    # int8 keeps the MatMuls: onnxruntime's quantizer matches them to the model's linears (evar.export.quantize)
    if options.linear_layout == "conv" and options.quantize != "int8" and (convs := linears_as_convs(model)):
        notes.append(f"{final.name}: {convs} linear layers as 1×1 convolutions (onnxruntime's NCHWc kernels)")
    if options.precision == "fp16":
        _to_fp16_weights(model)
    for leftover in raw.parent.glob(raw.name + "*"):
        leftover.unlink()
    location = _save(model, final, options.external_data)
    return OnnxGraph(final.name, location, simplified, len(model.graph.node))


def export_step(model: Model, out: Path, options: OnnxOptions, notes: list[str], guided: bool = True,
                role: str = STEP_GRAPH) -> tuple[OnnxGraph, StepInterface]:
    """The step graph (`guided=False`: the unguided step of CFG trimming) → `out/<role>.onnx`."""
    iface = StepInterface(model.config, "onnx", guided=guided)
    step = DynamicStep(model, top_k=options.top_k, top_p=options.top_p, guided=guided).eval()
    ins, outs = iface.signature()
    example = iface.example_inputs(si=1, batch=2, seed=0)
    args = tuple(torch.from_numpy(example[t.name]) for t in ins)
    raw = out / f".{role}.raw.onnx"
    _torch_export(step, args, raw, [t.name for t in ins], [t.name for t in outs], iface.dynamic_axes(), options.opset)
    return _postprocess(raw, out / f"{role}.onnx", options, notes), iface


def export_decoder(model: Model, out: Path, options: OnnxOptions, notes: list[str]) -> tuple[OnnxGraph, DecoderInterface]:
    iface = DecoderInterface(model.config, "onnx")
    fn = iface.function()
    example = iface.example_inputs(batch=2, seed=0)
    raw = out / f".{DECODER_GRAPH}.raw.onnx"
    _torch_export(VQVAEDecoder(model).eval(), (torch.from_numpy(example["f_hat"]),), raw,
                  [t.name for t in fn.inputs], [t.name for t in fn.outputs], iface.dynamic_axes(), options.opset)
    return _postprocess(raw, out / f"{DECODER_GRAPH}.onnx", options, notes), iface


def session(path: Path, threads: int = 1):
    """An onnxruntime CPU session (the parity runner)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph types
        raise OnnxExportError(f"onnxruntime cannot load {path.name}: {str(err).splitlines()[0]}") from err


def graph_entry(graph: OnnxGraph, functions: list[dict[str, Any]], signature: dict | None, opset: int,
                notes: list[str]) -> dict[str, Any]:
    return {"file": graph.file, "format": "onnx", "external_data": graph.external_data, "opset": opset,
            "simplified": graph.simplified, "signature": signature, "functions": functions,
            "default_function": "main", "notes": notes}
