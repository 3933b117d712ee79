"""ViT's sparsity adapter (`evar.sparsity.family`): every Linear of the blocks (attn.qkv, attn.proj, mlp.fc1,
mlp.fc2; `--include-head` adds the classifier head), calibrated on training images whose hidden states advance
block by block; learnable masks trained with the KL between the dense teacher's and the student's class logits.

Calibration images: `--calib-data digits|FOLDER`; the default ('teacher') means the data the ViT was trained
on, as its provenance records it (`evar train-vit`); a converted checkpoint records none and must be told.
A random subset of the train split (seeded by `--seed`) serves as calibration set (`--calib-samples`
images) and, with seed + 1, as the masks' training set (`--data-samples` images).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evar.data import load_images
from evar.errors import EvarError
from evar.prune.sequential import StopBlock
from evar.sparsity.family import Stage
from evar.sparsity.recipe import SparsifyRecipe
from evar.vit.checkpoint import ViTModel, save_vit_dir

BLOCK_STAGES = (("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",))  # data-path order within a block


class ViTSparse:
    what = "ViT"

    def __init__(self, model: ViTModel):
        self.model, self.root = model, model.vit

    def layers(self, recipe: SparsifyRecipe) -> list[str]:
        if recipe.embed:
            raise EvarError("--include-embed: a ViT's patch embedding is a convolution, not a Linear; only the blocks "
                            "(and with --include-head the head) are sparsified")
        names = [n for stage in self._block_stages() for n in stage]
        return names + (["head"] if recipe.head else [])

    def _block_stages(self) -> list[list[str]]:
        return [[f"blocks.{i}.{n}" for n in stage] for i in range(self.model.config.depth) for stage in BLOCK_STAGES]

    def images(self, recipe: SparsifyRecipe, count: int, seed: int) -> torch.Tensor:
        source = recipe.calib_data
        if source == "teacher":
            source = self.model.provenance.get("recipe", {}).get("data")
            if not source:
                raise EvarError("this ViT records no training data: pass --calib-data digits or an image folder")
        images, _ = load_images(source, "train", self.model.config.img_size)
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
        return images[pick]

    def calibrate(self, recipe: SparsifyRecipe) -> torch.Tensor:
        return self.images(recipe, recipe.calib_samples, recipe.seed)

    def stages(self, calib: torch.Tensor, recipe: SparsifyRecipe, progress: bool) -> Iterator[Stage]:
        vit, batch = self.root, recipe.calib_batch
        with torch.no_grad():
            x = torch.cat([vit.embed(calib[i:i + batch]) for i in range(0, len(calib), batch)])
        slices = [slice(i, i + batch) for i in range(0, len(x), batch)]

        @torch.no_grad()
        def run(block, write: bool) -> None:
            for sl in slices:
                try:
                    out = block(x[sl])
                except StopBlock:
                    continue
                if write:
                    x[sl] = out

        stages = self._block_stages()
        for i, block in enumerate(tqdm(vit.blocks, desc=f"{recipe.one_shot()} {recipe.pattern}", disable=not progress,
                                       dynamic_ncols=True)):
            for layers in stages[i * len(BLOCK_STAGES):(i + 1) * len(BLOCK_STAGES)]:
                yield layers, lambda: run(block, write=False), True
            run(block, write=True)  # the sparsified block's outputs feed the next
        if recipe.head:
            yield ["head"], lambda: [vit.classify(x[sl]) for sl in slices], False

    def distance(self, teacher: ViTSparse, recipe: SparsifyRecipe, work: Path) -> Callable[[torch.Generator], torch.Tensor]:
        """KL(teacher ‖ student) of the class distributions on a drawn batch of training images."""
        from evar.train import draw_batch

        images = self.images(recipe, recipe.data_samples, recipe.seed + 1)
        with torch.no_grad():
            t_logp = torch.cat([teacher.root(images[i:i + 256]) for i in range(0, len(images), 256)]).log_softmax(-1)

        def kl(gen: torch.Generator) -> torch.Tensor:
            pick = draw_batch(len(images), recipe.batch_size, gen)
            s_logp = self.root(images[pick]).log_softmax(-1)
            return F.kl_div(s_logp, t_logp[pick], log_target=True, reduction="batchmean")

        return kl

    def check_teacher(self, teacher: Any, ref: str) -> None:
        if not isinstance(teacher, ViTSparse):
            raise EvarError(f"--teacher '{ref}' is not a ViT; a ViT's masks learn from a dense ViT")
        if teacher.model.config != self.model.config:
            raise EvarError(f"--teacher '{ref}' is a ViT of another shape than the model; masks learn from the same "
                            "architecture (the model itself)")

    def save(self, out: Path, provenance: dict[str, Any]) -> None:
        m = self.model
        save_vit_dir(ViTModel(m.config, m.vit, {**provenance, "parent_provenance": m.provenance}, m.sparsity), out)
