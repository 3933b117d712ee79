"""`evar-export onnx --model DD_DIR`: one graph per student pass, parity-gated, run by the torch-free runtime with
the tokens PyTorch samples; bad input → one line, nothing written."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from evar.export import dd_export
from evar.export.cli import app as export_app
from evar.export.onnx import OnnxOptions
from evar.export.parity import ParityError
from evar.runtime import Generator
from typer.testing import CliRunner

from evar.apps.cli import app as evar_app
from evar.checkpoints import save_model_dir
from evar.contract import ManifestError, load_artifact, validate
from evar.dd.model import from_teacher, save_dd_dir
from evar.dd.sampler import FewStep, dd_generate
from evar.errors import EvarError
from tests.conftest import tiny_model


def _student(continuous_from=None):
    dd = from_teacher(tiny_model(), continuous_from)
    with torch.no_grad():  # a trained student's flag and regression head matter: make them matter here too
        g = torch.Generator().manual_seed(1)
        dd.student.flag_embed.weight.copy_(torch.randn(dd.student.flag_embed.weight.shape, generator=g))
        dd.student.reg_head.weight.copy_(torch.randn(dd.student.reg_head.weight.shape, generator=g) * 0.3)
        dd.student.word_embed.weight.mul_(5)  # tokens then depend on their inputs (the second pass changes some)
    return dd.eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddx")
    var_dir = save_model_dir(tiny_model(), root / "var")
    dd_dir = save_dd_dir(_student(), root / "dd", {"source": "tests"})
    art = root / "art"
    result = CliRunner().invoke(export_app, ["onnx", "--model", str(dd_dir), "--out", str(art)])
    assert result.exit_code == 0, result.output
    return str(var_dir), str(dd_dir), art


def test_one_and_two_step_graphs_give_pytorchs_tokens(dirs):
    _, dd_dir, art = dirs
    a = load_artifact(art)
    assert a.family == "dd" and a.data["format_version"] == 3
    assert [p["t"] for p in a.data["few_step"]["passes"]] == [0, 2]  # default: 0 and S // 2 (4 scales)
    assert a.data["parity"]["passed"] and len(a.data["parity"]["checks"]) == 12
    from evar import zoo

    model = zoo.load_family(dd_dir, ("dd",))
    labels = [9, 0, 4]
    gen = Generator(art, "cpu", threads=1)
    for t_list in ([0], [0, 2]):  # other labels, seed and sample numbers than the export's trace and parity
        out = gen.generate(labels, seed=123, t_list=t_list, first_sample=40)
        images, tokens = dd_generate(model, torch.tensor(labels), FewStep(tuple(t_list)), 123, 40)
        assert np.array_equal(np.concatenate(out.tokens, axis=1), tokens.numpy())
        from evar.data import to_uint8_nhwc

        assert np.abs(out.images.astype(int) - to_uint8_nhwc(images).astype(int)).max() <= 1
    one, two = (gen.generate(labels, seed=123, t_list=t).tokens for t in ([0], [0, 2]))
    assert not all(np.array_equal(x, y) for x, y in zip(one, two))  # the second pass changed something


def test_sample_artifact_equals_sample_model(dirs, tmp_path):
    _, dd_dir, art = dirs
    for name, source in (("a", ["--artifact", str(art)]), ("m", ["--model", dd_dir])):
        result = CliRunner().invoke(evar_app, ["sample", *source, "--steps", "2", "--classes", "1,5", "--per-class",
                                               "3", "--seed", "7", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "m" / "samples.npz") as m:
        assert np.abs(a["images"].astype(int) - m["images"].astype(int)).max() <= 1


def test_regression_head_passes_three_steps(tmp_path):
    """continuous_from: the later scales' vectors come from the regression head; a three-pass t-list."""
    model = _student(continuous_from=2)
    dd_export.build_dd_onnx(model, "tiny", tmp_path / "art", OnnxOptions(), (0, 1, 3))
    labels = [2, 8]
    out = Generator(tmp_path / "art", "cpu", threads=1).generate(labels, seed=5, t_list=[0, 1, 3])
    images, tokens = dd_generate(model, torch.tensor(labels), FewStep((0, 1, 3)), 5)
    assert np.array_equal(np.concatenate(out.tokens, axis=1), tokens.numpy())
    from evar.data import to_uint8_nhwc

    assert np.abs(out.images.astype(int) - to_uint8_nhwc(images).astype(int)).max() <= 1  # regressed vectors too
    with pytest.raises(EvarError, match="t-lists drawn from t = 0,1,3"):
        Generator(tmp_path / "art", "cpu", threads=1).generate(labels, t_list=[0, 2])


def test_a_graph_that_disagrees_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    model = _student()
    export_pass = dd_export._export_pass

    def perturbed(model, iface, wrapper, *rest):
        wrong = copy.deepcopy(wrapper)
        with torch.no_grad():
            wrong.student.head.bias.add_(torch.linspace(0, 3, wrong.student.head.bias.numel()))
        return export_pass(model, iface, wrong, *rest)

    monkeypatch.setattr(dd_export, "_export_pass", perturbed)
    with pytest.raises(ParityError, match="onnx pass t=0 vs wrapper"):
        dd_export.build_dd_onnx(model, "tiny", tmp_path / "art", OnnxOptions(), (0,))
    assert not (tmp_path / "art").exists()


def test_manifest_family_fields(dirs):
    from evar.export.inspect import report

    assert "Distilled Decoding: passes given t = [0, 2]" in report(dirs[2])
    data = json.loads((dirs[2] / "manifest.json").read_text())
    for edit, words in ((lambda m: m.pop("few_step"), "few_step"),
                        (lambda m: m["few_step"]["passes"][1].update(graph="nope"), "names graph 'nope'"),
                        (lambda m: m["few_step"].update(default_t_list=[1]), "default_t_list")):
        broken = copy.deepcopy(data)
        edit(broken)
        with pytest.raises(ManifestError, match=words):
            validate(broken)


@pytest.mark.parametrize("app, args, words", [
    ("export", ["onnx", "--model", "VAR", "--t-list", "0"], "--t-list goes with a Distilled Decoding model"),
    ("export", ["onnx", "--model", "DD", "--quantize", "int8"], "--quantize: VAR export options"),
    ("export", ["onnx", "--model", "DD", "--cfg-until-scale", "2"], "--cfg-until-scale: VAR export options"),
    ("export", ["onnx", "--model", "DD", "--top-k", "5"], "--top-k: VAR export options"),
    ("export", ["onnx", "--model", "DD", "--t-list", "0,4"], "goes beyond the model's scales"),
    ("export", ["onnx", "--model", "DD", "--t-list", "1"], "must start at 0"),
    ("export", ["coreml", "--model", "DD", "--compress", "palettize6"], "--compress: VAR export options"),
    ("export", ["coreml", "--model", "VAR", "--t-list", "0"], "--t-list goes with a Distilled Decoding model"),
    ("evar", ["sample", "--artifact", "ART", "--t-list", "0,1"], "t-lists drawn from t = 0,2"),
    ("evar", ["sample", "--artifact", "ART", "--teacher", "VAR", "--teacher-scales", "1"], "go with --model"),
])
def test_bad_input_is_one_error_and_nothing_is_written(dirs, tmp_path, app, args, words):
    var_dir, dd_dir, art = dirs
    args = [{"DD": dd_dir, "VAR": var_dir, "ART": str(art)}.get(a, a) for a in args]
    out = tmp_path / "out"
    result = CliRunner().invoke(export_app if app == "export" else evar_app, [*args, "--out", str(out)])
    assert isinstance(result.exception, EvarError), result.output
    assert words in str(result.exception) and len(str(result.exception).splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_coreml_passes_are_one_multifunction_package(tmp_path):
    pytest.importorskip("coremltools")
    from evar.export.coreml import CoremlOptions, package_functions
    from evar.export.dd_coreml import PACKAGE, build_dd_coreml

    result = build_dd_coreml(_student(), "tiny", tmp_path / "art", CoremlOptions(batch=2), (0, 2))
    a = load_artifact(tmp_path / "art")
    assert a.family == "dd" and a.format == "coreml" and a.static_batch == 2 and result["parity"].passed
    assert sorted(package_functions(tmp_path / "art" / PACKAGE)) == ["pass_t0", "pass_t2"]
    inputs = a.function("dd_pass_t2")["inputs"]
    assert [(t["name"], t["dtype"]) for t in inputs] == [("labels", "int32"), ("noise", "float32"),
                                                          ("given_tokens", "int32"), ("given_vectors", "float32")]
    with pytest.raises(EvarError, match="runs onnx artifacts"):
        Generator(tmp_path / "art", "cpu")
