"""2:4 sparsity on the embedded digits model: every method, scored like `evar eval`, and its Core ML size.

    python benchmarks/sparsity.py            # → benchmarks/results/sparsity.json, .png and .md (~45 min shared)
    python benchmarks/sparsity.py --only vit # → benchmarks/results/sparsity_vit.json, .png and .md (ViT-digits top-1)

Every variant sparsifies a fresh copy of the model (every Linear of the 4 VAR blocks: AdaLN, qkv, proj, fc1,
fc2 at 2:4; head and embeddings dense), with the same calibration set (128 of the model's own sequences,
seed 0), no fine-tuning. Learnable masks start from the SparseGPT mask (without its weight update) and train
their gates against the dense model. Each model is then scored with:
  class accuracy, Fréchet distance   `evar eval`'s numbers, `--per-class` samples of every digit, for each of
                                     `--seeds` sampling seeds: mean ± std over the seeds;
  kl_to_dense                        teacher-forced KL(dense ‖ sparse) per token on 200 held-out sequences
                                     the dense model generated (a seed calibration does not use), half of
                                     them unconditional as under CFG;
  seconds                            the method's own time (calibration + masking, or prior + training).
Core ML: the VAR step package (`decoder_step.mlpackage`, fp16) of the dense model, of the SparseGPT 2:4 model
stored sparse (`--compress 2:4`) and sparse with its kept values palettized to 4 bits (`2:4+palettize4`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from evar import zoo
from evar.checkpoints import save_model_dir
from evar.files import atomic_write_bytes, atomic_write_json, figure_png
from evar.prune import Calibration, PruneRecipe
from evar.prune.calibrate import calibration
from evar.prune.report import versions
from evar.quality import evaluate_model
from evar.samples import SamplingSettings
from evar.sparsity.oneshot import check_layers, sparsify
from evar.sparsity.pipeline import learnable
from evar.sparsity.recipe import SparsifyRecipe
from evar.sparsity.targets import linear

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 1234
VARIANTS: dict[str, dict[str, Any]] = {  # label → SparsifyRecipe fields
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt --no-update": {"method": "sparsegpt", "update": False},
    "sparsegpt": {"method": "sparsegpt"},
    "learnable (prior: sparsegpt)": {"method": "learnable", "prior": "sparsegpt"},
}


def score(model, seeds: list[int], per_class: int, source: str) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        q = evaluate_model(model, SamplingSettings(seed=seed), per_class, source=source)["quality"]
        runs.append({"seed": seed, "class_accuracy": q["class_accuracy"], "frechet_distance": q["frechet_distance"]})
    out: dict[str, Any] = {"runs": runs}
    for k in ("class_accuracy", "frechet_distance"):
        values = torch.tensor([float(r[k]) for r in runs])
        out[k] = float(values.mean())
        out[f"{k}_std"] = float(values.std()) if len(runs) > 1 else 0.0
    return out


@torch.no_grad()
def kl_to_dense(model, held: Calibration, dense_logp: torch.Tensor) -> float:
    logp = model.var(held.labels, held.x_in).log_softmax(-1)
    return float(F.kl_div(logp, dense_logp, log_target=True, reduction="none").sum(-1).mean())


def make_variant(parent, label: str, fields: dict[str, Any], args, work: Path):
    recipe = SparsifyRecipe(calib_samples=args.calib_samples, steps=args.steps, **fields)
    model = copy.deepcopy(parent)
    t0 = time.perf_counter()
    if recipe.method == "learnable":
        teacher = copy.deepcopy(parent)
        sp = learnable(model, teacher, recipe, work / "learnable.partial", args.model, args.model)
    else:
        sp = sparsify(model, recipe, progress=False)
    seconds = time.perf_counter() - t0
    model.sparsity = sp
    return model, seconds, sp


def coreml_sizes(dense, sparse, work: Path) -> dict[str, Any]:
    from evar.export.artifact import build_coreml
    from evar.export.coreml import CoremlOptions

    sizes = {}
    for label, model, compress in (("dense fp16", dense, "none"), ("2:4", sparse, "2:4"),
                                   ("2:4 + palettize4", sparse, "2:4+palettize4")):
        out = work / f"coreml_{compress}"
        t0 = time.perf_counter()
        build_coreml(model, "benchmarks:sparsity", out, CoremlOptions(compress=compress))
        step = out / "decoder_step.mlpackage"
        sizes[label] = {"compress": compress, "step_package_bytes": _bytes(step), "artifact_bytes": _bytes(out),
                        "export_seconds": round(time.perf_counter() - t0, 1)}
        print(f"Core ML {label:>18}: step package {_bytes(step) / 1e6:.2f} MB")
    return sizes


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table(result: dict[str, Any]) -> str:
    lines = ["| variant | VAR weights zero | class accuracy | Fréchet distance | KL to dense | method time |",
             "|---|---|---|---|---|---|"]
    for r in [result["dense"], *result["rows"]]:
        lines.append(f"| {r['label']} | {r.get('zero_share', 0.0):.1%} | {r['class_accuracy'] * 100:.1f}% ± "
                     f"{r['class_accuracy_std'] * 100:.1f} | {r['frechet_distance']:.1f} ± {r['frechet_distance_std']:.1f} "
                     f"| {r.get('kl_to_dense', 0.0):.4f} | {r.get('seconds', 0.0):.0f} s |")
    if not result["coreml"]:
        return "\n".join(lines)
    lines += ["", "| Core ML step package (VAR, fp16) | size | × dense |", "|---|---|---|"]
    base = result["coreml"]["dense fp16"]["step_package_bytes"]
    for label, c in result["coreml"].items():
        lines.append(f"| {label} (`--compress {c['compress']}`) | {c['step_package_bytes'] / 1e6:.2f} MB | "
                     f"{c['step_package_bytes'] / base:.2f} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [result["dense"], *result["rows"]]
    labels = [r["label"].replace(" (prior: sparsegpt)", "\n(prior sparsegpt)").replace(" --no-update", "\nno update")
              for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(labels, [r["frechet_distance"] for r in rows], yerr=[r["frechet_distance_std"] for r in rows],
                color="tab:blue", capsize=3)
    axes[0].set_title("Fréchet distance to held-out digits (lower is better)")
    axes[1].bar(labels[1:], [r["kl_to_dense"] for r in rows[1:]], color="tab:orange")
    axes[1].set_title("per-token KL to the dense model (lower is better)")
    cm = result["coreml"] or {"(not measured)": {"step_package_bytes": 0}}
    axes[2].bar(list(cm), [c["step_package_bytes"] / 1e6 for c in cm.values()], color="tab:green")
    axes[2].set_title("Core ML VAR step package (MB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"2:4 on {result['model']}: {result['per_class']} samples per class × seeds {result['sampling']['seeds']}",
                 fontsize=10)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=100))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:digits")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=3, help="sampling seeds 0..N-1 per evaluation")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300, help="learnable masks: training steps")
    ap.add_argument("--no-coreml", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "sparsity.json")
    ap.add_argument("--only", choices=("var", "vit"), help="run one part (default both): var = the VAR rows above, "
                    "vit = ViT-digits top-1 (→ sparsity_vit.json beside --out)")
    ap.add_argument("--vit-model", default="builtin:vit-digits")
    ap.add_argument("--vit-steps", type=int, default=VIT_STEPS, help="ViT learnable masks: training steps")
    args = ap.parse_args()
    if args.only != "var":
        vit_main(args)
    if args.only != "vit":
        var_main(args)


def var_main(args) -> None:
    seeds = list(range(args.seeds))
    t0, load0 = time.perf_counter(), os.getloadavg()
    parent = zoo.load(args.model)
    held = calibration(parent, PruneRecipe(0.0, calib_samples=200, seed=HELD_OUT_SEED))
    with torch.no_grad():
        dense_logp = parent.var(held.labels, held.x_in).log_softmax(-1)
    dense = {"label": "dense", **score(parent, seeds, args.per_class, args.model)}
    print(f"dense: {dense['class_accuracy']:.3f} FD {dense['frechet_distance']:.1f} ± {dense['frechet_distance_std']:.1f}")
    var_params = sum(p.numel() for p in parent.var.parameters())
    rows, sparse_gpt = [], None
    with tempfile.TemporaryDirectory(prefix="evar_sparsity_") as tmp:
        work = Path(tmp)
        for label, fields in VARIANTS.items():
            model, seconds, sp = make_variant(parent, label, fields, args, work)
            if label == "sparsegpt":
                sparse_gpt = model
            zeros = sum(int((~m).sum()) for m in sp.masks.values())
            row = {"label": label, "seconds": round(seconds, 1), "zero_share": zeros / var_params,
                   "kl_to_dense": kl_to_dense(model, held, dense_logp), **score(model, seeds, args.per_class, label)}
            if "agreement_with_prior" in sp.details:
                row["agreement_with_prior"] = sp.details["agreement_with_prior"]
            rows.append(row)
            print(f"{label}: acc {row['class_accuracy']:.3f} FD {row['frechet_distance']:.1f} ± "
                  f"{row['frechet_distance_std']:.1f} KL {row['kl_to_dense']:.4f} ({seconds:.0f} s)", flush=True)
        coreml, coreml_error = {}, None
        if not args.no_coreml:
            try:
                coreml = coreml_sizes(parent, sparse_gpt, work)
            except Exception as err:  # noqa: BLE001 -- the quality rows above are still worth keeping
                coreml_error = f"{type(err).__name__}: {err}"
                print(f"Core ML sizes failed: {coreml_error}")
    by = {r["label"]: r for r in rows}
    learnt = by["learnable (prior: sparsegpt)"]
    checks = {
        "learnable has the lowest KL to dense": learnt["kl_to_dense"] == min(r["kl_to_dense"] for r in rows),
        "learnable FD <= 1.15x dense": learnt["frechet_distance"] <= 1.15 * dense["frechet_distance"],
        "sparsegpt with update KL < without": by["sparsegpt"]["kl_to_dense"] < by["sparsegpt --no-update"]["kl_to_dense"],
    }
    result = {"model": args.model, "model_provenance": parent.config.provenance, "pattern": "2:4",
              "per_class": args.per_class, "sampling": {**dataclasses.asdict(SamplingSettings()), "seeds": seeds},
              "calibration": {"data": "teacher", "samples": args.calib_samples, "seed": 0},
              "learnable": {k: v for k, v in dataclasses.asdict(SparsifyRecipe(steps=args.steps)).items()
                            if k in ("prior", "steps", "tau", "scale", "prior_strength", "weight_reg", "lr",
                                     "batch_size", "data_samples")},
              "kl_held_out": {"sequences": len(held), "seed": HELD_OUT_SEED, "unconditional": 0.5},
              "dense": dense, "rows": rows, "coreml": coreml, "coreml_error": coreml_error, "checks": checks,
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "load_average_at_start": load0, "load_average_at_end": os.getloadavg()},
              "versions": versions(), "seconds": round(time.perf_counter() - t0, 1)}
    result["table"] = table(result)
    atomic_write_bytes(args.out.with_suffix(".md"), (result["table"] + "\n").encode())
    plot(result, args.out.with_suffix(".png"))
    atomic_write_json(args.out, result)
    print(result.get("table", ""))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"→ {args.out}")


# ---------------------------------------------------------------- ViT-digits: top-1 at 2:4
VIT_SEEDS = (0, 1, 2)  # calibration subset and (learnable) gate initialisation + Gumbel noise
VIT_STEPS = 600
# The weight reward's scale is absolute (λ·Σ‖W⊙M‖²) and the ViT's KL is small: the main learnable row trains
# without it, the ablation row with the VAR's default λ = 1e-5.
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    **{k: v for k, v in VARIANTS.items() if k != "learnable (prior: sparsegpt)"},
    "learnable (prior: sparsegpt)": {"method": "learnable", "prior": "sparsegpt", "weight_reg": 0.0},
    "learnable, --weight-reg 1e-5": {"method": "learnable", "prior": "sparsegpt", "weight_reg": 1e-5},
}
MASKLLM_VIT_B16 = {"dense": 79.15, "magnitude": 65.92, "wanda": 63.28, "sparsegpt --no-update": 59.72,
                   "sparsegpt": 71.52, "learnable (prior: sparsegpt)": 79.45}  # ImageNet top-1, MaskLLM's table


def vit_variant(parent, fields: dict[str, Any], seed: int, args, work: Path):
    """A fresh copy of the ViT sparsified by one method with one seed; (model, seconds, sparsity)."""
    recipe = SparsifyRecipe(calib_samples=args.calib_samples, steps=args.vit_steps, batch_size=64, seed=seed,
                            ckpt_every=args.vit_steps, **fields)
    model = copy.deepcopy(parent)
    t0 = time.perf_counter()
    if recipe.method == "learnable":
        run_dir = work / f"vit_learnable_{recipe.weight_reg:g}_{seed}"  # one per variant and seed: no resuming
        sp = learnable(model, copy.deepcopy(parent), recipe, run_dir, args.vit_model, args.vit_model)
    else:
        sp = sparsify(model, recipe, progress=False)
    model.sparsity = sp
    return model, time.perf_counter() - t0, sp


@torch.no_grad()
def vit_scores(vit, images, labels, dense_logp) -> dict[str, float]:
    logp = vit.eval()(images).log_softmax(-1)
    return {"top1": float((logp.argmax(-1) == labels).float().mean()),
            "kl_to_dense": float(F.kl_div(logp, dense_logp, log_target=True, reduction="batchmean"))}


def vit_main(args) -> None:
    from evar.vit.train import held_out

    t0, load0 = time.perf_counter(), os.getloadavg()
    parent = zoo.load_family(args.vit_model, ("vit",))
    images, labels, split = held_out("digits", parent.config.img_size)
    with torch.no_grad():
        dense_logp = parent.vit(images).log_softmax(-1)
    dense = {"label": "dense", **vit_scores(parent.vit, images, labels, dense_logp), "top1_std": 0.0}
    print(f"ViT dense: top-1 {dense['top1'] * 100:.2f}%")
    layer_weights = sum(linear(parent.vit, n).weight.numel() for n in check_layers(parent, SparsifyRecipe()))
    params = sum(p.numel() for p in parent.vit.parameters())
    rows = []
    with tempfile.TemporaryDirectory(prefix="evar_sparsity_vit_") as tmp:
        for label, fields in VIT_VARIANTS.items():
            runs = []
            for seed in VIT_SEEDS:
                model, seconds, sp = vit_variant(parent, fields, seed, args, Path(tmp))
                runs.append({"seed": seed, "seconds": round(seconds, 1),
                             **vit_scores(model.vit, images, labels, dense_logp),
                             **({"agreement_with_prior": sp.details["agreement_with_prior"]}
                                if "agreement_with_prior" in sp.details else {})})
            top1 = torch.tensor([r["top1"] for r in runs])
            row = {"label": label, "runs": runs, "top1": float(top1.mean()), "top1_std": float(top1.std()),
                   "kl_to_dense": sum(r["kl_to_dense"] for r in runs) / len(runs),
                   "seconds": sum(r["seconds"] for r in runs) / len(runs)}
            rows.append(row)
            print(f"ViT {label}: top-1 {row['top1'] * 100:.2f}% ± {row['top1_std'] * 100:.2f}, KL "
                  f"{row['kl_to_dense']:.4f} ({row['seconds']:.0f} s per run)", flush=True)
    by = {r["label"]: r for r in rows}
    checks = {
        "learnable within 1 point of dense": by["learnable (prior: sparsegpt)"]["top1"] >= dense["top1"] - 0.01,
        "sparsegpt with update >= without": by["sparsegpt"]["top1"] >= by["sparsegpt --no-update"]["top1"],
    }
    result = {"model": args.vit_model, "model_provenance": parent.provenance, "pattern": "2:4",
              "evaluation": {"split": split, "images": len(labels)},
              "layers": "every Linear of the blocks (attn.qkv, attn.proj, mlp.fc1, mlp.fc2); patch embedding and head dense",
              "zero_share_of_masked": 0.5, "zero_share_of_params": layer_weights * 0.5 / params,
              "seeds": list(VIT_SEEDS), "calibration": {"data": "the ViT's training images (digits train split)",
                                                        "images": args.calib_samples},
              "learnable": {k: v for k, v in dataclasses.asdict(SparsifyRecipe(steps=args.vit_steps, batch_size=64))
                            .items() if k in ("prior", "steps", "tau", "scale", "prior_strength", "weight_reg", "lr",
                                              "batch_size", "data_samples")},
              "maskllm_vit_b16_imagenet": MASKLLM_VIT_B16, "dense": dense, "rows": rows, "checks": checks,
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "load_average_at_start": load0, "load_average_at_end": os.getloadavg()},
              "versions": versions(), "seconds": round(time.perf_counter() - t0, 1)}
    result["table"] = vit_table(result)
    out = args.out.with_name(args.out.stem + "_vit.json")
    atomic_write_bytes(out.with_suffix(".md"), (result["table"] + "\n").encode())
    vit_plot(result, out.with_suffix(".png"))
    atomic_write_json(out, result)
    print(result["table"])
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"→ {out}")


def vit_table(result: dict[str, Any]) -> str:
    lines = ["| variant | top-1 (held-out digits) | Δ vs dense | KL to dense | time per run | MaskLLM ViT-B/16 (ImageNet) |",
             "|---|---|---|---|---|---|"]
    base = result["dense"]["top1"]
    for r in [result["dense"], *result["rows"]]:
        std = f" ± {r['top1_std'] * 100:.2f}" if r["label"] != "dense" else ""
        lines.append(f"| {r['label']} | {r['top1'] * 100:.2f}%{std} | {(r['top1'] - base) * 100:+.2f} | "
                     f"{r['kl_to_dense']:.4f} | {r.get('seconds', 0.0):.1f} s | "
                     f"{_published(result, r['label'])} |")
    return "\n".join(lines)


def _published(result: dict[str, Any], label: str) -> str:
    value = result["maskllm_vit_b16_imagenet"].get(label)
    return "–" if value is None else f"{value:.2f}"


def vit_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [result["dense"], *result["rows"]]
    labels = [r["label"].replace(" (prior: sparsegpt)", "").replace(" --no-update", "\nno update")
              .replace(", --weight-reg 1e-5", "\nweight-reg 1e-5") for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(labels, [r["top1"] * 100 for r in rows], yerr=[r["top1_std"] * 100 for r in rows], capsize=3,
                color="tab:blue")
    axes[0].set_ylim(max(0, min(r["top1"] * 100 for r in rows) - 10), 100)
    axes[0].set_title(f"ViT-digits top-1 at 2:4 (seeds {result['seeds']})")
    ref = result["maskllm_vit_b16_imagenet"]
    axes[1].bar(labels, [ref.get(r["label"], 0.0) for r in rows], color="tab:gray")
    axes[1].set_ylim(50, 85)
    axes[1].set_title("MaskLLM, ViT-B/16 on ImageNet (published)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=100))


if __name__ == "__main__":
    main()
