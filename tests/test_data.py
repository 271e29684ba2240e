"""qrkd.data on tiny MNIST / CIFAR-10 files written here in the real formats (IDX, pickled batches)."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qrkd import data


def synthetic_images(n, size, channels, seed):
    """Learnable images: class c lights a block whose position depends on c, plus noise. Returns (uint8 N x C x H x
    W, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 60, size=(n, channels, size, size)).astype(np.uint8)
    block = size // 5
    for i, c in enumerate(labels):
        r, col = (c // 5) * (size // 2) + 2, (c % 5) * block
        images[i, :, r : r + block, col : col + block] = 255
    return images, labels.astype(np.uint8)


def write_mnist(root, n_train=64, n_test=32, seed=0):
    """The four IDX files in <root>/MNIST/raw, as torchvision reads them (extracted)."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = synthetic_images(n, 28, 1, s)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return Path(root)


def write_cifar10(root, n_per_batch=8, n_test=16, seed=0):
    """data_batch_1..5, test_batch and batches.meta in <root>/cifar-10-batches-py (CIFAR's pickled dicts)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", n_per_batch, seed + i) for i in range(1, 6)] + [("test_batch", n_test, seed)]
    for name, n, s in batches:
        images, labels = synthetic_images(n, 32, 3, s)
        entry = {"batch_label": name, "data": images.reshape(n, -1), "labels": [int(x) for x in labels]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, f)
    return Path(root)


def test_mnist_loads_tiny_idx_files(tmp_path):
    write_mnist(tmp_path, n_train=40, n_test=12)
    train = data.load_dataset("mnist", tmp_path, train=True, download=False)
    test = data.load_dataset("mnist", tmp_path, train=False, download=False)
    assert len(train) == 40 and len(test) == 12
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    raw = Path(tmp_path, "MNIST", "raw", "train-images-idx3-ubyte").read_bytes()[16 : 16 + 784]
    expected = (torch.tensor(list(raw), dtype=torch.float32).view(1, 28, 28) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x, expected)


def test_cifar10_loads_tiny_batches(tmp_path):
    write_cifar10(tmp_path, n_per_batch=6, n_test=10)
    train = data.load_dataset("cifar10", tmp_path, train=True, download=False)
    test = data.load_dataset("cifar10", tmp_path, train=False, download=False)
    assert len(train) == 30 and len(test) == 10
    x, y = test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    mean, std = data.NORMALISATION["cifar10"]
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        first = pickle.load(f)["data"][0].reshape(3, 32, 32)
    expected = (torch.from_numpy(first).float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(
        3, 1, 1)
    torch.testing.assert_close(x, expected)


def test_missing_files_message_without_download(tmp_path):
    with pytest.raises(data.DataNotFoundError) as info:
        data.load_dataset("mnist", tmp_path / "nothing", download=False)
    msg = str(info.value)
    assert str((tmp_path / "nothing" / "MNIST" / "raw").resolve()) in msg
    assert "train-images-idx3-ubyte" in msg and "QRKD_DATA_ROOT" in msg and "downloading is off" in msg


def test_failed_download_message(tmp_path, monkeypatch):
    import urllib.error

    from torchvision.datasets import cifar, mnist

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    for name, folder in (("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")):
        with pytest.raises(data.DataNotFoundError) as info:
            data.load_dataset(name, tmp_path / "offline", download=True)
        msg = str(info.value)
        assert str((tmp_path / "offline" / folder).resolve()) in msg and "downloading failed" in msg


def test_partial_cifar_reports_missing_files(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(data.DataNotFoundError, match="missing: data_batch_3"):
        data.load_dataset("cifar10", tmp_path, download=False)


def test_data_root_from_environment(tmp_path, monkeypatch):
    write_mnist(tmp_path / "env_root", n_train=10, n_test=5)
    monkeypatch.setenv("QRKD_DATA_ROOT", str(tmp_path / "env_root"))
    assert data.default_data_root() == tmp_path / "env_root"
    assert len(data.load_dataset("mnist", download=False)) == 10
    monkeypatch.delenv("QRKD_DATA_ROOT")
    assert data.default_data_root() == Path("data")


def test_random_subset_is_seeded_like_the_notebook(tmp_path):
    write_mnist(tmp_path, n_train=50, n_test=5)
    full = data.load_dataset("mnist", tmp_path, download=False)
    a = data.random_subset(full, 20, seed=1337)
    b = data.random_subset(full, 20, seed=1337)
    c = data.random_subset(full, 20, seed=7)
    torch.manual_seed(1337)
    notebook = torch.randperm(len(full))[:20].tolist()
    assert a.indices == b.indices == notebook and a.indices != c.indices and len(set(a.indices)) == 20
    assert data.random_subset(full, None, seed=0) is full and data.random_subset(full, 500, seed=0) is full
    with pytest.raises(ValueError, match="size"):
        data.random_subset(full, 0, seed=0)


def test_make_loaders_shuffle_independent_of_global_rng(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=20)

    def first_labels():
        train, test = data.make_loaders("mnist", tmp_path, subset=30, batch_size=8, seed=3, download=False)
        assert len(train.dataset) == 30 and len(test.dataset) == 20
        return [batch[1].tolist() for batch in train]

    torch.manual_seed(0)
    a = first_labels()
    torch.manual_seed(99)
    b = first_labels()
    assert a == b


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        data.load_dataset("svhn", tmp_path)
    write_mnist(tmp_path, n_train=10, n_test=5)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loaders("mnist", tmp_path, batch_size=0, download=False)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_in_memory_tensors_equal_torchvision_samples(tmp_path, name):
    if name == "mnist":
        write_mnist(tmp_path, n_train=30, n_test=8)
    else:
        write_cifar10(tmp_path, n_per_batch=6, n_test=8)
    full = data.load_dataset(name, tmp_path, download=False)
    subset = data.random_subset(full, 11, seed=2)
    tensors = data.to_tensor_dataset(name, subset)
    assert len(tensors) == 11
    for i in range(11):
        x, y = subset[i]
        tx, ty = tensors[i]
        assert torch.equal(tx, x) and int(ty) == y  # bitwise: the same float32 operations
    train_mem, _ = data.make_loaders(name, tmp_path, subset=11, batch_size=4, seed=2, download=False)
    train_pil, _ = data.make_loaders(name, tmp_path, subset=11, batch_size=4, seed=2, download=False,
                                     in_memory=False)
    for (a, la), (b, lb) in zip(train_mem, train_pil):
        assert torch.equal(a, b) and torch.equal(la, lb)
