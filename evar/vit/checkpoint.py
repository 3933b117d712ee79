"""ViT model directories (`config.json` with format "evar-vit" + `vit.safetensors`, optionally
`masks.safetensors` of `evar sparsify`) and timm checkpoints in safetensors (`evar convert-vit`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evar.checkpoints import CONFIG_FILE, load_strict, read_safetensors
from evar.config import ConfigError, _build
from evar.errors import CheckpointError, EvarError
from evar.files import atomic_dir, atomic_write_json, read_versioned_json
from evar.sparsity import storage as sparse_masks
from evar.vit.model import ViTConfig, VisionTransformer

VIT_FORMAT, VIT_FORMAT_VERSION, VIT_FILE = "evar-vit", 1, "vit.safetensors"
# timm's names → (patch, width, depth, heads) at 224 px, 1000 classes, MLP 4× (the checkpoints users hold)
TIMM_ARCHS = {
    "vit_tiny_patch16_224": (16, 192, 12, 3), "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_small_patch32_224": (32, 384, 12, 6), "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_base_patch32_224": (32, 768, 12, 12), "vit_large_patch16_224": (16, 1024, 24, 16),
}


@dataclass
class ViTModel:
    """A loaded ViT classifier and what describes it (`sparsity`: masks of `evar sparsify`, else None)."""

    config: ViTConfig
    vit: VisionTransformer
    provenance: dict[str, Any] = field(default_factory=dict)
    sparsity: Any = None

    def eval(self) -> ViTModel:
        self.vit.eval()
        return self


def build_vit(config: ViTConfig) -> VisionTransformer:
    with torch.device("meta"):
        vit = VisionTransformer(config)
    return vit.to_empty(device="cpu")


def read_vit_config(model_dir: Path) -> tuple[ViTConfig, dict[str, Any]]:
    data = read_versioned_json(model_dir / CONFIG_FILE, VIT_FORMAT, VIT_FORMAT_VERSION, "ViT config", CheckpointError)
    try:
        config = _build(ViTConfig, data["vit"])
        config.validate()
    except KeyError:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: no 'vit' section") from None
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: {err}") from None
    return config, dict(data.get("provenance", {}))


def load_vit_dir(model_dir: str | Path) -> ViTModel:
    model_dir = Path(model_dir)
    config, provenance = read_vit_config(model_dir)
    vit = build_vit(config)
    load_strict(vit, read_safetensors(model_dir / VIT_FILE), str(model_dir / VIT_FILE))
    return ViTModel(config, vit, provenance, sparse_masks.load(model_dir, vit)).eval()


def save_vit_dir(model: ViTModel, out: str | Path) -> Path:
    """Write atomically; a sparse model's masks are re-applied and stored beside the weights."""
    with atomic_dir(out) as tmp:
        extra = {}
        if model.sparsity is not None:
            model.sparsity.apply(model.vit)
            extra[sparse_masks.SECTION] = sparse_masks.save(model.sparsity, tmp)
        save_file({k: v.detach().contiguous() for k, v in model.vit.state_dict().items()}, str(tmp / VIT_FILE))
        atomic_write_json(tmp / CONFIG_FILE, {"format": VIT_FORMAT, "format_version": VIT_FORMAT_VERSION,
                                              "vit": dataclasses.asdict(model.config), "provenance": model.provenance,
                                              **extra})
    return Path(out)


def timm_config(arch: str, img_size: int | None = None, num_classes: int | None = None) -> ViTConfig:
    """A timm architecture name ('vit_base_patch16_224', …) with optional input size and class count."""
    if arch not in TIMM_ARCHS:
        raise EvarError(f"unknown ViT architecture '{arch}': use one of {', '.join(TIMM_ARCHS)}")
    patch, width, depth, heads = TIMM_ARCHS[arch]
    config = ViTConfig(img_size=img_size or 224, patch_size=patch, in_chans=3, num_classes=num_classes or 1000,
                       embed_dim=width, depth=depth, num_heads=heads, mlp_dim=4 * width)
    try:
        config.validate()
    except ConfigError as err:
        raise EvarError(f"--img-size: {err}") from None
    return config


def load_timm(ckpt: str | Path, config: ViTConfig) -> ViTModel:
    """A timm `VisionTransformer` state dict in safetensors, checked key by key and shape by shape."""
    ckpt = Path(ckpt)
    if ckpt.suffix != ".safetensors":
        raise EvarError(f"{ckpt}: expected a .safetensors file (timm's `model.safetensors`, or save_file of "
                        "model.state_dict())")
    vit = build_vit(config)
    load_strict(vit, read_safetensors(ckpt), str(ckpt))
    return ViTModel(config, vit, {"source": "timm checkpoint", "checkpoint": ckpt.name}).eval()
