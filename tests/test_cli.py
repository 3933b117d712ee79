"""The `evar` commands a user types, on the embedded default model."""
import json
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from evar.apps.cli import app

runner = CliRunner()


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_sample_writes_npz_and_grid(tmp_path):
    out = tmp_path / "s"
    _ok(["sample", "--model", "builtin:digits", "--classes", "0,3,7", "--per-class", "2", "--seed", "0",
         "--out", str(out)])
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 16, 16, 3) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 0, 3, 3, 7, 7] and data["labels"].dtype == np.int64
    assert (out / "grid.png").stat().st_size > 0


def test_same_seed_same_images(tmp_path):
    for name in ("a", "b"):
        _ok(["sample", "--classes", "4", "--per-class", "3", "--seed", "9", "--out", str(tmp_path / name)])
    a, b = (np.load(tmp_path / n / "samples.npz")["images"] for n in ("a", "b"))
    assert np.array_equal(a, b)


def test_eval_report(tmp_path):
    out = tmp_path / "report.json"
    text = _ok(["eval", "--model", "builtin:digits", "--per-class", "3", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["quality"]["n_samples"] == 30 and 0 <= report["quality"]["class_accuracy"] <= 1
    assert "class accuracy" in text and "recall" in text
    assert 0 <= report["quality"]["precision"] <= 1 and 0 <= report["quality"]["recall"] <= 1


def test_info_and_convert_round_trip(tmp_path):
    info = _ok(["info", "--model", "builtin:digits"])
    assert "depth 4" in info and "codes used per scale" in info and "held-out" in info
    _ok(["convert", "--model", "builtin:digits", "--out", str(tmp_path / "copy")])
    assert "depth 4" in _ok(["info", "--model", str(tmp_path / "copy")])


def test_bad_reference_is_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "evar.apps.cli", "sample", "--model", "official:d16"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
