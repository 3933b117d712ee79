"""The speed-ladder recipes on Core ML (`evar-export coreml --cfg-until-scale N`, `--early-model REF --split-scale N`):
packages hold the functions the manifest names, the manifest says what an ONNX artifact of the same recipe says,
the converted wrappers give `generate`'s tokens of the same recipe, the Core ML backend follows the manifest
(its predictions simulated on Linux by the wrappers that were converted), bad values are one clear line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from evar.checkpoints import save_model_dir
from evar.contract import EARLY_STEP_GRAPH, PREFILL_GRAPH, STEP_GRAPH, UNGUIDED_STEP_GRAPH, load_artifact
from evar.models.decoding import generate
from tests.conftest import few_scale_model

ct = pytest.importorskip("coremltools")

from evar.export import coreml as cm
from evar.export import coreml_ladder as cl
from evar.export import parity as pt
from evar.export.artifact import build_coreml
from evar.export.coreml import CoremlOptions, package_functions
from evar.export.graphs import ScaleStep, VQVAEDecoder
from evar.export.interface import StepInterface

TOP_K, TOP_P, B = 8, 0.9, 2
SPLIT, TRIM = 1, 2


def tiny3(seed: int = 0):
    """Three scales (a split at 1 and trimming at 2 both leave scales on each side), a one-level VQVAE."""
    return few_scale_model((1, 2, 3), seed)


def _models():
    """The compressed model and another transformer on the same tokenizer (as the dense one would be)."""
    late, early = tiny3(), tiny3(seed=1)
    early.vqvae.load_state_dict(late.vqvae.state_dict())
    return late, early


def _options(**kw) -> CoremlOptions:
    return CoremlOptions(batch=B, top_k=TOP_K, top_p=TOP_P, early_model="tests:early", **kw)


def _tokens(late, labels, cfg, early=None, n=None, trim=None):
    return generate(late.var, late.vqvae, torch.from_numpy(labels), guidance=cfg, top_k=TOP_K, top_p=TOP_P,
                    seed=pt.PARITY_SEED, early=None if early is None else early.var, split_scale=n,
                    cfg_until_scale=trim, decode=False).tokens


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The split + trimmed iOS18 export, its macOS prediction checks run on simulated Core ML (see FakeMLModel)."""
    late, early = _models()
    out = tmp_path_factory.mktemp("coreml-ladder") / "art"
    options = _options(split_scale=SPLIT, cfg_until_scale=TRIM)
    with pytest.MonkeyPatch.context() as mp:
        _simulate(mp, late, early, options)
        result = build_coreml(late, "tests:late", out, options, early=early)
    return out, result


def test_manifest_names_the_recipe_and_the_packages_hold_its_functions(artifact):
    out, result = artifact
    a = load_artifact(out, verify_hashes=True)
    assert a.data["format_version"] == 3 and a.split_scale == SPLIT and a.cfg_until_scale == TRIM
    g = a.data["generation"]
    assert (g["early_graph"], g["prefill_graph"], g["unguided_graph"]) == (EARLY_STEP_GRAPH, PREFILL_GRAPH,
                                                                           UNGUIDED_STEP_GRAPH)
    # iOS18: the compressed model's functions share decoder_step.mlpackage (and its state); the early model its own
    for role in (STEP_GRAPH, UNGUIDED_STEP_GRAPH, PREFILL_GRAPH):
        assert a.graph(role)["file"] == f"{STEP_GRAPH}.mlpackage"
    assert a.graph(EARLY_STEP_GRAPH)["file"] == f"{EARLY_STEP_GRAPH}.mlpackage"
    for file in {a.graph(r)["file"] for r in a.data["graphs"]}:
        named = {f["name"] for r, gr in a.data["graphs"].items() if gr["file"] == file for f in gr["functions"]}
        assert set(package_functions(out / file)) == named
    assert [f["scale_index"] for f in a.graph(EARLY_STEP_GRAPH)["functions"]] == list(range(SPLIT))
    assert [f["scale_index"] for f in a.graph(UNGUIDED_STEP_GRAPH)["functions"]] == list(range(TRIM, 3))
    checks = result["parity"].checks
    label = f"coreml split at {SPLIT}, cfg trimmed at {TRIM}"
    for what in ("wrappers vs generate", "prediction vs wrappers"):  # the second: macOS, simulated here
        recipe = [c for c in checks if c.name.startswith(f"{label}: {what}")]
        assert recipe and all(c.passed for c in recipe)
    assert any(c.name.endswith("package structure matches manifest") for c in checks)
    from evar.export.inspect import report

    text = report(out)
    assert all(f"[{role}] {STEP_GRAPH}.mlpackage" in text for role in (UNGUIDED_STEP_GRAPH, PREFILL_GRAPH))


def test_trimmed_functions_run_batch_b_not_2b(artifact):
    out, _ = artifact
    fns = package_functions(out / f"{STEP_GRAPH}.mlpackage")
    guided, unguided = fns[f"scale_{TRIM}"], fns[f"{cl.UNGUIDED_PREFIX}scale_{TRIM}"]
    shape = {t["name"]: t["shape"] for t in unguided["inputs"]}
    assert shape["labels"] == [B] and shape["uniforms"] == [B, 9] and "cfg" not in shape
    assert "cfg" in {t["name"] for t in guided["inputs"]}
    # one state for both: the unguided function reads and writes its rows [0, B) of the 2B-row cache
    assert [t["shape"] for t in unguided["states"]] == [t["shape"] for t in guided["states"]]
    assert unguided["states"][0]["shape"][0] == 2 * B
    # the converted unguided wrapper computes B rows: its transformer input has B rows, the guided one 2B
    late, _ = _models()
    seen = []
    hook = late.var.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    iface = StepInterface(late.config, "coreml", kv_mode="state", batch=B, guided=False)
    step = ScaleStep(late, TRIM, top_k=TOP_K, top_p=TOP_P, kv_mode="state", batch=B, guided=False)
    with torch.no_grad():
        step(*[torch.from_numpy(v) for v in iface.example_inputs(TRIM, B, seed=0).values()])
    hook.remove()
    assert seen == [B]


@pytest.mark.parametrize("target", ["iOS18", "iOS17"])
@pytest.mark.parametrize("split,trim", [(SPLIT, None), (None, TRIM), (SPLIT, TRIM), (2, TRIM)])
def test_split_with_one_model_is_the_unsplit_reference_through_the_converted_wrappers(target, split, trim):
    """The wrappers a split export converts (two copies of one model), driven through the recipe, give the tokens
    of plain `generate` without a split (no conversion here: the export runs the same wrappers, see above)."""
    late = tiny3()
    options = _options(target=target, split_scale=split, cfg_until_scale=trim)
    if split is None:
        options = CoremlOptions(target=target, batch=B, top_k=TOP_K, top_p=TOP_P, cfg_until_scale=trim)
    roles = cl.plan_roles(late, late, options)
    iface = StepInterface(late.config, "coreml", kv_mode=options.kv_mode, batch=B)
    steps = [ScaleStep(late, si, top_k=TOP_K, top_p=TOP_P, kv_mode=options.kv_mode, batch=B,
                       index_dtype=torch.int32).eval() for si in range(3)]
    report = pt.ParityReport()
    run = cl.recipe_parity(report, late, late, steps, iface, roles, options)
    assert report.passed
    labels = pt.parity_labels(B, 4)
    plain = _tokens(late, labels, pt.PARITY_CFG, trim=trim)
    assert all(np.array_equal(o["idx"].astype(np.int64), t.numpy()) for o, t in zip(run.outputs, plain))


# ---------------------------------------------------------------- the Core ML backend, predictions simulated
ROLE_FOLDERS = {STEP_GRAPH, EARLY_STEP_GRAPH, UNGUIDED_STEP_GRAPH, PREFILL_GRAPH}  # iOS17: a package per function


def _package_key(path) -> str:
    """decoder_step.mlpackage (iOS18) or decoder_step/scale_0.mlpackage (iOS17), wherever the artifact is."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name in ROLE_FOLDERS else path.name


class FakeMLModel:
    """coremltools' MLModel as far as EVAR uses it, running the wrapper that was converted into each function;
    a state is a copy of the wrapper's cache buffers, loaded before and saved after each prediction."""

    functions: ClassVar[dict[tuple[str, str | None], tuple[torch.nn.Module, list[str], list[str]]]] = {}

    def __init__(self, path, compute_units=None, function_name: str | None = None):
        self.module, self.inputs, self.outputs = self.functions[(_package_key(path), function_name)]

    def make_state(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(b) for n, b in self.module.named_buffers() if n.startswith(("key_", "value_"))}

    @torch.no_grad()
    def predict(self, feeds: dict[str, np.ndarray], state: dict[str, torch.Tensor] | None = None):
        assert set(feeds) == set(self.inputs), (sorted(feeds), self.inputs)
        buffers = dict(self.module.named_buffers())
        for name, value in (state or {}).items():
            buffers[name].copy_(value)
        outs = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.inputs))
        for name, value in (state or {}).items():
            value.copy_(buffers[name])
        outs = outs if isinstance(outs, tuple) else (outs,)
        return {n: o.numpy() for n, o in zip(self.outputs, outs)}


def _simulate(monkeypatch, late, early, options: CoremlOptions) -> None:
    """Core ML on Linux: every (package, function) an export of this recipe writes runs the wrapper converted
    into it, for the export's macOS checks (predict_runner) and, after `_on_macos`, the runtime."""
    io = options.kv_mode == "io"
    iface = StepInterface(late.config, "coreml", kv_mode=options.kv_mode, batch=B)
    names = lambda spec: ([t.name for t in spec.inputs], [t.name for t in spec.outputs])

    def key(role: str, file: str, function: str):
        return (f"{file}/{function}.mlpackage", None) if io else (file, function)

    table = {("vqvae_decoder.mlpackage", None): (VQVAEDecoder(late).eval(), ["f_hat"], ["image"])}
    for si in range(3):
        module = ScaleStep(late, si, top_k=TOP_K, top_p=TOP_P, kv_mode=options.kv_mode, batch=B,
                           index_dtype=torch.int32).eval()
        table[key(STEP_GRAPH, STEP_GRAPH if io else f"{STEP_GRAPH}.mlpackage", f"scale_{si}")] = \
            (module, *names(iface.function(si)))
    for role in cl.plan_roles(late, early, options).values():
        for spec, module in zip(role.specs, role.modules):
            table[key(role.name, role.file, spec.name)] = (module, *names(spec))
    FakeMLModel.functions = table
    monkeypatch.setattr(cm, "can_predict", lambda: (True, ""))
    monkeypatch.setattr(cm, "predict_runner", lambda path, function, compute_units="cpu_only":
                        FakeMLModel(path, function_name=function))


def _on_macos(monkeypatch) -> None:
    """The runtime's view: macOS, and coremltools' MLModel predicting (after the export: its converter uses it)."""
    monkeypatch.setattr("evar.runtime.backends.base.platform.system", lambda: "Darwin")
    monkeypatch.setattr(ct.models, "MLModel", FakeMLModel)


def test_coreml_backend_follows_the_split_and_trimmed_manifest(artifact, monkeypatch):
    from evar.runtime.generator import Generator

    out, _ = artifact
    late, early = _models()
    _simulate(monkeypatch, late, early, _options(split_scale=SPLIT, cfg_until_scale=TRIM))
    _on_macos(monkeypatch)
    labels = np.array([1, 3])
    got = Generator(out, "coreml-cpu").generate(labels, seed=pt.PARITY_SEED, cfg=pt.PARITY_CFG)
    ref = _tokens(late, labels, pt.PARITY_CFG, early, SPLIT, TRIM)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(got.tokens, ref))
    # and it is the recipe that made them: the plain compressed model gives other tokens
    assert not all(np.array_equal(a, b.numpy()) for a, b in zip(got.tokens, _tokens(late, labels, pt.PARITY_CFG)))


def test_coreml_backend_runs_what_the_manifest_says_not_what_the_packages_hold(artifact, monkeypatch, tmp_path):
    """The same packages under a manifest without the recipe: the plain compressed model's tokens."""
    import json
    import shutil

    from evar.runtime.generator import Generator

    out, _ = artifact
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    m = json.loads((plain / "manifest.json").read_text())
    del m["generation"]
    for role in (EARLY_STEP_GRAPH, UNGUIDED_STEP_GRAPH, PREFILL_GRAPH):
        del m["graphs"][role]
    m["files"] = [f for f in m["files"] if not f["path"].startswith(EARLY_STEP_GRAPH)]
    shutil.rmtree(plain / f"{EARLY_STEP_GRAPH}.mlpackage")
    (plain / "manifest.json").write_text(json.dumps(m))
    late, early = _models()
    _simulate(monkeypatch, late, early, _options(split_scale=SPLIT, cfg_until_scale=TRIM))
    _on_macos(monkeypatch)
    labels = np.array([1, 3])
    got = Generator(plain, "coreml-cpu").generate(labels, seed=pt.PARITY_SEED, cfg=pt.PARITY_CFG)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(got.tokens, _tokens(late, labels, pt.PARITY_CFG)))


@pytest.mark.slow  # ~40 s: a second conversion of every function, one package each
def test_ios17_split_and_trim_runs_like_onnx(tmp_path, monkeypatch):
    from evar.runtime.generator import Generator

    late, early = _models()
    options = _options(target="iOS17", split_scale=SPLIT, cfg_until_scale=TRIM)
    out = tmp_path / "art"
    _simulate(monkeypatch, late, early, options)
    result = build_coreml(late, "tests:late", out, options, early=early)
    assert result["parity"].passed
    assert any(c.name.startswith("coreml split at 1, cfg trimmed at 2: prediction vs wrappers")
               for c in result["parity"].checks)
    _on_macos(monkeypatch)
    a = load_artifact(out)
    assert all(f.get("file") for r in (EARLY_STEP_GRAPH, UNGUIDED_STEP_GRAPH, PREFILL_GRAPH)
               for f in a.graph(r)["functions"])
    assert [t["shape"][2] for t in a.function(PREFILL_GRAPH)["outputs"]] == [1] * 4  # presents of scale 0
    labels = np.array([0, 2])
    got = Generator(out, "coreml-cpu").generate(labels, seed=pt.PARITY_SEED, cfg=pt.PARITY_CFG)
    ref = _tokens(late, labels, pt.PARITY_CFG, early, SPLIT, TRIM)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(got.tokens, ref))


# ---------------------------------------------------------------- bad values
def _cli(monkeypatch, capsys, argv):
    from evar.export import cli

    monkeypatch.setattr(sys, "argv", ["evar-export", "coreml", *argv])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("extra,what", [
    (["--early-model", "M", "--split-scale", "0"], "split-scale"),
    (["--early-model", "M", "--split-scale", "3"], "split-scale"),
    (["--early-model", "M", "--split-scale", "2", "--cfg-until-scale", "1"], "cfg-until-scale"),
    (["--cfg-until-scale", "3"], "cfg-until-scale"),
    (["--split-scale", "1"], "early-model"),
    (["--token-keep", "2:0.5"], "token-keep"),
    (["--target", "ane", "--cfg-until-scale", "1"], "--target ane"),
    (["--target", "ane", "--early-model", "M", "--split-scale", "1"], "--target ane"),
])
def test_bad_recipe_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, extra, what):
    model_dir = save_model_dir(tiny3(), tmp_path / "m")
    argv = ["--model", str(model_dir), "--out", str(tmp_path / "art"), "--batch", "1"] + \
        [str(model_dir) if e == "M" else e for e in extra]
    assert what in _cli(monkeypatch, capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
