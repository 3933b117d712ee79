"""One-shot sparsification of a model's blocks, block by block (the path `evar prune`'s OBS calibrates on).

The family adapter (`evar.sparsity.family`: VAR, ViT) advances the calibration set's hidden states one block
at a time: each stage of a block is calibrated on the outputs of the already sparsified blocks and stages
before it, its layers' input Hessians (`evar.prune.obs.HessianAccumulator`) gathered by forward hooks while
the block runs up to that stage, then masked.
Magnitude needs no data and skips all of it.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from evar.prune.obs import HessianAccumulator
from evar.prune.sequential import StopBlock
from evar.sparsity import methods
from evar.sparsity.family import family_for
from evar.sparsity.patterns import Pattern
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.storage import Sparsity
from evar.sparsity.targets import linear


def check_layers(model: Any, recipe: SparsifyRecipe) -> list[str]:
    """The layers to sparsify; every one's input width must hold whole N:M groups."""
    family = family_for(model)
    pattern, names = recipe.parsed(), family.layers(recipe)
    for name in names:
        pattern.check_layer(name, linear(family.root, name).in_features)
    return names


@torch.no_grad()
def sparsify_layer(layer: nn.Linear, hessian: torch.Tensor | None, pattern: Pattern, method: str,
                   recipe: SparsifyRecipe) -> torch.Tensor:
    """Mask (and for SparseGPT, update) one layer in place; returns its mask."""
    w = layer.weight
    if method == "magnitude":
        result = methods.magnitude(w, pattern)
    elif method == "wanda":
        result = methods.wanda(w, hessian, pattern)
    else:
        result = methods.sparsegpt(w, hessian, pattern, recipe.blocksize, recipe.percdamp, recipe.update)
    w.copy_(result.weight)
    return result.mask


def sparsify(model: Any, recipe: SparsifyRecipe, method: str | None = None, progress: bool = True) -> Sparsity:
    """Sparsify a VAR's or a ViT's blocks in place with `method` (default the recipe's one-shot method)."""
    t0 = time.perf_counter()
    method = method or recipe.one_shot()
    family = family_for(model)
    pattern, root = recipe.parsed(), family.root
    names = check_layers(model, recipe)
    masks: dict[str, torch.Tensor] = {}
    if methods.NEEDS[method] == "weights":
        for name in names:
            masks[name] = sparsify_layer(linear(root, name), None, pattern, method, recipe)
        return _result(pattern, method, masks, recipe, time.perf_counter() - t0, 0.0)
    calib = family.calibrate(recipe)
    t_calib = time.perf_counter() - t0
    for layers, run, stop in family.stages(calib, recipe, progress):
        for name, hessian in stage_hessians(root, layers, run, stop).items():
            masks[name] = sparsify_layer(linear(root, name), hessian, pattern, method, recipe)
    return _result(pattern, method, masks, recipe, t_calib, time.perf_counter() - t0 - t_calib)


def input_module(var: nn.Module, name: str) -> nn.Module:
    """The module whose first input is the layer's input: the layer itself, except the fused qkv, which the
    attention applies with `F.linear` (its input is the attention's)."""
    if name.endswith("attn.mat_qkv"):
        return var.get_submodule(name.rsplit(".", 1)[0])
    return linear(var, name)


def stage_hessians(var: nn.Module, layers: list[str], run: Callable[[], None],
                   stop: bool = False) -> dict[str, torch.Tensor]:
    """Input Hessians of `layers` over one `run` of the calibration set, by forward pre-hooks. With `stop`, a
    block stops once they are seen (`ActivationStream.run` goes on with the next mini-batch)."""
    acc = {name: HessianAccumulator(linear(var, name).in_features) for name in layers}
    seen: set[str] = set()

    def hook(name: str):
        def pre_hook(module, args):
            acc[name].add(args[0].detach())
            seen.add(name)
            if stop and len(seen) == len(acc):
                seen.clear()
                raise StopBlock
        return pre_hook

    handles = [input_module(var, name).register_forward_pre_hook(hook(name)) for name in layers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {name: a.matrix() for name, a in acc.items()}


def _result(pattern: Pattern, method: str, masks: dict[str, torch.Tensor], recipe: SparsifyRecipe,
            t_calib: float, t_mask: float) -> Sparsity:
    return Sparsity(pattern, method, masks, {"recipe": recipe.to_dict(),
                                             "seconds": {"calibration": round(t_calib, 2), "masking": round(t_mask, 2)}})
