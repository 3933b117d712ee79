"""Pruning the VQVAE decoder: what it buys in decode time, and what it costs in quality.

    python benchmarks/prune_decoder.py        # → benchmarks/results/prune_decoder.json and .png

Latency: the d16-architecture decoder (`random:d16`'s VQVAE, random weights: time does not depend on
values), dense and pruned 40% by `evar prune-decoder --method magnitude`, each exported alone as an ONNX
graph (f_hat → image) and run by onnxruntime on the CPU, batch 1, side by side: the two alternate, after one
warm-up each, and the median of `--iters` runs is reported, wall time and CPU time (all threads) both.

Quality: `builtin:digits` with its VAR unchanged and its decoder dense, pruned (`--decoder-method`, 40%),
and pruned then distilled (`evar distill-decoder`, defaults), each scored like `evar eval` (500 samples,
class accuracy and classifier-feature Fréchet distance) with the sampling seeds `--seeds`: mean ± std.
Models and exports are cached in `--work` (a rerun skips what exists).
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
from evar.checkpoints import Model, load_model_dir
from evar.config import ModelConfig, VQVAEConfig
from evar.files import atomic_write_bytes, atomic_write_json, figure_png, read_json
from evar.models.var import VAR
from evar.models.vqvae import VQVAE
from evar.prune.decoder import DecoderRecipe, decoder_macs, decoder_params, prune_decoder
from evar.prune.decoder_distill import DecoderDistillRecipe, distill_decoder
from evar.prune.pipeline import save_pruned
from evar.prune.report import versions
from evar.quality import evaluate_model
from evar.samples import SamplingSettings

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITY = 0.4
DIGITS = "builtin:digits"


# ---------------------------------------------------------------- latency
def d16_decoders(seed: int = 0) -> dict[str, Model]:
    """The d16 VQVAE with random weights, dense and decoder-pruned; the VAR is a shape only (meta device)."""
    config = zoo.config_for("random:d16")
    with torch.device("meta"):
        var = VAR(config.var)
    torch.manual_seed(seed)
    dense = Model(ModelConfig(config.var, VQVAEConfig()), var, VQVAE(VQVAEConfig()).eval())
    copy = Model(dense.config, var, VQVAE(VQVAEConfig()).eval())
    copy.vqvae.load_state_dict(dense.vqvae.state_dict())
    pruned = prune_decoder(copy, DecoderRecipe(SPARSITY, method="magnitude"), parent="random:d16").model
    return {"dense": dense, f"pruned {SPARSITY:.0%}": pruned}


def export_decoder_graph(model: Model, out: Path) -> Path:
    """The decoder graph alone (f_hat → image), as `evar-export onnx` writes it."""
    from evar.export.onnx import OnnxOptions, export_decoder

    if not out.exists():
        tmp = out.parent / f".{out.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        graph, _ = export_decoder(model, tmp, OnnxOptions(), [])
        os.replace(tmp, out)
    return next(out.glob("*.onnx"))


def time_sessions(graphs: dict[str, Path], f_hat: np.ndarray, iters: int, threads: int) -> dict[str, dict[str, Any]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
    feeds = {k: {s.get_inputs()[0].name: f_hat} for k, s in sessions.items()}
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():  # warm-up
        s.run(None, feeds[k])
    for _ in range(iters):
        for k, s in sessions.items():  # alternating, so both see the same machine
            w, c = time.perf_counter(), time.process_time()
            s.run(None, feeds[k])
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    return {k: {"wall_s": wall[k], "cpu_s": cpu[k], "wall_median_s": statistics.median(wall[k]),
                "cpu_median_s": statistics.median(cpu[k])} for k in sessions}


def latency(work: Path, iters: int, threads: int) -> dict[str, Any]:
    models = d16_decoders()
    graphs = {k: export_decoder_graph(m, work / f"d16_decoder_{k.split()[0]}") for k, m in models.items()}
    f_hat = np.random.default_rng(0).standard_normal((1, 32, 16, 16)).astype(np.float32)
    load_before = os.getloadavg()
    timing = time_sessions(graphs, f_hat, iters, threads)
    dense, pruned = timing["dense"], timing[f"pruned {SPARSITY:.0%}"]
    return {"model": "random:d16 VQVAE (ch 160, ch_mult 1,1,2,2,4), f_hat 16×16 → 256×256 image",
            "recipe": f"evar prune-decoder --sparsity {SPARSITY} --method magnitude",
            "onnxruntime_threads": threads, "iters": iters, "load_average": [load_before, os.getloadavg()],
            "variants": {k: {"decoder_params": decoder_params(m.vqvae), "decoder_macs": decoder_macs(m.config.vqvae),
                             "widths": None if m.config.vqvae.decoder_widths is None
                             else [lv.width for lv in m.config.vqvae.decoder_widths.levels], **timing[k]}
                         for k, m in models.items()},
            "speedup_wall": dense["wall_median_s"] / pruned["wall_median_s"],
            "speedup_cpu": dense["cpu_median_s"] / pruned["cpu_median_s"]}


# ---------------------------------------------------------------- quality
def digits_variants(work: Path, method: str, calib_samples: int) -> dict[str, str]:
    pruned, distilled = work / f"digits_decoder_{method}", work / f"digits_decoder_{method}_distilled"
    if not pruned.exists():
        recipe = DecoderRecipe(SPARSITY, method=method, calib_samples=calib_samples)
        save_pruned(prune_decoder(zoo.load(DIGITS), recipe, parent=DIGITS), pruned)
    if not distilled.exists():
        distill_decoder(DIGITS, str(pruned), distilled, DecoderDistillRecipe())
    return {"dense": DIGITS, f"pruned {SPARSITY:.0%} ({method})": str(pruned),
            f"pruned {SPARSITY:.0%} ({method}) + distilled": str(distilled)}


def quality(work: Path, seeds: list[int], per_class: int, method: str, calib_samples: int) -> dict[str, Any]:
    out = {}
    for label, ref in digits_variants(work, method, calib_samples).items():
        model = zoo.load(ref)
        runs = [evaluate_model(model, SamplingSettings(seed=s), per_class, source=ref)["quality"] for s in seeds]
        acc = [r["class_accuracy"] for r in runs]
        fd = [r["frechet_distance"] for r in runs]
        out[label] = {"model": ref, "decoder_params": decoder_params(model.vqvae),
                      "decoder_macs": decoder_macs(model.config.vqvae), "class_accuracy": acc, "frechet_distance": fd,
                      "class_accuracy_mean": float(np.mean(acc)), "frechet_distance_mean": float(np.mean(fd)),
                      "frechet_distance_std": float(np.std(fd)),
                      "seconds": None if ref == DIGITS else load_model_dir(ref).config.provenance.get("seconds")}
    dense = out["dense"]
    for row in out.values():
        row["accuracy_minus_dense_points"] = 100 * (row["class_accuracy_mean"] - dense["class_accuracy_mean"])
        row["frechet_distance_vs_dense"] = row["frechet_distance_mean"] / dense["frechet_distance_mean"]
    return {"seeds": seeds, "per_class": per_class, "variants": out}


# ---------------------------------------------------------------- records
def plot(result: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if "latency" in result:
        lat = result["latency"]["variants"]
        names = list(lat)
        x = np.arange(len(names))
        axes[0].bar(x - 0.2, [lat[k]["wall_median_s"] for k in names], 0.4, label="wall (median)")
        axes[0].bar(x + 0.2, [lat[k]["cpu_median_s"] for k in names], 0.4, label="CPU time, all threads (median)")
        axes[0].set(xticks=x, xticklabels=names, ylabel="seconds per image",
                    title=f"d16 decoder on onnxruntime: {result['latency']['speedup_wall']:.2f}× wall, "
                          f"{result['latency']['speedup_cpu']:.2f}× CPU")
        axes[0].legend(fontsize=8)
    if "quality" in result:
        q = result["quality"]["variants"]
        names = list(q)
        x = np.arange(len(names))
        axes[1].bar(x, [q[k]["frechet_distance_mean"] for k in names], yerr=[q[k]["frechet_distance_std"] for k in names],
                    capsize=4)
        axes[1].set(xticks=x, xticklabels=[n.replace(" + ", "\n+ ") for n in names], title="digits: Fréchet distance (↓)")
        axes[2].bar(x, [100 * q[k]["class_accuracy_mean"] for k in names])
        axes[2].set(xticks=x, xticklabels=[n.replace(" + ", "\n+ ") for n in names], ylim=(90, 100.5),
                    title="digits: class accuracy % (↑)")
        for ax in axes[1:]:
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return figure_png(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=7, help="timed runs per variant (alternating)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--seeds", default="0,1,2", help="sampling seeds of the quality evaluation")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--decoder-method", default="obs", help="criterion of the digits decoder prune")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_decoder"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                          "processor": platform.processor()}, "versions": versions()}
    previous = args.out / "prune_decoder.json"
    kept = read_json(previous).get("latency") if args.skip_latency and previous.exists() else None
    if kept:  # a part not re-measured keeps its last numbers, and says so
        result["latency"] = {**kept, "kept_from_previous_run": True}
    if not args.skip_latency:
        result["latency"] = latency(args.work, args.iters, args.threads)
        print(f"d16 decoder: {result['latency']['speedup_wall']:.2f}× wall, {result['latency']['speedup_cpu']:.2f}× CPU")
    if not args.skip_quality:
        seeds = [int(s) for s in args.seeds.split(",")]
        result["quality"] = quality(args.work, seeds, args.per_class, args.decoder_method, args.calib_samples)
        for k, v in result["quality"]["variants"].items():
            print(f"{k}: accuracy {100 * v['class_accuracy_mean']:.1f}%, FD {v['frechet_distance_mean']:.1f} ± "
                  f"{v['frechet_distance_std']:.1f}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(args.out / "prune_decoder.json", result)
    atomic_write_bytes(args.out / "prune_decoder.png", plot(result))
    print(f"→ {args.out / 'prune_decoder.json'}, {args.out / 'prune_decoder.png'}")


if __name__ == "__main__":
    main()
