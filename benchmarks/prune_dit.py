"""Pruning a diffusion transformer by component: the diffusion-pruning rule of thumb, measured on digits.

    python benchmarks/prune_dit.py        # → benchmarks/results/prune_dit.json and .png

The rule of thumb for diffusion models says attention tolerates 30–40% pruning, FFN 40–50% (convolutions
50–60%: the DiT has one, the patchify conv, which is not pruned; EVAR's conv pruning is `evar prune-decoder`),
and that pruning should be combined with distillation. Here `builtin:dit-digits` is pruned by
`evar prune-dit` (OBS with compensation unless --method says otherwise) at those rates, per component and
together, one-shot and in 3 iterative rounds, and each pruned model is then distilled from the dense one
(`evar distill-dit`, --distill-steps). Every variant is scored like `evar eval` (class accuracy and
classifier-feature Fréchet distance of --per-class samples per digit, DDIM --ddim-steps, cfg --cfg) over the
sampling seeds --seeds: mean ± std. Latency: PyTorch eager, one batch of 10 images (one per class) through
the whole DDIM loop, dense and every pruned variant alternating after a warm-up; median of --iters, with the
multiply-accumulate ratio beside it. Models are cached in --work (a rerun skips what exists).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evar import zoo
from evar.dit.checkpoint import DiTModel, load_dit_dir, save_dit_dir
from evar.dit.commands import evaluate_dit
from evar.dit.diffusion import DiTSampling, ddim_sample
from evar.dit.distill import DiTDistillation, distill_dit
from evar.dit.prune import DiTPruneRecipe, prune_dit
from evar.files import atomic_write_bytes, atomic_write_json, figure_png
from evar.prune.report import versions
from evar.train import Schedule

RESULTS = Path(__file__).resolve().parent / "results"
DENSE = "builtin:dit-digits"
# name → (attention rate, FFN rate, iterative rounds)
VARIANTS = {
    "attn 30%": (0.3, 0.0, 1),
    "attn 40%": (0.4, 0.0, 1),
    "FFN 40%": (0.0, 0.4, 1),
    "FFN 50%": (0.0, 0.5, 1),
    "all 30%": (0.3, 0.3, 1),
    "safe: attn 30% + FFN 40%": (0.3, 0.4, 1),
    "aggressive: attn 40% + FFN 50%": (0.4, 0.5, 1),
    "all 50%": (0.5, 0.5, 1),
    "all 50% in 3 rounds": (0.5, 0.5, 3),
}


def macs(model: DiTModel) -> int:
    """Multiply-accumulates of one denoiser call on one image: every Linear on every token, + attention."""
    T = model.config.num_patches
    linear = sum(m.in_features * m.out_features for b in model.dit.blocks
                 for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2))
    attention = sum(2 * T * b.attn.heads * b.attn.head_dim for b in model.dit.blocks)
    return T * (linear + attention + model.dit.final_layer.linear.in_features * model.dit.final_layer.linear.out_features)


def build_variants(work: Path, method: str, distill_steps: int, names: list[str]) -> dict[str, Path]:
    """Pruned and pruned + distilled model directories (cached)."""
    dense = zoo.load_family(DENSE, ("dit",))
    paths = {}
    for name in names:
        attn, ffn, rounds = VARIANTS[name]
        slug = name.split(":")[0].replace(" ", "_").replace("%", "").replace(",", "")
        pruned_dir = work / f"{slug}_{method}"
        if not pruned_dir.exists():
            recipe = DiTPruneRecipe(sparsity=0.0, attn_sparsity=attn, ffn_sparsity=ffn, method=method,
                                    iterative_steps=rounds)
            save_dit_dir(prune_dit(zoo.load_family(DENSE, ("dit",)), recipe, parent=DENSE)[0], pruned_dir)
        distilled = work / f"{slug}_{method}_distilled"
        if not (distilled / "model").exists():
            job = DiTDistillation(schedule=Schedule(steps=distill_steps, batch_size=64, lr=3e-4, weight_decay=0.0,
                                                    warmup=50, ckpt_every=distill_steps))
            distill_dit(dense, load_dit_dir(pruned_dir), job, distilled, parent=DENSE)
        paths[name] = pruned_dir
        paths[f"{name} + distil"] = distilled / "model"
    return paths


def quality(models: dict[str, str | Path], seeds: list[int], per_class: int, ddim_steps: int,
            guidance: float) -> dict[str, Any]:
    out = {}
    for name, ref in models.items():
        model = zoo.load_family(str(ref), ("dit",))
        runs = [evaluate_dit(model, DiTSampling(guidance, ddim_steps, s), per_class, str(ref))["quality"] for s in seeds]
        acc = [r["class_accuracy"] for r in runs]
        fd = [r["frechet_distance"] for r in runs]
        out[name] = {"class_accuracy_mean": statistics.mean(acc), "class_accuracy_std": statistics.pstdev(acc),
                     "frechet_distance_mean": statistics.mean(fd), "frechet_distance_std": statistics.pstdev(fd),
                     "params": sum(p.numel() for p in model.dit.parameters()), "macs": macs(model),
                     "real_data_floor": runs[0]["real_data_floor"]}
        print(f"{name}: accuracy {100 * out[name]['class_accuracy_mean']:.1f}%, FD {out[name]['frechet_distance_mean']:.1f}"
              f" ± {out[name]['frechet_distance_std']:.1f}", flush=True)
    return out


@torch.no_grad()
def latency(models: dict[str, str | Path], iters: int, ddim_steps: int, guidance: float) -> dict[str, Any]:
    loaded = {k: zoo.load_family(str(v), ("dit",)) for k, v in models.items()}
    labels = torch.arange(10)
    settings = DiTSampling(guidance, ddim_steps, 0)
    times: dict[str, list[float]] = {k: [] for k in loaded}
    for m in loaded.values():  # warm-up
        ddim_sample(m.dit, labels, settings)
    for _ in range(iters):
        for k, m in loaded.items():
            t0 = time.perf_counter()
            ddim_sample(m.dit, labels, settings)
            times[k].append(time.perf_counter() - t0)
    dense = statistics.median(times["dense"])
    return {k: {"median_s": statistics.median(v), "speedup": dense / statistics.median(v), "macs": macs(loaded[k]),
                "macs_ratio": macs(loaded["dense"]) / macs(loaded[k])} for k, v in times.items()}


def plot(result: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = result["quality"]
    names = list(q)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    x = np.arange(len(names))
    axes[0].bar(x, [q[k]["frechet_distance_mean"] for k in names], yerr=[q[k]["frechet_distance_std"] for k in names],
                capsize=3, color=["tab:gray" if k == "dense" else "tab:blue" if "distil" in k else "tab:orange"
                                  for k in names])
    axes[0].axhline(q["dense"]["frechet_distance_mean"], color="k", lw=0.8, ls="--")
    axes[0].set(xticks=x, ylabel="Fréchet distance (↓)", title="builtin:dit-digits pruned (orange) and distilled (blue)")
    axes[0].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    axes[1].bar(x, [100 * q[k]["class_accuracy_mean"] for k in names])
    axes[1].set(xticks=x, ylabel="class accuracy %", ylim=(0, 100.5))
    axes[1].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=";".join(VARIANTS), help="semicolon-separated names of VARIANTS")
    ap.add_argument("--method", default="obs", help="obs | taylor | magnitude")
    ap.add_argument("--distill-steps", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--ddim-steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=1.5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_dit"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    names = [n.strip() for n in args.variants.split(";") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    models: dict[str, str | Path] = {"dense": DENSE, **build_variants(args.work, args.method, args.distill_steps, names)}
    t_build = time.perf_counter() - t0
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "versions": versions(), "settings": {**vars(args), "work": str(args.work), "out": str(args.out)},
        "quality": quality(models, seeds, args.per_class, args.ddim_steps, args.cfg),
    }
    result["latency"] = latency({k: v for k, v in models.items() if "distil" not in k}, args.iters, args.ddim_steps,
                                args.cfg)
    result["seconds"] = {"prune_and_distil": round(t_build, 1), "total": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "prune_dit.json", result)
    atomic_write_bytes(args.out / "prune_dit.png", plot(result))
    print(f"→ {args.out / 'prune_dit.json'}, {args.out / 'prune_dit.png'} ({result['seconds']['total']:.0f}s)")


if __name__ == "__main__":
    main()
