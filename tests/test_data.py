from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evar.data import ImageFolder, _digits_arrays, batches, from_uint8_nhwc, load_digits, load_images, to_uint8_nhwc


def test_digits_shapes_range_and_split_sizes():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    all_x, all_y = load_digits("all")
    assert train_x.shape == (1347, 3, 16, 16) and test_x.shape == (450, 3, 16, 16)
    assert all_x.shape == (1797, 3, 16, 16)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert all_x.min() >= -1.0 and all_x.max() <= 1.0
    assert all_x.min() == -1.0 and all_x.max() == 1.0  # the 0..16 range maps onto the full [-1, 1]
    assert torch.equal(all_x[:, 0], all_x[:, 2])  # gray replicated to RGB
    # Stratified: each class's test share is within one image of a quarter of that class.
    for c in range(10):
        n_class = int((all_y == c).sum())
        assert abs(int((test_y == c).sum()) - n_class * 0.25) <= 1


def test_digits_native_size_is_the_raw_data():
    from sklearn.datasets import load_digits as sklearn_digits

    x, y = load_digits("all", size=8)
    raw = sklearn_digits()
    expected = torch.from_numpy(raw.images).float() / 16 * 2 - 1
    assert torch.allclose(x[:, 0], expected)
    assert torch.equal(y, torch.from_numpy(raw.target))


def test_digits_splits_disjoint_and_cover_all():
    _, _, train_idx, test_idx = _digits_arrays(16)
    assert set(train_idx.tolist()).isdisjoint(test_idx.tolist())
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(1797))
    all_x, all_y = load_digits("all")
    train_x, train_y = load_digits("train")
    assert torch.equal(all_x[train_idx], train_x) and torch.equal(all_y[train_idx], train_y)


def test_digits_deterministic_and_cache_safe():
    a_x, a_y = load_digits("train")
    a_x.fill_(0.0)  # writing into a result must not corrupt later loads
    b_x, b_y = load_digits("train")
    c_x, c_y = load_digits("train")
    assert torch.equal(b_x, c_x) and torch.equal(a_y, b_y)
    assert b_x.abs().sum() > 0


def test_digits_unknown_split():
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits("validation")


def test_uint8_round_trip():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 5, 7, 3), dtype=np.uint8)
    x = from_uint8_nhwc(a)
    assert x.shape == (4, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8_nhwc(x), a)
    assert to_uint8_nhwc(torch.full((1, 3, 2, 2), 5.0)).max() == 255  # clamped, not wrapped


def _write_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_with_classes(tmp_path: Path):
    _write_png(tmp_path / "zebra" / "a.png", (255, 255, 255))
    _write_png(tmp_path / "zebra" / "nested" / "b.png", (255, 255, 255))
    _write_png(tmp_path / "apple" / "c.png", (0, 0, 0))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path, size=8)
    assert folder.class_names == ["apple", "zebra"]
    assert len(folder) == 3
    assert folder.labels == [0, 1, 1]
    x, label = folder[0]
    assert x.shape == (3, 8, 8) and label == 0
    assert torch.allclose(x, torch.full_like(x, -1.0))
    images, labels = load_images(str(tmp_path), size=8)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 1, 1]
    assert torch.allclose(images[1], torch.ones(3, 8, 8))


def test_image_folder_flat_is_one_class(tmp_path: Path):
    _write_png(tmp_path / "a.png", (10, 20, 30))
    _write_png(tmp_path / "b.jpg", (10, 20, 30))
    folder = ImageFolder(tmp_path, size=4)
    assert folder.labels == [0, 0] and len(folder.class_names) == 1


def test_image_folder_center_crop(tmp_path: Path):
    # A wide image whose left and right quarters are red: the center crop keeps only blue.
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))
    im.paste((255, 0, 0), (30, 0, 40, 20))
    im.save(tmp_path / "wide.png")
    x, _ = ImageFolder(tmp_path, size=4)[0]
    assert torch.allclose(x[0], torch.full((4, 4), -1.0)) and torch.allclose(x[2], torch.ones(4, 4))


def test_image_folder_missing_or_empty(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolder(tmp_path / "nope", size=8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        load_images(str(tmp_path / "empty"))


def test_batches_shuffle_forever_and_deterministic():
    images = torch.arange(10).float()[:, None]
    labels = torch.arange(10)
    stream = batches(images, labels, 4, torch.Generator().manual_seed(0))
    drawn = [next(stream) for _ in range(5)]  # 20 items = exactly two epochs
    assert all(len(x) == 4 and torch.equal(x[:, 0].long(), y) for x, y in drawn)
    seen = torch.cat([y for _, y in drawn])
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # reshuffled per epoch
    again = batches(images, labels, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(next(again)[1], y) for _, y in drawn)


def test_batches_larger_than_dataset():
    stream = batches(torch.zeros(3, 1), torch.arange(3), 8, torch.Generator().manual_seed(0))
    x, y = next(stream)
    assert len(x) == 8 and set(y.tolist()) == {0, 1, 2}
