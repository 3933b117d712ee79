"""`python -m evar.eval.imagenet` (≡ `evar eval-imagenet`): FID, IS, precision and recall of a VAR model,
an exported artifact or a set of images, with the FID Inception, sharded over torchrun ranks, resumable.

    torchrun --nproc_per_node 8 -m evar.eval.imagenet --model official:d16 --var-ckpt var_d16.pth \\
        --vae-ckpt vae_ch160v4096z32.pth --ref-stats VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth --out runs/d16_fid.json

The flags and their help live here once; the run is `evar.eval.sharded`. This module is a command (it sits
with the apps: it may reach the runtime, to evaluate exported artifacts); the evaluation itself does not.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from evar.cli_options import Overwrite


def eval_imagenet(
    out: Annotated[Path, typer.Option(help="the report (JSON); shards wait in OUT's name + .parts/ (see --work-dir)")],
    inception_weights: Annotated[Optional[Path], typer.Option(
        help="pt_inception-2015-12-05-6726825d.pth, the FID Inception (pytorch-fid's release file); never "
             "downloaded")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="official:dNN (with --var-ckpt/--vae-ckpt), builtin:digits, random:…, or an EVAR "
                              "model directory (pruned, distilled, 2:4)")] = None,
    var_ckpt: Annotated[Optional[Path], typer.Option(help="official VAR .pth (with --model official:dNN)")] = None,
    vae_ckpt: Annotated[Optional[Path], typer.Option(help="official VQVAE .pth (with --model official:dNN)")] = None,
    artifact: Annotated[Optional[Path], typer.Option(help="an exported artifact (evar-export), generated through "
                                                          "the runtime instead of --model")] = None,
    backend: Annotated[str, typer.Option(help="with --artifact: cpu (onnxruntime) | torch-cpu | ort-coreml | …")] = "cpu",
    images: Annotated[Optional[Path], typer.Option(
        help="evaluate existing images instead: a folder (recursive, sorted; centre-cropped to --image-size as ADM "
             "prepares ImageNet) or an npz with arr_0 / images. With --save-ref-stats: make reference "
             "statistics from real images")] = None,
    image_size: Annotated[int, typer.Option(help="with --images FOLDER: side of the centre crop")] = 256,
    ref_stats: Annotated[Optional[Path], typer.Option(
        help="reference: ADM's VIRTUAL_imagenet256_labeled.npz (FID + precision/recall), a mu/sigma npz (FID "
             "only), or a --save-ref-stats file")] = None,
    preprocess: Annotated[str, typer.Option(
        help="tf: TensorFlow 1.x bilinear resize to 299 and (x-128)/128, as the graph behind ADM's statistics "
             "| pytorch-fid: its resize and scaling, for pytorch-fid statistics")] = "tf",
    num_samples: Annotated[Optional[int], typer.Option(
        help="images to generate, a multiple of the classes (default 50000 = 50 per ImageNet class); with "
             "--images: the first N (default all)")] = None,
    batch_size: Annotated[int, typer.Option(help="images generated and scored at once, per rank")] = 64,
    cfg: Annotated[float, typer.Option(help="classifier-free guidance at the last scale (VAR's FID protocol: "
                                            "1.5)")] = 1.5,
    top_k: Annotated[int, typer.Option(help="keep the k most likely tokens (0 = off)")] = 900,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass (0 = off)")] = 0.96,
    seed: Annotated[int, typer.Option(help="sample i draws numbers i·pn² … of this seed's streams: the same "
                                           "image on any number of ranks")] = 0,
    precision: Annotated[str, typer.Option(help="generation arithmetic: fp32 (reproducible) | bf16 | fp16 (GPU) "
                                                "autocast; the Inception always runs fp32")] = "fp32",
    save_png: Annotated[Optional[Path], typer.Option(help="also write every sample as DIR/000123_class0002.png")] = None,
    save_ref_stats: Annotated[Optional[Path], typer.Option(
        help="write the evaluated set's mu/sigma (pytorch-fid/ADM readable) + features as an npz: reference "
             "statistics for later runs")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="where finished shards are kept (default: next to "
                                                          "--out); rerun the same command to resume")] = None,
    shard_size: Annotated[int, typer.Option(help="samples per shard file (the unit of resuming)")] = 512,
    overwrite: Overwrite = False,
) -> None:
    """ImageNet-style FID / IS / precision / recall with the FID Inception; under torchrun the ranks split
    the samples (same images on any rank count); rerun to resume."""
    from evar.eval.sharded import EvalPlan, evaluate
    from evar.samples import SamplingSettings

    plan = EvalPlan(out=out, inception_weights=inception_weights, model=model, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt,
                    artifact=artifact, backend=backend, images=images, image_size=image_size, ref_stats=ref_stats,
                    preprocess=preprocess, num_samples=num_samples, batch_size=batch_size,
                    sampling=SamplingSettings(cfg, top_k, top_p, seed), precision=precision, save_png=save_png,
                    save_ref_stats=save_ref_stats, work_dir=work_dir, shard_size=shard_size)
    with _claims(plan, overwrite, [model, artifact, images, ref_stats]):
        evaluate(plan, open_artifact)


@contextlib.contextmanager
def _claims(plan: Any, overwrite: bool, inputs: list[Any]):
    """Every place this run writes, checked and held before any work (by rank 0 alone under torchrun)."""
    from evar.eval.sharded import WORK_DIR_KIND
    from evar.outputs import claim_output, mark_output

    with contextlib.ExitStack() as stack:
        if os.environ.get("RANK", "0") == "0":
            stack.enter_context(claim_output(plan.out, "file", overwrite=overwrite, inputs=inputs))
            if plan.save_ref_stats is not None:
                stack.enter_context(claim_output(plan.save_ref_stats, "file", overwrite=overwrite, inputs=inputs,
                                                 flag="--save-ref-stats"))
            stack.enter_context(claim_output(plan.parts, "dir", resumes=(WORK_DIR_KIND,), inputs=inputs,
                                             flag="--work-dir", progress_note=f"finished shards wait in {plan.parts}"))
            if plan.save_png is not None:
                stack.enter_context(claim_output(plan.save_png, "dir", resumes=("evaluation images",), inputs=inputs,
                                                 flag="--save-png"))
                plan.save_png.mkdir(parents=True, exist_ok=True)
                mark_output(plan.save_png, "evaluation images")
        yield


def open_artifact(root: Path, backend: str, settings: Any, num_samples: int, batch_size: int):
    """The source of `--artifact` runs: the exported graphs through the torch-free runtime."""
    from evar.contract import load_artifact
    from evar.eval.sources import ArtifactSource
    from evar.runtime import Generator

    settings.validate()
    art = load_artifact(root)
    gen = Generator(art, backend, batch_size=None if art.static_batch else batch_size)  # static: the artifact's
    return ArtifactSource(root, gen, settings, num_samples, backend)


def main() -> None:
    from evar.errors import run_cli

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(eval_imagenet)
    run_cli(app)


if __name__ == "__main__":
    main()
