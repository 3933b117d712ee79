"""Pruning criteria: small callables that decide *what* to remove from a set of prunable units.

A `Group` is `n_remove` units to take out of a model, seen through the layers that read them (its
`consumers`): each consumer is a 2-D weight (out, in) whose input columns go `size` per unit (a head =
head_dim columns of `proj`, an FFN unit = 1 column of `fc2`, a conv channel = kh·kw columns of the next
conv), with whatever statistics the criterion asked for (`needs`). A criterion returns the units to remove
and, per consumer, the weight to keep (OBS updates it). It never learns which model family the units
belong to: adapters (`evar.prune.adapter`) describe the units, and the pipeline collects the statistics.

Scores are always per INPUT column of a consumer, summed per unit and over consumers. LLM-Pruner's
Taylor code (arXiv:2305.11627) summed over the wrong axis (per output row) and used those as column
indices; `column_scores` is the one place the axis is chosen.

Criteria are registered by name in one table, `CRITERIA`; `register_criterion` adds another (a plug-in
method takes the same `CriterionOptions` and returns a `Criterion`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from evar.errors import EvarError
from evar.prune.obs import ObsPart, obs_remove

TAYLOR_TYPES = ("param_first", "param_second", "param_mix")


@dataclass
class Consumer:
    """One layer that reads the units, as a 2-D weight, and the statistics gathered for it."""

    name: str  # e.g. "blocks.3.attn.proj", for messages and the report
    weight: torch.Tensor  # (out, in): a Linear's weight, or a conv's (out, in·kh·kw)
    size: int  # input columns per unit
    hessian: torch.Tensor | None = None  # (in, in) = (2/n) Σ xᵀx of the layer's (unfolded) inputs, for OBS
    grad: torch.Tensor | None = None  # (out, in) mean gradient of the calibration loss, for Taylor
    grad_sq: torch.Tensor | None = None  # (out, in) mean squared gradient (diagonal Fisher), for Taylor

    @property
    def n_units(self) -> int:
        return self.weight.shape[1] // self.size


@dataclass
class Group:
    """Remove `n_remove` of the units the consumers read; with `partitions` > 1 the units form that many
    equal consecutive runs (GroupNorm groups) and each run loses n_remove / partitions of them."""

    consumers: list[Consumer]
    n_remove: int
    partitions: int = 1

    @property
    def name(self) -> str:
        return self.consumers[0].name

    @property
    def n_units(self) -> int:
        return self.consumers[0].n_units

    @classmethod
    def single(cls, name: str, weight: torch.Tensor, size: int, n_remove: int, **stats) -> Group:
        """One consumer (VAR's `proj` or `fc2`)."""
        return cls([Consumer(name, weight, size, **stats)], n_remove)


@dataclass
class Removal:
    units: list[int]  # removed unit indices (positions among the current units), sorted
    weights: list[torch.Tensor]  # per consumer: the (out, in) weight to keep for the surviving columns


class Criterion(Protocol):
    name: str
    needs: str  # "weights" | "gradients" | "hessian": what the pipeline must collect before calling

    def __call__(self, group: Group) -> Removal: ...


@dataclass(frozen=True)
class CriterionOptions:
    """The knobs any registered criterion may read (each reads only its own)."""

    taylor_type: str = "param_first"
    percdamp: float = 0.01
    compensate: bool = True


def column_scores(per_weight: torch.Tensor) -> torch.Tensor:
    """(out, in) per-weight scores → (in,) per input column: sum over output rows (dim 0)."""
    return per_weight.sum(dim=0)


def group_sums(columns: torch.Tensor, size: int) -> torch.Tensor:
    return columns.view(-1, size).sum(dim=1)


def unit_scores(group: Group, per_weight: Callable[[Consumer], torch.Tensor]) -> torch.Tensor:
    """Per-unit scores summed over the consumers (one consumer: its scores, untouched)."""
    parts = [group_sums(column_scores(per_weight(c)), c.size) for c in group.consumers]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def lowest(scores: torch.Tensor, n: int, partitions: int = 1) -> list[int]:
    """The n lowest-scored units; with partitions, n/partitions from each equal consecutive run."""
    if partitions == 1:
        return sorted(torch.argsort(scores, stable=True)[:n].tolist())
    runs, per = scores.view(partitions, -1), n // partitions
    picked = torch.argsort(runs, dim=1, stable=True)[:, :per] + torch.arange(partitions)[:, None] * runs.shape[1]
    return sorted(picked.flatten().tolist())


def kept_weights(group: Group) -> list[torch.Tensor]:
    return [c.weight for c in group.consumers]


class Magnitude:
    """Σ|W| over the consumers' input columns, summed per unit. Needs no data."""

    name, needs = "magnitude", "weights"

    def scores(self, group: Group) -> torch.Tensor:
        return unit_scores(group, lambda c: c.weight.abs())

    def __call__(self, group: Group) -> Removal:
        return Removal(lowest(self.scores(group), group.n_remove, group.partitions), kept_weights(group))


@dataclass
class Taylor:
    """Loss change from zeroing a unit, by Taylor expansion (LLM-Pruner's three variants, arXiv:2305.11627).

    param_first: Σ|w·g|;  param_second: Σ w·F·w (F = mean g², the diagonal Fisher);
    param_mix: |Σ(−w·g + ½·w·F·w)|, the signed second-order estimate of the loss change.
    """

    kind: str = "param_first"
    name: str = "taylor"
    needs: str = "gradients"

    def __post_init__(self) -> None:
        if self.kind not in TAYLOR_TYPES:
            raise EvarError(f"unknown --taylor-type '{self.kind}'; choose one of {', '.join(TAYLOR_TYPES)}")

    def scores(self, group: Group) -> torch.Tensor:
        for c in group.consumers:
            if c.grad is None or c.grad_sq is None:
                raise EvarError(f"Taylor scores for {c.name} need gradients; none were collected")
        if self.kind == "param_first":
            return unit_scores(group, lambda c: (c.weight * c.grad).abs())
        if self.kind == "param_second":
            return unit_scores(group, lambda c: c.weight * c.grad_sq * c.weight)
        return unit_scores(group, lambda c: -c.weight * c.grad + 0.5 * c.weight * c.grad_sq * c.weight).abs()

    def __call__(self, group: Group) -> Removal:
        return Removal(lowest(self.scores(group), group.n_remove, group.partitions), kept_weights(group))


@dataclass
class OBS:
    """Greedy group OBS with closed-form compensation of the surviving columns (see evar.prune.obs)."""

    percdamp: float = 0.01
    compensate: bool = True
    name: str = "obs"
    needs: str = "hessian"

    def __post_init__(self) -> None:
        if not 0.0 <= self.percdamp < 1.0:
            raise EvarError(f"--percdamp must be in [0, 1), got {self.percdamp}")

    def __call__(self, group: Group) -> Removal:
        for c in group.consumers:
            if c.hessian is None:
                raise EvarError(f"OBS for {c.name} needs its input Hessian; none was collected")
        parts = [ObsPart(c.weight, c.hessian, c.size) for c in group.consumers]
        result = obs_remove(parts, group.n_remove, group.partitions, self.percdamp, self.compensate)
        return Removal(sorted(result.removed), result.weights)


# The one table of criteria: name → factory. Its order is the order `--method` lists them in.
CRITERIA: dict[str, Callable[[CriterionOptions], Criterion]] = {
    "obs": lambda o: OBS(o.percdamp, o.compensate),
    "taylor": lambda o: Taylor(o.taylor_type),
    "magnitude": lambda o: Magnitude(),
}


def register_criterion(name: str, factory: Callable[[CriterionOptions], Criterion]) -> None:
    """Add a criterion under `name` (then `--method name` selects it); names are never silently replaced."""
    if name in CRITERIA:
        raise ValueError(f"a pruning criterion named '{name}' is already registered")
    CRITERIA[name] = factory


def make_criterion(method: str, options: CriterionOptions | None = None) -> Criterion:
    if method not in CRITERIA:
        raise EvarError(f"unknown pruning method '{method}'; choose one of {', '.join(CRITERIA)}")
    return CRITERIA[method](options or CriterionOptions())
