"""`evar distill-decoder`: train a pruned VQVAE decoder to reproduce the dense (teacher) decoder's images.

Inputs are f_hat: of the teacher's own generations (what the decoder decodes at inference) or of images
through the encoder and the quantizer. The loss is pixel (MSE + L1 to the teacher's image) plus, for
16-pixel digits models, the distance between the digit classifier's features of the two images (the
features `evar eval` measures its Fréchet distance in). Only the student's decoder trains; its VAR, encoder
and quantizer are written out unchanged. The loop is EVAR's training loop (`evar.train`): AdamW, warm-up
+ cosine, `train_log.jsonl`, a checkpoint every `ckpt_every` steps in OUT.partial/, and a rerun of the same
command resumes to the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evar import zoo
from evar.checkpoints import Model, save_model_dir
from evar.config import ModelConfig
from evar.errors import EvarError
from evar.files import atomic_dir, atomic_write_bytes, atomic_write_json
from evar.models.vqvae import VQVAE
from evar.prune.decoder import decode, decoder_data
from evar.prune.resume import PruneCheckpoint
from evar.train import LOG_FILE, Schedule, draw_batch

try:
    from evar.train import run_training
except ImportError:  # the loop's name before its rename in evar.train; EVAR's pruning imports it only here
    from evar.train import _run as run_training

RUN_FILE, PLOT_FILE = "run.json", "loss.png"


@dataclass(frozen=True)
class DecoderDistillRecipe:
    data: str = "teacher"  # f_hat of the teacher's own generations, or of 'digits' / an image folder
    samples: int = 1024
    feature_weight: float = 1.0  # classifier-feature loss (16-pixel digits models only)
    schedule: Schedule = Schedule(steps=800, batch_size=32, lr=1e-3, weight_decay=0.0, warmup=50,
                                  ckpt_every=250, seed=0)

    def validate(self) -> None:
        s = self.schedule
        for name, value in (("--samples", self.samples), ("--steps", s.steps), ("--batch-size", s.batch_size),
                            ("--ckpt-every", s.ckpt_every)):
            if value < 1:
                raise EvarError(f"{name} must be >= 1, got {value}")
        if s.lr <= 0 or self.feature_weight < 0:
            raise EvarError(f"--lr must be > 0 and --feature-weight >= 0, got {s.lr} and {self.feature_weight}")


def check_pair(teacher: Model, student: Model) -> None:
    """The student must be the teacher with another decoder: same tokenizer otherwise."""
    t, s = (dataclasses.replace(m.config.vqvae, decoder_widths=None) for m in (teacher, student))
    if t != s:
        changed = [f.name for f in dataclasses.fields(t) if getattr(t, f.name) != getattr(s, f.name)]
        raise EvarError(f"the student's VQVAE is not the teacher's with another decoder ({', '.join(changed)} differ)")


def digit_features(vqvae: VQVAE) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The frozen digit classifier's features, for models of its image size (else None: pixel loss only)."""
    from evar.eval.classifier import IMAGE_SIZE, load_classifier

    if vqvae.cfg.image_size != IMAGE_SIZE:
        return None
    classifier = load_classifier().eval().requires_grad_(False)
    return lambda images: classifier.features(images.clamp(-1, 1))


@torch.no_grad()
def teacher_images(teacher: VQVAE, f_hat: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The teacher decoder's raw images of every f_hat, made once (each is a target many times over; 0.8 MB
    per image at 256 px)."""
    return torch.cat([decode(teacher, f_hat[s:s + batch]) for s in range(0, len(f_hat), batch)])


class DecoderLoss:
    """One step's loss: the teacher's images of a batch of f_hat against the student's."""

    def __init__(self, student: VQVAE, f_hat: torch.Tensor, targets: torch.Tensor, recipe: DecoderDistillRecipe,
                 features: Callable[[torch.Tensor], torch.Tensor] | None):
        self.student, self.f_hat, self.targets, self.recipe, self.features = student, f_hat, targets, recipe, features

    def __call__(self, gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        pick = draw_batch(len(self.f_hat), self.recipe.schedule.batch_size, gen)
        target = self.targets[pick]
        image = decode(self.student, self.f_hat[pick])
        pixel = F.mse_loss(image, target) + F.l1_loss(image, target)
        out = {"loss": pixel, "pixel": pixel.detach()}
        if self.features is not None and self.recipe.feature_weight > 0:
            with torch.no_grad():
                wanted = self.features(target)
            feature = F.mse_loss(self.features(image), wanted)
            out.update(loss=pixel + self.recipe.feature_weight * feature, feature=feature.detach())
        return out


def distill_decoder(teacher_ref: str, student_ref: str, out: str | Path, recipe: DecoderDistillRecipe,
                    var_ckpt: str | Path | None = None, vae_ckpt: str | Path | None = None) -> Path:
    """Train `student_ref`'s decoder on `teacher_ref`'s; write the student as a model directory at `out`."""
    t0, out = time.perf_counter(), Path(out)
    recipe.validate()
    teacher, student = zoo.load(teacher_ref, var_ckpt, vae_ckpt), zoo.load(student_ref)
    check_pair(teacher, student)
    record = {"teacher": teacher_ref, "student": student_ref, "recipe": json.loads(json.dumps(dataclasses.asdict(recipe)))}
    partial = PruneCheckpoint(PruneCheckpoint.beside(out), record)
    claim(partial.dir, record)
    data = decoder_data(teacher, recipe.data, recipe.samples, recipe.schedule.seed, partial)
    features = digit_features(student.vqvae)
    teacher.vqvae.eval().requires_grad_(False)
    student.vqvae.eval().requires_grad_(False)
    decoder = student.vqvae.decoder.train().requires_grad_(True)
    loss = DecoderLoss(student.vqvae, data.f_hat, teacher_images(teacher.vqvae, data.f_hat), recipe, features)
    run_training(partial.dir, recipe.schedule, list(decoder.parameters()), {"decoder": decoder}, loss, "distill-decoder")
    rows = [json.loads(r) for r in (partial.dir / LOG_FILE).read_text().splitlines() if r]
    provenance = {"source": "evar distill-decoder", "teacher": teacher_ref, "parent": student_ref,
                  "recipe": record["recipe"], "data": {"source": data.source, "samples": len(data)},
                  "feature_loss": features is not None and recipe.feature_weight > 0,
                  "final": {k: round(v, 6) for k, v in rows[-1].items() if k in ("step", "loss", "pixel", "feature")},
                  "seconds": round(time.perf_counter() - t0, 1), "parent_provenance": student.config.provenance}
    write_output(out, Model(ModelConfig(student.config.var, student.config.vqvae, provenance), student.var,
                            student.vqvae.eval()), partial.dir, rows, f"{student_ref} ← {teacher_ref} (decoder)")
    partial.remove()
    return out


def claim(partial: Path, record: dict[str, Any]) -> None:
    """Start a run in OUT.partial/, or continue one made with the same settings (never mix two)."""
    path = partial / RUN_FILE
    if path.exists() and json.loads(path.read_text()) != record:
        raise EvarError(f"{partial} holds an unfinished run with other settings; rerun it with the same flags, "
                        "or delete it to start over")
    atomic_write_json(path, record)


def write_output(out: Path, model: Model, partial: Path, rows: list[dict[str, Any]], title: str) -> None:
    from evar.distill.trainer import loss_plot

    with warnings.catch_warnings():  # its second panel (KD per scale) has nothing to show for a decoder
        warnings.simplefilter("ignore", UserWarning)
        plot = loss_plot([{**r, "task": r["pixel"]} for r in rows], title)  # 'task': the pixel loss
    with atomic_dir(out) as tmp:
        save_model_dir(model, tmp)
        atomic_write_bytes(tmp / LOG_FILE, (partial / LOG_FILE).read_bytes())
        atomic_write_bytes(tmp / PLOT_FILE, plot)
