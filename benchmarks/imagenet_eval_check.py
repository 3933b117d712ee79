"""The ImageNet evaluation end to end on this machine: builtin:digits, a full-size FID Inception with random
weights (the real file is not needed to prove the path), 1 rank vs 2 gloo ranks, and the set against its
own statistics.

    python benchmarks/imagenet_eval_check.py [--num-samples 200] → benchmarks/results/imagenet_eval_check.json

Runs the user's command three times (`python -m evar.eval.imagenet` and `torchrun --nproc_per_node 2 -m …`)
and checks: the 2-rank run makes the same images (pixel sha256) and the same features, bit for bit, as one
process; FID of the set against the statistics it saved is ~0 and precision = recall = 1. The metric values
themselves mean nothing with random Inception weights.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from evar.eval.inception import write_random_weights
from evar.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return round(time.perf_counter() - t0, 1)


def same_shards(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("samples-*.npz"))
    if files != sorted(p.name for p in b.glob("samples-*.npz")):
        return False
    for name in files:
        with np.load(a / name) as x, np.load(b / name) as y:
            if not all(np.array_equal(x[k], y[k]) for k in ("pool", "logits", "pixels_sha256")):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS / "imagenet_eval_check.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = write_random_weights(tmp / "random_inception.pth", reduction=1, seed=0)
        flags = ["--model", "builtin:digits", "--inception-weights", str(weights), "--num-samples",
                 str(args.num_samples), "--batch-size", "50", "--shard-size", "50"]
        module = [sys.executable, "-m", "evar.eval.imagenet", *flags]
        seconds = {"one_rank": run([*module, "--out", str(tmp / "one.json"), "--save-ref-stats", str(tmp / "self.npz")]),
                   "two_gloo_ranks": run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2", "-m", "evar.eval.imagenet", *flags,
                                          "--out", str(tmp / "two.json")]),
                   "against_own_statistics": run([*module, "--out", str(tmp / "one.json"),
                                                  "--ref-stats", str(tmp / "self.npz")])}
        one, two = (json.loads((tmp / f"{n}.json").read_text()) for n in ("one", "two"))
        result = {
            "command": " ".join(["python -m evar.eval.imagenet", *flags[:3], "RANDOM.pth", *flags[4:]]),
            "num_samples": args.num_samples,
            "same_images_1_vs_2_ranks": one["images_sha256"] == two["images_sha256"],
            "same_features_1_vs_2_ranks": same_shards(tmp / "one.parts", tmp / "two.parts"),
            "two_ranks": two["run"], "against_own_statistics": one["metrics"], "seconds": seconds,
            "load_average": os.getloadavg(),
        }
    atomic_write_json(args.out, result)
    m = result["against_own_statistics"]
    print(f"1 vs 2 ranks: same images {result['same_images_1_vs_2_ranks']}, same features "
          f"{result['same_features_1_vs_2_ranks']}; against its own statistics: FID {m['fid']:.2e}, precision "
          f"{m['precision']}, recall {m['recall']}; {seconds} → {args.out}")


if __name__ == "__main__":
    main()
