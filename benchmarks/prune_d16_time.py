"""How long OBS pruning of a d16-sized VAR takes on this machine (random weights: timing only).

    python benchmarks/prune_d16_time.py [--sparsity 0.4] [--calib-samples 64]
    → benchmarks/results/prune_d16_time.json

Equivalent to `evar prune --model random:d16 --sparsity 0.4 --method obs --calib-samples 64 --out DIR`,
with the time split into loading, calibration data (the model's own generations), pruning and saving,
and the machine's load recorded beside it: on a shared 2-core machine the load moves the numbers a lot.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from evar import zoo
from evar.files import atomic_write_json
from evar.prune import PruneRecipe, prune_model, save_pruned
from evar.prune.report import versions
from evar.prune.resume import checkpoint_for

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:d16")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "prune_d16_time.json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = zoo.load(args.model)
    t_load = time.perf_counter() - t0
    recipe = PruneRecipe(sparsity=args.sparsity, method="obs", calib_samples=args.calib_samples, calib_precision="auto")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        checkpoint = checkpoint_for(out, model, recipe, args.model)  # as `evar prune` does: progress saved on the way
        result = prune_model(model, recipe, parent=args.model, checkpoint=checkpoint)
        t1 = time.perf_counter()
        save_pruned(result, out)
        checkpoint.remove()
        t_save = time.perf_counter() - t1
    r = result.report
    out = {"model": args.model, "recipe": r["recipe"], "calibration": r["calibration"], "params": r["params"],
           "macs_per_image": r["macs_per_image"],
           "seconds": {"load": round(t_load, 1), **r["seconds"], "save": round(t_save, 1),
                       "wall": round(time.perf_counter() - t0, 1)},
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                       "load_average_before": load_before, "load_average_after": os.getloadavg()},
           "versions": versions()}
    atomic_write_json(args.out, out)
    print(f"{args.model} OBS @ {args.sparsity}, {args.calib_samples} samples: {out['seconds']} → {args.out}")


if __name__ == "__main__":
    main()
