"""Pruning recipes: every knob of a pruning run, checked before any model is loaded and recorded verbatim
in the pruned model's provenance. `Recipe` holds what every family shares (how much, by which criterion,
on which calibration data); `PruneRecipe` adds what `evar prune` needs for the VAR transformer."""
from __future__ import annotations

from dataclasses import dataclass

from evar.calibration import generation_dtype
from evar.config import VARConfig
from evar.errors import EvarError
from evar.prune.criteria import TAYLOR_TYPES, Criterion, CriterionOptions, make_criterion
from evar.prune.schedule import BlockTarget, Schedule, block_targets


@dataclass(frozen=True)
class Recipe:
    sparsity: float
    method: str = "obs"
    taylor_type: str = "param_first"
    percdamp: float = 0.01
    compensate: bool = True
    calib_samples: int = 256
    calib_data: str = "teacher"  # the model's own generations, 'digits', or an image folder
    calib_batch: int = 8
    schedule: str = "uniform"
    min_sparsity: float = 0.1
    max_sparsity: float = 0.5
    iterative_steps: int = 1
    seed: int = 0

    def validate(self) -> None:
        """Everything checkable without the model, so bad flags fail before any loading."""
        self.sparsity_schedule().validate()
        self.criterion()
        if self.taylor_type not in TAYLOR_TYPES:
            raise EvarError(f"unknown --taylor-type '{self.taylor_type}'; choose one of {', '.join(TAYLOR_TYPES)}")
        for name, value in (("--calib-samples", self.calib_samples), ("--calib-batch", self.calib_batch),
                            ("--iterative-steps", self.iterative_steps)):
            if value < 1:
                raise EvarError(f"{name} must be >= 1, got {value}")

    def sparsity_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.sparsity, self.min_sparsity, self.max_sparsity)

    def criterion(self) -> Criterion:
        return make_criterion(self.method, CriterionOptions(self.taylor_type, self.percdamp, self.compensate))


@dataclass(frozen=True)
class PruneRecipe(Recipe):
    """`evar prune`: whole attention heads and FFN units of every VAR block."""

    calib_scale: str = "all"  # 'all', 'last' or a scale index (negative counts from the end)
    calib_uncond: float = 0.5  # share of calibration sequences run with the null class, as CFG does at inference
    # Of sampling the model's own calibration sequences. fp32 by default so a recipe gives the same pruned weights
    # on every CPU; 'auto' (bf16 where the CPU multiplies it natively) is about twice as fast and opt-in.
    calib_precision: str = "fp32"
    heads: bool = True
    ffn: bool = True
    # Heads' own share; the FFN then loses what keeps each block's weights at `sparsity` (None: both lose it).
    head_sparsity: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.head_sparsity is not None:
            if not 0.0 <= self.head_sparsity < 1.0:
                raise EvarError(f"--head-sparsity must be in [0, 1), got {self.head_sparsity}")
            if not (self.heads and self.ffn):
                raise EvarError("--head-sparsity splits the cut between heads and FFN units: "
                                "drop --heads-only/--ffn-only")
        if not 0.0 <= self.calib_uncond <= 1.0:
            raise EvarError(f"--calib-uncond must be in [0, 1], got {self.calib_uncond}")
        generation_dtype(self.calib_precision)
        if not (self.heads or self.ffn):
            raise EvarError("--heads-only and --ffn-only exclude each other")
        if self.calib_scale not in ("all", "last"):
            try:
                int(self.calib_scale)
            except ValueError:
                raise EvarError(f"--calib-scale must be 'all', 'last' or a scale index, "
                                f"got '{self.calib_scale}'") from None

    def token_range(self, arch: VARConfig) -> slice:
        """The tokens whose statistics count: all of them, or those of one scale."""
        if self.calib_scale == "all":
            return slice(0, arch.seq_len)
        si = -1 if self.calib_scale == "last" else int(self.calib_scale)
        if not -arch.num_scales <= si < arch.num_scales:
            raise EvarError(f"--calib-scale {self.calib_scale}: the model has scales 0..{arch.num_scales - 1}")
        return slice(*arch.scale_ranges()[si])

    def targets(self, arch: VARConfig) -> list[BlockTarget]:
        """How many heads and FFN units each block loses."""
        return block_targets(arch, self.sparsity_schedule(), self.heads, self.ffn, self.head_sparsity)
