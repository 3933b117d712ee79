"""What `evar info` says about a sparse model: the pattern, and per layer the share of zero weights."""
from __future__ import annotations

from evar.checkpoints import Model


def sparsity_lines(model: Model) -> list[str]:
    s = model.sparsity
    zeros = {name: 1.0 - float(m.float().mean()) for name, m in s.masks.items()}
    total = sum(m.numel() for m in s.masks.values())
    overall = sum(zeros[n] * s.masks[n].numel() for n in zeros) / max(1, total)
    lines = [f"sparsity: {s.pattern.name} ({s.method}), {len(zeros)} masked layers, {overall:.1%} of their "
             f"{total / 1e6:.2f}M weights zero; masks verified at load"]
    width = max(len(n) for n in zeros)
    for name, mask in s.masks.items():
        lines.append(f"  {name:<{width}}  {tuple(mask.shape)!s:<12} {zeros[name]:6.1%} zero")
    return lines
