"""Generating sample sets from a model, and writing them as `samples.npz` + `grid.png`."""
from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evar.checkpoints import Model
from evar.data import to_uint8_nhwc
from evar.errors import EvarError
from evar.files import atomic_dir, atomic_write_bytes
from evar.models.decoding import generate


@dataclass(frozen=True)
class SamplingSettings:
    guidance: float = 1.5  # classifier-free guidance at the last scale (the --cfg flag)
    top_k: int = 900
    top_p: float = 0.96
    seed: int = 0

    def validate(self) -> None:
        """The same limits as the runtime's (an exported graph and PyTorch refuse the same requests)."""
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise EvarError(f"--cfg must be a finite number >= 0, got {self.guidance}")
        if self.top_k < 0:
            raise EvarError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 <= self.top_p < 1.0:
            raise EvarError(f"--top-p must be in [0, 1) (0 disables it), got {self.top_p}")
        if not 0 <= self.seed < 2**64:
            raise EvarError(f"--seed must be in [0, 2**64), got {self.seed}")


def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise EvarError(f"--classes must be comma-separated integers, got '{text}'") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise EvarError(f"--classes must name classes in 0..{num_classes - 1}, got '{text}'")
    return classes


def class_labels(classes: list[int], per_class: int) -> torch.Tensor:
    if per_class < 1:
        raise EvarError(f"--per-class must be >= 1, got {per_class}")
    return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)


@torch.no_grad()
def sample_images(model: Model, labels: torch.Tensor, settings: SamplingSettings, batch_size: int = 64,
                  progress: bool = True, **recipe) -> np.ndarray:
    """uint8 (N, H, W, 3) images; chunking does not change them (randoms are numbered per sample). `recipe`: the
    generation modes of `generate` (early, split_scale, token_keep, cfg_until_scale)."""
    settings.validate()
    chunks = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress or len(starts) < 2, dynamic_ncols=True):
        gen = generate(model.var, model.vqvae, labels[start:start + batch_size], guidance=settings.guidance,
                       top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, first_sample=start, **recipe)
        chunks.append(to_uint8_nhwc(gen.images))
    return np.concatenate(chunks)


def grid_image(images: np.ndarray, columns: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile uint8 (N, H, W, 3) images, `columns` per row, nearest-upscaled by `scale`."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    grid = Image.fromarray(canvas)
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST) if scale > 1 else grid


def save_png(image: Image.Image, path: Path) -> None:
    from PIL.PngImagePlugin import PngInfo

    from evar.outputs import PNG_SOFTWARE

    info = PngInfo()
    info.add_text("Software", PNG_SOFTWARE)  # --overwrite recognises it as EVAR's
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def write_samples(out: str | Path, images: np.ndarray, labels: torch.Tensor | np.ndarray, columns: int,
                  settings: SamplingSettings | None = None, source: str | None = None) -> Path:
    """OUT/samples.npz (uint8 images, int64 labels) + OUT/grid.png, appearing together (atomically)."""
    from evar.outputs import mark_output

    out = Path(out)
    with atomic_dir(out) as tmp:
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=np.asarray(labels, dtype=np.int64))
        atomic_write_bytes(tmp / "samples.npz", buf.getvalue())
        scale = max(1, 128 // images.shape[1])  # small images are upscaled so a person can see them
        save_png(grid_image(images, columns, scale), tmp / "grid.png")
        mark_output(tmp, "sample set", source=source, count=len(images),
                    sampling=dataclasses.asdict(settings) if settings else None)
    return out
