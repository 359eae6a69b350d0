import pickle

import numpy as np
import pytest
import torch

from conftest import write_images
from medfedpure.config import DataConfig
from medfedpure.data import (BR35H_CLASSES, CIFAR10_CLASSES, DataError, load_class_folders, load_cifar10,
                             load_dataset, make_loader, make_synthetic)
from medfedpure.data import datasets


def test_br35h_layout_resizes_mixed_sizes_and_modes(br35h_like, tmp_path):
    data = load_class_folders(br35h_like, 16, classes=BR35H_CLASSES, cache_dir=str(tmp_path / "c"))
    assert data.images.shape == (11, 3, 16, 16) and data.images.dtype == np.uint8
    assert data.classes == ("no", "yes")
    assert np.bincount(data.labels).tolist() == [5, 6]


def test_any_class_folder_layout(tmp_path):
    for i, name in enumerate(["cat", "dog", "eel"]):
        write_images(tmp_path / "set" / name, 3, seed=i, fmt="PNG")
    data = load_dataset(DataConfig(dataset="folder", root=str(tmp_path / "set"), image_size=8,
                                   cache_dir=str(tmp_path / "c")))
    assert data.classes == ("cat", "dog", "eel") and len(data) == 9


def test_cifar10_jpg_layout_pools_train_and_test(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for i, name in enumerate(CIFAR10_CLASSES):
            write_images(tmp_path / "c10" / split / name, n, size=(32, 32), seed=i)
    data = load_cifar10(tmp_path / "c10", 32, cache_dir=str(tmp_path / "c"))
    assert len(data) == 30 and np.bincount(data.labels).tolist() == [3] * 10


def test_cifar10_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    data = load_cifar10(tmp_path, 32)
    assert data.images.shape == (24, 3, 32, 32)
    first = pickle.load(open(folder / "data_batch_1", "rb"))["data"][0].reshape(3, 32, 32)
    assert np.array_equal(data.images[0], first)
    assert load_cifar10(tmp_path, 16).images.shape == (24, 3, 16, 16)


def test_second_load_reads_the_cache(br35h_like, tmp_path, monkeypatch):
    cache = str(tmp_path / "c")
    first = load_class_folders(br35h_like, 16, BR35H_CLASSES, cache)

    def no_decoding(*_):
        raise AssertionError("decoded a JPEG although the cache was warm")

    monkeypatch.setattr(datasets, "decode_image", no_decoding)
    second = load_class_folders(br35h_like, 16, BR35H_CLASSES, cache)
    assert np.array_equal(first.images, second.images)
    with pytest.raises(AssertionError):  # another resolution is another cache entry
        load_class_folders(br35h_like, 20, BR35H_CLASSES, cache)


def test_zero_byte_image_is_named(br35h_like):
    (br35h_like / "yes" / "broken.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"broken\.jpg.*empty"):
        load_class_folders(br35h_like, 16, BR35H_CLASSES)


def test_unreadable_image_is_named(br35h_like):
    (br35h_like / "no" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"garbage\.jpg"):
        load_class_folders(br35h_like, 16, BR35H_CLASSES)


def test_missing_and_empty_class_folders(br35h_like, tmp_path):
    for p in (br35h_like / "no").iterdir():
        p.unlink()
    with pytest.raises(DataError, match=r"no'? holds no images"):
        load_class_folders(br35h_like, 16, BR35H_CLASSES)
    (br35h_like / "no").rmdir()
    with pytest.raises(DataError, match="class folder .*no.* is missing"):
        load_class_folders(br35h_like, 16, BR35H_CLASSES)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(dataset="br35h", root=str(tmp_path / "nowhere")))


def test_synthetic_is_deterministic_and_balanced():
    a, b = make_synthetic(20, 32, seed=3), make_synthetic(20, 32, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.bincount(a.labels).tolist() == [20, 20]
    assert not np.array_equal(a.images, make_synthetic(20, 32, seed=4).images)


def test_loader_scales_to_unit_range_and_augments():
    data = make_synthetic(8, 32)
    plain = make_loader(data, None, 16, train=False)
    x, y = next(iter(plain))
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[0], torch.from_numpy(data.images[0]).float() / 255)
    aug = make_loader(data, None, 16, train=True, seed=0)
    xa, _ = next(iter(aug))
    assert xa.min() >= 0 and xa.max() <= 1
    # augmented training batches are not the stored images
    stored = torch.from_numpy(data.images).float() / 255
    assert not any(torch.equal(xa[0], s) for s in stored)


def test_real_br35h_loads(shared_data):
    data = load_dataset(DataConfig(dataset="br35h", root=str(shared_data / "br35h"), image_size=32))
    assert np.bincount(data.labels).tolist() == [1200, 1200]
    assert data.images.shape[1:] == (3, 32, 32)


def test_training_loader_never_ends_on_a_lone_scan():
    """BatchNorm cannot train on one sample with a 1x1 map (ResNet-18 / MobileNetV2 at 32 px)."""
    from medfedpure.config import ModelConfig
    from medfedpure.models import build_model

    data = make_synthetic(20, 32, seed=0)
    sizes = [len(y) for _, y in make_loader(data, np.arange(33), 8, train=True)]
    assert sizes == [8, 8, 8, 8]  # the 33rd scan would have been a batch of one
    assert [len(y) for _, y in make_loader(data, np.arange(34), 8, train=True)][-1] == 2
    assert sum(len(y) for _, y in make_loader(data, np.arange(33), 8, train=False)) == 33  # evaluation keeps all
    model = build_model(ModelConfig(backbone="mobilenet_v2", num_experts=1), 2).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model.loss(torch.rand(1, 3, 32, 32), torch.tensor([0]))


def test_the_cifar_augmentation_flips_and_translates_by_at_most_two_pixels_with_reflected_borders():
    from medfedpure.data.loaders import train_augmentation
    torch.manual_seed(0)
    x = torch.rand(3, 8, 8)
    padded = torch.nn.functional.pad(x[None], (2, 2, 2, 2), mode="reflect")[0]
    shifts = [(dy, dx) for dy in range(5) for dx in range(5)]
    seen = set()
    augment = train_augmentation("cifar", (8, 8))
    for _ in range(200):
        out = augment(x)
        assert out.shape == x.shape
        found = [(s, flip) for s in shifts for flip in (False, True)
                 if torch.equal(out, (padded.flip(2) if flip else padded)[:, s[0]:s[0] + 8, s[1]:s[1] + 8])]
        assert found, "not a flip and shift of the scan"
        seen.update(found)
    assert len({s for s, _ in seen}) > 10 and {f for _, f in seen} == {False, True}
    with pytest.raises(ValueError, match="unknown augmentation 'jpeg'"):
        train_augmentation("jpeg")
    data = make_synthetic(4, 16)
    xa, _ = next(iter(make_loader(data, None, 8, train=True, seed=0, augment="cifar")))
    assert xa.shape == (8, 3, 16, 16)
    xn, _ = next(iter(make_loader(data, None, 8, train=True, seed=0, augment=None)))
    stored = torch.from_numpy(data.images).float() / 255
    assert all(any(torch.equal(x_, s) for s in stored) for x_ in xn)  # None: the stored scans as they are
