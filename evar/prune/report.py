"""What pruning bought: parameters and MACs before/after, per-block dims, and a readable summary."""
from __future__ import annotations

from typing import Any

import torch

from evar.config import VARConfig
from evar.models.var import VAR


def var_params(cfg: VARConfig) -> int:
    """Parameter count of the VAR a config describes (built on the meta device: no weights needed)."""
    with torch.device("meta"):
        var = VAR(cfg)
    return sum(p.numel() for p in var.parameters())


def var_macs(cfg: VARConfig) -> dict[str, int]:
    """Multiply-accumulates of one image's teacher-forced pass (= one cached generation without CFG; CFG doubles it).

    Counted from the config, because a module-hook counter (torch-pruning's `count_ops_and_params`)
    misses the fused qkv (`F.linear` on `mat_qkv.weight`) and the attention products. Attention counts
    what the block-causal mask lets through: a query of scale s attends to every token up to the end of s.
    """
    C, L, V = cfg.embed_dim, cfg.seq_len, cfg.vocab_size
    visible = sum(pn * pn * end for pn, (_, end) in zip(cfg.patch_nums, cfg.scale_ranges()))
    embed = (L - 1) * cfg.cvae * C
    adaln = (C * 6 * C if cfg.shared_aln else cfg.depth * C * 6 * C) + C * 2 * C  # once per image, not per token
    blocks_linear = sum(L * (C * 3 * cfg.attn_dim(i) + cfg.attn_dim(i) * C + 2 * C * cfg.ffn_dims[i])
                        for i in range(cfg.depth))
    attention = sum(2 * cfg.attn_dim(i) * visible for i in range(cfg.depth))  # q·kᵀ and p·v
    head = L * C * V
    linear = embed + adaln + blocks_linear + head
    return {"linear": linear, "attention": attention, "total": linear + attention}


def cost(cfg: VARConfig) -> dict[str, Any]:
    return {"params": var_params(cfg), "macs": var_macs(cfg)["total"], "num_heads": list(cfg.num_heads),
            "ffn_dims": list(cfg.ffn_dims)}


def before_after(before: int, after: int) -> dict[str, Any]:
    return {"before": before, "after": after, "ratio": round(after / before, 4) if before else None}


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def summary(report: dict[str, Any]) -> str:
    p, m = report["params"], report["macs_per_image"]
    lines = [
        f"pruned {report['parent']} with {report['recipe']['method']} "
        f"(sparsity {report['recipe']['sparsity']}, schedule {report['recipe']['schedule']})",
        f"VAR params {_si(p['before'])} → {_si(p['after'])} ({p['ratio'] * 100:.1f}%)   "
        f"MACs/image {_si(m['before'])} → {_si(m['after'])} ({m['ratio'] * 100:.1f}%)",
        "block  heads     ffn units      kept heads",
    ]
    for b in report["blocks"]:
        lines.append(f"{b['block']:>5}  {b['heads'][0]:>2} → {b['heads'][1]:<3} {b['ffn'][0]:>5} → {b['ffn'][1]:<6} "
                     f"{b['kept_heads']}")
    s = report["seconds"]
    lines.append(f"time: calibration {s['calibration']:.1f}s, pruning {s['pruning']:.1f}s, total {s['total']:.1f}s")
    return "\n".join(lines)
