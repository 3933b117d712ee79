"""The quality gate of `evar-export coreml --compress X` (export/coreml_gate.py; --target ane and the default
target): thresholds and values in the manifest, a breach fails in one line and writes nothing, bad thresholds
are refused first.

The Core ML conversion itself is replaced here by empty packages (it takes minutes on a shared machine and is
tested in test_ane.py, slow): everything after it (parity, the gate, the manifest) runs as in an export."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import few_scale_model
from evar.contract import load_artifact
from evar.errors import EvarError
from evar.export import ane_export
from evar.export.artifact import build_coreml
from evar.export.coreml import CoremlOptions
from evar.export.coreml_gate import CompressGate
from evar.export.parity import ParityError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_conversion(monkeypatch):
    """Each package an empty folder with one file; no structure check (nothing was converted)."""
    def package(*args):
        path = next(a for a in args if isinstance(a, Path))
        path.mkdir()
        (path / "stub").write_text("not converted")

    monkeypatch.setattr(ane_export, "_save_functions", package)
    monkeypatch.setattr(ane_export, "_save_one", package)
    monkeypatch.setattr(ane_export, "check_structure", lambda *a: None)


def _export(out: Path, compress: str, gate: CompressGate | None = None):
    options = CoremlOptions(target="ane", batch=1, top_k=40, top_p=0.9, compress=compress, compress_gate=gate)
    options.validate()
    return build_coreml(few_scale_model((1, 2)), "tests:tiny2", out, options)


def test_a_compressed_export_states_its_gate(no_conversion, tmp_path):
    out = tmp_path / "art"
    result = _export(out, "int8", CompressGate(max_kl=0.02))
    m = load_artifact(out).data
    assert result["parity"].passed and m["parity"]["passed"]
    gate = {c["name"]: c for c in m["parity"]["checks"] if c["name"].startswith("--compress int8")}
    defaults = CompressGate()
    for si in range(2):
        kl = gate[f"--compress int8 (CPU emulation) vs fp32 wrappers: mean token KL scale {si}"]
        agree = gate[f"--compress int8 (CPU emulation) vs fp32 wrappers: token agreement (1 - TV) scale {si}"]
        assert (kl["metric"], kl["tolerance"]) == ("mean_token_kl", 0.02) and 0 < kl["value"] < 0.02
        assert agree["tolerance"] == defaults.min_token_agreement and defaults.min_token_agreement < agree["value"] < 1
    psnr = gate["--compress int8 decoder (CPU emulation) vs fp32 decoder: image PSNR (dB)"]
    assert psnr["tolerance"] == defaults.min_psnr_db < psnr["value"] < float("inf")
    assert len(gate) == 5
    stated = m["compression"]["details"]["gate"]
    assert (stated["max_mean_token_kl_per_scale"], stated["min_token_agreement_per_scale"], stated["min_psnr_db"]) == (
        0.02, defaults.min_token_agreement, defaults.min_psnr_db)
    # the uncompressed fp16 check is judged by the same measure, not by counting equal draws
    assert any(c["name"].endswith("fp16 (CPU) vs fp32, same inputs: token agreement (1 - TV) scale 1")
               for c in m["parity"]["checks"])


@pytest.mark.slow
def test_a_converted_compressed_export_states_its_gate(request, tmp_path):
    """The same with the real conversion (structure checked against the packages): opt-in, 15 s alone."""
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:  # the project's config does not deselect slow tests by itself
        pytest.skip("opt-in: pytest -m slow (a Core ML conversion)")
    pytest.importorskip("coremltools")
    out = tmp_path / "art"
    assert _export(out, "palettize6")["parity"].passed
    m = load_artifact(out, verify_hashes=True).data
    assert m["compression"]["details"]["gate"]["min_psnr_db"] == CompressGate().min_psnr_db
    assert len([c for c in m["parity"]["checks"] if c["name"].startswith("--compress palettize6")]) == 5


def test_an_uncompressed_export_has_no_gate(no_conversion, tmp_path):
    _export(tmp_path / "art", "none")
    m = load_artifact(tmp_path / "art").data
    assert not [c for c in m["parity"]["checks"] if c["name"].startswith("--compress")]
    assert "gate" not in m["compression"]["details"]


def test_a_breach_fails_in_one_line_and_writes_nothing(no_conversion, tmp_path):
    out = tmp_path / "art"
    with pytest.raises(ParityError) as err:
        _export(out, "palettize4", CompressGate(max_kl=1.0, min_token_agreement=1.0, min_psnr_db=10.0))
    text = str(err.value)
    assert len(text.splitlines()) == 1
    for words in ("--compress palettize4", "token agreement (1 - TV)", "at scale 0", "at scale 1", "threshold ≥ 1.0",
                  "relax with --compress-min-agreement"):
        assert words in text, text
    assert "mean token KL" not in text and "PSNR" not in text  # only what failed
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("gate,words", [
    (CompressGate(max_kl=0.0), "--compress-max-kl must be > 0"),
    (CompressGate(min_token_agreement=1.5), "--compress-min-agreement must be in (0, 1]"),
    (CompressGate(min_psnr_db=float("nan")), "--compress-min-psnr must be a finite"),
])
def test_bad_thresholds_are_refused(gate, words):
    with pytest.raises(EvarError, match=words.replace("(", r"\(").replace("]", r"\]")):
        CoremlOptions(target="ane", compress="palettize6", compress_gate=gate).validate()


@pytest.mark.parametrize("target,compress", [("ane", "none"), ("iOS18", "none"), ("ane", "2:4"), ("iOS18", "2:4+palettize4")])
def test_thresholds_only_where_a_gate_runs(target, compress):
    with pytest.raises(EvarError, match=r"apply to --compress palettize6\|palettize4\|int8 \(got --compress"):
        CoremlOptions(target=target, compress=compress, compress_gate=CompressGate(max_kl=0.1)).validate()


@pytest.mark.parametrize("target", ["iOS18", "iOS17"])
def test_the_default_target_is_gated_too(tmp_path, target):
    """`--target iOS18/iOS17 --compress`: the step wrappers carrying the stored weights (in fp32) on the fp32
    wrappers' inputs, and the decoder; a breach is the same one line."""
    import torch
    from evar.export.artifact import coreml_parity, export_ready
    from evar.export.coreml_gate import raise_if_failed
    from evar.export.graphs import ScaleStep
    from evar.export.interface import StepInterface

    model = export_ready(few_scale_model((1, 2)))
    options = CoremlOptions(target=target, compress="palettize4", top_k=40, top_p=0.9,
                            compress_gate=CompressGate(max_kl=1.0, min_token_agreement=1.0, min_psnr_db=10.0))
    kv = "io" if target == "iOS17" else "state"
    iface = StepInterface(model.config, "coreml", kv_mode=kv, batch=1)
    wrappers = [ScaleStep(model, si, top_k=40, top_p=0.9, kv_mode=kv, batch=1, index_dtype=torch.int32).eval()
                for si in range(2)]
    report = coreml_parity(model, tmp_path, iface, wrappers, {}, options)  # no packages: nothing converted
    gate = {c.name: c for c in report.checks if c.name.startswith("--compress palettize4")}
    assert len(gate) == 5 and all(c.passed for c in gate.values() if c.metric != "token_agreement")
    assert all(0.5 < c.value < 1 and not c.passed for c in gate.values() if c.metric == "token_agreement")
    with pytest.raises(ParityError, match=r"^Core ML export of t: --compress palettize4 fails its quality gate .*"
                                          r"at scale 0, .* at scale 1 \(threshold ≥ 1.0; relax with --compress-min-agreement\)$"):
        raise_if_failed(report, "Core ML export of t", "palettize4")


def test_the_cli_refuses_a_bad_threshold_before_loading(tmp_path):
    """One line, exit 2, before the (missing) model is looked for; nothing written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "evar.export.cli", "coreml", "--model", str(tmp_path / "no-model"), "--target", "ane",
           "--compress", "palettize4", "--compress-min-agreement", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--compress-min-agreement must be in (0, 1], got 0.0" in err, err
    assert not out.exists()
