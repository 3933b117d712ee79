"""DiT model directories (`config.json` with format "evar-dit" + `dit.safetensors`) and the official
facebookresearch/DiT release files (`DiT-XL-2-256x256.pt`: a flat state dict, read with weights_only=True)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evar.checkpoints import CONFIG_FILE, load_strict, read_safetensors, read_torch_state
from evar.config import ConfigError, _build
from evar.dit.model import DiT, DiTConfig
from evar.errors import CheckpointError, EvarError
from evar.files import atomic_dir, atomic_write_json, read_versioned_json
from evar.sparsity import storage as sparse_masks

DIT_FORMAT, DIT_FORMAT_VERSION, DIT_FILE = "evar-dit", 1, "dit.safetensors"
# The paper's sizes (depth, hidden, heads); patch 2, 4 or 8 on SD-VAE latents (4 channels, image/8 side).
OFFICIAL_DIT = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


@dataclass
class DiTModel:
    """A loaded DiT and what describes it (the counterpart of `evar.checkpoints.Model` for VAR)."""

    config: DiTConfig
    dit: DiT
    provenance: dict[str, Any] = field(default_factory=dict)
    sparsity: Any = None  # evar.sparsity.storage.Sparsity of a masked DiT (evar sparsify), else None

    def eval(self) -> DiTModel:
        self.dit.eval()
        return self

    @property
    def pixel_space(self) -> bool:
        """Images come straight out (EVAR's DiTs); official DiTs denoise SD-VAE latents, which EVAR cannot decode."""
        return not self.provenance.get("latent", False)


def build_dit(config: DiTConfig) -> DiT:
    with torch.device("meta"):
        dit = DiT(config)
    dit.to_empty(device="cpu")
    return dit


def config_to_dict(config: DiTConfig, provenance: dict[str, Any]) -> dict[str, Any]:
    return {"format": DIT_FORMAT, "format_version": DIT_FORMAT_VERSION, "dit": dataclasses.asdict(config),
            "provenance": provenance}


def read_dit_config(model_dir: Path) -> tuple[DiTConfig, dict[str, Any]]:
    data = read_versioned_json(model_dir / CONFIG_FILE, DIT_FORMAT, DIT_FORMAT_VERSION, "DiT config", CheckpointError)
    try:
        config = _build(DiTConfig, data["dit"])
        config.validate()
    except KeyError:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: no 'dit' section") from None
    except ConfigError as err:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: {err}") from None
    return config, dict(data.get("provenance", {}))


def load_dit_dir(model_dir: str | Path) -> DiTModel:
    model_dir = Path(model_dir)
    config, provenance = read_dit_config(model_dir)
    dit = build_dit(config)
    load_strict(dit, read_safetensors(model_dir / DIT_FILE), str(model_dir / DIT_FILE))
    return DiTModel(config, dit, provenance, sparse_masks.load(model_dir, dit)).eval()


def save_dit_dir(model: DiTModel, out: str | Path) -> Path:
    with atomic_dir(out) as tmp:
        extra = {}
        if model.sparsity is not None:  # masks re-applied and stored beside the weights (evar sparsify)
            model.sparsity.apply(model.dit)
            extra[sparse_masks.SECTION] = sparse_masks.save(model.sparsity, tmp)
        save_file({k: v.contiguous() for k, v in model.dit.state_dict().items()}, str(tmp / DIT_FILE))
        atomic_write_json(tmp / CONFIG_FILE, {**config_to_dict(model.config, model.provenance), **extra})
    return Path(out)


def official_dit_config(arch: str, image_size: int = 256, num_classes: int = 1000) -> DiTConfig:
    """'XL/2', 'B/4', …: the paper's shape on SD-VAE latents (4 channels, learned variance)."""
    size, _, patch = arch.partition("/")
    if size not in OFFICIAL_DIT or patch not in ("2", "4", "8"):
        raise EvarError(f"unknown DiT architecture '{arch}': use one of "
                        + ", ".join(f"{s}/{p}" for s in OFFICIAL_DIT for p in (2, 4, 8)))
    if image_size % 8:
        raise EvarError(f"--image-size must be a multiple of 8 (the SD-VAE's downsampling), got {image_size}")
    depth, hidden, heads = OFFICIAL_DIT[size]
    return DiTConfig.uniform(depth, hidden, heads, input_size=image_size // 8, patch_size=int(patch), in_channels=4,
                             num_classes=num_classes, learn_sigma=True)


def load_official_dit(ckpt: str | Path, config: DiTConfig) -> DiTModel:
    """A release file checked key by key and shape by shape (an EMA wrapper, {'ema': …}, is unwrapped)."""
    state = read_torch_state(ckpt)
    dit = build_dit(config)
    load_strict(dit, state, str(ckpt))
    return DiTModel(config, dit, {"source": "facebookresearch/DiT", "checkpoint": Path(ckpt).name, "latent": True}).eval()
