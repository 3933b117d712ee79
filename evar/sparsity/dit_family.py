"""DiT's sparsity adapter (`evar.sparsity.family`): every Linear of the blocks (adaLN_modulation.1, attn.qkv,
attn.proj, mlp.fc1, mlp.fc2; `--include-head` adds the final layer's modulation and output projection),
calibrated as `evar prune-dit` calibrates (training images noised at timesteps over the whole schedule, labels
dropped as for guidance), the hidden states advancing block by block through the already sparsified layers.
Learnable masks train on the same kind of data (seed + 1) with the squared error between the student's and the
dense teacher's predictions as their distance: a denoiser's output is a regression, not a distribution.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evar.dit.checkpoint import DiTModel, save_dit_dir
from evar.errors import EvarError
from evar.prune.sequential import StopBlock
from evar.sparsity.family import Stage
from evar.sparsity.recipe import SparsifyRecipe

BLOCK_STAGES = (("adaLN_modulation.1",), ("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",))
HEAD_STAGES = (["final_layer.adaLN_modulation.1"], ["final_layer.linear"])


class DiTSparse:
    what = "DiT"

    def __init__(self, model: DiTModel):
        self.model, self.root = model, model.dit

    def layers(self, recipe: SparsifyRecipe) -> list[str]:
        if recipe.embed:
            raise EvarError("--include-embed: a DiT's embeddings (patch convolution, timestep MLP, label table) stay "
                            "dense; only the blocks (and with --include-head the final layer) are sparsified")
        names = [n for stage in self._block_stages() for n in stage]
        return names + ([n for stage in HEAD_STAGES for n in stage] if recipe.head else [])

    def _block_stages(self) -> list[list[str]]:
        return [[f"blocks.{i}.{n}" for n in stage] for i in range(self.model.config.depth) for stage in BLOCK_STAGES]

    def data(self, recipe: SparsifyRecipe, count: int, seed: int):
        from evar.dit.prune import DiTPruneRecipe, calibration

        source = "digits" if recipe.calib_data == "teacher" else recipe.calib_data  # prune-dit's default data
        return calibration(self.model, DiTPruneRecipe(sparsity=0.0, calib_data=source, calib_samples=count, seed=seed))

    def calibrate(self, recipe: SparsifyRecipe):
        return self.data(recipe, recipe.calib_samples, recipe.seed)

    def stages(self, calib, recipe: SparsifyRecipe, progress: bool) -> Iterator[Stage]:
        dit, slices = self.root, calib.batches(recipe.calib_batch)
        with torch.no_grad():
            h = torch.cat([dit.x_embedder(calib.x_t[sl]) + dit.pos_embed for sl in slices])
            c = torch.cat([dit.t_embedder(calib.t[sl]) + dit.y_embedder(calib.labels[sl]) for sl in slices])

        @torch.no_grad()
        def run(block, write: bool) -> None:
            for sl in slices:
                try:
                    out = block(h[sl], c[sl])
                except StopBlock:
                    continue
                if write:
                    h[sl] = out

        stages = self._block_stages()
        n = len(BLOCK_STAGES)
        for i, block in enumerate(tqdm(dit.blocks, desc=f"{recipe.one_shot()} {recipe.pattern}", disable=not progress,
                                       dynamic_ncols=True)):
            for layers in stages[i * n:(i + 1) * n]:
                yield layers, lambda: run(block, write=False), True
            run(block, write=True)  # the sparsified block's outputs feed the next
        if recipe.head:
            for layers in HEAD_STAGES:
                yield layers, lambda: run(dit.final_layer, write=False), False

    def distance(self, teacher: DiTSparse, recipe: SparsifyRecipe, work: Path) -> Callable[[torch.Generator], torch.Tensor]:
        """Mean squared difference of the predictions on a drawn batch of noised training images."""
        from evar.train import draw_batch

        data = self.data(recipe, recipe.data_samples, recipe.seed + 1)
        with torch.no_grad():
            t_out = torch.cat([teacher.root(data.x_t[sl], data.t[sl], data.labels[sl]) for sl in data.batches(256)])

        def mse(gen: torch.Generator) -> torch.Tensor:
            pick = draw_batch(len(data.t), recipe.batch_size, gen)
            return F.mse_loss(self.root(data.x_t[pick], data.t[pick], data.labels[pick]), t_out[pick])

        return mse

    def check_teacher(self, teacher: Any, ref: str) -> None:
        if not isinstance(teacher, DiTSparse):
            raise EvarError(f"--teacher '{ref}' is not a DiT; a DiT's masks learn from a dense DiT")
        if teacher.model.config != self.model.config:
            raise EvarError(f"--teacher '{ref}' is a DiT of another shape than the model; masks learn from the same "
                            "architecture (the model itself)")

    def save(self, out: Path, provenance: dict[str, Any]) -> None:
        m = self.model
        save_dit_dir(DiTModel(m.config, m.dit, {**provenance, "parent_provenance": m.provenance,
                                                "latent": m.provenance.get("latent", False)}, m.sparsity), out)
