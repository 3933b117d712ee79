"""`evar sparsify`'s knobs, checked before any model is loaded and recorded in the model directory."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from evar.errors import EvarError
from evar.prune.recipe import PruneRecipe
from evar.sparsity.methods import METHODS
from evar.sparsity.patterns import Pattern

LEARNABLE = "learnable"


def parse_pair(text: str, flag: str) -> tuple[float, float]:
    """'4,0.05' → (4.0, 0.05): a start and an end value, both finite and > 0."""
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise EvarError(f"{flag} must be two comma-separated numbers (start,end), got '{text}'") from None
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise EvarError(f"{flag} values must be finite and > 0, got '{text}'")
    return a, b


@dataclass(frozen=True)
class SparsifyRecipe:
    pattern: str = "2:4"
    sparsity: float | None = None  # unstructured only; N:M implies N/M
    method: str = "sparsegpt"
    update: bool = True  # SparseGPT's weight update
    blocksize: int = 128
    percdamp: float = 0.01
    calib_samples: int = 128
    calib_data: str = "teacher"
    calib_batch: int = 8
    calib_uncond: float = 0.5
    head: bool = False
    embed: bool = False
    seed: int = 0
    # learnable masks (MaskLLM)
    prior: str = "sparsegpt"
    steps: int = 300
    tau: tuple[float, float] = (4.0, 0.05)
    scale: tuple[float, float] = (10.0, 100.0)
    prior_strength: float = 3.0
    weight_reg: float = 1e-5
    lr: float = 0.05
    batch_size: int = 16
    data_samples: int = 512
    ckpt_every: int = 100

    def parsed(self) -> Pattern:
        return Pattern.parse(self.pattern, self.sparsity)

    def validate(self) -> None:
        pattern = self.parsed()
        if self.method not in (*METHODS, LEARNABLE):
            raise EvarError(f"unknown --method '{self.method}'; choose one of {', '.join((*METHODS, LEARNABLE))}")
        if self.method == LEARNABLE:
            if self.prior not in METHODS:
                raise EvarError(f"unknown --prior '{self.prior}'; choose one of {', '.join(METHODS)}")
            if pattern.name != "2:4":
                raise EvarError(f"--method learnable chooses among the 6 candidate masks of 2:4; "
                                f"--pattern {pattern.name} is not supported by it")
            for flag, v in (("--steps", self.steps), ("--batch-size", self.batch_size),
                            ("--data-samples", self.data_samples), ("--ckpt-every", self.ckpt_every)):
                if v < 1:
                    raise EvarError(f"{flag} must be >= 1, got {v}")
            if not (self.lr > 0 and self.prior_strength >= 0 and self.weight_reg >= 0):
                raise EvarError("--lr must be > 0, --prior-strength and --weight-reg >= 0")
        for flag, v in (("--blocksize", self.blocksize), ("--calib-samples", self.calib_samples),
                        ("--calib-batch", self.calib_batch)):
            if v < 1:
                raise EvarError(f"{flag} must be >= 1, got {v}")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise EvarError(f"--percdamp must be >= 0, got {self.percdamp}")
        self.calibration_recipe().validate()

    def one_shot(self) -> str:
        """The one-shot method that makes the masks (learnable: its prior)."""
        return self.prior if self.method == LEARNABLE else self.method

    def calibration_recipe(self) -> PruneRecipe:
        """The calibration set is `evar prune`'s (same flags, same sequences for the same seed)."""
        return PruneRecipe(sparsity=0.0, calib_samples=self.calib_samples, calib_data=self.calib_data,
                           calib_batch=self.calib_batch, calib_uncond=self.calib_uncond, seed=self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
