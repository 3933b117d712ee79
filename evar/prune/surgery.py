"""Applying a criterion to a `Prunable` (see `evar.prune.adapter`): score, keep the compensated consumer
weights, cut. Nothing here knows a model family; each family's adapter says where its units live and how
to cut them."""
from __future__ import annotations

from typing import Any

from evar.errors import EvarError
from evar.prune.adapter import Prunable, columns_per_channel, matrix, write_matrix
from evar.prune.criteria import Consumer, Criterion, Group, Removal


def torch_pruning():
    """torch-pruning does the slicing; only pruning needs it (pruned models load without it)."""
    try:
        import torch_pruning
    except ImportError:
        raise EvarError("pruning needs torch-pruning: pip install 'evar[prune]'") from None
    return torch_pruning


def choose(unit_set: Prunable, criterion: Criterion, n_remove: int,
           stats: list[dict[str, Any]] | None = None) -> Removal:
    """The criterion's removal for `n_remove` units; `stats[k]` holds what it needs for consumer k."""
    stats = stats or [{} for _ in unit_set.consumers]
    consumers = [Consumer(name, matrix(layer), unit_set.channels * columns_per_channel(layer), **s)
                 for (name, layer), s in zip(unit_set.consumers.items(), stats)]
    return criterion(Group(consumers, n_remove, unit_set.partitions))


def write_back(unit_set: Prunable, removal: Removal) -> None:
    """The consumer weights the criterion keeps (OBS: compensated), written before the columns are cut."""
    for layer, weight in zip(unit_set.consumers.values(), removal.weights):
        write_matrix(layer, weight)


def prune(unit_set: Prunable, criterion: Criterion, n_remove: int,
          stats: list[dict[str, Any]] | None = None) -> Removal:
    """Choose, write back, cut: `unit_set` loses `n_remove` units in place."""
    removal = choose(unit_set, criterion, n_remove, stats)
    write_back(unit_set, removal)
    unit_set.cut(removal.units)
    return removal
