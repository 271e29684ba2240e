"""qrkd.train and `qrkd compare` on tiny MNIST/CIFAR-format files written by the tests."""

import json

import pytest
import torch
import torch.nn.functional as F

from qrkd import DistillationLoss, data
from qrkd import experiment
from qrkd.models import StudentCNN, TeacherCNN, load_checkpoint, save_checkpoint
from qrkd.train import HISTORY_KEYS, TrainConfig, evaluate, step_losses, train_student, train_teacher

from test_data import write_cifar10, write_mnist


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=192, n_test=64)


def loaders(root, seed=0, batch=32, subset=None):
    return data.make_loaders("mnist", root, subset=subset, batch_size=batch, seed=seed, download=False)


def test_config_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="max_batches"):
        TrainConfig(max_batches=0)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            TrainConfig(device="cuda")
    assert TrainConfig(device="auto").torch_device().type in ("cpu", "cuda")


def test_teacher_learns_and_history_has_the_seed_keys(mnist_root):
    train, test = loaders(mnist_root)
    torch.manual_seed(0)
    teacher, hist = train_teacher(TeacherCNN(), train, TrainConfig(epochs=4, lr=3e-3), test)
    for key in HISTORY_KEYS + ("epoch_seconds", "eval_seconds"):
        assert len(hist[key]) == 4, key
    assert hist["distill"] == [0.0] * 4
    assert hist["loss"] == hist["task"]
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["train_acc"][-1] > 30.0  # 10 classes: chance is 10 %
    assert hist["test_acc"][-1] == pytest.approx(evaluate(teacher, test))
    _, hist_no_test = train_teacher(TeacherCNN(), train, TrainConfig(epochs=1, max_batches=2))
    assert hist_no_test["test_acc"] == [] and len(hist_no_test["train_acc"]) == 1


def test_training_is_deterministic_for_a_seed(mnist_root):
    def run():
        torch.manual_seed(5)
        train, test = loaders(mnist_root, seed=5, subset=100)
        teacher, _ = train_teacher(TeacherCNN(), train, TrainConfig(epochs=1), test)
        torch.manual_seed(5)
        weights = DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend="simple")
        out = train_student(StudentCNN(), teacher, train, test, TrainConfig(epochs=2), weights)
        return out

    a, b = run(), run()
    assert a["history"]["loss"] == b["history"]["loss"] and a["test_acc"] == b["test_acc"]
    for pa, pb in zip(a["model"].parameters(), b["model"].parameters()):
        assert torch.equal(pa, pb)


def test_student_variants(mnist_root):
    train, test = loaders(mnist_root)
    torch.manual_seed(0)
    teacher, _ = train_teacher(TeacherCNN(), train, TrainConfig(epochs=1), test)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = TrainConfig(epochs=2, max_batches=3)
    scratch = train_student(StudentCNN(), None, train, test, cfg, DistillationLoss(kd=0.0, dr=0.0, ar=0.0, qk=0.0))
    assert scratch["history"]["distill"] == [0.0, 0.0]
    assert scratch["test_acc"] == scratch["history"]["test_acc"][-1]
    for weights in (DistillationLoss(kd=0.5, dr=0.0, ar=0.0, qk=0.0),
                    DistillationLoss(kd=0.0, dr=0.1, ar=0.1, qk=0.0),
                    DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend="simple")):
        out = train_student(StudentCNN(), teacher, train, test, cfg, weights, student_name="s")
        hist = out["history"]
        assert all(d > 0 for d in hist["distill"])
        for total, task, distill in zip(hist["loss"], hist["task"], hist["distill"]):
            assert total == pytest.approx(task + distill)
        assert set(HISTORY_KEYS) <= set(hist) and len(hist["train_acc"]) == 2
    for k, v in teacher.state_dict().items():  # the teacher is never trained by a student
        assert torch.equal(v, frozen[k])


def test_step_losses_is_cross_entropy_plus_the_distillation_loss():
    torch.manual_seed(0)
    logits_s, logits_t = torch.randn(9, 10, requires_grad=True), torch.randn(9, 10)
    feat_s, feat_t = torch.randn(9, 4, requires_grad=True), torch.randn(9, 31)
    labels = torch.randint(0, 10, (9,))
    weights = DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend="simple", backend="reference")
    total, task, distill = step_losses(weights, logits_s, labels, feat_s, logits_t, feat_t)
    torch.testing.assert_close(task, F.cross_entropy(logits_s, labels))
    torch.testing.assert_close(distill, weights(logits_s, logits_t, feat_s, feat_t))
    torch.testing.assert_close(total, task + distill)
    with pytest.raises(ValueError, match="teacher"):
        step_losses(weights, logits_s, labels, feat_s)


def test_bad_arguments(mnist_root):
    train, test = loaders(mnist_root)
    cfg = TrainConfig(epochs=1, max_batches=1)
    with pytest.raises(ValueError, match="teacher is None"):
        train_student(StudentCNN(), None, train, test, cfg, DistillationLoss(kd=0.5, dr=0.0, ar=0.0))
    with pytest.raises(TypeError, match="weights"):
        train_student(StudentCNN(), None, train, test, cfg, {"kd": 0.5})
    with pytest.raises(TypeError, match="cfg"):
        train_teacher(TeacherCNN(), train, {"epochs": 1})
    with pytest.raises(TypeError, match="model"):
        train_teacher("teacher", train, cfg)


# ----------------------------------------------------------------------------------------------------- compare


def compare(root, out, *extra):
    argv = ["--data-root", str(root), "--no-download", "--subset", "96", "--epochs", "2", "--batch-size", "32",
            "--out", str(out), "--quiet", *extra]
    return experiment.main(argv)


def test_compare_writes_results_report_plot_and_checkpoints(mnist_root, tmp_path, capsys):
    rc = compare(mnist_root, tmp_path, "--name", "run", "--variants", "teacher,scratch,kd,rkd,qrkd-simple",
                 "--seeds", "3,4")
    out = capsys.readouterr().out
    assert rc == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert [r["seed"] for r in results["runs"]] == [3, 4]
    for r in results["runs"]:
        v = r["variants"]
        assert set(v) == {"teacher", "scratch", "kd", "rkd", "qrkd-simple"}
        assert v["kd"]["ts_gap"] == pytest.approx(v["teacher"]["test_acc"] - v["kd"]["test_acc"])
        assert v["kd"]["dist_gain"] == pytest.approx(v["kd"]["test_acc"] - v["scratch"]["test_acc"])
        assert v["rkd"]["acc_gap"] == pytest.approx(v["rkd"]["train_acc"] - v["rkd"]["test_acc"])
        assert v["scratch"]["dist_gain"] is None and v["teacher"]["ts_gap"] is None
        assert v["qrkd-simple"]["loss_backends"].keys() == {"kd", "rkd_distance", "rkd_angle",
                                                            "fidelity_kernel(simple)"}
        assert v["scratch"]["loss_backends"] == {}
        assert len(v["kd"]["history"]["test_acc"]) == 2 and v["kd"]["train_s_per_epoch"] > 0
        for name, res in v.items():
            model, meta = load_checkpoint(res["checkpoint"])
            assert meta["seed"] == r["seed"] and meta["variant"] == name
            assert type(model).__name__ == ("TeacherCNN" if name == "teacher" else "StudentCNN")
    tests = [r["variants"]["kd"]["test_acc"] for r in results["runs"]]
    summary = results["summary"]["kd"]["test_acc"]
    assert summary["mean"] == pytest.approx(sum(tests) / 2)
    assert summary["std"] == pytest.approx(abs(tests[0] - tests[1]) / 2**0.5)
    report = (run / "report.md").read_text()
    for column in ("Train", "Test", "Acc. gap", "T&S gap", "Dist. gain"):
        assert column in report and column in out
    assert "±" in report and "QRKD (simple)" in out
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_variants_share_init_and_batches(mnist_root, tmp_path):
    # qrkd with --qk-backend simple and qrkd-simple are the same loss: same seed -> identical students
    assert compare(mnist_root, tmp_path, "--name", "same", "--variants", "qrkd,qrkd-simple",
                   "--qk-backend", "simple") == 0
    v = json.loads((tmp_path / "same" / "results.json").read_text())["runs"][0]["variants"]
    assert v["qrkd"]["history"]["loss"] == v["qrkd-simple"]["history"]["loss"]
    assert "teacher" in v  # trained because the students need one, and reported
    assert "teacher" in json.loads((tmp_path / "same" / "results.json").read_text())["summary"]


def test_compare_reuses_a_teacher_checkpoint(mnist_root, tmp_path):
    torch.manual_seed(0)
    teacher = TeacherCNN()
    path = tmp_path / "teacher.pt"
    save_checkpoint(teacher, path)
    assert compare(mnist_root, tmp_path, "--name", "reuse", "--variants", "teacher,kd",
                   "--teacher-checkpoint", str(path)) == 0
    v = json.loads((tmp_path / "reuse" / "results.json").read_text())["runs"][0]["variants"]
    assert v["teacher"]["history"] is None and v["teacher"]["checkpoint"] == str(path)
    train, test = loaders(mnist_root)
    assert v["teacher"]["test_acc"] == pytest.approx(evaluate(teacher, test))


def test_compare_clear_errors(mnist_root, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert compare(mnist_root, tmp_path, "--teacher-checkpoint", str(corrupt)) == 2
    err = capsys.readouterr().err
    assert "not a readable qrkd checkpoint" in err and "Traceback" not in err

    student = tmp_path / "student.pt"
    save_checkpoint(StudentCNN(), student)
    assert compare(mnist_root, tmp_path, "--teacher-checkpoint", str(student)) == 2
    assert "expected arch='TeacherCNN'" in capsys.readouterr().err

    assert compare(tmp_path / "empty", tmp_path, "--variants", "scratch") == 2
    err = capsys.readouterr().err
    assert "mnist data not found" in err and str((tmp_path / "empty" / "MNIST" / "raw").resolve()) in err

    assert compare(mnist_root, tmp_path, "--variants", "qrkd", "--qk-photons", "11") == 2
    assert "n_photons" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        experiment.main(["--variants", "kd,nonsense"])


def test_compare_cifar10(tmp_path):
    root = write_cifar10(tmp_path / "cifar", n_per_batch=16, n_test=16)
    rc = experiment.main(["--dataset", "cifar10", "--data-root", str(root), "--no-download", "--subset", "0",
                          "--epochs", "1", "--batch-size", "16", "--variants", "teacher,rkd", "--out",
                          str(tmp_path), "--name", "c", "--quiet"])
    assert rc == 0
    v = json.loads((tmp_path / "c" / "results.json").read_text())["runs"][0]["variants"]
    model, _ = load_checkpoint(v["rkd"]["checkpoint"], in_channels=3)
    assert model.conv1.in_channels == 3


def test_cli_forwards_compare_options(capsys):
    from qrkd import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "--help"])
    assert info.value.code == 0
    assert "--teacher-checkpoint" in capsys.readouterr().out
