"""Knowledge distillation: recover a pruned VAR from its dense teacher (`evar distill`).

- `evar.distill.losses`: task CE, normal / scale-aware / both KD, feature distillation, progressive stages
- `evar.distill.trainer`: `DistillRecipe`, `distill(...)` (one process or torchrun DDP, resumable)
- `evar.distill.command`: the command-line flags, shared by `evar distill` and `python -m evar.distill`

Kept import-light (no torch here) so that `evar --help` stays fast.
"""
