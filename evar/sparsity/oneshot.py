"""One-shot sparsification of a VAR, block by block (the path `evar prune`'s OBS calibrates on).

The calibration set's hidden states advance one block at a time (`evar.prune.sequential.ActivationStream`):
each stage of a block (`targets.block_stages`) is calibrated on the outputs of the already sparsified
blocks and stages before it, its layers' input Hessians (`evar.prune.obs.HessianAccumulator`) gathered by
forward hooks while the block runs up to that stage, then masked.
Magnitude needs no data and skips all of it.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from evar.checkpoints import Model
from evar.prune.calibrate import calibration
from evar.prune.sequential import ActivationStream, StopBlock
from evar.prune.obs import HessianAccumulator
from evar.sparsity import methods
from evar.sparsity.patterns import Pattern
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.storage import Sparsity
from evar.sparsity.targets import block_stages, embed_layers, head_stages, linear, target_layers


def check_layers(model: Model, recipe: SparsifyRecipe) -> list[str]:
    """The layers to sparsify; every one's input width must hold whole N:M groups."""
    pattern, var = recipe.parsed(), model.var
    names = target_layers(var, recipe.head, recipe.embed)
    for name in names:
        pattern.check_layer(name, linear(var, name).in_features)
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


def sparsify(model: Model, recipe: SparsifyRecipe, method: str | None = None, progress: bool = True) -> Sparsity:
    """Sparsify `model.var` in place with `method` (default the recipe's one-shot method)."""
    t0 = time.perf_counter()
    method = method or recipe.one_shot()
    pattern, var = recipe.parsed(), model.var
    names = check_layers(model, recipe)
    masks: dict[str, torch.Tensor] = {}
    if methods.NEEDS[method] == "weights":
        for name in names:
            masks[name] = sparsify_layer(linear(var, name), None, pattern, method, recipe)
        return _result(pattern, method, masks, recipe, time.perf_counter() - t0, 0.0)
    calib = calibration(model, recipe.calibration_recipe())
    t_calib = time.perf_counter() - t0

    def stage(layers: list[str], run: Callable[[], None], stop: bool = False) -> None:
        for name, hessian in stage_hessians(var, layers, run, stop).items():
            masks[name] = sparsify_layer(linear(var, name), hessian, pattern, method, recipe)

    if recipe.embed:
        stage(embed_layers(var), lambda: ActivationStream(var, calib, recipe.calib_batch))
    stream = ActivationStream(var, calib, recipe.calib_batch)
    blocks = list(var.blocks)
    for i, block in enumerate(tqdm(blocks, desc=f"{method} {pattern.name}", disable=not progress, dynamic_ncols=True)):
        for layers in block_stages(var, i):
            stage(layers, lambda: stream.run(block, write=False), stop=True)
        if i < len(blocks) - 1 or recipe.head:
            stream.run(block, write=True)  # the sparsified block's outputs feed the next
    if recipe.head:
        cond = torch.cat([var.class_emb(calib.labels[sl]) for sl in stream.batches()])
        for layers in head_stages():
            stage(layers, lambda: _run_head(var, stream, cond))
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


@torch.no_grad()
def _run_head(var, stream: ActivationStream, cond: torch.Tensor) -> None:
    for sl in stream.batches():
        var.logits(stream.x[sl], cond[sl])


def _result(pattern: Pattern, method: str, masks: dict[str, torch.Tensor], recipe: SparsifyRecipe,
            t_calib: float, t_mask: float) -> Sparsity:
    return Sparsity(pattern, method, masks, {"recipe": recipe.to_dict(),
                                             "seconds": {"calibration": round(t_calib, 2), "masking": round(t_mask, 2)}})
