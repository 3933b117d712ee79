"""The import arrows point one way, and the package installs what the folders hold.

    base (torch-free: errors, files, rng, outputs, cli_options, contract)
      ↑
    core (models, checkpoints, prune, distill, eval, …)      runtime (numpy + onnxruntime / Core ML)
      ↑                                                          ↑ (only its torch reference reaches core)
    export (torch → graphs)                                      │
      ↑                                                          │
    apps (evar, evar demo) ─────────────────────────────────────┘
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"evar": "evar", "export": "evar.export", "runtime": "evar.runtime"}
BASE = ("evar", "evar.errors", "evar.files", "evar.rng", "evar.outputs", "evar.cli_options", "evar.contract")
TORCH_REFERENCE = "evar.runtime.backends.torch_ref"  # runs the PyTorch model by design


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def evar_imports(path: Path) -> set[str]:
    """Every evar module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m == "evar" or m.startswith("evar.") or m.split(".")[0] in ("export", "runtime")}


def sources() -> dict[str, set[str]]:
    return {module_name(p): evar_imports(p) for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def layer(module: str) -> str:
    # evar.eval.imagenet is a command (`torchrun -m evar.eval.imagenet`) that evaluates artifacts with the runtime
    for name, prefixes in (("apps", ("evar.apps", "evar.eval.imagenet")), ("export", ("evar.export",)), ("runtime", ("evar.runtime",)),
                           ("base", BASE)):
        if any(module == p or (p != "evar" and module.startswith(p + ".")) for p in prefixes):
            return name
    return "core"


ALLOWED = {"base": {"base"}, "core": {"base", "core"}, "export": {"base", "core", "export"},
           "runtime": {"base", "runtime"}, "apps": {"base", "core", "export", "runtime", "apps"}}


def violations(modules: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imports in modules.items():
        for imported in imports:
            if imported.split(".")[0] in ("export", "runtime"):
                wrong.append(f"{module} imports '{imported}': the packages are evar.export / evar.runtime")
                continue
            allowed = ALLOWED[layer(module)] | ({"core"} if module == TORCH_REFERENCE else set())
            if layer(imported) not in allowed:
                wrong.append(f"{module} ({layer(module)}) imports {imported} ({layer(imported)})")
    return sorted(wrong)


def test_imports_point_down():
    assert not violations(sources()), "\n".join(violations(sources()))


def test_the_layer_rule_catches_wrong_arrows():
    wrong = {"evar.models.var": {"evar.export.graphs"}, "evar.runtime.generator": {"evar.export.onnx", "evar.zoo"},
             "evar.contract": {"evar.checkpoints"}, "evar.export.cli": {"evar.apps.demo"}, "evar.samples": {"runtime"}}
    assert len(violations(wrong)) == 6
    assert not violations({"evar.apps.cli": {"evar.export.cli", "evar.runtime.bench", "evar.zoo"},
                           TORCH_REFERENCE: {"evar.models.decoding", "evar.contract"}})


def test_pyproject_installs_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {module_name(p) for folder in FOLDERS for p in (ROOT / folder).rglob("__init__.py")}
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"


def test_tests_and_benchmarks_use_the_installed_names():
    """From the repository root the folders also import as bare `export` / `runtime`: a second, different copy."""
    bare = [f"{p.relative_to(ROOT)} imports {m}" for folder in ("tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")
            for m in evar_imports(p) if m.split(".")[0] in ("export", "runtime")]
    assert not bare, "\n".join(bare)
