"""`evar prune`: calibration → block-by-block removal → a rebuilt model and its report.

Criteria that need only weights (magnitude) or gradients (Taylor: one backward pass of the teacher-forced
cross-entropy per iterative step) score every block directly. Criteria that need layer-input Hessians
(OBS) run sequentially: block i is calibrated on the outputs of the already pruned blocks 0..i-1, through
the full block-causal sequence (see `evar.prune.sequential`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import evar.calibration as token_sets
from evar.calibration import GENERATED, TokenSet, generation_dtype
from evar.checkpoints import Model
from evar.config import VARConfig
from evar.errors import EvarError
from evar.prune import report as rep
from evar.prune.criteria import TAYLOR_TYPES, Criterion, Group, make_criterion
from evar.prune.resume import Every, Progress, PruneCheckpoint, restore_var
from evar.prune.schedule import BlockTarget, Schedule, block_targets, step_amount
from evar.prune.sequential import ActivationStream, Calibration, Capture, Replay, Skip, swapped
from evar.prune.surgery import head_channels, rebuild, remove_heads, remove_units, set_weight
from evar.samples import SamplingSettings


@dataclass(frozen=True)
class PruneConfig:
    """Every knob of a pruning run; recorded verbatim in the pruned model's provenance."""

    sparsity: float
    method: str = "obs"
    taylor_type: str = "param_first"
    percdamp: float = 0.01
    compensate: bool = True
    calib_samples: int = 256
    calib_data: str = "teacher"  # the model's own generations, 'digits', or an image folder
    calib_scale: str = "all"  # 'all', 'last' or a scale index (negative counts from the end)
    calib_uncond: float = 0.5  # share of calibration sequences run with the null class, as CFG does at inference
    calib_batch: int = 8
    # Of sampling the model's own calibration sequences. fp32 by default so a recipe gives the same pruned weights
    # on every CPU; 'auto' (bf16 where the CPU multiplies it natively) is about twice as fast and opt-in.
    calib_precision: str = "fp32"
    schedule: str = "uniform"
    min_sparsity: float = 0.1
    max_sparsity: float = 0.5
    iterative_steps: int = 1
    heads: bool = True
    ffn: bool = True
    seed: int = 0

    def validate(self) -> None:
        """Everything checkable without the model, so bad flags fail before any loading."""
        self.sparsity_schedule().validate()
        make_criterion(self.method, self.taylor_type, self.percdamp, self.compensate)
        if self.taylor_type not in TAYLOR_TYPES:
            raise EvarError(f"unknown --taylor-type '{self.taylor_type}'; choose one of {', '.join(TAYLOR_TYPES)}")
        for name, value in (("--calib-samples", self.calib_samples), ("--calib-batch", self.calib_batch),
                            ("--iterative-steps", self.iterative_steps)):
            if value < 1:
                raise EvarError(f"{name} must be >= 1, got {value}")
        if not 0.0 <= self.calib_uncond <= 1.0:
            raise EvarError(f"--calib-uncond must be in [0, 1], got {self.calib_uncond}")
        generation_dtype(self.calib_precision)
        if not (self.heads or self.ffn):
            raise EvarError("--heads-only and --ffn-only exclude each other")
        if self.calib_scale not in ("all", "last"):
            try:
                int(self.calib_scale)
            except ValueError:
                raise EvarError(f"--calib-scale must be 'all', 'last' or a scale index, "
                                f"got '{self.calib_scale}'") from None

    def sparsity_schedule(self) -> Schedule:
        return Schedule(self.schedule, self.sparsity, self.min_sparsity, self.max_sparsity)

    def criterion(self) -> Criterion:
        return make_criterion(self.method, self.taylor_type, self.percdamp, self.compensate)

    def token_range(self, cfg: VARConfig) -> slice:
        """The tokens whose statistics count: all of them, or those of one scale."""
        if self.calib_scale == "all":
            return slice(0, cfg.seq_len)
        si = -1 if self.calib_scale == "last" else int(self.calib_scale)
        if not -cfg.num_scales <= si < cfg.num_scales:
            raise EvarError(f"--calib-scale {self.calib_scale}: the model has scales 0..{cfg.num_scales - 1}")
        return slice(*cfg.scale_ranges()[si])


@dataclass
class PruneResult:
    model: Model
    report: dict[str, Any]


# ---------------------------------------------------------------- calibration data
def null_share(labels: torch.Tensor, share: float, null: int) -> torch.Tensor:
    """Give `share` of the sequences the null label, evenly spread over the classes (sorted by class, every
    1/share-th one), so that classes with a single sample (ImageNet-size label sets) take part too."""
    out = labels.clone()
    for rank, i in enumerate(torch.argsort(labels, stable=True).tolist()):
        if int((rank + 1) * share + 1e-9) > int(rank * share + 1e-9):
            out[i] = null
    return out


def calibration(model: Model, cfg: PruneConfig) -> Calibration:
    return teacher_forcing(model, cfg, calibration_tokens(model, cfg))


@torch.no_grad()
def calibration_tokens(model: Model, cfg: PruneConfig, checkpoint: PruneCheckpoint | None = None,
                       save_every: float = 60.0) -> TokenSet:
    settings = SamplingSettings(seed=cfg.seed)
    if cfg.calib_data == GENERATED:
        return sampled(model, cfg, settings, checkpoint, save_every)
    return token_sets.token_set(model, cfg.calib_data, cfg.calib_samples, settings, cfg.seed)


def sampled(model: Model, cfg: PruneConfig, settings: SamplingSettings, checkpoint: PruneCheckpoint | None,
            save_every: float) -> TokenSet:
    """The model's own calibration sequences, a mini-batch at a time (which bounds the KV cache: d16 with CFG
    holds ~0.18 GB per sample). With a checkpoint, those made so far are saved about every `save_every` s
    and a rerun samples only the rest: sample i is the same whichever run makes it."""
    n, batch, dtype = cfg.calib_samples, cfg.calib_batch, generation_dtype(cfg.calib_precision)
    done = checkpoint.load_samples() if checkpoint is not None else None
    parts = [] if done is None else [done]
    made, every = (0 if done is None else len(done)), Every(save_every)
    for at in tqdm(range(made, n, batch), desc="sampling calibration sequences", total=-(-n // batch),
                   initial=-(-made // batch), dynamic_ncols=True):
        parts.append(token_sets.from_generations(model, n, settings, batch, progress=False, dtype=dtype,
                                                 part=(at, min(at + batch, n))).tokens)
        if checkpoint is not None and every.due():
            checkpoint.save_samples(torch.cat(parts))
    return TokenSet(token_sets.balanced_labels(n, model.config.var.num_classes), torch.cat(parts), GENERATED)


@torch.no_grad()
def teacher_forcing(model: Model, cfg: PruneConfig, tokens: TokenSet) -> Calibration:
    """The calibration set's labels (the null class for the unconditional share) and VAR inputs."""
    pn = model.config.var.patch_nums
    x_in = torch.cat([model.vqvae.idx_to_var_input(tokens.subset(torch.arange(s, min(s + 64, len(tokens))))
                                                    .scale_tokens(pn)) for s in range(0, len(tokens), 64)])
    labels = null_share(tokens.labels, cfg.calib_uncond, model.config.var.num_classes)
    return Calibration(labels, tokens.tokens, x_in, tokens.source)


def gradients(model: Model, calib: Calibration, layers: list[torch.nn.Linear], tokens: slice,
              batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mean gradient and mean squared mini-batch gradient of the teacher-forced cross-entropy (over `tokens`)
    for each layer's weight: the statistics Taylor scores are made of."""
    var, weights = model.var, [layer.weight for layer in layers]
    flags = {p: p.requires_grad for p in var.parameters()}
    for p in var.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    sums = [(torch.zeros_like(w), torch.zeros_like(w)) for w in weights]
    n = 0
    try:
        with torch.enable_grad():
            for s in range(0, len(calib), batch):
                sl = slice(s, s + batch)
                logits = var(calib.labels[sl], calib.x_in[sl])[:, tokens]
                loss = F.cross_entropy(logits.flatten(0, 1), calib.tokens[sl, tokens].flatten())
                for (g_sum, g2_sum), g in zip(sums, torch.autograd.grad(loss, weights)):
                    g_sum += g
                    g2_sum += g * g
                n += 1
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return [(g / n, g2 / n) for g, g2 in sums]


# ---------------------------------------------------------------- one block
@dataclass
class Kept:
    """Original indices of the surviving heads and the surviving FFN-unit count, per block."""

    heads: list[list[int]]
    units: list[int]


class BlockPruner:
    """Applies a criterion's removals to one block and keeps the bookkeeping."""

    def __init__(self, criterion: Criterion, kept: Kept):
        self.criterion, self.kept = criterion, kept

    def heads(self, i: int, block, n: int, **stats) -> list[int]:
        """Remove `n` heads of block i; returns the positions (before the cut) of the heads that stay."""
        proj = block.attn.proj
        removal = self.criterion(Group(f"blocks.{i}.attn.proj", proj.weight.detach().clone(), block.attn.head_dim,
                                       n, **stats))
        stay = [j for j in range(block.attn.num_heads) if j not in set(removal.groups)]
        set_weight(proj, removal.weight)
        remove_heads(block.attn, removal.groups)
        self.kept.heads[i] = [self.kept.heads[i][j] for j in stay]
        return stay

    def units(self, i: int, block, n: int, **stats) -> None:
        fc2 = block.ffn.fc2
        removal = self.criterion(Group(f"blocks.{i}.ffn.fc2", fc2.weight.detach().clone(), 1, n, **stats))
        set_weight(fc2, removal.weight)
        remove_units(block.ffn, removal.groups)
        self.kept.units[i] = block.ffn.fc1.out_features


def sequential_block(pruner: BlockPruner, i: int, block, stream: ActivationStream, amount: tuple[int, int],
                     tokens: slice, last: bool) -> None:
    """Hessians of `proj` then `fc2` inputs on the current stream, removals, and the stream advanced."""
    n_heads, n_units = amount
    replay = None
    if n_heads:
        stash: list[torch.Tensor] = []
        capture = Capture(block.attn.proj, tokens, stash, stop=True)
        with swapped(block.attn, "proj", capture):
            stream.run(block, write=False)
        stay = pruner.heads(i, block, n_heads, hessian=capture.hessian.matrix())
        replay = Replay(block.attn.proj, stash, torch.tensor(head_channels(stay, block.attn.head_dim)))
    if n_units:
        capture = Capture(block.ffn.fc2, tokens, None, stop=False)
        with swapped(block, "attn", replay), swapped(block.ffn, "fc2", capture):
            stream.run(block, write=True)  # the buffer now holds the post-attention residual
        pruner.units(i, block, n_units, hessian=capture.hessian.matrix())
        if not last:
            with swapped(block, "attn", Skip()):
                stream.run(block, write=True)
    elif not last:
        with swapped(block, "attn", replay):
            stream.run(block, write=True)


# ---------------------------------------------------------------- the whole model
def run_step(model: Model, cfg: PruneConfig, criterion: Criterion, amounts: list[tuple[int, int]],
             calib: Calibration | None, pruner: BlockPruner, bar: tqdm, label: str, first_block: int = 0,
             stream_x: torch.Tensor | None = None, after_block: Callable[[int, ActivationStream], None] | None = None,
             ) -> None:
    """One pass over the blocks, from `first_block` (a resumed run, whose stream is `stream_x`).
    `after_block(next_block, stream)` runs after each block pruned with Hessians (to save progress)."""
    var, tokens = model.var, cfg.token_range(model.config.var)
    blocks = list(var.blocks)
    stream = ActivationStream(var, calib, cfg.calib_batch) if criterion.needs == "hessian" else None
    if stream is not None and stream_x is not None:
        stream.x = stream_x
    grads: list = []
    if criterion.needs == "gradients":
        bar.set_description(f"{label}gradients")
        layers = [layer for b in blocks for layer in (b.attn.proj, b.ffn.fc2)]
        grads = gradients(model, calib, layers, tokens, cfg.calib_batch)
    for i, block in enumerate(blocks[first_block:], start=first_block):
        bar.set_description(f"{label}pruning block {i + 1}/{len(blocks)}")
        n_heads, n_units = amounts[i]
        if stream is not None:
            sequential_block(pruner, i, block, stream, amounts[i], tokens, last=i == len(blocks) - 1)
            if after_block is not None:
                after_block(i + 1, stream)
        else:
            g = grads[2 * i: 2 * i + 2] or [(None, None), (None, None)]
            if n_heads:
                pruner.heads(i, block, n_heads, grad=g[0][0], grad_sq=g[0][1])
            if n_units:
                pruner.units(i, block, n_units, grad=g[1][0], grad_sq=g[1][1])
        bar.update()


def cached_calibration(model: Model, cfg: PruneConfig, checkpoint: PruneCheckpoint | None,
                       save_every: float = 60.0) -> Calibration:
    tokens = checkpoint.load_calibration() if checkpoint is not None else None
    if tokens is None:
        tokens = calibration_tokens(model, cfg, checkpoint, save_every)
        if checkpoint is not None:
            checkpoint.save_calibration(tokens)
    return teacher_forcing(model, cfg, tokens)


class ProgressSaver:
    """Saves progress after a block when `every` seconds have passed since the last save (0: every block)."""

    def __init__(self, checkpoint: PruneCheckpoint, model: Model, kept: Kept, every: float):
        self.checkpoint, self.model, self.kept, self.every = checkpoint, model, kept, Every(every)
        self.step = 1

    def __call__(self, next_block: int, stream: ActivationStream) -> None:
        if self.every.due():
            self.checkpoint.save_progress(Progress(self.step, next_block, self.kept.heads, self.kept.units,
                                                   stream.x), self.model)


def prune_model(model: Model, cfg: PruneConfig, parent: str = "", progress: bool = True,
                checkpoint: PruneCheckpoint | None = None, save_every: float = 60.0) -> PruneResult:
    """Prune `model` (its VAR is cut in place; pass a copy to keep the original) and return the rebuilt model.
    With a `checkpoint`, the calibration set and (OBS) the progress every `save_every` seconds are kept
    there, and a run that finds them continues where the last one stopped."""
    t0 = time.perf_counter()
    cfg.validate()
    var_cfg = model.config.var
    cfg.token_range(var_cfg)
    targets = block_targets(var_cfg, cfg.sparsity_schedule(), cfg.heads, cfg.ffn)
    criterion = cfg.criterion()
    work = any(t.heads or t.units for t in targets)  # sparsity 0 (or rounding to 0): nothing to calibrate
    calib = cached_calibration(model, cfg, checkpoint, save_every) if work and criterion.needs != "weights" else None
    t_calib = time.perf_counter() - t0
    kept = Kept([list(range(h)) for h in var_cfg.num_heads], list(var_cfg.ffn_dims))
    K, depth = cfg.iterative_steps, var_cfg.depth
    start = resume(model, kept, checkpoint) if work and criterion.needs == "hessian" else None
    first_step, first_block = (start.step, start.block) if start else (1, 0)
    pruner = BlockPruner(criterion, kept)
    saver = ProgressSaver(checkpoint, model, kept, save_every) if checkpoint is not None else None
    with tqdm(total=K * depth, initial=(first_step - 1) * depth + first_block, disable=not (progress and work),
              dynamic_ncols=True) as bar:
        for step in range(first_step, K + 1 if work else 1):
            amounts = [(step_amount(t.heads, step, K), step_amount(t.units, step, K)) for t in targets]
            resuming = start is not None and step == first_step
            if saver is not None:
                saver.step = step
            run_step(model, cfg, criterion, amounts, calib, pruner, bar, f"step {step}/{K}: " if K > 1 else "",
                     first_block if resuming else 0, start.stream if resuming else None, saver)
    t_prune = time.perf_counter() - t0 - t_calib
    report = build_report(model, cfg, parent, targets, kept, calib, (t_calib, t_prune))
    if start is not None:
        report["resumed_at"] = {"step": start.step, "block": start.block}
    pruned = rebuild(model, provenance(model, cfg, parent, report))
    return PruneResult(pruned, report)


def checkpoint_for(out, model: Model, cfg: PruneConfig, parent: str) -> PruneCheckpoint:
    """OUT.partial/ for this model and recipe (another model or recipe there is refused, not mixed)."""
    c = model.config.var
    identity = {"parent": parent, "recipe": dataclasses.asdict(cfg), "num_heads": list(c.num_heads),
                "ffn_dims": list(c.ffn_dims), "params": sum(p.numel() for p in model.var.parameters())}
    return PruneCheckpoint(PruneCheckpoint.beside(out), identity)


def resume(model: Model, kept: Kept, checkpoint: PruneCheckpoint | None) -> Progress | None:
    """Load saved progress into `model` and `kept`; a finished step resumes at the next step's first block."""
    saved = checkpoint.load_progress() if checkpoint is not None else None
    if saved is None:
        return None
    start, state = saved
    restore_var(model, start, state)
    kept.heads, kept.units = [list(h) for h in start.heads], list(start.units)
    if start.block == model.config.var.depth:
        start = Progress(start.step + 1, 0, start.heads, start.units, None)  # a new step, a new stream
    return start


# ---------------------------------------------------------------- records
def build_report(model: Model, cfg: PruneConfig, parent: str, targets: list[BlockTarget], kept: Kept,
                 calib: Calibration | None, seconds: tuple[float, float]) -> dict[str, Any]:
    before_cfg = model.config.var
    after_cfg = before_cfg.with_blocks(tuple(len(h) for h in kept.heads), tuple(kept.units))
    before, after = rep.cost(before_cfg), rep.cost(after_cfg)
    blocks = [{"block": t.block, "sparsity": round(t.sparsity, 4),
               "heads": [before_cfg.num_heads[t.block], len(kept.heads[t.block])],
               "ffn": [before_cfg.ffn_dims[t.block], kept.units[t.block]],
               "kept_heads": kept.heads[t.block]} for t in targets]
    return {
        "parent": parent,
        "recipe": dataclasses.asdict(cfg),
        "calibration": None if calib is None else calibration_record(calib, cfg, before_cfg),
        "params": rep.before_after(before["params"], after["params"]),
        "macs_per_image": {**rep.before_after(before["macs"], after["macs"]),
                           "counted": "one teacher-forced pass, batch 1, no CFG (CFG doubles it); masked attention"},
        "blocks": blocks,
        "seconds": {"calibration": round(seconds[0], 2), "pruning": round(seconds[1], 2),
                    "total": round(sum(seconds), 2)},
        "versions": versions(),
    }


def calibration_record(calib: Calibration, cfg: PruneConfig, var_cfg: VARConfig) -> dict[str, Any]:
    tokens = cfg.token_range(var_cfg)
    generated = calib.source == GENERATED
    return {"source": calib.source, "samples": len(calib),
            "sampled_in": str(generation_dtype(cfg.calib_precision)).removeprefix("torch.") if generated else None,
            "unconditional": int((calib.labels == var_cfg.num_classes).sum()), "tokens": [tokens.start, tokens.stop],
            "statistics": {"hessian": "(2/n) Σ xᵀx of proj/fc2 inputs, block by block",
                           "gradients": "teacher-forced cross-entropy", "weights": None}[cfg.criterion().needs]}


def versions() -> dict[str, str | None]:
    try:
        import torch_pruning
        tp_version = getattr(torch_pruning, "__version__", "unknown")
    except ImportError:
        tp_version = None
    return {"torch": torch.__version__, "torch_pruning": tp_version}


def provenance(model: Model, cfg: PruneConfig, parent: str, report: dict[str, Any]) -> dict[str, Any]:
    return {"source": "evar prune", "parent": parent, "parent_provenance": model.config.provenance or None,
            "recipe": dataclasses.asdict(cfg),
            "blocks": {"num_heads": [b["heads"][1] for b in report["blocks"]],
                       "ffn_dims": [b["ffn"][1] for b in report["blocks"]]},
            "params": report["params"]["after"], "report": "prune_report.json"}


def save_pruned(result: PruneResult, out) -> None:
    """The model directory and prune_report.json appear together or not at all."""
    from pathlib import Path

    from evar.checkpoints import save_model_dir
    from evar.files import atomic_dir, atomic_write_json

    with atomic_dir(out) as tmp:
        save_model_dir(result.model, tmp)
        atomic_write_json(Path(tmp) / "prune_report.json", result.report)
