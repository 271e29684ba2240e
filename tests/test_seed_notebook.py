"""The seed notebook's code, with only its three import lines changed to qrkd's, runs end to end (1 epoch, tiny
MNIST files written here). Its QRKD student uses the photonic kernel (qk_backend="merlin"): no skip if that is
missing, the test must fail."""

import re
from pathlib import Path

import matplotlib
import pytest

from test_data import write_mnist

SEED_NOTEBOOK = Path(__file__).resolve().parents[1].parent / "shared" / "seed" / "000_62266df5820700d3.txt"

IMPORTS = {
    "from lib.losses import DistillationLoss": "from qrkd import DistillationLoss",
    "from lib.models import StudentCNN, TeacherCNN": "from qrkd.models import StudentCNN, TeacherCNN",
    "from lib.train import TrainConfig, train_student, train_teacher":
        "from qrkd.train import TrainConfig, train_student, train_teacher",
}
# the run's size only: 1 epoch on a small subset of the tiny files
CONSTANTS = {
    "SUBSET_SIZE = 10_000": "SUBSET_SIZE = 48",
    "BATCH_SIZE = 128": "BATCH_SIZE = 16",
    "EPOCHS = 3": "EPOCHS = 1",
}


def notebook_code(text: str) -> str:
    """The code cells: what follows each `In [None]:` marker up to the next one."""
    cells = re.split(r"^In \[None\]:\s*$", text, flags=re.MULTILINE)[1:]
    assert len(cells) >= 8, "the seed notebook's code cells were not found"
    return "\n\n".join(cells)


def test_seed_notebook_runs_with_qrkd_imports(tmp_path, monkeypatch):
    if not SEED_NOTEBOOK.exists():
        pytest.fail(f"seed notebook not found at {SEED_NOTEBOOK}")
    code = notebook_code(SEED_NOTEBOOK.read_text())
    for old, new in {**IMPORTS, **CONSTANTS}.items():
        assert code.count(old) == 1, f"{old!r} is not in the seed notebook exactly once"
        code = code.replace(old, new)
    assert "from lib" not in code

    matplotlib.use("Agg")
    from torchvision.datasets import mnist

    def no_network(*args, **kwargs):
        raise AssertionError("the notebook tried to download MNIST although the files exist")

    monkeypatch.setattr(mnist, "download_and_extract_archive", no_network)
    write_mnist(tmp_path / "data", n_train=96, n_test=32)
    monkeypatch.chdir(tmp_path)  # the notebook reads datasets.MNIST("data", ...)

    namespace = {"__name__": "seed_notebook"}
    exec(compile(code, str(SEED_NOTEBOOK), "exec"), namespace)

    assert set(namespace["test_accs"]) == {"Scratch", "KD", "RKD", "QRKD"}
    for name, hist in namespace["histories"].items():
        assert len(hist["train_acc"]) == len(hist["test_acc"]) == 1, name
        assert 0.0 <= hist["test_acc"][0] <= 100.0
        assert hist["test_acc"][-1] == namespace["test_accs"][name]
    assert namespace["histories"]["QRKD"]["distill"][0] > 0
    assert len(namespace["summary"]) == 10
    assert namespace["plt"].gcf().axes[0].get_title() == "KD vs RKD vs QRKD on 10k MNIST subset"
    namespace["plt"].close("all")
