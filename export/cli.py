"""`evar-export`: ONNX and Core ML artifacts with a manifest, and what is inside them. Errors print as one line."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.cli_options import ModelOpt, Overwrite, VaeCkpt, VarCkpt, command_line
from evar.errors import run_cli
from evar.export.coreml_gate import FLAGS as GATE_FLAGS, CompressGate
from evar.outputs import check_space, claim_output

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export EVAR models to ONNX / Core ML (per-scale KV-cached decoder + VQVAE decoder + manifest.json).")

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="artifact directory (written atomically)")]
TopK = Annotated[int, typer.Option(help="baked into the graph: keep the k most likely tokens (0 = off)")]
TopP = Annotated[float, typer.Option(help="baked into the graph: nucleus mass (0 = off)")]
_GATE = "with --compress palettize6|palettize4|int8: the quality gate's "
GateMaxKl = Annotated[Optional[float], typer.Option(GATE_FLAGS["mean_token_kl"], help=_GATE + (
    f"bound on each scale's mean token KL(fp32 || compressed) (default {CompressGate.max_kl})"))]
GateMinAgreement = Annotated[Optional[float], typer.Option(GATE_FLAGS["token_agreement"], help=_GATE + (
    f"bound on each scale's token agreement, mean 1 - TV (default {CompressGate.min_token_agreement})"))]
GateMinPsnr = Annotated[Optional[float], typer.Option(GATE_FLAGS["psnr_db"], help=_GATE + (
    f"bound on the decoder image's PSNR in dB vs fp32 (default {CompressGate.min_psnr_db:g})"))]


def _load(model: str, var_ckpt: Optional[Path], vae_ckpt: Optional[Path], out: Path, bytes_per_param: float):
    """The model, once the disk is known to hold its export (graphs, the unsimplified copy, parity's sessions)."""
    from evar import zoo

    loaded = zoo.load(model, var_ckpt, vae_ckpt, attn_impl="math")
    params = sum(p.numel() for p in loaded.var.parameters()) + sum(p.numel() for p in loaded.vqvae.parameters())
    check_space(out, int(2.5 * bytes_per_param * params))
    return loaded


def _explicit(ctx: typer.Context, *names: str) -> list[str]:
    """The flags among `names` given on the command line (not left at their defaults), as --flag-names."""
    given = [n for n in names if getattr(ctx.get_parameter_source(n), "name", "DEFAULT") != "DEFAULT"]
    return ["--" + n.replace("_", "-") for n in given]


def _summary(out: Path, result: dict) -> None:
    from evar.contract import load_artifact

    m = load_artifact(out).data
    total = sum(f["bytes"] for f in m["files"])
    checks = result["parity"].checks
    print(f"artifact → {out} ({total / 2**20:.1f} MiB, export {result['export_seconds']:.1f}s, "
          f"total {result['total_seconds']:.1f}s); parity: {sum(c.passed for c in checks)}/{len(checks)} checks passed"
          + (f"; skipped: {'; '.join(result['parity'].skipped)}" if result["parity"].skipped else ""))


@app.command()
def onnx(
    ctx: typer.Context, model: ModelOpt, out: OutOpt,
    precision: Annotated[str, typer.Option(help="fp32 | fp16 (fp16 weights, fp32 compute)")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17)")] = 17,
    simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="onnxsim when it shrinks the graph")] = True,
    fuse_gelu: Annotated[bool, typer.Option("--fuse-gelu/--no-fuse-gelu", help=(
        "one com.microsoft.FastGelu per FFN instead of ten elementwise nodes (onnxruntime's Core ML provider "
        "runs it on the CPU)"))] = True,
    linear_layout: Annotated[str, typer.Option(help=(
        "conv: the transformer's linears as 1×1 convolutions, which onnxruntime runs with its faster NCHWc kernels "
        "(same fp32 products; not with --quantize int8) | matmul: as exported"))] = "conv",
    class_tables: Annotated[bool, typer.Option("--class-tables/--no-class-tables", help=(
        "AdaLN projections as per-class tables computed at export: looked up by label instead of recomputed at "
        "every scale (when the table is no larger than the weight it replaces)"))] = True,
    external_data: Annotated[str, typer.Option(help="auto (>= 1 GiB of weights) | always | never")] = "auto",
    top_k: TopK = 900, top_p: TopP = 0.96,
    quantize: Annotated[str, typer.Option(help="none | int8 (onnxruntime dynamic int8 of the transformer's "
                                               "linears, gated against the fp32 export by per-scale KL and token agreement)")] = "none",
    int8_fp32: Annotated[str, typer.Option(help="with --quantize int8: layer groups kept fp32 (adaln, head; or none)")] = "adaln,head",
    quantize_decoder: Annotated[str, typer.Option(help="none | int8 (static int8 of the VQVAE decoder's convolutions, "
                                                       "calibrated on the model's own generations, gated on image PSNR "
                                                       "against the fp32 decoder graph)")] = "none",
    decoder_min_psnr: Annotated[Optional[float], typer.Option(help="with --quantize-decoder int8: the gate's PSNR "
                                                                   "bound in dB on [-1, 1] images (default 30)")] = None,
    cfg_until_scale: Annotated[Optional[int], typer.Option(help="CFG trimming: scales >= N run without guidance, "
                                                                "conditional rows only (batch B, not 2B)")] = None,
    early_model: Annotated[Optional[str], typer.Option(help="scale split: the model (e.g. the dense one, same "
                                                            "tokenizer) that generates the scales before --split-scale")] = None,
    split_scale: Annotated[Optional[int], typer.Option(help="scale split: the first scale --model generates (after "
                                                            "prefilling its cache from the early tokens in one pass)")] = None,
    token_keep: Annotated[Optional[str], typer.Option(help="late-scale token pruning: SCALE:RATIO,… (e.g. 4:0.6,5:0.4): "
                                                           "the transformer runs on that share of a scale's tokens (the "
                                                           "highest-frequency ones), the rest are restored; composes "
                                                           "with --cfg-until-scale and --quantize int8")] = None,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
    t_list: Annotated[Optional[str], typer.Option(help="Distilled Decoding model: the student passes to export, one "
                                                       "graph each, e.g. 0 or 0,3 (default: 0 and S//2)")] = None,
) -> None:
    """One decoder-step graph for every scale + the VQVAE decoder (a DD model: one graph per student pass),
    parity-checked with onnxruntime."""
    from evar.export.onnx import OnnxOptions
    from evar.export.quantize import DecoderInt8Options, Int8Options, parse_fp32_groups

    options = OnnxOptions(precision=precision, opset=opset, simplify=simplify, fuse_gelu=fuse_gelu,
                          linear_layout=linear_layout, class_tables=class_tables,
                          external_data=external_data, top_k=top_k, top_p=top_p, quantize=quantize,
                          int8=Int8Options(keep_fp32=parse_fp32_groups(int8_fp32)), cfg_until_scale=cfg_until_scale,
                          split_scale=split_scale, early_model=early_model, token_keep=token_keep,
                          quantize_decoder=quantize_decoder,
                          decoder_int8=DecoderInt8Options() if decoder_min_psnr is None else
                          DecoderInt8Options(min_psnr_db=decoder_min_psnr))
    options.validate()  # before loading a model: a bad option costs nothing
    from evar.export.dd_export import routes_to_dd

    if routes_to_dd(model, t_list, _explicit(ctx, "top_k", "top_p", "int8_fp32", "precision", "quantize", "cfg_until_scale",
                                             "early_model", "split_scale", "token_keep", "quantize_decoder",
                                             "decoder_min_psnr")):
        from evar.export.dd_export import build_dd_onnx, export_command

        command = command_line("evar-export")
        _summary(out, export_command(model, out, t_list, var_ckpt, vae_ckpt, overwrite, 4,
                                     lambda m, ts: build_dd_onnx(m, model, out, options, ts, command)))
        return
    with claim_output(out, "dir", overwrite=overwrite, inputs=[model, var_ckpt, vae_ckpt, early_model]):
        from evar.export.artifact import build_onnx

        loaded = _load(model, var_ckpt, vae_ckpt, out, 2 if precision == "fp16" else 4)
        early = _load(early_model, None, None, out, 4) if early_model is not None else None
        result = build_onnx(loaded, model, out, options, command_line("evar-export"), early=early)
    _summary(out, result)


@app.command()
def coreml(
    ctx: typer.Context, model: ModelOpt, out: OutOpt,
    precision: Annotated[str, typer.Option(help="fp16 | fp32 compute")] = "fp16",
    target: Annotated[str, typer.Option(help="iOS18 (KV cache as state) | iOS17 (KV as inputs/outputs) | ane (Neural Engine layout, fp16, KV state padded to 32, sampling on the host; iOS18)")] = "iOS18",
    compute_units: Annotated[str, typer.Option(help="all | cpu_and_ne | cpu_and_gpu | cpu_only")] = "all",
    compress: Annotated[str, typer.Option(help="none | palettize6 | palettize4 | int8 | 2:4 | 2:4+palettize6 | "
                                                      "2:4+palettize4 (coremltools.optimize.coreml; 2:4 needs a model "
                                                      "from `evar sparsify --pattern 2:4`; palettize*/int8 are "
                                                      "gated on KL, 1 - TV and PSNR: --compress-*)")] = "none",
    batch: Annotated[int, typer.Option(help="static batch of every function")] = 1,
    top_k: TopK = 900, top_p: TopP = 0.96,
    cfg_until_scale: Annotated[Optional[int], typer.Option(help="CFG trimming: scales >= N run unguided functions, "
                                                                "conditional rows only (batch B, not 2B)")] = None,
    early_model: Annotated[Optional[str], typer.Option(help="scale split: the model (same tokenizer) whose functions "
                                                            "generate the scales before --split-scale")] = None,
    split_scale: Annotated[Optional[int], typer.Option(help="scale split: the first scale --model generates (after "
                                                            "its prefill function builds its cache from the early tokens)")] = None,
    token_keep: Annotated[Optional[str], typer.Option(help="late-scale token pruning: ONNX only for now (refused here)")] = None,
    compress_max_kl: GateMaxKl = None, compress_min_agreement: GateMinAgreement = None,
    compress_min_psnr: GateMinPsnr = None,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
    t_list: Annotated[Optional[str], typer.Option(help="Distilled Decoding model: the student passes to export, one "
                                                       "function each, e.g. 0 or 0,3 (default: 0 and S//2)")] = None,
) -> None:
    """One mlprogram function per scale sharing weights + the VQVAE decoder (a DD model: one function per student
    pass); structure and wrapper parity on Linux."""
    from evar.export.coreml import CoremlOptions

    options = CoremlOptions(precision=precision, target=target, compute_units=compute_units, compress=compress,
                            batch=batch, top_k=top_k, top_p=top_p, cfg_until_scale=cfg_until_scale,
                            split_scale=split_scale, early_model=early_model, token_keep=token_keep,
                            compress_gate=_gate(compress_max_kl, compress_min_agreement, compress_min_psnr))
    options.validate()
    from evar.export.dd_export import routes_to_dd

    if routes_to_dd(model, t_list, _explicit(ctx, "top_k", "top_p", "target", "compress", "cfg_until_scale",
                                             "early_model", "split_scale", "token_keep", "compress_max_kl",
                                             "compress_min_agreement", "compress_min_psnr")):
        from evar.export.dd_coreml import build_dd_coreml
        from evar.export.dd_export import export_command

        command = command_line("evar-export")
        _summary(out, export_command(model, out, t_list, var_ckpt, vae_ckpt, overwrite,
                                     2 if precision == "fp16" else 4,
                                     lambda m, ts: build_dd_coreml(m, model, out, options, ts, command)))
        return
    with claim_output(out, "dir", overwrite=overwrite, inputs=[model, var_ckpt, vae_ckpt, early_model]):
        from evar.export.artifact import build_coreml

        loaded = _load(model, var_ckpt, vae_ckpt, out, 2 if precision == "fp16" else 4)
        early = _load(early_model, None, None, out, 2 if precision == "fp16" else 4) if early_model is not None else None
        result = build_coreml(loaded, model, out, options, command_line("evar-export"), early=early)
    _summary(out, result)


def _gate(max_kl: Optional[float], min_agreement: Optional[float], min_psnr: Optional[float]) -> Optional[CompressGate]:
    """The gate thresholds given on the command line over CompressGate's defaults; None when none was given."""
    given = {k: v for k, v in (("max_kl", max_kl), ("min_token_agreement", min_agreement), ("min_psnr_db", min_psnr))
             if v is not None}
    return CompressGate(**given) if given else None


@app.command("inspect")
def inspect_cmd(
    artifact: Annotated[Path, typer.Argument(help="an artifact directory (manifest.json + graphs)")],
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="check every file's size and sha256")] = True,
    strict_ane: Annotated[bool, typer.Option("--strict-ane", help="fail (exit 2) when a function meant for the Neural "
                                             "Engine has any finding (fp32 or int ops, sort/cumsum/scatter/gather, "
                                             "unaligned state, dynamic slices, fp16 squares)")] = False,
) -> None:
    """Graphs, I/O per scale, sizes, op histogram, the ANE-risk report and ops expected on the ANE per function."""
    from evar.export.inspect import report, strict_ane as check

    print(report(artifact, verify_files=verify))
    if strict_ane:
        check(artifact)
        print("--strict-ane: every function meant for the Neural Engine passes")


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
