"""Structured pruning of VAR: whole attention heads and FFN units, by magnitude, Taylor or OBS.

    result = prune_model(model, PruneConfig(sparsity=0.4, method="obs"), parent="builtin:digits")
    save_pruned(result, "runs/pruned")       # a model directory + prune_report.json

Modules: `schedule` (how much per block), `criteria` (what to remove), `obs` (Hessians, greedy OBS with
compensation), `surgery` (the cutting), `sequential` (block-by-block calibration), `report`.
"""
from evar.prune.pipeline import PruneConfig, PruneResult, prune_model, save_pruned

__all__ = ["PruneConfig", "PruneResult", "prune_model", "save_pruned"]
