"""Distilled Decoding on builtin:digits: one step, two steps and teacher-involved against the 6-scale teacher.

    python benchmarks/dd_digits.py [--model builtin:digits-dd] [--teacher builtin:digits] [--seeds 1,2,3]

For every setting, `evar eval`'s report (50 samples per digit, cfg 1.5, top-k 900, top-p 0.96 for the teacher's
scales) over several seeds: class accuracy and the Fréchet distance to held-out digits, mean ± std, and the FD
ratio to the teacher's. Seed 0 is left out: the student's training pairs were made from seed 0's noise.
Also the wall time per image of each setting (measured in this run, settings alternated; the machine is
shared, so the load average is recorded) and the pair-generation and training times from the model's
provenance. Writes benchmarks/results/dd_digits.json, dd_digits.png (quality) and dd_digits_grid.png
(one row per digit: teacher | 1 step | 2 steps | teacher-involved).

Acceptance (issue 14): 1 step class accuracy >= 95% and FD <= 2x the teacher's; 2 steps FD <= 1.5x;
one teacher-involved setting FD <= 1.2x.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from evar import zoo
from evar.dd.pairs import weights_sha256
from evar.dd.sampler import DDRequest, load_sampler
from evar.files import atomic_write_bytes, atomic_write_json, figure_png
from evar.quality import evaluate_model
from evar.samples import SamplingSettings, class_labels, grid_image, save_png

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"1 step": 2.0, "2 steps": 1.5, "teacher-involved": 1.2}


def settings_table(teacher: str, teacher_scales: list[str]) -> list[tuple[str, DDRequest | None]]:
    rows = [("teacher (6 scales)", None), ("1 step", DDRequest(t_list="0")), ("2 steps", DDRequest(steps=2))]
    rows += [(f"teacher-involved (teacher scales {s})", DDRequest(teacher=teacher, teacher_scales=s))
             for s in teacher_scales]
    return rows


def quality(ref: str, request: DDRequest | None, seeds: list[int], per_class: int, cache: Path | None = None) -> dict:
    """Over seeds; the teacher's rows can be cached in `cache` (they do not depend on the student)."""
    model, sample = load_sampler(ref, None, None, request or DDRequest())
    key = {"ref": ref, "per_class": per_class, "seeds": seeds, "weights_sha256": weights_sha256(model.var)} \
        if cache is not None else None
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return saved["quality"]
    runs = [evaluate_model(model, SamplingSettings(seed=s), per_class, source=ref, sample=sample)["quality"]
            for s in seeds]
    acc = [r["class_accuracy"] for r in runs]
    fd = [r["frechet_distance"] for r in runs]
    q = {"seeds": seeds, "class_accuracy": acc, "frechet_distance": fd,
         "class_accuracy_mean": round(statistics.mean(acc), 4), "frechet_mean": round(statistics.mean(fd), 2),
         "frechet_std": round(statistics.stdev(fd), 2) if len(fd) > 1 else 0.0,
         "real_data_floor": runs[0]["real_data_floor"]}
    if cache is not None:
        atomic_write_json(cache, {"key": key, "quality": q})
    return q


def timings(rows, model_ref: str, teacher: str, repeats: int = 3, n: int = 64) -> dict[str, float]:
    """Milliseconds per image (batch of n, decoder included), settings alternated `repeats` times."""
    samplers = {name: load_sampler(model_ref if req else teacher, None, None, req or DDRequest())
                for name, req in rows}
    labels = class_labels(list(range(10)), -(-n // 10))[:n]
    times: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(repeats):
        for name, (model, sample) in samplers.items():
            t0 = time.perf_counter()
            sample(model, labels, SamplingSettings(seed=7), n)
            times[name].append((time.perf_counter() - t0) * 1e3 / n)
    return {name: round(min(v), 2) for name, v in times.items()}


def grid(rows, model_ref: str, teacher: str, path: Path) -> None:
    """One row per digit: 4 images of each setting side by side (seed 1)."""
    labels = class_labels(list(range(10)), 4)
    blocks = []
    for name, req in rows[:4]:
        model, sample = load_sampler(model_ref if req else teacher, None, None, req or DDRequest())
        blocks.append(sample(model, labels, SamplingSettings(seed=1)).reshape(10, 4, *sample_shape(model)))
    gap = np.full((10, 1, *blocks[0].shape[2:]), 255, dtype=np.uint8)
    tiled = np.concatenate([x for b in blocks for x in (b, gap)][:-1], axis=1)  # (10, 4*k + k-1, H, W, 3)
    save_png(grid_image(tiled.reshape(-1, *tiled.shape[2:]), tiled.shape[1], scale=4), path)


def sample_shape(model) -> tuple[int, int, int]:
    size = model.config.vqvae.image_size
    return size, size, 3


def plot(result: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"].replace("teacher-involved (teacher scales ", "teacher-involved\n(scales ").replace(" (6", "\n(6")
             for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    fd = [r["quality"]["frechet_mean"] for r in rows]
    a.bar(names, fd, yerr=[r["quality"]["frechet_std"] for r in rows], color="tab:blue", capsize=4)
    t = rows[0]["quality"]["frechet_mean"]
    for label, ratio in TARGETS.items():
        a.axhline(t * ratio, ls=":", lw=1, color="gray")
        a.text(len(rows) - 0.5, t * ratio, f"{ratio}× teacher", fontsize=7, va="bottom", ha="right", color="gray")
    a.set(ylabel="Fréchet distance (lower is better)", title=f"FD, mean ± std over seeds {rows[0]['quality']['seeds']}")
    b.bar(names, [100 * r["quality"]["class_accuracy_mean"] for r in rows], color="tab:green")
    b.axhline(95, ls=":", color="gray", lw=1)
    b.set(ylim=(80, 100.5), ylabel="class accuracy (%)", title="class accuracy")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Distilled Decoding on builtin:digits", fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:digits-dd")
    ap.add_argument("--teacher", default="builtin:digits")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--teacher-scales", default="4;0,1,2,3,4", help="teacher-involved settings, ';'-separated")
    ap.add_argument("--teacher-cache", type=Path, default=Path("runs/dd_digits_teacher.json"),
                    help="the teacher's quality rows, reused when they were made with the same seeds")
    ap.add_argument("--teacher-only", action="store_true", help="only compute (and cache) the teacher's rows")
    args = ap.parse_args()
    if args.teacher_only:
        print(quality(args.teacher, None, [int(s) for s in args.seeds.split(",")], args.per_class, args.teacher_cache))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = settings_table(args.teacher, args.teacher_scales.split(";"))
    t0 = time.perf_counter()
    out_rows = []
    for name, req in rows:
        ref = args.model if req else args.teacher
        q = quality(ref, req, seeds, args.per_class, None if req else args.teacher_cache)
        out_rows.append({"name": name, "model": ref, "request": None if req is None else vars(req), "quality": q})
        print(f"{name}: acc {q['class_accuracy_mean']:.3f}, FD {q['frechet_mean']} ± {q['frechet_std']}", flush=True)
    teacher_fd = out_rows[0]["quality"]["frechet_mean"]
    for r in out_rows:
        r["fd_ratio_to_teacher"] = round(r["quality"]["frechet_mean"] / teacher_fd, 3)
    ms = timings(rows, args.model, args.teacher)
    for r in out_rows:
        r["ms_per_image"] = ms[r["name"]]
    dd = zoo.load_family(args.model, ("dd",))
    prov = dd.provenance
    involved = [r for r in out_rows if r["name"].startswith("teacher-involved")]
    acceptance = {
        "1 step: accuracy >= 95% and FD <= 2x": out_rows[1]["quality"]["class_accuracy_mean"] >= 0.95
        and out_rows[1]["fd_ratio_to_teacher"] <= 2.0,
        "2 steps: FD <= 1.5x": out_rows[2]["fd_ratio_to_teacher"] <= 1.5,
        "a teacher-involved setting: FD <= 1.2x": any(r["fd_ratio_to_teacher"] <= 1.2 for r in involved),
    }
    result = {
        "format": "evar-benchmark", "benchmark": "dd_digits", "model": args.model, "teacher": args.teacher,
        "rows": out_rows, "acceptance": acceptance,
        "pairs": {"samples": prov.get("pairs_record", {}).get("recipe", {}).get("samples"),
                  "seconds": prov.get("pairs_record", {}).get("seconds")},
        "training": {"steps": prov.get("recipe", {}).get("schedule", {}).get("steps"),
                     "seconds": prov.get("run", {}).get("train_seconds")},
        "recorded_times": prov.get("times"),  # the shipped model's own account (pairs made in two runs)
        "teacher_var_sha256": prov.get("teacher_var_sha256"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average": os.getloadavg(), "threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "dd_digits.json", result)
    atomic_write_bytes(RESULTS / "dd_digits.png", plot(result))
    grid(rows, args.model, args.teacher, RESULTS / "dd_digits_grid.png")
    for k, v in acceptance.items():
        print(f"{'PASS' if v else 'FAIL'}  {k}")


if __name__ == "__main__":
    main()
