"""`evar sample` / `evar eval` / `evar dd` with DD models: what works, and bad input → one line, nothing written."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from evar.apps.cli import app
from evar.checkpoints import save_model_dir
from evar.dd.model import from_teacher, save_dd_dir
from evar.errors import EvarError
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddcli")
    teacher = tiny_model()
    var_dir = save_model_dir(teacher, root / "var")
    dd_dir = save_dd_dir(from_teacher(teacher), root / "dd", {"source": "tests"})
    return str(var_dir), str(dd_dir)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_sample_one_two_steps_and_teacher_involved(dirs, tmp_path):
    var_dir, dd_dir = dirs
    for name, extra in [("one", []), ("two", ["--steps", "2"]), ("t", ["--t-list", "0,2"]),
                        ("teacher", ["--teacher", var_dir, "--teacher-scales", "1,2"])]:
        result = invoke("sample", "--model", dd_dir, "--classes", "1,2", "--per-class", "2", "--out",
                        str(tmp_path / name), *extra)
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / name / "samples.npz") as f:
            assert f["images"].shape == (4, 8, 8, 3) and f["labels"].tolist() == [1, 1, 2, 2]
    with np.load(tmp_path / "two" / "samples.npz") as a, np.load(tmp_path / "t" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])  # --steps 2 on 4 scales = --t-list 0,2


@pytest.mark.parametrize("args, words", [
    (["sample", "--model", "DD", "--steps", "0"], "--steps must be 1 or more"),
    (["sample", "--model", "DD", "--t-list", "0,4"], "goes beyond the model's scales"),
    (["sample", "--model", "VAR", "--steps", "1"], "go with a Distilled Decoding model"),
    (["sample", "--model", "DD", "--teacher", "DD", "--teacher-scales", "1"], "this command needs a VAR generator"),
    (["sample", "--model", "DD", "--teacher-scales", "1"], "go together"),
    (["eval", "--model", "DD", "--t-list", "1"], "must start at 0"),
    (["dd", "pairs", "--teacher", "DD", "--samples", "4"], "this command needs a VAR generator"),
    (["dd", "train", "--teacher", "VAR", "--pairs", "VAR"], "not a pairs folder"),
    (["prune", "--model", "DD", "--sparsity", "0.4"], "this command needs a VAR generator"),
])
def test_bad_input_is_one_error_and_nothing_is_written(dirs, tmp_path, args, words):
    var_dir, dd_dir = dirs
    args = [{"DD": dd_dir, "VAR": var_dir}.get(a, a) for a in args]
    out = tmp_path / ("report.json" if args[0] == "eval" else "out")
    result = invoke(*args, "--out", str(out))
    assert isinstance(result.exception, EvarError), result.output
    assert words in str(result.exception) and len(str(result.exception).splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []



def test_builtin_dd_student_ships_with_its_recipe():
    from evar import zoo
    from evar.dd.model import DDModel
    from evar.errors import ModelRefError

    model = zoo.load_family("builtin:digits-dd", ("dd",))
    assert isinstance(model, DDModel) and model.config.var == zoo.load("builtin:digits").config.var
    prov = model.provenance
    assert prov["commands"][0].startswith("evar dd pairs --teacher builtin:digits")
    assert len(prov["teacher_var_sha256"]) == 64 and prov["times"]["pairs_wall_seconds"] > 0
    with pytest.raises(ModelRefError, match="needs a VAR generator"):
        zoo.load("builtin:digits-dd")


def test_a_teacher_with_another_tokenizer_is_refused(dirs, tmp_path):
    """Same architecture, other tokenizer weights (a retrained teacher): its tokens would mean other things."""
    _, dd_dir = dirs
    other = save_model_dir(tiny_model(seed=1), tmp_path / "other")
    out = tmp_path / "out"
    result = invoke("sample", "--model", str(dd_dir), "--teacher", str(other), "--teacher-scales", "1", "--out", str(out))
    assert isinstance(result.exception, EvarError) and "does not share the DD model's tokenizer" in str(result.exception)
    assert not out.exists()
