"""Training a pixel-space DiT on a labelled image set (how `builtin:dit-digits` was made).

EVAR's training loop (`evar.train`: AdamW, warm-up + cosine, clipping, resumable `train_state.pt`) with
DiT's noise-prediction loss, label dropout for classifier-free guidance, and an exponential moving average
of the weights (what DiT samples with), itself part of the resumable state.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from evar import train as training
from evar.data import load_images
from evar.dit.checkpoint import DiTModel, save_dit_dir
from evar.dit.diffusion import diffusion_loss
from evar.dit.model import DiT, DiTConfig
from evar.errors import EvarError


@dataclass(frozen=True)
class DiTTraining:
    data: str = "digits"
    schedule: training.Schedule = training.Schedule(steps=3000, batch_size=64, lr=1e-3, weight_decay=0.0)
    ema_decay: float = 0.999
    shift_augment: int = 1  # also train on copies shifted by up to this many pixels

    def validate(self) -> None:
        if not 0.0 <= self.ema_decay < 1.0:
            raise EvarError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.schedule.steps < 1 or self.schedule.batch_size < 1:
            raise EvarError("--steps and --batch-size must be >= 1")


def digits_dit_config() -> DiTConfig:
    """builtin:dit-digits: 16×16 digits in pixel space, patch 4 (16 tokens: the digits are 8×8 upsampled, and a
    2-pixel patch costs 5× the training time on 2 CPU cores), 4 blocks of width 96 with 6 heads of 16, predicting v
    (a noise-predicting model this small gives no usable image estimate at high noise: its samples are blobs)."""
    return DiTConfig.uniform(depth=4, hidden_size=96, heads=6, input_size=16, patch_size=4, in_channels=3,
                             num_classes=10, prediction="v")


@torch.no_grad()
def ema_update(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p, 1.0 - decay)


def train_dit(job: DiTTraining, out: str | Path, config: DiTConfig | None = None) -> Path:
    """Train on `job.data`'s train split; write the EMA weights as a DiT model directory to `out/model`."""
    job.validate()
    out = Path(out)
    config = config or digits_dit_config()
    images, labels = load_images(job.data, "train", config.input_size)
    if images.shape[1] != config.in_channels:
        raise EvarError(f"data has {images.shape[1]} channels but the DiT takes {config.in_channels}")
    if int(labels.max()) >= config.num_classes:
        raise EvarError(f"data has {int(labels.max()) + 1} classes but the DiT has {config.num_classes}")
    images, labels = training.shifted_copies(images, labels, job.shift_augment)
    torch.manual_seed(job.schedule.seed)
    dit = DiT(config).train()
    ema = copy.deepcopy(dit).eval().requires_grad_(False)

    def loss_fn(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        if step:  # the average of the weights after steps 0 .. step-1
            ema_update(ema, dit, job.ema_decay)
        pick = training.draw_batch(len(images), job.schedule.batch_size, gen)
        lab = training.drop_labels(labels[pick], config.class_dropout_prob, config.num_classes, gen)
        return {"loss": diffusion_loss(dit, images[pick], lab, gen)}

    training._run(out / "work", job.schedule, [p for p in dit.parameters() if p.requires_grad],
                  {"dit": dit, "ema": ema}, loss_fn, "dit")
    ema_update(ema, dit, job.ema_decay)  # the last step's weights
    recipe = {"kind": "DiTTraining", **json.loads(json.dumps(dataclasses.asdict(job)))}
    return save_dit_dir(DiTModel(config, ema, {"source": "evar train-dit", "recipe": recipe}), out / "model")
