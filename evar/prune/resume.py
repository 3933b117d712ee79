"""Resuming an interrupted `evar prune`: its progress lives in OUT.partial/ until the model is written.

What is kept, each written atomically as soon as it exists:
  samples.pt      while the model samples its calibration sequences: those made so far (about once a minute);
  calibration.pt  the calibration set (labels + tokens): sampling it is a third of a d16 run;
  progress.pt     about once a minute while pruning with Hessians (OBS): the blocks cut so far, the
                  surviving heads/units, the calibration stream at the next block's input, and where to go on.
A rerun of the same command continues from there and ends with the same weights as an uninterrupted run.
Criteria without Hessians (magnitude, Taylor) re-score from the cached calibration set: they are quick.
Another recipe or parent model in the same OUT.partial is refused rather than mixed.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evar.calibration import TokenSet
from evar.checkpoints import Model, build_model, load_saved_state, load_strict
from evar.config import ModelConfig
from evar.errors import EvarError
from evar.files import atomic_write_bytes
from evar.prune.recipe import PruneRecipe

if TYPE_CHECKING:
    from evar.prune.blockwise import Kept
    from evar.prune.sequential import ActivationStream

CALIBRATION_FILE, SAMPLES_FILE, PROGRESS_FILE = "calibration.pt", "samples.pt", "progress.pt"


@dataclass
class Progress:
    step: int  # 1-based iterative step being run
    block: int  # the next block to prune in that step
    heads: list[list[int]]  # original indices of the surviving heads, per block
    units: list[int]  # surviving FFN units, per block
    stream: torch.Tensor | None  # (N, L, C): the calibration hidden states at `block`'s input


class Every:
    """`due()` about once per `seconds` (every time at 0): how often progress is worth a write."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.perf_counter()

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


class PruneCheckpoint:
    def __init__(self, directory: str | Path, identity: dict[str, Any]):
        self.dir, self.identity = Path(directory), json.dumps(identity, sort_keys=True)

    @staticmethod
    def beside(out: str | Path) -> Path:
        out = Path(out)
        return out.parent / f"{out.name}.partial"

    # ---- the calibration set
    def load_calibration(self) -> TokenSet | None:
        saved = self._read(CALIBRATION_FILE)
        return None if saved is None else TokenSet(saved["labels"], saved["tokens"], saved["source"])

    def save_calibration(self, tokens: TokenSet) -> None:
        self._write(CALIBRATION_FILE, dataclasses.asdict(tokens))
        (self.dir / SAMPLES_FILE).unlink(missing_ok=True)

    # ---- the model's own sequences while they are being sampled
    def load_samples(self) -> torch.Tensor | None:
        saved = self._read(SAMPLES_FILE)
        return None if saved is None else saved["tokens"]

    def save_samples(self, tokens: torch.Tensor) -> None:
        self._write(SAMPLES_FILE, {"tokens": tokens})

    # ---- progress through the blocks
    def load_progress(self) -> tuple[Progress, dict[str, torch.Tensor]] | None:
        saved = self._read(PROGRESS_FILE)
        if saved is None:
            return None
        progress = Progress(int(saved["step"]), int(saved["block"]), [list(h) for h in saved["heads"]],
                            [int(u) for u in saved["units"]], saved["stream"])
        return progress, saved["var"]

    def save_progress(self, progress: Progress, model: Model) -> None:
        """Only the blocks cut so far are written (in step 1, those before `block`): the rest still equal
        the parent model, which a rerun loads anyway. At d16 this keeps a save to a few hundred MB."""
        cut = range(progress.block) if progress.step == 1 else range(len(model.var.blocks))
        prefixes = tuple(f"blocks.{i}." for i in cut)
        state = {k: v for k, v in model.var.state_dict().items() if k.startswith(prefixes)}
        self._write(PROGRESS_FILE, {"step": progress.step, "block": progress.block, "heads": progress.heads,
                                    "units": progress.units, "stream": progress.stream, "var": state})

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- files
    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.dir / name
        if not path.exists():
            return None
        saved = load_saved_state(path, f"delete {self.dir} to start over")
        if saved.get("identity") != self.identity:
            raise EvarError(f"{self.dir} holds the progress of a different prune (another model or recipe); "
                            "delete it, or rerun the command that made it")
        return saved

    def _write(self, name: str, payload: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({**payload, "identity": self.identity}, buf)
        atomic_write_bytes(self.dir / name, buf.getvalue())


def restore_var(model: Model, progress: Progress, saved: dict[str, torch.Tensor]) -> None:
    """Replace `model.var` (the parent's) by one of the saved, partly cut shapes: the saved blocks over the
    parent's weights for everything else."""
    state = {**model.var.state_dict(), **saved}
    heads = tuple(len(h) for h in progress.heads)
    config = ModelConfig(model.config.var.with_blocks(heads, tuple(progress.units)), model.config.vqvae)
    with torch.device("meta"):
        fresh = build_model(config)
    fresh.var.to_empty(device="cpu")
    load_strict(fresh.var, state, "saved pruning progress")
    model.var = fresh.var.eval()


def checkpoint_for(out, model: Model, recipe: PruneRecipe, parent: str) -> PruneCheckpoint:
    """OUT.partial/ for this model and recipe (another model or recipe there is refused, not mixed)."""
    arch = model.config.var
    identity = {"parent": parent, "recipe": dataclasses.asdict(recipe), "num_heads": list(arch.num_heads),
                "ffn_dims": list(arch.ffn_dims), "params": sum(p.numel() for p in model.var.parameters())}
    return PruneCheckpoint(PruneCheckpoint.beside(out), identity)


def resume(model: Model, kept: Kept, checkpoint: PruneCheckpoint | None) -> Progress | None:
    """Load saved progress into `model` and `kept`; a finished step resumes at the next step's first block."""
    saved = checkpoint.load_progress() if checkpoint is not None else None
    if saved is None:
        return None
    start, state = saved
    restore_var(model, start, state)
    kept.heads, kept.units = [list(h) for h in start.heads], list(start.units)
    if start.block == model.config.var.depth:
        start = Progress(start.step + 1, 0, start.heads, start.units, None)  # a new step, a new stream
    return start


class ProgressSaver:
    """Saves progress after a block when `every` seconds have passed since the last save (0: every block)."""

    def __init__(self, checkpoint: PruneCheckpoint, model: Model, kept: Kept, every: float):
        self.checkpoint, self.model, self.kept, self.every = checkpoint, model, kept, Every(every)
        self.step = 1

    def __call__(self, next_block: int, stream: ActivationStream) -> None:
        if self.every.due():
            self.checkpoint.save_progress(Progress(self.step, next_block, self.kept.heads, self.kept.units,
                                                   stream.x), self.model)
