"""MNIST and CIFAR-10 through torchvision, seeded training subsets, and data roots that work offline.

The data root is `root` when given, else $QRKD_DATA_ROOT, else ./data. torchvision's layouts apply: MNIST reads
<root>/MNIST/raw (the four IDX files, extracted), CIFAR-10 reads <root>/cifar-10-batches-py (the pickled
batches). Where the files are missing and downloading fails (or is off), DataNotFoundError says where the files were
looked for and how to provide them. A file that is there but corrupt (an MNIST IDX file that is empty, truncated,
not in the IDX format, or whose label count disagrees with its image file) is a DataCorruptError naming the file and
what is wrong with it, before torchvision reads it.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

DATASETS = ("mnist", "cifar10")

# the seed's MNIST normalisation; the usual per-channel CIFAR-10 statistics of the training set
NORMALISATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
IN_CHANNELS = {"mnist": 1, "cifar10": 3}
NUM_CLASSES = {"mnist": 10, "cifar10": 10}


class DataNotFoundError(RuntimeError):
    """The dataset's files are not under the data root and could not be downloaded."""


class DataCorruptError(DataNotFoundError):
    """A dataset file is present but unusable (empty, truncated, wrong format or inconsistent); the message names the
    file and the cause."""


def default_data_root() -> Path:
    return Path(os.environ.get("QRKD_DATA_ROOT") or "data")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return name.lower()


def _cifar10_class():
    from torchvision import datasets

    class CIFAR10(datasets.CIFAR10):
        # Files are accepted by presence: torchvision checks the md5 of every batch on each load, which rejects any
        # other file in the same format. A download is still verified (the archive's md5 is kept).
        train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

    return CIFAR10


def _expected_files(name: str, root: Path):
    if name == "mnist":
        folder = root / "MNIST" / "raw"
        files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]
        how = ("put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
               "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, extracted from their .gz) in that folder")
    else:
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
        how = ("extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so that "
               "data_batch_1..5, test_batch and batches.meta are in that folder")
    return folder, files, how


def _not_found(name: str, root: Path, reason: str) -> DataNotFoundError:
    folder, files, how = _expected_files(name, root)
    present = [f for f in files if (folder / f).exists() or (folder / (f + ".gz")).exists()]
    missing = [f for f in files if f not in present]
    return DataNotFoundError(
        f"{name} data not found: looked in {folder.resolve()} (missing: {', '.join(missing) or 'none'}); {reason}. "
        f"To provide it, {how}, or point --data-root / QRKD_DATA_ROOT at a folder that holds "
        f"{folder.relative_to(root)}."
    )


_MNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _corrupt(path: Path, cause: str) -> DataCorruptError:
    return DataCorruptError(
        f"mnist file {path.resolve()} is corrupt: {cause}. Replace it with the original file (extracted from its "
        ".gz, md5-verified), or delete it to let torchvision download it again."
    )


def _idx_dims(path: Path, ndim: int, what: str) -> tuple:
    """The dimensions of an IDX file of unsigned bytes with `ndim` dimensions, after checking that the file holds
    exactly the header and the data the header announces."""
    size = path.stat().st_size
    header = 4 + 4 * ndim
    if size == 0:
        raise _corrupt(path, "the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(header)
    if len(head) < 4:
        raise _corrupt(path, f"the file is truncated: {size} bytes, shorter than an IDX magic number")
    magic = struct.unpack(">I", head[:4])[0]
    if magic != 0x800 + ndim:
        raise _corrupt(path, f"not an MNIST {what} file: its IDX magic number is 0x{magic:08x}, expected "
                             f"0x{0x800 + ndim:08x} ({ndim}-D, unsigned bytes)")
    if len(head) < header:
        raise _corrupt(path, f"the file is truncated: {size} bytes, shorter than its {header}-byte IDX header")
    dims = struct.unpack(">" + "I" * ndim, head[4:])
    expected = header + math.prod(dims)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise _corrupt(path, f"the file is {state}: its header announces {' x '.join(map(str, dims))} bytes of "
                             f"{what} ({expected} bytes with the header), the file has {size} bytes")
    if dims[0] == 0:
        raise _corrupt(path, f"the file holds no {what}")
    return dims


def _check_mnist_files(root: Path, train: bool) -> None:
    """Checks the IDX files of the split that torchvision is about to read, where both are present."""
    folder = root / "MNIST" / "raw"
    images_path, labels_path = (folder / f for f in _MNIST_FILES[train])
    if not (images_path.is_file() and labels_path.is_file()):
        return  # missing files are torchvision's "not found" (then a download, or DataNotFoundError)
    n_images = _idx_dims(images_path, 3, "images")[0]
    n_labels = _idx_dims(labels_path, 1, "labels")[0]
    if n_labels != n_images:
        raise _corrupt(labels_path, f"it holds {n_labels} labels but {images_path.name} holds {n_images} images")
    with open(labels_path, "rb") as f:
        top = max(f.read()[8:])
    if top >= NUM_CLASSES["mnist"]:
        raise _corrupt(labels_path, f"it holds the label {top}, MNIST labels are 0..{NUM_CLASSES['mnist'] - 1}")


def transform(name: str):
    from torchvision import transforms

    mean, std = NORMALISATION[_check_name(name)]
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def load_dataset(name: str, root=None, train: bool = True, download: bool = True) -> Dataset:
    """The torchvision dataset `name` ('mnist' or 'cifar10'), normalised, from `root` (see the module docstring)."""
    from torchvision import datasets

    name = _check_name(name)
    root = Path(root) if root is not None else default_data_root()
    cls = datasets.MNIST if name == "mnist" else _cifar10_class()
    if name == "mnist":
        _check_mnist_files(root, train)
    try:
        return cls(str(root), train=train, download=False, transform=transform(name))
    except RuntimeError as exc:
        if "not found" not in str(exc).lower():
            raise DataNotFoundError(f"{name} files under {root.resolve()} are unreadable: {exc}") from None
    if not download:
        raise _not_found(name, root, "downloading is off")
    try:
        return cls(str(root), train=train, download=True, transform=transform(name))
    except Exception as exc:  # urllib, ssl, socket and torchvision's own RuntimeError when every mirror fails
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _not_found(name, root, f"downloading failed ({first})") from None


def random_subset(dataset: Dataset, size, seed: int) -> Dataset:
    """`size` samples drawn without replacement by torch.randperm with a generator seeded `seed` (the seed notebook's
    draw after torch.manual_seed(seed)). size None or >= len(dataset) keeps the whole dataset."""
    if size is None or size >= len(dataset):
        return dataset
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    generator = torch.Generator().manual_seed(int(seed))
    indices = torch.randperm(len(dataset), generator=generator)[:size]
    return Subset(dataset, indices.tolist())


def to_tensor_dataset(name: str, dataset: Dataset) -> TensorDataset:
    """The normalised images and labels of a torchvision MNIST/CIFAR-10 dataset (or a Subset of one) as one
    TensorDataset: the same values as its per-sample ToTensor + Normalize (the same float32 operations, in bulk),
    without the per-sample PIL round trip that otherwise dominates a small CNN's step."""
    name = _check_name(name)
    base, indices = dataset, None
    if isinstance(dataset, Subset):
        base, indices = dataset.dataset, torch.as_tensor(dataset.indices, dtype=torch.long)
    images = base.data
    images = torch.from_numpy(images).permute(0, 3, 1, 2) if not isinstance(images, torch.Tensor) else images[:, None]
    targets = torch.as_tensor(base.targets, dtype=torch.long)
    if indices is not None:
        images, targets = images[indices], targets[indices]
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in NORMALISATION[name])
    images = images.contiguous().to(torch.float32).div(255).sub_(mean).div_(std)
    return TensorDataset(images, targets)


def make_loaders(name: str, root=None, *, subset=None, batch_size: int = 128, seed: int = 0, download: bool = True,
                 eval_batch_size: int | None = None, num_replicas: int = 1, rank: int = 0, in_memory: bool = True):
    """(train_loader, test_loader) for the seeded training subset and the whole test set.

    The training loader shuffles with its own generator (seeded `seed`), so the batch order does not depend on the
    global RNG; with num_replicas > 1 it uses a DistributedSampler and `batch_size` is the per-process batch.
    in_memory=True holds the normalised tensors (to_tensor_dataset) instead of decoding images per sample.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    train_set = random_subset(load_dataset(name, root, train=True, download=download), subset, seed)
    test_set = load_dataset(name, root, train=False, download=download)
    if in_memory:
        train_set, test_set = to_tensor_dataset(name, train_set), to_tensor_dataset(name, test_set)
    if num_replicas > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_set, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        train_loader = DataLoader(train_set, batch_size=batch_size, sampler=sampler, num_workers=0)
    else:
        generator = torch.Generator().manual_seed(int(seed))
        train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator, num_workers=0)
    test_loader = DataLoader(test_set, batch_size=eval_batch_size or batch_size, shuffle=False, num_workers=0)
    return train_loader, test_loader
