"""Model references, the one way every command names a model.

    builtin:digits                     the embedded default, shipped inside the package
    official:d16|d20|d24|d30           FoundationVision release files, given --var-ckpt and --vae-ckpt
    random:d16|d20|d24|d30|digits      random weights of those shapes (latency work, tests)
    PATH                               an EVAR model directory (config.json + *.safetensors)
"""
from __future__ import annotations

from pathlib import Path

import torch

from evar.checkpoints import Model, build_model, is_model_dir, load_model_dir, load_official
from evar.config import OFFICIAL_DEPTHS, ModelConfig, digits_config, official_config
from evar.errors import ModelRefError

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN = {"digits": ASSETS / "digits"}
REF_FORMS = "builtin:digits, official:d16|d20|d24|d30 (with --var-ckpt/--vae-ckpt), random:d16|…|digits, or a model directory"


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
    if sep and kind == "builtin":
        if name not in BUILTIN:
            raise ModelRefError(f"no built-in model '{name}'; built-in models: {', '.join(BUILTIN)}")
        return load_model_dir(BUILTIN[name], attn_impl)
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
        if not is_model_dir(ref):
            raise ModelRefError(f"'{ref}' is not an EVAR model directory (no config.json)")
        return load_model_dir(ref, attn_impl)
    raise ModelRefError(f"unknown model reference '{ref}': use {REF_FORMS}")
