"""int8 ONNX step graphs: onnxruntime's dynamic quantization of the transformer's linear layers.

`evar-export onnx --quantize int8` exports the fp32 step graph (parity-checked against PyTorch as always),
then rewrites it with `onnxruntime.quantization.quantize_dynamic`: int8 weights (per output channel by
default), activations quantized per tensor at run time (uint8), integer matmuls (MatMulInteger, fused by
onnxruntime into DynamicQuantizeMatMul). Which layers are quantized is decided by weight, not by node name
(onnxsim renames and fuses nodes): every initializer is matched to the PyTorch `nn.Linear` it came from.
Only the blocks' attention and FFN linears are candidates by default; the AdaLN projections and the head
(`--int8-fp32`) stay fp32, as do word_embed, the resize/Phi constants and the whole sampling tail.

A quantized graph no longer gives the reference's tokens, so its gate is statistical: the int8 graph runs
scale by scale on the fp32 graph's own inputs (`parity.drive(..., teacher=)`) over several seeds: each
scale's mean per-token KL(fp32 ‖ int8) of the guided logits, and its token agreement, must stay within the
thresholds the manifest states. The agreement is that of the best coupling of the two distributions, 1 − TV
(total variation), averaged over tokens: the share of tokens two samplers sharing their randomness can keep.
Counting equal sampled tokens instead measures the sampler as much as the model: inverse-CDF draws of a flat
distribution (the retrained digits model's finest scale has perplexity ~250) flip at every shifted CDF
boundary, and 0.84 was counted there with the KL under 0.01.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from evar.checkpoints import Model
from evar.errors import EvarError
from evar.export import parity as pt
from evar.export.interface import StepInterface
from evar.export.onnx_fusion import keep_read_initializers, node_attrs, plain_gemm

QUANTIZE_CHOICES = ("none", "int8")
# layer groups `--int8-fp32` may keep in fp32; the blocks' attention/FFN linears are always quantized
FP32_GROUPS = {"adaln": "AdaLN projections (blocks and head_nm)", "head": "the output head"}
GATE_SEEDS = (11, 12, 13)
GATE_BATCH = 3


@dataclass(frozen=True)
class Int8Options:
    keep_fp32: tuple[str, ...] = ("adaln", "head")
    per_channel: bool = True
    max_kl: float = 0.05  # mean per-token KL(fp32 || int8) of the guided logits, per scale
    min_token_agreement: float = 0.85  # per scale: mean over tokens of 1 − TV(fp32, int8)

    def validate(self) -> None:
        bad = [g for g in self.keep_fp32 if g not in FP32_GROUPS]
        if bad:
            raise EvarError(f"--int8-fp32 takes a comma list of {', '.join(FP32_GROUPS)} (or none), got '{bad[0]}'")
        if not self.max_kl > 0:
            raise EvarError(f"the int8 KL threshold must be > 0, got {self.max_kl}")
        if not 0 < self.min_token_agreement <= 1:
            raise EvarError(f"the int8 token agreement threshold must be in (0, 1], got {self.min_token_agreement}")


def parse_fp32_groups(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    return () if items in ((), ("none",)) else items


# ---------------------------------------------------------------- which nodes
def candidate_linears(model: Model, keep_fp32: tuple[str, ...]) -> dict[str, np.ndarray]:
    """module name → weight (out, in) of every linear layer to quantize."""
    out = {}
    for name, module in model.var.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        adaln = "ada_lin" in name
        head = name == "head"
        if not (name.startswith("blocks.") or head) or (adaln and "adaln" in keep_fp32) or (head and "head" in keep_fp32):
            continue
        out[name] = module.weight.detach().float().numpy()
    return out


def _initializers(graph) -> dict[str, Any]:
    return {t.name: t for t in graph.initializer}


def match_nodes(onnx_model, linears: dict[str, np.ndarray]) -> dict[str, str]:
    """node name → module name for every MatMul/Gemm whose constant weight is one of `linears` (W or Wᵀ, bit equal)."""
    from onnx import numpy_helper

    inits = _initializers(onnx_model.graph)
    by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
    for name, w in linears.items():
        by_shape.setdefault(w.T.shape, []).append((name, w.T))
        by_shape.setdefault(w.shape, []).append((name, w))
    found = {}
    for node in onnx_model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        b = numpy_helper.to_array(inits[node.input[1]])
        for module, w in by_shape.get(b.shape, []):
            if np.array_equal(b, w):
                found[node.name] = module
                break
    return found


def gemm_to_matmul(onnx_model, node_names: set[str]) -> None:
    """Rewrite the named Gemm nodes as MatMul (+ Add of the bias) in place: onnxruntime's dynamic quantizer
    quantizes MatMul, not Gemm (onnxsim fuses MatMul + Add into Gemm)."""
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    inits = _initializers(graph)
    nodes = []
    for node in graph.node:
        if node.name not in node_names or not plain_gemm(node):
            nodes.append(node)
            continue
        b = node.input[1]
        if node_attrs(node).get("transB", 0):
            w = numpy_helper.to_array(inits[b]).T.copy()
            b = b + "__t"
            graph.initializer.append(numpy_helper.from_array(w, b))
        mm_out = node.output[0] + ("__mm" if len(node.input) > 2 and node.input[2] else "")
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [mm_out], name=node.name))
        if mm_out != node.output[0]:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "__bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    keep_read_initializers(graph)


def quantize_step(model: Model, src: Path, dst: Path, options: Int8Options, external: bool) -> dict[str, Any]:
    """src (fp32 step graph) → dst (int8); → the manifest's compression details."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(src), load_external_data=True)
    linears = candidate_linears(model, options.keep_fp32)
    matched = match_nodes(proto, linears)
    missing = sorted(set(linears) - set(matched.values()))
    if missing:
        raise EvarError(f"int8: the exported step graph has no matmul for {missing[0]} "
                        f"({len(missing)} layers unmatched); re-export without --quantize")
    gemm_to_matmul(proto, set(matched))
    tmp = dst.with_name(dst.name + ".pre.onnx")
    onnx.save_model(proto, str(tmp), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=tmp.name + ".data", size_threshold=1024)
    del proto
    quantize_dynamic(str(tmp), str(dst), weight_type=QuantType.QInt8, per_channel=options.per_channel,
                     nodes_to_quantize=sorted(matched), op_types_to_quantize=["MatMul"],
                     use_external_data_format=external, extra_options={"MatMulConstBOnly": True})
    for leftover in tmp.parent.glob(tmp.name + "*"):
        leftover.unlink()
    return {"scheme": "dynamic int8: int8 weights" + (" per output channel" if options.per_channel else " per tensor")
                      + ", uint8 activations per tensor at run time, integer matmuls",
            "quantized_layers": len(matched), "quantized": sorted(set(matched.values())),
            "kept_fp32": [FP32_GROUPS[g] for g in options.keep_fp32] +
                         ["word_embed, resize/Phi constants, class embedding, sampling tail"],
            "gate": {"against": "the fp32 export of the same model", "seeds": list(GATE_SEEDS), "batch": GATE_BATCH,
                     "cfg": pt.PARITY_CFG, "max_mean_token_kl_per_scale": options.max_kl,
                     "min_token_agreement_per_scale": options.min_token_agreement,
                     "token_agreement": "mean over tokens of 1 - total variation (best coupling)"}}


# ---------------------------------------------------------------- the gate
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_kl(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Mean over tokens of KL(softmax(ref) ‖ softmax(got))."""
    lp, lq = _log_softmax(ref_logits), _log_softmax(got_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def int8_gate(report: pt.ParityReport, num_scales: int, run_fp32: Callable[..., pt.Run],
              run_int8: Callable[..., pt.Run], options: Int8Options, num_classes: int) -> None:
    """Per scale over GATE_SEEDS: mean token KL and token agreement of the int8 graphs run on the fp32 graphs'
    inputs. run_fp32(labels, seed) drives the fp32 graphs freely; run_int8(labels, seed, teacher) scale by scale."""
    kls = np.zeros((len(GATE_SEEDS), num_scales))
    agree = np.zeros_like(kls)
    for i, seed in enumerate(GATE_SEEDS):
        labels = (np.arange(GATE_BATCH) * 3 + seed) % num_classes
        ref = run_fp32(labels, seed)
        got = run_int8(labels, seed, ref)
        for si, (r, g) in enumerate(zip(ref.outputs, got.outputs)):
            kls[i, si] = token_kl(r["logits"], g["logits"])
            agree[i, si] = token_agreement(r["logits"], g["logits"])
    for si in range(num_scales):
        kl, ag = float(kls[:, si].mean()), float(agree[:, si].mean())
        report.checks.append(pt.Check(f"int8 vs fp32 export: mean token KL scale {si}", kl <= options.max_kl,
                                      "mean_token_kl", kl, options.max_kl))
        report.checks.append(pt.Check(f"int8 vs fp32 export: token agreement (1 - TV) scale {si}",
                                      ag >= options.min_token_agreement, "token_agreement", ag,
                                      options.min_token_agreement))


def token_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Mean over tokens of 1 − TV(softmax(ref), softmax(got)): the best coupling's share of equal tokens."""
    p, q = np.exp(_log_softmax(ref_logits)), np.exp(_log_softmax(got_logits))
    return float(1.0 - 0.5 * np.abs(p - q).sum(-1).mean())


# ---------------------------------------------------------------- the VQVAE decoder (static int8)
@dataclass(frozen=True)
class DecoderInt8Options:
    """`--quantize-decoder int8`: static int8 of the decoder's convolutions, calibrated on f_hat of the model's
    own generations. 7-bit weights (onnxruntime's `reduce_range`): x86 CPUs without VNNI multiply uint8 × int8
    pairs into saturating int16 sums, so full-range weights could give other images there; 7 bits cannot
    overflow, so no x86 CPU saturates (float rounding in requantization may still differ by kernel)."""
    calib_samples: int = 8  # generations whose f_hat set each activation's range (min/max)
    check_samples: int = 4  # other generations (another seed) the gate compares images on
    min_psnr_db: float = 30.0  # int8 image vs the fp32 graph's image, [-1, 1] range (peak-to-peak 2)

    def validate(self) -> None:
        if self.calib_samples < 1 or self.check_samples < 1:
            raise EvarError("--quantize-decoder int8 needs at least one calibration and one check sample")


class _FhatReader:
    """onnxruntime's calibration reader protocol: one f_hat per call, then None."""

    def __init__(self, f_hat: np.ndarray) -> None:
        self._rows = iter(f_hat.astype(np.float32)[:, None])

    def get_next(self) -> dict[str, np.ndarray] | None:
        row = next(self._rows, None)
        return None if row is None else {"f_hat": row}


def quantize_decoder(src: Path, dst: Path, calib_f_hat: np.ndarray, options: DecoderInt8Options) -> dict[str, Any]:
    """src (fp32 decoder graph, f_hat → image) → dst (QDQ int8 convolutions); → the compression details."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.name + ".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), _FhatReader(calib_f_hat), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    for leftover in pre.parent.glob(pre.name + "*"):
        leftover.unlink()
    return {"scheme": "static int8 (QDQ): convolution weights int8 per output channel (7-bit range), activations "
                      "uint8 per tensor with min/max ranges from calibration",
            "calibration": f"f_hat of {len(calib_f_hat)} of the model's own generations (seed 0)",
            "kept_fp32": ["GroupNorm, SiLU, the mid-block attention, upsampling, post_quant_conv's input"],
            "gate": {"against": "the fp32 decoder graph of the same model", "samples": options.check_samples,
                     "min_psnr_db": options.min_psnr_db, "psnr": "on [-1, 1] images, peak-to-peak 2"}}


def psnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2), in dB."""
    mse = float(np.mean((np.clip(got, -1, 1).astype(np.float64) - np.clip(ref, -1, 1).astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(4.0 / mse))


def decoder_int8_gate(report: pt.ParityReport, decode_fp32: Callable[[np.ndarray], np.ndarray],
                      decode_int8: Callable[[np.ndarray], np.ndarray], f_hat: np.ndarray,
                      options: DecoderInt8Options) -> float:
    """The int8 decoder's images against the fp32 graph's on f_hat it was not calibrated on → the PSNR (dB)."""
    value = psnr_db(decode_fp32(f_hat), decode_int8(f_hat))
    report.checks.append(pt.Check("int8 decoder vs fp32 decoder graph: image PSNR (dB)",
                                  bool(value >= options.min_psnr_db),
                                  "psnr_db", value, options.min_psnr_db))
    return value
