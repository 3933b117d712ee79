"""VAR's sparsity adapter (`evar.sparsity.family`): the blocks' Linears (`targets`), calibrated on `evar.prune`'s
calibration set as it advances block by block (`ActivationStream`), learnable masks trained on the teacher's
own generations with CFG's label drop (the distillation trainer's data path)."""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from evar.calibration import TokenSet, token_set
from evar.checkpoints import Model, load_saved_state, save_model_dir
from evar.errors import EvarError
from evar.files import atomic_write_bytes
from evar.prune.calibrate import calibration
from evar.prune.sequential import ActivationStream
from evar.samples import SamplingSettings
from evar.sparsity.family import Stage
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.targets import block_stages, embed_layers, head_stages, target_layers

DATA_FILE = "mask_data.pt"


class VARSparse:
    what = "VAR"

    def __init__(self, model: Model):
        self.model, self.root = model, model.var

    def layers(self, recipe: SparsifyRecipe) -> list[str]:
        return target_layers(self.root, recipe.head, recipe.embed)

    def calibrate(self, recipe: SparsifyRecipe):
        return calibration(self.model, recipe.calibration_recipe())

    def stages(self, calib, recipe: SparsifyRecipe, progress: bool) -> Iterator[Stage]:
        var = self.root
        if recipe.embed:
            yield embed_layers(var), lambda: ActivationStream(var, calib, recipe.calib_batch), False
        stream = ActivationStream(var, calib, recipe.calib_batch)  # after the embeddings were masked
        blocks = list(var.blocks)
        for i, block in enumerate(tqdm(blocks, desc=f"{recipe.one_shot()} {recipe.pattern}", disable=not progress,
                                       dynamic_ncols=True)):
            for layers in block_stages(var, i):
                yield layers, lambda: stream.run(block, write=False), True
            if i < len(blocks) - 1 or recipe.head:
                stream.run(block, write=True)  # the sparsified block's outputs feed the next
        if recipe.head:
            cond = torch.cat([var.class_emb(calib.labels[sl]) for sl in stream.batches()])
            for layers in head_stages():
                yield layers, lambda: _run_head(var, stream, cond), False

    def distance(self, teacher: VARSparse, recipe: SparsifyRecipe, work: Path) -> Callable[[torch.Generator], torch.Tensor]:
        """Per-token KL(teacher ‖ student), teacher-forced on the teacher's generations, labels dropped as in CFG."""
        from evar.distill.losses import token_kl
        from evar.distill.trainer import teacher_forcing_inputs
        from evar.train import draw_batch, drop_labels

        data = _data(teacher.model, recipe, work)
        x = teacher_forcing_inputs(teacher.model, data.tokens)
        cfg, student_var, teacher_var = self.root.cfg, self.root, teacher.root

        def kl(gen: torch.Generator) -> torch.Tensor:
            pick = draw_batch(len(data), recipe.batch_size, gen)
            labels = drop_labels(data.labels[pick], cfg.cond_drop_rate, cfg.num_classes, gen)
            with torch.no_grad():
                t_logits = teacher_var(labels, x[pick])
            return token_kl(student_var(labels, x[pick]), t_logits, 1.0).mean()

        return kl

    def check_teacher(self, teacher: VARSparse, ref: str) -> None:
        from evar.distill.trainer import check_family

        if not isinstance(teacher, VARSparse):
            raise EvarError(f"--teacher '{ref}' is not a VAR generator; a VAR's masks learn from a dense VAR")
        check_family(teacher.model.config, self.model.config)

    def save(self, out: Path, provenance: dict[str, Any]) -> None:
        save_model_dir(self.model, out, {**provenance, "parent_provenance": self.model.config.provenance})


@torch.no_grad()
def _run_head(var, stream: ActivationStream, cond: torch.Tensor) -> None:
    for sl in stream.batches():
        var.logits(stream.x[sl], cond[sl])


def _data(teacher: Model, recipe: SparsifyRecipe, work: Path) -> TokenSet:
    """The teacher's own generations (as `evar distill` makes its data), made once and kept in `work`."""
    path = work / DATA_FILE
    if path.exists():
        saved = load_saved_state(path, f"delete {path} and rerun to make the data again")
        return TokenSet(saved["labels"], saved["tokens"], saved["source"])
    data = token_set(teacher, recipe.calib_data, recipe.data_samples, SamplingSettings(seed=recipe.seed + 1),
                     seed=recipe.seed + 1)
    buf = io.BytesIO()
    torch.save({"labels": data.labels, "tokens": data.tokens, "source": data.source}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return data
