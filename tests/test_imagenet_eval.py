"""ImageNet-style evaluation: the FID Inception layout, the scores against reference computations, the
reference file readers, and the sharded run (per-sample seeds, resume, 2 gloo ranks, bad input)."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from evar.errors import EvarError
from evar.eval import imagenet, sharded
from evar.eval.inception import (
    WEIGHTS_FILE,
    WEIGHTS_URL,
    FIDInception,
    _avg_pool_3x3,
    _tf1_bilinear_matrix,
    load_inception,
    random_state_dict,
    write_random_weights,
)
from evar.eval.scores import IS_SPLITS, NpyMember, inception_score, read_reference, score, write_reference
from evar.eval.sharded import EvalPlan, evaluate
from evar.eval.sources import VARSource, class_of
from evar.samples import SamplingSettings
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]
SMALL = 16  # channel reduction of the test-size Inception (128-d pool features)


# ---------------------------------------------------------------- the Inception layout
def _save(state, path):
    torch.save(state, path)
    return path


def test_standard_layout_loads_strictly_and_refuses_a_mismatch_naming_the_key(tmp_path):
    state = random_state_dict(reduction=1, seed=3)
    assert len(state) == 472  # 94 conv + batch-norm units × 5 tensors + the classifier's weight and bias
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert not any("num_batches_tracked" in k for k in state)  # the converted graph has none
    net, info = load_inception(_save(state, tmp_path / "good.pth"))
    assert (info.reduction, info.standard) == (1, False)  # the layout, but not the published file's bytes
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    pool, logits = net(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert pool.shape == (1, 2048) and logits.shape == (1, 1008)

    renamed = dict(state)
    renamed["Mixed_6b.branch7x7_2.conv.weights"] = renamed.pop("Mixed_6b.branch7x7_2.conv.weight")
    with pytest.raises(EvarError, match=r"missing key 'Mixed_6b\.branch7x7_2\.conv\.weight'"):
        load_inception(_save(renamed, tmp_path / "renamed.pth"))
    # the same checks at the test size (the layout scaled down), where files are 400× smaller
    state = random_state_dict(SMALL)
    extra = {**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}
    with pytest.raises(EvarError, match=r"unexpected key 'AuxLogits\.fc\.weight'"):
        load_inception(_save(extra, tmp_path / "extra.pth"))
    reshaped = {**state, "fc.weight": torch.zeros(1000, 128)}
    with pytest.raises(EvarError, match=r"key 'fc\.weight' has shape \(1000, 128\)"):
        load_inception(_save(reshaped, tmp_path / "reshaped.pth"))
    counters = {**state, "Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)}  # a re-saved copy: fine
    load_inception(_save(counters, tmp_path / "counters.pth"))


def test_missing_or_foreign_weights_file_is_one_line(tmp_path):
    with pytest.raises(EvarError, match=f"not found at .*{WEIGHTS_FILE}.*{WEIGHTS_URL}"):
        load_inception(tmp_path / WEIGHTS_FILE)
    foreign = _save({"blocks.0.attn.proj.weight": torch.zeros(4, 4)}, tmp_path / "var.pth")
    with pytest.raises(EvarError, match="missing key 'Conv2d_1a_3x3.conv.weight'"):
        load_inception(foreign)


def test_tf1_resize_and_pooling_quirks():
    # TF 1.x samples output i at input i·n_in/n_out (no half-pixel centres), clamping at the last pixel
    assert np.allclose(_tf1_bilinear_matrix(2, 4).numpy(), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    assert torch.equal(_tf1_bilinear_matrix(5, 5), torch.eye(5))
    img = torch.randint(0, 256, (2, 37, 41, 3), dtype=torch.uint8)
    x = FIDInception(SMALL, "tf").prepare(img)
    assert x.shape == (2, 3, 299, 299)
    assert torch.allclose(x[:, :, 0, 0], (img[:, 0, 0].float() - 128) / 128)  # the corner pixel is sampled exactly
    y = FIDInception(SMALL, "pytorch-fid").prepare(img)
    ref = F.interpolate(img.permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.allclose(y, 2 * ref - 1)
    # TensorFlow's 3×3 average pool leaves the padding out: a constant map stays constant at the borders
    assert torch.allclose(_avg_pool_3x3(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    net = FIDInception(SMALL)
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool  # the graph's last block max-pools


# ---------------------------------------------------------------- scores vs reference computations
def _adm_inception_score(logits, split_size):
    """The ADM evaluator's computation, written out: softmax, then per split exp(mean KL(p ‖ mean p))."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _scipy_fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _brute_force_pr(real, fake, k):
    """Kynkäänniemi et al.: a point is inside a set's manifold if within the k-NN radius of one of its points."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def share(manifold, r, queries):
        d = np.linalg.norm(queries[:, None] - manifold[None], axis=2)
        return float((d <= r[None]).any(1).mean())

    return share(real, radii(real), fake), share(fake, radii(fake), real)


def test_scores_equal_reference_computations(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 30)) * 3
    assert inception_score(logits)[0] == pytest.approx(_adm_inception_score(logits, 200 // IS_SPLITS), rel=1e-10)
    confident = np.eye(10)[np.arange(100) % 10] * 50  # every class equally often, each image sure of one
    assert inception_score(confident)[0] == pytest.approx(10.0, rel=1e-6)

    real = rng.normal(size=(150, 8))
    fake = rng.normal(size=(120, 8)) * 1.3 + 0.4
    path = tmp_path / "ref.npz"
    write_reference(path, real, "tf", "x")
    ref = read_reference(path, 8, "tf", "x")
    got = score(fake, rng.normal(size=(120, 5)), ref, ref.features)
    assert got["fid"] == pytest.approx(_scipy_fid(fake, real), rel=1e-6)
    precision, recall = _brute_force_pr(real, fake, 3)
    assert (got["precision"], got["recall"], got["k"]) == (pytest.approx(precision), pytest.approx(recall), 3)
    assert 0 < precision < 1 and 0 < recall < 1
    assert got["fid"] > 0.5 and score(real, logits[:150], ref, ref.features)["fid"] == pytest.approx(0, abs=1e-9)


# ---------------------------------------------------------------- reference files
def test_reference_readers_for_adm_and_mu_sigma_files(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=16), np.eye(16)
    adm = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(adm, arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(4), sigma_s=np.eye(4))
    ref = read_reference(adm, 16, "tf", "x")
    assert ref.kind == "adm" and ref.has_manifold and ref.features is None
    assert np.array_equal(ref.stats[0], mu) and np.array_equal(ref.stats[1], sigma)
    assert np.array_equal(ref.images.rows(5, 9), images[5:9])  # read a slice, not the whole array
    assert len(NpyMember(adm, "arr_0")) == 12

    plain = tmp_path / "fid_stats.npz"
    np.savez(plain, mu=mu, sigma=sigma)
    ref = read_reference(plain, 16, "tf", "x")
    assert ref.kind == "mu-sigma" and not ref.has_manifold
    got = score(rng.normal(size=(40, 16)), rng.normal(size=(40, 7)), ref, None)
    assert got["fid"] > 0 and got["precision"] is None and "only mu/sigma" in got["not_computed"]

    with pytest.raises(EvarError, match="statistics of dimension 16.*2048-d"):
        read_reference(plain, 2048, "tf", "x")
    np.savez(tmp_path / "half.npz", mu=mu)
    with pytest.raises(EvarError, match="mu without sigma"):
        read_reference(tmp_path / "half.npz", 16, "tf", "x")
    evar_file = tmp_path / "evar.npz"
    write_reference(evar_file, rng.normal(size=(20, 16)), "pytorch-fid", "abc")
    with pytest.raises(EvarError, match="made with --preprocess pytorch-fid"):
        read_reference(evar_file, 16, "tf", "abc")
    with pytest.raises(EvarError, match="other Inception weights"):
        read_reference(evar_file, 16, "pytorch-fid", "def")


# ---------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_weights(tmp_path_factory.mktemp("inception") / "inception_small.pth", SMALL, seed=0)


def plan(tmp_path, weights, name="report", **kw):
    base = EvalPlan(out=tmp_path / f"{name}.json", inception_weights=weights, model="builtin:digits",
                    num_samples=10, batch_size=3, shard_size=4)
    return replace(base, **kw)


def test_per_sample_seeds_do_not_depend_on_sharding():
    source = VARSource(tiny_model(), "tiny", SamplingSettings(top_k=40, top_p=0.9), 20)
    assert class_of(0, 20, source.per_class).tolist() == [i // 2 for i in range(20)]
    whole = source.images(0, 12)
    pieces = np.concatenate([source.images(a, b) for a, b in ((0, 1), (1, 6), (6, 7), (7, 12))])
    assert np.array_equal(whole, pieces)


def test_run_self_reference_and_resume(tmp_path, weights, monkeypatch):
    first = evaluate(plan(tmp_path, weights, save_ref_stats=tmp_path / "self.npz", save_png=tmp_path / "png"))
    assert first["run"]["shards_made"] == 3 and first["metrics"]["fid"] is None  # 10 samples in shards of 4
    assert sorted(p.name for p in (tmp_path / "png").iterdir())[-2:] == ["000008_class0008.png", "000009_class0009.png"]
    assert json.loads((tmp_path / "report.json").read_text())["images_sha256"] == first["images_sha256"]

    # the set against its own statistics: FID 0, every point inside the other manifold
    again = evaluate(plan(tmp_path, weights, ref_stats=tmp_path / "self.npz"))
    assert again["run"]["shards_reused"] == 3 and again["run"]["shards_made"] == 0
    m = again["metrics"]
    assert m["fid"] == pytest.approx(0, abs=1e-6) and (m["precision"], m["recall"]) == (1.0, 1.0)

    # an interrupted run continues with the shards it finished and ends with the same report
    calls = {"n": 0}
    make = sharded._make_shard

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        make(*args, **kwargs)

    monkeypatch.setattr(sharded, "_make_shard", interrupted)
    resumed_plan = plan(tmp_path, weights, name="resumed", ref_stats=tmp_path / "self.npz")
    with pytest.raises(KeyboardInterrupt):
        evaluate(resumed_plan)
    assert not resumed_plan.out.exists()
    monkeypatch.setattr(sharded, "_make_shard", make)
    resumed = evaluate(resumed_plan)
    assert (resumed["run"]["shards_reused"], resumed["run"]["shards_made"]) == (2, 1)
    for key in ("metrics", "images_sha256", "source", "inception"):
        assert resumed[key] == again[key]

    with pytest.raises(EvarError, match=r"other settings \(source\.sampling\.top_k changed\)"):
        evaluate(replace(resumed_plan, sampling=SamplingSettings(top_k=50)))


def test_two_gloo_ranks_give_the_same_images_and_statistics(tmp_path, weights):
    flags = ["--model", "builtin:digits", "--inception-weights", str(weights), "--num-samples", "10",
             "--batch-size", "3", "--shard-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "evar.eval.imagenet", *flags, "--out", str(tmp_path / "ddp.json")],
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = evaluate(plan(tmp_path, weights, name="single"))  # meanwhile, the same in one process
    _, stderr = ddp.communicate(timeout=180)
    assert ddp.returncode == 0, stderr[-2000:]
    two = json.loads((tmp_path / "ddp.json").read_text())
    assert two["run"]["world_size"] == 2 and two["run"]["backend"] == "gloo"
    assert two["images_sha256"] == single["images_sha256"]
    assert two["metrics"] == single["metrics"]
    for s in range(3):
        with np.load(tmp_path / "ddp.parts" / f"samples-{s:05d}.npz") as a, \
                np.load(tmp_path / "single.parts" / f"samples-{s:05d}.npz") as b:
            assert np.array_equal(a["pool"], b["pool"]) and np.array_equal(a["logits"], b["logits"])


# ---------------------------------------------------------------- bad input: one line, nothing written
def _nothing_written(tmp_path, p):
    assert not p.out.exists() and not p.parts.exists()


def test_bad_input_is_refused_before_anything_is_written(tmp_path, weights, monkeypatch, capsys):
    np.savez(tmp_path / "other_dim.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "five.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "three.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    cases = [
        ({"model": None, "images": tmp_path / "five.npz", "num_samples": None}, "holds 5 images; the Inception Score"),
        ({"ref_stats": tmp_path / "three.npz"}, "holds 3 reference images; precision and recall need more"),
        ({"model": None, "images": tmp_path / "five.npz", "num_samples": 12}, "holds only 5 images"),
        ({"ref_stats": tmp_path / "other_dim.npz"}, "statistics of dimension 64.*128-d"),
        ({"num_samples": 25}, "--num-samples 25 is not a positive multiple of the model's 10 classes"),
        ({"num_samples": 5}, "--num-samples must be at least 10"),
        ({"inception_weights": tmp_path / "nope.pth"}, f"not found at .*nope.pth: download {WEIGHTS_FILE}"),
        ({"inception_weights": None}, "--inception-weights is required"),
        ({"images": tmp_path}, "exactly one image source"),
        ({"precision": "fp16"}, "fp16 needs a GPU"),
    ]
    for overrides, message in cases:
        p = plan(tmp_path, weights, **overrides)
        with pytest.raises(EvarError, match=message):
            evaluate(p)
        _nothing_written(tmp_path, p)
    wrong = tmp_path / "wrong.pth"
    state = random_state_dict(SMALL)
    state["Mixed_5b.branch_pool.conv.kernel"] = state.pop("Mixed_5b.branch_pool.conv.weight")
    torch.save(state, wrong)
    monkeypatch.setattr(sys, "argv", ["python -m evar.eval.imagenet", "--model", "builtin:digits", "--inception-weights",
                                      str(wrong), "--num-samples", "10", "--out", str(tmp_path / "cli.json")])
    with pytest.raises(SystemExit) as exit_info:
        imagenet.main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "missing key 'Mixed_5b.branch_pool.conv.weight'" in lines[0]
    assert not (tmp_path / "cli.json").exists() and not (tmp_path / "cli.parts").exists()


def test_an_image_set_is_evaluated_and_becomes_a_reference(tmp_path, weights):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, 20, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    folder = tmp_path / "folder"
    folder.mkdir()
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    from_npz = evaluate(replace(plan(tmp_path, weights, name="npz"), model=None, images=tmp_path / "samples.npz",
                                num_samples=None, save_ref_stats=tmp_path / "ref.npz"))
    from_folder = evaluate(replace(plan(tmp_path, weights, name="folder"), model=None, images=folder,
                                   num_samples=None, image_size=16, ref_stats=tmp_path / "ref.npz"))
    assert from_npz["metrics"]["num_samples"] == 12 and from_npz["source"]["kind"] == "npz"
    assert from_folder["source"]["kind"] == "folder" and from_folder["metrics"]["fid"] > 0  # cropped to 16: others
    # ADM-style reference batch: its images go through the Inception (cached in the work dir)
    np.savez(tmp_path / "adm.npz", arr_0=images)
    adm = evaluate(replace(plan(tmp_path, weights, name="adm"), model=None, images=tmp_path / "samples.npz",
                           num_samples=None, ref_stats=tmp_path / "adm.npz"))
    assert adm["reference"]["kind"] == "images" and adm["metrics"]["fid"] == pytest.approx(0, abs=1e-6)
    assert adm["metrics"]["precision"] == 1.0
    assert list((tmp_path / "adm.parts").glob("ref-*/reference-00000.npz"))


def test_an_exported_artifact_is_evaluated_through_the_runtime(tmp_path, weights):
    pytest.importorskip("onnxruntime")
    from evar.checkpoints import save_model_dir
    from evar.eval.imagenet import open_artifact
    from evar.export.artifact import build_onnx
    from evar.export.onnx import OnnxOptions

    model = tiny_model()
    save_model_dir(model, tmp_path / "model", {"source": "tests"})
    build_onnx(model, str(tmp_path / "model"), tmp_path / "art", OnnxOptions(top_k=40, top_p=0.9))
    settings = SamplingSettings(top_k=40, top_p=0.9)  # guidance 1.5
    base = plan(tmp_path, weights, model=str(tmp_path / "model"), sampling=settings)
    from_model = evaluate(replace(base, out=tmp_path / "model.json", save_ref_stats=tmp_path / "model_ref.npz"))
    from_art = evaluate(replace(base, out=tmp_path / "art.json", model=None, artifact=tmp_path / "art",
                                ref_stats=tmp_path / "model_ref.npz"), open_artifact)
    assert from_art["source"]["kind"] == "artifact" and from_art["source"]["backend"] == "cpu"
    # the same tokens, decoded by onnxruntime instead of PyTorch: pixels within 1, so the same set to the metrics
    assert from_art["metrics"]["fid"] == pytest.approx(0, abs=1e-3)
    assert from_art["metrics"]["inception_score"] == pytest.approx(from_model["metrics"]["inception_score"], rel=1e-3)
