"""CFG trimming (`--cfg-until-scale N`): PyTorch and exported graphs run batch B, not 2B, from scale N; tokens
equal the PyTorch reference of the same recipe; bad values are one clear line with nothing written."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from evar.errors import EvarError
from evar.models.decoding import generate
from tests.conftest import tiny_model

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from evar.contract import STEP_GRAPH, UNGUIDED_STEP_GRAPH, load_artifact  # noqa: E402
from evar.export.artifact import build_onnx  # noqa: E402
from evar.export.onnx import OnnxOptions  # noqa: E402
from evar.runtime.generator import Generator  # noqa: E402

N, TOP_K, TOP_P = 2, 40, 0.9
LABELS = np.array([2, 5, 9])


def _gen(model, cfg, n=None, **kw):
    return generate(model.var, model.vqvae, torch.from_numpy(LABELS), guidance=cfg, top_k=TOP_K, top_p=TOP_P, seed=7,
                    cfg_until_scale=n, **kw)


def test_trimmed_scales_run_batch_b_and_earlier_scales_are_unchanged():
    model = tiny_model()
    full, trimmed = _gen(model, 2.0, keep_logits=True), _gen(model, 2.0, N, keep_logits=True)
    B = len(LABELS)
    assert [len(lg) for lg in trimmed.scale_logits] == [2 * B] * N + [B] * (model.config.var.num_scales - N)
    for si in range(N):
        assert torch.equal(full.tokens[si], trimmed.tokens[si])
    # the conditional rows' raw logits at scale N see the same cache either way
    assert torch.allclose(trimmed.scale_logits[N], full.scale_logits[N][:B], atol=1e-5)


def test_guidance_zero_trimmed_equals_untrimmed():
    model = tiny_model()
    a, b = _gen(model, 0.0), _gen(model, 0.0, N)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)) and torch.equal(a.images, b.images)


@pytest.mark.parametrize("n", [0, 4, -1])
def test_out_of_range_is_an_error(n):
    with pytest.raises(EvarError, match="cfg-until-scale"):
        _gen(tiny_model(), 1.5, n)


@pytest.fixture(scope="module")
def trimmed_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("trim") / "art"
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(top_k=TOP_K, top_p=TOP_P, cfg_until_scale=N))
    return out


def test_manifest_and_unguided_graph_shapes(trimmed_artifact):
    a = load_artifact(trimmed_artifact, verify_hashes=True)
    assert a.cfg_until_scale == N and a.data["generation"]["unguided_graph"] == UNGUIDED_STEP_GRAPH
    unguided = a.graph(UNGUIDED_STEP_GRAPH)
    assert [f["scale_index"] for f in unguided["functions"]] == list(range(N, a.num_scales))
    sess_inputs = {i.name for i in onnx.load(str(a.graph_path(UNGUIDED_STEP_GRAPH))).graph.input}
    guided_inputs = {i.name for i in onnx.load(str(a.graph_path(STEP_GRAPH))).graph.input}
    assert "cfg" in guided_inputs and "cfg" not in sess_inputs
    kv = onnx.load(str(a.graph_path(UNGUIDED_STEP_GRAPH))).graph.input[-1]
    assert kv.type.tensor_type.shape.dim[0].dim_param == "batch"  # B rows, not cfg_batch
    checks = [c for c in a.data["parity"]["checks"] if c["name"].startswith("cfg trimmed")]
    assert checks and all(c["passed"] for c in checks)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
@pytest.mark.parametrize("backend", ["cpu", "torch-cpu"])
def test_runtime_tokens_equal_pytorch_of_the_same_recipe(trimmed_artifact, cfg, backend):
    model = tiny_model()
    out = Generator(trimmed_artifact, backend, threads=1, model=model if backend == "torch-cpu" else None).generate(
        LABELS, seed=7, cfg=cfg)
    ref = _gen(model, cfg, N)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(out.tokens, ref.tokens))
    if cfg == 0:  # guidance 0: exactly the untrimmed reference
        plain = _gen(model, 0.0)
        assert all(np.array_equal(a, b.numpy()) for a, b in zip(out.tokens, plain.tokens))


def test_int8_composes_with_trimming(tmp_path):
    out = tmp_path / "art"
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(simplify=False, quantize="int8", cfg_until_scale=N))
    a = load_artifact(out)
    for role in (STEP_GRAPH, UNGUIDED_STEP_GRAPH):
        ops = {n.op_type for n in onnx.load(str(a.graph_path(role))).graph.node}
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, role
    assert Generator(out, "cpu", threads=1).generate(LABELS, seed=1).images.shape[0] == 3


@pytest.mark.parametrize("n", ["0", "4"])
def test_bad_cfg_until_scale_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, n):
    from evar.export import cli
    from evar.checkpoints import save_model_dir

    model_dir = save_model_dir(tiny_model(), tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["evar-export", "onnx", "--model", str(model_dir), "--out", str(tmp_path / "art"),
                                      "--cfg-until-scale", n])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "cfg-until-scale" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_trimmed_macs_count_one_row_from_the_trimmed_scale(trimmed_artifact):
    from evar.runtime import cost

    var = load_artifact(trimmed_artifact).var
    full, trimmed = cost.generation_macs(var), cost.generation_macs(var, cfg_until_scale=N)
    assert trimmed["per_scale"][:N] == full["per_scale"][:N]
    one_row = [cost.step_macs(var, si, cfg_rows=1)["total"] for si in range(N, len(var["patch_nums"]))]
    assert trimmed["per_scale"][N:] == one_row and trimmed["total"] < full["total"]
