"""Pruning criteria: small callables that decide *what* to remove from one consumer layer.

A `Group` is a consumer Linear (attention `proj`, FFN `fc2`) whose input columns go `size` at a time
(a head = head_dim columns, an FFN unit = 1 column), with whatever statistics the criterion asked for
(`needs`). A criterion returns the groups to remove and the consumer weight to keep (OBS updates it).

Scores are always per INPUT column of the consumer layer, summed per group. The upstream Taylor code
summed over the wrong axis (per output row) and used those as column indices; `column_scores` is
the one place the axis is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from evar.errors import EvarError
from evar.prune.obs import obs_prune

METHODS = ("obs", "taylor", "magnitude")
TAYLOR_TYPES = ("param_first", "param_second", "param_mix")


@dataclass
class Group:
    name: str  # e.g. "blocks.3.attn.proj", for messages and the report
    weight: torch.Tensor  # (out, in) consumer weight
    size: int  # input columns per group
    n_remove: int
    hessian: torch.Tensor | None = None  # (in, in) = (2/n) Σ xᵀx, for OBS
    grad: torch.Tensor | None = None  # (out, in) mean gradient of the calibration loss, for Taylor
    grad_sq: torch.Tensor | None = None  # (out, in) mean squared gradient (diagonal Fisher), for Taylor

    @property
    def n_groups(self) -> int:
        return self.weight.shape[1] // self.size


@dataclass
class Removal:
    groups: list[int]  # removed group indices (positions among the layer's current groups)
    weight: torch.Tensor  # (out, in) weight to keep for the surviving columns


class Criterion(Protocol):
    name: str
    needs: str  # "weights" | "gradients" | "hessian": what the pipeline must collect before calling

    def __call__(self, group: Group) -> Removal: ...


def column_scores(per_weight: torch.Tensor) -> torch.Tensor:
    """(out, in) per-weight scores → (in,) per input column: sum over output rows (dim 0)."""
    return per_weight.sum(dim=0)


def group_sums(columns: torch.Tensor, size: int) -> torch.Tensor:
    return columns.view(-1, size).sum(dim=1)


def lowest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:n].tolist())


class Magnitude:
    """Σ|W| over the consumer layer's input columns, summed per group. Needs no data."""

    name, needs = "magnitude", "weights"

    def scores(self, group: Group) -> torch.Tensor:
        return group_sums(column_scores(group.weight.abs()), group.size)

    def __call__(self, group: Group) -> Removal:
        return Removal(lowest(self.scores(group), group.n_remove), group.weight)


@dataclass
class Taylor:
    """Loss change from zeroing a group, by Taylor expansion (LLM-Pruner's three variants).

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
        if group.grad is None or group.grad_sq is None:
            raise EvarError(f"Taylor scores for {group.name} need gradients; none were collected")
        w, g, fisher = group.weight, group.grad, group.grad_sq
        if self.kind == "param_first":
            return group_sums(column_scores((w * g).abs()), group.size)
        if self.kind == "param_second":
            return group_sums(column_scores(w * fisher * w), group.size)
        return group_sums(column_scores(-w * g + 0.5 * w * fisher * w), group.size).abs()

    def __call__(self, group: Group) -> Removal:
        return Removal(lowest(self.scores(group), group.n_remove), group.weight)


@dataclass
class OBS:
    """Greedy group OBS with closed-form compensation of the surviving columns (see evar.prune.obs)."""

    percdamp: float = 0.01
    compensate: bool = True
    name: str = "obs"
    needs: str = "hessian"

    def __call__(self, group: Group) -> Removal:
        if group.hessian is None:
            raise EvarError(f"OBS for {group.name} needs its input Hessian; none was collected")
        result = obs_prune(group.weight, group.hessian, group.size, group.n_remove, self.percdamp, self.compensate)
        return Removal(sorted(result.removed), result.weight)


def make_criterion(method: str, taylor_type: str = "param_first", percdamp: float = 0.01,
                   compensate: bool = True) -> Criterion:
    if method == "magnitude":
        return Magnitude()
    if method == "taylor":
        return Taylor(taylor_type)
    if method == "obs":
        if not 0.0 <= percdamp < 1.0:
            raise EvarError(f"--percdamp must be in [0, 1), got {percdamp}")
        return OBS(percdamp, compensate)
    raise EvarError(f"unknown pruning method '{method}'; choose one of {', '.join(METHODS)}")
