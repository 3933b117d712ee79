"""Learnable 2:4 masks (MaskLLM, arXiv:2409.17481), trained against the dense teacher.

Every group of 4 consecutive input weights of a row chooses one of the 6 masks that keep exactly 2 of
them. The choice is a categorical over those candidates with learnable logits `gate` (out, in/4, 6); in
training a differentiable sample of it is drawn with Gumbel-softmax,
    mask = gumbel_softmax(gate · scale, tau) @ candidates            (out, in/4, 4) → (out, in),
with the temperature annealed from tau₀ to tau₁ and the scale rising linearly from s₀ to s₁ over the run,
so early samples explore and late ones are nearly one-hot. The weights stay frozen; only the gates learn.
The gates start from a one-shot mask (the prior): with σ the spread of the random initial gates,
    gate += (overlap − 1) · σ · prior_strength,      overlap = |candidate ∧ prior| / 2 ∈ {0, ½, 1},
so the prior's candidate starts ahead. Loss: the family's KL(teacher ‖ student) (`evar.sparsity.family`:
a VAR's per-token KL on teacher-forced sequences of the teacher's own generations, with CFG's label drop; a
ViT's KL on class logits of training images), minus λ·Σ‖W ⊙ M‖² (keeping large weights is rewarded). The final mask is each group's argmax candidate.
Training runs on EVAR's loop (`evar.train._run`): resumable from OUT.partial/.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from evar.errors import EvarError
from evar.files import atomic_write_json, read_json
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.targets import linear
from evar.train import Schedule, _run

GROUP = 4
CANDIDATES = torch.tensor([[1.0 if j in keep else 0.0 for j in range(GROUP)]
                           for keep in itertools.combinations(range(GROUP), 2)])  # (6, 4)
INIT_STD = 0.1  # spread of the random initial gates, so that scale·σ·prior_strength ≈ 3 logits at scale 10
RECORD_FILE = "mask_run.json"


def prior_gates(prior: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """(out, in) bool prior → (out, in/4, 6) initial gate logits with the prior's candidate ahead."""
    out, cols = prior.shape
    gate = torch.randn(out, cols // GROUP, len(CANDIDATES), generator=gen) * INIT_STD
    overlap = prior.float().reshape(out, cols // GROUP, GROUP) @ CANDIDATES.T / 2
    return gate + (overlap - 1) * gate.std() * strength


def hard_mask(gate: torch.Tensor) -> torch.Tensor:
    """Each group's most likely candidate: (out, in/4, 6) → (out, in) bool."""
    out, groups, _ = gate.shape
    return CANDIDATES[gate.argmax(-1)].reshape(out, groups * GROUP).bool()


class GumbelMask(nn.Module):
    """A parametrization of a Linear's weight: W ↦ W ⊙ M, M sampled from the gates (train) or their argmax."""

    def __init__(self, gate: torch.Tensor):
        super().__init__()
        self.gate = nn.Parameter(gate)
        self.tau, self.scale = 1.0, 1.0
        # The Gumbel noise comes from the training loop's checkpointed generator, not torch's global state,
        # so a run gives the same masks every time and a resumed run the masks of an uninterrupted one.
        self.noise: torch.Generator | None = None

    def mask(self) -> torch.Tensor:
        if not self.training:
            return hard_mask(self.gate).to(self.gate.dtype)
        if self.noise is None:
            raise RuntimeError("GumbelMask in training needs its noise generator (MaskRun.anneal sets it)")
        u = torch.rand(self.gate.shape, generator=self.noise).clamp_(1e-10, 1.0 - 1e-7).to(self.gate.dtype)
        gumbel = -torch.log(-torch.log(u))
        soft = torch.softmax((self.gate * self.scale + gumbel) / self.tau, dim=-1)
        return (soft @ CANDIDATES).reshape(self.gate.shape[0], -1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask()


@dataclass
class MaskRun:
    """The gates of every layer, attached to the student's Linears as weight parametrizations."""

    layers: dict[str, GumbelMask]

    @classmethod
    def attach(cls, var: nn.Module, priors: dict[str, torch.Tensor], strength: float, seed: int) -> MaskRun:
        gen = torch.Generator().manual_seed(seed)
        layers = {}
        for name, prior in priors.items():
            gm = GumbelMask(prior_gates(prior, strength, gen))
            parametrize.register_parametrization(linear(var, name), "weight", gm, unsafe=True)
            layers[name] = gm
        return cls(layers)

    def modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({k.replace(".", "/"): v for k, v in self.layers.items()})

    def anneal(self, tau: float, scale: float, noise: torch.Generator) -> None:
        for gm in self.layers.values():
            gm.tau, gm.scale, gm.noise = tau, scale, noise

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: hard_mask(gm.gate.detach()) for name, gm in self.layers.items()}

    def detach(self, var: nn.Module) -> dict[str, torch.Tensor]:
        """Remove the parametrizations (the frozen original weights come back) and return the final masks."""
        masks = self.masks()
        for name in self.layers:
            parametrize.remove_parametrizations(linear(var, name), "weight", leave_parametrized=False)
        return masks


def schedule_at(step: int, steps: int, start: float, end: float) -> float:
    """Linear from `start` (step 0) to `end` (the last step)."""
    t = step / max(1, steps - 1)
    return start + (end - start) * t


class MaskLoss:
    """`loss_fn(gen, step)` for `evar.train._run`: the family's KL to the teacher on a drawn batch, minus the
    weight reward."""

    def __init__(self, recipe: SparsifyRecipe, student: nn.Module, run: MaskRun,
                 kl_fn: Callable[[torch.Generator], torch.Tensor]):
        self.recipe, self.student, self.run, self.kl_fn = recipe, student, run, kl_fn

    def __call__(self, gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        r = self.recipe
        tau, scale = schedule_at(step, r.steps, *r.tau), schedule_at(step, r.steps, *r.scale)
        self.run.anneal(tau, scale, gen)
        kl = self.kl_fn(gen)
        kept = sum((linear(self.student, name).weight ** 2).sum() for name in self.run.layers)
        loss = kl - r.weight_reg * kept
        return {"loss": loss, "kl": kl.detach(), "kept_sq": kept.detach(), "tau": torch.tensor(tau),
                "scale": torch.tensor(scale)}


def learn_masks(teacher: Any, student: Any, priors: dict[str, torch.Tensor], recipe: SparsifyRecipe,
                work: Path, record: dict) -> dict[str, torch.Tensor]:
    """Train the gates of the student's blocks (its weights frozen) against the dense teacher (both loaded
    models of one family); state kept in `work` (rerun with the same recipe to continue). Returns the final
    masks; the student's weights are unchanged."""
    from evar.sparsity.family import family_for

    _check_record(work, record)
    t_family, s_family = family_for(teacher), family_for(student)
    kl_fn = s_family.distance(t_family, recipe, work)
    t_family.root.eval().requires_grad_(False)
    s_family.root.requires_grad_(False)
    run = MaskRun.attach(s_family.root, priors, recipe.prior_strength, recipe.seed)
    modules = run.modules()
    s_family.root.eval()  # no dropout; the gates sample because their modules are in train mode
    modules.train()
    sched = Schedule(steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, weight_decay=0.0,
                     warmup=min(20, recipe.steps), ckpt_every=recipe.ckpt_every, seed=recipe.seed)
    _run(work, sched, list(modules.parameters()), {"gates": modules}, MaskLoss(recipe, s_family.root, run, kl_fn),
         "learnable masks")
    return run.detach(s_family.root)


def _check_record(work: Path, record: dict) -> None:
    """A rerun continues only the run it started: the same recipe, parent and teacher."""
    path = work / RECORD_FILE
    if path.exists():
        old = read_json(path, "mask run record")
        if json.loads(json.dumps(record)) != old:
            changed = sorted(k for k in set(old) | set(record) if old.get(k) != json.loads(json.dumps(record)).get(k))
            raise EvarError(f"{work} holds a learnable-mask run with other settings ({', '.join(changed)} changed); "
                            "use the same flags, or delete it to start over")
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
