"""The training loop: it learns, and a stopped run resumes to the same weights."""
import pytest
import torch

import evar.train as train
from evar.config import VQVAEConfig
from evar.errors import EvarError
from evar.train import Schedule, TokenizerTraining, load_tokenizer, train_tokenizer

TINY_VQVAE = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         using_sa=False, using_mid_sa=False, v_patch_nums=(1, 2, 4, 8))


def _job(steps=4):
    return TokenizerTraining(schedule=Schedule(steps=steps, batch_size=8, lr=1e-3, weight_decay=0.0,
                                               warmup=2, ckpt_every=2))


def test_tokenizer_learns_and_writes_a_loadable_tokenizer(tmp_path):
    out = train_tokenizer(_job(steps=6), tmp_path / "tok", TINY_VQVAE)
    rows = (out / train.LOG_FILE).read_text().splitlines()
    assert len(rows) == 6
    tok = load_tokenizer(out)
    assert tok.cfg == TINY_VQVAE


def test_resume_after_interruption_gives_identical_weights(tmp_path, monkeypatch):
    straight = load_tokenizer(train_tokenizer(_job(), tmp_path / "a", TINY_VQVAE))
    original_save = train._save_state

    def save_then_crash(out, modules, opt, gen, step, sched):
        original_save(out, modules, opt, gen, step, sched)
        if step == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C right after the checkpoint

    monkeypatch.setattr(train, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(_job(), tmp_path / "b", TINY_VQVAE)
    monkeypatch.setattr(train, "_save_state", original_save)
    resumed = load_tokenizer(train_tokenizer(_job(), tmp_path / "b", TINY_VQVAE))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert len((tmp_path / "b" / train.LOG_FILE).read_text().splitlines()) == 4


def test_resume_with_other_settings_is_refused(tmp_path):
    train_tokenizer(_job(steps=2), tmp_path / "t", TINY_VQVAE)
    with pytest.raises(EvarError, match="other settings"):
        train_tokenizer(_job(steps=3), tmp_path / "t", TINY_VQVAE)


def test_label_dropout_rate():
    labels = torch.zeros(10_000, dtype=torch.long)
    dropped = train.drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01


def test_shifted_copies_translate_with_background():
    img = -torch.ones(1, 3, 4, 4)
    img[..., 1, 1] = 1.0
    shifted, labels = train.shifted_copies(img, torch.tensor([7]), 1)
    assert shifted.shape == (9, 3, 4, 4) and labels.tolist() == [7] * 9
    assert all((s == 1).sum() == 3 for s in shifted)  # the bright pixel stays inside for every shift


def test_unshifted_share_weights_pick_the_centre_view():
    img = torch.arange(2, dtype=torch.float32).view(2, 1, 1, 1).expand(2, 3, 4, 4).contiguous()
    shifted, _ = train.shifted_copies(img, torch.tensor([0, 1]), 1)
    w = train.unshifted_weights(2, 1, 0.5)
    assert w.shape == (len(shifted),) and abs(w.sum().item() - 1.0) < 1e-12
    centre = w == w.max()
    assert torch.equal(shifted[centre], img)  # the heavy rows are exactly the originals
    picks = train.draw_batch(len(w), 20_000, torch.Generator().manual_seed(0), w)
    assert abs(centre[picks].double().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("share, shift", [(0.0, 1), (1.0, 1), (0.5, 0)])
def test_unshifted_share_out_of_range_is_refused(share, shift):
    with pytest.raises(EvarError):
        train.VARTraining(tokenizer="x", shift_augment=shift, unshifted_share=share)
