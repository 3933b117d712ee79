"""The main job (`evar demo`): the whole EVAR flow on one model, as stages you can re-run.

    dense model ─► prune 40% (OBS) ─► distill ─► export ONNX + Core ML ─► images from the exported graphs
                                                  ─► export ONNX int8 + CFG trimming (deployed) ─► its quality
                                                                        ─► latency dense vs compressed ─► REPORT.md

The latency of a 1.3M-parameter model on a CPU is mostly fixed cost per graph node (about 2 ms per scale
whatever the width), so pruning alone buys about 1.2× there; the deployed artifact adds what also cuts that
work: int8 matmuls and, for the last two scales (100 of 130 tokens), no unconditional half (CFG trimming).
Both comparisons run on one onnxruntime thread: a second intra-op thread only adds synchronisation per node
on graphs this small.

Each stage writes one output (atomically) and is skipped when that output already exists, so an
interrupted demo continues where it stopped and a finished one re-renders its report in seconds.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evar.files import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class DemoPlan:
    model: str = "builtin:digits"
    out: Path = Path("runs/demo")
    sparsity: float = 0.4
    method: str = "obs"
    # A quarter of the heads, the FFN the rest of the 40%: the uniform cut takes round(4 × 0.4) = 2 of the digits
    # model's 4 heads (README, the ladder: 1.15× the dense Fréchet distance against 1.02× for this recipe).
    head_sparsity: float | None = 0.25
    per_class: int = 50  # eval samples per class
    bench_iters: int = 10
    seed: int = 0
    cfg_until_scale: int = 4  # deployed artifact: guidance on scales 0-3, the last two scales unguided
    bench_threads: int = 1


@dataclass(frozen=True)
class Stage:
    name: str
    output: Path
    run: Callable[[], None]


def run_stages(stages: list[Stage], log: Callable[[str], None] = print) -> dict[str, float]:
    """Run each stage whose output is missing; return seconds per stage (0 for skipped ones)."""
    seconds = {}
    for i, stage in enumerate(stages, 1):
        prefix = f"[{i}/{len(stages)}] {stage.name}"
        if stage.output.exists():
            log(f"{prefix}: skipped, {stage.output} exists")
            seconds[stage.name] = 0.0
            continue
        log(f"{prefix} …")
        t0 = time.perf_counter()
        stage.run()
        seconds[stage.name] = round(time.perf_counter() - t0, 1)
        log(f"{prefix}: done in {seconds[stage.name]:.1f}s → {stage.output}")
    return seconds


# ---------------------------------------------------------------- stage bodies
def _quality(ref: str, out: Path, per_class: int, seed: int) -> Callable[[], None]:
    def run() -> None:
        from evar import zoo
        from evar.quality import evaluate_model
        from evar.samples import SamplingSettings, class_labels, sample_images, write_samples

        model = zoo.load(ref)
        settings = SamplingSettings(seed=seed)
        report = evaluate_model(model, settings, per_class, source=ref)
        labels = class_labels(list(range(model.config.var.num_classes)), 8)
        write_samples(out.parent / (out.stem + "_samples"), sample_images(model, labels, settings, progress=False),
                      labels, columns=8)
        atomic_write_json(out, report)
    return run


def _prune(plan: DemoPlan, out: Path) -> Callable[[], None]:
    def run() -> None:
        from evar import zoo
        from evar.prune import PruneRecipe, prune_model, save_pruned

        recipe = PruneRecipe(sparsity=plan.sparsity, method=plan.method, head_sparsity=plan.head_sparsity,
                             seed=plan.seed)
        recipe.validate()
        save_pruned(prune_model(zoo.load(plan.model), recipe, parent=plan.model), out)
    return run


def _distill(plan: DemoPlan, student: Path, out: Path) -> Callable[[], None]:
    def run() -> None:
        from evar.distill.trainer import DistillRecipe, distill

        distill(plan.model, str(student), out, DistillRecipe(data=distill_data(plan.model)))
    return run


def distill_data(model: str) -> str:
    """The digits models distil on their training digits (closer to real digits than on the teacher's unguided
    samples: the ladder's recipe); any other model on its teacher's own samples, the only data it brings."""
    return "digits" if model == "builtin:digits" else "teacher"


def _export(ref: str, out: Path, backend: str, **onnx_options: Any) -> Callable[[], None]:
    def run() -> None:
        from evar import zoo
        from evar.samples import SamplingSettings

        s = SamplingSettings()
        model = zoo.load(ref)
        if backend == "onnx":
            from evar.export import artifact, onnx

            artifact.build_onnx(model, ref, out, onnx.OnnxOptions(top_k=s.top_k, top_p=s.top_p, **onnx_options),
                                command="evar demo")
        else:
            from evar.export import artifact, coreml

            artifact.build_coreml(model, ref, out, coreml.CoremlOptions(top_k=s.top_k, top_p=s.top_p),
                                  command="evar demo")
    return run


def _artifact_quality(artifact: Path, out: Path, per_class: int, seed: int) -> Callable[[], None]:
    """`evar eval`'s numbers for an artifact, generated by the runtime (for recipes PyTorch does not run: int8)."""
    def run() -> None:
        import numpy as np

        from evar.eval.metrics import evaluate_digits
        from evar.runtime import cost
        from evar.runtime.generator import Generator
        from evar.samples import SamplingSettings, write_samples

        s = SamplingSettings(seed=seed)
        labels = np.repeat(np.arange(10), per_class)
        gen = Generator(artifact, backend="cpu")
        t0 = time.perf_counter()
        images = gen.generate(labels, seed=s.seed, cfg=s.guidance).images
        report = {"model": str(artifact), "sampling": {"seed": s.seed, "guidance": s.guidance, "top_k": s.top_k,
                                                       "top_p": s.top_p},
                  "quality": evaluate_digits(images, labels).to_dict(), "params": cost.var_params(gen.artifact.var),
                  "seconds": round(time.perf_counter() - t0, 2)}
        grid = np.repeat(np.arange(10), 8)
        write_samples(out.parent / (out.stem + "_samples"), gen.generate(grid, seed=s.seed, cfg=s.guidance).images,
                      grid, columns=8)
        atomic_write_json(out, report)
    return run


def _run_exported(plan: DemoPlan, artifact: Path, torch_ref: Path, out: Path) -> Callable[[], None]:
    """Images from the exported ONNX graphs (no torch in the loop), checked token for token against PyTorch."""
    def run() -> None:
        import numpy as np
        import torch

        from evar import zoo
        from evar.models.decoding import generate
        from evar.samples import SamplingSettings, write_samples
        from evar.runtime.generator import Generator

        s = SamplingSettings(seed=plan.seed)
        labels = np.repeat(np.arange(10), 8)
        gen = Generator(artifact, backend="cpu")
        exported = gen.generate(labels, seed=s.seed, cfg=s.guidance)
        model = zoo.load(str(torch_ref))
        ref = generate(model.var, model.vqvae, torch.from_numpy(labels), guidance=s.guidance, top_k=s.top_k, top_p=s.top_p,
                       seed=s.seed)
        same = [bool(np.array_equal(np.asarray(a), b.numpy())) for a, b in zip(exported.tokens, ref.tokens)]
        write_samples(out, exported.images, labels, columns=8)
        atomic_write_json(out / "parity.json", {"artifact": str(artifact), "backend": "onnxruntime cpu",
                                                "tokens_equal_per_scale": same, "all_tokens_equal": all(same)})
    return run


def _bench(plan: DemoPlan, artifacts: dict[str, Path], baseline: Path, out: Path) -> Callable[[], None]:
    """Each compressed artifact against the dense one (alternating, one thread); one table and plot per artifact."""
    def run() -> None:
        from evar.runtime import bench

        settings = bench.BenchSettings(iters=plan.bench_iters, warmup=2, seed=plan.seed, threads=plan.bench_threads)
        reports = {name: bench.run(art, "cpu", settings, baseline=baseline, command="evar demo")
                   for name, art in artifacts.items()}
        out.mkdir(parents=True, exist_ok=True)
        for name, report in reports.items():
            bench.plot(report, out / f"latency_{name}.png")
        text = "\n\n".join(f"[{name}]\n{bench.table(r)}" for name, r in reports.items())
        atomic_write_bytes(out / "latency.txt", (text + "\n").encode())
        atomic_write_json(out / "latency.json", reports)
    return run


def build_stages(plan: DemoPlan) -> list[Stage]:
    o = plan.out
    pruned, distilled = o / "models" / "pruned", o / "models" / "distilled"
    q = o / "quality"
    a = o / "artifacts"
    return [
        Stage("quality of the dense model", q / "dense.json", _quality(plan.model, q / "dense.json", plan.per_class, plan.seed)),
        Stage(f"prune {plan.sparsity:.0%} ({plan.method})", pruned, _prune(plan, pruned)),
        Stage("quality after pruning", q / "pruned.json", _quality(str(pruned), q / "pruned.json", plan.per_class, plan.seed)),
        Stage("distill from the dense teacher", distilled, _distill(plan, pruned, distilled)),
        Stage("quality after distillation", q / "distilled.json",
              _quality(str(distilled), q / "distilled.json", plan.per_class, plan.seed)),
        Stage("export dense → ONNX", a / "dense-onnx", _export(plan.model, a / "dense-onnx", "onnx")),
        Stage("export distilled → ONNX", a / "distilled-onnx", _export(str(distilled), a / "distilled-onnx", "onnx")),
        Stage("export distilled → Core ML", a / "distilled-coreml", _export(str(distilled), a / "distilled-coreml", "coreml")),
        Stage(f"export distilled → ONNX int8, CFG trimmed from scale {plan.cfg_until_scale} (deployed)", a / "deployed-onnx",
              _export(str(distilled), a / "deployed-onnx", "onnx", quantize="int8", cfg_until_scale=plan.cfg_until_scale)),
        Stage("quality of the deployed artifact (onnxruntime)", q / "deployed.json",
              _artifact_quality(a / "deployed-onnx", q / "deployed.json", plan.per_class, plan.seed)),
        Stage("images from the exported ONNX graphs", o / "exported_samples",
              _run_exported(plan, a / "distilled-onnx", distilled, o / "exported_samples")),
        Stage("latency: distilled and deployed vs dense (onnxruntime CPU, 1 thread)", o / "bench",
              _bench(plan, {"distilled": a / "distilled-onnx", "deployed": a / "deployed-onnx"}, a / "dense-onnx",
                     o / "bench")),
    ]


# ---------------------------------------------------------------- report
def quality_rows(out: Path) -> list[dict[str, Any]]:
    rows = []
    for name in ("dense", "pruned", "distilled", "deployed"):
        path = out / "quality" / f"{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            rows.append({"model": name, "params_M": r["params"] / 1e6, **{k: r["quality"].get(k) for k in
                                                                         ("class_accuracy", "frechet_distance",
                                                                          "real_data_floor", "precision", "recall")}})
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def write_report(plan: DemoPlan, seconds: dict[str, float], extra_sections: list[str]) -> Path:
    lines = [f"# EVAR demo on `{plan.model}`", "",
             f"Prune {plan.sparsity:.0%} of the blocks' weights with {plan.method}"
             + ("" if plan.head_sparsity is None else f" ({plan.head_sparsity:.0%} of the heads, the rest FFN units)")
             + f", distil from the dense teacher (on {distill_data(plan.model)} data), export, run the exported graphs.",
             "", "## Quality (`evar eval`: 50 samples per digit, cfg 1.5, top-k 900, top-p 0.96, seed 0)", "",
             "| model | VAR params | class accuracy | Fréchet distance (as many real training digits) | precision | recall |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params_M']:.2f}M | {r['class_accuracy'] * 100:.1f}% | {r['frechet_distance']:.1f} "
              f"({_num(r['real_data_floor'], '.1f')}) | {_num(r['precision'], '.3f')} | {_num(r['recall'], '.3f')} |"
              for r in quality_rows(plan.out)]
    lines += ["", "## Samples (one row per digit)", ""]
    lines += [f"**{name}**\n\n![{name}](quality/{name}_samples/grid.png)\n" for name in ("dense", "pruned", "distilled", "deployed")
              if (plan.out / "quality" / f"{name}_samples" / "grid.png").exists()]
    lines += extra_sections
    lines += ["", "## Stage times (this run; 0 = skipped because its output existed)", "",
              "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    path = plan.out / "REPORT.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def exported_sections(out: Path) -> list[str]:
    lines = []
    parity = out / "exported_samples" / "parity.json"
    if parity.exists():
        ok = json.loads(parity.read_text())["all_tokens_equal"]
        lines += ["", "## Images from the exported graphs (onnxruntime, no torch)", "",
                  f"Tokens {'identical to' if ok else 'DIFFERENT from'} PyTorch for the same seed.", "",
                  "![exported](exported_samples/grid.png)"]
    table = out / "bench" / "latency.txt"
    if table.exists():
        lines += ["", "## Latency vs the dense fp32 graph, onnxruntime CPU, 1 thread, batch 1, cfg 1.5", "",
                  "distilled: 40% pruned + distilled, fp32. deployed: the same model exported with int8 matmuls and "
                  "CFG trimming (the last two scales without the unconditional half); its quality is the `deployed` "
                  "row above, measured on the exported graphs.", "",
                  "```", table.read_text().rstrip(), "```", "",
                  "![latency](bench/latency_deployed.png)"]
    return lines


def run_demo(plan: DemoPlan) -> Path:
    t0 = time.perf_counter()
    seconds = run_stages(build_stages(plan))
    report = write_report(plan, seconds, exported_sections(plan.out))
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return report
