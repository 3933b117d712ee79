"""The calibration set of `evar prune`: token sequences (the model's own generations, or images through the
VQVAE), the teacher-forcing inputs made from them, and the teacher-forced cross-entropy gradients that
Taylor scores need.

The model's own sequences are sampled a mini-batch at a time; with a checkpoint the ones made so far are
saved about once a minute and a rerun samples only the rest (see `evar.prune.resume`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import evar.calibration as token_sets
from evar.calibration import GENERATED, TokenSet, generation_dtype
from evar.checkpoints import Model
from evar.prune.recipe import PruneRecipe
from evar.prune.resume import Every, PruneCheckpoint
from evar.prune.sequential import Calibration
from evar.prune.statistics import gradient_moments
from evar.samples import SamplingSettings


def null_share(labels: torch.Tensor, share: float, null: int) -> torch.Tensor:
    """Give `share` of the sequences the null label, evenly spread over the classes (sorted by class, every
    1/share-th one), so that classes with a single sample (ImageNet-size label sets) take part too."""
    out = labels.clone()
    for rank, i in enumerate(torch.argsort(labels, stable=True).tolist()):
        if int((rank + 1) * share + 1e-9) > int(rank * share + 1e-9):
            out[i] = null
    return out


def calibration(model: Model, recipe: PruneRecipe) -> Calibration:
    return teacher_forcing(model, recipe, calibration_tokens(model, recipe))


def cached_calibration(model: Model, recipe: PruneRecipe, checkpoint: PruneCheckpoint | None,
                       save_every: float = 60.0) -> Calibration:
    """The calibration set, from the checkpoint when an earlier run made it (else made and saved there)."""
    tokens = checkpoint.load_calibration() if checkpoint is not None else None
    if tokens is None:
        tokens = calibration_tokens(model, recipe, checkpoint, save_every)
        if checkpoint is not None:
            checkpoint.save_calibration(tokens)
    return teacher_forcing(model, recipe, tokens)


@torch.no_grad()
def calibration_tokens(model: Model, recipe: PruneRecipe, checkpoint: PruneCheckpoint | None = None,
                       save_every: float = 60.0) -> TokenSet:
    settings = SamplingSettings(seed=recipe.seed)
    if recipe.calib_data == GENERATED:
        return sampled(model, recipe, settings, checkpoint, save_every)
    return token_sets.token_set(model, recipe.calib_data, recipe.calib_samples, settings, recipe.seed)


def sampled(model: Model, recipe: PruneRecipe, settings: SamplingSettings, checkpoint: PruneCheckpoint | None,
            save_every: float) -> TokenSet:
    """The model's own calibration sequences, a mini-batch at a time (which bounds the KV cache: d16 with CFG
    holds ~0.18 GB per sample). With a checkpoint, those made so far are saved about every `save_every` s
    and a rerun samples only the rest: sample i is the same whichever run makes it."""
    n, batch, dtype = recipe.calib_samples, recipe.calib_batch, generation_dtype(recipe.calib_precision)
    done = checkpoint.load_samples() if checkpoint is not None else None
    parts = [] if done is None else [done]
    made, every = (0 if done is None else len(done)), Every(save_every)
    for at in tqdm(range(made, n, batch), desc="sampling calibration sequences", total=-(-n // batch),
                   initial=-(-made // batch), dynamic_ncols=True):
        parts.append(token_sets.from_generations(model, n, settings, batch, progress=False, dtype=dtype,
                                                 part=(at, min(at + batch, n))).tokens)
        if checkpoint is not None and every.due():
            checkpoint.save_samples(torch.cat(parts))
    return TokenSet(token_sets.balanced_labels(n, model.config.var.num_classes), torch.cat(parts), GENERATED)


@torch.no_grad()
def teacher_forcing(model: Model, recipe: PruneRecipe, tokens: TokenSet) -> Calibration:
    """The calibration set's labels (the null class for the unconditional share) and VAR inputs."""
    pn = model.config.var.patch_nums
    x_in = torch.cat([model.vqvae.idx_to_var_input(tokens.subset(torch.arange(s, min(s + 64, len(tokens))))
                                                    .scale_tokens(pn)) for s in range(0, len(tokens), 64)])
    labels = null_share(tokens.labels, recipe.calib_uncond, model.config.var.num_classes)
    return Calibration(labels, tokens.tokens, x_in, tokens.source)


def gradients(model: Model, calib: Calibration, layers: list[torch.nn.Linear], tokens: slice,
              batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mean gradient and mean squared mini-batch gradient of the teacher-forced cross-entropy (over `tokens`)
    for each layer's weight: the statistics Taylor scores are made of."""
    var = model.var

    def losses():
        for s in range(0, len(calib), batch):
            sl = slice(s, s + batch)
            logits = var(calib.labels[sl], calib.x_in[sl])[:, tokens]
            yield F.cross_entropy(logits.flatten(0, 1), calib.tokens[sl, tokens].flatten())

    return gradient_moments(var, [layer.weight for layer in layers], losses())
