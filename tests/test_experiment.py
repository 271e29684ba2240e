"""`qrkd compare` as a long run: presets, resume after an interrupt, never overwriting a run, options refused
before any training, and the statistics of the report."""

import json
import math

import pytest
import torch

from qrkd import DistillationLoss, experiment, train
from qrkd.experiment import parse_args
from qrkd.report import paired_difference, t_quantile

from test_data import write_mnist


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("mnist"), n_train=96, n_test=32)


def compare(root, out, *extra):
    argv = ["--data-root", str(root), "--no-download", "--subset", "64", "--epochs", "2", "--batch-size", "32",
            "--out", str(out), "--quiet", *extra]
    return experiment.main(argv)


def results(out, name):
    return json.loads((out / name / "results.json").read_text())


# ------------------------------------------------------------------------------------------------------- presets


def test_paper_preset_and_explicit_flags_override_it():
    args = parse_args(["--preset", "paper"])
    assert (args.subset, args.batch_size, args.epochs, args.lr) == (0, 64, 10, 1e-3)
    assert len(args.seeds) >= 5 and 42 in args.seeds
    assert set(args.variants) == {"teacher", "scratch", "kd", "rkd", "qrkd-simple", "qrkd", "qrkd-detached"}
    args = parse_args(["--preset", "paper", "--epochs", "3", "--seeds", "7", "8"])
    assert args.epochs == 3 and args.seeds == [7, 8] and args.batch_size == 64
    default = parse_args([])
    assert (default.subset, default.batch_size, default.epochs, default.seeds) == (10_000, 128, 3, [1337])


def test_seeds_accept_the_readme_forms():
    assert parse_args(["--seeds", "1337", "1", "2"]).seeds == [1337, 1, 2]
    assert parse_args(["--seeds", "1337,1,2"]).seeds == [1337, 1, 2]
    assert parse_args(["--seeds", "1337", "1,2"]).seeds == [1337, 1, 2]


# ------------------------------------------------------------------------------------------------ resume, names


def test_interrupted_run_resumes_to_the_same_numbers(mnist_root, tmp_path, monkeypatch):
    variants = ["--variants", "teacher,scratch,qrkd-simple", "--seeds", "3,4"]
    assert compare(mnist_root, tmp_path, "--name", "whole", *variants) == 0

    # Ctrl-C in the second run right after its third epoch checkpoint: seed 3's teacher is done (2 epochs) and its
    # scratch student has finished epoch 1 of 2
    real_save, saves = train._save_state, []

    def save_then_interrupt(*a, **k):
        real_save(*a, **k)
        saves.append(a[0])
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_state", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        compare(mnist_root, tmp_path, "--name", "cut", *variants)
    monkeypatch.setattr(train, "_save_state", real_save)
    assert not (tmp_path / "cut" / "results.json").exists()

    # the same name without --resume is refused, naming the ways forward
    assert compare(mnist_root, tmp_path, "--name", "cut", *variants) == 2
    assert compare(mnist_root, tmp_path, "--name", "cut", "--resume", *variants) == 0
    whole, cut = results(tmp_path, "whole"), results(tmp_path, "cut")
    assert cut["environment"]["resumed"] is True
    for a, b in zip(whole["runs"], cut["runs"]):
        for variant in ("teacher", "scratch", "qrkd-simple"):
            ha, hb = a["variants"][variant]["history"], b["variants"][variant]["history"]
            for key in train.HISTORY_KEYS:
                assert ha[key] == hb[key], (a["seed"], variant, key)
            assert a["variants"][variant]["test_acc"] == b["variants"][variant]["test_acc"]
    # a finished run resumed again trains nothing and rewrites the same report numbers
    assert compare(mnist_root, tmp_path, "--name", "cut", "--resume", *variants) == 0
    again = results(tmp_path, "cut")
    assert again["summary"]["qrkd-simple"]["test_acc"] == cut["summary"]["qrkd-simple"]["test_acc"]


def test_resume_refuses_other_options_and_missing_runs(mnist_root, tmp_path, capsys):
    assert compare(mnist_root, tmp_path, "--name", "r", "--variants", "scratch") == 0
    capsys.readouterr()
    assert compare(mnist_root, tmp_path, "--name", "r", "--resume", "--variants", "scratch", "--lr", "0.01") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "lr" in err
    assert compare(mnist_root, tmp_path, "--name", "nothing", "--resume", "--variants", "scratch") == 2
    assert "no run to resume" in capsys.readouterr().err


def test_existing_run_is_refused_or_replaced_whole(mnist_root, tmp_path, capsys):
    assert compare(mnist_root, tmp_path, "--name", "x", "--variants", "scratch,kd") == 0
    before = (tmp_path / "x" / "results.json").read_text()
    capsys.readouterr()
    assert compare(mnist_root, tmp_path, "--name", "x", "--variants", "scratch") == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err and "Traceback" not in err
    assert (tmp_path / "x" / "results.json").read_text() == before
    assert compare(mnist_root, tmp_path, "--name", "x", "--variants", "scratch", "--overwrite") == 0
    seed_dir = tmp_path / "x" / "seed1337"
    assert not (seed_dir / "student_kd.pt").exists() and not (seed_dir / "state_kd.pt").exists()
    assert set(results(tmp_path, "x")["runs"][0]["variants"]) == {"scratch"}


# ------------------------------------------------------------------------------- options refused before training


@pytest.mark.parametrize("extra, message", [
    (["--loss-backend", "nonsense"], "--loss-backend"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--seeds", ""], "--seeds"),
    (["--seeds", "1", "2", "1"], "repeats 1"),
    (["--batch-size", "1", "--variants", "scratch,rkd"], "--batch-size 1"),
])
def test_bad_options_fail_before_any_training(mnist_root, tmp_path, capsys, monkeypatch, extra, message):
    def no_training(*a, **k):
        raise AssertionError("trained before the options were checked")

    monkeypatch.setattr(experiment, "train_teacher", no_training)
    monkeypatch.setattr(experiment, "train_student", no_training)
    try:
        rc = compare(mnist_root, tmp_path, "--name", "bad", *extra)
    except SystemExit as exc:  # argparse's own refusals exit 2 with a usage line
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_out_naming_a_file_is_refused(mnist_root, tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    assert compare(mnist_root, target, "--variants", "scratch") == 2
    assert "is a file" in capsys.readouterr().err


def test_subset_above_the_data_set_records_what_was_used(mnist_root, tmp_path, capsys):
    assert compare(mnist_root, tmp_path, "--name", "big", "--variants", "scratch", "--subset", "100000",
                   "--max-batches", "1") == 0
    run = results(tmp_path, "big")["runs"][0]
    assert run["train_samples"] == 96 and run["test_samples"] == 32
    assert "exceeds the 96 training samples" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------- statistics


def test_t_quantiles_match_the_tables():
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.95, df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(0.99, 4) == pytest.approx(4.6041, abs=1e-4)


def test_paired_difference_interval():
    a, b = [91.0, 93.0, 92.0, 95.0, 94.0], [90.0, 90.5, 91.0, 91.5, 92.0]
    diff = paired_difference(a, b)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    half = 2.7764451 * sd / math.sqrt(5)
    assert diff["mean"] == pytest.approx(mean) and diff["std"] == pytest.approx(sd)
    assert diff["ci_low"] == pytest.approx(mean - half) and diff["ci_high"] == pytest.approx(mean + half)
    assert diff["contains_zero"] is False
    assert paired_difference([1.0, 2.0], [2.0, 1.0])["contains_zero"] is True
    assert paired_difference([1.0], [2.0]) is None


def test_summary_agrees_with_the_per_seed_numbers(mnist_root, tmp_path):
    assert compare(mnist_root, tmp_path, "--name", "s", "--variants", "scratch,kd,rkd", "--seeds", "1", "2",
                   "3", "--epochs", "1") == 0
    res = results(tmp_path, "s")
    tests = {v: [run["variants"][v]["test_acc"] for run in res["runs"]] for v in ("scratch", "kd", "rkd")}
    kd = res["summary"]["kd"]
    assert kd["test_acc"]["mean"] == pytest.approx(sum(tests["kd"]) / 3)
    expected = paired_difference(tests["kd"], tests["scratch"])
    assert kd["vs_scratch"]["mean"] == pytest.approx(expected["mean"])
    assert kd["vs_scratch"]["ci_low"] == pytest.approx(expected["ci_low"])
    assert res["summary"]["rkd"]["vs_rkd"] is None and "vs_scratch" not in res["summary"]["scratch"]
    report = (tmp_path / "s" / "report.md").read_text()
    assert "Test - Scratch" in report and "95% t confidence interval" in report
    for run in res["runs"]:
        for v in run["variants"].values():
            h = v["history"]
            assert all(0 < s <= e for s, e in zip(h["step_seconds"], h["epoch_seconds"]))
            assert v["train_s_per_epoch"] == pytest.approx(sum(h["step_seconds"]))


# ------------------------------------------------------------------------------------------ the detached variant


def test_detached_kernel_term_has_the_value_and_no_gradient():
    torch.manual_seed(0)
    fs, ft = torch.randn(16, 4, dtype=torch.float64, requires_grad=True), torch.randn(16, 31, dtype=torch.float64)
    ls, lt = torch.randn(16, 10, dtype=torch.float64, requires_grad=True), torch.randn(16, 10, dtype=torch.float64)
    common = dict(kd=0.5, dr=0.1, ar=0.1, qk_n_modes=6, qk_n_photons=3)
    with_grad = DistillationLoss(qk=0.1, qk_backend="merlin", **common)
    detached = DistillationLoss(qk=0.1, qk_backend="merlin", qk_detach_student=True, **common)
    without = DistillationLoss(qk=0.0, **common)
    value = detached(ls, lt, fs, ft)
    assert value.item() == pytest.approx(with_grad(ls, lt, fs, ft).item(), rel=1e-12)
    g_detached = torch.autograd.grad(value, fs)[0]
    g_without = torch.autograd.grad(without(ls, lt, fs, ft), fs)[0]
    g_with = torch.autograd.grad(with_grad(ls, lt, fs, ft), fs)[0]
    assert torch.allclose(g_detached, g_without, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(g_with, g_without, rtol=1e-6, atol=1e-10)
    with pytest.raises(TypeError, match="qk_detach_student"):
        DistillationLoss(qk_detach_student=1)
