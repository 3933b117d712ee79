"""Training the tokenizer (VQVAE) and the VAR transformer; how `builtin:digits` was made.

Both loops share one shape: AdamW, warm-up + cosine learning rate, gradient clipping, a tqdm bar,
`train_log.jsonl`, and an atomic `train_state.pt` every `ckpt_every` steps from which a rerun of the
same command resumes (model, optimizer, data-order generator and step), ending with the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from safetensors.torch import save_file

from evar.checkpoints import (VQVAE_FILE, Model, load_model_dir, load_saved_state, load_strict, read_safetensors,
                              save_model_dir)
from evar.config import ModelConfig, VQVAEConfig, digits_config
from evar.data import load_images
from evar.errors import EvarError
from evar.files import atomic_write_bytes, atomic_write_json
from evar.models.codebook import restart_dead_codes, tokenizer_report
from evar.models.var import VAR
from evar.models.vqvae import VQVAE

STATE_FILE, LOG_FILE, TOKENIZER_CONFIG = "train_state.pt", "train_log.jsonl", "tokenizer.json"


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int = 100
    grad_clip: float = 2.0
    betas: tuple[float, float] = (0.9, 0.95)
    ckpt_every: int = 500
    seed: int = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class CodebookCare:
    """Dead-code restarts while training a tokenizer (`evar.models.codebook.restart_dead_codes`)."""
    restart_every: int = 50  # steps between restarts; 0 turns them off
    dead_below: float = 0.05  # a code hit fewer times per step than this (EMA over all scales) is dead
    until: float = 0.8  # share of the steps after which restarts stop, so the codebook settles

    def due(self, step: int, steps: int) -> bool:
        return self.restart_every > 0 and step > 0 and step % self.restart_every == 0 and step < self.until * steps


@dataclass(frozen=True)
class TokenizerTraining:
    data: str = "digits"
    schedule: Schedule = Schedule(steps=3000, batch_size=64, lr=1e-3, weight_decay=0.0)
    codebook: CodebookCare = CodebookCare()
    init: str | None = None  # start from this tokenizer (a train-tokenizer or model directory), e.g. to revive its codebook


@dataclass(frozen=True)
class VARTraining:
    tokenizer: str  # a tokenizer directory (from train-tokenizer) or a model directory
    data: str = "digits"
    schedule: Schedule = Schedule(steps=4000, batch_size=64, lr=1e-3, weight_decay=0.05)
    shift_augment: int = 1  # also train on copies shifted by up to this many pixels
    # Share of each batch drawn from the unshifted images (None: uniform over all copies, 1/9 at shift 1).
    # Shifted copies alone are a distribution of their own; the originals alone get memorised.
    unshifted_share: float | None = None

    def __post_init__(self):
        if self.unshifted_share is not None and not 0.0 < self.unshifted_share < 1.0:
            raise EvarError(f"unshifted share must be in (0, 1), got {self.unshifted_share}")
        if self.unshifted_share is not None and self.shift_augment == 0:
            raise EvarError("an unshifted share needs shifted copies (--shift-augment >= 1)")


# ---------------------------------------------------------------- the shared loop
def _run(out: Path, sched: Schedule, params: list[torch.nn.Parameter], modules: dict[str, torch.nn.Module],
         loss_fn: Callable[[torch.Generator, int], dict[str, torch.Tensor]], desc: str, *,
         main: bool = True, tokens_per_step: int = 0) -> None:
    """`loss_fn(gen, step)` draws its own batch from `gen`, the one generator that is checkpointed.

    Under DDP every rank runs this loop with the same seed; only the `main` rank writes the log and
    the checkpoints. With `tokens_per_step`, each log row also reports throughput (tokens/s).
    """
    if main:
        out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(params, lr=sched.lr, betas=sched.betas, weight_decay=sched.weight_decay)
    gen = torch.Generator().manual_seed(sched.seed)
    start = _resume(out, modules, opt, gen, sched, main)
    log = open(out / LOG_FILE, "a") if main else None
    bar = tqdm(range(start, sched.steps), desc=desc, initial=start, total=sched.steps, dynamic_ncols=True,
               disable=not main)
    t0 = time.perf_counter()
    for step in bar:
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = sched.lr_at(step)
        losses = loss_fn(gen, step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, sched.grad_clip)
        opt.step()
        row = {"step": step + 1, "lr": sched.lr_at(step), "grad_norm": float(grad_norm),
               **{k: float(v.detach()) for k, v in losses.items()}, "seconds": time.perf_counter() - t0}
        if tokens_per_step:
            row["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t_step)
        if not main:
            continue
        log.write(json.dumps(row) + "\n")
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if (step + 1) % sched.ckpt_every == 0 or step + 1 == sched.steps:
            log.flush()
            _save_state(out, modules, opt, gen, step + 1, sched)
    if log is not None:
        log.close()


def _save_state(out: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                gen: torch.Generator, step: int, sched: Schedule) -> None:
    state = {"step": step, "schedule": json.dumps(dataclasses.asdict(sched)), "optimizer": opt.state_dict(),
             "generator": gen.get_state(), **{f"module.{k}": m.state_dict() for k, m in modules.items()}}
    tmp = out / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    tmp.replace(out / STATE_FILE)


def _resume(out: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
            gen: torch.Generator, sched: Schedule, main: bool = True) -> int:
    path = out / STATE_FILE
    if not path.exists():
        if main:
            (out / LOG_FILE).unlink(missing_ok=True)
        return 0
    state = load_saved_state(path, f"delete {path} to start this run over")
    if json.loads(state["schedule"]) != json.loads(json.dumps(dataclasses.asdict(sched))):
        raise EvarError(f"{path} was written by a run with other settings; use another --out or delete it to restart")
    for name, module in modules.items():
        module.load_state_dict(state[f"module.{name}"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    if main:
        _truncate_log(out / LOG_FILE, state["step"])
    return int(state["step"])


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
        atomic_write_bytes(path, ("\n".join(rows) + "\n" if rows else "").encode())


# ---------------------------------------------------------------- tokenizer
def train_tokenizer(job: TokenizerTraining, out: str | Path, vqvae_config: VQVAEConfig | None = None) -> Path:
    """Train a VQVAE and write `out/vqvae.safetensors` + `out/tokenizer.json`."""
    out = Path(out)
    cfg = vqvae_config or digits_config().vqvae
    images, _ = load_images(job.data, "train", cfg.image_size)
    torch.manual_seed(job.schedule.seed)
    vqvae = VQVAE(cfg).train()
    if job.init is not None:
        start = load_tokenizer(job.init)
        if start.cfg != cfg:
            raise EvarError(f"--init {job.init} is a tokenizer of another architecture than the one trained here")
        vqvae.load_state_dict(start.state_dict())

    def loss_fn(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        x = images[draw_batch(len(images), job.schedule.batch_size, gen)]
        restarted = 0
        if job.codebook.due(step, job.schedule.steps):
            restarted = _restart_dead_codes(vqvae, x, job.codebook.dead_below, gen)
        recon, vq_loss, usage = vqvae(x)
        rec = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        return {"loss": rec + vq_loss, "recon": rec.detach(), "vq": vq_loss.detach(), "usage": torch.as_tensor(usage),
                "restarted": torch.as_tensor(restarted)}

    _run(out, job.schedule, list(vqvae.parameters()), {"vqvae": vqvae}, loss_fn, "tokenizer")
    tmp = out / f".{VQVAE_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in vqvae.state_dict().items()}, str(tmp))
    tmp.replace(out / VQVAE_FILE)
    held_out, split = _held_out(job.data, cfg.image_size)
    report = {"split": split, **tokenizer_report(vqvae, held_out)}
    atomic_write_json(out / TOKENIZER_CONFIG, {"vqvae": dataclasses.asdict(cfg), "recipe": _recipe(job),
                                               "codebook": report})
    return out


@torch.no_grad()
def _restart_dead_codes(vqvae: VQVAE, x: torch.Tensor, dead_below: float, gen: torch.Generator) -> int:
    """Move dead codes onto residuals this batch quantised (before the step's forward: autograd needs the
    codebook unchanged between forward and backward); restarted codes get a grace period in the EMA."""
    q = vqvae.quantize
    residuals: list[torch.Tensor] = []
    q.residual_quantize(vqvae.encode_features(x), residuals)
    dead = restart_dead_codes(q.embedding.weight, q.ema_vocab_hit_SV.sum(0), torch.cat(residuals), dead_below, gen)
    q.ema_vocab_hit_SV[:, dead] = 1.0 / len(q.patch_nums)  # ~100 steps before it can count as dead again
    return len(dead)


def _held_out(data: str, size: int) -> tuple[torch.Tensor, str]:
    """The digits test split; an image folder has no split, so its report is on its training images."""
    split = "test" if data == "digits" else "train"
    return load_images(data, split, size)[0], split


def load_tokenizer(path: str | Path) -> VQVAE:
    path = Path(path)
    if (path / "config.json").is_file():
        return load_model_dir(path).vqvae
    meta = path / TOKENIZER_CONFIG
    if not meta.is_file():
        raise EvarError(f"no tokenizer at {path}: expected {TOKENIZER_CONFIG} (from `evar train-tokenizer`) or a model directory")
    cfg_dict = json.loads(meta.read_text())["vqvae"]
    cfg = VQVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    vqvae = VQVAE(cfg)
    load_strict(vqvae, read_safetensors(path / VQVAE_FILE), str(path / VQVAE_FILE))
    return vqvae.eval()


# ---------------------------------------------------------------- VAR
def shifted_copies(images: torch.Tensor, labels: torch.Tensor, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image translated by (dy, dx) in [-s, s]², padding with the background value -1."""
    if max_shift == 0:
        return images, labels
    s = max_shift
    padded = F.pad(images, (s, s, s, s), value=-1.0)
    H, W = images.shape[-2:]
    views = [padded[..., s + dy: s + dy + H, s + dx: s + dx + W] for dy in range(-s, s + 1) for dx in range(-s, s + 1)]
    return torch.cat(views), labels.repeat(len(views))


@torch.no_grad()
def encode_dataset(vqvae: VQVAE, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """All tokens of every image, concatenated over scales: (N, L) int64."""
    vqvae.eval()
    return torch.cat([torch.cat(vqvae.img_to_idx(images[i:i + batch]), dim=1) for i in range(0, len(images), batch)])


def split_scales(tokens_NL: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    return list(tokens_NL.split([pn * pn for pn in patch_nums], dim=1))


def draw_batch(n: int, batch_size: int, gen: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Indices drawn with replacement: stateless but for `gen`, so a resumed run sees the same batches."""
    if weights is None:
        return torch.randint(n, (batch_size,), generator=gen)
    return torch.multinomial(weights, batch_size, replacement=True, generator=gen)


def unshifted_weights(n_images: int, max_shift: int, share: float) -> torch.Tensor:
    """Draw weights over `shifted_copies` rows so that the unshifted view gets `share` of the draws."""
    views = (2 * max_shift + 1) ** 2
    centre = views // 2  # (dy, dx) = (0, 0) in shifted_copies' order
    w = torch.full((views, n_images), (1.0 - share) / ((views - 1) * n_images), dtype=torch.float64)
    w[centre] = share / n_images
    return w.flatten()


def drop_labels(labels: torch.Tensor, rate: float, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Replace a fraction of labels with the unconditional class, which classifier-free guidance needs."""
    drop = torch.rand(labels.shape, generator=gen) < rate
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


def var_loss(var: VAR, vqvae: VQVAE, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """VAR's objective: cross-entropy averaged over every token of every scale (each weighs 1/L)."""
    x = vqvae.idx_to_var_input(split_scales(tokens, var.cfg.patch_nums))
    logits = var(labels, x)
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def train_var(job: VARTraining, out: str | Path, model_config: ModelConfig | None = None) -> Path:
    """Train VAR on tokens of `job.data` from a frozen tokenizer; write a full model directory to `out`."""
    out = Path(out)
    vqvae = load_tokenizer(job.tokenizer)
    arch = (model_config or digits_config()).var
    images, labels = load_images(job.data, "train", vqvae.cfg.image_size)
    if int(labels.max()) >= arch.num_classes:
        raise EvarError(f"data has {int(labels.max()) + 1} classes but the model has {arch.num_classes}")
    weights = None if job.unshifted_share is None else unshifted_weights(len(images), job.shift_augment,
                                                                          job.unshifted_share)
    images, labels = shifted_copies(images, labels, job.shift_augment)
    tokens = encode_dataset(vqvae, images)
    for p in vqvae.parameters():
        p.requires_grad_(False)
    torch.manual_seed(job.schedule.seed)
    var = VAR(arch).train()
    work = out / "work"

    def loss_fn(gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        pick = draw_batch(len(tokens), job.schedule.batch_size, gen, weights)
        lab = drop_labels(labels[pick], arch.cond_drop_rate, arch.num_classes, gen)
        return {"loss": var_loss(var, vqvae, tokens[pick], lab)}

    _run(work, job.schedule, list(var.parameters()), {"var": var}, loss_fn, "var")
    model = Model(ModelConfig(arch, vqvae.cfg), var.eval(), vqvae)
    save_model_dir(model, out / "model", {"source": "evar train", "recipe": _recipe(job)})
    return out / "model"


def _recipe(job: TokenizerTraining | VARTraining) -> dict:
    return {"kind": type(job).__name__, **json.loads(json.dumps(dataclasses.asdict(job)))}
