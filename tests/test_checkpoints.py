"""Official-layout checkpoints and model directories: strict, and clear when they are not right."""
import json
import os

import pytest
import torch

from evar import zoo
from evar.checkpoints import (CONFIG_FILE, VAR_FILE, load_model_dir, load_official, read_torch_state,
                              save_model_dir)
from evar.errors import CheckpointError, ModelRefError
from tests.conftest import tiny_model


@pytest.fixture
def official_files(tmp_path):
    """A tiny model saved the way FoundationVision ships weights: flat state dicts in .pth files."""
    model = tiny_model(seed=3)
    var_path, vae_path = tmp_path / "var_tiny.pth", tmp_path / "vae_tiny.pth"
    torch.save(model.var.state_dict(), var_path)
    torch.save(model.vqvae.state_dict(), vae_path)
    return model, var_path, vae_path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_layout_loads_strictly(official_files):
    model, var_path, vae_path = official_files
    loaded = load_official(model.config, var_path, vae_path)
    assert _same_weights(loaded.var, model.var) and _same_weights(loaded.vqvae, model.vqvae)


def test_training_checkpoint_wrapper_is_unwrapped(tmp_path, official_files):
    model, _, vae_path = official_files
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": model.var.state_dict()}, wrapped)
    assert _same_weights(load_official(model.config, wrapped, vae_path).var, model.var)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("blocks.1.attn.q_bias"), "missing key 'blocks.1.attn.q_bias'"),
    (lambda sd: sd.__setitem__("blocks.9.attn.q_bias", torch.zeros(3)), "unexpected key 'blocks.9.attn.q_bias'"),
    (lambda sd: sd.__setitem__("head.weight", torch.zeros(64, 65)), "key 'head.weight' has shape (64, 65)"),
])
def test_foreign_or_misshaped_keys_are_named(tmp_path, official_files, edit, message):
    model, var_path, vae_path = official_files
    state = torch.load(var_path, weights_only=True)
    edit(state)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        load_official(model.config, bad, vae_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_vqvae_for_another_architecture_is_refused(tmp_path, official_files):
    model, var_path, _ = official_files
    with pytest.raises(CheckpointError, match="vae"):
        load_official(model.config, var_path, var_path)  # the VAR file where the VQVAE belongs


def test_truncated_and_garbage_files(tmp_path, official_files):
    _, var_path, _ = official_files
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(var_path.read_bytes()[: os.path.getsize(var_path) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match="not a (readable )?PyTorch checkpoint"):
            read_torch_state(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_torch_state(tmp_path / "missing.pth")


class Payload:  # anything that is not a tensor container
    pass


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_torch_state(path)
    not_a_state = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_torch_state(not_a_state)


def test_model_dir_round_trip(tmp_path, tiny):
    out = save_model_dir(tiny, tmp_path / "m", {"source": "test", "note": "round trip"})
    loaded = load_model_dir(out)
    assert loaded.config.var == tiny.config.var and loaded.config.vqvae == tiny.config.vqvae
    assert loaded.config.provenance["note"] == "round trip"
    assert _same_weights(loaded.var, tiny.var) and _same_weights(loaded.vqvae, tiny.vqvae)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_model_dir_errors(tmp_path, tiny):
    out = save_model_dir(tiny, tmp_path / "m")
    (out / VAR_FILE).write_bytes((out / VAR_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model_dir(out)
    out = save_model_dir(tiny, tmp_path / "m2")
    cfg = json.loads((out / CONFIG_FILE).read_text())
    cfg["var"]["num_heads"] = [2, 2, 3]  # weights say block 1 has one head
    (out / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="blocks.1.attn"):
        load_model_dir(out)
    cfg["format_version"] = 99
    (out / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="upgrade EVAR"):
        load_model_dir(out)
    (out / CONFIG_FILE).write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model_dir(out)


def test_failed_save_leaves_previous_dir_intact(tmp_path, tiny, monkeypatch):
    out = save_model_dir(tiny, tmp_path / "m")
    before = (out / VAR_FILE).read_bytes()
    import evar.checkpoints as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(RuntimeError):
        save_model_dir(tiny, out)
    assert (out / VAR_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_model_references(tmp_path, tiny):
    with pytest.raises(ModelRefError, match="unknown model reference"):
        zoo.load("nothing-here")
    with pytest.raises(ModelRefError, match="needs the release files"):
        zoo.load("official:d16")
    with pytest.raises(ModelRefError, match="d16"):
        zoo.load("random:d17")
    with pytest.raises(ModelRefError, match="no built-in model"):
        zoo.load("builtin:cats")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelRefError, match="not an EVAR model directory"):
        zoo.load(str(tmp_path / "empty"))
    save_model_dir(tiny, tmp_path / "m")
    assert zoo.load(str(tmp_path / "m")).config.var == tiny.config.var


def test_random_d16_has_official_shapes_without_weights():
    cfg = zoo.config_for("random:d16")
    assert cfg.var.embed_dim == 1024 and cfg.var.num_heads == (16,) * 16 and cfg.vqvae.vocab_size == 4096


def test_model_families_are_dispatched_by_config_format(tmp_path):
    """A directory of another family is refused by VAR commands with a line naming what it is."""
    other = tmp_path / "vit"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"format": "evar-test-family"}))
    zoo.FAMILIES["evar-test-family"] = zoo.Family("test", "a test classifier", "json:loads")
    try:
        with pytest.raises(ModelRefError, match="is a test classifier; this command needs a VAR generator"):
            zoo.load(str(other))
        with pytest.raises(ModelRefError, match="is a test classifier; this command needs a VAR generator"):
            zoo.load_family(str(other), ("var",))
        assert zoo.load_family("builtin:digits", ("var", "test")).config.var.num_classes == 10
    finally:
        del zoo.FAMILIES["evar-test-family"]
