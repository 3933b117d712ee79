"""The body of `evar sparsify` (registered in evar/apps/cli.py)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.cli_options import ModelOpt, Overwrite, VaeCkpt, VarCkpt
from evar.outputs import claim_output


def sparsify(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="sparse model directory to write (masks beside the weights)")],
    pattern: Annotated[str, typer.Option(help="N:M (N of every M weights along the input dimension are zero: "
                                              "2:4, 4:8) | unstructured")] = "2:4",
    sparsity: Annotated[Optional[float], typer.Option(help="unstructured: share of weights to zero, in [0, 1)")] = None,
    method: Annotated[str, typer.Option(help="magnitude | wanda | sparsegpt | learnable")] = "sparsegpt",
    update: Annotated[bool, typer.Option("--update/--no-update", help="SparseGPT: compensate the kept weights")] = True,
    calib_samples: Annotated[int, typer.Option(help="calibration sequences (wanda, sparsegpt, a prior)")] = 128,
    calib_data: Annotated[str, typer.Option(help="'teacher' (a VAR: its own generations; a ViT: its training data; a DiT: "
                                                "digits), 'digits' or an image folder")] = "teacher",
    calib_batch: Annotated[int, typer.Option(help="calibration sequences per mini-batch")] = 8,
    blocksize: Annotated[int, typer.Option(help="SparseGPT: columns per lazy block")] = 128,
    percdamp: Annotated[float, typer.Option(help="SparseGPT: damping, a fraction of mean(diag H)")] = 0.01,
    include_head: Annotated[bool, typer.Option("--include-head", help="also the head (VAR: its AdaLN and output "
                                                                      "layer; ViT: head; DiT: final layer)")] = False,
    include_embed: Annotated[bool, typer.Option("--include-embed", help="also word_embed (and a shared AdaLN)")] = False,
    teacher: Annotated[Optional[str], typer.Option(help="learnable: the dense model the masks learn to imitate "
                                                        "(the --model itself, or its parent before structured "
                                                        "pruning)")] = None,
    prior: Annotated[str, typer.Option(help="learnable: the one-shot mask it starts from (magnitude | wanda | "
                                            "sparsegpt)")] = "sparsegpt",
    steps: Annotated[int, typer.Option(help="learnable: training steps")] = 300,
    tau: Annotated[str, typer.Option(help="learnable: Gumbel-softmax temperature, start,end (annealed)")] = "4,0.05",
    scale: Annotated[str, typer.Option(help="learnable: gate logit scale, start,end (rising linearly)")] = "10,100",
    prior_strength: Annotated[float, typer.Option(help="learnable: how strongly the prior mask starts ahead")] = 3.0,
    weight_reg: Annotated[float, typer.Option(help="learnable: λ of the −λ·Σ‖W⊙M‖² regulariser")] = 1e-5,
    lr: Annotated[float, typer.Option(help="learnable: AdamW learning rate of the gates")] = 0.05,
    batch_size: Annotated[int, typer.Option(help="learnable: sequences per step")] = 16,
    data_samples: Annotated[int, typer.Option(help="learnable: the dense teacher's sequences to train on")] = 512,
    ckpt_every: Annotated[int, typer.Option(help="learnable: resumable checkpoint interval (steps)")] = 100,
    seed: Annotated[int, typer.Option(help="seed of the calibration and training data")] = 0,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
) -> None:
    """Zero weights of every Linear in the blocks of a VAR, a ViT or a DiT in an N:M or unstructured pattern
    (magnitude, Wanda, SparseGPT, or masks learnt against the dense model); the masks are stored with the model."""
    from evar.sparsity.recipe import SparsifyRecipe, parse_pair

    recipe = SparsifyRecipe(pattern=pattern, sparsity=sparsity, method=method, update=update, blocksize=blocksize,
                            percdamp=percdamp, calib_samples=calib_samples, calib_data=calib_data,
                            calib_batch=calib_batch, head=include_head, embed=include_embed, seed=seed, prior=prior,
                            steps=steps, tau=parse_pair(tau, "--tau"), scale=parse_pair(scale, "--scale"),
                            prior_strength=prior_strength, weight_reg=weight_reg, lr=lr, batch_size=batch_size,
                            data_samples=data_samples, ckpt_every=ckpt_every)
    recipe.validate()  # before loading: a bad flag costs nothing and writes nothing
    from evar.sparsity.pipeline import check_teacher_flag

    check_teacher_flag(recipe, teacher)
    partial = out.parent / f"{out.name}.partial"
    with claim_output(out, "dir", overwrite=overwrite, inputs=[model, var_ckpt, vae_ckpt, calib_data, teacher],
                      progress_note=f"the learnable masks' training waits in {partial}/"):
        from evar.sparsity.pipeline import run

        t0 = time.perf_counter()
        summary = run(model, recipe, out, partial, var_ckpt, vae_ckpt, teacher)
    print(summary)
    print(f"model directory → {out} ({time.perf_counter() - t0:.0f}s with loading and saving)")
