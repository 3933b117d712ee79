"""The bodies of `evar train-dit`, `evar convert-dit`, `evar prune-dit` and `evar distill-dit` (registered in
evar/apps/cli.py); `evar sample`, `evar eval` and `evar info` reach DiT models through `describe`,
`sample_images_of` and `evaluate_dit`."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from evar.cli_options import ModelOpt, Overwrite
from evar.errors import EvarError
from evar.outputs import claim_output, mark_output

DDIMSteps = Annotated[int, typer.Option(help="DiT models: DDIM steps (evenly spaced over the training schedule)")]


def train_dit_cmd(
    out: Annotated[Path, typer.Option(help="run directory; the model directory is OUT/model")],
    data: Annotated[str, typer.Option(help="'digits' or an image folder (class subfolders)")] = "digits",
    steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
    ema_decay: Annotated[float, typer.Option(help="weight averaging (what is sampled and saved)")] = 0.999,
    shift_augment: Annotated[int, typer.Option(help="train on copies shifted by up to N pixels")] = 1,
    ckpt_every: Annotated[int, typer.Option(help="resumable checkpoint interval (steps)")] = 500,
) -> None:
    """Train a class-conditional pixel-space DiT (builtin:dit-digits' architecture); rerun to resume."""
    from evar.dit.train import DiTTraining, train_dit
    from evar.train import Schedule

    job = DiTTraining(data=data, schedule=Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0,
                                                   ckpt_every=ckpt_every, seed=seed),
                      ema_decay=ema_decay, shift_augment=shift_augment)
    job.validate()
    with claim_output(out, "dir", resumes=("DiT training run",), progress_note=f"the last checkpoint waits in {out}"):
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "DiT training run")
        t0 = time.perf_counter()
        path = train_dit(job, out)
    print(f"DiT model directory → {path} ({time.perf_counter() - t0:.0f}s)")


def convert_dit(
    ckpt: Annotated[Path, typer.Option(help="a facebookresearch/DiT release file, e.g. DiT-XL-2-256x256.pt")],
    out: Annotated[Path, typer.Option(help="DiT model directory to write")],
    arch: Annotated[str, typer.Option(help="XL/2 | L/2 | B/2 | S/2 (or /4, /8)")] = "XL/2",
    image_size: Annotated[int, typer.Option(help="256 or 512: the latent side is image_size / 8")] = 256,
    num_classes: int = 1000, overwrite: Overwrite = False,
) -> None:
    """Turn an official DiT checkpoint into an EVAR DiT model directory (checked key by key)."""
    from evar.dit.checkpoint import load_official_dit, official_dit_config, save_dit_dir

    config = official_dit_config(arch, image_size, num_classes)
    with claim_output(out, "dir", overwrite=overwrite, inputs=[ckpt]):
        save_dit_dir(load_official_dit(ckpt, config), out)
    print(f"DiT model directory → {out}")


def prune_dit_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="pruned DiT model directory to write (+ prune_report.json)")],
    sparsity: Annotated[float, typer.Option(help="share of heads and FFN units to remove, in [0, 1)")] = 0.0,
    attn_sparsity: Annotated[float | None, typer.Option(help="heads only (default --sparsity)")] = None,
    ffn_sparsity: Annotated[float | None, typer.Option(help="FFN units only (default --sparsity)")] = None,
    method: Annotated[str, typer.Option(help="obs | taylor | magnitude")] = "obs",
    taylor_type: Annotated[str, typer.Option(help="param_first | param_second | param_mix")] = "param_first",
    percdamp: Annotated[float, typer.Option(help="OBS damping, a fraction of mean(diag H)")] = 0.01,
    compensate: Annotated[bool, typer.Option("--compensate/--no-compensate", help="OBS weight update")] = True,
    calib_data: Annotated[str, typer.Option(help="'digits' or an image folder, noised at random timesteps")] = "digits",
    calib_samples: int = 256, calib_batch: int = 32,
    schedule: Annotated[str, typer.Option(help="uniform | log_increase | log_decrease over blocks")] = "uniform",
    iterative_steps: Annotated[int, typer.Option(help="reach the target in K rounds, re-scoring after each")] = 1,
    seed: int = 0, overwrite: Overwrite = False,
) -> None:
    """Remove whole attention heads and FFN units of a DiT (the criteria of `evar prune`)."""
    from evar import zoo
    from evar.dit.checkpoint import save_dit_dir
    from evar.dit.prune import DiTPruneRecipe, prune_dit
    from evar.files import atomic_write_json

    recipe = DiTPruneRecipe(sparsity=sparsity, attn_sparsity=attn_sparsity, ffn_sparsity=ffn_sparsity, method=method,
                            taylor_type=taylor_type, percdamp=percdamp, compensate=compensate, calib_data=calib_data,
                            calib_samples=calib_samples, calib_batch=calib_batch, schedule=schedule,
                            iterative_steps=iterative_steps, seed=seed)
    recipe.validate()
    if max(recipe.rate("heads"), recipe.rate("ffn")) == 0:
        raise EvarError("nothing to prune: give --sparsity, --attn-sparsity or --ffn-sparsity above 0")
    with claim_output(out, "dir", overwrite=overwrite, inputs=[model, calib_data]):
        loaded = zoo.load_family(model, ("dit",))
        pruned, report = prune_dit(loaded, recipe, parent=model)
        save_dit_dir(pruned, out)
        atomic_write_json(out / "prune_report.json", report)
    p = report["params"]
    print(f"DiT params {p['before'] / 1e6:.3f}M → {p['after'] / 1e6:.3f}M in {report['seconds']:.0f}s; "
          f"model directory → {out}")


def distill_dit_cmd(
    teacher: Annotated[str, typer.Option(help="the dense DiT")],
    student: Annotated[str, typer.Option(help="`evar prune-dit` output")],
    out: Annotated[Path, typer.Option(help="run directory; the model directory is OUT/model")],
    data: Annotated[str, typer.Option(help="'digits' or an image folder")] = "digits",
    steps: int = 600, batch_size: int = 64, lr: float = 3e-4, seed: int = 0,
    ckpt_every: Annotated[int, typer.Option(help="resumable checkpoint interval (steps)")] = 200,
) -> None:
    """Train a pruned DiT to reproduce the dense DiT's noise predictions; rerun to resume."""
    from evar import zoo
    from evar.dit.distill import DiTDistillation, distill_dit
    from evar.train import Schedule

    job = DiTDistillation(data=data, schedule=Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0,
                                                       warmup=min(50, steps), ckpt_every=ckpt_every, seed=seed))
    if steps < 1 or batch_size < 1:
        raise EvarError("--steps and --batch-size must be >= 1")
    with claim_output(out, "dir", resumes=("DiT distillation run",), inputs=[teacher, student],
                      progress_note=f"the last checkpoint waits in {out}"):
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "DiT distillation run")
        t0 = time.perf_counter()
        path = distill_dit(zoo.load_family(teacher, ("dit",)), zoo.load_family(student, ("dit",)), job, out,
                           parent=teacher)
    print(f"DiT model directory → {path} ({time.perf_counter() - t0:.0f}s)")


# ---------------------------------------------------------------- what evar info / sample / eval call
def describe(model) -> str:
    c = model.config
    params = sum(p.numel() for p in model.dit.parameters())
    sparse = ""
    if model.sparsity is not None:
        from evar.sparsity.report import sparsity_lines

        sparse = "\n" + "\n".join(sparsity_lines(model))
    return (f"DiT: depth {c.depth}, width {c.hidden_size}, heads {list(c.num_heads)}, FFN {list(c.ffn_dims)}, "
            f"patch {c.patch_size} on {c.in_channels}×{c.input_size}² ({c.num_patches} tokens), "
            f"{c.num_classes} classes, {c.diffusion_steps} diffusion steps\nparams: {params / 1e6:.2f}M\n"
            f"provenance: {json.dumps(model.provenance)}" + sparse)


def settings_for(guidance: float, ddim_steps: int, seed: int):
    from evar.dit.diffusion import DiTSampling

    return DiTSampling(guidance=guidance, steps=ddim_steps, seed=seed)


def evaluate_dit(model, settings, per_class: int, source: str) -> dict:
    """`evar eval` for a DiT: the same report as a VAR's (class accuracy, Fréchet distance, diversity)."""
    from evar.dit.sample import check_pixel_space, sample_dit_images
    from evar.eval.classifier import IMAGE_SIZE, NUM_CLASSES
    from evar.eval.metrics import evaluate_digits
    from evar.samples import class_labels

    check_pixel_space(model, "evar eval")
    if model.config.num_classes != NUM_CLASSES or model.config.input_size != IMAGE_SIZE:
        raise EvarError(f"evar eval scores digits models ({NUM_CLASSES} classes, {IMAGE_SIZE}px); this DiT has "
                        f"{model.config.num_classes} classes at {model.config.input_size}px")
    labels = class_labels(list(range(NUM_CLASSES)), per_class)
    t0 = time.perf_counter()
    images = sample_dit_images(model, labels, settings)
    quality = evaluate_digits(images, labels.numpy())
    return {"model": source, "sampling": dataclasses.asdict(settings), "quality": quality.to_dict(),
            "params": sum(p.numel() for p in model.dit.parameters()), "seconds": round(time.perf_counter() - t0, 2)}
