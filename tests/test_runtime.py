"""Runtime: artifacts → images without torch, the same tokens as PyTorch, evar-bench's report, clear failures."""
from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from evar.checkpoints import build_model, save_model_dir
from evar.data import to_uint8_nhwc
from evar.models.decoding import generate
from tests.conftest import tiny_model

pytest.importorskip("onnxruntime")

from evar.export.artifact import build_onnx  # noqa: E402
from evar.export.onnx import OnnxOptions  # noqa: E402
from evar.runtime import Generator, bench, cost  # noqa: E402
from evar.contract import ManifestError, load_artifact  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOP_K, TOP_P = 40, 0.9
LINUX_ONLY = pytest.mark.skipif(platform.system() == "Darwin", reason="checks the message macOS-only devices give elsewhere")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """A tiny non-uniform model saved as a model dir and exported to ONNX with that dir as its model_ref."""
    root = tmp_path_factory.mktemp("runtime")
    model = tiny_model()
    save_model_dir(model, root / "model", {"source": "tests"})
    build_onnx(model, str(root / "model"), root / "art", OnnxOptions(top_k=TOP_K, top_p=TOP_P))
    return model, root / "art"


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def reference(model, labels, seed, cfg):
    return generate(model.var, model.vqvae, torch.from_numpy(np.asarray(labels)), guidance=cfg, top_k=TOP_K,
                    top_p=TOP_P, seed=seed)


# ---------------------------------------------------------------- parity with PyTorch
@pytest.mark.parametrize("io_binding", [True, False])
def test_ort_tokens_and_images_equal_pytorch(art, io_binding):
    model, path = art
    labels, seed, cfg = [5, 0, 9, 2, 7], 123, 2.0
    out = Generator(path, "cpu", threads=1, io_binding=io_binding).generate(labels, seed=seed, cfg=cfg)
    ref = reference(model, labels, seed, cfg)
    for si, t in enumerate(out.tokens):
        np.testing.assert_array_equal(t, ref.tokens[si].numpy())
    assert out.images.dtype == np.uint8 and out.images.shape == (5, 8, 8, 3)
    assert np.abs(out.images.astype(int) - to_uint8_nhwc(ref.images).astype(int)).max() <= 1


def test_batches_are_numbered_so_splitting_changes_nothing(art):
    model, path = art
    labels = [3, 3, 1, 8, 4, 6, 0]
    whole = Generator(path, threads=1).generate(labels, seed=7, cfg=1.5)
    split = Generator(path, threads=1, batch_size=3).generate(labels, seed=7, cfg=1.5)
    assert len(split.timings) == 3
    for a, b in zip(whole.tokens, split.tokens):
        np.testing.assert_array_equal(a, b)
    ref = generate(model.var, model.vqvae, torch.tensor(labels[3:]), guidance=1.5, top_k=TOP_K, top_p=TOP_P, seed=7,
                   first_sample=3)
    np.testing.assert_array_equal(split.tokens[-1][3:], ref.tokens[-1].numpy())


def test_one_seed_gives_the_same_tokens_on_every_path(art):
    """generate, the runtime's torch reference, the ONNX artifact and both export wrappers all step through
    `evar.models.decoding.decode_scale`: one seed, one set of tokens."""
    from evar.export import parity
    from evar.export.graphs import DynamicStep, ScaleStep
    from evar.export.interface import StepInterface

    model, path = art
    labels, seed, guidance = np.array([4, 1, 7]), 31, 1.5
    want = [t.numpy() for t in reference(model, labels, seed, guidance).tokens]
    runs = {"torch backend": Generator(path, "torch-cpu", model=model).generate(labels, seed=seed, cfg=guidance).tokens,
            "onnx artifact": Generator(path, "cpu", threads=1).generate(labels, seed=seed, cfg=guidance).tokens}
    ready = build_model(model.config, attn_impl="math")
    ready.var.load_state_dict(model.var.state_dict())
    ready.vqvae.load_state_dict(model.vqvae.state_dict())
    dynamic = StepInterface(model.config, "onnx")
    static = StepInterface(model.config, "coreml", batch=len(labels))
    wrappers = {"one graph for every scale (ONNX wrapper)": (DynamicStep(ready, top_k=TOP_K, top_p=TOP_P), dynamic),
                "a function per scale (Core ML wrapper)": (
                    [ScaleStep(ready, si, top_k=TOP_K, top_p=TOP_P, batch=len(labels))
                     for si in range(model.config.var.num_scales)], static)}
    for name, (module, iface) in wrappers.items():
        run = parity.drive(parity.torch_step(module, iface), iface, labels, seed, guidance)
        runs[name] = [o["idx"] for o in run.outputs]
    for name, tokens in runs.items():
        for si, (got, ref) in enumerate(zip(tokens, want)):
            np.testing.assert_array_equal(np.asarray(got, np.int64), ref, err_msg=f"{name}, scale {si}")


def test_torch_reference_backend_equals_generate(art):
    model, path = art
    labels = [1, 2, 3]
    for cfg in (0.0, 2.5):  # cfg 0: no unconditional half, as generate
        out = Generator(path, "torch-cpu", threads=1, model=model).generate(labels, seed=5, cfg=cfg)
        ref = reference(model, labels, 5, cfg)
        for si, t in enumerate(out.tokens):
            np.testing.assert_array_equal(t, ref.tokens[si].numpy())
        np.testing.assert_array_equal(out.images, to_uint8_nhwc(ref.images))


def test_sample_cli_with_artifact_equals_the_model(art, tmp_path):
    from evar.apps.cli import app

    _, path = art
    runner = CliRunner()
    common = ["--classes", "1,4", "--per-class", "3", "--seed", "11", "--top-k", str(TOP_K), "--top-p", str(TOP_P)]
    sources = {"graph": ["--artifact", str(path), "--batch-size", "4"], "torch": ["--model", str(path.parent / "model")]}
    for name, src in sources.items():
        result = runner.invoke(app, ["sample", *src, *common, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output + repr(result.exception)
    a, b = (np.load(tmp_path / n / "samples.npz") for n in ("graph", "torch"))
    assert np.array_equal(a["labels"], b["labels"])
    assert np.abs(a["images"].astype(int) - b["images"].astype(int)).max() <= 1


def test_sample_cli_verifies_hashes_on_request(art, tmp_path):
    from evar.apps.cli import app

    path = copy_artifact(art[1], tmp_path / "a")
    graph = path / "vqvae_decoder.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    graph.write_bytes(bytes(data))
    args = ["sample", "--artifact", str(path), "--classes", "1", "--per-class", "1", "--top-k", str(TOP_K),
            "--top-p", str(TOP_P)]
    result = CliRunner().invoke(app, [*args, "--verify-hashes", "--out", str(tmp_path / "s")])
    assert isinstance(result.exception, ManifestError) and "sha256" in str(result.exception)
    assert not (tmp_path / "s").exists()


def test_runtime_runs_without_torch(art):
    _, path = art
    code = ("import sys, evar.runtime, evar.runtime.bench, evar.runtime.generator, evar.contract, evar.runtime.cost\n"
            f"out = evar.runtime.Generator({str(path)!r}, 'cpu', threads=1).generate([1, 2], seed=3)\n"
            "assert out.images.shape == (2, 8, 8, 3)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'coremltools')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_baked_top_k_and_bad_requests_are_clear_errors(art):
    from evar.errors import EvarError

    gen = Generator(art[1], threads=1)
    with pytest.raises(EvarError, match="bakes top-k 40 and top-p 0.9.*--top-k 40"):
        gen.generate([1], top_k=900)
    with pytest.raises(EvarError, match="class 10 is out of range"):
        gen.generate([10])
    with pytest.raises(EvarError, match="cfg must be a finite number >= 0"):
        gen.generate([1], cfg=-1)


# ---------------------------------------------------------------- manifests and files
def _edit_manifest(path: Path, edit) -> None:
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_newer_format_version_is_refused_with_upgrade_hint(art, tmp_path):
    path = copy_artifact(art[1], tmp_path / "a")
    _edit_manifest(path, lambda m: m.update(format_version=4, new_field={"x": 1}))
    with pytest.raises(ManifestError, match=r"newer EVAR \(format_version 4\).*reads format_version 3.*upgrade"):
        load_artifact(path)


def test_missing_or_changed_files_are_named(art, tmp_path):
    path = copy_artifact(art[1], tmp_path / "a")
    (path / "vqvae_decoder.onnx").unlink()
    with pytest.raises(ManifestError, match="missing vqvae_decoder.onnx"):
        Generator(path)
    path = copy_artifact(art[1], tmp_path / "b")
    with open(path / "decoder_step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match="decoder_step.onnx has .* bytes, the manifest records"):
        load_artifact(path)
    path = copy_artifact(art[1], tmp_path / "c")
    data = bytearray((path / "vqvae_decoder.onnx").read_bytes())
    data[-1] ^= 1
    (path / "vqvae_decoder.onnx").write_bytes(bytes(data))
    load_artifact(path)  # same size: only the hash tells
    with pytest.raises(ManifestError, match="vqvae_decoder.onnx differs from its recorded sha256"):
        load_artifact(path, verify_hashes=True)
    with pytest.raises(ManifestError, match="no artifact directory"):
        load_artifact(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_artifact(tmp_path / "empty")


def test_graph_from_another_artifact_is_refused(art, tmp_path):
    path = copy_artifact(art[1], tmp_path / "a")
    shutil.copy(path / "vqvae_decoder.onnx", path / "decoder_step.onnx")

    def relist(m):
        size = (path / "decoder_step.onnx").stat().st_size
        next(f for f in m["files"] if f["path"] == "decoder_step.onnx")["bytes"] = size
    _edit_manifest(path, relist)
    with pytest.raises(ManifestError, match="decoder_step.onnx: the graph's inputs .* differ from the manifest's"):
        Generator(path)


# ---------------------------------------------------------------- evar-bench
def _bench(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["evar-bench", *args])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def _flatten(report: dict) -> set[str]:
    keys = set(report)
    for k, v in report.items():
        if isinstance(v, dict):
            keys |= {f"{k}.{sub}" for sub in v}
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            keys |= {f"{k}[].{sub}" for sub in v[0]}
    return keys


def documented_bench_fields() -> set[str]:
    text = (ROOT / "ios_demo" / "README.md").read_text()
    block = re.search(r"<!-- bench-fields -->(.*?)<!-- /bench-fields -->", text, re.S).group(1)
    return set(re.findall(r"^\|\s*`([^`]+)`", block, re.M))


def test_bench_json_has_every_field_with_sane_values(art, tmp_path, monkeypatch, capsys):
    model, path = art
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    code, out, err = _bench(monkeypatch, capsys, "--artifact", str(path), "--baseline", str(path),
                            "--baseline-device", "torch-cpu", "--warmup", "0", "--iters", "1", "--threads", "1",
                            "--batch", "2", "--json", str(out_json), "--plot", str(out_png), "--quiet")
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert documented_bench_fields() <= _flatten(r), documented_bench_fields() - _flatten(r)
    assert set(bench.SWIFT_FIELDS) <= set(r)
    assert (r["format"], r["tool"], r["backend"], r["device_name"]) == ("evar-bench-v1", "evar-bench", "onnxruntime", "cpu")
    assert (r["batch"], r["iterations"], r["warmup"], r["threads"], r["top_k"], r["top_p"]) == (2, 1, 0, 1, TOP_K, TOP_P)
    assert (r["precision"], r["weights"], r["compression"]) == ("fp32", "fp32", "none")
    assert (r["kv_cache"], r["sampling"]) == ("io", "graph")
    assert r["params"] == sum(p.numel() for p in model.var.parameters())
    assert [s["patch_num"] for s in r["per_scale"]] == [1, 2, 3, 4]
    e2e = r["end_to_end"]
    assert 0 < e2e["min_ms"] <= e2e["median_ms"] <= e2e["p90_ms"]
    assert sum(s["median_ms"] for s in r["per_scale"]) + r["decode"]["median_ms"] <= e2e["median_ms"] * 1.01
    assert r["throughput_images_per_s"] == pytest.approx(2000 / e2e["median_ms"])
    # RSS deltas: after other tests the process may already hold what loading needs, so load_mb can be 0
    assert r["load_ms"] > 0 and r["peak_memory_mb"] > 0 and r["memory"]["load_mb"] >= 0
    assert r["macs_per_image"]["transformer"] > 0 and r["macs_per_image"]["vqvae_decoder"] > 0
    base = r["baseline"]
    assert base["backend"] == "torch" and base["artifact"] == path.name and base["baseline"] is None
    assert r["speedup"]["end_to_end"] == pytest.approx(base["end_to_end"]["median_ms"] / e2e["median_ms"])
    assert r["speedup"]["macs_ratio"]["transformer"] == pytest.approx(1.0)
    assert "end to end" in out and "speedup" in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@LINUX_ONLY
@pytest.mark.parametrize("device", ["ane", "coreml-gpu", "coreml-cpu", "ort-coreml"])
def test_macos_only_devices_fail_with_one_clear_line(art, monkeypatch, capsys, device):
    code, out, err = _bench(monkeypatch, capsys, "--device", device, "--artifact", str(art[1]))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--device {device} needs macOS with Core ML" in lines[0] and "--device cpu" in lines[0]


def test_unknown_device_and_wrong_format_are_clear(art, tmp_path, monkeypatch, capsys):
    code, _, err = _bench(monkeypatch, capsys, "--device", "gpu", "--artifact", str(art[1]))
    assert code == 2 and "unknown device 'gpu'" in err
    path = copy_artifact(art[1], tmp_path / "a")
    _edit_manifest(path, lambda m: m.update(format_version=7))
    code, _, err = _bench(monkeypatch, capsys, "--artifact", str(path))
    assert code == 2 and "format_version 7" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- costs from the manifest
@pytest.mark.parametrize("kw", [{}, {"shared_aln": True}, {"attn_l2_norm": False}])
def test_params_from_config_equal_numel(kw):
    model = tiny_model(**kw)
    assert cost.var_params(model.config.to_dict()["var"]) == sum(p.numel() for p in model.var.parameters())


def test_step_and_decoder_macs_equal_a_flop_counter(art):
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(tiny_model().config, attn_impl="math").eval()
    var = model.config.to_dict()["var"]
    cond, past = model.var.class_emb(torch.tensor([1, 10])), None
    with torch.no_grad():
        for si, pn in enumerate(var["patch_nums"]):
            with FlopCounterMode(display=False) as fc:
                _, past = model.var.decode_step(torch.randn(2, pn * pn, var["embed_dim"]), cond, past)
            m = cost.step_macs(var, si, batch=1)
            assert fc.get_total_flops() == 2 * (m["adaln"] + m["linear"] + m["attention"] + m["head"])
        with FlopCounterMode(display=False) as fc:
            art[0].vqvae.fhat_to_img(torch.randn(1, 8, 4, 4))
    assert fc.get_total_flops() == 2 * cost.onnx_macs(art[1] / "vqvae_decoder.onnx")
