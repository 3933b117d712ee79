"""Token pruning and CFG trimming in one artifact (`evar-export onnx --token-keep 3:0.5 --cfg-until-scale N`):
PyTorch trims the carried update map with the KV cache; the graphs the recipe names (an unguided pruned graph of
B rows from N on) give the tokens of `generate(..., cfg_until_scale=N, token_keep=counts)` whether N comes before,
at or after the cache scale; int8 composes; a scale split with token pruning is refused in one line."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from evar.models.decoding import generate
from tests.conftest import tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from evar.contract import (PRUNED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH, STEP_GRAPH,  # noqa: E402
                           UNGUIDED_STEP_GRAPH, load_artifact)
from evar.contract.recipe import Recipe  # noqa: E402
from evar.export.artifact import build_onnx  # noqa: E402
from evar.export.onnx import OnnxOptions  # noqa: E402
from evar.runtime.generator import Generator  # noqa: E402

KEEP, COUNTS, CACHE = "3:0.5", {3: 8}, 2  # scale 3 (4×4) keeps 8 of 16 tokens; scale 2 fills the cache
TOP_K, TOP_P = 40, 0.9
LABELS = np.array([2, 5, 9])
B = len(LABELS)


def _gen(model, cfg, counts, n=None, **kw):
    return generate(model.var, model.vqvae, torch.from_numpy(LABELS), guidance=cfg, top_k=TOP_K, top_p=TOP_P, seed=7,
                    token_keep=counts, cfg_until_scale=n, **kw)


# ---------------------------------------------------------------- PyTorch
@pytest.mark.parametrize("counts", [{2: 5, 3: 7}, COUNTS])  # cache scale 1, then 2
@pytest.mark.parametrize("n", [1, 2, 3])
def test_pytorch_trims_the_pruned_scales_too(counts, n):
    """From N on B rows run; before N the tokens are the untrimmed ones; at N the conditional rows see exactly what
    they saw untrimmed (the KV cache and the update map cut to rows [0, B))."""
    m = tiny_model()
    kept, both = _gen(m, 2.0, counts, keep_logits=True), _gen(m, 2.0, counts, n, keep_logits=True)
    S = m.config.var.num_scales
    assert [len(lg) for lg in both.scale_logits] == [2 * B] * n + [B] * (S - n)
    assert all(torch.equal(a, b) for a, b in zip(kept.tokens[:n], both.tokens[:n]))
    assert torch.allclose(both.scale_logits[n], kept.scale_logits[n][:B], atol=1e-5)


def test_pytorch_guidance_zero_trimmed_equals_untrimmed():
    m = tiny_model()
    a, b = _gen(m, 0.0, COUNTS), _gen(m, 0.0, COUNTS, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)) and torch.equal(a.images, b.images)


def test_recipe_roles_for_every_order_of_n_and_the_cache_scale():
    roles = {n: [Recipe(4, cfg_until_scale=n, cache_scale=CACHE).role(si) for si in range(4)] for n in (1, 2, 3)}
    assert roles[1] == [STEP_GRAPH, UNGUIDED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH]
    assert roles[2] == [STEP_GRAPH, STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH]
    assert roles[3] == [STEP_GRAPH, STEP_GRAPH, PRUNED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH]


def test_pytorch_token_keep_before_the_split_is_one_clear_error():
    from evar.errors import EvarError

    m = tiny_model()
    with pytest.raises(EvarError, match="after --split-scale 2"):
        _gen(m, 1.5, {2: 5}, early=m.var, split_scale=2)
    assert len(_gen(m, 1.5, COUNTS, 3, early=m.var, split_scale=2).tokens) == 4  # pruned after the split: runs


# ---------------------------------------------------------------- one artifact
@pytest.fixture(scope="module", params=[1, 2, 3], ids=["before", "at", "after"])  # N vs the cache scale 2
def artifact(request, tmp_path_factory):
    n = request.param
    out = tmp_path_factory.mktemp(f"keeptrim{n}") / "art"
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(top_k=TOP_K, top_p=TOP_P, token_keep=KEEP,
                                                             cfg_until_scale=n))
    return n, out


def test_manifest_names_the_recipe_graphs_and_parity_passed(artifact):
    n, out = artifact
    a = load_artifact(out, verify_hashes=True)
    assert a.data["format_version"] == 3 and a.cfg_until_scale == n and a.token_keep == COUNTS and a.cache_scale == CACHE
    want = set(Recipe(4, cfg_until_scale=n, cache_scale=CACHE).roles())
    assert set(a.data["graphs"]) - {"vqvae_decoder"} == want  # only the graphs the recipe runs
    g = a.data["generation"]
    assert g["pruned_unguided_graph"] == PRUNED_UNGUIDED_STEP_GRAPH
    assert ("pruned_graph" in g) == (n > CACHE) and ("unguided_graph" in g) == (n < CACHE)
    assert [f["scale_index"] for f in a.graph(PRUNED_UNGUIDED_STEP_GRAPH)["functions"]] == list(range(max(n, CACHE), 4))
    label = f"token keep 3:8, cfg trimmed at {n}: "
    checks = [c for c in a.data["parity"]["checks"] if c["name"].startswith(label)]
    assert {c["name"][len(label):].split(":")[0] for c in checks} == {"wrappers vs generate",
                                                                      "onnx vs generate (end to end)"}
    assert checks and all(c["passed"] for c in checks)


def test_unguided_pruned_graph_has_b_row_static_shapes(artifact):
    _, out = artifact
    a = load_artifact(out)
    fn = a.function(PRUNED_UNGUIDED_STEP_GRAPH, 3)
    ins = {t["name"]: t for t in fn["inputs"]}
    assert "cfg" not in ins and ins["cached_hidden"]["shape"][0] == "batch"
    assert ins["past_key_values.0.key"]["shape"][0] == "batch" and fn["token_range"] == [14, 22]  # 1+4+9 past, K = 8
    sess = ort.InferenceSession(str(a.graph_path(PRUNED_UNGUIDED_STEP_GRAPH)), providers=["CPUExecutionProvider"])
    assert "cfg" not in {i.name for i in sess.get_inputs()}
    rs, dims, feeds = np.random.default_rng(0), {"batch": B}, {}
    for t in fn["inputs"]:
        shape = [dims.get(d, d) for d in t["shape"]]
        feeds[t["name"]] = {"labels": LABELS, "scale_index": np.array([3]), "keep_count": np.array([8])}.get(
            t["role"], rs.random(shape).astype(np.float32))
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for t in fn["outputs"]:
        assert list(outs[t["name"]].shape) == [dims.get(d, d) for d in t["shape"]], t["name"]
    assert outs["present.0.key"].shape[:3] == (B, 2, 22) and outs["hidden"].shape[:2] == (B, 16)


@pytest.mark.parametrize("cfg", [0.0, 1.5])
@pytest.mark.parametrize("backend,io_binding", [("cpu", True), ("cpu", False), ("torch-cpu", True)])
def test_runtime_tokens_equal_pytorch_of_the_same_recipe(artifact, cfg, backend, io_binding):
    n, out = artifact
    model = tiny_model()
    gen = Generator(out, backend, threads=1, io_binding=io_binding, model=model if backend == "torch-cpu" else None)
    got = gen.generate(LABELS, seed=7, cfg=cfg)
    ref = _gen(model, cfg, COUNTS, n)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(got.tokens, ref.tokens))
    if cfg:  # and the recipe mattered: other tokens than token pruning alone
        assert not all(np.array_equal(a, b.numpy()) for a, b in zip(got.tokens, _gen(model, cfg, COUNTS).tokens))


def test_cost_counts_kept_tokens_on_one_row_at_trimmed_pruned_scales():
    from evar.runtime import cost

    var = tiny_model().config.to_dict()["var"]
    both = cost.generation_macs(var, cfg_until_scale=3, token_keep=COUNTS)
    assert both["per_scale"][3] == cost.step_macs(var, 3, cfg_rows=1, keep=8, past=14)["total"]
    assert both["per_scale"][2] == cost.step_macs(var, 2, keep=9, past=5)["total"]
    assert both["total"] < cost.generation_macs(var, token_keep=COUNTS)["total"]


# ---------------------------------------------------------------- int8, and what stays refused
def test_int8_composes_with_token_pruning_and_trimming(tmp_path):
    out = tmp_path / "art"
    build_onnx(tiny_model(), "tests:tiny", out, OnnxOptions(simplify=False, quantize="int8", token_keep=KEEP,
                                                            cfg_until_scale=3))
    a = load_artifact(out)
    for role in (STEP_GRAPH, PRUNED_STEP_GRAPH, PRUNED_UNGUIDED_STEP_GRAPH):
        ops = {n.op_type for n in onnx.load(str(a.graph_path(role))).graph.node}
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, role
    gate = [c for c in a.data["parity"]["checks"] if c["name"].startswith("int8 vs fp32")]
    assert len(gate) == 2 * a.num_scales and all(c["passed"] for c in gate)
    assert Generator(out, "cpu", threads=1).generate(LABELS, seed=1).images.shape[0] == B


def test_token_keep_with_split_scale_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from evar.checkpoints import save_model_dir
    from evar.export import cli

    model_dir = save_model_dir(tiny_model(), tmp_path / "model")
    monkeypatch.setattr(sys, "argv", ["evar-export", "onnx", "--model", str(model_dir), "--out", str(tmp_path / "art"),
                                      "--token-keep", KEEP, "--early-model", str(model_dir), "--split-scale", "2"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and "split-scale" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
