"""Distillation on builtin:digits pruned 40% with OBS: does KD bring the pruned model back to the teacher?

    python benchmarks/distill_digits.py [--work runs/bench_distill] [--modes normal,scale_aware,both]

Stages (each skipped if its output exists, so a rerun resumes): prune (`evar.prune`, 40%, OBS, defaults),
then `evar distill --kd MODE` with every other flag at its default (timed as a user runs it, process
start included), then `evar eval`'s report (default sampling, 50 samples per digit) for the teacher, the
pruned model and every distilled one. Writes benchmarks/results/distill_digits.json and .png.

Acceptance (issue 4): the default recipe, within 10 minutes on this machine, brings class accuracy to
within 3 points of the teacher and the Fréchet distance to at most 1.15x the teacher's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evar import zoo
from evar.calibration import token_set
from evar.checkpoints import Model, is_model_dir
from evar.data import from_uint8_nhwc
from evar.distill import defaults
from evar.distill.losses import per_scale_means, token_kl
from evar.distill.trainer import teacher_forcing_inputs
from evar.eval.classifier import DEFAULT_PATH as CLASSIFIER_PATH
from evar.eval.classifier import load_classifier, run_classifier
from evar.eval.metrics import frechet_distance
from evar.files import atomic_write_bytes, atomic_write_json, figure_png
from evar.prune import PruneRecipe, prune_model, save_pruned
from evar.quality import evaluate_model
from evar.samples import SamplingSettings, class_labels, sample_images

TEACHER = "builtin:digits"
SPARSITY, METHOD = 0.4, "obs"
RESULTS = Path(__file__).resolve().parent / "results"
TIME_BUDGET_S, ACC_POINTS, FD_RATIO = 600, 3.0, 1.15
EVAL_SEEDS = (0, 1, 2)
HELD_OUT_SAMPLES, HELD_OUT_SEED = 512, 12345  # distillation data uses seed 0
TEACHER_FD_PER_CLASS, TEACHER_FD_SEED = 100, 100


def prune(work: Path) -> Path:
    out = work / "pruned"
    if not is_model_dir(out):
        result = prune_model(zoo.load(TEACHER), PruneRecipe(sparsity=SPARSITY, method=METHOD), parent=TEACHER)
        save_pruned(result, out)
    return out


def distill(work: Path, student: Path, mode: str) -> tuple[Path, float]:
    """`evar distill` as a user runs it (process start included); returns the model dir and its wall time."""
    out, timing = work / f"distill_{mode}", work / f"distill_{mode}.seconds"
    if is_model_dir(out) and timing.is_file():
        return out, float(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    beside = Path(sys.executable).parent / "evar"  # the venv's console script, whether or not it is activated
    cmd = [str(beside) if beside.exists() else shutil.which("evar") or "evar", "distill", "--teacher", TEACHER, "--student", str(student),
           "--out", str(out), "--kd", mode]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    timing.write_text(f"{seconds:.1f}\n")
    return out, seconds


def quality(ref: str) -> dict:
    """`evar eval`'s report (seed 0, the acceptance numbers), plus seeds 1 and 2 to show the sampling noise."""
    model = zoo.load(ref)
    runs = [evaluate_model(model, SamplingSettings(seed=seed), per_class=50, source=ref) for seed in EVAL_SEEDS]
    q = runs[0]["quality"]
    accs = [r["quality"]["class_accuracy"] for r in runs]
    fds = [r["quality"]["frechet_distance"] for r in runs]
    return {"class_accuracy": q["class_accuracy"], "frechet_distance": q["frechet_distance"],
            "real_data_floor": q["real_data_floor"], "params": runs[0]["params"],
            "over_seeds": {"seeds": list(EVAL_SEEDS), "class_accuracy": accs, "frechet_distance": fds,
                           "frechet_mean": round(statistics.mean(fds), 2),
                           "frechet_std": round(statistics.stdev(fds), 2)}}


@torch.no_grad()
def teacher_agreement(refs: list[str]) -> dict[str, dict]:
    """How close each model is to the teacher, not to real digits (what distillation aims at).

    - KL(teacher ‖ model) per token (T = 1), teacher-forced on fresh teacher samples the distillation
      never saw: far less noisy than sample-based scores;
    - the Fréchet distance between the model's samples (seed 0) and the teacher's (another seed): the
      teacher itself scores the sampling-noise floor.
    """
    teacher = zoo.load(TEACHER)
    held = token_set(teacher, "teacher", HELD_OUT_SAMPLES, SamplingSettings(0.0, 0, 0.0, seed=HELD_OUT_SEED))
    x = teacher_forcing_inputs(teacher, held.tokens)
    t_logits = teacher.var(held.labels, x)
    labels = class_labels(list(range(10)), TEACHER_FD_PER_CLASS)
    teacher_feats = sample_features(teacher, labels, TEACHER_FD_SEED)
    out = {}
    for ref in refs:
        model = zoo.load(ref)
        kl = token_kl(model.var(held.labels, x), t_logits, 1.0)
        per_scale = per_scale_means(kl, teacher.config.var.scale_ranges()).tolist()
        fd = frechet_distance(sample_features(model, labels, 0), teacher_feats)
        out[ref] = {"kl_to_teacher": round(kl.mean().item(), 5), "kl_per_scale": [round(v, 5) for v in per_scale],
                    "frechet_to_teacher_samples": round(fd, 2)}
    return out


def sample_features(model: Model, labels: torch.Tensor, seed: int) -> np.ndarray:
    """Classifier features of the model's samples (`evar eval`'s sampling settings, another seed)."""
    classifier = load_classifier(CLASSIFIER_PATH)
    images = sample_images(model, labels, SamplingSettings(seed=seed), progress=False)
    return run_classifier(classifier, from_uint8_nhwc(images))[0].numpy()


def loss_curve(model_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(r) for r in (model_dir / "train_log.jsonl").read_text().splitlines() if r]
    return [(r["step"], r["loss"], r["kd"]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench_distill"))
    ap.add_argument("--modes", default="normal,scale_aware,both")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the saved JSON and training logs")
    args = ap.parse_args()
    if args.plot_only:
        rows = json.loads((RESULTS / "distill_digits.json").read_text())["rows"]
        curves = {r["kd"]: loss_curve(Path(r["model"])) for r in rows if "kd" in r}
        atomic_write_bytes(RESULTS / "distill_digits.png", plot(rows, curves))
        return
    args.work.mkdir(parents=True, exist_ok=True)

    pruned = prune(args.work)
    rows = [{"name": "teacher", "model": TEACHER, **quality(TEACHER)},
            {"name": f"pruned {SPARSITY:.0%} {METHOD.upper()}", "model": str(pruned), **quality(str(pruned))}]
    curves = {}
    for mode in args.modes.split(","):
        out, seconds = distill(args.work, pruned, mode)
        prov = json.loads((out / "config.json").read_text())["provenance"]
        rows.append({"name": f"pruned + {mode} KD", "model": str(out), "kd": mode, **quality(str(out)),
                     "distill_wall_seconds": round(seconds, 1), "train_seconds": prov["run"]["train_seconds"],
                     "default_kd": mode == defaults.KD})
        curves[mode] = loss_curve(out)

    agreement = teacher_agreement([row["model"] for row in rows])
    teacher = rows[0]
    for row in rows:
        row.update(agreement[row["model"]])
        row["accuracy_gap_points"] = round((teacher["class_accuracy"] - row["class_accuracy"]) * 100, 2)
        row["frechet_ratio"] = round(row["frechet_distance"] / teacher["frechet_distance"], 3)
        if "kd" in row:
            row["meets_acceptance"] = (row["accuracy_gap_points"] <= ACC_POINTS and row["frechet_ratio"] <= FD_RATIO
                                       and row["distill_wall_seconds"] <= TIME_BUDGET_S)
    report = {
        "benchmark": "distill_digits", "teacher": TEACHER, "pruning": {"sparsity": SPARSITY, "method": METHOD},
        "distill_defaults": {k: v for k, v in vars(defaults).items() if k.isupper()},
        "eval": {"sampling": dataclasses.asdict(SamplingSettings()), "per_class": 50},
        "acceptance": {"accuracy_within_points": ACC_POINTS, "frechet_ratio_at_most": FD_RATIO,
                       "wall_seconds_at_most": TIME_BUDGET_S},
        "rows": rows,
        "teacher_agreement": {
            "kl_to_teacher": f"per-token KL(teacher || model) at T=1, teacher-forced on {HELD_OUT_SAMPLES} unguided "
                             f"teacher samples (seed {HELD_OUT_SEED}; the distillation data is seed 0)",
            "frechet_to_teacher_samples": f"{TEACHER_FD_PER_CLASS * 10} samples of the model (seed 0) vs as many of "
                                          f"the teacher (seed {TEACHER_FD_SEED}), `evar eval` sampling"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "command": "python benchmarks/distill_digits.py",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "distill_digits.json", report)
    atomic_write_bytes(RESULTS / "distill_digits.png", plot(rows, curves))
    for row in rows:
        seeds = row["over_seeds"]
        print(f"{row['name']:<26} acc {row['class_accuracy'] * 100:5.1f}%  FD {row['frechet_distance']:6.2f} "
              f"(x{row['frechet_ratio']:.2f}; seeds 0-2 {seeds['frechet_mean']:.1f}±{seeds['frechet_std']:.1f})  "
              f"KL→teacher {row['kl_to_teacher']:.4f}  FD→teacher {row['frechet_to_teacher_samples']:.1f}"
              + (f"  {row['distill_wall_seconds']:.0f}s" if "kd" in row else ""))
    print(f"→ {RESULTS / 'distill_digits.json'}, {RESULTS / 'distill_digits.png'}")


def plot(rows: list[dict], curves: dict[str, list[tuple]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"].replace(" + ", "\n+ ").replace(" 40%", "\n40%").replace(" KD", "\nKD") for r in rows]
    xs = list(range(len(rows)))
    colors = ["#444444", "#c44e52"] + ["#4c72b0"] * (len(rows) - 2)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    (acc_ax, fd_ax, fdt_ax), (kl_ax, scale_ax, kd_ax) = axes
    acc = [r["class_accuracy"] * 100 for r in rows]
    fd = [r["frechet_distance"] for r in rows]
    acc_ax.bar(xs, acc, color=colors)
    acc_ax.axhline(acc[0] - ACC_POINTS, ls="--", c="k", lw=1, label=f"teacher − {ACC_POINTS:g} points")
    acc_ax.set(ylabel="class accuracy (%)", ylim=(max(0, min(acc) - 10), 100.5), title="class accuracy (`evar eval`)")
    fd_ax.bar(xs, fd, color=colors, label="seed 0 (`evar eval`)")
    for i, r in enumerate(rows):
        others = r["over_seeds"]["frechet_distance"][1:]
        fd_ax.plot([i] * len(others), others, "o", c="k", ms=3, label="seeds 1, 2" if i == 0 else None)
    fd_ax.axhline(fd[0] * FD_RATIO, ls="--", c="k", lw=1, label=f"{FD_RATIO:g}x teacher (seed 0)")
    fd_ax.set(ylabel="Fréchet distance", title="Fréchet distance to real digits (lower is better)",
              ylim=(0, max(fd + [fd[0] * FD_RATIO]) * 1.3))
    fdt_ax.bar(xs, [r["frechet_to_teacher_samples"] for r in rows], color=colors)
    fdt_ax.set(ylabel="Fréchet distance",
               title="Fréchet distance to the teacher's samples\n(teacher bar = noise floor)")
    kl_ax.bar(xs, [r["kl_to_teacher"] for r in rows], color=colors)
    kl_ax.set(ylabel="KL(teacher ‖ model) per token", title="distance to the teacher (held-out, T=1)")
    for ax in (acc_ax, fd_ax, fdt_ax, kl_ax):
        ax.set_xticks(xs, names, fontsize=7)
    acc_ax.legend(fontsize=7, loc="lower right")
    fd_ax.legend(fontsize=7, loc="upper left", ncol=3)
    width = 0.8 / (len(rows) - 1)
    for j, r in enumerate(rows[1:]):
        scales = range(len(r["kl_per_scale"]))
        scale_ax.bar([s + j * width for s in scales], r["kl_per_scale"], width, label=r["name"], color=f"C{j}")
    scale_ax.set(xlabel="scale (coarse → fine)", ylabel="KL(teacher ‖ model), mean over the scale's tokens",
                 title="distance to the teacher per scale", yscale="log")
    scale_ax.legend(fontsize=7)
    for mode, points in curves.items():
        steps, _, kd = zip(*points)
        kd_ax.plot(steps, kd, lw=0.8, label=f"{mode} KD")
    kd_ax.set(xlabel="step", ylabel="KD term (each mode its own)", yscale="log", title="distillation: KD term")
    kd_ax.legend(fontsize=8)
    fig.suptitle(f"{TEACHER} pruned {SPARSITY:.0%} ({METHOD.upper()}), then distilled with the default recipe")
    fig.tight_layout()
    return figure_png(fig, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
