"""The embedded default's quality card: tokenizer health and VAR quality over seeds, for one or more models.

    python benchmarks/embedded_digits.py --model NAME=REF [--model NAME=REF ...] [--seeds 0,1,2,3]

REF is anything `--model` takes (builtin:digits, a model directory). For each model: the tokenizer's held-out
code usage, perplexity and reconstruction MSE (`evar info`'s numbers), then `evar eval`'s report (500 samples,
cfg 1.5, top-k 900, top-p 0.96) for every seed, and mean ± std. Rows are merged into
benchmarks/results/embedded_digits.json by name, so models can be measured in separate runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from evar import zoo
from evar.data import load_digits
from evar.eval.metrics import real_data_baseline
from evar.files import atomic_write_json, read_json
from evar.models.codebook import tokenizer_report
from evar.quality import evaluate_model
from evar.samples import SamplingSettings

OUT = Path(__file__).resolve().parent / "results" / "embedded_digits.json"
METRICS = ("class_accuracy", "frechet_distance", "precision", "recall")


def measure(ref: str, seeds: list[int]) -> dict:
    model = zoo.load(ref)
    t0 = time.perf_counter()
    runs = [evaluate_model(model, SamplingSettings(1.5, 900, 0.96, s), 50, source=ref)["quality"] for s in seeds]
    summary = {k: {"mean": statistics.mean(r[k] for r in runs), "std": statistics.pstdev(r[k] for r in runs)}
               for k in METRICS}
    return {"ref": ref, "provenance_commands": model.config.provenance.get("commands"),
            "tokenizer": tokenizer_report(model.vqvae, load_digits("test", 16)[0]),
            "seeds": seeds, "per_seed": [{k: r[k] for k in METRICS} for r in runs], "summary": summary,
            "real_data_floor": runs[0]["real_data_floor"], "eval_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=REF")
    ap.add_argument("--seeds", default="0,1,2,3")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    result = read_json(OUT) if OUT.exists() else {"models": {}}
    for spec in args.model:
        name, ref = spec.split("=", 1)
        result["models"][name] = measure(ref, seeds)
        print(json.dumps({name: result["models"][name]["summary"]}), flush=True)
    real, everything = real_data_baseline(500), real_data_baseline(10_000)
    result["real_training_digits"] = {  # the floor at the samples' count (500) and with all 1347
        "samples": real.samples, "subsets": real.subsets, "frechet_distance": real.frechet_distance,
        "precision": real.precision, "recall": real.recall,
        "all": {"samples": everything.samples, "frechet_distance": everything.frechet_distance,
                "precision": everything.precision, "recall": everything.recall}}
    result["sampling"] = {"per_class": 50, "guidance": 1.5, "top_k": 900, "top_p": 0.96}
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                         "load_average": os.getloadavg()}
    atomic_write_json(OUT, result)
    print(f"→ {OUT}")


if __name__ == "__main__":
    main()
