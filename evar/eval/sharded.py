"""The ImageNet-style evaluation run: images → Inception features in shards, sharded over torchrun ranks,
resumable, then FID / IS / precision / recall on rank 0.

Samples are cut into shards of `shard_size` consecutive indices, whatever the number of ranks; a shard is
made in chunks of `batch_size` from its first index, so the same flags give the same images, bit for bit,
on 1 or 8 ranks. Each finished shard is one atomic file in the work directory (`OUT.parts/` by default):
its pool features, bias-free logits and the sha256 of its uint8 pixels. A rerun of the same command skips
finished shards (a changed setting is refused, naming it); rank 0 lists the shards still to make and deals
them out, so a resumed run is balanced too. Reference images (ADM's `arr_0`) go through the same machinery
into `OUT.parts/ref-<key>/`, cached across runs against the same reference file.
The work directory must be one every rank can read and write: any single node, or a shared filesystem.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from evar.distill.trainer import Ranks, init_ranks
from evar.errors import EvarError
from evar.outputs import OUTPUT_MARKER, mark_output
from evar.eval.inception import PREPROCESS, FIDInception, InceptionInfo, load_inception, missing_weights_message
from evar.eval.scores import IS_SPLITS, Reference, read_reference, score, write_reference
from evar.eval.sources import PRECISIONS, ImageSetSource, Source, VARSource
from evar.files import atomic_write_bytes, atomic_write_json
from evar.samples import SamplingSettings, save_png

FORMAT = "evar-imagenet-eval-v1"
WORK_DIR_KIND = "evaluation shards"  # what evar.outputs calls the work directory (resumed, never overwritten)
DEFAULT_NUM_SAMPLES = 50_000  # VAR's protocol: 50 per ImageNet class
DEFAULT_SHARD_SIZE = 512
RUN_FILE = "run.json"
_PATH_FIELDS = ("model", "artifact", "images")  # where a source lives; not part of what it is
T = TypeVar("T")


@dataclass(frozen=True)
class EvalPlan:
    """Everything `python -m evar.eval.imagenet` was asked; `validate` checks it before anything loads."""

    out: Path
    inception_weights: Path | None
    model: str | None = None
    var_ckpt: Path | None = None
    vae_ckpt: Path | None = None
    artifact: Path | None = None
    backend: str = "cpu"
    images: Path | None = None
    image_size: int = 256
    ref_stats: Path | None = None
    preprocess: str = "tf"
    num_samples: int | None = None
    batch_size: int = 64
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    precision: str = "fp32"
    save_png: Path | None = None
    save_ref_stats: Path | None = None
    work_dir: Path | None = None
    shard_size: int = DEFAULT_SHARD_SIZE

    @property
    def parts(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.stem + ".parts")

    def validate(self, device: torch.device) -> None:
        given = [flag for flag, v in (("--model", self.model), ("--artifact", self.artifact),
                                      ("--images", self.images)) if v is not None]
        if len(given) != 1:
            raise EvarError("give exactly one image source: --model REF, --artifact DIR or --images FOLDER|NPZ"
                            + (f" (got {' and '.join(given)})" if given else ""))
        if self.inception_weights is None:
            raise EvarError(missing_weights_message(None))
        if self.batch_size < 1 or self.shard_size < 1 or self.image_size < 16:
            raise EvarError("--batch-size and --shard-size must be >= 1, --image-size >= 16")
        if self.num_samples is not None and self.num_samples < IS_SPLITS:
            raise EvarError(f"--num-samples must be at least {IS_SPLITS} (the Inception Score averages "
                            f"{IS_SPLITS} splits), got {self.num_samples}")
        if self.precision not in PRECISIONS:
            raise EvarError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.precision == "fp16" and device.type != "cuda":
            raise EvarError("--precision fp16 needs a GPU; on a CPU use fp32 or bf16")
        if self.preprocess not in PREPROCESS:
            raise EvarError(f"--preprocess must be one of {', '.join(PREPROCESS)}, got '{self.preprocess}'")
        if self.out.is_dir():
            raise EvarError(f"--out {self.out} is a directory; give the report's file name (e.g. report.json)")
        self.sampling.validate()


# ---------------------------------------------------------------- shards
@dataclass(frozen=True)
class Shards:
    """`total` samples cut into files of `size` consecutive indices under `folder`."""

    folder: Path
    total: int
    size: int
    prefix: str

    def __len__(self) -> int:
        return math.ceil(self.total / self.size)

    def span(self, s: int) -> tuple[int, int]:
        return s * self.size, min((s + 1) * self.size, self.total)

    def path(self, s: int) -> Path:
        return self.folder / f"{self.prefix}-{s:05d}.npz"


@dataclass
class Features:
    pool: np.ndarray  # (N, D) float32
    logits: np.ndarray  # (N, 1008) float32, bias-free
    images_sha256: str  # over the shards' pixel digests, in order


def png_path(folder: Path, index: int, label: int | None) -> Path:
    return folder / (f"{index:06d}.png" if label is None else f"{index:06d}_class{label:04d}.png")


def _shard_done(shards: Shards, s: int, source: Source, png_dir: Path | None) -> bool:
    if not shards.path(s).exists():
        return False
    if png_dir is None:
        return True
    start, stop = shards.span(s)
    labels = source.labels(start, stop)
    return all(png_path(png_dir, i, None if labels is None else int(labels[i - start])).exists()
               for i in range(start, stop))


@torch.no_grad()
def _make_shard(shards: Shards, s: int, source: Source, net: FIDInception, batch_size: int,
                png_dir: Path | None, device: torch.device, bar: tqdm) -> None:
    start, stop = shards.span(s)
    pools, logits, pixels = [], [], hashlib.sha256()
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        images = source.images(a, b)  # uint8 (n, H, W, 3)
        pixels.update(np.ascontiguousarray(images).tobytes())
        pool, logit = net(torch.from_numpy(np.ascontiguousarray(images)).to(device))
        pools.append(pool.float().cpu().numpy())
        logits.append(logit.float().cpu().numpy())
        if png_dir is not None:
            labels = source.labels(a, b)
            for i, img in enumerate(images):
                save_png(Image.fromarray(img), png_path(png_dir, a + i, None if labels is None else int(labels[i])))
        bar.update(b - a)
    buf = io.BytesIO()
    np.savez(buf, pool=np.concatenate(pools), logits=np.concatenate(logits), start=start, stop=stop,
             pixels_sha256=np.array(pixels.hexdigest()))
    atomic_write_bytes(shards.path(s), buf.getvalue())


def run_shards(shards: Shards, source: Source, net: FIDInception, ranks: Ranks, batch_size: int, what: str,
               png_dir: Path | None = None) -> tuple[int, int]:
    """Make this rank's share of the unfinished shards; returns (made by all ranks, found finished)."""
    pending = decided_by_rank0(ranks, lambda: [s for s in range(len(shards))
                                               if not _shard_done(shards, s, source, png_dir)])
    mine = pending[ranks.rank::ranks.world_size]
    if ranks.main:
        shards.folder.mkdir(parents=True, exist_ok=True)
        done = len(shards) - len(pending)
        print(f"{what}: {len(shards)} shards of {shards.size}, {done} finished earlier, {len(pending)} to make "
              f"on {ranks.world_size} rank{'s' if ranks.world_size > 1 else ''}", flush=True)
    ranks.barrier()
    work = sum(shards.span(s)[1] - shards.span(s)[0] for s in mine)
    desc = what if ranks.world_size == 1 else f"{what} (rank 0 of {ranks.world_size})"
    with tqdm(total=work, desc=desc, unit="img", disable=not ranks.main or not work, dynamic_ncols=True) as bar:
        for s in mine:
            _make_shard(shards, s, source, net, batch_size, png_dir, ranks.device, bar)
    ranks.barrier()
    return len(pending), len(shards) - len(pending)


def gather(shards: Shards) -> Features:
    """Every shard's features in index order (rank 0, after all ranks finished)."""
    pools, logits, digests = [], [], hashlib.sha256()
    for s in range(len(shards)):
        path = shards.path(s)
        if not path.exists():
            raise EvarError(f"shard {path} is missing after every rank finished: the ranks must share the work "
                            "directory (one node, or --work-dir on a shared filesystem)")
        with np.load(path, allow_pickle=False) as z:
            if (int(z["start"]), int(z["stop"])) != shards.span(s):
                raise EvarError(f"{path} holds samples {int(z['start'])}..{int(z['stop'])}, not {shards.span(s)}: "
                                f"it belongs to another run; delete {shards.folder}")
            pools.append(z["pool"])
            logits.append(z["logits"])
            digests.update(str(z["pixels_sha256"]).encode())
    return Features(np.concatenate(pools), np.concatenate(logits), digests.hexdigest())


# ---------------------------------------------------------------- ranks
def decided_by_rank0(ranks: Ranks, decide: Callable[[], T]) -> T:
    """`decide()` on rank 0; every rank gets its value, or raises its EvarError (so all take the same path)."""
    if ranks.world_size == 1:
        return decide()
    box: list[Any] = [None]
    if ranks.main:
        try:
            box = [("ok", decide())]
        except EvarError as err:
            box = [("error", str(err))]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise EvarError(value)
    return value


# ---------------------------------------------------------------- the run record
def _check_record(parts: Path, record: dict[str, Any]) -> None:
    """Refuse to continue a run made with other settings (naming them); write the record for a new run."""
    path = parts / RUN_FILE
    if path.exists():
        old, new = _dotted(json.loads(path.read_text())), _dotted(record)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise EvarError(f"{parts} holds a run with other settings ({', '.join(changed)} changed): use the same "
                            "flags to continue it, or another --work-dir / --out")
        return
    if parts.exists() and any(p.name != OUTPUT_MARKER for p in parts.iterdir()):
        raise EvarError(f"{parts} exists and is not an evaluation's work directory; choose another --work-dir")
    atomic_write_json(path, record)
    mark_output(parts, WORK_DIR_KIND)


def _dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"source": {"sampling": {"cfg": 1.5}}} → {"source.sampling.cfg": 1.5}: a change is named to the flag."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _source_record(described: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in described.items() if k not in _PATH_FIELDS}


# ---------------------------------------------------------------- the evaluation
def evaluate(plan: EvalPlan, open_artifact: Callable[..., Source] | None = None) -> dict[str, Any] | None:
    """Run the plan on this process (one of a torchrun job, or alone); rank 0 returns the report.
    `open_artifact(root, backend, settings, num_samples, batch_size)` makes the source of `--artifact` runs: the
    command passes it in, so this module (PyTorch side) never imports the runtime."""
    ranks = init_ranks()
    try:
        return _evaluate(plan, ranks, open_artifact)
    except EvarError:
        if not ranks.main:  # every rank meets the same bad input; rank 0 alone says so
            raise SystemExit(2) from None
        raise
    finally:
        if ranks.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _open_source(plan: EvalPlan, device: torch.device, open_artifact: Callable[..., Source] | None) -> Source:
    if plan.images is not None:
        return ImageSetSource(plan.images, plan.image_size, plan.num_samples)
    n = plan.num_samples or DEFAULT_NUM_SAMPLES
    if plan.artifact is not None:
        if open_artifact is None:
            raise EvarError("evaluating an exported artifact needs the runtime: run `python -m evar.eval.imagenet`")
        return open_artifact(plan.artifact, plan.backend, plan.sampling, n, plan.batch_size)
    from evar import zoo

    model = zoo.load(plan.model, plan.var_ckpt, plan.vae_ckpt)
    return VARSource(model, plan.model, plan.sampling, n, plan.precision, device)


def _evaluate(plan: EvalPlan, ranks: Ranks, open_artifact: Callable[..., Source] | None) -> dict[str, Any] | None:
    t0 = time.perf_counter()
    if ranks.device.type == "cuda":  # fp32 means fp32: TF32 convolutions would move the Inception features
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    plan.validate(ranks.device)
    net, info = load_inception(plan.inception_weights, plan.preprocess, ranks.device)
    reference = (read_reference(plan.ref_stats, net.pool_dim, plan.preprocess, info.sha256)
                 if plan.ref_stats is not None else None)
    source = _open_source(plan, ranks.device, open_artifact)
    if source.num_samples < IS_SPLITS:
        raise EvarError(f"{plan.images} holds {source.num_samples} images; the Inception Score needs at least "
                        f"{IS_SPLITS} (one per split)")
    described = decided_by_rank0(ranks, source.describe)
    record = {"format": FORMAT, "source": _source_record(described), "num_samples": source.num_samples,
              "batch_size": plan.batch_size, "shard_size": plan.shard_size, "inception_sha256": info.sha256,
              "preprocess": plan.preprocess}
    decided_by_rank0(ranks, lambda: _check_record(plan.parts, record))  # the first write of the run

    shards = Shards(plan.parts, source.num_samples, plan.shard_size, "samples")
    made, reused = run_shards(shards, source, net, ranks, plan.batch_size, "samples → Inception", plan.save_png)
    ref_shards = _reference_shards(plan, reference, info)
    if ref_shards is not None:
        run_shards(ref_shards, ImageSetSource(reference.path), net, ranks, plan.batch_size, "reference images")
    if not ranks.main:
        return None
    feats = gather(shards)
    ref_feats = gather(ref_shards).pool if ref_shards is not None else reference.features if reference else None
    report = {"format": FORMAT, "metrics": score(feats.pool, feats.logits, reference, ref_feats),
              "source": described, "images_sha256": feats.images_sha256, "inception": info.to_dict(),
              "reference": reference.describe() if reference is not None else None,
              "run": {"world_size": ranks.world_size, "backend": ranks.backend or "none", "device": str(ranks.device),
                      "shards_made": made, "shards_reused": reused, "work_dir": str(plan.parts),
                      "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__}}
    atomic_write_json(plan.out, report)
    if plan.save_ref_stats is not None:
        write_reference(plan.save_ref_stats, feats.pool, plan.preprocess, info.sha256)
    print(summary(report, plan), flush=True)
    return report


def _reference_shards(plan: EvalPlan, reference: Reference | None, info: InceptionInfo) -> Shards | None:
    """Where the reference images' features are cached (None: the file needs no Inception pass)."""
    if reference is None or reference.images is None or reference.features is not None:
        return None
    stat = reference.path.stat()
    key = json.dumps([reference.path.name, stat.st_size, stat.st_mtime_ns, info.sha256, plan.preprocess,
                      plan.batch_size, plan.shard_size])
    folder = plan.parts / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return Shards(folder, len(reference.images), plan.shard_size, "reference")


def summary(report: dict[str, Any], plan: EvalPlan) -> str:
    m = report["metrics"]
    parts = [f"FID {m['fid']:.2f}" if m["fid"] is not None else "FID –",
             f"IS {m['inception_score']:.1f} ± {m['inception_score_std']:.1f}"]
    if m["precision"] is not None:
        parts += [f"precision {m['precision']:.3f}", f"recall {m['recall']:.3f} (k={m['k']})"]
    ref = report["reference"]
    line = " | ".join(parts) + f" | {m['num_samples']} samples" + (f" vs {Path(ref['path']).name}" if ref else "")
    line += f" → {plan.out}"
    if not report["inception"]["standard"]:
        line += " (not the standard Inception weights: not comparable with published numbers)"
    if "not_computed" in m:
        line += f"\nnot computed: {m['not_computed']}"
    return line
