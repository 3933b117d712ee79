"""What `evar sparsify` asks of a model family, so one pipeline serves VAR and ViT (and the next family).

A family adapter wraps a loaded model and says
  - `root`: the module whose Linears are masked (layer names are relative to it), `params`: its size;
  - `layers(recipe)`: the Linears to sparsify, in data-path order (refusing flags that do not apply);
  - `calibrate(recipe)` → a calibration set, and `stages(calib, recipe, progress)`: the blocks run one by one
    on it. It yields, stage by stage, the layers whose inputs are ready and a `run` of the calibration set up
    to them (`stop`: the run may end there); between yields the adapter advances its hidden states through
    the layers masked so far, so every layer is calibrated on the already sparsified ones before it;
  - `distance(teacher, recipe, work)` → `fn(gen)`: learnable masks' KL to the dense teacher on a drawn batch;
  - `check_teacher(teacher)`, `save(out, provenance)`: the family's own rules and model directory.
Adapters: `var_family.VARSparse` (VAR blocks), `vit_family.ViTSparse` (ViT blocks), `dit_family.DiTSparse`
(DiT blocks).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from evar.sparsity.recipe import SparsifyRecipe

Stage = tuple[list[str], Callable[[], None], bool]


class SparseFamily(Protocol):
    model: Any
    root: nn.Module
    what: str  # for messages: "VAR", "ViT"

    def layers(self, recipe: SparsifyRecipe) -> list[str]: ...

    def calibrate(self, recipe: SparsifyRecipe) -> Any: ...

    def stages(self, calib: Any, recipe: SparsifyRecipe, progress: bool) -> Iterator[Stage]: ...

    def distance(self, teacher: SparseFamily, recipe: SparsifyRecipe, work: Path) -> Callable[[torch.Generator], torch.Tensor]: ...

    def check_teacher(self, teacher: SparseFamily, ref: str) -> None: ...

    def save(self, out: Path, provenance: dict[str, Any]) -> None: ...


def family_for(model: Any) -> SparseFamily:
    """The adapter of a loaded model (a VAR generator, a ViT classifier or a DiT)."""
    from evar.dit.checkpoint import DiTModel
    from evar.vit.checkpoint import ViTModel

    if isinstance(model, ViTModel):
        from evar.sparsity.vit_family import ViTSparse

        return ViTSparse(model)
    if isinstance(model, DiTModel):
        from evar.sparsity.dit_family import DiTSparse

        return DiTSparse(model)
    from evar.sparsity.var_family import VARSparse

    return VARSparse(model)


def params(family: SparseFamily) -> int:
    return sum(p.numel() for p in family.root.parameters())
