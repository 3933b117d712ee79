"""Checkpoints in and out: official `.pth` files and EVAR model directories.

Official files load with `torch.load(weights_only=True)`; model directories are `config.json` +
`var.safetensors` + `vqvae.safetensors`. Both are checked key by key and shape by shape against the
modules the config builds, and the first problem is reported by name.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from evar.config import ConfigError, ModelConfig
from evar.errors import CheckpointError
from evar.files import atomic_dir, atomic_write_json, read_versioned_json
from evar.models.var import VAR
from evar.models.vqvae import VQVAE
from evar.sparsity import storage as sparse_masks

MODEL_FORMAT = "evar-model"
MODEL_FORMAT_VERSION = 1
CONFIG_FILE, VAR_FILE, VQVAE_FILE = "config.json", "var.safetensors", "vqvae.safetensors"
# The official loader tolerates a usage-statistics buffer of another shape; so do we (it is not used to sample).
OPTIONAL_SHAPE_KEYS = {"quantize.ema_vocab_hit_SV"}
# Wrappers seen around state dicts in training checkpoints, in order of preference; release files are flat.
WRAPPER_KEYS = ("ema", "state_dict", "model")  # "ema": DiT training checkpoints (the averaged weights)


@dataclass
class Model:
    """A loaded VAR + VQVAE pair and the config that describes both."""

    config: ModelConfig
    var: VAR
    vqvae: VQVAE
    sparsity: Any = None  # evar.sparsity.storage.Sparsity of a masked VAR (evar sparsify), else None

    def eval(self) -> Model:
        self.var.eval()
        self.vqvae.eval()
        return self


def build_model(config: ModelConfig, attn_impl: str = "sdpa") -> Model:
    config.validate()
    return Model(config, VAR(config.var, attn_impl=attn_impl), VQVAE(config.vqvae))


# ---------------------------------------------------------------- reading raw files
def read_torch_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a `.pth`, refusing anything that needs arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_torch_header(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names what it refused as "GLOBAL module.name" (the wording varies by version).
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found or "weights only" in str(err).lower():
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(f"{path} holds pickled Python objects{what}, not only tensors, and EVAR never "
                                  "unpickles code (it loads checkpoints with weights_only=True); save the weights "
                                  "alone (torch.save(model.state_dict())) or as safetensors") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt)") from None
    except Exception as err:  # noqa: BLE001 -- torch.load raises RuntimeError, KeyError, EOFError… on damaged files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt): {_first_line(err)}") from None
    return _unwrap_state(obj, path)


def _check_torch_header(path: Path) -> None:
    """torch.save writes a zip archive (or, before 1.6, a pickle): anything else is not a checkpoint at all."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        hint = " (it is empty)" if not head else ""
        raise CheckpointError(f"{path} is not a PyTorch checkpoint{hint}: expected the file torch.save writes")


def _unwrap_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} is not a state dict (expected a flat {{name: tensor}}, optionally under "
            f"{' or '.join(repr(k) for k in WRAPPER_KEYS)})"
        )
    return obj


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"model directory is missing {path.name}: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- strict loading
def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module`, naming the first missing, unexpected or mis-shaped key."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing key '{missing[0]}'" + _more(missing))
    if extra:
        raise CheckpointError(f"{source}: unexpected key '{extra[0]}'" + _more(extra))
    state = dict(state)
    params = {name for name, _ in module.named_parameters()}
    for name, ref in expected.items():
        got = state[name]
        if got.shape != ref.shape:
            if name in OPTIONAL_SHAPE_KEYS:
                state[name] = ref
                continue
            raise CheckpointError(
                f"{source}: key '{name}' has shape {tuple(got.shape)}, the model expects {tuple(ref.shape)}"
            )
        if got.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise CheckpointError(f"{source}: key '{name}' has dtype {got.dtype}, the model expects {ref.dtype}")
        # buffers may hold -inf on purpose (attention masks); weights never hold either
        broken = torch.isnan(got) if name not in params else ~torch.isfinite(got)
        if got.dtype.is_floating_point and bool(broken.any()):
            raise CheckpointError(f"{source}: key '{name}' holds NaN or infinite values; the checkpoint is damaged "
                                  "(or came from a diverged training run)")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def load_official(config: ModelConfig, var_ckpt: str | Path, vae_ckpt: str | Path) -> Model:
    """The FoundationVision release files (`var_dNN.pth`, `vae_ch160v4096z32.pth`)."""
    var_state = read_torch_state(var_ckpt)
    vae_state = read_torch_state(vae_ckpt)
    with torch.device("meta"):
        model = build_model(config)
    model.var.to_empty(device="cpu")
    model.vqvae.to_empty(device="cpu")
    load_strict(model.var, var_state, str(var_ckpt))
    load_strict(model.vqvae, vae_state, str(vae_ckpt))
    return model.eval()


# ---------------------------------------------------------------- model directories
def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"not an EVAR model directory (no {CONFIG_FILE}): {model_dir}")
    data = read_versioned_json(path, MODEL_FORMAT, MODEL_FORMAT_VERSION, "model config", CheckpointError)
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_saved_state(path: Path, recover: str) -> dict[str, Any]:
    """A progress or resume file EVAR wrote itself (`torch.save` of tensors and plain data). A torn or foreign
    file (a kill mid-write on a filesystem without atomic rename, a copy gone wrong) is one line with `recover`."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- torch.load raises many types on damaged files
        raise CheckpointError(f"cannot read {path} ({_first_line(err)}); {recover}") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a file EVAR wrote (expected a dict); {recover}")
    return saved


def load_model_dir(model_dir: str | Path, attn_impl: str = "sdpa") -> Model:
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    var_state = read_safetensors(model_dir / VAR_FILE)
    vae_state = read_safetensors(model_dir / VQVAE_FILE)
    with torch.device("meta"):
        model = build_model(config, attn_impl)
    model.var.to_empty(device="cpu")
    model.vqvae.to_empty(device="cpu")
    load_strict(model.var, var_state, str(model_dir / VAR_FILE))
    load_strict(model.vqvae, vae_state, str(model_dir / VQVAE_FILE))
    model.sparsity = sparse_masks.load(model_dir, model.var)
    return model.eval()


def save_model_dir(model: Model, out: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write config.json + weights atomically; `provenance` replaces the config's own if given."""
    config = model.config if provenance is None else ModelConfig(model.config.var, model.config.vqvae, provenance)
    config.validate()
    with atomic_dir(out) as tmp:
        extra = {}
        if model.sparsity is not None:  # masks re-applied: a sparse model stays sparse whatever trained it since
            model.sparsity.apply(model.var)
            extra[sparse_masks.SECTION] = sparse_masks.save(model.sparsity, tmp)
        save_file(_contiguous(model.var.state_dict()), str(tmp / VAR_FILE))
        save_file(_contiguous(model.vqvae.state_dict()), str(tmp / VQVAE_FILE))
        atomic_write_json(tmp / CONFIG_FILE, {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION,
                                             **config.to_dict(), **extra})
    return Path(out)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}
