"""Where the images of an ImageNet-style evaluation come from: a VAR model, an exported artifact, or a set
of images (a folder or an npz). Every source answers `images(start, stop)`: the uint8 (n, H, W, 3) images of
samples start..stop-1, the same whichever process asks and in whatever chunks, because a generated sample's
label (sample i shows class i // per_class, VAR's 50-per-class protocol) and its random numbers (numbered by
i within the seed's stream, `evar.rng`) depend on its index alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from evar.checkpoints import Model
from evar.data import ImageFolder, to_uint8_nhwc
from evar.errors import EvarError
from evar.eval.scores import NpyMember, image_member
from evar.files import sha256_file
from evar.models.decoding import generate
from evar.samples import SamplingSettings

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Source(Protocol):
    num_samples: int

    def images(self, start: int, stop: int) -> np.ndarray: ...

    def labels(self, start: int, stop: int) -> np.ndarray | None: ...

    def describe(self) -> dict[str, Any]: ...


def per_class_count(num_samples: int, num_classes: int) -> int:
    if num_samples < 1 or num_samples % num_classes:
        raise EvarError(f"--num-samples {num_samples} is not a positive multiple of the model's {num_classes} "
                        f"classes: every class gets the same number of samples (VAR's protocol: 50000 = 50 × 1000)")
    return num_samples // num_classes


def class_of(start: int, stop: int, per_class: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.int64) // per_class


@dataclass
class VARSource:
    """Images sampled from a VAR generator (dense, pruned, distilled, 2:4: any EVAR model directory)."""

    model: Model
    ref: str
    settings: SamplingSettings
    num_samples: int
    precision: str = "fp32"
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.per_class = per_class_count(self.num_samples, self.model.config.var.num_classes)
        self.model.var.to(self.device)
        self.model.vqvae.to(self.device)

    def labels(self, start: int, stop: int) -> np.ndarray:
        return class_of(start, stop, self.per_class)

    @torch.no_grad()
    def images(self, start: int, stop: int) -> np.ndarray:
        labels = torch.from_numpy(self.labels(start, stop)).to(self.device)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            gen = generate(self.model.var, self.model.vqvae, labels, guidance=self.settings.guidance, top_k=self.settings.top_k,
                           top_p=self.settings.top_p, seed=self.settings.seed, first_sample=start)
        return to_uint8_nhwc(gen.images)

    def describe(self) -> dict[str, Any]:
        return {"kind": "var", "model": self.ref, "fingerprint": model_fingerprint(self.model),
                "params": sum(p.numel() for p in self.model.var.parameters()),
                "num_classes": self.model.config.var.num_classes, "per_class": self.per_class,
                "sampling": dataclasses.asdict(self.settings), "precision": self.precision}


def model_fingerprint(model: Model) -> str:
    """sha256 of every VAR and VQVAE tensor: a resumed run must continue with the very same weights."""
    h = hashlib.sha256()
    for prefix, module in (("var.", model.var), ("vqvae.", model.vqvae)):
        for name, tensor in module.state_dict().items():
            h.update((prefix + name).encode())
            h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class ArtifactSource:
    """Images from an exported artifact through the torch-free runtime (`--artifact DIR --backend cpu`)."""

    root: Path
    generator: Any  # runtime Generator
    settings: SamplingSettings
    num_samples: int
    backend: str

    def __post_init__(self) -> None:
        self.per_class = per_class_count(self.num_samples, self.generator.artifact.num_classes)

    def labels(self, start: int, stop: int) -> np.ndarray:
        return class_of(start, stop, self.per_class)

    def images(self, start: int, stop: int) -> np.ndarray:
        s = self.settings
        return self.generator.generate(self.labels(start, stop), seed=s.seed, cfg=s.guidance, top_k=s.top_k,
                                       top_p=s.top_p, first_sample=start).images

    def describe(self) -> dict[str, Any]:
        return {"kind": "artifact", "artifact": str(self.root), "backend": self.backend,
                "fingerprint": sha256_file(self.root / "manifest.json"),  # it lists every graph file's hash
                "num_classes": self.generator.artifact.num_classes, "per_class": self.per_class,
                "sampling": dataclasses.asdict(self.settings)}


@dataclass
class ImageSetSource:
    """Images that exist already: a folder (recursive, sorted; centre-cropped to `image_size` the way ADM
    prepares ImageNet) or an npz (`arr_0` as in ADM's sample and reference batches, or `images`)."""

    path: Path
    image_size: int = 256
    limit: int | None = None

    def __post_init__(self) -> None:
        self.files: list[Path] | None = None
        self.member: NpyMember | None = None
        if self.path.is_dir():
            try:
                self.files = ImageFolder(self.path, self.image_size).files
            except FileNotFoundError as err:
                raise EvarError(str(err)) from None
            available = len(self.files)
        elif self.path.is_file():
            self.member = image_member(self.path)
            available = len(self.member)
        else:
            raise EvarError(f"--images {self.path}: no such folder or npz file")
        if self.limit is not None and self.limit > available:
            raise EvarError(f"--num-samples {self.limit}: {self.path} holds only {available} images")
        self.num_samples = self.limit or available

    def labels(self, start: int, stop: int) -> None:
        return None

    def images(self, start: int, stop: int) -> np.ndarray:
        if self.member is not None:
            return np.ascontiguousarray(self.member.rows(start, stop))
        return np.stack([adm_center_crop(p, self.image_size) for p in self.files[start:stop]])

    def describe(self) -> dict[str, Any]:
        if self.member is not None:
            stat = self.path.stat()
            ident = f"{self.path.name}:{stat.st_size}:{stat.st_mtime_ns}"
            return {"kind": "npz", "images": str(self.path), "fingerprint": hashlib.sha256(ident.encode()).hexdigest()}
        h = hashlib.sha256()
        for p in self.files[:self.num_samples]:
            h.update(f"{p.relative_to(self.path)}:{p.stat().st_size}\n".encode())
        return {"kind": "folder", "images": str(self.path), "image_size": self.image_size, "fingerprint": h.hexdigest()}


def adm_center_crop(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3): halve with a box filter while the short side is at least 2·size, scale the short
    side to `size` (bicubic), cut the centre square. ADM's recipe for ImageNet reference batches."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        while min(im.size) >= 2 * size:
            im = im.resize((im.width // 2, im.height // 2), Image.Resampling.BOX)
        scale = size / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        a = np.asarray(im)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top:top + size, left:left + size]
