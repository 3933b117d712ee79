"""Structured pruning: surgery, criteria, OBS algebra, schedules, the pipeline and its outputs."""
import json

import pytest
import torch

from evar.checkpoints import load_model_dir
from evar.config import VARConfig
from evar.errors import EvarError
from evar.models.decoding import generate
from evar.prune import PruneRecipe, prune_model, save_pruned
from evar.prune.blockwise import BlockPruner, Kept, sequential_block
from evar.prune.calibrate import calibration, null_share
from evar.prune.criteria import Group, Magnitude, Taylor, make_criterion
from evar.prune.obs import HessianAccumulator, ffn_chunks, obs_prune
from evar.prune.report import var_macs, var_params
from evar.prune.schedule import Schedule, block_targets, step_amount
from evar.prune.sequential import ActivationStream, Capture, swapped
from tests.conftest import tiny_model

FAST = dict(calib_samples=12, calib_batch=4)


def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config.var
    tokens = [torch.randint(0, c.vocab_size, (3, pn * pn), generator=g) for pn in c.patch_nums]
    with torch.no_grad():
        return model.var(torch.tensor([1, 4, c.num_classes]), model.vqvae.idx_to_var_input(tokens))


# ---------------------------------------------------------------- surgery and the pipeline
@pytest.mark.parametrize("method", ["magnitude", "taylor", "obs"])
def test_shapes_really_shrink_and_generation_runs(method):
    model = tiny_model()
    result = prune_model(model, PruneRecipe(sparsity=0.4, method=method, **FAST), progress=False)
    c, var = result.model.config.var, result.model.var
    assert c.num_heads == (1, 1, 2) and c.ffn_dims == (77, 58, 38)  # round(H·0.4), round(F·0.4) removed
    for i, block in enumerate(var.blocks):
        a = c.num_heads[i] * c.head_dim
        assert block.attn.mat_qkv.weight.shape == (3 * a, c.embed_dim)
        assert block.attn.q_bias.shape == block.attn.v_bias.shape == block.attn.zero_k_bias.shape == (a,)
        assert block.attn.scale_mul_1H11.shape == (1, c.num_heads[i], 1, 1)
        assert block.attn.proj.weight.shape == (c.embed_dim, a)
        assert block.ffn.fc1.weight.shape == (c.ffn_dims[i], c.embed_dim)
        assert block.ffn.fc2.weight.shape == (c.embed_dim, c.ffn_dims[i])
    gen = generate(var, result.model.vqvae, torch.tensor([0, 3]), guidance=1.5, top_k=10)
    assert torch.isfinite(gen.images).all() and gen.images.shape == (2, 3, 8, 8)
    assert result.report["params"]["after"] == sum(p.numel() for p in var.parameters())


@pytest.mark.parametrize("method", ["magnitude", "obs"])
def test_sparsity_zero_is_the_identity(method):
    model = tiny_model()
    dense = _logits(model)
    result = prune_model(model, PruneRecipe(sparsity=0.0, method=method, **FAST), progress=False)
    assert result.model.config.var.num_heads == (2, 1, 3)
    assert torch.equal(_logits(result.model), dense)


def test_heads_only_ffn_only_and_iterative_steps():
    heads = prune_model(tiny_model(), PruneRecipe(sparsity=0.4, method="magnitude", ffn=False), progress=False)
    assert heads.model.config.var.num_heads == (1, 1, 2) and heads.model.config.var.ffn_dims == (128, 96, 64)
    ffn = prune_model(tiny_model(), PruneRecipe(sparsity=0.4, method="magnitude", heads=False), progress=False)
    assert ffn.model.config.var.num_heads == (2, 1, 3) and ffn.model.config.var.ffn_dims == (77, 58, 38)
    spared = prune_model(tiny_model(), PruneRecipe(sparsity=0.3, method="magnitude", head_sparsity=0.0), progress=False)
    assert spared.model.config.var.num_heads == (2, 1, 3) and spared.model.config.var.ffn_dims == (70, 58, 16)
    assert spared.report["recipe"]["head_sparsity"] == 0.0
    steps = prune_model(tiny_model(), PruneRecipe(sparsity=0.4, method="obs", iterative_steps=3, **FAST),
                        progress=False)
    assert steps.model.config.var.ffn_dims == (77, 58, 38)  # the steps add up to the one-shot amounts


def test_sequential_stream_equals_the_pruned_block():
    """Replay/Skip shortcuts give exactly what the pruned block computes on the same inputs."""
    model = tiny_model()
    recipe = PruneRecipe(sparsity=0.4, **FAST)
    stream = ActivationStream(model.var, calibration(model, recipe), recipe.calib_batch)
    x0 = stream.x.clone()
    block = model.var.blocks[0]
    pruner = BlockPruner(make_criterion("obs"), Kept([[0, 1], [0], [0, 1, 2]], [128, 96, 64]))
    sequential_block(pruner, 0, block, stream, (1, 51), slice(0, 30), last=False)
    assert block.attn.num_heads == 1 and block.ffn.fc1.out_features == 77
    with torch.no_grad():
        expected, _ = block(x0, stream.cond, model.var.attn_bias_for_masking)
    torch.testing.assert_close(stream.x, expected, rtol=1e-5, atol=1e-5)


def test_pruned_directory_round_trip(tmp_path):
    result = prune_model(tiny_model(), PruneRecipe(sparsity=0.4, **FAST), parent="tiny", progress=False)
    save_pruned(result, tmp_path / "p")
    loaded = load_model_dir(tmp_path / "p")
    assert loaded.config.var.num_heads == (1, 1, 2) and loaded.config.var.ffn_dims == (77, 58, 38)
    assert torch.equal(_logits(loaded), _logits(result.model))
    prov = loaded.config.provenance
    assert prov["parent"] == "tiny" and prov["recipe"]["method"] == "obs" and prov["recipe"]["sparsity"] == 0.4
    assert prov["blocks"] == {"num_heads": [1, 1, 2], "ffn_dims": [77, 58, 38]}
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs_per_image"]["after"] < report["macs_per_image"]["before"]
    assert [len(b["kept_heads"]) for b in report["blocks"]] == [1, 1, 2]
    assert {"calibration", "pruning", "total"} <= set(report["seconds"])


@pytest.mark.parametrize("kw, message", [
    (dict(sparsity=1.0), "--sparsity must be in"),
    (dict(sparsity=-0.1), "--sparsity must be in"),
    (dict(sparsity=0.5), "remove all 1 attention head"),  # block 1 has one head: round(1·0.5) = 1
    (dict(sparsity=0.3, method="wanda"), "unknown pruning method 'wanda'"),
    (dict(sparsity=0.3, calib_scale="7"), "--calib-scale 7"),
    (dict(sparsity=0.3, schedule="cosine"), "unknown schedule"),
    (dict(sparsity=0.3, calib_precision="fp16"), "unknown calibration precision 'fp16'"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, kw, message):
    from typer.testing import CliRunner

    from evar.checkpoints import save_model_dir
    from evar.apps.cli import app

    with pytest.raises(EvarError, match=message):
        save_pruned(prune_model(tiny_model(), PruneRecipe(**kw), progress=False), tmp_path / "out")
    save_model_dir(tiny_model(), tmp_path / "model")
    args = ["prune", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "cli")] + [
        a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, EvarError) and message.split("'")[0] in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no temp dir left behind


# ---------------------------------------------------------------- criteria
def _row_col_disagree() -> tuple[torch.Tensor, torch.Tensor]:
    """A weight whose smallest input column (3) and smallest output row (0) differ."""
    w = torch.tensor([[0.1, 0.1, 0.1, 0.5],
                      [5.0, 4.0, 3.0, 0.2],
                      [5.0, 4.0, 3.0, 0.2],
                      [5.0, 4.0, 3.0, 0.2]])
    assert w.abs().sum(0).argmin() == 3 and w.abs().sum(1).argmin() == 0
    return w, torch.ones_like(w)


@pytest.mark.parametrize("kind", ["param_first", "param_second", "param_mix"])
def test_taylor_scores_index_input_columns(kind):
    """The upstream bug summed per output row and used rows as column indices: it would remove column 0."""
    w, g = _row_col_disagree()
    crit = Taylor(kind)
    removal = crit(Group.single("fc2", w, size=1, n_remove=1, grad=g * 0.1, grad_sq=g))
    assert removal.units == [3]
    scores = crit.scores(Group.single("proj", w, size=2, n_remove=1, grad=g * 0.1, grad_sq=g))
    assert scores.shape == (2,) and int(scores.argmin()) == 1  # head 1 = columns 2, 3


def test_magnitude_scores_input_columns_per_head():
    w, _ = _row_col_disagree()
    assert Magnitude()(Group.single("fc2", w, 1, 1)).units == [3]
    assert torch.allclose(Magnitude().scores(Group.single("proj", w, 2, 1)), torch.tensor([27.2, 10.2]))


# ---------------------------------------------------------------- OBS algebra
def _correlated(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix  # correlated columns: compensation has something to use
    w = torch.randn(6, d, generator=g)
    acc = HessianAccumulator(d)
    acc.add(x)
    return x.double(), w, acc.matrix()


def _out_err(x, w, w_hat):
    return float(((x @ (w.double() - w_hat.double()).T) ** 2).sum())


def test_obs_error_and_update_are_the_closed_form():
    """With no damping, the predicted error is the layer's real output error, (2/n)·||ΔY||², and it is the
    least-squares optimum over the surviving columns."""
    x, w, h = _correlated()
    res = obs_prune(w, h.double(), size=3, n_remove=2, percdamp=0.0, dtype=torch.float64)
    assert abs(res.error - 2 / len(x) * _out_err(x, w, res.weight)) < 1e-6 * max(res.error, 1)
    keep = [c for c in range(12) if c // 3 not in res.removed]
    best = torch.linalg.lstsq(x[:, keep], x @ w.double().T).solution.T  # refit of the survivors
    w_best = torch.zeros(6, 12, dtype=torch.float64)
    w_best[:, keep] = best
    assert _out_err(x, w, res.weight) == pytest.approx(_out_err(x, w, w_best), rel=1e-6)


def test_obs_picks_the_cheapest_head():
    x, w, h = _correlated(seed=1)
    res = obs_prune(w, h.double(), size=3, n_remove=1, percdamp=0.0, dtype=torch.float64)
    costs = []
    for head in range(4):
        keep = [c for c in range(12) if c // 3 != head]
        fit = torch.linalg.lstsq(x[:, keep], x @ w.double().T).solution.T
        w_hat = torch.zeros(6, 12, dtype=torch.float64)
        w_hat[:, keep] = fit
        costs.append(_out_err(x, w, w_hat))
    assert res.removed == [min(range(4), key=costs.__getitem__)]


def test_obs_compensation_lowers_every_pruned_layers_error():
    """On the tiny model's real calibration inputs, layer by layer: OBS-compensated vs plain removal."""
    model = tiny_model()
    recipe = PruneRecipe(sparsity=0.4, **FAST)
    stream = ActivationStream(model.var, calibration(model, recipe), recipe.calib_batch)
    for block in model.var.blocks:
        for parent, name, size in ((block.attn, "proj", block.attn.head_dim), (block.ffn, "fc2", 1)):
            layer, stash = getattr(parent, name), []
            capture = Capture(layer, slice(None), stash, stop=False)
            with swapped(parent, name, capture):
                stream.run(block, write=False)
            x = torch.cat(stash).flatten(0, 1).double()
            n_groups = layer.in_features // size
            n_remove = round(n_groups * 0.4)
            if not 0 < n_remove < n_groups:
                continue
            w = layer.weight.detach()
            comp = obs_prune(w, capture.hessian.matrix(), size, n_remove, compensate=True)
            plain = obs_prune(w, capture.hessian.matrix(), size, n_remove, compensate=False)
            assert comp.removed == plain.removed  # --no-compensate: same selection
            cut = plain.weight.clone()
            cut[:, [g * size + j for g in plain.removed for j in range(size)]] = 0
            assert _out_err(x, w, comp.weight) < _out_err(x, w, cut)
        stream.run(block, write=True)


def test_ffn_chunks():
    assert sum(ffn_chunks(1638)) == 1638 and ffn_chunks(1638)[0] == 563
    assert ffn_chunks(51) == [51] and all(64 <= k <= 1024 for k in ffn_chunks(2000)[:-1])


# ---------------------------------------------------------------- schedules and counts
def test_schedules_give_the_intended_per_block_amounts():
    arch = VARConfig.uniform(depth=16, embed_dim=1024, heads=16)
    uniform = block_targets(arch, Schedule("uniform", 0.4))
    assert {(t.heads, t.units) for t in uniform} == {(6, 1638)}
    inc = Schedule("log_increase", 0.35, 0.1, 0.5).per_block(16)
    assert inc[0] == pytest.approx(0.1) and inc[-1] == pytest.approx(0.5)
    assert all(a <= b for a, b in zip(inc, inc[1:])) and sum(inc) / 16 == pytest.approx(0.35)
    dec = Schedule("log_decrease", 0.35, 0.1, 0.5).per_block(16)
    assert dec == pytest.approx(inc[::-1])
    targets = block_targets(arch, Schedule("log_increase", 0.35, 0.1, 0.5))
    assert targets[0].heads == 2 and targets[-1].heads == 8 and targets[-1].units == 2048
    with pytest.raises(EvarError, match="cannot be the mean"):
        Schedule("log_increase", 0.49, 0.1, 0.5).per_block(16)
    assert [step_amount(1638, k, 3) for k in (1, 2, 3)] == [546, 546, 546]
    assert sum(step_amount(7, k, 4) for k in range(1, 5)) == 7


def test_head_sparsity_moves_the_cut_to_the_ffn_at_the_same_weight_share():
    arch = VARConfig.official(16)  # 16 heads of 64, FFN 4096: a head weighs as much as 128 units
    targets = block_targets(arch, Schedule("uniform", 0.4), head_sparsity=0.25)
    assert {(t.heads, t.units) for t in targets} == {(4, 1946)}  # 0.4·(16·128 + 4096) − 4·128 = 1945.6
    kept = arch.with_blocks(tuple(h - t.heads for h, t in zip(arch.num_heads, targets)),
                            tuple(f - t.units for f, t in zip(arch.ffn_dims, targets)))
    block = lambda a, i: 4 * a.embed_dim * a.head_dim * a.num_heads[i] + 2 * a.embed_dim * a.ffn_dims[i]
    assert 1 - block(kept, 0) / block(arch, 0) == pytest.approx(0.4, abs=1e-3)
    # where H·s is whole, the head's own share equal to --sparsity is the uniform cut
    assert block_targets(arch, Schedule("uniform", 0.25), head_sparsity=0.25) == \
        block_targets(arch, Schedule("uniform", 0.25))
    with pytest.raises(EvarError, match="more than --sparsity"):
        block_targets(arch, Schedule("uniform", 0.2), head_sparsity=0.9)


@pytest.mark.parametrize("kwargs, match", [({"head_sparsity": 1.0}, "in \\[0, 1\\)"),
                                           ({"head_sparsity": 0.2, "ffn": False}, "drop --heads-only"),
                                           ({"head_sparsity": -0.1}, "in \\[0, 1\\)")])
def test_head_sparsity_bad_values_fail_before_loading(kwargs, match):
    with pytest.raises(EvarError, match=match):
        PruneRecipe(sparsity=0.4, **kwargs).validate()


@pytest.mark.parametrize("sparsity, millions", [(0.4, 231.0), (0.2, 271.0)])
def test_d16_param_counts_match_the_evar_table(sparsity, millions):
    arch = VARConfig.official(16)
    targets = block_targets(arch, Schedule("uniform", sparsity))
    pruned = arch.with_blocks(tuple(h - t.heads for h, t in zip(arch.num_heads, targets)),
                             tuple(f - t.units for f, t in zip(arch.ffn_dims, targets)))
    assert abs(var_params(pruned) / 1e6 - millions) / millions < 0.01


def test_macs_agree_with_torch_pruning_where_it_can_see():
    """torch-pruning's hook counter sees every nn.Linear call but not the functional fused qkv (it also counts
    LayerNorms and bias adds, which we do not: hence the tolerance)."""
    tp = pytest.importorskip("torch_pruning")
    var = tiny_model().var
    c, L = var.cfg, var.cfg.seq_len
    ops, _ = tp.utils.count_ops_and_params(var, (torch.tensor([1]), torch.zeros(1, L - 1, c.cvae)))
    qkv = sum(L * c.embed_dim * 3 * c.attn_dim(i) for i in range(c.depth))
    assert var_macs(c)["linear"] - qkv == pytest.approx(ops, rel=0.02)


def test_null_share_is_balanced_per_class():
    labels = torch.arange(40) % 10
    out = null_share(labels, 0.5, 10)
    assert int((out == 10).sum()) == 20
    assert all(int(((labels == k) & (out == 10)).sum()) == 2 for k in range(10))
    distinct = null_share(torch.arange(64), 0.5, 1000)  # one sample per class (d16 calibration)
    assert int((distinct == 1000).sum()) == 32
    assert torch.equal(null_share(labels, 0.0, 10), labels) and bool((null_share(labels, 1.0, 10) == 10).all())


@pytest.mark.parametrize("precision, sampled_in", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_calibration_samples_in_the_requested_precision(precision, sampled_in):
    """bf16 sampling (the 'auto' choice on CPUs with native bf16) gives valid, class-balanced sequences and
    is recorded; fp32 gives exactly the tokens `generate` samples."""
    model = tiny_model()
    recipe = PruneRecipe(sparsity=0.4, calib_precision=precision, calib_samples=6, calib_batch=4)
    calib = calibration(model, recipe)
    c = model.config.var
    assert calib.tokens.shape == (6, c.seq_len)
    assert 0 <= int(calib.tokens.min()) and int(calib.tokens.max()) < c.vocab_size
    if precision == "fp32":
        ref = generate(model.var, model.vqvae, torch.arange(6) % c.num_classes, guidance=1.5, top_k=900, top_p=0.96)
        assert torch.equal(calib.tokens, torch.cat(ref.tokens, dim=1))
    report = prune_model(model, recipe, progress=False).report
    assert report["calibration"]["sampled_in"] == sampled_in


def test_calib_scale_selects_one_scale():
    c = tiny_model().config.var  # patch_nums (1, 2, 3, 4): L = 30, the last scale is tokens 14..30
    assert PruneRecipe(0.3, calib_scale="last").token_range(c) == slice(14, 30)
    assert PruneRecipe(0.3, calib_scale="1").token_range(c) == slice(1, 5)
    assert PruneRecipe(0.3).token_range(c) == slice(0, 30)


def test_shared_adaln_and_no_l2_norm_variants_prune():
    """d36-style shared AdaLN (block condition (B, 1, 6, C)) and attention without the per-head temperature."""
    model = tiny_model(shared_aln=True, attn_l2_norm=False)
    result = prune_model(model, PruneRecipe(sparsity=0.4, **FAST), progress=False)
    assert result.model.config.var.num_heads == (1, 1, 2)
    assert not hasattr(result.model.var.blocks[0].attn, "scale_mul_1H11")
    assert torch.isfinite(_logits(result.model)).all()


# ---------------------------------------------------------------- resuming
@pytest.mark.parametrize("blocks_done, resumed_at", [(1, {"step": 1, "block": 1}), (4, {"step": 2, "block": 1})])
def test_interrupted_obs_prune_resumes_to_the_same_weights(tmp_path, monkeypatch, blocks_done, resumed_at):
    from evar.prune import blockwise
    from evar.prune.resume import PROGRESS_FILE, PruneCheckpoint, checkpoint_for

    recipe = PruneRecipe(sparsity=0.4, iterative_steps=2, **FAST)
    uninterrupted = prune_model(tiny_model(), recipe, progress=False).model.var.state_dict()
    checkpoint = checkpoint_for(tmp_path / "out", tiny_model(), recipe, "tests:tiny")
    assert checkpoint.dir == PruneCheckpoint.beside(tmp_path / "out") == tmp_path / "out.partial"

    real, calls = blockwise.sequential_block, []

    def interrupted(*args, **kwargs):  # 3 blocks per step
        if len(calls) == blocks_done:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(blockwise, "sequential_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune_model(tiny_model(), recipe, progress=False, checkpoint=checkpoint, save_every=0)
    assert (checkpoint.dir / PROGRESS_FILE).exists()
    monkeypatch.setattr(blockwise, "sequential_block", real)
    resumed = prune_model(tiny_model(), recipe, progress=False, checkpoint=checkpoint, save_every=0)
    assert resumed.report["resumed_at"] == resumed_at
    state = resumed.model.var.state_dict()
    assert state.keys() == uninterrupted.keys() and all(torch.equal(state[k], uninterrupted[k]) for k in state)

    other = checkpoint_for(tmp_path / "out", tiny_model(), PruneRecipe(sparsity=0.2, **FAST), "tests:tiny")
    with pytest.raises(EvarError, match="progress of a different prune"):
        prune_model(tiny_model(), PruneRecipe(sparsity=0.2, **FAST), progress=False, checkpoint=other)


def test_cli_prune_leaves_no_partial_directory(tmp_path):
    from typer.testing import CliRunner

    from evar.checkpoints import save_model_dir
    from evar.apps.cli import app

    save_model_dir(tiny_model(), tmp_path / "model")
    result = CliRunner().invoke(app, ["prune", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "p"),
                                      "--sparsity", "0.4", "--calib-samples", "8", "--calib-batch", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "p"]


def test_interrupted_calibration_sampling_resumes(tmp_path, monkeypatch):
    import evar.calibration as cal
    from evar.prune import calibrate
    from evar.prune.resume import checkpoint_for

    recipe = PruneRecipe(sparsity=0.4, calib_samples=12, calib_batch=4)
    uninterrupted = calibrate.calibration(tiny_model(), recipe)
    checkpoint = checkpoint_for(tmp_path / "out", tiny_model(), recipe, "tests:tiny")
    real, parts = cal.from_generations, []

    def interrupted_after_two_batches(*args, **kwargs):
        if len(parts) == 2:
            raise KeyboardInterrupt
        parts.append(kwargs["part"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cal, "from_generations", interrupted_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        calibrate.cached_calibration(tiny_model(), recipe, checkpoint, save_every=0)
    parts.clear()
    monkeypatch.setattr(cal, "from_generations", lambda *a, **k: parts.append(k["part"]) or real(*a, **k))
    resumed = calibrate.cached_calibration(tiny_model(), recipe, checkpoint, save_every=0)
    assert parts == [(8, 12)]  # only the last batch was sampled again
    assert torch.equal(resumed.tokens, uninterrupted.tokens) and torch.equal(resumed.labels, uninterrupted.labels)
    assert sorted(p.name for p in checkpoint.dir.iterdir()) == ["calibration.pt"]


# ---------------------------------------------------------------- the same weights as before the refactor
def _digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kw, digest", [
    (dict(sparsity=0.4, method="magnitude"), "3a9a50a58ebdf0e80e85f5a53063719ff85f6c475d301998fd85ee9dc95bd341"),
    (dict(sparsity=0.3, method="magnitude", schedule="log_increase", iterative_steps=2),
     "e461865bb165de561ade85f27c4240fc80328dfacb3e88c8536e66118bf2f3cf"),
])
def test_pinned_pruned_weights(kw, digest):
    """builtin:digits pruned by magnitude gives the weights it gave before the pipeline was split into modules.
    Magnitude needs no data and only sums |W| to choose, so these digests hold on every CPU (OBS and Taylor
    recipes were compared bit for bit in the same change, on one machine: their linear algebra may round
    differently on another CPU). The digests are of the current default (version 3), taken with this same call."""
    from evar import zoo

    pruned = prune_model(zoo.load("builtin:digits"), PruneRecipe(**kw), progress=False).model
    assert _digest(pruned.var.state_dict()) == digest


def test_criteria_are_one_table_of_names():
    from evar.prune.criteria import CRITERIA, Removal, register_criterion

    assert list(CRITERIA) == ["obs", "taylor", "magnitude"]

    class Last:
        name, needs = "last", "weights"

        def __call__(self, group: Group) -> Removal:
            return Removal(list(range(group.n_units - group.n_remove, group.n_units)), [c.weight for c in group.consumers])

    register_criterion("last-units", lambda options: Last())
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_criterion("obs", lambda options: Last())
        result = prune_model(tiny_model(), PruneRecipe(sparsity=0.4, method="last-units"), progress=False)
        assert [b["kept_heads"] for b in result.report["blocks"]] == [[0], [0], [0, 1]]
    finally:
        del CRITERIA["last-units"]
