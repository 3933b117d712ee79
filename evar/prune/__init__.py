"""Structured pruning: whole attention heads and FFN units of VAR, and conv channels of the VQVAE decoder,
by magnitude, Taylor or OBS.

    result = prune_model(model, PruneRecipe(sparsity=0.4, method="obs"), parent="builtin:digits")
    save_pruned(result, "runs/pruned")       # a model directory + prune_report.json

Modules: `recipe` (every knob), `schedule` (how much per block), `criteria` (what to remove; one table of
names), `obs` (Hessians, greedy OBS with compensation), `adapter` (the contract a model family fills in),
`var_adapter` / `decoder_adapter` (VAR; the VQVAE decoder), `surgery` (choose, compensate, cut),
`statistics` (gradients, input Hessians), `calibrate` + `sequential` + `blockwise` (VAR's calibration set
and block-by-block pass), `resume`, `report`, `pipeline` (`evar prune`), `decoder` (`evar prune-decoder`).
"""
from evar.prune.pipeline import PruneResult, prune_model, save_pruned
from evar.prune.recipe import PruneRecipe, Recipe
from evar.prune.sequential import ActivationStream, Calibration

__all__ = ["ActivationStream", "Calibration", "PruneRecipe", "PruneResult", "Recipe", "prune_model", "save_pruned"]
