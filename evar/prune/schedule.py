"""How much each block loses: per-block sparsities, and the head / FFN-unit counts they imply.

The schedule decides *how much*; the criteria decide *what*; surgery does the cutting.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from evar.config import VARConfig
from evar.errors import EvarError

SCHEDULES = ("uniform", "log_increase", "log_decrease")


def round_half_up(x: float) -> int:
    """round(H·s) as the EVAR table means it: 0.5 goes up (Python's round() would go to the even side)."""
    return math.floor(x + 0.5 + 1e-9)


@dataclass(frozen=True)
class Schedule:
    """Per-block sparsity. `sparsity` is the mean target; log schedules run from `min_sparsity` (first or last
    block) to `max_sparsity` (the other end) on a log curve bent so that its mean is `sparsity`."""

    kind: str = "uniform"
    sparsity: float = 0.0
    min_sparsity: float = 0.1
    max_sparsity: float = 0.5

    def validate(self) -> None:
        if self.kind not in SCHEDULES:
            raise EvarError(f"unknown schedule '{self.kind}'; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise EvarError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.kind != "uniform" and not 0.0 <= self.min_sparsity < self.max_sparsity < 1.0:
            raise EvarError(f"--min-sparsity/--max-sparsity must satisfy 0 <= min < max < 1, "
                            f"got {self.min_sparsity} and {self.max_sparsity}")

    def per_block(self, depth: int) -> list[float]:
        self.validate()
        if self.kind == "uniform" or depth == 1:
            return [self.sparsity] * depth
        # log(1+i)/log(depth): 0 at the first block, 1 at the last, rising fast early (the SlimGPT shape).
        shape = [math.log1p(i) / math.log(depth) for i in range(depth)]
        if self.kind == "log_decrease":
            shape.reverse()
        power = self._power_for_mean(shape)
        lo, hi = self.min_sparsity, self.max_sparsity
        return [lo + (hi - lo) * f ** power for f in shape]

    def _power_for_mean(self, shape: list[float]) -> float:
        """The exponent p with mean(min + (max-min)·f^p) == sparsity; f^p keeps both ends and the order."""
        lo, hi, n = self.min_sparsity, self.max_sparsity, len(shape)
        reach = (lo + (hi - lo) / n, lo + (hi - lo) * (n - 1) / n)  # p → ∞ and p → 0
        if not reach[0] < self.sparsity < reach[1]:
            raise EvarError(f"--sparsity {self.sparsity} cannot be the mean of a {self.kind} schedule from {lo} to "
                            f"{hi} over {n} blocks (reachable: {reach[0]:.3f} to {reach[1]:.3f} exclusive)")

        def mean(log_p: float) -> float:
            return lo + (hi - lo) * sum(f ** math.exp(log_p) for f in shape) / n

        a, b = -20.0, 20.0  # mean() decreases in p: bisect on log p
        for _ in range(100):
            mid = (a + b) / 2
            a, b = (mid, b) if mean(mid) > self.sparsity else (a, mid)
        return math.exp((a + b) / 2)


@dataclass(frozen=True)
class BlockTarget:
    """How many heads and FFN units block `block` loses in total (over all iterative steps)."""

    block: int
    sparsity: float
    heads: int
    units: int


def block_targets(arch: VARConfig, schedule: Schedule, heads: bool = True, ffn: bool = True,
                  head_sparsity: float | None = None) -> list[BlockTarget]:
    """round(H·s) heads and round(F·s) units per block; refuses to empty a block (clear error, nothing done).
    With `head_sparsity`, heads lose that share instead, and the FFN as many units as bring the block's
    weights down by s all the same (`weight_matched_units`)."""
    targets = []
    for i, s in enumerate(schedule.per_block(arch.depth)):
        h = round_half_up(arch.num_heads[i] * (s if head_sparsity is None else head_sparsity)) if heads else 0
        if head_sparsity is None:
            u = round_half_up(arch.ffn_dims[i] * s) if ffn else 0
        else:
            u = weight_matched_units(arch, i, s, h)
        if h >= arch.num_heads[i]:
            what = ("--sparsity", s) if head_sparsity is None else ("--head-sparsity", head_sparsity)
            raise EvarError(f"{what[0]} {what[1]:.3f} would remove all {arch.num_heads[i]} attention head(s) of block "
                            f"{i}; lower {what[0]}" + (" (or use --ffn-only)" if head_sparsity is None else ""))
        if u >= arch.ffn_dims[i]:
            raise EvarError(f"sparsity {s:.3f} would remove all {arch.ffn_dims[i]} FFN units of block {i}")
        targets.append(BlockTarget(i, s, h, u))
    return targets


def weight_matched_units(arch: VARConfig, block: int, sparsity: float, heads_removed: int) -> int:
    """FFN units to remove so that, with `heads_removed` heads gone, the block's attention and FFN weights
    shrink by `sparsity`. A head holds 4·C·d weights (its q, k, v rows and proj columns), an FFN unit 2·C
    (its fc1 row and fc2 column), so a head weighs as much as 2·d units (biases and norms are left out)."""
    unit_per_head = 2 * arch.head_dim
    total = arch.num_heads[block] * unit_per_head + arch.ffn_dims[block]
    units = round_half_up(sparsity * total - heads_removed * unit_per_head)
    if units < 0:
        raise EvarError(f"--head-sparsity removes {heads_removed} of block {block}'s {arch.num_heads[block]} heads: "
                        f"more than --sparsity {sparsity:.3f} of its weights already; lower --head-sparsity")
    return units


def step_amount(total: int, step: int, steps: int) -> int:
    """What iterative step `step` (1-based) of `steps` removes, so that the steps add up to `total` exactly."""
    return round_half_up(total * step / steps) - round_half_up(total * (step - 1) / steps)
