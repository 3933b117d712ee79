"""Few-step cost against the scale-by-scale teacher, in transformer MACs (no timing: counted from the config).

    python benchmarks/dd_cost.py

For the d16 architecture and builtin:digits: the teacher (every scale once, cached, on the CFG batch of 2 rows
per image) against a DD student's 1 and 2 passes over the whole sequence (1 row per image, dense masked
attention as executed). Writes benchmarks/results/dd_cost.json. On a compute-bound device (a CPU) this
ratio bounds the speedup; the paper's GPU speedups come from replacing many small sequential passes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from typing import Any

from evar.config import digits_config, official_config
from evar.files import atomic_write_json
from evar.runtime.cost import generation_macs, seq_len

RESULTS = Path(__file__).resolve().parent / "results"


def student_step_macs(var: dict[str, Any], batch: int = 1) -> int:
    C, V, Cv = var["embed_dim"], var["vocab_size"], var["cvae"]
    n = seq_len(var) + 1
    depth = len(var["num_heads"])
    adaln = batch * (6 * C * C * (1 if var["shared_aln"] else depth) + 2 * C * C)
    embed = batch * (n - 1) * Cv * C
    linear = attention = 0
    for heads, hidden in zip(var["num_heads"], var["ffn_dims"]):
        a = heads * var["head_dim"]
        linear += batch * n * (4 * a * C + 2 * hidden * C)
        attention += batch * 2 * a * n * n
    heads_out = batch * (n - 1) * C * (V + Cv)  # logits + regression
    return adaln + embed + linear + attention + heads_out


def few_step_ratio(var: dict[str, Any], steps: int) -> dict[str, Any]:
    """Teacher MACs (all scales, CFG) / student MACs (`steps` passes), transformer only."""
    teacher = generation_macs(var)["transformer"]
    student = steps * student_step_macs(var)
    return {"teacher_macs": teacher, "student_macs": student, "steps": steps, "ratio": round(teacher / student, 2)}


def main() -> None:
    rows = {}
    for name, config in (("d16", official_config(16)), ("digits", digits_config())):
        var = dataclasses.asdict(config.var)
        rows[name] = {f"{s} step{'s' if s > 1 else ''}": few_step_ratio(var, s) for s in (1, 2)}
        for k, v in rows[name].items():
            print(f"{name} {k}: teacher {v['teacher_macs'] / 1e9:.1f} GMAC, student {v['student_macs'] / 1e9:.1f} GMAC, "
                  f"ratio {v['ratio']}x")
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "dd_cost.json", {"format": "evar-benchmark", "benchmark": "dd_cost", "rows": rows})


if __name__ == "__main__":
    main()
