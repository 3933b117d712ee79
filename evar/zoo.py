"""Model references, the one way every command names a model.

    builtin:digits                     the embedded default, shipped inside the package
    builtin:dit-digits                 a small DiT trained on the same digits (a second family)
    builtin:vit-digits                 a small ViT classifier of the same digits (timm's layout)
    official:d16|d20|d24|d30           FoundationVision release files, given --var-ckpt and --vae-ckpt
    random:d16|d20|d24|d30|digits      random weights of those shapes (latency work, tests)
    PATH                               an EVAR model directory (config.json + *.safetensors)

A model directory's config.json names its family in `format`. `load` returns VAR generators (what most
commands take); `load_family` returns a model of any family a command accepts, each loaded by its own
module (FAMILIES), so a new family (ViT, DiT, few-step students) is one row here, not a new code path.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evar.checkpoints import Model, build_model, is_model_dir, load_model_dir, load_official
from evar.config import OFFICIAL_DEPTHS, ModelConfig, digits_config, official_config
from evar.errors import ModelRefError

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN = {
    "digits": ASSETS / "digits",
    "digits-dd": ASSETS / "digits-dd",  # a DD student of digits
    "dit-digits": ASSETS / "dit-digits",  # a DiT trained on the same digits
    "vit-digits": ASSETS / "vit-digits",  # a ViT classifier of the same digits (timm's layout)
}
VAR_FORMAT = "evar-model"


@dataclass(frozen=True)
class Family:
    kind: str  # what commands ask for: "var", …
    what: str  # for messages: "a VAR generator (VAR + VQVAE)"
    loader: str  # "module:function" taking the model directory; imported on first use


FAMILIES = {
    VAR_FORMAT: Family("var", "a VAR generator (VAR + VQVAE)", "evar.checkpoints:load_model_dir"),
    "evar-dd-model": Family("dd", "a Distilled Decoding student (evar dd train)", "evar.dd.model:load_dd_dir"),
    "evar-dit": Family("dit", "a diffusion transformer (DiT)", "evar.dit.checkpoint:load_dit_dir"),
    "evar-vit": Family("vit", "a ViT classifier", "evar.vit.checkpoint:load_vit_dir"),
}
REF_FORMS = ("builtin:digits|digits-dd|dit-digits|vit-digits, official:d16|d20|d24|d30 (with --var-ckpt/--vae-ckpt), "
             "random:d16|…|digits, or a model directory")


def _depth(name: str, ref: str) -> int:
    if name.startswith("d") and name[1:].isdigit() and int(name[1:]) in OFFICIAL_DEPTHS:
        return int(name[1:])
    raise ModelRefError(f"unknown model '{ref}': expected one of d{', d'.join(map(str, OFFICIAL_DEPTHS))} after the prefix")


def config_for(ref: str) -> ModelConfig:
    """The architecture a built-in, official or random reference names (without loading weights)."""
    kind, _, name = ref.partition(":")
    if kind == "random" and name == "digits":
        return digits_config()
    if kind in ("official", "random"):
        return official_config(_depth(name, ref))
    raise ModelRefError(f"'{ref}' names no built-in architecture; use {REF_FORMS}")


def load(ref: str, var_ckpt: str | Path | None = None, vae_ckpt: str | Path | None = None,
         seed: int = 0, attn_impl: str = "sdpa") -> Model:
    """Resolve a model reference to a loaded model in eval mode."""
    kind, sep, name = ref.partition(":")
    if (var_ckpt is not None or vae_ckpt is not None) and kind != "official":
        raise ModelRefError(f"--var-ckpt/--vae-ckpt go with --model official:dNN (the release files); "
                            f"'{ref}' carries its own weights")
    if sep and kind == "builtin":
        return load_model_dir(_var_dir(builtin_dir(name), ref), attn_impl)
    if sep and kind == "official":
        if var_ckpt is None or vae_ckpt is None:
            raise ModelRefError(f"'{ref}' needs the release files: pass --var-ckpt var_{name}.pth --vae-ckpt vae_ch160v4096z32.pth")
        return load_official(config_for(ref), var_ckpt, vae_ckpt)
    if sep and kind == "random":
        config = config_for(ref)
        torch.manual_seed(seed)
        model = build_model(ModelConfig(config.var, config.vqvae, {"source": ref, "seed": seed}), attn_impl)
        return model.eval()
    if Path(ref).exists():
        return load_model_dir(_var_dir(_model_dir(ref), ref), attn_impl)
    raise ModelRefError(f"unknown model reference '{ref}': use {REF_FORMS}")


def builtin_dir(name: str) -> Path:
    if name not in BUILTIN:
        raise ModelRefError(f"no built-in model '{name}'; built-in models: {', '.join(BUILTIN)}")
    return BUILTIN[name]


def _model_dir(ref: str) -> Path:
    if not is_model_dir(ref):
        raise ModelRefError(f"'{ref}' is not an EVAR model directory (no config.json)")
    return Path(ref)


def family_of(model_dir: Path) -> Family | None:
    """The family a model directory's config.json names (None: unreadable or unknown; its loader says why)."""
    try:
        fmt = json.loads((model_dir / "config.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return FAMILIES.get(fmt)


def _var_dir(model_dir: Path, ref: str) -> Path:
    family = family_of(model_dir)
    if family is not None and family.kind != "var":
        raise ModelRefError(f"'{ref}' is {family.what}; this command needs a VAR generator")
    return model_dir


def kind_of(ref: str) -> str:
    """The family kind a reference names, without loading weights ("var" for official:/random: and unknowns)."""
    kind, sep, name = ref.partition(":")
    model_dir = BUILTIN.get(name) if sep and kind == "builtin" else Path(ref) if not sep else None
    family = family_of(model_dir) if model_dir is not None and model_dir.is_dir() else None
    return family.kind if family is not None else "var"


def load_family(ref: str, kinds: tuple[str, ...], **var_kwargs: Any) -> Any:
    """A model of any family in `kinds`; official:/random: references and VAR directories go through `load`."""
    kind, sep, name = ref.partition(":")
    model_dir = builtin_dir(name) if sep and kind == "builtin" else None
    if not sep and Path(ref).exists():
        model_dir = _model_dir(ref)
    family = family_of(model_dir) if model_dir is not None else None
    if family is not None and family.kind not in kinds:
        wanted = " or ".join(f.what for f in FAMILIES.values() if f.kind in kinds) or ", ".join(kinds)
        raise ModelRefError(f"'{ref}' is {family.what}; this command needs {wanted}")
    if family is None or family.kind == "var":
        return load(ref, **var_kwargs)
    module, _, function = family.loader.partition(":")
    return getattr(importlib.import_module(module), function)(model_dir)
