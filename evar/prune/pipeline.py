"""`evar prune`: calibration → block-by-block removal → a rebuilt model and its report.

The jobs live in their own modules: `calibrate` (the calibration set), `blockwise` (the pass over the
blocks), `resume` (OUT.partial/ of an interrupted run), `report` (what it bought and how it was made).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from evar.checkpoints import Model
from evar.prune import report as rep
from evar.prune.blockwise import BlockPruner, Kept, run_step
from evar.prune.calibrate import cached_calibration, calibration  # noqa: F401  (calibration: imported from here)
from evar.prune.recipe import PruneRecipe
from evar.prune.resume import ProgressSaver, PruneCheckpoint, resume
from evar.prune.schedule import step_amount
from evar.prune.sequential import ActivationStream, Calibration  # noqa: F401  (imported from here by other modules)
from evar.prune.var_adapter import rebuild


@dataclass
class PruneResult:
    model: Model
    report: dict[str, Any]


def prune_model(model: Model, recipe: PruneRecipe, parent: str = "", progress: bool = True,
                checkpoint: PruneCheckpoint | None = None, save_every: float = 60.0) -> PruneResult:
    """Prune `model` (its VAR is cut in place; pass a copy to keep the original) and return the rebuilt model.
    With a `checkpoint`, the calibration set and (OBS) the progress every `save_every` seconds are kept
    there, and a run that finds them continues where the last one stopped."""
    t0 = time.perf_counter()
    recipe.validate()
    arch = model.config.var
    recipe.token_range(arch)
    targets = recipe.targets(arch)
    criterion = recipe.criterion()
    work = any(t.heads or t.units for t in targets)  # sparsity 0 (or rounding to 0): nothing to calibrate
    needs_data = work and criterion.needs != "weights"
    calib = cached_calibration(model, recipe, checkpoint, save_every) if needs_data else None
    t_calib = time.perf_counter() - t0
    kept = Kept([list(range(h)) for h in arch.num_heads], list(arch.ffn_dims))
    K, depth = recipe.iterative_steps, arch.depth
    start = resume(model, kept, checkpoint) if work and criterion.needs == "hessian" else None
    first_step, first_block = (start.step, start.block) if start else (1, 0)
    pruner = BlockPruner(criterion, kept)
    saver = ProgressSaver(checkpoint, model, kept, save_every) if checkpoint is not None else None
    with tqdm(total=K * depth, initial=(first_step - 1) * depth + first_block, disable=not (progress and work),
              dynamic_ncols=True) as bar:
        for step in range(first_step, K + 1 if work else 1):
            amounts = [(step_amount(t.heads, step, K), step_amount(t.units, step, K)) for t in targets]
            resuming = start is not None and step == first_step
            if saver is not None:
                saver.step = step
            run_step(model, recipe, criterion, amounts, calib, pruner, bar, f"step {step}/{K}: " if K > 1 else "",
                     first_block if resuming else 0, start.stream if resuming else None, saver)
    t_prune = time.perf_counter() - t0 - t_calib
    report = rep.build_report(model, recipe, parent, targets, kept, calib, (t_calib, t_prune))
    if start is not None:
        report["resumed_at"] = {"step": start.step, "block": start.block}
    pruned = rebuild(model, rep.provenance(model, recipe, parent, report))
    return PruneResult(pruned, report)


def save_pruned(result: PruneResult, out) -> None:
    """The model directory and prune_report.json appear together or not at all."""
    from pathlib import Path

    from evar.checkpoints import save_model_dir
    from evar.files import atomic_dir, atomic_write_json

    with atomic_dir(out) as tmp:
        save_model_dir(result.model, tmp)
        atomic_write_json(Path(tmp) / "prune_report.json", result.report)
