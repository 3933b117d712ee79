"""Training a ViT classifier on a labelled image set (how `builtin:vit-digits` was made).

EVAR's training loop (`evar.train._run`: AdamW, warm-up + cosine, clipping, resumable `train_state.pt`) with
cross-entropy on class logits, on the train split and its copies shifted by up to `shift_augment` pixels;
top-1 on the held-out split (digits 'test') is measured at the end and recorded in the provenance.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from evar import train as training
from evar.data import load_images
from evar.errors import EvarError
from evar.vit.checkpoint import ViTModel, save_vit_dir
from evar.vit.model import ViTConfig, VisionTransformer


@dataclass(frozen=True)
class ViTTraining:
    data: str = "digits"
    schedule: training.Schedule = training.Schedule(steps=3000, batch_size=64, lr=1e-3, weight_decay=0.05)
    shift_augment: int = 1
    label_smoothing: float = 0.1

    def validate(self) -> None:
        if self.schedule.steps < 1 or self.schedule.batch_size < 1:
            raise EvarError("--steps and --batch-size must be >= 1")
        if self.shift_augment < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise EvarError("--shift-augment must be >= 0 and --label-smoothing in [0, 1)")


def digits_vit_config() -> ViTConfig:
    """builtin:vit-digits: 16×16 digits, patch 4 (16 patch tokens + the class token), width 64, 4 blocks of
    4 heads, MLP 256: every Linear in the blocks has an input width divisible by 4 (2:4 groups)."""
    return ViTConfig(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                     mlp_dim=256)


@torch.no_grad()
def top1(vit: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    vit.eval()
    hits = sum(int((vit(images[i:i + batch]).argmax(-1) == labels[i:i + batch]).sum())
               for i in range(0, len(images), batch))
    return hits / max(1, len(images))


def held_out(data: str, size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The digits test split; an image folder has no split, so it is scored on its training images."""
    split = "test" if data == "digits" else "train"
    images, labels = load_images(data, split, size)
    return images, labels, split


def train_vit(job: ViTTraining, out: str | Path, config: ViTConfig | None = None) -> Path:
    """Train on `job.data`'s train split; write the ViT model directory to `out/model`."""
    job.validate()
    out, config = Path(out), config or digits_vit_config()
    images, labels = load_images(job.data, "train", config.img_size)
    if images.shape[1] != config.in_chans:
        raise EvarError(f"data has {images.shape[1]} channels but the ViT takes {config.in_chans}")
    if int(labels.max()) >= config.num_classes:
        raise EvarError(f"data has {int(labels.max()) + 1} classes but the ViT has {config.num_classes}")
    images, labels = training.shifted_copies(images, labels, job.shift_augment)
    torch.manual_seed(job.schedule.seed)
    vit = VisionTransformer(config).train()

    def loss_fn(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        pick = training.draw_batch(len(images), job.schedule.batch_size, gen)
        logits = vit(images[pick])
        acc = (logits.argmax(-1) == labels[pick]).float().mean()
        return {"loss": F.cross_entropy(logits, labels[pick], label_smoothing=job.label_smoothing),
                "acc": acc.detach()}

    training._run(out / "work", job.schedule, list(vit.parameters()), {"vit": vit}, loss_fn, "vit")
    test_images, test_labels, split = held_out(job.data, config.img_size)
    recipe = {"kind": "ViTTraining", **json.loads(json.dumps(dataclasses.asdict(job)))}
    provenance = {"source": "evar train-vit", "recipe": recipe,
                  "top1": {"split": split, "images": len(test_labels),
                           "accuracy": round(top1(vit, test_images, test_labels), 6)}}
    return save_vit_dir(ViTModel(config, vit.eval(), provenance), out / "model")
