"""`evar dd train`: the student learns to map noise, and noise with the first t scales given, to the teacher's tokens.

Every step draws a global batch of pairs from the one checkpointed generator (as `evar distill`), and per sample a
t: 0 (all noise: the one-step case) with probability `p_zero`, else uniform in 1..S-1. Inputs: the codebook
vectors of the pair's tokens for scales < t (flag: data), its noise elsewhere (flag: noise). Loss over the
tokens of scales >= t: cross-entropy of the logits against the teacher's token, plus `reg_weight` × the squared
error of the regression head against that token's codebook vector. Under torchrun each rank takes its slice of
the batch and DDP averages the gradients. The loop (AdamW, warm-up + cosine, atomic `train_state.pt`,
`train_log.jsonl`) is `evar.train._run`, so a rerun of the same command resumes and ends with the same weights.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from evar import zoo
from evar.checkpoints import is_model_dir
from evar.dd.flow import sequence_noise
from evar.dd.model import DDModel, from_teacher, save_dd_dir
from evar.dd.pairs import Pairs, load_pairs, weights_sha256
from evar.distill.trainer import Ranks, _flat, _smooth, init_ranks, ranks_agree
from evar.errors import EvarError
from evar.files import atomic_write_bytes, atomic_write_json, figure_png, read_json
from evar.train import LOG_FILE, STATE_FILE, Schedule, _run, draw_batch

RUN_FILE, PLOT_FILE = "dd_run.json", "loss.png"
RUN_FILES = (STATE_FILE, LOG_FILE, RUN_FILE)


@dataclass(frozen=True)
class DDRecipe:
    schedule: Schedule = Schedule(steps=2000, batch_size=64, lr=5e-4, weight_decay=0.01, warmup=100, ckpt_every=200)
    p_zero: float = 0.5  # share of samples trained as the one-step case (t = 0)
    reg_weight: float = 1.0
    continuous_from: int | None = None

    def validate(self, world_size: int) -> None:
        s = self.schedule
        if s.steps < 1 or s.batch_size < 1 or not s.lr > 0 or s.ckpt_every < 1:
            raise EvarError("--steps, --batch-size, --ckpt-every must be >= 1 and --lr > 0")
        if s.batch_size % world_size:
            raise EvarError(f"--batch-size {s.batch_size} is the global batch: it must divide evenly over "
                            f"{world_size} ranks")
        if not 0 <= self.p_zero <= 1:
            raise EvarError(f"--p-zero must be in [0, 1], got {self.p_zero}")
        if not self.reg_weight >= 0:
            raise EvarError(f"--reg-weight must be >= 0, got {self.reg_weight}")


class StepLoss:
    """`loss_fn(gen, step)` for `evar.train._run`."""

    def __init__(self, recipe: DDRecipe, net: torch.nn.Module, model: DDModel, pairs: Pairs, ranks: Ranks):
        self.recipe, self.net, self.pairs, self.ranks = recipe, net, pairs, ranks
        self.cfg = model.config.var
        self.codebook = model.vqvae.quantize.embedding.weight.detach().clone()
        self.starts = torch.tensor([lo for lo, _ in self.cfg.scale_ranges()] + [self.cfg.seq_len])

    def batch(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        B, S = self.recipe.schedule.batch_size, self.cfg.num_scales
        pick = draw_batch(len(self.pairs.labels), B, gen)
        zero = torch.rand(B, generator=gen) < self.recipe.p_zero
        t = torch.where(zero, 0, torch.randint(1, max(S, 2), (B,), generator=gen).clamp(max=S - 1))
        part = slice(self.ranks.rank * B // self.ranks.world_size, (self.ranks.rank + 1) * B // self.ranks.world_size)
        pick, t = pick[part], t[part]
        noise = torch.cat([sequence_noise(self.pairs.seed, int(i), 1, self.cfg.patch_nums, self.cfg.cvae)
                           for i in pick])
        tokens = self.pairs.tokens[pick]
        given = torch.arange(self.cfg.seq_len).view(1, -1) < self.starts[t].view(-1, 1)  # (b, L) scales < t
        x = torch.where(given.unsqueeze(-1), self.codebook[tokens], noise)
        dev = self.ranks.device
        return {"labels": self.pairs.labels[pick].to(dev), "x": x.to(dev), "given": given.to(dev),
                "tokens": tokens.to(dev), "t": t}

    def __call__(self, gen: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        b = self.batch(gen)
        logits, vec = self.net(b["labels"], b["x"], b["given"])
        learn = ~b["given"]
        ce = F.cross_entropy(logits[learn], b["tokens"][learn])
        target = self.codebook.to(vec.device)[b["tokens"][learn]]
        reg = (vec[learn] - target).square().mean()
        total = ce + self.recipe.reg_weight * reg
        with torch.no_grad():
            acc = (logits[learn].argmax(-1) == b["tokens"][learn]).float().mean()
        logged = {"loss": total, "ce": ce, "reg": reg, "token_acc": acc}
        values = torch.stack([v.detach().float() for v in logged.values()])
        if self.ranks.world_size > 1:
            dist.all_reduce(values)
            values /= self.ranks.world_size
            total = total + (values[0] - total.detach())  # log the global batch's loss; DDP averages gradients
        result = dict(zip(logged, values))
        result["loss"] = total
        return result


def train(teacher_ref: str, pairs_dir: str | Path, out: str | Path, recipe: DDRecipe, overwrite: bool = False) -> Path:
    """Train a DD student from `pairs_dir` (made by `evar dd pairs` from the same teacher) into `out`."""
    ranks = init_ranks()
    try:
        return _train(teacher_ref, Path(pairs_dir), Path(out), recipe, ranks, overwrite)
    finally:
        if ranks.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _status(out: Path, overwrite: bool) -> str:
    if is_model_dir(out):
        if overwrite:
            return "replace"
        raise EvarError(f"{out} is already a model directory; pass --overwrite to replace it, or choose another --out")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and p.name != "evar-output.json"
                         and not any(p.name.startswith(f".{f}.") for f in RUN_FILES))
        if foreign:
            raise EvarError(f"--out {out} holds files `evar dd train` did not write ({', '.join(foreign[:3])})")
    return "resume" if (out / STATE_FILE).exists() else "fresh"


def _train(teacher_ref: str, pairs_dir: Path, out: Path, recipe: DDRecipe, ranks: Ranks, overwrite: bool) -> Path:
    t0 = time.perf_counter()
    recipe.validate(ranks.world_size)
    status = _status(out, overwrite)
    pairs = load_pairs(pairs_dir)
    teacher = zoo.load(teacher_ref)
    sha = weights_sha256(teacher.var)
    if sha != pairs.record["teacher_var_sha256"]:
        raise EvarError(f"the pairs in {pairs_dir} were made by another teacher (weights sha256 "
                        f"{pairs.record['teacher_var_sha256'][:12]}…, --teacher {teacher_ref} has {sha[:12]}…)")
    if tuple(pairs.record["patch_nums"]) != tuple(teacher.config.var.patch_nums):
        raise EvarError(f"the pairs in {pairs_dir} have other scales than --teacher {teacher_ref}")
    record = {"teacher": teacher_ref, "teacher_var_sha256": sha, "pairs": str(pairs_dir),
              "pairs_sha256": pairs.record["tokens_sha256"], "recipe": json.loads(json.dumps(dataclasses.asdict(recipe)))}
    if status == "resume":
        old = _flat(read_json(out / RUN_FILE, "run record"))
        changed = [k for k in sorted(set(old) | set(_flat(record))) if old.get(k) != _flat(record).get(k)]
        if changed:
            raise EvarError(f"{out} holds a run with other settings ({', '.join(changed)} changed): use the same "
                            "flags to continue it, or another --out")
    model = from_teacher(teacher, recipe.continuous_from)
    if recipe.continuous_from is not None and recipe.continuous_from > teacher.config.var.num_scales:
        raise EvarError(f"--continuous-from must be <= {teacher.config.var.num_scales}")
    ranks.barrier()
    if ranks.main:
        if status == "replace":
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if status != "resume":
            atomic_write_json(out / RUN_FILE, record)
    ranks.barrier()
    student = model.student.to(ranks.device).train()
    net: torch.nn.Module = student
    if ranks.world_size > 1:
        net = DistributedDataParallel(student, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    t_train = time.perf_counter()
    _run(out, recipe.schedule, list(student.parameters()), {"dd": student}, StepLoss(recipe, net, model, pairs, ranks),
         "dd train", main=ranks.main)
    train_seconds = time.perf_counter() - t_train
    if ranks.world_size > 1 and not ranks_agree(student):
        raise EvarError("DDP ranks ended with different weights: gradients were not synchronised")
    if ranks.main:
        log_bytes = (out / LOG_FILE).read_bytes()
        rows = [json.loads(r) for r in log_bytes.decode().splitlines() if r]
        provenance = {"source": "evar dd train", **record, "pairs_record": {k: pairs.record[k] for k in (
                          "teacher", "recipe", "seconds", "tokens_sha256") if k in pairs.record},
                      "final": {k: round(v, 6) for k, v in rows[-1].items() if k in ("step", "loss", "ce", "reg")},
                      "run": {"world_size": ranks.world_size, "device": str(ranks.device),
                              "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
                              "torch": torch.__version__},
                      "teacher_provenance": teacher.config.provenance}
        model.student = student.cpu().eval()
        save_dd_dir(model, out, provenance)
        atomic_write_bytes(out / LOG_FILE, log_bytes)
        atomic_write_bytes(out / PLOT_FILE, _plot(rows, f"DD student ← {teacher_ref}"))
        print(f"DD student → {out} ({provenance['run']['total_seconds']:.0f}s)", flush=True)
    return out


def _plot(rows: list[dict[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, keys in ((left, ("loss", "ce", "reg")), (right, ("token_acc",))):
        for key in keys:
            values = [r[key] for r in rows]
            line, = ax.plot(steps, values, lw=0.6, alpha=0.35)
            ax.plot(steps, _smooth(values), lw=1.4, color=line.get_color(), label=key)
        ax.set(xlabel="step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set(yscale="log", title="loss terms")
    right.set(title="token accuracy (tokens with t <= scale)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig, dpi=100)
