"""`evar eval`: generate a fixed, seeded sample set from a digits model and score it."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from evar.checkpoints import Model
from evar.errors import EvarError
from evar.eval.classifier import IMAGE_SIZE, NUM_CLASSES
from evar.eval.metrics import evaluate_digits
from evar.samples import SamplingSettings, class_labels, sample_images


def check_digits_model(model: Model) -> None:
    c = model.config
    if c.var.num_classes != NUM_CLASSES or c.vqvae.image_size != IMAGE_SIZE:
        raise EvarError(
            f"evar eval scores digits models ({NUM_CLASSES} classes, {IMAGE_SIZE}px); this model has "
            f"{c.var.num_classes} classes at {c.vqvae.image_size}px"
        )


def evaluate_model(model: Model, settings: SamplingSettings, per_class: int = 50, source: str = "",
                   sample: Callable[..., np.ndarray] = sample_images) -> dict[str, Any]:
    """Class accuracy and Fréchet distance of `per_class` samples of every digit (same seed → same report).
    `sample(model, labels, settings)` makes the images: VAR's sampler, or another family's (a DD student's)."""
    check_digits_model(model)
    labels = class_labels(list(range(NUM_CLASSES)), per_class)
    t0 = time.perf_counter()
    images = sample(model, labels, settings)
    quality = evaluate_digits(images, labels.numpy())
    return {"model": source, "sampling": dataclasses.asdict(settings), "quality": quality.to_dict(),
            "params": sum(p.numel() for p in _network(model).parameters()), "seconds": round(time.perf_counter() - t0, 2)}


def _network(model: Any) -> Any:
    """The generating network: a VAR's transformer, or a DD model's student."""
    return model.student if hasattr(model, "student") else model.var


