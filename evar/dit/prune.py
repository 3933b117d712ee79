"""`evar prune-dit`: remove attention heads and FFN units of a DiT with the criteria `evar prune` uses.

The DiT adapter (`evar.prune.dit_adapter`) shows each block's heads and FFN units to the criteria; rates are
per component (the diffusion-pruning rule of thumb: attention 30–40% is safe, FFN 40–50%), spread over the
blocks by the same schedules as VAR's. Statistics come in one pass per round over calibration inputs:
images of the calibration set noised at timesteps drawn over the whole schedule (what the denoiser sees at
inference), with labels dropped at the training rate. Magnitude needs none, Taylor the gradients of the
training loss, OBS each consumer's input Hessian. With --iterative-steps K, the target is reached in
K rounds, re-scoring the smaller model after each.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evar.data import load_images
from evar.dit.checkpoint import DiTModel
from evar.dit.diffusion import alphas_cumprod, q_sample, target
from evar.errors import EvarError
from evar.prune.adapter import Prunable
from evar.prune.decoder import cut_together
from evar.prune.dit_adapter import DiTAdapter, rebuild
from evar.prune.recipe import Recipe
from evar.prune.schedule import round_half_up, step_amount
from evar.prune.statistics import InputHessians, gradient_moments


@dataclass(frozen=True)
class DiTPruneRecipe(Recipe):
    """Recipe.sparsity is the default rate of both components; each may be set on its own."""

    attn_sparsity: float | None = None
    ffn_sparsity: float | None = None
    calib_data: str = "digits"
    calib_samples: int = 256

    def rate(self, kind: str) -> float:
        own = self.attn_sparsity if kind == "heads" else self.ffn_sparsity
        return self.sparsity if own is None else own

    def validate(self) -> None:
        super().validate()
        if self.calib_data == "teacher":
            raise EvarError("prune-dit calibrates on images (noised at random timesteps): use --calib-data digits "
                            "or an image folder")
        for flag, rate in (("--attn-sparsity", self.attn_sparsity), ("--ffn-sparsity", self.ffn_sparsity)):
            if rate is not None and not 0.0 <= rate < 1.0:
                raise EvarError(f"{flag} must be in [0, 1), got {rate}")


@dataclass
class Calibration:
    x_t: torch.Tensor  # noised images
    t: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor  # what the network should output for x_t (noise or v)

    def batches(self, size: int) -> list[slice]:
        return [slice(s, s + size) for s in range(0, len(self.t), size)]


def calibration(model: DiTModel, recipe: DiTPruneRecipe) -> Calibration:
    cfg = model.config
    images, labels = load_images(recipe.calib_data, "train", cfg.input_size)
    if images.shape[1] != cfg.in_channels:
        raise EvarError(f"calibration images have {images.shape[1]} channels; the DiT takes {cfg.in_channels}")
    gen = torch.Generator().manual_seed(recipe.seed)
    pick = torch.randint(0, len(images), (recipe.calib_samples,), generator=gen)
    t = torch.randint(0, cfg.diffusion_steps, (recipe.calib_samples,), generator=gen)
    noise = torch.randn((recipe.calib_samples, *images.shape[1:]), generator=gen)
    if int(labels.max()) >= cfg.num_classes:
        raise EvarError(f"calibration data has {int(labels.max()) + 1} classes; the DiT has {cfg.num_classes}")
    drop = torch.rand(recipe.calib_samples, generator=gen) < cfg.class_dropout_prob
    labels = torch.where(drop, torch.full_like(labels[pick], cfg.num_classes), labels[pick])
    abar = alphas_cumprod(cfg.diffusion_steps)
    return Calibration(q_sample(images[pick], t, noise, abar), t, labels,
                       target(cfg.prediction, images[pick], noise, t, abar))


def targets(prunables: list[Prunable], recipe: DiTPruneRecipe, depth: int) -> list[int]:
    """Units each set loses in all: round(count · rate of its component at its block)."""
    per_block = {kind: dataclasses.replace(recipe, sparsity=recipe.rate(kind)).sparsity_schedule().per_block(depth)
                 for kind in ("heads", "ffn")}
    out = []
    for p in prunables:
        n = round_half_up(p.count * per_block[p.kind][p.position])
        if n >= p.count:
            raise EvarError(f"{p.name}: rate {per_block[p.kind][p.position]:.2f} would remove all {p.count} {p.kind}")
        out.append(n)
    return out


def statistics(model: DiTModel, prunables: list[Prunable], needs: str, data: Calibration | None,
               batch: int) -> list[list[dict[str, Any]]]:
    if needs == "weights" or data is None:
        return [[{} for _ in p.consumers] for p in prunables]
    dit = model.dit
    layers = {name: layer for p in prunables for name, layer in p.consumers.items()}
    if needs == "hessian":
        with InputHessians(layers) as hessians, torch.no_grad():
            for sl in data.batches(batch):
                dit.predict(data.x_t[sl], data.t[sl], data.labels[sl])
        return [[{"hessian": hessians.take(name)} for name in p.consumers] for p in prunables]
    losses = (F.mse_loss(dit.predict(data.x_t[sl], data.t[sl], data.labels[sl]), data.target[sl])
              for sl in data.batches(batch))
    moments = dict(zip(layers, gradient_moments(dit, [layer.weight for layer in layers.values()], losses)))
    return [[{"grad": moments[n][0], "grad_sq": moments[n][1]} for n in p.consumers] for p in prunables]


def prune_dit(model: DiTModel, recipe: DiTPruneRecipe, parent: str = "", progress: bool = True) -> tuple[DiTModel, dict]:
    """Prune `model` (cut in place) and return the DiT rebuilt from its new config, with a report."""
    t0 = time.perf_counter()
    recipe.validate()
    criterion = recipe.criterion()
    prunables = DiTAdapter(model.dit).prunables()
    before = [p.count for p in prunables]
    params_before = sum(p.numel() for p in model.dit.parameters())
    total = targets(prunables, recipe, model.config.depth)
    data = calibration(model, recipe) if criterion.needs != "weights" and any(total) else None
    K = recipe.iterative_steps
    for step in tqdm(range(1, K + 1), desc="pruning the DiT", disable=not progress or not any(total),
                     dynamic_ncols=True):
        stats = statistics(model, prunables, criterion.needs, data, recipe.calib_batch)
        cut_together(prunables, criterion, [step_amount(n, step, K) for n in total], stats)
    report = {"recipe": dataclasses.asdict(recipe), "parent": parent,
              "units": {p.name: {"before": b, "after": p.count} for p, b in zip(prunables, before)},
              "params": {"before": params_before, "after": sum(p.numel() for p in model.dit.parameters())},
              "seconds": round(time.perf_counter() - t0, 2)}
    provenance = {"source": "evar prune-dit", "parent": parent, "parent_provenance": model.provenance,
                  "recipe": report["recipe"]}
    return rebuild(model, provenance), report
