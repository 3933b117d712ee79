"""EVAR's latency tables: exported ONNX graphs on this machine's CPU, dense vs pruned, vs PyTorch eager.

    make bench                                  # = python benchmarks/latency.py
    python benchmarks/latency.py --iters 5      # more timed runs; --skip-d16 / --skip-digits for one part

Every stage is skipped when its output exists (models and exports under --work, default runs/bench):
  1. d16 architecture (`random:d16`: latency does not depend on weight values): model dir, pruned 20% and
     40% with the magnitude criterion (the same shapes any criterion gives at a uniform schedule), each
     exported with `evar-export onnx` (fp32);
  2. ORT CPU fp32, batch 1, CFG on: 40%, 20% and the PyTorch eager reference (`evar sample`'s path, dense),
     each loaded beside the dense ORT graph and run alternating with it (A B B A ...), so machine load hits
     both alike; per scale, VQVAE decode, end to end, wall clock and process CPU time;
  3. FLOPs per image of each variant (evar.runtime.cost) and the measured speedup next to the FLOP ratio, with this
     machine's matmul throughput and weight-streaming bandwidth (onnxruntime, same threads) as the roofline;
  4. digits: the teacher and 40%-pruned shapes (a distilled student has the pruned shapes) beside the quality
     table of benchmarks/results/prune_digits.json / distill_digits.json when those exist; and io-binding on/off.
Writes benchmarks/results/latency.json (all numbers), latency_d16.png, latency_digits.png and latency.md
(the tables the README shows, generated from the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evar.files import atomic_write_bytes, atomic_write_json, figure_png  # noqa: E402
from evar.runtime import bench as rb  # noqa: E402
from evar.runtime import cost  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- stages: models and exports
def sh(args: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)


def tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).exists() else name


def ensure_model(out: Path, args: list[str]) -> Path:
    if (out / "config.json").exists():
        print(f"skip: {out} exists")
    else:
        sh([tool("evar"), *args, "--out", str(out)])
    return out


def ensure_export(model_dir: Path, out: Path) -> Path:
    if (out / "manifest.json").exists():
        print(f"skip: {out} exists")
    else:
        sh([tool("evar-export"), "onnx", "--model", str(model_dir), "--out", str(out)])
    return out


def variants(work: Path, base_ref: str, name: str, sparsities: tuple[float, ...],
             failures: dict[str, str]) -> dict[str, Path]:
    """dense + magnitude-pruned model dirs, each exported; → label → artifact dir. A pruned variant whose
    export fails (e.g. a parity breach) is left out and recorded in `failures`."""
    models = work / "models"
    dense = ensure_model(models / name, ["convert", "--model", base_ref]) if base_ref.startswith("random:") \
        else Path(base_ref)
    out = {"dense": ensure_export(dense, work / "export" / name)}
    for s in sparsities:
        label = f"pruned {round(s * 100)}%"
        pruned = ensure_model(models / f"{name}-p{round(s * 100)}",
                              ["prune", "--model", str(dense), "--sparsity", str(s), "--method", "magnitude"])
        try:
            out[label] = ensure_export(pruned, work / "export" / f"{name}-p{round(s * 100)}")
        except subprocess.CalledProcessError:
            failures[f"{name} {label}"] = "evar-export failed (its message is printed above); variant left out"
            print(f"  → {name} {label} left out", flush=True)
    return out


# ---------------------------------------------------------------- the roofline of this machine
def roofline(threads: int, k: int = 1024, n: int = 4096, mats: int = 16,
             rows: tuple[int, ...] = (2, 16, 128, 512)) -> dict[str, Any]:
    """onnxruntime MatMul throughput: Y = Σ_i X @ W_i with `mats` distinct (k, n) fp32 weights (256 MB, more than
    any cache), for X of `rows` rows. Few rows stream weights from DRAM (GB/s is the limit), many rows are
    compute bound (GFLOP/s). Same provider and threads as the benchmarks."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rs = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rs.standard_normal((k, n)) * 0.02).astype(np.float32), f"w{i}") for i in range(mats)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]) for i in range(mats)]
    nodes.append(helper.make_node("Sum", [f"y{i}" for i in range(mats)], ["y"]))
    graph = helper.make_graph(nodes, "roofline", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = []
    for m in rows:
        x = rs.standard_normal((m, k)).astype(np.float32)
        sess.run(None, {"x": x})
        times, cpu = [], []
        deadline = time.perf_counter() + 1.5
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
            t0, c0 = time.perf_counter(), time.process_time()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        t, c = float(np.median(times)), float(np.median(cpu))
        flops, nbytes = 2 * m * k * n * mats, 4 * k * n * mats
        out.append({"rows": m, "median_ms": t * 1e3, "gflops": flops / t / 1e9, "weight_gb_per_s": nbytes / t / 1e9,
                    "cpu_ms": c * 1e3, "gflops_per_cpu_second": flops / c / 1e9})
    return {"op": f"onnxruntime MatMul ({'{'}rows{'}'}, {k}) @ ({k}, {n}) fp32 over {mats} distinct weights "
                  f"({4 * k * n * mats / 2**20:.0f} MiB), {threads} threads",
            "sweep": out, "peak_gflops": max(r["gflops"] for r in out),
            "weight_stream_gb_per_s": out[0]["weight_gb_per_s"],
            "peak_gflops_per_cpu_second": max(r["gflops_per_cpu_second"] for r in out),
            "load_average": list(os.getloadavg()),
            "note": "wall-clock numbers shrink with machine load; per CPU-second numbers much less (spinning "
                    "worker threads count as CPU time, so they are a lower bound of one core's rate)"}


def bound_ms(flops: float, weight_bytes: float, roof: dict[str, Any]) -> float:
    """Lower bound of one step: all its FLOPs at the peak, or all its weights read once at the streaming rate."""
    return 1e3 * max(flops / (roof["peak_gflops"] * 1e9), weight_bytes / (roof["weight_stream_gb_per_s"] * 1e9))


# ---------------------------------------------------------------- measuring a group of artifacts together
def measure_group(entries: list[tuple[str, Path, str, dict[str, Any]]], settings: rb.BenchSettings) -> dict[str, dict]:
    """entries: (label, artifact, device, Generator kwargs). All loaded, then run round-robin. → label → report."""
    from evar.runtime import memory

    base_rss = memory.rss_mb()
    targets = []
    for label, art, device, kw in entries:
        print(f"load {label}: {art} on {device}", flush=True)
        t = rb.load_target(art, device, settings, **kw)
        targets.append(t)
    before = rb.machine()
    peak = rb.measure(targets, settings, progress=True)
    after = list(os.getloadavg())
    reports = {}
    for (label, *_), t in zip(entries, targets):
        r = rb.summarize(t, settings, peak, base_rss, command=f"benchmarks/latency.py ({label})")
        r["machine"] = {**before, "load_average_after": after}
        reports[label] = r
        t.generator.close()
    return reports


def compare(reports: dict[str, dict], base: str) -> None:
    for label, r in reports.items():
        if label != base:
            r["speedup"] = rb.speedup(r, reports[base])
            r["speedup"]["baseline"] = base


# ---------------------------------------------------------------- tables and plots (from the JSON)
def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def d16_table(d16: dict[str, Any]) -> str:
    reps, roof = d16["reports"], d16["roofline"]
    lines = ["| variant (backend) | VAR params | GFLOP/image: transformer + decoder | all scales s | VQVAE decode s "
             "| end to end s (median / p90 / min) | CPU s, end to end | dense in the same run: end to end s / CPU s "
             "| speedup, wall: scales / end to end "
             "| speedup, CPU time: scales / end to end | FLOP ratio: transformer / with decoder | scales speedup ÷ transformer FLOP ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in reps.items():
        m, sp, e = r["macs_per_image"], r.get("speedup") or {}, r["end_to_end"]
        mr, ct = sp.get("macs_ratio") or {}, sp.get("cpu_time") or {}
        pair = d16.get("dense_in_each_pair", {}).get(label)
        paired = f"{pair['end_to_end']['median_ms'] / 1e3:.1f} / {pair['cpu_time']['median_ms'] / 1e3:.1f}" if pair else "-"
        lines.append(f"| {label} ({r['backend']}) | {r['params'] / 1e6:.1f}M | {2 * m['transformer'] / 1e9:.0f} + "
                     f"{2 * (m['vqvae_decoder'] or 0) / 1e9:.0f} | {r['scales']['median_ms'] / 1e3:.1f} | {r['decode']['median_ms'] / 1e3:.1f} "
                     f"| {e['median_ms'] / 1e3:.1f} / {e['p90_ms'] / 1e3:.1f} / {e['min_ms'] / 1e3:.1f} "
                     f"| {r['cpu_time']['end_to_end']['median_ms'] / 1e3:.1f} | {paired} "
                     f"| {_x(sp.get('scales'))} / {_x(sp.get('end_to_end'))} | {_x(ct.get('scales'))} / {_x(ct.get('end_to_end'))} "
                     f"| {_x(mr.get('transformer'))} / {_x(mr.get('with_decoder'))} | {_f(sp.get('scales_vs_transformer_macs'), 2)} |")
    lines += ["", d16.get("method", "") + "."]
    lines += ["", "Per scale (median ms; bound = max(FLOPs at the matmul peak, weights read once at the streaming rate)):", ""]
    labels = list(reps)
    first = reps[labels[0]]
    bounded = [lab for lab in ("dense", "pruned 40%") if lab in d16["bounds_ms"]]
    lines.append("| scale | tokens | " + " | ".join(labels) + "".join(f" | bound {lab}" for lab in bounded) + " |")
    lines.append("|---" * (len(labels) + len(bounded) + 2) + "|")
    for si, s in enumerate(first["per_scale"]):
        cells = " | ".join(_f(reps[lab]["per_scale"][si]["median_ms"]) for lab in labels)
        bounds = "".join(f" | {_f(d16['bounds_ms'][lab][si])}" for lab in bounded)
        lines.append(f"| {si} | {s['patch_num']}² | {cells}{bounds} |")
    lines += ["", f"Roofline ({roof['op']}), measured in the same run: peak {roof['peak_gflops']:.0f} GFLOP/s wall-clock "
                  f"({roof['peak_gflops_per_cpu_second']:.0f} GFLOP per CPU-second), weight streaming "
                  f"{roof['weight_stream_gb_per_s']:.1f} GB/s at {roof['sweep'][0]['rows']} rows. End to end, each variant achieves "
                  + ", ".join(f"{lab} {r['flops_per_image'] / r['end_to_end']['median_ms'] / 1e6:.0f} GFLOP/s wall "
                              f"({r['flops_per_image'] / r['cpu_time']['end_to_end']['median_ms'] / 1e6:.0f} per CPU-second)"
                              for lab, r in reps.items()) + "."]
    return "\n".join(lines)


def digits_table(dig: dict[str, Any]) -> str:
    lines = ["| model | shapes | VAR params | end to end ms (median / p90 / min) | CPU ms end to end | all scales ms | decode ms "
             "| speedup (wall / CPU) | class accuracy | Fréchet distance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in dig["rows"]:
        r = dig["reports"][row["latency"]]
        sp = r.get("speedup") or {}
        e = r["end_to_end"]
        lines.append(f"| {row['model']} | {row['latency']} | {r['params'] / 1e6:.2f}M | {e['median_ms']:.2f} / {e['p90_ms']:.2f} / "
                     f"{e['min_ms']:.2f} | {_f(r.get('cpu_time', {}).get('end_to_end', {}).get('median_ms'), 2)} | {r['scales']['median_ms']:.2f} "
                     f"| {r['decode']['median_ms']:.2f} | {_x(sp.get('end_to_end'))} / {_x((sp.get('cpu_time') or {}).get('end_to_end'))} "
                     f"| {_f(row.get('class_accuracy'), 3)} | {_f(row.get('frechet_distance'), 2)} |")
    io = dig.get("io_binding")
    if io:
        lines += ["", f"IO binding (KV cache kept as OrtValues) vs numpy feeds, dense: end to end {io['on_ms']:.2f} vs "
                      f"{io['off_ms']:.2f} ms wall ({io['speedup']:.2f}x), {io['on_cpu_ms']:.2f} vs {io['off_cpu_ms']:.2f} ms CPU "
                      f"({io['cpu_speedup']:.2f}x)."]
    return "\n".join(lines)


def plot_d16(d16: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = d16["reports"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    labels = list(reps)
    width = 0.8 / len(labels)
    first = reps[labels[0]]
    for k, lab in enumerate(labels):
        xs = np.arange(len(first["per_scale"])) + (k - (len(labels) - 1) / 2) * width
        ax1.bar(xs, [s["median_ms"] for s in reps[lab]["per_scale"]], width, label=lab)
    ax1.plot(range(len(first["per_scale"])), d16["bounds_ms"]["dense"], "k_", markersize=14, label="bound, dense")
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(first["per_scale"])), [f"{s['patch_num']}²" for s in first["per_scale"]])
    ax1.set_xlabel("scale (tokens)")
    ax1.set_ylabel("median ms (log)")
    ax1.set_title("d16 per scale, onnxruntime CPU fp32, batch 1, CFG")
    ax1.legend(fontsize=7)
    sc = [reps[lab]["scales"]["median_ms"] / 1e3 for lab in labels]
    dec = [reps[lab]["decode"]["median_ms"] / 1e3 for lab in labels]
    ax2.bar(labels, sc, label="all scales (transformer)")
    ax2.bar(labels, dec, bottom=sc, label="VQVAE decode")
    for i, lab in enumerate(labels):
        sp = (reps[lab].get("speedup") or {})
        pair = d16.get("dense_in_each_pair", {}).get(lab)
        note = f"{reps[lab]['end_to_end']['median_ms'] / 1e3:.1f}s"
        if sp.get("end_to_end"):
            note += (f"\n{sp['end_to_end']:.2f}x vs dense {pair['end_to_end']['median_ms'] / 1e3:.1f}s"
                     f"\nin the same run (FLOPs {sp['macs_ratio']['with_decoder']:.2f}x)")
        ax2.text(i, sc[i] + dec[i], note, ha="center", va="bottom", fontsize=7)
    ax2.set_ylim(top=max(a + b for a, b in zip(sc, dec)) * 1.3)  # room for the notes
    ax2.set_ylabel("seconds (median)")
    ax2.set_title("end to end")
    ax2.tick_params(axis="x", labelsize=7)
    ax2.legend(fontsize=7, loc="lower left")
    m = first["machine"]
    fig.suptitle(f"{m['cpu']}, {m['cpus']} CPUs, {first['threads']} threads; load average {m['load_average_before'][0]:.1f} "
                 f"before, {m['load_average_after'][0]:.1f} after", fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig))


# ---------------------------------------------------------------- parts
def run_d16(args, settings: rb.BenchSettings) -> dict[str, Any]:
    failures: dict[str, str] = {}
    arts = variants(args.work, args.d16_ref, "d16", (0.2, 0.4), failures)
    if "pruned 40%" not in arts:
        raise SystemExit(f"d16 pruned 40% could not be exported: {failures}")
    roof = roofline(settings.threads)
    print(f"roofline: peak {roof['peak_gflops']:.0f} GFLOP/s, weight streaming {roof['weight_stream_gb_per_s']:.1f} GB/s", flush=True)
    # pairs, each against the dense graph in the same run (two d16 variants fit in memory beside other jobs)
    others = [(label, art, "cpu", {}) for label, art in arts.items() if label != "dense"][::-1]  # 40% first
    if not args.skip_torch:
        others.append(("dense, PyTorch eager", arts["dense"], "torch-cpu", {"model": str(args.work / "models" / "d16")}))
    reports, dense_runs = {}, {}
    for entry in others:
        group = measure_group([entry, ("dense", arts["dense"], "cpu", {})], settings)
        compare(group, "dense")
        reports[entry[0]] = group[entry[0]]
        dense_runs[entry[0]] = group["dense"]
        print(rb.table({**group[entry[0]], "baseline": group["dense"]}), flush=True)
    first = next(iter(dense_runs))
    order = ["dense", *sorted(k for k in reports if k.startswith("pruned")), *(k for k in reports if not k.startswith("pruned"))]
    reports = {k: dense_runs[first] if k == "dense" else reports[k] for k in order}
    bounds = {}
    for label, r in reports.items():
        a_var = json.loads((Path(arts.get(label, arts["dense"])) / "manifest.json").read_text())["model"]["var"]
        wbytes = 4 * cost.var_params(a_var)
        bounds[label] = [bound_ms(2 * cost.step_macs(a_var, si)["total"], wbytes, roof) for si in range(len(a_var["patch_nums"]))]
    d16 = {"reports": reports, "roofline": roof, "bounds_ms": bounds, "artifacts": {k: str(v) for k, v in arts.items()},
           "left_out": failures,
           "dense_in_each_pair": {k: {"end_to_end": r["end_to_end"], "scales": r["scales"], "decode": r["decode"],
                                      "cpu_time": r["cpu_time"]["end_to_end"]} for k, r in dense_runs.items()},
           "method": "each variant measured against the dense graph in its own run (both loaded, alternating A B B A); "
                     f"'dense' shows the run against {first}"}
    p40, torch_rep = reports.get("pruned 40%"), reports.get("dense, PyTorch eager")
    sp = p40["speedup"]
    d16["acceptance"] = {
        "pruned 40% scales speedup": sp["scales"], "pruned 40% transformer FLOP ratio": sp["macs_ratio"]["transformer"],
        "scales speedup >= 0.9 x FLOP ratio": sp["scales"] >= 0.9 * sp["macs_ratio"]["transformer"],
        "pruned 40% end-to-end speedup (VQVAE decoder included)": sp["end_to_end"],
        "end-to-end FLOP ratio (decoder included)": sp["macs_ratio"]["with_decoder"],
    }
    if torch_rep:
        ort_ms = dense_runs["dense, PyTorch eager"]["end_to_end"]["median_ms"]
        torch_ms = torch_rep["end_to_end"]["median_ms"]
        d16["acceptance"].update({"ORT dense end to end ms": ort_ms, "PyTorch eager dense end to end ms": torch_ms,
                                  "ORT not slower than PyTorch eager": ort_ms <= torch_ms,
                                  "ORT speedup over PyTorch eager": torch_ms / ort_ms})
    return d16


def quality_rows() -> list[dict[str, Any]]:
    """Rows of the digits quality suites (prune_digits.json: no distillation; distill_digits.json: KD), if present."""
    rows = []
    path = RESULTS / "prune_digits.json"
    if path.exists():
        data = json.loads(path.read_text())
        rows.append({"model": f"dense ({data['model']})", **_q(data["dense"]), "source": path.name})
        rows += [{"model": f"{r['variant']} {round(r['sparsity'] * 100)}%, no KD", **_q(r), "source": path.name}
                 for r in data["rows"]]
    path = RESULTS / "distill_digits.json"
    if path.exists():
        rows += [{"model": r["name"], **_q(r), "source": path.name} for r in json.loads(path.read_text())["rows"]]
    return rows


def _q(r: dict[str, Any]) -> dict[str, Any]:
    return {"class_accuracy": r["class_accuracy"], "frechet_distance": r["frechet_distance"], "params": r.get("params")}


def run_digits(args, settings: rb.BenchSettings) -> dict[str, Any]:
    builtin = ROOT / "evar" / "assets" / "digits" / "config.json"
    base = str(builtin.parent) if builtin.exists() else "random:digits"
    failures: dict[str, str] = {}
    arts = variants(args.work, base, "digits" if builtin.exists() else "random-digits-latency", (0.2, 0.4), failures)
    entries = [(label, art, "cpu", {}) for label, art in arts.items()]
    entries.append(("dense, no IO binding", arts["dense"], "cpu", {"io_binding": False}))
    digit_settings = rb.BenchSettings(batch=1, warmup=3, iters=max(20, settings.iters), seed=0, threads=settings.threads)
    reports = measure_group(entries, digit_settings)
    compare(reports, "dense")
    on, off = reports["dense"]["end_to_end"]["median_ms"], reports["dense, no IO binding"]["end_to_end"]["median_ms"]
    on_cpu = reports["dense"]["cpu_time"]["end_to_end"]["median_ms"]
    off_cpu = reports["dense, no IO binding"]["cpu_time"]["end_to_end"]["median_ms"]
    dig = {"model": base, "reports": reports, "artifacts": {k: str(v) for k, v in arts.items()}, "left_out": failures,
           "io_binding": {"on_ms": on, "off_ms": off, "speedup": off / on, "on_cpu_ms": on_cpu, "off_cpu_ms": off_cpu,
                          "cpu_speedup": off_cpu / on_cpu},
           "rows": [{"model": f"teacher ({base})", "latency": "dense"},
                    *({"model": f"{label} (any criterion; a distilled student has the same shapes)", "latency": label}
                      for label in arts if label != "dense")],
           "quality_sources": sorted({r["source"] for r in quality_rows()})}
    attach_quality(dig)
    return dig


def attach_quality(dig: dict[str, Any]) -> None:
    """Quality rows beside the latency of the variant with the same parameter count (= the same shapes)."""
    by_params = {r["params"]: label for label, r in dig["reports"].items() if "IO binding" not in label}
    rows = []
    for q in quality_rows():
        label = by_params.get(q["params"])
        if label is not None:
            rows.append({**q, "latency": label})
    if rows:
        dig["rows"] = rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench", help="models and exports (reused when present)")
    ap.add_argument("--iters", type=int, default=5, help="timed generations per variant (d16: ~15-35 s each here)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-d16", action="store_true")
    ap.add_argument("--d16-ref", default="random:d16", help="model of the large comparison (a smaller one: a quick smoke run)")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-torch", action="store_true", help="no PyTorch eager reference (saves ~1/4 of the d16 time)")
    ap.add_argument("--tables-only", action="store_true", help="rewrite latency.md from latency.json, measure nothing")
    args = ap.parse_args()
    if args.tables_only:
        result = json.loads((RESULTS / "latency.json").read_text())
        draw_plots(result)
        write_markdown(result)
        return
    settings = rb.BenchSettings(batch=1, warmup=args.warmup, iters=args.iters, seed=0, threads=args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / "latency.json"
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.update({"format": "evar-latency-suite-v1", "command": "python benchmarks/latency.py " + " ".join(sys.argv[1:]),
                   "settings": {"batch": 1, "cfg": "artifact default (1.5)", "warmup": args.warmup, "iters": args.iters,
                                "threads": args.threads, "precision": "fp32", "backend": "onnxruntime CPU"},
                   "machine": {**rb.machine(), "platform": platform.platform()}})
    t0 = time.perf_counter()
    if not args.skip_d16:
        result["d16"] = run_d16(args, settings)
        atomic_write_json(out_path, result)
    if not args.skip_digits:
        result["digits"] = run_digits(args, settings)
        atomic_write_json(out_path, result)
    draw_plots(result)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out_path, result)
    write_markdown(result)
    print(f"→ {out_path}, {RESULTS / 'latency.md'} ({result['seconds']:.0f}s)")


def draw_plots(result: dict[str, Any]) -> None:
    """latency_d16.png and latency_digits.png from latency.json alone."""
    if "d16" in result:
        plot_d16(result["d16"], RESULTS / "latency_d16.png")
    if "digits" in result:
        reps = result["digits"]["reports"]
        pruned = "pruned 40%" if "pruned 40%" in reps else next(k for k in reps if k != "dense")
        both = {**reps[pruned], "baseline": reps["dense"]}
        print(rb.table(both))
        print(f"plot → {rb.plot(both, RESULTS / 'latency_digits.png')}")


def _how(section: dict[str, Any]) -> str:
    r = next(iter(section["reports"].values()))
    return (f"{r['threads']} threads, {r['warmup']} warm-up + {r['iterations']} timed runs; each compared variant loaded "
            "beside its baseline and run alternating with it (A B B A ...)")


def write_markdown(result: dict[str, Any]) -> str:
    """latency.md from latency.json alone (also: `--tables-only` redraws it without measuring)."""
    m = result["machine"]
    md = [f"# Latency (generated by `{result['command']}` from latency.json)", "",
          f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; onnxruntime CPU fp32, batch 1, CFG 1.5.", ""]
    if "d16" in result:
        md += ["## VAR d16 architecture (random weights), dense vs magnitude-pruned", "", _how(result["d16"]) + ".", "",
               d16_table(result["d16"]), "", "Acceptance: " + json.dumps(result["d16"]["acceptance"]), ""]
    if "digits" in result:
        md += [f"## digits ({result['digits']['model']})", "", _how(result["digits"]) + ".", "",
               digits_table(result["digits"]), ""]
    text = "\n".join(md)
    atomic_write_bytes(RESULTS / "latency.md", text.encode())
    print(text)
    return text


if __name__ == "__main__":
    main()
