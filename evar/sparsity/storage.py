"""Masks in a model directory: `config.json` records the pattern and the masked layers (its `sparsity`
section), `masks.safetensors` holds each layer's mask bit-packed (one bit per weight, 1 = kept, eight to a
byte, least significant bit first), beside `var.safetensors`, whose weights are already zero where masked.

Loading re-checks both: every mask follows the recorded pattern and every masked weight is zero, so a
directory whose weights were changed behind EVAR's back (or trained densely) is refused by name rather
than run as if it were sparse. A loader that knows nothing of masks still gets the zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from evar.errors import CheckpointError
from evar.files import read_json
from evar.sparsity.patterns import Pattern

MASK_FILE = "masks.safetensors"
SECTION = "sparsity"  # the config.json section


@dataclass
class Sparsity:
    """What was masked, how, and the masks (True = kept), by module name inside the VAR."""

    pattern: Pattern
    method: str
    masks: dict[str, torch.Tensor]
    details: dict[str, Any] = field(default_factory=dict)  # recipe and timing, recorded as given

    def record(self) -> dict[str, Any]:
        """The config.json section: the pattern, per layer its shape and share of zeros."""
        layers = {name: {"shape": list(m.shape), "zeros": round(1.0 - float(m.float().mean()), 6)}
                  for name, m in self.masks.items()}
        return {"pattern": self.pattern.name, "sparsity": self.pattern.sparsity, "method": self.method,
                "mask_file": MASK_FILE, "layers": layers, **self.details}

    def apply(self, module: nn.Module) -> None:
        """Zero the masked weights of `module` (the VAR) in place."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                layer = module.get_submodule(name)
                layer.weight.mul_(mask.to(layer.weight.dtype))


def pack(mask: torch.Tensor) -> torch.Tensor:
    """bool (any shape) → uint8 (ceil(numel / 8),), bit j of byte i = element 8i + j."""
    bits = mask.flatten().to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)]).reshape(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = 1
    for s in shape:
        count *= s
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[:count].bool().reshape(shape)


def save(sparsity: Sparsity, directory: Path) -> dict[str, Any]:
    """Write masks.safetensors into `directory`; returns the config.json section."""
    save_file({name: pack(m) for name, m in sparsity.masks.items()}, str(directory / MASK_FILE),
              metadata={"format": "evar-masks", "bit_order": "little", "pattern": sparsity.pattern.name})
    return sparsity.record()


def load(directory: Path, module: nn.Module) -> Sparsity | None:
    """The masks a model directory records (None: a dense directory), checked against `module`'s weights."""
    section = read_json(directory / "config.json", "model config").get(SECTION)
    path = directory / MASK_FILE
    if section is None:
        if path.exists():
            raise CheckpointError(f"{path}: masks without a '{SECTION}' section in config.json; the directory was "
                                  "assembled by hand (remove the file, or re-create the model with evar sparsify)")
        return None
    try:
        pattern = Pattern.parse(section["pattern"], None if ":" in section["pattern"] else section["sparsity"])
        layers = section["layers"]
        method = str(section.get("method", ""))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / 'config.json'}: the '{SECTION}' section is incomplete ({err})") from None
    except Exception as err:  # noqa: BLE001 -- a pattern EvarError, re-raised as a checkpoint problem
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from None
    if not path.is_file():
        raise CheckpointError(f"model directory is missing {MASK_FILE} (config.json records a {pattern.name} "
                              f"sparse model): {directory}")
    try:
        packed = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    masks = {}
    for name, info in layers.items():
        if name not in packed:
            raise CheckpointError(f"{path}: missing the mask of '{name}'")
        masks[name] = _checked(name, packed[name], tuple(info["shape"]), pattern, module, path)
    extra = sorted(set(packed) - set(layers))
    if extra:
        raise CheckpointError(f"{path}: unexpected mask '{extra[0]}' (config.json does not list it)")
    details = {k: v for k, v in section.items() if k not in ("pattern", "sparsity", "method", "mask_file", "layers")}
    return Sparsity(pattern, method, masks, details)


def _checked(name: str, packed: torch.Tensor, shape: tuple[int, ...], pattern: Pattern, module: nn.Module,
             path: Path) -> torch.Tensor:
    from evar.sparsity.patterns import follows

    try:
        weight = module.get_submodule(name).weight
    except AttributeError:
        raise CheckpointError(f"{path}: mask '{name}' names no layer of the model") from None
    if tuple(weight.shape) != shape or packed.dtype != torch.uint8 or packed.numel() != -(-weight.numel() // 8):
        raise CheckpointError(f"{path}: mask '{name}' does not fit its layer's weight {tuple(weight.shape)}")
    mask = unpack(packed, shape)
    if not follows(mask, pattern):
        raise CheckpointError(f"{path}: mask '{name}' is not {pattern.name} (some group has another number of zeros)")
    if bool((weight.detach()[~mask] != 0).any()):
        raise CheckpointError(f"{path}: layer '{name}' has non-zero weights where its mask is 0; the weights were "
                              "changed after masking (re-run evar sparsify on the dense model)")
    return mask
