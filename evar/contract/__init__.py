"""The artifact contract: what an exported EVAR model is, for everyone who writes or reads one.

An artifact is a folder: `manifest.json` (schema: `manifest.schema.json` beside this file; the Swift app
decodes the same fields) plus the graph files it lists with their sizes and sha256. The exporter writes it
(`write`), the runtime and the parity checks read it (`load_artifact` → `Artifact`), and both build a step's
inputs from the roles the manifest gives them (`step_feeds`). torch-free: the runtime imports this without
PyTorch; nothing here imports the exporter or the runtime.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evar.errors import EvarError
from evar.files import atomic_write_json, read_versioned_json, sha256_file

MANIFEST = "manifest.json"
FORMAT, FORMAT_VERSION = "evar-artifact", 3
# Version 2 = a manifest that older readers cannot drive: its graphs leave sampling to the host
# (sampling.where "host": raw logits out, no uniforms input). Version 3 = a manifest whose recipe an older
# reader would silently change: family "dd" (Distilled Decoding passes, no decoder_step), or a scale split /
# token pruning (generation.split_scale / token_keep: an older reader would run the plain step graph at every
# scale). Everything else is written as version 1, so an older EVAR keeps reading it; this EVAR reads all three.
HOST_SAMPLING_VERSION, FEW_STEP_VERSION, GENERATION_VERSION = 2, 3, 3
SCHEMA_PATH = Path(__file__).resolve().with_name("manifest.schema.json")

# graph roles (the keys of manifest["graphs"])
STEP_GRAPH, DECODER_GRAPH = "decoder_step", "vqvae_decoder"
FHAT_GRAPH = "fhat_update"  # host-sampled artifacts: (f_hat, idx) → next f_hat, one function per scale, CPU
UNGUIDED_STEP_GRAPH = "decoder_step_unguided"  # CFG trimming: the conditional rows only (manifest "generation")
EARLY_STEP_GRAPH = "decoder_step_early"  # scale split: the early model's step, scales < split_scale
PREFILL_GRAPH = "prefill"  # scale split: the compressed model's KV cache from the early tokens, one pass
PRUNED_STEP_GRAPH = "decoder_step_pruned"  # token pruning: scales from generation.cache_scale on
PRUNED_UNGUIDED_STEP_GRAPH = "decoder_step_pruned_unguided"  # token pruning + CFG trimming: pruned scales >= both
# tensor roles of a step's inputs/outputs whose values cross from one scale to the next by name
PAST_ROLES, PRESENT_ROLES = ("past_key", "past_value"), ("present_key", "present_value")
# numpy dtypes of the manifest's dtype names
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class ManifestError(EvarError):
    """A manifest that does not follow the schema, or an artifact whose files do not match it."""


# ---------------------------------------------------------------- the schema
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(manifest: dict[str, Any]) -> None:
    """Raise ManifestError naming every schema violation (path: message), then what the schema cannot say."""
    import jsonschema

    root = schema()
    if manifest.get("family") == "dd":  # its own node: the root (and EVARKit's Manifest) stay VAR's, unchanged
        root = {k: root[k] for k in ("$schema", "$id", "$defs")} | {"$ref": "#/$defs/dd_manifest"}
    validator = jsonschema.Draft202012Validator(root)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        shown = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:160]}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ManifestError(f"manifest does not follow {SCHEMA_PATH.name}: {shown}{more}")
    _check_structure(manifest)


def _check_structure(data: dict[str, Any]) -> None:
    """One step function per scale, one KV entry per layer, one graph format, patch_nums that agree."""
    problems = []
    formats = {g["format"] for g in data["graphs"].values()}
    if len(formats) != 1 or (data.get("backend") and data["backend"] not in formats):
        problems.append(f"graphs mix formats {sorted(formats)} (backend {data.get('backend')})")
    if data["patch_nums"] != data["model"]["var"]["patch_nums"]:
        problems.append("patch_nums differ from model.var.patch_nums")
    if data.get("family") == "dd":
        problems += _few_step_problems(data)
    else:
        problems += _step_problems(data)
    if problems:
        raise ManifestError("manifest is inconsistent: " + "; ".join(problems))


def _few_step_problems(data: dict[str, Any]) -> list[str]:
    """Every pass names a graph; its t is a scale; the default t-list starts at 0 and uses the passes' t."""
    passes, problems = data["few_step"]["passes"], []
    ts = [p["t"] for p in passes]
    for p in passes:
        if p["graph"] not in data["graphs"]:
            problems.append(f"few_step pass t={p['t']} names graph '{p['graph']}', which is not in graphs")
    if ts != sorted(set(ts)) or ts[0] != 0 or ts[-1] >= len(data["patch_nums"]):
        problems.append(f"few_step passes have t {ts}: they must increase from 0 and stay below the scale count")
    default = data["few_step"]["default_t_list"]
    if default[0] != 0 or any(t not in ts for t in default) or default != sorted(set(default)):
        problems.append(f"few_step default_t_list {default} is not an increasing list from 0 of the passes' t {ts}")
    return problems


def _step_problems(data: dict[str, Any]) -> list[str]:
    problems = []
    scales = [f.get("scale_index") for f in data["graphs"][STEP_GRAPH]["functions"]]
    if sorted(s for s in scales if s is not None) != list(range(len(data["patch_nums"]))):
        problems.append(f"decoder_step functions cover scales {scales}, patch_nums has {len(data['patch_nums'])} scales")
    if len(data["kv_cache"]["layers"]) != data["model"]["var"]["depth"]:
        problems.append(f"kv_cache has {len(data['kv_cache']['layers'])} layers, the model {data['model']['var']['depth']}")
    return problems


# ---------------------------------------------------------------- writing
def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under root except the manifest itself and hidden files (inside .mlpackage folders too), sorted."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if rel.as_posix() == MANIFEST or any(part.startswith(".") for part in rel.parts):
            continue
        entries.append({"path": rel.as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def write(root: Path, manifest: dict[str, Any]) -> Path:
    """List and hash the files under `root`, validate, write `root/manifest.json` atomically."""
    # through JSON first, so tuples become lists exactly as a reader will see them
    version = FEW_STEP_VERSION if manifest.get("family") == "dd" else \
        HOST_SAMPLING_VERSION if manifest.get("sampling", {}).get("where") == "host" else 1
    generation = manifest.get("generation") or {}
    # any generation mode (CFG trimming too): a reader that ignores `generation` would run another recipe silently
    if generation.get("split_scale") is not None or generation.get("token_keep") or \
            generation.get("cfg_until_scale") is not None:
        version = GENERATION_VERSION
    manifest = json.loads(json.dumps({"format": FORMAT, "format_version": version, **manifest,
                                      "files": file_entries(root)}))
    validate(manifest)
    atomic_write_json(root / MANIFEST, manifest)
    return root / MANIFEST


# ---------------------------------------------------------------- reading
@dataclass(frozen=True)
class Artifact:
    """A validated artifact folder. `data` is manifest.json as read; the properties name what runtimes use."""

    root: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def format(self) -> str:
        """'onnx' or 'coreml': the format of every graph."""
        return self.data["graphs"][DECODER_GRAPH]["format"]

    @property
    def family(self) -> str:
        """'var' (scale by scale, decoder_step) or 'dd' (Distilled Decoding passes, `few_step`)."""
        return self.data.get("family", "var")

    def few_step_graphs(self, t_list: list[int]) -> list[str]:
        """The graph roles of a t-list's passes; EvarError naming the t values this artifact has otherwise."""
        passes = {p["t"]: p["graph"] for p in self.data["few_step"]["passes"]}
        if not t_list or t_list[0] != 0 or list(t_list) != sorted(set(t_list)) or any(t not in passes for t in t_list):
            raise EvarError(f"artifact {self.name} runs t-lists drawn from t = {','.join(map(str, passes))} that start "
                            f"at 0 and increase, got {','.join(map(str, t_list))}: re-export with --t-list to add passes")
        return [passes[t] for t in t_list]

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

    @property
    def top_k(self) -> int:
        return int(self.data["sampling"]["top_k"])

    @property
    def top_p(self) -> float:
        return float(self.data["sampling"]["top_p"])

    @property
    def sampling_where(self) -> str:
        """'graph': the step functions sample (idx out); 'host': they return raw logits and the runtime samples
        (`evar.contract.host_sampling`) and runs the `fhat_update` graph."""
        s = self.data["sampling"]
        return s.get("where", "graph" if s["in_graph"] else "host")

    @property
    def cfg_default(self) -> float:
        """The guidance scale a generation uses unless given (0 for a DD artifact: its student has no guidance)."""
        sampling = self.data.get("sampling")
        return float(sampling["cfg"].get("default", 1.5)) if sampling else 0.0

    @property
    def precision(self) -> str:
        return self.data["precision"]["compute"]

    @property
    def weights(self) -> str:
        return self.data["precision"]["weights"]

    @property
    def compression(self) -> str:
        return self.data["compression"]["method"]

    @property
    def cfg_until_scale(self) -> int | None:
        """CFG trimming: the first scale run without the unconditional rows (None: guidance at every scale)."""
        return (self.data.get("generation") or {}).get("cfg_until_scale")

    @property
    def split_scale(self) -> int | None:
        """Scale split: the first scale the compressed model runs (the early graph runs the scales before it)."""
        return (self.data.get("generation") or {}).get("split_scale")

    @property
    def early_model_ref(self) -> str | None:
        return ((self.data.get("generation") or {}).get("early_model") or {}).get("ref")

    @property
    def token_keep(self) -> dict[int, int]:
        """Token pruning: scale → static keep count (empty: every token runs the transformer)."""
        counts = (self.data.get("generation") or {}).get("token_keep_counts") or {}
        return {int(si): int(k) for si, k in counts.items()}

    @property
    def cache_scale(self) -> int | None:
        """Token pruning: the scale whose hidden map restores the pruned tokens (the pruned graph runs from it)."""
        return (self.data.get("generation") or {}).get("cache_scale")

    def kv_links(self, role: str) -> dict[str, str]:
        """present output name → past input name of one step graph, from its own tensors' roles and layers
        (the early graph of a scale split has its own model's layers)."""
        graph = self.graph(role)
        sig = graph.get("signature") or graph["functions"][-1]
        pasts = {(t["role"], t["layer"]): t["name"] for t in sig["inputs"] if t.get("role") in PAST_ROLES}
        return {t["name"]: pasts[(t["role"].replace("present", "past"), t["layer"])] for t in sig["outputs"]
                if t.get("role") in PRESENT_ROLES and (t["role"].replace("present", "past"), t["layer"]) in pasts}

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

    def empty_past(self, tensor: dict[str, Any], batch: int) -> np.ndarray:
        return empty_past(tensor, batch, self.data["kv_cache"]["layers"][tensor["layer"]]["heads"],
                          self.var["head_dim"])


def load_artifact(root: str | Path, verify_hashes: bool = False) -> Artifact:
    """Read and check an artifact folder. Sizes are always checked; sha256 only with `verify_hashes`
    (hashing a d16 graph reads 1.2 GB). A newer format_version is refused first, so the message says "upgrade"."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"no artifact directory at {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} is not an EVAR artifact (no {MANIFEST}); create one with `evar-export onnx|coreml`")
    data = read_versioned_json(path, FORMAT, FORMAT_VERSION, "artifact manifest", ManifestError)
    try:
        validate(data)
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from None
    check_files(root, data, verify_hashes)
    return Artifact(root, data)


def check_files(root: Path, data: dict[str, Any], verify_hashes: bool) -> None:
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


# ---------------------------------------------------------------- a step's inputs
def empty_past(tensor: dict[str, Any], batch: int, heads: int, head_dim: int) -> np.ndarray:
    """A cache input before anything is cached: (2B, heads of its layer, 0, head_dim) of its dtype."""
    return np.zeros((2 * batch, heads, 0, head_dim), NP_DTYPES[tensor["dtype"]])


def step_feeds(inputs: list[dict[str, Any]], values: dict[str, Any], past: dict[str, Any],
               empty_past: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The feeds of one step function from its manifest `inputs`: each role's value from `values` (numpy
    arrays cast to the declared dtype; runtime-owned buffers such as OrtValues passed through), each cache
    input from `past` by name, or `empty_past(tensor)` before the first scale wrote it."""
    feeds = {}
    for t in inputs:
        if t["role"] in PAST_ROLES:
            feeds[t["name"]] = past[t["name"]] if t["name"] in past else empty_past(t)
            continue
        value = values[t["role"]]
        if isinstance(value, (np.ndarray, np.generic, int, float)):
            value = np.ascontiguousarray(value, dtype=NP_DTYPES[t["dtype"]])
        feeds[t["name"]] = value
    return feeds
