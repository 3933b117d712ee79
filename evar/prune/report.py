"""What pruning bought: parameters and MACs before/after, per-block dims, the records a pruned model keeps
(`prune_report.json`, the provenance in its config) and a readable summary."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from evar.calibration import GENERATED, generation_dtype
from evar.checkpoints import Model
from evar.config import VARConfig
from evar.models.var import VAR
from evar.prune.recipe import PruneRecipe
from evar.prune.schedule import BlockTarget
from evar.prune.sequential import Calibration

if TYPE_CHECKING:
    from evar.prune.blockwise import Kept


def var_params(arch: VARConfig) -> int:
    """Parameter count of the VAR a config describes (built on the meta device: no weights needed)."""
    with torch.device("meta"):
        var = VAR(arch)
    return sum(p.numel() for p in var.parameters())


def var_macs(arch: VARConfig) -> dict[str, int]:
    """Multiply-accumulates of one image's teacher-forced pass (= one cached generation without CFG; CFG doubles it).

    Counted from the config, because a module-hook counter (torch-pruning's `count_ops_and_params`)
    misses the fused qkv (`F.linear` on `mat_qkv.weight`) and the attention products. Attention counts
    what the block-causal mask lets through: a query of scale s attends to every token up to the end of s.
    """
    C, L, V = arch.embed_dim, arch.seq_len, arch.vocab_size
    visible = sum(pn * pn * end for pn, (_, end) in zip(arch.patch_nums, arch.scale_ranges()))
    embed = (L - 1) * arch.cvae * C
    adaln = (C * 6 * C if arch.shared_aln else arch.depth * C * 6 * C) + C * 2 * C  # once per image, not per token
    blocks_linear = sum(L * (C * 3 * arch.attn_dim(i) + arch.attn_dim(i) * C + 2 * C * arch.ffn_dims[i])
                        for i in range(arch.depth))
    attention = sum(2 * arch.attn_dim(i) * visible for i in range(arch.depth))  # q·kᵀ and p·v
    head = L * C * V
    linear = embed + adaln + blocks_linear + head
    return {"linear": linear, "attention": attention, "total": linear + attention}


def cost(arch: VARConfig) -> dict[str, Any]:
    return {"params": var_params(arch), "macs": var_macs(arch)["total"], "num_heads": list(arch.num_heads),
            "ffn_dims": list(arch.ffn_dims)}


def before_after(before: int, after: int) -> dict[str, Any]:
    return {"before": before, "after": after, "ratio": round(after / before, 4) if before else None}


def build_report(model: Model, recipe: PruneRecipe, parent: str, targets: list[BlockTarget], kept: Kept,
                 calib: Calibration | None, seconds: tuple[float, float]) -> dict[str, Any]:
    before_arch = model.config.var
    after_arch = before_arch.with_blocks(tuple(len(h) for h in kept.heads), tuple(kept.units))
    before, after = cost(before_arch), cost(after_arch)
    blocks = [{"block": t.block, "sparsity": round(t.sparsity, 4),
               "heads": [before_arch.num_heads[t.block], len(kept.heads[t.block])],
               "ffn": [before_arch.ffn_dims[t.block], kept.units[t.block]],
               "kept_heads": kept.heads[t.block]} for t in targets]
    return {
        "parent": parent,
        "recipe": dataclasses.asdict(recipe),
        "calibration": None if calib is None else calibration_record(calib, recipe, before_arch),
        "params": before_after(before["params"], after["params"]),
        "macs_per_image": {**before_after(before["macs"], after["macs"]),
                           "counted": "one teacher-forced pass, batch 1, no CFG (CFG doubles it); masked attention"},
        "blocks": blocks,
        "seconds": {"calibration": round(seconds[0], 2), "pruning": round(seconds[1], 2),
                    "total": round(sum(seconds), 2)},
        "versions": versions(),
    }


def calibration_record(calib: Calibration, recipe: PruneRecipe, arch: VARConfig) -> dict[str, Any]:
    tokens = recipe.token_range(arch)
    generated = calib.source == GENERATED
    return {"source": calib.source, "samples": len(calib),
            "sampled_in": str(generation_dtype(recipe.calib_precision)).removeprefix("torch.") if generated else None,
            "unconditional": int((calib.labels == arch.num_classes).sum()), "tokens": [tokens.start, tokens.stop],
            "statistics": {"hessian": "(2/n) Σ xᵀx of proj/fc2 inputs, block by block",
                           "gradients": "teacher-forced cross-entropy", "weights": None}[recipe.criterion().needs]}


def versions() -> dict[str, str | None]:
    try:
        import torch_pruning
        tp_version = getattr(torch_pruning, "__version__", "unknown")
    except ImportError:
        tp_version = None
    return {"torch": torch.__version__, "torch_pruning": tp_version}


def provenance(model: Model, recipe: PruneRecipe, parent: str, report: dict[str, Any]) -> dict[str, Any]:
    return {"source": "evar prune", "parent": parent, "parent_provenance": model.config.provenance or None,
            "recipe": dataclasses.asdict(recipe),
            "blocks": {"num_heads": [b["heads"][1] for b in report["blocks"]],
                       "ffn_dims": [b["ffn"][1] for b in report["blocks"]]},
            "params": report["params"]["after"], "report": "prune_report.json"}


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def summary(report: dict[str, Any]) -> str:
    p, m = report["params"], report["macs_per_image"]
    lines = [
        f"pruned {report['parent']} with {report['recipe']['method']} "
        f"(sparsity {report['recipe']['sparsity']}, schedule {report['recipe']['schedule']}"
        + ("" if report["recipe"].get("head_sparsity") is None else f", head sparsity {report['recipe']['head_sparsity']}")
        + ")",
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
