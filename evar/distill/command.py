"""The `evar distill` command: its flags and their help, in one place for `evar` and `python -m evar.distill`."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.cli_options import Overwrite
from evar.distill import defaults as D
from evar.outputs import claim_output


def distill(
    teacher: Annotated[str, typer.Option(help="the trained dense model to learn from: builtin:digits, a model "
                                              "directory, or official:dNN with --var-ckpt/--vae-ckpt")],
    student: Annotated[str, typer.Option(help="the model to train, usually `evar prune` output: same depth, width, "
                                              "head_dim, vocab, scales and classes as the teacher; per-block heads "
                                              "and FFN widths may differ")],
    out: Annotated[Path, typer.Option(help="model directory to write; it also gets train_log.jsonl and loss.png, "
                                           "and holds the checkpoint while the run is going")],
    kd: Annotated[str, typer.Option(help="normal: T²·KL(teacher‖student) averaged over all tokens | scale_aware: "
                                         "per-scale averages weighted by --scale-weights | both: half of each")] = D.KD,
    temperature: Annotated[float, typer.Option(help="softmax temperature T of the KD terms (scaled by T²)")] = (
        D.TEMPERATURE),
    alpha: Annotated[float, typer.Option(help="weight of the task loss: cross-entropy on the data tokens, "
                                              "every token weighing 1/L as in VAR's training")] = D.ALPHA,
    beta: Annotated[float, typer.Option(help="weight of the KD term chosen by --kd")] = D.BETA,
    scale_weights: Annotated[Optional[str], typer.Option(
        help="scale-aware KD weights, comma-separated, coarse to fine, one per scale (default 2.0 → 0.2 linearly); "
             "relative: each scale is first averaged over its own tokens, then the weights are normalised "
             "to sum 1")] = None,
    feature_weight: Annotated[float, typer.Option(help="weight of hidden-state distillation: MSE between the "
                                                       "outputs of matching blocks (0 = off)")] = D.FEATURE_WEIGHT,
    progressive: Annotated[bool, typer.Option(help="grow the scales the losses cover, coarse to fine: the first "
                                                   "half of the steps in S equal stages (stage k trains scales "
                                                   "0..k), then all scales")] = False,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = D.STEPS,
    batch_size: Annotated[int, typer.Option(help="global batch (sequences per step), split evenly over "
                                                 "DDP ranks")] = D.BATCH_SIZE,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate (linear warm-up, cosine to 10%)")] = D.LR,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = D.WEIGHT_DECAY,
    warmup: Annotated[int, typer.Option(help="warm-up steps")] = D.WARMUP,
    data: Annotated[str, typer.Option(help="teacher: sequences the teacher samples itself, unguided (no dataset "
                                           "needed) | digits | an image folder: real images through the "
                                           "VQVAE")] = D.DATA,
    data_samples: Annotated[int, typer.Option(help="how many sequences to generate or encode")] = D.DATA_SAMPLES,
    seed: Annotated[int, typer.Option(help="seeds data order, label dropout and the teacher's generations")] = 0,
    ckpt_every: Annotated[int, typer.Option(help="write the resumable checkpoint every N steps "
                                                 "(atomic)")] = D.CKPT_EVERY,
    resume: Annotated[bool, typer.Option(help="continue the unfinished run in --out from its last checkpoint "
                                              "(same flags → same final weights as an uninterrupted run)")] = False,
    var_ckpt: Annotated[Optional[Path], typer.Option(help="official VAR .pth (with --teacher official:dNN)")] = None,
    vae_ckpt: Annotated[Optional[Path], typer.Option(help="official VQVAE .pth (with --teacher official:dNN)")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Distil a dense teacher into a pruned student (teacher forcing); resumable; DDP under torchrun."""
    from evar.distill.trainer import DistillRecipe, distill as run, parse_scale_weights
    from evar.samples import SamplingSettings
    from evar.train import Schedule

    sched = Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                     ckpt_every=ckpt_every, seed=seed)
    recipe = DistillRecipe(kd=kd, temperature=temperature, alpha=alpha, beta=beta,
                           scale_weights=parse_scale_weights(scale_weights), feature_weight=feature_weight,
                           progressive=progressive, data=data, data_samples=data_samples,
                           sampling=SamplingSettings(D.DATA_CFG, D.DATA_TOP_K, D.DATA_TOP_P, seed), schedule=sched)
    recipe.validate(int(os.environ.get("WORLD_SIZE", "1")))
    # The run folder is trained in place: --resume continues it (its own rules, in the trainer); --overwrite
    # replaces a finished model directory there (the trainer removes it after the teacher and student loaded).
    # Under torchrun only rank 0 claims --out (the ranks are one run).
    claim = claim_output(out, "dir", overwrite=overwrite, resumes=("training run",), inputs=[teacher, student],
                         progress_note=f"the last checkpoint waits in {out} (continue with --resume)")
    with claim if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        run(teacher, student, out, recipe, resume=resume, var_ckpt=var_ckpt, vae_ckpt=vae_ckpt, overwrite=overwrite)
