"""The bodies of `evar prune`, `evar prune-decoder`, `evar distill-decoder` and `evar prunable` (registered
in evar/apps/cli.py). The flags both pruning commands take are declared once, below."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from evar.cli_options import ModelOpt, Overwrite, VaeCkpt, VarCkpt
from evar.errors import EvarError
from evar.outputs import claim_output
Method = Annotated[str, typer.Option(help="obs | taylor | magnitude")]
TaylorType = Annotated[str, typer.Option(help="param_first | param_second | param_mix")]
Percdamp = Annotated[float, typer.Option(help="OBS damping, a fraction of mean(diag H)")]
Compensate = Annotated[bool, typer.Option("--compensate/--no-compensate",
                                          help="OBS: update the surviving weights (off = same selection, no update)")]
CalibBatch = Annotated[int, typer.Option(help="calibration samples per mini-batch")]
MinSparsity = Annotated[float, typer.Option(help="log schedules: sparsity at the light end")]
MaxSparsity = Annotated[float, typer.Option(help="log schedules: sparsity at the heavy end")]
IterativeSteps = Annotated[int, typer.Option(help="reach the target in K rounds, re-scoring after each")]
CalibSeed = Annotated[int, typer.Option("--seed", help="seed of the calibration samples")]


def prune(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="pruned model directory to write (+ prune_report.json)")],
    sparsity: Annotated[float, typer.Option(help="share of each block's heads and FFN units to remove, in [0, 1)")],
    method: Method = "obs", taylor_type: TaylorType = "param_first", percdamp: Percdamp = 0.01,
    compensate: Compensate = True,
    calib_samples: Annotated[int, typer.Option(help="calibration sequences")] = 256,
    calib_data: Annotated[str, typer.Option(help="'teacher' (the model's own generations), 'digits' or an image folder")] = "teacher",
    calib_scale: Annotated[str, typer.Option(help="statistics over 'all' tokens, 'last' scale or scale index N")] = "all",
    calib_uncond: Annotated[float, typer.Option(help="share of calibration sequences run unconditionally (CFG's other half)")] = 0.5,
    calib_batch: CalibBatch = 8,
    calib_precision: Annotated[str, typer.Option(help="sampling the model's own calibration sequences: fp32 (the same "
                                                      "weights on every CPU) | auto (bf16 where the CPU has it "
                                                      "natively: about 2x faster) | bf16")] = "fp32",
    schedule: Annotated[str, typer.Option(help="uniform | log_increase | log_decrease (mean = --sparsity)")] = "uniform",
    min_sparsity: MinSparsity = 0.1, max_sparsity: MaxSparsity = 0.5, iterative_steps: IterativeSteps = 1,
    heads_only: Annotated[bool, typer.Option("--heads-only", help="prune attention heads only")] = False,
    ffn_only: Annotated[bool, typer.Option("--ffn-only", help="prune FFN units only")] = False,
    head_sparsity: Annotated[Optional[float], typer.Option(
        help="share of each block's heads to remove; the FFN then loses enough units that the block's weights "
             "still shrink by --sparsity (default: heads and FFN both lose --sparsity)")] = None,
    seed: CalibSeed = 0, var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
) -> None:
    """Remove whole attention heads and FFN units (OBS with compensation, Taylor or magnitude). Rerun an
    interrupted prune to continue it: the calibration set and OBS progress wait in OUT.partial/."""
    from evar import zoo
    from evar.prune import PruneRecipe, prune_model
    from evar.prune.report import summary
    from evar.prune.resume import checkpoint_for

    if heads_only and ffn_only:
        raise EvarError("--heads-only and --ffn-only exclude each other")
    recipe = PruneRecipe(sparsity=sparsity, method=method, taylor_type=taylor_type, percdamp=percdamp,
                         compensate=compensate, calib_samples=calib_samples, calib_data=calib_data,
                         calib_scale=calib_scale, calib_uncond=calib_uncond, calib_batch=calib_batch,
                         calib_precision=calib_precision, schedule=schedule, min_sparsity=min_sparsity,
                         max_sparsity=max_sparsity, iterative_steps=iterative_steps, heads=not ffn_only,
                         ffn=not heads_only, head_sparsity=head_sparsity, seed=seed)
    recipe.validate()  # before loading: a bad flag costs nothing and writes nothing
    with _claim(out, overwrite, [model, var_ckpt, vae_ckpt, calib_data]):
        t0 = time.perf_counter()
        loaded = zoo.load(model, var_ckpt, vae_ckpt)
        checkpoint = checkpoint_for(out, loaded, recipe, model)
        if checkpoint.dir.exists():
            print(f"continuing from {checkpoint.dir} (rerun of an interrupted prune)")
        result = prune_model(loaded, recipe, parent=model, checkpoint=checkpoint)
        _write(result, out, checkpoint, summary(result.report), t0)


def _claim(out: Path, overwrite: bool, inputs: list):
    return claim_output(out, "dir", overwrite=overwrite, inputs=inputs,
                        progress_note=f"the calibration set and pruning progress wait in {out}.partial/")


def _write(result, out: Path, checkpoint, summary: str, t0: float) -> None:
    """The model directory (+ prune_report.json), then the progress of the run is no longer needed."""
    from evar.prune.pipeline import save_pruned

    save_pruned(result, out)
    checkpoint.remove()
    print(summary)
    print(f"model directory → {out} (report: {out / 'prune_report.json'}); "
          f"{time.perf_counter() - t0:.0f}s with loading and saving")


def prune_decoder(
    model: ModelOpt,
    out: Annotated[Path, typer.Option(help="model directory to write (+ prune_report.json)")],
    sparsity: Annotated[float, typer.Option(help="share of each channel set to remove, per GroupNorm group, in [0, 1)")],
    method: Method = "obs", taylor_type: TaylorType = "param_first", percdamp: Percdamp = 0.01,
    compensate: Compensate = True,
    calib_samples: Annotated[int, typer.Option(help="calibration f_hat (images)")] = 64,
    calib_data: Annotated[str, typer.Option(help="'teacher' (f_hat of the model's own generations), 'digits' or an "
                                                 "image folder (through the encoder; taylor needs images)")] = "teacher",
    calib_batch: CalibBatch = 8,
    schedule: Annotated[str, typer.Option(help="uniform | log_increase | log_decrease over the decoder's levels, "
                                               "lowest resolution first (mean = --sparsity)")] = "uniform",
    min_sparsity: MinSparsity = 0.1, max_sparsity: MaxSparsity = 0.5, iterative_steps: IterativeSteps = 1,
    seed: CalibSeed = 0,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
) -> None:
    """Remove conv channels of the VQVAE decoder (residual streams, block widths and the upsampling path,
    coupled as torch-pruning's dependency graph finds them). The VAR is unchanged."""
    from evar import zoo
    from evar.prune.decoder import DecoderRecipe, summary
    from evar.prune.decoder import prune_decoder as run
    from evar.prune.resume import PruneCheckpoint

    recipe = DecoderRecipe(sparsity=sparsity, method=method, taylor_type=taylor_type, percdamp=percdamp,
                           compensate=compensate, calib_samples=calib_samples, calib_data=calib_data,
                           calib_batch=calib_batch, schedule=schedule, min_sparsity=min_sparsity,
                           max_sparsity=max_sparsity, iterative_steps=iterative_steps, seed=seed)
    recipe.validate()  # before loading: a bad flag costs nothing and writes nothing
    with _claim(out, overwrite, [model, var_ckpt, vae_ckpt, calib_data]):
        t0 = time.perf_counter()
        loaded = zoo.load(model, var_ckpt, vae_ckpt)
        checkpoint = PruneCheckpoint(PruneCheckpoint.beside(out), {"parent": model,
                                                                   "recipe": dataclasses.asdict(recipe),
                                                                   "vqvae": loaded.config.to_dict()["vqvae"]})
        result = run(loaded, recipe, parent=model, checkpoint=checkpoint)
        _write(result, out, checkpoint, summary(result.report), t0)


def distill_decoder(
    teacher: Annotated[str, typer.Option(help="the dense model whose decoder is imitated")],
    student: Annotated[str, typer.Option(help="`evar prune-decoder` output (the teacher with a smaller decoder)")],
    out: Annotated[Path, typer.Option(help="model directory to write (+ train_log.jsonl, loss.png)")],
    data: Annotated[str, typer.Option(help="'teacher' (f_hat of the teacher's generations), 'digits' or an image "
                                           "folder (through the encoder)")] = "teacher",
    samples: Annotated[int, typer.Option(help="f_hat in the training set")] = 1024,
    feature_weight: Annotated[float, typer.Option(help="weight of the digit-classifier feature loss "
                                                       "(16-pixel digits models; 0 = pixels only)")] = 1.0,
    steps: int = 800, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
    ckpt_every: Annotated[int, typer.Option(help="resumable checkpoint interval (steps)")] = 250,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None, overwrite: Overwrite = False,
) -> None:
    """Train a pruned VQVAE decoder to reproduce the teacher decoder's images from f_hat (pixel loss + digit
    classifier features); rerun the same command to resume."""
    from evar.prune.decoder_distill import DecoderDistillRecipe
    from evar.prune.decoder_distill import distill_decoder as run
    from evar.train import Schedule

    sched = Schedule(steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0, warmup=min(50, steps),
                     ckpt_every=ckpt_every, seed=seed)
    recipe = DecoderDistillRecipe(data=data, samples=samples, feature_weight=feature_weight, schedule=sched)
    t0 = time.perf_counter()
    with claim_output(out, "dir", overwrite=overwrite, resumes=("training run",), inputs=[teacher, student],
                      progress_note=f"the last checkpoint waits in {out}"):
        path = run(teacher, student, out, recipe, var_ckpt, vae_ckpt)
    print(f"model directory → {path} ({time.perf_counter() - t0:.0f}s; log {path / 'train_log.jsonl'}, "
          f"plot {path / 'loss.png'})")


def prunable(
    model: ModelOpt = "builtin:digits",
    component: Annotated[Optional[str], typer.Option(help="var | decoder (VAR models, default var) | dit (DiT models)")] = None,
    var_ckpt: VarCkpt = None, vae_ckpt: VaeCkpt = None,
) -> None:
    """List what pruning can remove from a model component: each set of units, its consumers and coupled layers."""
    from evar import zoo
    from evar.dit.checkpoint import DiTModel
    from evar.prune.components import adapter_for, check_component

    if component is not None:
        check_component(component)
    loaded = zoo.load_family(model, ("var", "dit"), var_ckpt=var_ckpt, vae_ckpt=vae_ckpt)
    is_dit = isinstance(loaded, DiTModel)
    component = component or ("dit" if is_dit else "var")
    if is_dit != (component == "dit"):
        raise EvarError(f"'{model}' is {'a DiT: its component is dit' if is_dit else 'a VAR generator: its components are var and decoder'}")
    for p in adapter_for(loaded, component).prunables():
        groups = f" in {p.partitions} equal groups" if p.partitions > 1 else ""
        print(f"{p.name}: {p.count} {p.kind}{groups}; read by {', '.join(p.consumers)}; "
              f"also cut from {', '.join(p.coupled) or '-'}")
