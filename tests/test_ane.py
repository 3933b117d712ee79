"""The Neural Engine target: ANE-layout wrappers, padded KV, host sampling, overflow-free norms, the lint.

Fast tests run the PyTorch wrappers (what is converted); the artifact tests convert with coremltools
(minutes on a shared machine) and are marked slow.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import few_scale_model, tiny_model
from evar import rng
from evar.contract import host_sampling as hs
from evar.export.ane import AneDecoder, FhatUpdate, SafeGroupNorm, ane_steps, norm_channels
from evar.export.ane_export import AneInterface, host_run, loop_manifest
from evar.export.ane_lint import lint_function, op_reason, state_findings, strict_failures
from evar.export.artifact import export_ready
from evar.export.graphs import ScaleStep
from evar.models.decoding import generate
from evar.models.sampling import apply_cfg, cfg_ratio, sample_tokens

LABELS, CFG, TOP_K, TOP_P = np.array([1, 5, 9]), 2.5, 40, 0.9


def _run(model, steps, seed, cfg=CFG, reset=True):
    """The fp32 wrappers driven by the host loop, fed in float32 (`at_fp32`)."""
    c = model.config.var
    iface = AneInterface(model.config, len(LABELS)).at_fp32()
    specs = [iface.step(si) for si in range(c.num_scales)], [iface.update(si) for si in range(c.num_scales)]
    updates = [FhatUpdate(model, si) for si in range(c.num_scales)]
    return host_run(loop_manifest(iface), steps, updates, LABELS, seed, cfg, TOP_K, TOP_P, *specs, reset=reset)


@pytest.fixture(scope="module")
def ready():
    return export_ready(tiny_model())


@pytest.mark.parametrize("shared_aln", [False, True])
def test_ane_layout_gives_the_reference_tokens_at_fp32(shared_aln):
    """Same tokens on several seeds, and logits within fp32 reassociation of the reference's (a rounding of the
    inputs to fp16 showed here as ~1e-4 relative, and flipped near-tie draws on builtin:digits)."""
    model = export_ready(tiny_model(shared_aln=shared_aln))
    steps = ane_steps(model, len(LABELS))
    c = model.config.var
    for seed in range(4):
        ref = generate(model.var, model.vqvae, torch.from_numpy(LABELS), guidance=CFG, top_k=TOP_K, top_p=TOP_P, seed=seed,
                       keep_logits=True)
        run = _run(model, steps, seed)
        for si, t in enumerate(ref.tokens):
            np.testing.assert_array_equal(run.tokens[si], t.numpy())
            want = hs.guided_logits(ref.scale_logits[si].numpy(), len(LABELS), CFG, si, c.num_scales)
            assert np.abs(run.logits[si] - want).max() <= 1e-5 * np.abs(want).max()
        with torch.no_grad():
            image = AneDecoder(model)(torch.from_numpy(run.f_hat))
        assert float((image - ref.images).abs().max()) < 1e-4


def test_padding_never_changes_a_token(ready):
    """Caches padded to 32 or 128 positions, the padding filled with large garbage (a state reused from
    another batch): the same tokens and (to rounding) the same logits as no padding at all."""
    unpadded = _run(ready, ane_steps(ready, len(LABELS), pad_to=1), seed=4)
    for pad in (32, 128):
        steps = ane_steps(ready, len(LABELS), pad_to=pad)
        assert steps[0].core.length % pad == 0 and steps[0].core.length > ready.config.var.seq_len
        for s in steps[:1]:
            for name, buf in s.named_buffers():
                if name.startswith(("key_cache_", "value_cache_")):
                    buf.copy_(torch.randn_like(buf) * 100)
        run = _run(ready, steps, seed=4, reset=False)
        for a, b in zip(run.tokens, unpadded.tokens):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(run.logits, unpadded.logits):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_host_sampler_gives_the_tokens_of_in_graph_sampling(ready):
    """From the same logits: the numpy sampler vs `sample_tokens` (what graphs run), on random logits and
    on the logits of the in-graph-sampling Core ML wrapper (ScaleStep) itself."""
    rs = np.random.default_rng(0)
    for trial in range(24):
        vocab = [64, 512, 4096][trial % 3]
        raw = (rs.standard_normal((4, 37, vocab)) * rs.uniform(0.5, 6)).astype(np.float32)
        u = rs.random((2, 37)).astype(np.float32)
        k, p = [(0, 0.0), (TOP_K, TOP_P), (900, 0.96), (0, 0.8)][trial % 4]
        want = sample_tokens(apply_cfg(torch.from_numpy(raw[:2]), torch.from_numpy(raw[2:]), cfg_ratio(CFG, 3, 6)),
                             torch.from_numpy(u), k, p).numpy()
        np.testing.assert_array_equal(hs.sample_scale(raw, u, CFG, 3, 6, k, p), want)
    c = ready.config.var
    f_hat = torch.zeros(len(LABELS), c.cvae, c.patch_nums[-1], c.patch_nums[-1])
    with torch.no_grad():
        for si, pn in enumerate(c.patch_nums[:2]):
            u = rng.scale_uniforms(7, si, len(LABELS), pn * pn)
            step = ScaleStep(ready, si, top_k=TOP_K, top_p=TOP_P, kv_mode="state", batch=len(LABELS))
            logits, idx, _ = step(torch.from_numpy(LABELS), f_hat, torch.from_numpy(u), torch.tensor([CFG]))
            host = hs.sample_from_uniforms(hs.filter_logits(logits.numpy(), TOP_K, TOP_P), u)
            np.testing.assert_array_equal(host, idx.numpy())


def test_class_onehot_rows_and_bad_labels():
    onehot = hs.class_onehot(np.array([2, 0]), 3)
    assert onehot.dtype == np.float16 and onehot.shape == (4, 4)
    assert onehot.argmax(1).tolist() == [2, 0, 3, 3] and onehot.sum() == 4
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        hs.class_onehot(np.array([3]), 3)


def test_norms_equal_the_reference_and_do_not_overflow_in_fp16():
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 16, eps=1e-6)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(2, 16, 8, 8) * 3
    safe = SafeGroupNorm(gn)
    with torch.no_grad():
        assert float((safe(x) - gn(x)).abs().max()) < 1e-5
    big = x * 2000  # squares of ~6000 overflow fp16 (65504)
    with torch.no_grad():
        decomposed = (big.half() - big.half().mean()).square().mean()  # what a converter's fp16 variance does
        ok = safe.half()(big.half()).float()
        want = gn(big)
    assert not torch.isfinite(decomposed)
    assert float((ok - want).abs().max()) < 0.05
    seq = torch.randn(2, 32, 1, 5) * 3000
    want = nn.functional.layer_norm(seq.transpose(1, 3), (32,), eps=1e-6).transpose(1, 3)
    assert float((norm_channels(seq, 1e-6) - want).abs().max()) < 1e-5
    assert float((norm_channels(seq.half(), 1e-6).float() - want).abs().max()) < 0.02


def test_fp16_wrappers_agree_with_fp32_scale_by_scale(ready):
    from evar.export.ane_export import half_steps

    steps = ane_steps(ready, len(LABELS))
    run = _run(ready, steps, seed=1)
    c = ready.config.var
    iface = AneInterface(ready.config, len(LABELS))  # fp16 inputs and logits, as the artifact declares them
    specs = [iface.step(si) for si in range(c.num_scales)], [iface.update(si) for si in range(c.num_scales)]
    run16 = host_run(loop_manifest(iface), half_steps(steps), [FhatUpdate(ready, si) for si in range(c.num_scales)],
                     LABELS, 1, CFG, TOP_K, TOP_P, *specs, teacher=run, dtype=torch.float16)
    agree = np.mean(np.concatenate([(a == b).ravel() for a, b in zip(run16.tokens, run.tokens)]))
    assert agree >= 0.95


def test_class_tables_are_what_the_reference_derives_from_each_label(ready):
    from evar.export.ane import class_tables

    model = ready
    var, C = model.var, model.config.var.embed_dim
    first, blocks, head = class_tables(var)
    labels = torch.tensor([0, 3, model.config.var.num_classes])
    cond = var.class_emb(labels)
    torch.testing.assert_close(first[labels], var.first_tokens(cond)[:, 0], rtol=0, atol=1e-6)
    mod = var.blocks[1].modulation(var.block_condition(cond)).reshape(len(labels), 6, C)
    want = torch.cat((mod[:, :2], 1 + mod[:, 2:4], mod[:, 4:]), 1).reshape(len(labels), -1)
    torch.testing.assert_close(blocks[1][labels], want, rtol=0, atol=1e-6)
    scale, shift = var.head_nm.ada_lin(cond).reshape(len(labels), 2, C).unbind(1)
    torch.testing.assert_close(head[labels], torch.cat((1 + scale, shift), 1), rtol=0, atol=1e-6)


def test_compression_leaves_the_class_tables_in_fp16(ready):
    """--compress palettize*/int8 of an ANE step skips the class tables (their entries are AdaLN values themselves)."""
    ct = pytest.importorskip("coremltools")
    from evar.export import coreml as cm
    from evar.export.ane_export import keep_tables_uncompressed

    step = ane_steps(ready, 1)[1]
    tables = {"b_core_first_table", "b_core_head_table"} | {f"b_core_blocks_{i}_modulation_table"
                                                             for i in range(ready.config.var.depth)}
    for method, pass_name in (("palettize6", "compression::palettize_weights"), ("int8", "compression::linear_quantize_weights")):
        pipeline = keep_tables_uncompressed(cm.pass_pipeline(ct, method), step)
        config = next(o.option_val for o in pipeline.get_options(pass_name) if o.option_name == "config")
        assert config.op_name_configs == dict.fromkeys(tables)
    keep_tables_uncompressed(cm.pass_pipeline(ct, "none"), step)  # no compression pass: nothing to change


# ---------------------------------------------------------------- the lint, on op lists
def _op(kind, dtype=10, dims=(1, 32, 1, 8), const=None):
    return {"type": kind, "outputs": [(dtype, list(dims))], "const_inputs": const or {}}


def test_lint_rules():
    assert op_reason(_op("conv")) is None
    assert op_reason(_op("mul")) is None  # a bounded square (x/max)² is a mul: allowed
    assert "fp32" in op_reason(_op("softmax", 11))
    assert "not an ANE op" in op_reason(_op("argsort", 23))
    assert "not an ANE op" in op_reason(_op("cumsum"))
    assert "int/bool" in op_reason(_op("greater_equal", 1))
    assert "overflow" in op_reason(_op("square"))
    assert "dynamic slice" in op_reason(_op("slice_by_index", const={"x": False, "begin": False, "end": True}))
    assert op_reason(_op("slice_update", const={"x": False, "update": False, "begin": True, "end": True})) is None
    assert "16384" in op_reason(_op("reshape", dims=(1, 3, 65536)))
    assert state_findings([{"name": "k", "shape": [2, 160, 1, 128]}]) == []
    assert state_findings([{"name": "k", "shape": [2, 130, 1, 128]}])
    ok = lint_function("decoder_step", "scale_0", [_op("const"), _op("conv"), _op("softmax")], [], True)
    assert (ok.ops, ok.on_ane, ok.findings) == (2, 2, [])
    bad = lint_function("decoder_step", "scale_0", [_op("conv"), _op("cumsum", 11)], [], True)
    cpu = lint_function("fhat_update", "scale_0", [_op("gather", 11)], [], False)
    m = {"graphs": {"decoder_step": {"format": "coreml"}}}
    assert strict_failures(m, [ok, cpu]) == []
    assert len(strict_failures(m, [ok, bad, cpu])) == 1
    assert strict_failures({"graphs": {"decoder_step": {"format": "onnx"}}}, [])


def test_host_sampled_manifests_are_version_2_and_older_ones_still_load(tmp_path):
    from evar.contract import ManifestError, load_artifact
    from evar.files import read_versioned_json
    from evar.contract import FORMAT, FORMAT_VERSION

    assert FORMAT_VERSION == 3  # 3: Distilled Decoding artifacts (family dd), scale split / token pruning
    path = tmp_path / "manifest.json"
    for version, ok in ((1, True), (2, True), (3, True), (4, False)):
        path.write_text(json.dumps({"format": FORMAT, "format_version": version}))
        if ok:
            assert read_versioned_json(path, FORMAT, FORMAT_VERSION, "artifact manifest", ManifestError)
        else:
            with pytest.raises(ManifestError, match="newer EVAR"):
                load_artifact(tmp_path)


# ---------------------------------------------------------------- artifacts (coremltools conversions: slow)
def _opt_in(request):
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:  # the project's config does not deselect slow tests by itself
        pytest.skip("opt-in: pytest -m slow (Core ML conversions take minutes on a shared machine)")


def _two_scale_model():
    return few_scale_model((1, 2))


@pytest.mark.slow
def test_ane_artifact_passes_strict_lint_and_default_fails(request, tmp_path):
    _opt_in(request)
    pytest.importorskip("coremltools")
    from evar.contract import load_artifact
    from evar.errors import EvarError
    from evar.export.artifact import build_coreml
    from evar.export.coreml import CoremlOptions
    from evar.export.inspect import report, strict_ane

    model = _two_scale_model()
    ane, default = tmp_path / "ane", tmp_path / "default"
    result = build_coreml(model, "tests:tiny2", ane, CoremlOptions(target="ane", batch=2, top_k=TOP_K, top_p=TOP_P))
    m = load_artifact(ane, verify_hashes=True).data
    assert result["parity"].passed and m["format_version"] == 2 and m["sampling"]["where"] == "host"
    assert set(m["graphs"]) == {"decoder_step", "fhat_update", "vqvae_decoder"}
    assert m["graphs"]["fhat_update"]["compute_units"] == "cpu_only"
    assert m["kv_cache"]["padded_length"] == 32 and all(
        d % 32 == 0 for t in m["graphs"]["decoder_step"]["functions"][0]["states"] for d in t["shape"][1:] if d != 1)
    strict_ane(ane)  # zero findings in the transformer and decoder functions
    assert "decoder_step/scale_1: " in report(ane) and "(CPU by design: not judged)" in report(ane)
    build_coreml(model, "tests:tiny2", default, CoremlOptions(batch=2, top_k=TOP_K, top_p=TOP_P))
    assert load_artifact(default).data["format_version"] == 1  # what older readers read
    with pytest.raises(EvarError, match="strict-ane.*decoder_step/scale_0.*fp32"):
        strict_ane(default)


@pytest.mark.slow
def test_ios17_artifact_has_no_multifunction_package(request, tmp_path):
    _opt_in(request)
    ct = pytest.importorskip("coremltools")
    from evar.contract import load_artifact
    from evar.export.artifact import build_coreml
    from evar.export.coreml import CoremlOptions
    from evar.export.inspect import report

    out = tmp_path / "ios17"
    assert build_coreml(_two_scale_model(), "tests:tiny2", out, CoremlOptions(target="iOS17", batch=1))["parity"].passed
    m = load_artifact(out, verify_hashes=True).data
    packages = sorted({f["path"].split(".mlpackage")[0] + ".mlpackage" for f in m["files"]})
    assert packages == ["decoder_step/scale_0.mlpackage", "decoder_step/scale_1.mlpackage", "vqvae_decoder.mlpackage"]
    for p in packages:
        assert not list(ct.utils.load_spec(str(out / p)).description.functions)  # a plain, single-function model
    assert [f["file"] for f in m["graphs"]["decoder_step"]["functions"]] == packages[:2]
    assert "scale_1" in report(out)


def test_runtime_follows_a_host_sampled_manifest(monkeypatch, tmp_path, ready):
    """`evar-bench --device ane` on a host-sampled artifact: the Core ML backend is chosen by the manifest's
    sampling.where, loads fhat_update on the CPU whatever the device, and its loop (steps → host draws →
    fhat_update → decoder) gives `generate`'s tokens. Core ML prediction needs macOS, so coremltools' MLModel
    is replaced by the PyTorch wrappers it was converted from (fp32): what is checked is the runtime's wiring."""
    ct = pytest.importorskip("coremltools")
    import platform

    from evar import contract
    from evar.export.artifact import _base
    from evar.export.ane_export import ane_manifest
    from evar.export.coreml import CoremlOptions
    from evar.export.interface import StepInterface
    from evar.runtime import Generator

    c = ready.config.var
    batch = 2
    steps = ane_steps(ready, batch)
    modules = {"decoder_step": steps, "fhat_update": [FhatUpdate(ready, si) for si in range(c.num_scales)],
               "vqvae_decoder": [AneDecoder(ready)]}
    iface = AneInterface(ready.config, batch)
    manifest = ane_manifest(iface, CoremlOptions(target="ane", batch=batch, top_k=TOP_K, top_p=TOP_P),
                            _base(ready, "coreml", "tests:tiny", None, StepInterface(ready.config, "coreml", "state", batch)), 1.5)
    for graph in manifest["graphs"].values():
        (tmp_path / graph["file"]).mkdir()
        (tmp_path / graph["file"] / "Manifest.json").write_text("{}")
    contract.write(tmp_path, {**manifest, "parity": {"passed": True, "checks": [], "skipped": []}})
    loaded_units = {}

    class FakeModel:
        def __init__(self, path, compute_units, function_name=None):
            self.role = next(r for r in modules if path.endswith(f"{r}.mlpackage"))
            self.index = int(function_name.removeprefix("scale_")) if function_name else 0
            fn = contract.load_artifact(tmp_path).function(self.role, None if self.role == "vqvae_decoder" else self.index)
            self.fn = fn
            loaded_units[(self.role, self.index)] = compute_units

        def make_state(self):
            pt_reset = [b for n, b in steps[0].named_buffers() if n.startswith(("key_cache", "value_cache"))]
            for b in pt_reset:
                b.zero_()
            return "state"

        def predict(self, feeds, state=None):
            assert (state is not None) == (self.role == "decoder_step")
            args = [torch.from_numpy(np.asarray(feeds[t["name"]]).astype(np.float32 if "float" in t["dtype"] else np.int32))
                    for t in self.fn["inputs"]]
            with torch.no_grad():
                out = modules[self.role][self.index](*args)
            return {self.fn["outputs"][0]["name"]: out.numpy()}

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(ct.models, "MLModel", FakeModel)
    gen = Generator(tmp_path, backend="ane")
    assert gen.backend.stage_units == {"decoder_step": "cpuAndNeuralEngine", "fhat_update": "cpuOnly",
                                       "vqvae_decoder": "cpuAndNeuralEngine", "sampling": "host"}
    assert loaded_units[("fhat_update", 1)] == ct.ComputeUnit.CPU_ONLY
    assert loaded_units[("decoder_step", 1)] == ct.ComputeUnit.CPU_AND_NE
    labels = np.array([3, 8])
    for top_k, top_p in ((None, None), (0, 0.0)):  # the host samples: other filters than the defaults are allowed
        out = gen.generate(labels, seed=5, cfg=CFG, top_k=top_k, top_p=top_p)
        ref = generate(ready.var, ready.vqvae, torch.from_numpy(labels), guidance=CFG, top_k=TOP_K if top_k is None else top_k,
                       top_p=TOP_P if top_p is None else top_p, seed=5)
        for a, b in zip(out.tokens, ref.tokens):
            np.testing.assert_array_equal(a, b.numpy())


def test_bad_ane_inputs_are_one_line(tmp_path):
    """--target ane with fp32, and --strict-ane on a folder that is no artifact: exit 2, one line, nothing written."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    export = [sys.executable, "-m", "evar.export.cli"]
    cases = [(["coreml", "--model", "builtin:digits", "--target", "ane", "--precision", "fp32", "--out", str(tmp_path / "o")],
              "fp16"),
             (["coreml", "--model", "builtin:digits", "--target", "iOS16", "--out", str(tmp_path / "o")], "ane"),
             (["inspect", str(tmp_path), "--strict-ane"], "not an EVAR artifact")]
    for args, word in cases:
        proc = subprocess.run(export + args, capture_output=True, text=True, env=env, timeout=300)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert word in err, err
    assert not (tmp_path / "o").exists()
