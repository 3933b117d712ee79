"""`evar dd pairs`: the (noise, tokens) pairs a Distilled Decoding student learns from.

Sample i has label i mod classes and, per scale, a Gaussian noise per token in the VQVAE embedding space
(`flow.token_noise`, numbered by i). The teacher decodes it scale by scale with its KV cache through
`evar.models.decoding.Decoder`, as in ordinary generation, except that each scale's tokens come from the flow
(`flow.FlowPicker`) from that scale's noise to the teacher's guided, filtered distribution instead of an
inverse-CDF draw. The noise is not stored: it is a function of (seed, i).

Work is cut into chunks of `chunk` samples; chunk c is made by rank c mod world (torchrun) and written as one
atomic file `parts/part-NNNNNN.pt`. A chunk is always computed as the same batch, so 1 and N ranks give
bit-identical pairs; a rerun of the same command keeps the finished chunks and makes the rest.
`pairs.json` is the record (teacher, its weights' sha256, settings); it says `complete` with the tokens'
sha256 once every chunk is there, the wall time of every run (`runs`) and the summed compute time of the
chunks (`chunk_seconds`, which counts the work of killed runs too).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from evar import zoo
from evar.calibration import balanced_labels
from evar.checkpoints import Model, load_saved_state
from evar.dd.flow import DEFAULT_ODE_STEPS, FlowPicker, token_noise
from evar.distill.trainer import Ranks, init_ranks
from evar.errors import EvarError
from evar.files import atomic_write_bytes, atomic_write_json, read_json
from evar.models.decoding import Decoder
from evar.outputs import evar_made, mark_output
from evar.samples import SamplingSettings

RECORD_FILE, PARTS_DIR = "pairs.json", "parts"
PAIRS_FORMAT, PAIRS_KIND = "evar-dd-pairs", "dd pairs"
DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class PairsRecipe:
    samples: int
    sampling: SamplingSettings = SamplingSettings()  # the teacher's guidance, top-k, top-p; seed numbers the noise
    ode_steps: int = DEFAULT_ODE_STEPS
    chunk: int = DEFAULT_CHUNK

    def validate(self) -> None:
        self.sampling.validate()
        if self.samples < 1:
            raise EvarError(f"--samples must be >= 1, got {self.samples}")
        if self.ode_steps < 1:
            raise EvarError(f"--ode-steps must be >= 1, got {self.ode_steps}")
        if self.chunk < 1:
            raise EvarError(f"--chunk must be >= 1, got {self.chunk}")

    @property
    def chunks(self) -> int:
        return -(-self.samples // self.chunk)


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (name, dtype, shape, bytes), in name order: which weights made a result."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def make_chunk(teacher: Model, recipe: PairsRecipe, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B,) and tokens (B, L) of samples start … stop − 1, through the teacher's decoding loop."""
    cfg, s = teacher.config.var, recipe.sampling
    labels = balanced_labels(recipe.samples, cfg.num_classes)[start:stop]
    picker = FlowPicker(teacher.vqvae.quantize.embedding.weight, recipe.ode_steps)
    decoder = Decoder(teacher.var, teacher.vqvae, top_k=s.top_k, top_p=s.top_p, pick=picker)
    state = decoder.begin(labels, s.guidance)
    for si, pn in enumerate(cfg.patch_nums):
        decoder.step(state, si, token_noise(s.seed, si, start, stop - start, pn * pn, cfg.cvae))
    return labels, torch.cat(state.tokens, dim=1)


def part_path(out: Path, c: int) -> Path:
    return out / PARTS_DIR / f"part-{c:06d}.pt"


def _record(teacher_ref: str, teacher: Model, recipe: PairsRecipe) -> dict[str, Any]:
    return {"format": PAIRS_FORMAT, "format_version": 1, "teacher": teacher_ref,
            "teacher_var_sha256": weights_sha256(teacher.var), "teacher_vqvae_sha256": weights_sha256(teacher.vqvae),
            "recipe": dataclasses.asdict(recipe), "patch_nums": list(teacher.config.var.patch_nums)}


def _check_record(out: Path, record: dict[str, Any]) -> None:
    """A rerun into an existing pairs folder must be the same job (else its chunks would mix two data sets)."""
    old = read_json(out / RECORD_FILE, "pairs record")
    changed = [k for k in record if old.get(k) != record[k]]
    if changed:
        raise EvarError(f"{out} holds pairs made with other settings ({', '.join(changed)} differ); use the same "
                        "flags to continue it, or another --out")


def make_pairs(teacher_ref: str, out: str | Path, recipe: PairsRecipe, overwrite: bool = False) -> Path:
    """Make (or finish) the pairs in `out`; under torchrun the ranks share the chunks. `overwrite` starts over
    in a pairs folder (after the teacher loaded: a bad --teacher must not cost the old pairs)."""
    ranks = init_ranks()
    try:
        return _make_pairs(teacher_ref, Path(out), recipe, ranks, overwrite)
    finally:
        if ranks.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _make_pairs(teacher_ref: str, out: Path, recipe: PairsRecipe, ranks: Ranks, overwrite: bool) -> Path:
    recipe.validate()
    teacher = zoo.load(teacher_ref)
    record = _record(teacher_ref, teacher, recipe)
    if ranks.main and overwrite and evar_made(out) == PAIRS_KIND:
        shutil.rmtree(out)
    ranks.barrier()
    if ranks.agree((out / RECORD_FILE).exists()):
        _check_record(out, record)
        previous = read_json(out / RECORD_FILE, "pairs record")
    else:
        previous = {}
    ranks.barrier()
    if ranks.main:
        (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        mark_output(out, PAIRS_KIND, teacher=teacher_ref)
        atomic_write_json(out / RECORD_FILE, {**record, "complete": False, "runs": previous.get("runs", [])})
    ranks.barrier()
    mine = [c for c in range(recipe.chunks) if c % ranks.world_size == ranks.rank and not part_path(out, c).exists()]
    t0 = time.perf_counter()
    for c in tqdm(mine, desc="dd pairs", disable=not ranks.main, dynamic_ncols=True):
        start, stop = c * recipe.chunk, min((c + 1) * recipe.chunk, recipe.samples)
        t_chunk = time.perf_counter()
        labels, tokens = make_chunk(teacher, recipe, start, stop)
        buf = io.BytesIO()  # each part keeps its own time, so the total survives killed runs
        torch.save({"start": start, "labels": labels, "tokens": tokens,
                    "seconds": time.perf_counter() - t_chunk}, buf)
        atomic_write_bytes(part_path(out, c), buf.getvalue())
    seconds = time.perf_counter() - t0
    ranks.barrier()
    if ranks.main:
        labels, tokens, chunk_seconds = load_parts(out, recipe, with_seconds=True)
        runs = previous.get("runs", []) + [{"ranks": ranks.world_size, "chunks_made": len(mine) * ranks.world_size,
                                            "seconds": round(seconds, 1)}]
        atomic_write_json(out / RECORD_FILE, {**record, "complete": True, "tokens_sha256": tokens_digest(labels, tokens),
                                              "runs": runs, "seconds": round(sum(r["seconds"] for r in runs), 1),
                                              "chunk_seconds": round(chunk_seconds, 1)})
        print(f"{recipe.samples} pairs → {out} ({seconds:.0f}s on {ranks.world_size} rank(s))", flush=True)
    ranks.barrier()
    return out


def load_parts(out: Path, recipe: PairsRecipe, with_seconds: bool = False) -> tuple:
    """(labels, tokens) of every part, and with `with_seconds` the summed compute time of the parts (over all runs
    and ranks; parts of older EVAR versions count 0)."""
    labels, tokens, seconds = [], [], 0.0
    for c in range(recipe.chunks):
        path = part_path(out, c)
        if not path.exists():
            raise EvarError(f"{out} is missing {path.name}: rerun `evar dd pairs` with the same flags to finish it")
        part = load_saved_state(path, f"delete {path} and rerun `evar dd pairs` with the same flags")
        labels.append(part["labels"])
        tokens.append(part["tokens"])
        seconds += float(part.get("seconds", 0.0))
    return (torch.cat(labels), torch.cat(tokens)) + ((seconds,) if with_seconds else ())


def tokens_digest(labels: torch.Tensor, tokens: torch.Tensor) -> str:
    h = hashlib.sha256(labels.to(torch.int64).numpy().tobytes())
    h.update(tokens.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Pairs:
    labels: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N, L); sample i's noise is flow.sequence_noise(seed, i, …)
    record: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.record["recipe"]["sampling"]["seed"])


def load_pairs(path: str | Path) -> Pairs:
    """A finished pairs folder (refused, with what to do, when it is not one or not finished)."""
    path = Path(path)
    if not (path / RECORD_FILE).is_file():
        raise EvarError(f"--pairs {path} is not a pairs folder (no {RECORD_FILE}); make one with `evar dd pairs`")
    record = read_json(path / RECORD_FILE, "pairs record")
    if record.get("format") != PAIRS_FORMAT:
        raise EvarError(f"{path / RECORD_FILE} is not an `evar dd pairs` record")
    if not record.get("complete"):
        raise EvarError(f"--pairs {path} is unfinished: rerun the `evar dd pairs` command that made it to finish it")
    r = record["recipe"]
    recipe = PairsRecipe(r["samples"], SamplingSettings(**r["sampling"]), r["ode_steps"], r["chunk"])
    labels, tokens = load_parts(path, recipe)
    if tokens_digest(labels, tokens) != record["tokens_sha256"]:
        raise EvarError(f"the pairs in {path} do not match their record's sha256 (a part was changed or damaged); "
                        "make them again")
    return Pairs(labels, tokens, record)
