"""Distilled Decoding latency on the d16 architecture: 1 and 2 student passes against the 10-scale teacher, ONNX.

    python benchmarks/dd_latency.py                 # --iters 7 --work runs/dd_latency

Stages (each skipped when its output exists under --work):
  1. a DD student built from `random:d16` (the teacher's weights copied in, no training: latency does not depend
     on weight values), saved as a DD model directory;
  2. `evar-export onnx` of the student (passes t = 0 and 5: one step, and the second pass of two) and of the
     `random:d16` teacher (VAR's per-scale KV-cached step graph, top-k 900, top-p 0.96; run at cfg 1.5);
     exports run with nice and OMP_NUM_THREADS=1;
  3. timing on onnxruntime, batch 1, ONE intra-op thread for every variant, through `evar.runtime.Generator`:
     teacher, 1 step, 2 steps run alternately (the order rotates every round) after one warm-up each; medians of
     end to end and of the same without the VQVAE decoder; the load average before and after.
Next to each: the multiply-accumulate ratio (transformer: benchmarks/dd_cost.py's accounting; end to end: plus the
decoder graph's MACs from evar.runtime.cost.onnx_macs). Writes benchmarks/results/dd_latency.json and .png.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dd_cost import student_step_macs  # noqa: E402
from latency import sh, tool  # noqa: E402

from evar.files import atomic_write_bytes, atomic_write_json, figure_png  # noqa: E402
from evar.runtime import cost  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
T_LIST = (0, 5)  # d16 has 10 scales: the two-step run `evar sample --steps 2` makes
CFG, TOP_K, TOP_P = 1.5, 900, 0.96


def ensure_student(out: Path) -> Path:
    if (out / "config.json").exists():
        print(f"skip: {out} exists")
        return out
    from evar import zoo
    from evar.dd.model import from_teacher, save_dd_dir

    save_dd_dir(from_teacher(zoo.load("random:d16")), out, {"source": "random:d16", "note": "untrained (latency only)"})
    return out


def ensure_export(model: str, out: Path, extra: list[str]) -> Path:
    if (out / "manifest.json").exists():
        print(f"skip: {out} exists")
        return out
    os.environ["OMP_NUM_THREADS"] = "1"
    sh(["nice", "-n", "10", tool("evar-export"), "onnx", "--model", model, "--out", str(out), *extra])
    return out


def time_variants(teacher_art: Path, dd_art: Path, iters: int) -> dict[str, dict]:
    from evar.runtime import Generator

    labels = np.array([207])
    teacher = Generator(teacher_art, "cpu", threads=1)
    student = Generator(dd_art, "cpu", threads=1)
    runs = {
        "teacher (10 scales, cfg 1.5)": lambda seed: teacher.run_batch(labels, seed, CFG, TOP_K, TOP_P)[2],
        "DD 1 step": lambda seed: student.run_batch(labels, seed, 0.0, 0, 0.0, 0, [0])[2],
        "DD 2 steps (t 0,5)": lambda seed: student.run_batch(labels, seed, 0.0, 0, 0.0, 0, list(T_LIST))[2],
    }
    names = list(runs)
    samples: dict[str, list] = {n: [] for n in names}
    for n in names:  # warm-up
        runs[n](0)
    for i in range(iters):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            timing = runs[n](i + 1)
            samples[n].append((timing.total_ms, timing.total_ms - timing.decode_ms))
            print(f"  round {i + 1} {n}: {timing.total_ms:.0f} ms (decoder {timing.decode_ms:.0f})", flush=True)
    return {n: {"end_to_end_ms": [s[0] for s in samples[n]], "no_decoder_ms": [s[1] for s in samples[n]],
                "median_end_to_end_ms": statistics.median(s[0] for s in samples[n]),
                "median_no_decoder_ms": statistics.median(s[1] for s in samples[n])} for n in names}


def macs(teacher_art: Path) -> dict[str, dict]:
    from evar.contract import DECODER_GRAPH, load_artifact

    art = load_artifact(teacher_art)
    var = art.var
    decoder = cost.onnx_macs(art.graph_path(DECODER_GRAPH))
    gen = cost.generation_macs(var)
    one = student_step_macs(var)
    return {"teacher (10 scales, cfg 1.5)": {"transformer": gen["transformer"], "end_to_end": gen["total"] + decoder},
            "DD 1 step": {"transformer": one, "end_to_end": one + decoder},
            "DD 2 steps (t 0,5)": {"transformer": 2 * one, "end_to_end": 2 * one + decoder},
            "decoder": decoder}


def plot(rows: dict[str, dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [rows[n]["median_end_to_end_ms"] / 1e3 for n in names], 0.4, label="end to end")
    ax.bar([i + 0.2 for i in x], [rows[n]["median_no_decoder_ms"] / 1e3 for n in names], 0.4, label="without decoder")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("seconds per image (median)")
    ax.set_title("d16 architecture, onnxruntime CPU, 1 thread, batch 1")
    ax.legend()
    fig.tight_layout()
    return figure_png(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "dd_latency")
    args = ap.parse_args()
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    student_dir = ensure_student(args.work / "dd_d16")
    dd_art = ensure_export(str(student_dir), args.work / "dd_d16_onnx", ["--t-list", ",".join(map(str, T_LIST))])
    teacher_art = ensure_export("random:d16", args.work / "var_d16_onnx", ["--top-k", str(TOP_K), "--top-p", str(TOP_P)])
    load_before = list(os.getloadavg())
    rows = time_variants(teacher_art, dd_art, args.iters)
    load_after = list(os.getloadavg())
    counted = macs(teacher_art)
    base = "teacher (10 scales, cfg 1.5)"
    for name, row in rows.items():
        row["macs"] = counted[name]
        for kind in ("end_to_end", "no_decoder"):  # round by round: both ran within seconds of each other
            row[f"paired_speedup_{kind}"] = round(statistics.median(
                t / v for t, v in zip(rows[base][f"{kind}_ms"], row[f"{kind}_ms"])), 2)
        row["speedup_end_to_end"] = round(rows[base]["median_end_to_end_ms"] / row["median_end_to_end_ms"], 2)
        row["speedup_no_decoder"] = round(rows[base]["median_no_decoder_ms"] / row["median_no_decoder_ms"], 2)
        row["mac_ratio_end_to_end"] = round(counted[base]["end_to_end"] / counted[name]["end_to_end"], 2)
        row["mac_ratio_transformer"] = round(counted[base]["transformer"] / counted[name]["transformer"], 2)
        print(f"{name}: {row['median_end_to_end_ms']:.0f} ms ({row['speedup_end_to_end']}x, paired "
              f"{row['paired_speedup_end_to_end']}x; MACs {row['mac_ratio_end_to_end']}x), without decoder "
              f"{row['median_no_decoder_ms']:.0f} ms ({row['speedup_no_decoder']}x, paired {row['paired_speedup_no_decoder']}x; "
              f"transformer MACs {row['mac_ratio_transformer']}x)")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "dd_latency.json", {
        "format": "evar-benchmark", "benchmark": "dd_latency", "command": "python benchmarks/dd_latency.py "
        + " ".join(sys.argv[1:]),
        "what": "d16 architecture with random weights (DD student built from random:d16, untrained); onnxruntime CPU "
                "execution provider, 1 intra-op thread for every variant, batch 1; variants alternate, order rotating "
                "per round, one warm-up each; medians; speedup = ratio of the medians, paired_speedup = median over rounds of the round's teacher time / the variant's. Teacher = VAR's ONNX export (per-scale KV-cached step graph, "
                "CFG batch of 2 rows, top-k 900, top-p 0.96, cfg 1.5). Without decoder = end to end minus the "
                "VQVAE decoder graph's time (the DD time includes the host's noise).",
        "settings": {"iters": args.iters, "threads": 1, "batch": 1, "t_list": list(T_LIST), "cfg": CFG},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_before": load_before,
                    "load_average_after": load_after},
        "decoder_macs": counted["decoder"], "rows": rows, "seconds": round(time.perf_counter() - t0, 1)})
    atomic_write_bytes(RESULTS / "dd_latency.png", plot(rows))
    print(f"→ {RESULTS / 'dd_latency.json'}, dd_latency.png ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
