"""Issue 9, items 10 and 11: bad options and corrupt inputs end in a clear error that names the option or the file
and the cause; numpy scalars are taken as the numbers they are."""

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import qrkd
from qrkd import benchmark as qb
from qrkd import data
from qrkd.models import CheckpointError, TeacherCNN, load_checkpoint, save_checkpoint

# ------------------------------------------------------------------------------- DistillationLoss options (item 10)


@pytest.mark.parametrize("name", ["kd", "dr", "ar", "qk"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), np.float64("nan"), np.float32("inf")])
def test_non_finite_weights_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        qrkd.DistillationLoss(**{name: value})


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), np.float32(2.0)])
def test_kd_alpha_outside_zero_one_is_refused(value):
    with pytest.raises(ValueError, match="kd_alpha"):
        qrkd.DistillationLoss(kd_alpha=value)
    with pytest.raises(ValueError, match="alpha"):
        qrkd.KDLoss(alpha=value)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), np.float64(0.0)])
def test_temperature_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match="temperature"):
        qrkd.DistillationLoss(temperature=value)
    with pytest.raises(ValueError, match="temperature"):
        qrkd.KDLoss(temperature=value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kd_alpha="0.5"), "kd_alpha must be a number"),
        (dict(kd_alpha=None), "kd_alpha must be a number"),
        (dict(temperature="4"), "temperature must be a number"),
        (dict(kd=True), "kd must be a number"),
        (dict(dr=torch.tensor(0.1)), "dr must be a Python or numpy number"),
        (dict(temperature=torch.tensor(4.0)), "temperature must be a Python or numpy number"),
        (dict(zero_diagonal=1), "zero_diagonal must be a bool"),
        (dict(zero_diagonal="yes"), "zero_diagonal must be a bool"),
        (dict(zero_diagonal=None), "zero_diagonal must be a bool"),
        (dict(qk_from_merlin=0), "qk_from_merlin must be a bool"),
        (dict(qk_detach_student="no"), "qk_detach_student must be a bool"),
        (dict(qk_n_modes=6.0), "qk_n_modes must be an int"),
        (dict(qk_n_photons="3"), "qk_n_photons must be an int"),
        (dict(qk_seed=1.5), "qk_seed must be an int"),
    ],
)
def test_bad_option_types_name_the_option(kwargs, match):
    with pytest.raises(TypeError, match=match):
        qrkd.DistillationLoss(**kwargs)


def test_bad_zero_diagonal_of_the_distance_module():
    with pytest.raises(TypeError, match="zero_diagonal must be a bool"):
        qrkd.RKDDistanceLoss(zero_diagonal="false")


def test_numpy_scalars_are_the_numbers_they_hold():
    g = torch.Generator().manual_seed(0)
    logits_s, logits_t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    feat_s, feat_t = torch.randn(8, 5, generator=g), torch.randn(8, 7, generator=g)
    as_numpy = qrkd.DistillationLoss(
        kd=np.float32(0.1), dr=np.int64(1), ar=np.float64(0.25), qk=np.float32(0.5), qk_backend="merlin",
        qk_n_modes=np.int64(7), qk_n_photons=np.int32(3), temperature=np.float32(3.0), kd_alpha=np.float16(0.5),
        zero_diagonal=np.bool_(True), qk_seed=np.int64(2), qk_from_merlin=np.bool_(False),
    )
    as_python = qrkd.DistillationLoss(
        kd=float(np.float32(0.1)), dr=1, ar=0.25, qk=float(np.float32(0.5)), qk_backend="merlin", qk_n_modes=7,
        qk_n_photons=3, temperature=3.0, kd_alpha=0.5, zero_diagonal=True, qk_seed=2,
    )
    for loss in (as_numpy, as_python):
        assert type(loss.kd) is float and type(loss.temperature) is float and type(loss.kd_alpha) is float
        assert type(loss.zero_diagonal) is bool and type(loss.qk_n_modes) is int and type(loss.qk_seed) is int
    a = as_numpy(logits_s, logits_t, feat_s, feat_t)
    b = as_python(logits_s, logits_t, feat_s, feat_t)
    assert torch.equal(a, b) and as_numpy.last_terms.keys() == {"kd", "rkd_distance", "rkd_angle", "qk"}
    k = qrkd.KDLoss(temperature=np.int64(2), alpha=np.float32(0.25))
    assert torch.equal(k(logits_s, logits_t), qrkd.KDLoss(temperature=2.0, alpha=0.25)(logits_s, logits_t))


def test_photonic_kernel_takes_numpy_integers():
    a = qrkd.PhotonicFidelityKernel(np.int64(4), np.int32(6), n_photons=np.int64(3), seed=np.int64(1),
                                    angle_scale=np.float32(0.5))
    b = qrkd.PhotonicFidelityKernel(4, 6, n_photons=3, seed=1, angle_scale=float(np.float32(0.5)))
    assert type(a.input_size) is int and type(a.n_modes) is int
    x = torch.randn(5, 4)
    assert torch.equal(a(x), b(x))
    c = qrkd.PhotonicFidelityKernel(3, input_state=np.array([1, 0, 2, 0]))
    assert c.rows == [0, 2, 2]
    with pytest.raises(TypeError, match="angle_scale"):
        qrkd.PhotonicFidelityKernel(4, angle_scale=torch.tensor(1.0))


# ----------------------------------------------------------------------------------------- QRKD_BACKEND (item 10)


def test_unknown_qrkd_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv("QRKD_BACKEND", "garbage")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"QRKD_BACKEND must be 'auto' or one of .*'garbage'"):
        qrkd.rkd_distance_loss(x, x)
    with pytest.raises(ValueError, match="QRKD_BACKEND"):
        qrkd.DistillationLoss()(torch.randn(4, 10), torch.randn(4, 10), x, x)
    # an explicit backend= is not the variable's business
    qrkd.rkd_distance_loss(x, x, backend="torch")


def test_info_reports_the_qrkd_backend_variable(monkeypatch, capsys):
    from qrkd.cli import main

    monkeypatch.setenv("QRKD_BACKEND", "garbage")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "QRKD_BACKEND is set to an unknown value 'garbage'" in out and "auto picks:" in out
    monkeypatch.setenv("QRKD_BACKEND", "reference")
    assert main(["info"]) == 0
    assert "QRKD_BACKEND=reference replaces 'auto'" in capsys.readouterr().out
    monkeypatch.delenv("QRKD_BACKEND")
    assert main(["info"]) == 0
    assert "QRKD_BACKEND" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ corrupt MNIST (item 11)


def _write_mnist_split(raw: Path, prefix: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())


@pytest.fixture
def mnist_raw(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_mnist_split(raw, "train", 12)
    _write_mnist_split(raw, "t10k", 6, seed=1)
    return raw


def _truncate(path: Path, size: int):
    path.write_bytes(path.read_bytes()[:size])


CORRUPTIONS = {
    "empty images": ("train-images-idx3-ubyte", lambda p: p.write_bytes(b""), "empty"),
    "images cut in the header": ("train-images-idx3-ubyte", lambda p: _truncate(p, 10), "truncated"),
    "images cut in the data": ("train-images-idx3-ubyte", lambda p: _truncate(p, 16 + 5 * 784), "truncated"),
    "images with trailing bytes": ("train-images-idx3-ubyte", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 7),
                                   "longer than its header says"),
    "labels as images": ("train-images-idx3-ubyte",
                         lambda p: p.write_bytes((p.parent / "train-labels-idx1-ubyte").read_bytes()),
                         "magic number is 0x00000801"),
    "random bytes": ("train-images-idx3-ubyte", lambda p: p.write_bytes(os.urandom(3000)), "magic number"),
    "empty labels": ("train-labels-idx1-ubyte", lambda p: p.write_bytes(b""), "empty"),
    "labels cut": ("train-labels-idx1-ubyte", lambda p: _truncate(p, 8 + 5), "truncated"),
    "wrong label count": ("train-labels-idx1-ubyte",
                          lambda p: p.write_bytes(struct.pack(">II", 0x801, 10) + bytes(10)),
                          "10 labels but train-images-idx3-ubyte holds 12 images"),
    "label out of range": ("train-labels-idx1-ubyte",
                           lambda p: p.write_bytes(struct.pack(">II", 0x801, 12) + bytes(11) + b"\xc8"),
                           "label 200"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_mnist_file_names_the_file_and_the_cause(mnist_raw, case):
    name, corrupt, cause = CORRUPTIONS[case]
    corrupt(mnist_raw / name)
    with pytest.raises(data.DataCorruptError) as info:
        data.load_dataset("mnist", mnist_raw.parent.parent, train=True, download=False)
    message = str(info.value)
    assert str((mnist_raw / name).resolve()) in message and cause in message
    assert isinstance(info.value, data.DataNotFoundError)  # what callers already catch
    # the other split is untouched and still loads
    assert len(data.load_dataset("mnist", mnist_raw.parent.parent, train=False, download=False)) == 6


def test_corrupt_mnist_file_is_not_downloaded_over(mnist_raw, monkeypatch):
    (mnist_raw / "t10k-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(data.DataCorruptError, match="t10k-labels-idx1-ubyte is corrupt: the file is empty"):
        data.load_dataset("mnist", mnist_raw.parent.parent, train=False, download=True)


# --------------------------------------------------------------------------------------- bad checkpoints (item 11)


@pytest.mark.parametrize("content", ["random", "empty", "truncated", "text"])
def test_unreadable_checkpoint_never_advises_weights_only_false(tmp_path, content):
    good = tmp_path / "good.pt"
    save_checkpoint(TeacherCNN(), good)
    path = tmp_path / "bad.pt"
    path.write_bytes({"random": np.random.default_rng(0).bytes(4096), "empty": b"",
                      "truncated": good.read_bytes()[:300], "text": b"not a checkpoint\n"}[content])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "not a readable qrkd checkpoint" in message and str(path) in message
    assert "weights_only" not in message.lower() and "weights only" not in message.lower()
    assert "\n" not in message and "\x1b" not in message


def test_checkpoint_holding_foreign_objects_says_so(tmp_path):
    import argparse

    path = tmp_path / "unsafe.pt"
    torch.save({"format": "qrkd-checkpoint", "obj": argparse.Namespace(a=1)}, path)
    with pytest.raises(CheckpointError, match=r"argparse.Namespace") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)


# -------------------------------------------------------------------------------------- qrkd bench options (item 11)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--case-timeout", "0"], "--case-timeout"),
        (["--case-timeout", "-5"], "--case-timeout"),
        (["--case-timeout", "nan"], "--case-timeout"),
        (["--mem-limit-gb", "0"], "--mem-limit-gb"),
        (["--mem-limit-gb", "-1"], "--mem-limit-gb"),
        (["--max-minutes", "-1"], "--max-minutes"),
        (["--max-minutes", "inf"], "--max-minutes"),
        (["--merlin-max-n", "-3"], "--merlin-max-n"),
        (["--repeats", "0"], "--repeats"),
        (["--repeats", "2.5"], "--repeats"),
    ],
)
def test_bench_non_positive_limits_are_argument_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        qb.main(argv + ["--list"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"qrkd bench: error: argument {option}" in err and "Traceback" not in err


def test_bench_zero_max_minutes_still_means_no_limit(capsys):
    assert qb.main(["--max-minutes", "0", "--relations", "distance", "--list"]) == 0
    assert "error" not in capsys.readouterr().err


def _one_line_error(capsys, argv, fragment):
    assert qb.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qrkd bench: error:") and fragment in lines[0], captured.err


def test_bench_report_missing_or_binary_is_a_one_line_error(tmp_path, capsys):
    _one_line_error(capsys, ["--report", str(tmp_path / "missing.json")], "no such file")
    binary = tmp_path / "binary.json"
    binary.write_bytes(np.random.default_rng(1).bytes(512))
    _one_line_error(capsys, ["--report", str(binary)], "not a JSON results file")
    other = tmp_path / "other.json"
    other.write_text('{"results": 3}')
    _one_line_error(capsys, ["--report", str(other)], "not a results file of qrkd bench")
    _one_line_error(capsys, ["--report", str(tmp_path)], "is a folder")


def test_bench_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("not a folder")
    _one_line_error(capsys, ["--out", str(target), "--relations", "distance", "--no-plots"], "is a file, not a folder")
    assert target.read_text() == "not a folder"
