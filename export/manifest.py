"""manifest.json: build, write (validated against manifest.schema.json) and read back."""
from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from evar.errors import EvarError
from evar.files import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FORMAT, FORMAT_VERSION = "evar-artifact", 1
SCHEMA_PATH = Path(__file__).resolve().with_name("manifest.schema.json")


class ManifestError(EvarError):
    """A manifest that does not follow the schema, or an artifact whose files do not match it."""


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate(manifest: dict[str, Any]) -> None:
    """Raise ManifestError naming every schema violation (path: message)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        shown = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:160]}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ManifestError(f"manifest does not follow {SCHEMA_PATH.name}: {shown}{more}")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("evar", "torch", "onnx", "onnxruntime", "onnxsim", "coremltools", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(model_ref: str, model_provenance: dict[str, Any], command: str | None) -> dict[str, Any]:
    return {"model_ref": model_ref, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "tool_versions": tool_versions(), "model_provenance": model_provenance}


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under root except the manifest itself (inside .mlpackage directories too), sorted."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        entries.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def write(root: Path, manifest: dict[str, Any]) -> Path:
    # through JSON first, so tuples become lists exactly as a reader will see them
    manifest = json.loads(json.dumps({**manifest, "files": file_entries(root)}))
    validate(manifest)
    atomic_write_json(root / MANIFEST, manifest)
    return root / MANIFEST


def read(root: str | Path, verify_files: bool = False) -> dict[str, Any]:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} is not an EVAR artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an EVAR artifact manifest (format must be '{FORMAT}')")
    if isinstance(manifest.get("format_version"), int) and manifest["format_version"] > FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {manifest['format_version']}; this EVAR reads {FORMAT_VERSION}")
    validate(manifest)
    if verify_files:
        check_files(root, manifest)
    return manifest


def check_files(root: Path, manifest: dict[str, Any]) -> None:
    problems = []
    for f in manifest["files"]:
        p = root / f["path"]
        if not p.is_file():
            problems.append(f"missing {f['path']}")
        elif p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            problems.append(f"{f['path']} differs from its recorded size/sha256")
    if problems:
        raise ManifestError(f"{root}: " + "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
