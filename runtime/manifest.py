"""Reading an exported artifact: manifest.json (validated against export/manifest.schema.json) + its files.

The manifest is the only thing the runtime trusts about a graph: names, roles, shapes per scale, the KV
layout, what sampling bakes in, and every file with its size and hash. Errors name the artifact, the
field or file, and what to do; a manifest from a newer EVAR is refused before the schema is consulted,
so its message says "upgrade", not "field X is unknown".
No torch here (the runtime runs without it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evar.files import sha256_file
from export.manifest import FORMAT, FORMAT_VERSION, MANIFEST, ManifestError, validate

STEP, DECODER = "decoder_step", "vqvae_decoder"
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}

__all__ = ["Artifact", "ManifestError", "load_artifact", "NP_DTYPES", "STEP", "DECODER"]


@dataclass(frozen=True)
class Artifact:
    """A validated artifact directory. `data` is manifest.json as read; the properties name what runtimes use."""

    root: Path
    data: dict[str, Any]

    # ---- what the artifact is
    @property
    def name(self) -> str:
        return self.root.name

    @property
    def format(self) -> str:
        """'onnx' or 'coreml': the format of every graph."""
        return self.data["graphs"][STEP]["format"]

    @property
    def model_ref(self) -> str:
        return self.data["provenance"]["model_ref"]

    @property
    def var(self) -> dict[str, Any]:
        return self.data["model"]["var"]

    @property
    def patch_nums(self) -> list[int]:
        return list(self.data["patch_nums"])

    @property
    def num_scales(self) -> int:
        return len(self.data["patch_nums"])

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    @property
    def num_classes(self) -> int:
        return int(self.var["num_classes"])

    @property
    def static_batch(self) -> int | None:
        """The batch every function takes (Core ML), or None when any batch works (ONNX)."""
        batch = self.data.get("batch") or {"mode": "dynamic"}
        return int(batch["size"]) if batch["mode"] == "static" else None

    @property
    def kv_mode(self) -> str:
        return self.data["kv_cache"]["mode"]

    # ---- sampling: what is baked into the graphs, what is an input
    @property
    def top_k(self) -> int:
        return int(self.data["sampling"]["top_k"])

    @property
    def top_p(self) -> float:
        return float(self.data["sampling"]["top_p"])

    @property
    def cfg_default(self) -> float:
        return float(self.data["sampling"]["cfg"].get("default", 1.5))

    @property
    def precision(self) -> str:
        return self.data["precision"]["compute"]

    @property
    def weights(self) -> str:
        return self.data["precision"]["weights"]

    @property
    def compression(self) -> str:
        return self.data["compression"]["method"]

    # ---- graphs
    def graph(self, role: str) -> dict[str, Any]:
        return self.data["graphs"][role]

    def graph_path(self, role: str) -> Path:
        return self.root / self.graph(role)["file"]

    def function(self, role: str, si: int | None = None) -> dict[str, Any]:
        """The function entry of scale si (decoder step) or the only one (VQVAE decoder)."""
        functions = self.graph(role)["functions"]
        if si is None:
            return functions[0]
        return next(f for f in functions if f.get("scale_index") == si)

    def past_of_present(self) -> dict[str, str]:
        """present output name → the past input name it feeds at the next scale (KV as inputs/outputs)."""
        out = {}
        for layer in self.data["kv_cache"]["layers"]:
            for kind in ("key", "value"):
                present, past = layer.get(f"present_{kind}"), layer.get(f"past_{kind}")
                if present and past:
                    out[present] = past
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an EVAR artifact manifest (format must be '{FORMAT}')")
    return data


def _check_version(path: Path, data: dict[str, Any]) -> None:
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ManifestError(f"{path} was written by a newer EVAR (format_version {version}); this runtime reads "
                            f"format_version {FORMAT_VERSION}: upgrade EVAR, or re-export the model with this version")


def _check_structure(path: Path, data: dict[str, Any]) -> None:
    """What the schema cannot say: one step function per scale, one KV entry per layer, graph formats agree."""
    problems = []
    formats = {g["format"] for g in data["graphs"].values()}
    if len(formats) != 1 or (data.get("backend") and data["backend"] not in formats):
        problems.append(f"graphs mix formats {sorted(formats)} (backend {data.get('backend')})")
    scales = [f.get("scale_index") for f in data["graphs"][STEP]["functions"]]
    if sorted(s for s in scales if s is not None) != list(range(len(data["patch_nums"]))):
        problems.append(f"decoder_step functions cover scales {scales}, patch_nums has {len(data['patch_nums'])} scales")
    if len(data["kv_cache"]["layers"]) != data["model"]["var"]["depth"]:
        problems.append(f"kv_cache has {len(data['kv_cache']['layers'])} layers, the model {data['model']['var']['depth']}")
    if data["patch_nums"] != data["model"]["var"]["patch_nums"]:
        problems.append("patch_nums differ from model.var.patch_nums")
    if problems:
        raise ManifestError(f"{path} is inconsistent: " + "; ".join(problems))


def _check_files(root: Path, data: dict[str, Any], verify_hashes: bool) -> None:
    """Every listed file present with its recorded size (and sha256 on request); every graph file listed."""
    listed = {f["path"] for f in data["files"]}
    problems = []
    for role, graph in data["graphs"].items():
        for rel in filter(None, (graph["file"], graph.get("external_data"))):
            inside = rel in listed or any(p.startswith(rel.rstrip("/") + "/") for p in listed)
            if not inside:
                problems.append(f"{rel} ({role}) is not in the manifest's file list")
    for f in data["files"]:
        p = root / f["path"]
        if not p.is_file():
            problems.append(f"missing {f['path']}")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{f['path']} has {p.stat().st_size} bytes, the manifest records {f['bytes']}")
        elif verify_hashes and sha256_file(p) != f["sha256"]:
            problems.append(f"{f['path']} differs from its recorded sha256")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ManifestError(f"artifact {root} does not match its manifest: {'; '.join(problems[:4])}{more}; "
                            "copy the whole folder again or re-export it")


def load_artifact(root: str | Path, verify_hashes: bool = False) -> Artifact:
    """Read and check an artifact directory. Sizes are always checked; sha256 only with `verify_hashes`
    (hashing a d16 graph reads 1.2 GB)."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"no artifact directory at {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} is not an EVAR artifact (no {MANIFEST}); create one with `evar-export onnx|coreml`")
    data = _read_json(path)
    _check_version(path, data)
    validate(data)
    _check_structure(path, data)
    _check_files(root, data, verify_hashes)
    return Artifact(root, data)
