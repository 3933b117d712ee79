"""Token sequences for calibration (pruning) and distillation: the model's own generations, or real
images through the VQVAE. Either way the result is teacher-forcing data: labels + all L tokens."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from evar.checkpoints import Model
from evar.data import load_images
from evar.errors import EvarError
from evar.models.decoding import generate
from evar.samples import SamplingSettings

GENERATED = "teacher"  # the data source name meaning "sample the model itself"
PRECISIONS = ("auto", "fp32", "bf16")  # of generating calibration data


def generation_dtype(precision: str) -> torch.dtype:
    """'auto' is bfloat16 where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX: twice the
    float32 rate), else float32. The result is samples either way, never a model's weights or statistics."""
    if precision not in PRECISIONS:
        raise EvarError(f"unknown calibration precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up defensively
        native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class TokenSet:
    labels: torch.Tensor  # (N,) int64
    tokens: torch.Tensor  # (N, L) int64, scales concatenated coarse to fine
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> TokenSet:
        return TokenSet(self.labels[index], self.tokens[index], self.source)

    def digest(self) -> str:
        """sha256 of labels and tokens: which data a model was made from, comparable across runs and ranks."""
        h = hashlib.sha256(self.labels.to(torch.int64).numpy().tobytes())
        h.update(self.tokens.to(torch.int64).numpy().tobytes())
        return h.hexdigest()

    def scale_tokens(self, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
        return list(self.tokens.split([pn * pn for pn in patch_nums], dim=1))


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


@torch.no_grad()
def from_generations(model: Model, n: int, settings: SamplingSettings, batch_size: int = 64,
                     progress: bool = True, dtype: torch.dtype = torch.float32,
                     part: tuple[int, int] | None = None) -> TokenSet:
    """n sequences the model samples itself (class-balanced labels): no dataset needed. A `dtype` other
    than float32 samples under autocast (faster; the tokens then differ from a float32 run's).

    `part=(start, stop)` makes only those samples of the n: sample i is the same whoever makes it (its
    uniforms are numbered by i), so parts made by several processes concatenate to the whole set.
    """
    start, stop = part or (0, n)
    labels = balanced_labels(n, model.config.var.num_classes)[start:stop]
    chunks = []
    for at in tqdm(range(start, stop, batch_size), desc="sampling the model", disable=not progress,
                   dynamic_ncols=True):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            gen = generate(model.var, model.vqvae, labels[at - start:at - start + batch_size], guidance=settings.guidance,
                           top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, first_sample=at,
                           decode=False)
        chunks.append(torch.cat(gen.tokens, dim=1))
    tokens = torch.cat(chunks) if chunks else torch.zeros(0, model.config.var.seq_len, dtype=torch.long)
    return TokenSet(labels, tokens, GENERATED)


@torch.no_grad()
def from_images(model: Model, source: str, n: int, seed: int = 0) -> TokenSet:
    """n real images ('digits' or an image folder) encoded by the model's VQVAE, chosen at random."""
    images, labels = load_images(source, "train", model.config.vqvae.image_size)
    if int(labels.max()) >= model.config.var.num_classes:
        raise EvarError(f"{source} has {int(labels.max()) + 1} classes; the model knows {model.config.var.num_classes}")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    idx = [model.vqvae.img_to_idx(images[pick][i:i + 256]) for i in range(0, len(pick), 256)]
    tokens = torch.cat([torch.cat(scales, dim=1) for scales in idx])
    return TokenSet(labels[pick], tokens, source)


def token_set(model: Model, data: str, n: int, settings: SamplingSettings | None = None, seed: int = 0) -> TokenSet:
    """`data` is 'teacher' (the model's own generations), 'digits', or an image folder."""
    if n < 1:
        raise EvarError(f"need at least one calibration sample, got {n}")
    if data == GENERATED:
        return from_generations(model, n, settings or SamplingSettings(seed=seed))
    return from_images(model, data, n, seed)
