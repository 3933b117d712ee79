"""The `evar dd` commands (also `python -m evar.dd`, the form torchrun launches). Flags and help only; the work
is in `pairs`, `trainer` and `sampler`. Under torchrun only rank 0 claims the output (the ranks are one run)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.cli_options import Guidance, Overwrite, Seed, TopK, TopP
from evar.outputs import claim_output

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distilled Decoding: one- and two-step generation distilled from a VAR teacher.")


@app.callback()
def _group() -> None:
    """Distilled Decoding: one- and two-step generation distilled from a VAR teacher."""


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


@app.command()
def pairs(
    teacher: Annotated[str, typer.Option(help="the VAR to distil: builtin:digits or a model directory")],
    samples: Annotated[int, typer.Option(help="how many (noise, tokens) pairs; sample i has class i mod classes")],
    out: Annotated[Path, typer.Option(help="pairs folder (pairs.json + parts/); rerun the same command to "
                                           "continue an interrupted run")],
    guidance: Guidance = 1.5, top_k: TopK = 900, top_p: TopP = 0.96,
    seed: Annotated[int, typer.Option(help="numbers the noise: sample i's noise depends on (seed, i) only")] = 0,
    ode_steps: Annotated[int, typer.Option(help="Euler steps of the noise → token flow (at 32 the token "
                                                "frequencies pass a chi-square test against the teacher's)")] = 32,
    chunk: Annotated[int, typer.Option(help="samples per part file (the unit of resuming and of the ranks' "
                                            "shares; part of the result's definition)")] = 256,
    overwrite: Overwrite = False,
) -> None:
    """Noise per token → the teacher's tokens by a deterministic flow, scale by scale with the KV cache."""
    from evar.dd.pairs import PAIRS_KIND, PairsRecipe, make_pairs
    from evar.samples import SamplingSettings

    recipe = PairsRecipe(samples, SamplingSettings(guidance, top_k, top_p, seed), ode_steps, chunk)
    recipe.validate()
    claim = claim_output(out, "dir", overwrite=overwrite, resumes=() if overwrite else (PAIRS_KIND,),
                         inputs=[teacher], progress_note=f"finished parts wait in {out}")
    with claim if _rank0() else contextlib.nullcontext():
        make_pairs(teacher, out, recipe, overwrite=overwrite)


@app.command()
def train(
    teacher: Annotated[str, typer.Option(help="the VAR the pairs were made from (its weights' sha256 is checked)")],
    pairs: Annotated[Path, typer.Option(help="a finished `evar dd pairs` folder")],
    out: Annotated[Path, typer.Option(help="DD model directory to write; it holds the checkpoint while the run is "
                                           "going (rerun the same command to continue)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 2000,
    batch_size: Annotated[int, typer.Option(help="global batch (pairs per step), split evenly over DDP ranks")] = 64,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate (linear warm-up, cosine to 10%)")] = 5e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.01,
    warmup: Annotated[int, typer.Option(help="warm-up steps")] = 100,
    p_zero: Annotated[float, typer.Option(help="share of pairs trained as the one-step case (all noise); the others "
                                               "get their first t scales as data, t uniform in 1..S-1")] = 0.5,
    reg_weight: Annotated[float, typer.Option(help="weight of the regression head's squared error")] = 1.0,
    continuous_from: Annotated[Optional[int], typer.Option(
        help="scales from this one on are sampled from the regression head (default: argmax tokens everywhere)")] = None,
    seed: Annotated[int, typer.Option(help="seeds the batch order and the t draws")] = 0,
    ckpt_every: Annotated[int, typer.Option(help="write the resumable checkpoint every N steps (atomic)")] = 200,
    overwrite: Overwrite = False,
) -> None:
    """Train a DD student (initialised from the teacher) on the pairs; resumable; DDP under torchrun."""
    from evar.dd.trainer import DDRecipe, train as run
    from evar.train import Schedule

    recipe = DDRecipe(Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                               ckpt_every=ckpt_every, seed=seed), p_zero, reg_weight, continuous_from)
    recipe.validate(int(os.environ.get("WORLD_SIZE", "1")))
    claim = claim_output(out, "dir", overwrite=overwrite, resumes=("training run",), inputs=[teacher, pairs],
                         progress_note=f"the last checkpoint waits in {out}")
    with claim if _rank0() else contextlib.nullcontext():
        run(teacher, pairs, out, recipe, overwrite=overwrite)
