"""Linears as MatMul or as 1×1 Conv in onnxruntime: where `--linear-layout conv` pays, on this CPU.

    python benchmarks/linear_layout.py [--threads 1] [--iters 30]   # → results/linear_layout.json and .png

One FFN (fc1 C → 4C, an elementwise activation, fc2 4C → C; a pair of B = 2 rows of T tokens, as CFG runs it) is
built as an ONNX graph with two MatMuls and rewritten by `evar.export.onnx_layout.linears_as_convs` (with its
channel floor lifted, so every width is rewritten); the two sessions alternate, the median of `--iters` runs each.
The ratio matmul / conv over widths C and token counts T is what `MIN_CHANNELS` is chosen from, and the product
alone (one MatMul against one 1×1 Conv on the same operands) says how fast each kernel is in GFLOP/s.
Whole-graph numbers are `evar-bench` runs of two exports (README, "Linears as 1×1 convolutions").
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from evar.export import onnx_layout
from evar.runtime.bench import machine

from evar.files import atomic_write_bytes, atomic_write_json, figure_png

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (128, 256, 512, 768, 1024)
TOKENS = (16, 64, 256)


def ffn_graph(width: int, tokens: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.normal(size=(width, 4 * width)) * 0.02).astype(np.float32), "w1")
    w2 = numpy_helper.from_array((rng.normal(size=(4 * width, width)) * 0.02).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", f, [2, tokens, width])],
                              [helper.make_tensor_value_info("y", f, [2, tokens, width])], [w1, w2],
                              value_info=[helper.make_tensor_value_info("r", f, [2, tokens, 4 * width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def alternate(a, b, feeds: dict[str, np.ndarray], iters: int) -> tuple[float, float]:
    """Median seconds of a and b run in turn (after two warm-up runs each)."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(iters + 2):
        for sess, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            if i >= 2:
                out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def measure(threads: int, iters: int) -> list[dict[str, Any]]:
    rows = []
    onnx_layout.MIN_CHANNELS, floor = 16, onnx_layout.MIN_CHANNELS  # every width rewritten, then the rule back
    try:
        for width in WIDTHS:
            for tokens in TOKENS:
                plain, conv = ffn_graph(width, tokens), ffn_graph(width, tokens)
                assert onnx_layout.linears_as_convs(conv) == 2
                x = np.random.default_rng(1).normal(size=(2, tokens, width)).astype(np.float32)
                a, b = session(plain, threads), session(conv, threads)
                np.testing.assert_allclose(a.run(None, {"x": x})[0], b.run(None, {"x": x})[0], rtol=1e-3, atol=1e-4)
                t_mm, t_conv = alternate(a, b, {"x": x}, iters)
                gflop = 2 * 2 * (2 * tokens) * width * 4 * width / 1e9
                rows.append({"width": width, "tokens": tokens, "matmul_ms": 1e3 * t_mm, "conv_ms": 1e3 * t_conv,
                             "speedup": t_mm / t_conv, "matmul_gflops": gflop / t_mm, "conv_gflops": gflop / t_conv})
                print(f"C={width:5d} T={tokens:4d}  matmul {1e3 * t_mm:8.3f} ms  conv {1e3 * t_conv:8.3f} ms  "
                      f"{t_mm / t_conv:.2f}x  ({gflop / t_mm:.0f} / {gflop / t_conv:.0f} GFLOP/s)", flush=True)
    finally:
        onnx_layout.MIN_CHANNELS = floor
    return rows


def plot(rows: list[dict[str, Any]], threads: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for tokens in TOKENS:
        pts = [r for r in rows if r["tokens"] == tokens]
        ax.plot([r["width"] for r in pts], [r["speedup"] for r in pts], marker="o", label=f"2 × {tokens} tokens")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axvline(onnx_layout.MIN_CHANNELS, color="grey", ls=":", lw=0.8, label=f"MIN_CHANNELS = {onnx_layout.MIN_CHANNELS}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("FFN width C (fc1 C → 4C, fc2 4C → C)")
    ax.set_ylabel("speedup of the 1×1 Conv layout")
    ax.set_title(f"onnxruntime, {threads} thread(s): FFN as MatMul vs as 1×1 Conv")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS / "linear_layout.json")
    args = ap.parse_args()
    import onnxruntime as ort

    info = machine()
    rows = measure(args.threads, args.iters)
    result = {"command": "python benchmarks/linear_layout.py " + f"--threads {args.threads} --iters {args.iters}",
              "machine": info, "onnxruntime": ort.__version__, "threads": args.threads, "iters": args.iters,
              "min_channels": onnx_layout.MIN_CHANNELS, "rows": rows,
              "load_average_end": list(os.getloadavg())}
    atomic_write_json(args.out, result)
    plot(rows, args.threads, args.out.with_suffix(".png"))
    print(f"→ {args.out}, {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
