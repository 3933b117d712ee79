"""`evar distill-dit`: a pruned DiT learns to predict the dense teacher's noise estimates.

The student sees what the teacher sees at inference: images of the data set noised at timesteps over the
whole schedule, with labels dropped at the training rate (so the unconditional half that guidance uses is
distilled too), and regresses the teacher's output. EVAR's resumable training loop; the work folder
(`OUT/work`) holds the state a rerun continues from.
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
from evar.dit.checkpoint import DiTModel, save_dit_dir
from evar.dit.diffusion import alphas_cumprod, q_sample
from evar.errors import EvarError


@dataclass(frozen=True)
class DiTDistillation:
    data: str = "digits"
    schedule: training.Schedule = training.Schedule(steps=600, batch_size=64, lr=3e-4, weight_decay=0.0, warmup=50,
                                                    ckpt_every=200)
    shift_augment: int = 1


def check_pair(teacher: DiTModel, student: DiTModel) -> None:
    t, s = teacher.config, student.config
    same = ("input_size", "patch_size", "in_channels", "hidden_size", "num_classes", "learn_sigma", "diffusion_steps")
    bad = [f for f in same if getattr(t, f) != getattr(s, f)]
    if bad:
        raise EvarError(f"the student is not a pruned copy of the teacher: {', '.join(bad)} differ")


def distill_dit(teacher: DiTModel, student: DiTModel, job: DiTDistillation, out: str | Path,
                parent: str = "") -> Path:
    check_pair(teacher, student)
    out = Path(out)
    cfg = teacher.config
    images, labels = load_images(job.data, "train", cfg.input_size)
    images, labels = training.shifted_copies(images, labels, job.shift_augment)
    abar = alphas_cumprod(cfg.diffusion_steps)
    teacher.dit.eval().requires_grad_(False)
    dit = student.dit.train()

    def loss_fn(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        pick = training.draw_batch(len(images), job.schedule.batch_size, gen)
        lab = training.drop_labels(labels[pick], cfg.class_dropout_prob, cfg.num_classes, gen)
        t = torch.randint(0, cfg.diffusion_steps, (len(pick),), generator=gen)
        x_t = q_sample(images[pick], t, torch.randn(images[pick].shape, generator=gen), abar)
        with torch.no_grad():
            target = teacher.dit(x_t, t, lab)
        return {"loss": F.mse_loss(dit(x_t, t, lab), target)}

    training._run(out / "work", job.schedule, [p for p in dit.parameters() if p.requires_grad], {"dit": dit},
                  loss_fn, "distill-dit")
    recipe = {"kind": "DiTDistillation", **json.loads(json.dumps(dataclasses.asdict(job)))}
    provenance = {**student.provenance, "distilled": {"teacher": parent, "recipe": recipe}}
    return save_dit_dir(DiTModel(student.config, dit.eval(), provenance), out / "model")
