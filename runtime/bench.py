"""`evar-bench`: latency of an exported artifact per scale, VQVAE decode and end to end, optionally against a
baseline measured in the same run.

    evar-bench --device cpu --artifact runs/export/pruned-d16 --baseline runs/export/dense-d16 \
        --iters 10 --json pruned.json --plot pruned.png

Conventions (as ml-stable-diffusion and onnxruntime_perf_test report latency): load every artifact first (load time reported, not counted), warm up, then
time back-to-back generations and report the median and p90 (numpy percentiles, as evar-ios-bench). With a
baseline both stay loaded and the runs alternate A B B A …, so drift in machine load and temperature hits
both; the speedup is the ratio of their medians. The JSON uses the field names of evar-ios-bench
(ios_demo/README.md) plus MACs, memory, the machine and the raw samples; the table and the plot are
drawn from that JSON.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer

from evar.cli_options import Overwrite, command_line
from evar.errors import EvarError, run_cli
from evar.outputs import claim_output

FORMAT, TOOL = "evar-bench-v1", "evar-bench"
SWIFT_FIELDS = ("format", "tool", "device", "os", "backend", "compute_units", "threads", "precision", "weights",
                "compression", "batch", "cfg", "top_k", "top_p", "seed", "sampling", "kv_cache", "warmup",
                "iterations", "load_ms", "per_scale", "decode", "end_to_end", "throughput_images_per_s", "params",
                "artifact", "model_ref", "stage_units", "few_step")


@dataclass(frozen=True)
class BenchSettings:
    batch: int = 1
    warmup: int = 2
    iters: int = 10
    seed: int = 0
    cfg: float | None = None  # None: the artifact's default
    threads: int | None = None  # None: every core

    def validate(self) -> None:
        if self.batch < 1:
            raise EvarError(f"--batch must be >= 1, got {self.batch}")
        if self.iters < 1:
            raise EvarError(f"--iters must be >= 1, got {self.iters}")
        if self.warmup < 0:
            raise EvarError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise EvarError(f"--threads must be >= 1, got {self.threads}")
        if self.cfg is not None and not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise EvarError(f"--cfg must be a finite number >= 0, got {self.cfg}")


@dataclass
class Target:
    """One artifact on one device, loaded, with what was measured on it."""

    device: str
    generator: Any  # runtime.Generator
    load_mb: float | None
    timings: list[Any] = field(default_factory=list)
    run_peak_mb: float | None = None

    @property
    def artifact(self):
        return self.generator.artifact


# ---------------------------------------------------------------- measuring
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def load_target(artifact: str | Path, device: str, settings: BenchSettings, io_binding: bool = True,
                model: Any = None, verify_hashes: bool = False) -> Target:
    from evar.runtime import memory
    from evar.runtime.generator import Generator

    gc.collect()  # so that garbage freed during the load does not hide what the load adds
    before = memory.rss_mb()
    gen = Generator(artifact, device, threads=settings.threads, io_binding=io_binding, model=model,
                    verify_hashes=verify_hashes, batch_size=settings.batch)
    if gen.artifact.family == "dd":  # its passes are not scales: the per-scale report would mislabel them
        gen.close()
        raise EvarError(f"evar-bench measures VAR artifacts; {gen.artifact.name} is a Distilled Decoding export "
                        "(time it with benchmarks/dd_latency.py, or Generator(...).generate(..., t_list=...))")
    after = memory.rss_mb()
    return Target(device, gen, None if before is None or after is None else max(0.0, after - before))


def bench_labels(batch: int, num_classes: int) -> np.ndarray:
    return (np.arange(batch) * 7 + 3) % num_classes


def measure(targets: list[Target], settings: BenchSettings, progress: bool = False) -> float:
    """Warm-up + timed generations of every target, alternating (A B, B A, …). → process peak RSS (MB)."""
    from evar.runtime import memory

    process_peak = memory.peak_mb()
    rounds = settings.warmup + settings.iters
    for r in range(rounds):
        for t in (targets if r % 2 == 0 else targets[::-1]):
            a = t.artifact
            cfg = a.cfg_default if settings.cfg is None else settings.cfg
            process_peak = max(process_peak, memory.peak_mb())
            resettable = memory.reset_peak()
            before = memory.rss_mb()
            _, _, timing = t.generator.run_batch(bench_labels(settings.batch, a.num_classes), settings.seed, cfg,
                                                 a.top_k, a.top_p)
            peak = memory.peak_mb()
            if resettable and before is not None:
                t.run_peak_mb = max(t.run_peak_mb or 0.0, peak - before)
            if r >= settings.warmup:
                t.timings.append(timing)
        if progress:
            what = "warm-up" if r < settings.warmup else "timed"
            print(f"  round {r + 1}/{rounds} ({what})", file=sys.stderr, flush=True)
    return max(process_peak, memory.peak_mb())


# ---------------------------------------------------------------- summarising (the JSON)
def stats(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"median_ms": float(np.percentile(v, 50)), "p90_ms": float(np.percentile(v, 90)), "min_ms": float(v.min())}


def macs_per_image(target: Target, cfg: float) -> dict[str, Any]:
    from evar.runtime import cost
    from evar.contract import DECODER_GRAPH

    a = target.artifact
    rows = 1 if target.device == "torch-cpu" and cfg == 0 else 2  # graphs always run the CFG pair
    early = ((a.data.get("generation") or {}).get("early_model") or {}).get("var")
    out = cost.generation_macs(a.var, batch=1, cfg_rows=rows, cfg_until_scale=a.cfg_until_scale,
                               token_keep=a.token_keep, early_var=early, split_scale=a.split_scale)
    try:
        out["vqvae_decoder"] = cost.onnx_macs(a.graph_path(DECODER_GRAPH)) if a.format == "onnx" else None
    except Exception as err:  # shape inference can fail on exotic graphs: report, don't crash the bench
        out["vqvae_decoder"], out["vqvae_decoder_error"] = None, str(err).splitlines()[0]
    out["total_with_decoder"] = out["total"] + out["vqvae_decoder"] if out["vqvae_decoder"] is not None else None
    return out


def summarize(target: Target, settings: BenchSettings, process_peak_mb: float | None = None,
              base_rss_mb: float | None = None, command: str | None = None) -> dict[str, Any]:
    """The report of one target; `base_rss_mb` is the RSS before any artifact was loaded."""
    from evar.runtime import cost

    a, gen, runs = target.artifact, target.generator, target.timings
    b = gen.backend
    cfg = a.cfg_default if settings.cfg is None else settings.cfg
    e2e = stats([t.total_ms for t in runs])
    scales = stats([sum(t.scale_ms) for t in runs])
    decode = stats([t.decode_ms for t in runs])
    macs = macs_per_image(target, cfg)
    flops = 2 * (macs["total_with_decoder"] or macs["total"])
    torch_ref = b.name == "torch"
    report: dict[str, Any] = {
        "format": FORMAT, "tool": TOOL,
        "device": f"{platform.machine()} ({machine()['cpu']}, {os.cpu_count()} CPUs)",
        "os": f"{platform.system()} {platform.release()}",
        "backend": b.name, "compute_units": b.compute_units, "threads": b.threads,
        "precision": a.precision, "weights": a.weights, "compression": a.compression,
        "batch": settings.batch, "cfg": cfg, "top_k": a.top_k, "top_p": a.top_p, "seed": settings.seed,
        "sampling": "host" if torch_ref else ("graph" if a.data["sampling"]["in_graph"] else "host"),
        "kv_cache": "eager" if torch_ref else a.kv_mode,
        "warmup": settings.warmup, "iterations": len(runs), "load_ms": gen.load_ms,
        "per_scale": [{"scale_index": si, "patch_num": pn, **_ms(stats([t.scale_ms[si] for t in runs]), "median_ms", "p90_ms")}
                      for si, pn in enumerate(a.patch_nums)],
        "decode": _ms(decode, "median_ms", "p90_ms"),
        "end_to_end": e2e,
        "throughput_images_per_s": settings.batch * 1000 / e2e["median_ms"] if e2e["median_ms"] > 0 else 0.0,
        "params": cost.var_params(a.var),
        "artifact": a.name, "model_ref": a.model_ref,
        # additions to the evar-ios-bench fields
        "device_name": target.device,
        "execution_provider": getattr(b, "execution_provider", None),
        "io_binding": getattr(b, "io_binding", None),
        "scales": _ms(scales, "median_ms", "p90_ms"),
        "macs_per_image": macs,
        "flops_per_image": flops,
        "achieved_gflops": flops * settings.batch / e2e["median_ms"] / 1e6 if e2e["median_ms"] > 0 else None,
        "peak_memory_mb": None if None in (base_rss_mb, target.load_mb, target.run_peak_mb)
        else base_rss_mb + target.load_mb + target.run_peak_mb,
        "memory": {"load_mb": target.load_mb, "generation_peak_mb": target.run_peak_mb,
                   "process_peak_mb": process_peak_mb,
                   "note": "peak_memory_mb = RSS before loading + load_mb + generation_peak_mb (this artifact alone)"},
        "cpu_time": cpu_time(runs, a.patch_nums),
        "samples_ms": {"end_to_end": [t.total_ms for t in runs], "decode": [t.decode_ms for t in runs],
                       "per_scale": [[t.scale_ms[si] for t in runs] for si in range(a.num_scales)]},
        "machine": machine(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "baseline": None, "speedup": None,
    }
    # host-sampled Core ML: which units ran each stage; null otherwise (as EVARKit writes it)
    report["stage_units"] = dict(b.stage_units) if getattr(b, "stage_units", None) else None
    report["few_step"] = None  # EVARKit's DD bench fills it; evar-bench measures VAR artifacts only
    return report


def cpu_time(runs: list[Any], patch_nums: list[int]) -> dict[str, Any]:
    """The same summaries over process CPU time (all threads): robust to preemption on a shared machine, but
    it counts spinning worker threads too, so compare it between runs with the same --threads."""
    return {"end_to_end": stats([t.total_cpu_ms for t in runs]), "scales": stats([sum(t.scale_cpu_ms) for t in runs]),
            "decode": stats([t.decode_cpu_ms for t in runs]),
            "per_scale": [{"scale_index": si, "patch_num": pn, **stats([t.scale_cpu_ms[si] for t in runs])}
                          for si, pn in enumerate(patch_nums)],
            "note": "time.process_time of this process over the same spans as the wall-clock numbers"}


def _ms(s: dict[str, float], *keys: str) -> dict[str, float]:
    return {k: s[k] for k in keys}


def speedup(report: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """How many times faster `report` is than `base` (ratios of medians), beside how many times fewer MACs."""
    def ratio(x: float | None, y: float | None) -> float | None:
        return x / y if x and y else None

    m, mb = report["macs_per_image"], base["macs_per_image"]
    out = {
        "end_to_end": ratio(base["end_to_end"]["median_ms"], report["end_to_end"]["median_ms"]),
        "end_to_end_min": ratio(base["end_to_end"]["min_ms"], report["end_to_end"]["min_ms"]),
        "scales": ratio(base["scales"]["median_ms"], report["scales"]["median_ms"]),
        "decode": ratio(base["decode"]["median_ms"], report["decode"]["median_ms"]),
        "per_scale": [ratio(b["median_ms"], s["median_ms"]) for b, s in zip(base["per_scale"], report["per_scale"])]
        if len(base["per_scale"]) == len(report["per_scale"]) else None,
        "macs_ratio": {"transformer": ratio(mb["transformer"], m["transformer"]),
                       "steps": ratio(mb["total"], m["total"]),
                       "with_decoder": ratio(mb.get("total_with_decoder"), m.get("total_with_decoder"))},
        "method": "both loaded in one process, generations alternating A B B A ...; ratio of medians",
        "cpu_time": {k: ratio(base["cpu_time"][k]["median_ms"], report["cpu_time"][k]["median_ms"])
                     for k in ("end_to_end", "scales", "decode")},
    }
    t = out["macs_ratio"]["transformer"]
    out["scales_vs_transformer_macs"] = ratio(out["scales"], t)
    return out


# ---------------------------------------------------------------- table and plot (from the JSON)
def _fmt_count(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:.0f}{unit}"


def table(report: dict[str, Any]) -> str:
    base, sp = report.get("baseline"), report.get("speedup")
    threads = report["threads"] if report["threads"] is not None else "auto"
    lines = [
        f"{report['artifact']} on {report['device_name']} ({report['backend']}, {threads} threads, {report['precision']}, "
        f"batch {report['batch']}, cfg {report['cfg']}, top-k {report['top_k']}, top-p {report['top_p']}): "
        f"{report['warmup']} warm-up + {report['iterations']} timed runs",
        f"load {report['load_ms']:.0f} ms | VAR params {_fmt_count(report['params'])} | "
        f"{_fmt_count(report['flops_per_image'], 'FLOP')}/image "
        f"({_fmt_count(2 * report['macs_per_image']['transformer'], 'FLOP')} transformer) | "
        f"peak memory {_mb(report['peak_memory_mb'])}",
    ]
    if base:
        lines.append(f"baseline: {base['artifact']} on {base['device_name']} ({base['backend']}), alternating in the same run")
    head = f"{'stage':<16}{'median ms':>11}{'p90 ms':>10}"
    if base:
        head += f"{'base median':>13}{'speedup':>9}"
    lines += ["", head]

    def row(name: str, s: dict, b: dict | None, r: float | None) -> str:
        text = f"{name:<16}{s['median_ms']:>11.2f}{s['p90_ms']:>10.2f}"
        if base:
            text += f"{b['median_ms']:>13.2f}{_x(r):>9}" if b else f"{'-':>13}{'-':>9}"
        return text

    same_scales = bool(base) and len(base["per_scale"]) == len(report["per_scale"])
    for i, s in enumerate(report["per_scale"]):
        b = base["per_scale"][i] if same_scales else None
        lines.append(row(f"scale {s['scale_index']} ({s['patch_num']}x{s['patch_num']})", s, b,
                         sp["per_scale"][i] if same_scales and sp["per_scale"] else None))
    lines.append(row("all scales", report["scales"], base and base["scales"], sp and sp["scales"]))
    lines.append(row("VQVAE decode", report["decode"], base and base["decode"], sp and sp["decode"]))
    lines.append(row("end to end", report["end_to_end"], base and base["end_to_end"], sp and sp["end_to_end"]))
    e2e = report["end_to_end"]
    lines.append(f"end to end min {e2e['min_ms']:.2f} ms | throughput {report['throughput_images_per_s']:.3g} images/s")
    ct = report.get("cpu_time")
    if ct:
        text = (f"process CPU time (median ms): all scales {ct['scales']['median_ms']:.2f}, "
                f"decode {ct['decode']['median_ms']:.2f}, "
                f"end to end {ct['end_to_end']['median_ms']:.2f}")
        if sp and sp.get("cpu_time"):
            text += (f"; speedup by CPU time: all scales {_x(sp['cpu_time']['scales'])}, "
                     f"end to end {_x(sp['cpu_time']['end_to_end'])}")
        lines.append(text)
    if sp:
        mr = sp["macs_ratio"]
        lines.append(f"speedup: end to end {_x(sp['end_to_end'])} (min {_x(sp['end_to_end_min'])}), "
                     f"all scales {_x(sp['scales'])} "
                     f"vs transformer FLOP ratio {_x(mr['transformer'])} (= {_pct(sp['scales_vs_transformer_macs'])} of it), "
                     f"FLOP ratio with the decoder {_x(mr['with_decoder'])}")
    lines.append(f"machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, load average "
                 f"{_load(report['machine'].get('load_average_before'))} before, "
                 f"{_load(report['machine'].get('load_average_after'))} after")
    return "\n".join(lines)


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _pct(r: float | None) -> str:
    return "-" if r is None else f"{100 * r:.0f}%"


def _mb(x: float | None) -> str:
    return "-" if x is None else (f"{x / 1024:.2f} GB" if x >= 1024 else f"{x:.0f} MB")


def _load(la: list[float] | None) -> str:
    return "-" if not la else "/".join(f"{x:.1f}" for x in la)


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Per-scale medians (with the baseline beside them) and end-to-end bars split into scales and decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evar.files import atomic_write_bytes, figure_png

    reports = [r for r in (report.get("baseline"), report) if r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(reports)
    for k, r in enumerate(reports):
        xs = np.arange(len(r["per_scale"])) + (k - (len(reports) - 1) / 2) * width
        ax1.bar(xs, [s["median_ms"] for s in r["per_scale"]], width,
                yerr=[[0] * len(r["per_scale"]), [s["p90_ms"] - s["median_ms"] for s in r["per_scale"]]],
                label=f"{r['artifact']} ({r['device_name']})", capsize=2)
    ax1.set_xticks(range(len(report["per_scale"])), [f"{s['patch_num']}²" for s in report["per_scale"]])
    ax1.set_xlabel("scale (tokens = pn²)")
    ax1.set_ylabel("median ms (bar), p90 (whisker)")
    ax1.set_title("per scale")
    ax1.legend(fontsize=8)
    names = [f"{r['artifact']}\n{r['device_name']}" for r in reports]
    sc = [r["scales"]["median_ms"] for r in reports]
    dec = [r["decode"]["median_ms"] for r in reports]
    ax2.bar(names, sc, label="all scales")
    ax2.bar(names, dec, bottom=sc, label="VQVAE decode")
    for i, r in enumerate(reports):
        ax2.text(i, sc[i] + dec[i], f"{r['end_to_end']['median_ms']:.0f} ms", ha="center", va="bottom", fontsize=8)
    ax2.set_title("end to end (median)" + (f": {report['speedup']['end_to_end']:.2f}x" if report.get("speedup") else ""))
    ax2.legend(fontsize=8)
    ax2.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"evar-bench, batch {report['batch']}, cfg {report['cfg']}, {report['machine']['cpu']} "
                 f"({report['threads'] or 'auto'} threads)", fontsize=9)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig))
    return Path(path)


# ---------------------------------------------------------------- the whole run
def run(artifact: str | Path, device: str = "cpu", settings: BenchSettings = BenchSettings(),
        baseline: str | Path | None = None, baseline_device: str | None = None, io_binding: bool = True,
        model: Any = None, baseline_model: Any = None, verify_hashes: bool = False, progress: bool = False,
        command: str | None = None) -> dict[str, Any]:
    """Load, warm up, measure (alternating with the baseline) → the report dict (baseline nested)."""
    from evar.runtime import backends, memory

    settings.validate()
    backends.check_available(device)
    if baseline is not None:
        backends.check_available(baseline_device or device)
    mach_before = machine()
    base_rss = memory.rss_mb()
    targets = [load_target(artifact, device, settings, io_binding, model, verify_hashes)]
    if baseline is not None:
        targets.append(load_target(baseline, baseline_device or device, settings, io_binding,
                                   model if baseline_model is None else baseline_model, verify_hashes))
    process_peak = measure(targets, settings, progress)
    after = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    reports = []
    for t in targets:
        r = summarize(t, settings, process_peak, base_rss, command)
        r["machine"] = {**mach_before, "load_average_after": after}
        reports.append(r)
    for t in targets:
        t.generator.close()
    report = reports[0]
    if len(reports) > 1:
        report["baseline"] = reports[1]
        report["speedup"] = speedup(report, reports[1])
    return report


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Latency of an exported EVAR artifact: per scale, VQVAE decode, end to end; optionally vs a baseline.")


@app.command()
def bench(
    artifact: Annotated[Path, typer.Option(help="artifact directory (manifest.json + graphs)")],
    device: Annotated[str, typer.Option(help="cpu | torch-cpu | ort-coreml | coreml-cpu | coreml-gpu | ane")] = "cpu",
    baseline: Annotated[Optional[Path], typer.Option(
        help="artifact to compare with, measured in the same run (alternating)")] = None,
    baseline_device: Annotated[Optional[str], typer.Option(help="device of the baseline (default: --device)")] = None,
    batch: Annotated[int, typer.Option(help="images per generation")] = 1,
    warmup: Annotated[int, typer.Option(help="untimed generations first")] = 2,
    iters: Annotated[int, typer.Option(help="timed generations")] = 10,
    threads: Annotated[Optional[int], typer.Option(help="intra-op threads (default: every core)")] = None,
    cfg: Annotated[Optional[float], typer.Option(help="guidance scale (default: the artifact's)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the splitmix64 random source")] = 0,
    model: Annotated[Optional[str], typer.Option(help="torch-cpu: model reference (default: the artifact's model_ref)")] = None,
    io_binding: Annotated[bool, typer.Option("--io-binding/--no-io-binding",
                                             help="onnxruntime: keep the KV cache as OrtValues")] = True,
    verify_hashes: Annotated[bool, typer.Option("--verify-hashes", help="check every file's sha256 before loading")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the report as JSON")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG plot of the report")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress lines on stderr")] = False,
    overwrite: Overwrite = False,
) -> None:
    """Measure ARTIFACT on DEVICE and print a table; --json / --plot write the same numbers."""
    settings = BenchSettings(batch=batch, warmup=warmup, iters=iters, seed=seed, cfg=cfg, threads=threads)
    settings.validate()
    if model is not None and "torch-cpu" not in (device, baseline_device):
        raise EvarError("--model goes with --device torch-cpu (or --baseline-device torch-cpu): other devices run "
                        "the artifact's own graphs")
    if baseline_device is not None and baseline is None:
        raise EvarError("--baseline-device goes with --baseline")
    with contextlib.ExitStack() as outputs:  # both checked (and held) before anything is measured
        for path, flag in ((json_out, "--json"), (plot_out, "--plot")):
            if path is not None:
                outputs.enter_context(claim_output(path, "file", overwrite=overwrite, flag=flag,
                                                   inputs=[artifact, baseline]))
        report = run(artifact, device, settings, baseline, baseline_device, io_binding, model, None, verify_hashes,
                     progress=not quiet, command=command_line("evar-bench"))
        print(table(report))
        if json_out is not None:
            from evar.files import atomic_write_json

            atomic_write_json(json_out, report)
            print(f"json → {json_out}")
        if plot_out is not None:
            print(f"plot → {plot(report, plot_out)}")


def main() -> None:
    run_cli(app)


if __name__ == "__main__":
    main()
