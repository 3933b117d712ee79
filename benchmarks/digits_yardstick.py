"""What the digits yardstick can and cannot say: the floor at the sample count, the training distribution's own
distance, and whether a model copies its training digits.

    python benchmarks/digits_yardstick.py [--model NAME=REF ...] [--samples 500]   # ~1 min per model

- `real_training_digits`: Fréchet distance / precision / recall of `--samples` real training digits against the
  held-out split (the floor `evar eval` prints), and of all 1347.
- `shifted_training_copies`: the same for `--samples` of the ±1 px shifted copies `evar train` learns from
  (`--shift-augment 1`, the default): the distribution a digits VAR is trained to reproduce.
- per model (500 samples, `evar eval`'s settings, seed 0): the median distance from each sample to its nearest
  training digit (pixels and classifier features) beside the same for the held-out digits, and the copy rate:
  the share of samples nearer to a training digit than 95% of held-out digits are (held-out digits: 5% by
  construction). A model that memorises its training set drives the floor-relative numbers down while copying.
Writes benchmarks/results/digits_yardstick.json (rows merged by name).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from evar import zoo
from evar.data import from_uint8_nhwc, load_digits
from evar.eval.classifier import load_classifier, run_classifier
from evar.eval.metrics import images_baseline, real_data_baseline
from evar.files import atomic_write_json, read_json
from evar.samples import SamplingSettings, class_labels, sample_images
from evar.train import shifted_copies

OUT = Path(__file__).resolve().parent / "results" / "digits_yardstick.json"


def nearest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from every row of a to its nearest row of b (flattened, float64)."""
    return torch.cdist(a.flatten(1).double(), b.flatten(1).double()).min(1).values


def shifted_baseline(n: int) -> dict:
    train, labels = load_digits("train", 16)
    return dataclasses.asdict(images_baseline(shifted_copies(train, labels, 1)[0], n))


def copying(ref: str, n_per_class: int) -> dict:
    model = zoo.load(ref)
    images = sample_images(model, class_labels(list(range(10)), n_per_class), SamplingSettings(seed=0))
    samples = from_uint8_nhwc(images)
    train, test = load_digits("train", 16)[0], load_digits("test", 16)[0]
    clf = load_classifier()
    f_train, f_samples, f_test = (run_classifier(clf, x)[0] for x in (train, samples, test))
    held_out = nearest(test, train)
    threshold = torch.quantile(held_out, 0.05)
    return {"ref": ref, "samples": len(samples),
            "pixel_nn_median": {"samples": float(nearest(samples, train).median()), "held_out": float(held_out.median())},
            "feature_nn_median": {"samples": float(nearest(f_samples, f_train).median()),
                                  "held_out": float(nearest(f_test, f_train).median())},
            "copy_rate": float((nearest(samples, train) < threshold).double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=REF (repeatable)")
    ap.add_argument("--samples", type=int, default=500)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = read_json(OUT) if OUT.exists() else {"models": {}}
    real, everything = real_data_baseline(args.samples), real_data_baseline(10_000)
    result["real_training_digits"] = {"samples": real.samples, "frechet_distance": real.frechet_distance,
                                      "precision": real.precision, "recall": real.recall,
                                      "all_1347_frechet_distance": everything.frechet_distance}
    result["shifted_training_copies"] = shifted_baseline(args.samples)
    for spec in args.model:
        name, ref = spec.split("=", 1)
        result["models"][name] = copying(ref, args.samples // 10)
    result["load_average"], result["seconds"] = list(os.getloadavg()), round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    atomic_write_json(OUT, result)
    print(f"→ {OUT}")


if __name__ == "__main__":
    main()
