"""The distillation trainer: a pruned student learns from its dense teacher, in one process or under DDP.

Data is teacher-forcing sequences (labels + all L tokens, `evar.calibration.token_set`): the teacher's
own generations by default, or real images through the VQVAE. Every step draws a global batch from
the one checkpointed generator, drops labels for CFG once (teacher and student see the same labels),
and, under `torchrun`, each rank takes its own slice of that batch; DistributedDataParallel averages
the gradients, so N ranks take the same steps as one process with the same global batch.

The loop is `evar.train._run`: AdamW, warm-up + cosine lr, gradient clipping, an atomic
`train_state.pt` every `ckpt_every` steps and `train_log.jsonl`. `--out` becomes the finished model
directory; while the run is going it holds the checkpoint, the log, the run record and the data cache.
"""
from __future__ import annotations

import dataclasses
import datetime
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from evar import zoo
from evar.calibration import GENERATED, TokenSet, from_generations, token_set
from evar.checkpoints import Model, is_model_dir, load_saved_state, save_model_dir
from evar.config import ModelConfig, VARConfig
from evar.distill import defaults as D
from evar.distill.losses import (KD_MODES, default_scale_weights, feature_loss, kd_loss, per_scale_means,
                                 progressive_scales, task_loss, token_kl)
from evar.errors import EvarError
from evar.files import atomic_write_bytes, atomic_write_json, figure_png, read_json
from evar.models.var import VAR
from evar.samples import SamplingSettings
from evar.train import LOG_FILE, STATE_FILE, Schedule, _run, draw_batch, drop_labels, split_scales

RUN_FILE, DATA_FILE, PLOT_FILE = "distill_run.json", "distill_data.pt", "loss.png"
RUN_FILES = (STATE_FILE, LOG_FILE, RUN_FILE, DATA_FILE)  # what may sit in --out while a run is going
# Architecture fields a student must share with its teacher; per-block heads and FFN widths may differ.
FAMILY_FIELDS = ("depth", "embed_dim", "head_dim", "vocab_size", "cvae", "num_classes", "patch_nums",
                 "shared_aln", "attn_l2_norm")
# A teacher whose logits are this close to a fresh model's, or this close to uniform, was never trained/loaded.
FRESH_MODEL_RTOL, UNIFORM_ENTROPY_FRACTION = 1e-3, 0.99
TEACHER_CHECK_SAMPLES = 16


@dataclass(frozen=True)
class DistillRecipe:
    """Everything that decides the result; a resumed run must use the same recipe."""

    kd: str = D.KD
    temperature: float = D.TEMPERATURE
    alpha: float = D.ALPHA  # weight of the task cross-entropy
    beta: float = D.BETA  # weight of the KD term
    scale_weights: tuple[float, ...] | None = None  # None: 2.0 → 0.2 over the model's scales
    feature_weight: float = D.FEATURE_WEIGHT
    progressive: bool = False
    data: str = D.DATA
    data_samples: int = D.DATA_SAMPLES
    sampling: SamplingSettings = SamplingSettings(D.DATA_CFG, D.DATA_TOP_K, D.DATA_TOP_P)  # teacher's generations
    schedule: Schedule = Schedule(steps=D.STEPS, batch_size=D.BATCH_SIZE, lr=D.LR, weight_decay=D.WEIGHT_DECAY,
                                  warmup=D.WARMUP, ckpt_every=D.CKPT_EVERY)

    def weights(self, num_scales: int) -> tuple[float, ...]:
        """Per-scale KD weights for a model with `num_scales` scales (checked: one each, usable)."""
        w = default_scale_weights(num_scales) if self.scale_weights is None else self.scale_weights
        if len(w) != num_scales:
            raise EvarError(f"--scale-weights has {len(w)} values; the model has {num_scales} scales, one weight each")
        if min(w) < 0 or sum(w) <= 0:
            raise EvarError(f"--scale-weights must be >= 0 and not all 0, got {list(w)}")
        if self.progressive and self.kd != "normal" and w[0] <= 0:
            raise EvarError("with --progressive the first scale trains alone at first: "
                            "its --scale-weights entry must be > 0")
        return w

    def validate(self, world_size: int) -> None:
        """Everything checkable without the models, so bad flags fail before any loading."""
        if self.kd not in KD_MODES:
            raise EvarError(f"--kd must be one of {', '.join(KD_MODES)}, got '{self.kd}'")
        numbers = {"--temperature": self.temperature, "--alpha": self.alpha, "--beta": self.beta,
                   "--feature-weight": self.feature_weight, "--lr": self.schedule.lr,
                   "--weight-decay": self.schedule.weight_decay}
        bad = [flag for flag, v in numbers.items() if not math.isfinite(v)]
        if bad:
            raise EvarError(f"{bad[0]} must be a finite number, got {numbers[bad[0]]}")
        if self.temperature <= 0:
            raise EvarError(f"--temperature must be > 0, got {self.temperature}")
        if min(self.alpha, self.beta, self.feature_weight) < 0:
            raise EvarError("--alpha, --beta and --feature-weight must be >= 0")
        if self.alpha + self.beta + self.feature_weight == 0:
            raise EvarError("--alpha, --beta and --feature-weight are all 0: nothing to train on")
        s = self.schedule
        if s.steps < 1 or s.batch_size < 1 or s.lr <= 0 or s.ckpt_every < 1:
            raise EvarError("--steps, --batch-size, --ckpt-every must be >= 1 and --lr > 0")
        if s.batch_size % world_size:
            raise EvarError(f"--batch-size {s.batch_size} is the global batch: it must divide evenly "
                            f"over {world_size} ranks")
        if self.data_samples < 1:
            raise EvarError(f"--data-samples must be >= 1, got {self.data_samples}")
        self.sampling.validate()

    def to_dict(self, num_scales: int) -> dict[str, Any]:
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        d["scale_weights"] = list(self.weights(num_scales))
        return d


def parse_scale_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None or not text.strip():
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EvarError(f"--scale-weights must be comma-separated numbers, got '{text}'") from None


# ---------------------------------------------------------------- checks before any training
def check_family(teacher: ModelConfig, student: ModelConfig) -> None:
    """The student must be the teacher's architecture up to per-block heads and FFN widths."""
    for name in FAMILY_FIELDS:
        t, s = getattr(teacher.var, name), getattr(student.var, name)
        if t != s:
            raise EvarError(f"the student is not of the teacher's architecture family: {name} is {s} in the student "
                            f"but {t} in the teacher (only per-block heads and FFN widths may differ)")
    if teacher.vqvae != student.vqvae:
        diff = next(f.name for f in dataclasses.fields(teacher.vqvae)
                    if getattr(teacher.vqvae, f.name) != getattr(student.vqvae, f.name))
        raise EvarError(f"the student's tokenizer differs from the teacher's ({diff}): "
                        "their tokens would mean different things")


@torch.no_grad()
def check_teacher(teacher: VAR, labels: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Refuse a teacher that behaves like an untrained model (upstream silently distilled from one).

    Two signs, on the same batch: logits equal to a freshly initialised model's of the same config
    (weights never loaded), or near-uniform predictions (untrained, whatever its seed).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = VAR(teacher.cfg).to(x.device).eval()
    t_logits = teacher(labels, x).float()
    rel = float((t_logits - fresh(labels, x).float()).norm() / t_logits.norm().clamp_min(1e-12))
    entropy = -(t_logits.softmax(-1) * t_logits.log_softmax(-1)).sum(-1).mean()
    fraction = float(entropy / torch.log(torch.tensor(float(teacher.cfg.vocab_size))))
    if rel < FRESH_MODEL_RTOL:
        raise EvarError(f"the teacher gives the logits of a freshly initialised model (relative difference {rel:.1e}): "
                        "its weights were not loaded")
    if fraction > UNIFORM_ENTROPY_FRACTION:
        raise EvarError(f"the teacher predicts near-uniform tokens (mean entropy {fraction:.1%} of log V): "
                        "it looks untrained; distil from a trained model")
    return {"relative_logit_difference_vs_fresh_init": round(rel, 6),
            "entropy_fraction_of_log_vocab": round(fraction, 6)}


# ---------------------------------------------------------------- processes
@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def agree(self, value: bool) -> bool:
        """Rank 0's value on every rank (so that all ranks take the same branch into a collective)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])


def init_ranks() -> Ranks:
    """One process, or one rank of a `torchrun` job (gloo on CPU, nccl on GPU), from torchrun's env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Ranks(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        # Rank 0 alone makes the data set while the others wait at a barrier: allow it more than 30 min.
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return Ranks(dist.get_rank(), world, device, backend)


def ranks_agree(module: torch.nn.Module) -> bool:
    """Whether every rank holds the same weights (per-tensor sum and sum of squares, exactly)."""
    sums = torch.stack([torch.stack((p.double().sum(), p.double().square().sum())) for p in module.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ---------------------------------------------------------------- the output directory
def _prepare_out(out: Path, resume: bool, overwrite: bool) -> str:
    """'done' (a finished model is there and --resume accepts it), 'replace' (--overwrite it), 'resume' or 'fresh'."""
    if is_model_dir(out):
        if resume:
            return "done"
        if overwrite:
            return "replace"
        raise EvarError(f"{out} is already a model directory; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise EvarError(f"--out {out} is a file; give a directory")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if not _is_run_file(p.name))
        if foreign:
            raise EvarError(f"--out {out} holds files distillation did not write ({', '.join(foreign[:3])}); "
                            "choose a new or empty directory")
    if (out / STATE_FILE).exists():
        if not resume:
            raise EvarError(f"{out} holds an unfinished distillation run: pass --resume to continue it, "
                            "or delete the directory to start over")
        return "resume"
    return "fresh"


def _is_run_file(name: str) -> bool:
    """One of ours, or a temp file of ours (`.NAME.` prefix, left by an interrupted atomic write)."""
    return name in RUN_FILES or any(name.startswith(f".{f}.") for f in RUN_FILES)


def _check_run_record(out: Path, record: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if not path.exists():
        raise EvarError(f"{out} has a checkpoint but no {RUN_FILE}; cannot tell how it was made, "
                        "delete it to start over")
    old, new = _flat(read_json(path, "run record")), _flat(record)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        raise EvarError(f"--resume with other settings than the run in {out}: {', '.join(changed)} changed "
                        "(use the same flags, or another --out)")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"recipe": {"kd": …}} → {"recipe.kd": …}, so a mismatch is named down to the flag."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


# ---------------------------------------------------------------- data
def _load_data(teacher: Model, recipe: DistillRecipe, out: Path, ranks: Ranks) -> TokenSet:
    """The teacher-forcing set, made once and cached in --out (a resumed run reuses it)."""
    path = out / DATA_FILE
    if not ranks.agree(path.exists()):
        data = _make_data(teacher, recipe, ranks)
        if ranks.main:
            buf = io.BytesIO()
            torch.save({"labels": data.labels, "tokens": data.tokens, "source": data.source}, buf)
            atomic_write_bytes(path, buf.getvalue())
    ranks.barrier()
    saved = load_saved_state(path, f"delete {path} and rerun with --resume to make the data again")
    return TokenSet(saved["labels"], saved["tokens"], saved["source"])


def _make_data(teacher: Model, recipe: DistillRecipe, ranks: Ranks) -> TokenSet | None:
    """The teacher's generations are split over the ranks and gathered on rank 0: the same set as one
    process makes, in 1/N of the time. Encoded images are cheap and are made by rank 0 alone."""
    n, world = recipe.data_samples, ranks.world_size
    if recipe.data != GENERATED or world == 1:
        return token_set(teacher, recipe.data, n, recipe.sampling, seed=recipe.schedule.seed) if ranks.main else None
    mine = from_generations(teacher, n, recipe.sampling, progress=ranks.main,
                            part=(ranks.rank * n // world, (ranks.rank + 1) * n // world))
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (mine.labels, mine.tokens))
    if not ranks.main:
        return None
    return TokenSet(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), GENERATED)


@torch.no_grad()
def teacher_forcing_inputs(model: Model, tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """VAR's input for every sequence, (N, L-1, Cvae): the VQVAE's running f_hat, computed once."""
    model.vqvae.eval()
    patch_nums = model.config.var.patch_nums
    return torch.cat([model.vqvae.idx_to_var_input(split_scales(tokens[i:i + chunk], patch_nums))
                      for i in range(0, len(tokens), chunk)])


# ---------------------------------------------------------------- one step
class StepLoss:
    """`loss_fn(gen, step)` for `evar.train._run`: draw this rank's part of the batch, return every term."""

    def __init__(self, recipe: DistillRecipe, teacher: VAR, student: torch.nn.Module, cfg: VARConfig,
                 data: TokenSet, x: torch.Tensor, ranks: Ranks):
        self.recipe, self.teacher, self.student, self.cfg, self.ranks = recipe, teacher, student, cfg, ranks
        self.data, self.x = data, x
        self.ranges = cfg.scale_ranges()
        self.weights = torch.tensor(recipe.weights(cfg.num_scales), device=ranks.device)

    def batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B = self.recipe.schedule.batch_size
        pick = draw_batch(len(self.data), B, gen)
        labels = drop_labels(self.data.labels[pick], self.cfg.cond_drop_rate, self.cfg.num_classes, gen)
        part = slice(self.ranks.rank * B // self.ranks.world_size, (self.ranks.rank + 1) * B // self.ranks.world_size)
        dev = self.ranks.device
        return labels[part].to(dev), self.x[pick[part]].to(dev), self.data.tokens[pick[part]].to(dev)

    def __call__(self, gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        r = self.recipe
        labels, x, tokens = self.batch(gen)
        S = self.cfg.num_scales
        active = progressive_scales(step, r.schedule.steps, S) if r.progressive else S
        end = self.ranges[active - 1][1]
        with torch.no_grad():
            t_logits, t_hidden = self.teacher(labels, x, return_hidden=True)
        s_logits, s_hidden = self.student(labels, x, return_hidden=True)
        kl = token_kl(s_logits, t_logits, r.temperature)
        means = per_scale_means(kl, self.ranges)
        terms = {"task": task_loss(s_logits, tokens, end), "kd": kd_loss(r.kd, kl, means, self.weights, active, end)}
        if r.feature_weight > 0:
            terms["feature"] = feature_loss(s_hidden, t_hidden, end)
        total = r.alpha * terms["task"] + r.beta * terms["kd"] + r.feature_weight * terms.get("feature", 0.0)
        logged = {"loss": total, **terms, **{f"kd_scale{i}": m for i, m in enumerate(means)}}
        values = torch.stack([v.detach().float() for v in logged.values()])
        if self.ranks.world_size > 1:
            dist.all_reduce(values)
            values /= self.ranks.world_size
            # Logged value: the global batch's loss (as one process would log it); gradient: this rank's
            # part, which DDP averages over the ranks.
            total = total + (values[0] - total.detach())
        result = dict(zip(logged, values))
        result["loss"] = total
        result["active_scales"] = torch.tensor(active)
        return result


# ---------------------------------------------------------------- the run
def distill(teacher_ref: str, student_ref: str, out: str | Path, recipe: DistillRecipe, resume: bool = False,
            var_ckpt: str | Path | None = None, vae_ckpt: str | Path | None = None, overwrite: bool = False) -> Path:
    """Distil `teacher_ref` into `student_ref`; write the student as a model directory at `out`.

    Run it plainly or under `torchrun --nproc_per_node N`: the ranks split every batch, only rank 0 writes.
    """
    ranks = init_ranks()
    try:
        return _distill(teacher_ref, student_ref, Path(out), recipe, resume, var_ckpt, vae_ckpt, ranks, overwrite)
    finally:
        if ranks.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _distill(teacher_ref: str, student_ref: str, out: Path, recipe: DistillRecipe, resume: bool,
             var_ckpt: str | Path | None, vae_ckpt: str | Path | None, ranks: Ranks, overwrite: bool = False) -> Path:
    t0 = time.perf_counter()
    recipe.validate(ranks.world_size)
    status = _prepare_out(out, resume, overwrite)
    if status == "done":
        _say(ranks, f"{out} is already a finished model directory; nothing to resume")
        return out
    teacher = zoo.load(teacher_ref, var_ckpt, vae_ckpt)
    student = zoo.load(student_ref)
    check_family(teacher.config, student.config)
    cfg = student.config.var
    recipe.weights(cfg.num_scales)
    record = {"teacher": teacher_ref, "student": student_ref, "recipe": recipe.to_dict(cfg.num_scales)}
    if status == "resume":
        _check_run_record(out, record)
    elif resume:
        _say(ranks, f"no checkpoint in {out}: starting from step 0")
    ranks.barrier()  # every rank has read --out before rank 0 changes it
    if ranks.main and status == "replace":  # only now: a bad teacher or student must not cost the old model
        shutil.rmtree(out)
    if ranks.main and status in ("fresh", "replace"):
        (out / DATA_FILE).unlink(missing_ok=True)
        atomic_write_json(out / RUN_FILE, record)

    # Check the teacher on a few sequences first, before the full data set costs anything.
    probe = token_set(teacher, recipe.data, min(TEACHER_CHECK_SAMPLES, recipe.data_samples), recipe.sampling,
                      seed=recipe.schedule.seed)
    teacher_check = check_teacher(teacher.var, probe.labels, teacher_forcing_inputs(teacher, probe.tokens))
    data = _load_data(teacher, recipe, out, ranks)
    x_all = teacher_forcing_inputs(teacher, data.tokens)

    teacher.var.to(ranks.device).eval().requires_grad_(False)
    student.var.to(ranks.device).train()
    net: torch.nn.Module = student.var
    if ranks.world_size > 1:
        on_gpu = ranks.device.type == "cuda"
        net = DistributedDataParallel(student.var, device_ids=[ranks.device.index] if on_gpu else None)
    loss_fn = StepLoss(recipe, teacher.var, net, cfg, data, x_all, ranks)
    t_train = time.perf_counter()
    _run(out, recipe.schedule, list(student.var.parameters()), {"var": student.var}, loss_fn, "distill",
         main=ranks.main, tokens_per_step=recipe.schedule.batch_size * cfg.seq_len)
    train_seconds = time.perf_counter() - t_train
    if ranks.world_size > 1 and not ranks_agree(student.var):
        raise EvarError("DDP ranks ended with different weights: gradients were not synchronised; "
                        "the run is not usable")
    if ranks.main:
        run_info = {"world_size": ranks.world_size, "backend": ranks.backend or "none", "device": str(ranks.device),
                    "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
                    "torch": torch.__version__}
        _write_output(out, teacher, student, record, teacher_check, data, run_info)
        _say(ranks, f"distilled model → {out} ({run_info['total_seconds']:.0f}s, loss plot {out / PLOT_FILE})")
    return out


def _write_output(out: Path, teacher: Model, student: Model, record: dict[str, Any], teacher_check: dict[str, float],
                  data: TokenSet, run_info: dict[str, Any]) -> None:
    """The student VAR with the teacher's VQVAE (the tokens it learnt are the teacher's) + log + plot."""
    log_bytes = (out / LOG_FILE).read_bytes()
    rows = [json.loads(r) for r in log_bytes.decode().splitlines() if r]
    same_vqvae = all(torch.equal(a, b) for a, b in zip(teacher.vqvae.state_dict().values(),
                                                        student.vqvae.state_dict().values()))
    provenance = {
        "source": "evar distill", "teacher": record["teacher"], "parent": record["student"],
        "recipe": record["recipe"], "teacher_check": teacher_check,
        "data": {"source": data.source, "samples": len(data), "sha256": data.digest()},
        "vqvae": "teacher's" + ("" if same_vqvae else " (the student's own VQVAE differed and was replaced)"),
        "final": {k: round(v, 6) for k, v in rows[-1].items() if k in ("step", "loss", "task", "kd", "feature")},
        "run": run_info, "teacher_provenance": teacher.config.provenance,
        "parent_provenance": student.config.provenance,
    }
    model = Model(ModelConfig(student.config.var, teacher.config.vqvae), student.var.cpu().eval(), teacher.vqvae.cpu())
    plot = loss_plot(rows, f"{record['student']} ← {record['teacher']} ({record['recipe']['kd']} KD)")
    save_model_dir(model, out, provenance)
    atomic_write_bytes(out / LOG_FILE, log_bytes)
    atomic_write_bytes(out / PLOT_FILE, plot)


def loss_plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG: the loss terms (left) and KD per scale (right) against the step, raw (faint) and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((left, [k for k in ("loss", "task", "kd", "feature") if k in rows[0]]),
              (right, sorted((k for k in rows[0] if k.startswith("kd_scale")), key=lambda k: int(k[8:]))))
    for ax, keys in panels:
        for key in keys:
            values = [r[key] for r in rows]
            line, = ax.plot(steps, values, lw=0.6, alpha=0.35)
            label = f"scale {key[8:]}" if key.startswith("kd_scale") else key
            ax.plot(steps, _smooth(values), lw=1.4, color=line.get_color(), label=label)
    left.set_title("loss terms")
    right.set_title("T²·KL per scale (mean over its tokens)")
    for ax in (left, right):
        ax.set(xlabel="step", yscale="log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig, dpi=100)


def _smooth(values: list[float]) -> list[float]:
    """Exponential moving average over ~1/20 of the run (bias-corrected, so the start is not dragged to 0)."""
    decay = 1 - 1 / max(1.0, len(values) / 20)
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay ** i) if decay > 0 else v)
    return out


def _say(ranks: Ranks, text: str) -> None:
    if ranks.main:
        print(text, flush=True)
