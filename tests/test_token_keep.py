"""Late-scale token pruning (`evar-export onnx --token-keep 2:0.5,3:0.4`): static shapes as stated, keep ratio 1
is the unpruned model, runtime tokens equal the PyTorch reference of the same recipe, bad values are one line."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from evar.models.decoding import generate
from evar.models.token_keep import keep_counts, parse_token_keep
from tests.conftest import TINY_PATCH_NUMS, tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from evar.contract import PRUNED_STEP_GRAPH, load_artifact  # noqa: E402
from evar.export.artifact import build_onnx  # noqa: E402
from evar.export.onnx import OnnxOptions  # noqa: E402
from evar.runtime.generator import Generator  # noqa: E402

KEEP, TOP_K, TOP_P = "2:0.5,3:0.4", 40, 0.9
LABELS = np.array([2, 5, 9])


def _gen(model, cfg, counts=None, **kw):
    return generate(model.var, model.vqvae, torch.from_numpy(LABELS), guidance=cfg, top_k=TOP_K, top_p=TOP_P, seed=7,
                    token_keep=counts, **kw)


def test_parse_and_static_counts():
    assert parse_token_keep(KEEP, TINY_PATCH_NUMS) == {2: 0.5, 3: 0.4}
    assert keep_counts({2: 0.5, 3: 0.4}, TINY_PATCH_NUMS) == {2: 5, 3: 7}  # ceil(0.5·9), ceil(0.4·16)
    assert keep_counts({3: 1.0}, TINY_PATCH_NUMS) == {3: 16}


@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_keep_ratio_one_is_the_unpruned_model(cfg):
    m = tiny_model()
    plain, kept = _gen(m, cfg), _gen(m, cfg, keep_counts({2: 1.0, 3: 1.0}, TINY_PATCH_NUMS))
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, kept.tokens))


def test_pruning_changes_only_the_pruned_scales():
    m = tiny_model()
    plain, kept = _gen(m, 1.5), _gen(m, 1.5, {3: 7})
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens[:3], kept.tokens[:3]))
    assert not torch.equal(plain.tokens[3], kept.tokens[3])


@pytest.fixture(scope="module")
def keep_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("keep") / "art"
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(top_k=TOP_K, top_p=TOP_P, token_keep=KEEP))
    return out


def test_pruned_graph_has_the_stated_static_shapes(keep_artifact):
    a = load_artifact(keep_artifact, verify_hashes=True)
    g = a.data["generation"]
    assert a.data["format_version"] == 3 and a.token_keep == {2: 5, 3: 7} and a.cache_scale == 1
    assert g["token_keep"] == {"2": 0.5, "3": 0.4} and g["pruned_graph"] == PRUNED_STEP_GRAPH
    fns = {f["scale_index"]: f for f in a.graph(PRUNED_STEP_GRAPH)["functions"]}
    assert sorted(fns) == [1, 2, 3]
    # the cache grows by 4 (scale 1 in full), then by K = 5 and 7, not by 9 and 16
    assert [fns[si]["token_range"] for si in (1, 2, 3)] == [[1, 5], [5, 10], [10, 17]]
    # run the graph at scale 3 on the declared shapes: every output has the declared static shape
    sess = ort.InferenceSession(str(a.graph_path(PRUNED_STEP_GRAPH)), providers=["CPUExecutionProvider"])
    B, rs, feeds = 2, np.random.default_rng(0), {}
    dims = {"batch": B, "cfg_batch": 2 * B}
    for t in fns[3]["inputs"]:
        shape = [dims.get(d, d) for d in t["shape"]]
        feeds[t["name"]] = {"labels": np.array([1, 2]), "scale_index": np.array([3]), "keep_count": np.array([7]),
                            "cfg": np.array([1.5], np.float32)}.get(t["role"], rs.random(shape).astype(np.float32))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for t in fns[3]["outputs"]:
        assert list(outs[t["name"]].shape) == [dims.get(d, d) for d in t["shape"]], t["name"]
    assert outs["present.0.key"].shape[2] == 17 and outs["hidden"].shape[1] == 16
    checks = [c for c in a.data["parity"]["checks"] if c["name"].startswith("token keep")]
    assert checks and all(c["passed"] for c in checks)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
@pytest.mark.parametrize("backend", ["cpu", "torch-cpu"])
def test_runtime_tokens_equal_pytorch_of_the_same_recipe(keep_artifact, cfg, backend):
    model = tiny_model()
    out = Generator(keep_artifact, backend, threads=1, model=model if backend == "torch-cpu" else None).generate(
        LABELS, seed=7, cfg=cfg)
    ref = _gen(model, cfg, {2: 5, 3: 7})
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(out.tokens, ref.tokens))


def test_int8_composes_with_token_pruning(tmp_path):
    out = tmp_path / "art"
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(simplify=False, quantize="int8", token_keep="3:0.5"))
    a = load_artifact(out)
    assert {n.op_type for n in onnx.load(str(a.graph_path(PRUNED_STEP_GRAPH))).graph.node} & {"MatMulInteger",
                                                                                              "DynamicQuantizeMatMul"}
    assert Generator(out, "cpu", threads=1).generate(LABELS, seed=1).images.shape[0] == 3


@pytest.mark.parametrize("text,what", [("3:0", "ratio"), ("3:1.5", "ratio"), ("7:0.5", "scale"), ("1:0.5", "scale"),
                                       ("3", "SCALE:RATIO"), ("3:0.5,3:0.6", "twice")])
def test_bad_token_keep_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, text, what):
    from evar.checkpoints import save_model_dir
    from evar.export import cli

    model_dir = save_model_dir(tiny_model(), tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["evar-export", "onnx", "--model", str(model_dir), "--out", str(tmp_path / "art"),
                                      "--token-keep", text])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and what in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_macs_count_the_kept_tokens_and_the_split():
    from evar.runtime import cost

    var = tiny_model().config.to_dict()["var"]
    full, kept = cost.generation_macs(var), cost.generation_macs(var, token_keep={3: 7})
    assert kept["per_scale"][:3] == full["per_scale"][:3] and kept["per_scale"][3] < full["per_scale"][3]
    assert kept["per_scale"][3] == cost.step_macs(var, 3, keep=7, past=14)["total"]
    assert cost.generation_macs(var, token_keep={3: 16}) == full  # keep everything: the same work
    same = cost.generation_macs(var, early_var=var, split_scale=2)
    assert same["per_scale"][:2] == full["per_scale"][:2] and same["total"] > full["total"]  # + the prefill
