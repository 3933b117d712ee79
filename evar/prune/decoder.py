"""`evar prune-decoder`: remove conv channels of the VQVAE decoder; the VAR, the encoder and the quantizer
stay as they are.

Each channel set of the decoder (see `evar.prune.decoder_adapter`) loses round(c·s) channels of each of
its GroupNorm's 32 groups of c channels (so widths stay multiples of 32 and every group the same size),
with s from the schedule over the decoder's levels (lowest resolution first). The criteria see the sets
through their consumer convs: magnitude needs nothing, Taylor the gradients of the reconstruction loss of
real images (so it needs `--calib-data digits` or an image folder), OBS the Hessians of each consumer's
unfolded inputs, gathered in one pass over the calibration f_hat (the model's own generations by
default: what the decoder decodes at inference). All sets are chosen on the same (dense, or previous
step's) decoder, then cut together.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from evar.calibration import GENERATED, token_set
from evar.checkpoints import Model, load_strict
from evar.config import DecoderWidths, ModelConfig, VQVAEConfig
from evar.data import load_images
from evar.errors import EvarError
from evar.models.vqvae import VQVAE, AttnBlock
from evar.prune.adapter import Prunable
from evar.prune.criteria import Criterion
from evar.prune.decoder_adapter import DecoderAdapter
from evar.prune.pipeline import PruneResult
from evar.prune.recipe import Recipe
from evar.prune.report import before_after, versions
from evar.prune.resume import PruneCheckpoint
from evar.prune.schedule import round_half_up, step_amount
from evar.prune.statistics import InputHessians, gradient_moments
from evar.prune.surgery import choose, write_back
from evar.samples import SamplingSettings


@dataclass(frozen=True)
class DecoderRecipe(Recipe):
    """`evar prune-decoder`: channels of the VQVAE decoder."""

    calib_samples: int = 64

    def validate(self) -> None:
        super().validate()
        if self.criterion().needs == "gradients" and self.calib_data == GENERATED:
            raise EvarError("--method taylor scores decoder channels by the reconstruction loss of real images: "
                            "use --calib-data digits or an image folder")


@dataclass
class DecoderData:
    """What the decoder is calibrated (or distilled) on: f_hat, and the images they encode if real."""

    f_hat: torch.Tensor  # (N, Cvae, h, w)
    images: torch.Tensor | None  # (N, 3, H, W) in [-1, 1], or None for the model's own generations
    source: str

    def __len__(self) -> int:
        return len(self.f_hat)


@torch.no_grad()
def decoder_data(model: Model, source: str, n: int, seed: int = 0,
                 checkpoint: PruneCheckpoint | None = None) -> DecoderData:
    """f_hat of `n` of the model's own generations ('teacher'; their tokens cached in `checkpoint`), or of
    `n` images ('digits' or a folder) through the encoder and the quantizer."""
    vqvae = model.vqvae
    if source == GENERATED:
        tokens = checkpoint.load_calibration() if checkpoint is not None else None
        if tokens is None:
            tokens = token_set(model, GENERATED, n, SamplingSettings(seed=seed))
            if checkpoint is not None:
                checkpoint.save_calibration(tokens)
        pn = model.config.var.patch_nums
        f_hat = torch.cat([vqvae.idx_to_fhat(tokens.subset(torch.arange(s, min(s + 64, n))).scale_tokens(pn))
                           for s in range(0, n, 64)])
        return DecoderData(f_hat, None, source)
    images, _ = load_images(source, "train", model.config.vqvae.image_size)
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]
    f_hat = torch.cat([vqvae.quantize.residual_quantize(vqvae.encode_features(images[s:s + 64]))[0]
                       for s in range(0, len(images), 64)])
    return DecoderData(f_hat, images, source)


def decode(vqvae: VQVAE, f_hat: torch.Tensor) -> torch.Tensor:
    """The decoder's raw output (unclamped, as in training)."""
    return vqvae.decoder(vqvae.post_quant_conv(f_hat))


# ---------------------------------------------------------------- how much
def set_targets(prunables: list[Prunable], recipe: DecoderRecipe, n_levels: int) -> list[tuple[float, int]]:
    """(sparsity, channels removed per GroupNorm group) of every set; refuses to empty a group."""
    per_level = recipe.sparsity_schedule().per_block(n_levels)
    targets = []
    for p in prunables:
        s, per_group = per_level[p.position], p.count // p.partitions
        r = round_half_up(per_group * s)
        if r >= per_group:
            raise EvarError(f"sparsity {s:.3f} would leave the GroupNorm groups of decoder {p.name} with no channels "
                            f"({per_group} per group); lower --sparsity")
        targets.append((s, r))
    return targets


# ---------------------------------------------------------------- statistics
def gather_statistics(vqvae: VQVAE, prunables: list[Prunable], criterion: Criterion, data: DecoderData | None,
                      batch: int) -> list[list[dict[str, Any]]]:
    """Per set, per consumer: what the criterion needs, gathered on the current decoder in one pass."""
    if criterion.needs == "weights" or data is None:
        return [[{} for _ in p.consumers] for p in prunables]
    layers = {name: layer for p in prunables for name, layer in p.consumers.items()}
    batches = [slice(s, s + batch) for s in range(0, len(data), batch)]
    if criterion.needs == "hessian":
        with InputHessians(layers) as hessians, torch.no_grad():
            for sl in batches:
                decode(vqvae, data.f_hat[sl])
        return [[{"hessian": hessians.take(name)} for name in p.consumers] for p in prunables]
    if criterion.needs == "gradients":
        losses = (F.mse_loss(decode(vqvae, data.f_hat[sl]), data.images[sl]) for sl in batches)
        moments = dict(zip(layers, gradient_moments(vqvae, [layer.weight for layer in layers.values()], losses)))
        return [[{"grad": moments[name][0].flatten(1), "grad_sq": moments[name][1].flatten(1)} for name in p.consumers]
                for p in prunables]
    raise EvarError(f"no decoder statistics for a criterion that needs '{criterion.needs}'")


# ---------------------------------------------------------------- the run
def prune_decoder(model: Model, recipe: DecoderRecipe, parent: str = "", progress: bool = True,
                  checkpoint: PruneCheckpoint | None = None) -> PruneResult:
    """Prune `model`'s VQVAE decoder (cut in place) and return the model rebuilt from its new config."""
    t0 = time.perf_counter()
    recipe.validate()
    criterion = recipe.criterion()
    adapter = DecoderAdapter(model.vqvae)
    prunables = adapter.prunables()
    before = [p.count for p in prunables]
    params_before = decoder_params(model.vqvae)
    targets = set_targets(prunables, recipe, len(model.vqvae.decoder.up))
    work = any(r for _, r in targets)
    data = (decoder_data(model, recipe.calib_data, recipe.calib_samples, recipe.seed, checkpoint)
            if work and criterion.needs != "weights" else None)
    t_calib = time.perf_counter() - t0
    K = recipe.iterative_steps
    for step in tqdm(range(1, K + 1 if work else 1), desc="pruning the decoder", disable=not (progress and work),
                     dynamic_ncols=True):
        stats = gather_statistics(model.vqvae, prunables, criterion, data, recipe.calib_batch)
        amounts = [step_amount(r, step, K) * p.partitions for p, (_, r) in zip(prunables, targets)]
        cut_together(prunables, criterion, amounts, stats)
    report = decoder_report(model, recipe, parent, prunables, (before, targets), adapter,
                            (params_before, decoder_params(model.vqvae)), (t_calib, time.perf_counter() - t0 - t_calib),
                            data)
    widths = adapter.widths()
    widths = None if widths == DecoderWidths.dense(model.config.vqvae) else widths  # nothing cut: the parent's config
    pruned = rebuild_vqvae(model, dataclasses.replace(model.config.vqvae, decoder_widths=widths),
                           provenance(model, recipe, parent, report))
    return PruneResult(pruned, report)


def decoder_params(vqvae: VQVAE) -> int:
    return sum(p.numel() for p in vqvae.decoder.parameters())


def cut_together(prunables: list[Prunable], criterion: Criterion, amounts: list[int],
                 stats: list[list[dict[str, Any]]]) -> None:
    """Choose every set's channels on the same weights, write the kept consumer weights, then cut them all
    (a conv reads one set and writes another: its compensated columns go in before its rows come out)."""
    removals = [choose(p, criterion, n, s) if n else None for p, n, s in zip(prunables, amounts, stats)]
    for p, removal in zip(prunables, removals):
        if removal is not None:
            write_back(p, removal)
    for p, removal in zip(prunables, removals):
        if removal is not None:
            p.cut(removal.units)


def rebuild_vqvae(model: Model, vqvae_config: VQVAEConfig, provenance: dict[str, Any]) -> Model:
    """A VQVAE built from the new config alone and loaded strictly from the cut weights (as loading the
    model directory will do), with the model's VAR."""
    config = ModelConfig(model.config.var, vqvae_config, provenance)
    config.validate()
    with torch.device("meta"):
        fresh = VQVAE(vqvae_config)
    fresh.to_empty(device="cpu")
    load_strict(fresh, model.vqvae.state_dict(), "pruned VQVAE")
    return Model(config, model.var, fresh).eval()


# ---------------------------------------------------------------- records
def decoder_macs(vqvae_config: VQVAEConfig) -> int:
    """Multiply-accumulates of decoding one image (post_quant_conv + decoder), counted on the meta device
    from the config: convolutions and the attention products."""
    with torch.device("meta"):
        vqvae = VQVAE(vqvae_config)
    total = 0

    def conv(m: nn.Conv2d, args, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def attention(m: AttnBlock, args, out: torch.Tensor) -> None:
        nonlocal total
        positions = out.shape[-1] * out.shape[-2]
        total += 2 * m.inner * positions * positions  # q·kᵀ and attn·v

    modules = [vqvae.post_quant_conv, *vqvae.decoder.modules()]
    handles = [m.register_forward_hook(conv) for m in modules if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(attention) for m in modules if isinstance(m, AttnBlock)]
    size = vqvae_config.v_patch_nums[-1]
    try:
        decode(vqvae, torch.zeros(1, vqvae_config.z_channels, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def decoder_report(model: Model, recipe: DecoderRecipe, parent: str, prunables: list[Prunable],
                   amounts: tuple[list[int], list[tuple[float, int]]], adapter: DecoderAdapter,
                   params: tuple[int, int], seconds: tuple[float, float], data: DecoderData | None) -> dict[str, Any]:
    before, targets = amounts
    after_config = dataclasses.replace(model.config.vqvae, decoder_widths=adapter.widths())
    sets = [{"name": p.name, "level": len(model.vqvae.decoder.up) - 1 - p.position, "sparsity": round(s, 4),
             "channels": [b, p.count], "groupnorm_groups": p.partitions, "consumers": list(p.consumers),
             "coupled": p.coupled} for p, b, (s, _) in zip(prunables, before, targets)]
    statistic = {"hessian": "(2/n) Σ xᵀx of each consumer conv's unfolded inputs, one pass",
                 "gradients": "MSE of the decoded images to the real ones", "weights": None}
    return {
        "parent": parent,
        "recipe": dataclasses.asdict(recipe),
        "calibration": None if data is None else {"source": data.source, "samples": len(data),
                                                  "statistics": statistic[recipe.criterion().needs]},
        "decoder_params": before_after(*params),
        "decoder_macs_per_image": {**before_after(decoder_macs(model.config.vqvae), decoder_macs(after_config)),
                                   "counted": "post_quant_conv + decoder convolutions and attention, batch 1"},
        "sets": sets,
        "decoder_widths": json.loads(json.dumps(dataclasses.asdict(after_config.decoder_plan()))),  # as written
        "seconds": {"calibration": round(seconds[0], 2), "pruning": round(seconds[1], 2),
                    "total": round(sum(seconds), 2)},
        "versions": versions(),
    }


def provenance(model: Model, recipe: DecoderRecipe, parent: str, report: dict[str, Any]) -> dict[str, Any]:
    return {"source": "evar prune-decoder", "parent": parent, "parent_provenance": model.config.provenance or None,
            "recipe": dataclasses.asdict(recipe), "decoder_widths": report["decoder_widths"],
            "decoder_params": report["decoder_params"]["after"], "report": "prune_report.json"}


def summary(report: dict[str, Any]) -> str:
    p, m = report["decoder_params"], report["decoder_macs_per_image"]
    r = report["recipe"]
    lines = [f"pruned the VQVAE decoder of {report['parent']} with {r['method']} (sparsity {r['sparsity']}, "
             f"schedule {r['schedule']})",
             f"decoder params {p['before'] / 1e6:.2f}M → {p['after'] / 1e6:.2f}M ({p['ratio'] * 100:.1f}%)   "
             f"MACs/image {m['before'] / 1e9:.2f}G → {m['after'] / 1e9:.2f}G ({m['ratio'] * 100:.1f}%)",
             "channel set                 channels"]
    lines += [f"{s['name']:<27} {s['channels'][0]:>4} → {s['channels'][1]}" for s in report["sets"]]
    t = report["seconds"]
    lines.append(f"time: calibration {t['calibration']:.1f}s, pruning {t['pruning']:.1f}s, total {t['total']:.1f}s")
    return "\n".join(lines)
