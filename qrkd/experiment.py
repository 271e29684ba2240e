"""`qrkd compare`: the seed experiment as one command.

A teacher CNN and student CNNs (scratch, KD, RKD, QRKD, ...) trained on a seeded subset of MNIST or CIFAR-10, for
one or several seeds. Writes <out>/<name>/: results.json, report.md (the table), accuracy.png (train/test curves,
mean over seeds) and one checkpoint per variant and seed; prints the table.

Within a seed every variant starts from the same RNG state (torch.manual_seed(seed) before the model is built) and
sees the same batches in the same order, so the students differ only by their loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .data import DATASETS, IN_CHANNELS, NUM_CLASSES, DataNotFoundError, default_data_root, make_loaders
from .losses import DistillationLoss
from .models import CheckpointError, StudentCNN, TeacherCNN, load_checkpoint, save_checkpoint
from .train import TrainConfig, evaluate, init_distributed, loss_backends, train_student, train_teacher

VARIANTS = ("teacher", "scratch", "kd", "rkd", "qrkd", "qrkd-simple")
DEFAULT_VARIANTS = ("teacher", "scratch", "kd", "rkd", "qrkd")
LABELS = {"teacher": "Teacher", "scratch": "Scratch", "kd": "KD", "rkd": "RKD", "qrkd": "QRKD",
          "qrkd-simple": "QRKD (simple)"}


def variant_weights(variant: str, args) -> DistillationLoss:
    """The seed notebook's DistillationLoss for each student variant."""
    common = dict(temperature=4.0, kd_alpha=0.5, backend=args.loss_backend)
    if variant == "scratch":
        return DistillationLoss(kd=0.0, dr=0.0, ar=0.0, qk=0.0, **common)
    if variant == "kd":
        return DistillationLoss(kd=0.5, dr=0.0, ar=0.0, qk=0.0, **common)
    if variant == "rkd":
        return DistillationLoss(kd=0.0, dr=0.1, ar=0.1, qk=0.0, **common)
    if variant in ("qrkd", "qrkd-simple"):
        qk_backend = "simple" if variant == "qrkd-simple" else args.qk_backend
        return DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend=qk_backend, qk_n_modes=args.qk_modes,
                                qk_n_photons=args.qk_photons, **common)
    raise ValueError(f"unknown student variant {variant!r}")


def _variants(text: str):
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"variants must be a comma list of {', '.join(VARIANTS)}; got {text!r}")
    return list(dict.fromkeys(names))


def _positive_int(text: str):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seeds(text: str):
    try:
        return [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrkd compare",
        description="Train a teacher and distilled students (the seed experiment) and compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: $QRKD_DATA_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download missing files")
    p.add_argument("--subset", type=int, default=10_000, help="training samples drawn per seed (0: all)")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--batch-size", type=_positive_int, default=128, help="global batch (split over processes)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=_seeds, default=[1337], help="one or more seeds, e.g. '1337 1 2' or 1337,1,2")
    p.add_argument("--variants", type=_variants, default=list(DEFAULT_VARIANTS),
                   help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--qk-backend", choices=("merlin", "simple"), default="merlin",
                   help="fidelity kernel of the qrkd variant (qrkd-simple always uses 'simple')")
    p.add_argument("--qk-modes", type=_positive_int, default=10, help="photonic kernel: modes m")
    p.add_argument("--qk-photons", type=_positive_int, default=5, help="photonic kernel: photons n")
    p.add_argument("--loss-backend", default="auto", help="backend of the relational losses (see `qrkd info`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--out", default="runs", help="output folder; results go to <out>/<name>/")
    p.add_argument("--name", default=None, help="run name (default: <dataset>-<date>-<time>)")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="reuse this teacher (a checkpoint written by qrkd) instead of training one")
    p.add_argument("--max-batches", type=_positive_int, default=None,
                   help="training batches per epoch (default: all; for quick runs)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is often faster on a busy machine")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------------------------------------- stats


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(runs, variants):
    """Per variant, over seeds: mean and std of train, test, acc_gap, ts_gap, dist_gain, seconds per epoch, wall."""
    summary = {}
    for variant in variants:
        rows = [run["variants"][variant] for run in runs if variant in run["variants"]]
        if not rows:
            continue
        cols = {}
        for key in ("train_acc", "test_acc", "acc_gap", "ts_gap", "dist_gain", "train_s_per_epoch",
                    "s_per_epoch", "wall_s"):
            mean, std = mean_std([row.get(key) for row in rows])
            cols[key] = None if mean is None else {"mean": mean, "std": std}
        cols["seeds"] = len(rows)
        summary[variant] = cols
    return summary


def _cell(stat, digits=2, signed=False):
    if stat is None:
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(stat["mean"])
    return text + f" ± {stat['std']:.{digits}f}" if stat.get("std") and stat["std"] > 0 else text


def format_table(summary, n_seeds: int) -> str:
    pm = f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else ""
    lines = [
        "| Variant | Train (%) | Test (%) | Acc. gap | T&S gap | Dist. gain | s/epoch (train) | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, cols in summary.items():
        lines.append(
            f"| {LABELS[variant]} | {_cell(cols['train_acc'])} | {_cell(cols['test_acc'])} | "
            f"{_cell(cols['acc_gap'], signed=True)} | {_cell(cols['ts_gap'], signed=True)} | "
            f"{_cell(cols['dist_gain'], signed=True)} | {_cell(cols['train_s_per_epoch'], 1)} | "
            f"{_cell(cols['wall_s'], 1)} |"
        )
    note = (f"Accuracies after the last epoch{pm}. Acc. gap = train - test; T&S gap = teacher test - student test; "
            "Dist. gain = student test - scratch test.")
    return "\n".join(lines) + "\n\n" + note + "\n"


# ---------------------------------------------------------------------------------------------------------- plots


def plot_accuracy(runs, variants, epochs: int, path: Path, title: str) -> None:
    """Train (solid markers o) and test (markers x) accuracy per epoch, mean over seeds, as the seed notebook plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1))]
    xs = list(range(1, epochs + 1))
    for i, variant in enumerate(variants):
        hists = [run["variants"][variant]["history"] for run in runs
                 if variant in run["variants"] and run["variants"][variant].get("history")]
        if not hists:
            continue
        for key, marker, suffix in (("train_acc", "o", "train"), ("test_acc", "x", "test")):
            curves = [h[key] for h in hists if len(h[key]) == epochs]
            if not curves:
                continue
            mean = [sum(c[e] for c in curves) / len(curves) for e in range(epochs)]
            ax.plot(xs, mean, label=f"{LABELS[variant]} {suffix}", marker=marker, color=f"C{i}",
                    linestyle=styles[i % len(styles)], alpha=1.0 if suffix == "train" else 0.7)
    ax.set_xticks(xs)
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title(title)
    ax.grid(True)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------------------------ run


def _log(ctx, *parts):
    if ctx is None or ctx.rank == 0:
        print(*parts, flush=True)


def run_seed(seed, args, cfg, device, ctx, out_dir: Path, teacher_ckpt):
    """Trains the requested variants for one seed; returns {"seed", "variants": {name: result}}."""
    world = ctx.world_size if ctx else 1
    rank = ctx.rank if ctx else 0
    in_channels, num_classes = IN_CHANNELS[args.dataset], NUM_CLASSES[args.dataset]
    torch.manual_seed(seed)
    if ctx is not None and rank != 0:
        torch.distributed.barrier()  # rank 0 downloads first
    train_loader, test_loader = make_loaders(
        args.dataset, args.data_root, subset=args.subset or None, batch_size=args.batch_size // world, seed=seed,
        download=not args.no_download, eval_batch_size=max(256, args.batch_size), num_replicas=world, rank=rank)
    if ctx is not None and rank == 0:
        torch.distributed.barrier()

    def reseed():
        torch.manual_seed(seed)
        if train_loader.generator is not None:
            train_loader.generator.manual_seed(seed)

    results, writer = {}, ctx is None or rank == 0
    seed_dir = out_dir / f"seed{seed}"
    students = [v for v in args.variants if v != "teacher"]
    needs_teacher = "teacher" in args.variants or any(variant_weights(v, args).uses_teacher for v in students)
    teacher = None
    if needs_teacher:
        start = time.perf_counter()
        if teacher_ckpt is not None:
            teacher, meta = load_checkpoint(teacher_ckpt, arch="TeacherCNN", in_channels=in_channels,
                                            num_classes=num_classes)
            teacher = teacher.to(device)
            history = None
            train_acc, test_acc = evaluate(teacher, train_loader, device), evaluate(teacher, test_loader, device)
            _log(ctx, f"[seed {seed}] teacher from {teacher_ckpt}: train {train_acc:.2f}%  test {test_acc:.2f}%")
        else:
            reseed()
            teacher, history = train_teacher(TeacherCNN(in_channels, num_classes), train_loader, cfg, test_loader)
            train_acc, test_acc = history["train_acc"][-1], history["test_acc"][-1]
        wall = time.perf_counter() - start
        results["teacher"] = _result(history, train_acc, test_acc, wall, {}, None)
        if teacher_ckpt is not None:
            results["teacher"]["checkpoint"] = str(teacher_ckpt)
        elif writer:
            path = seed_dir / "teacher.pt"
            save_checkpoint(teacher, path, variant="teacher", seed=seed, dataset=args.dataset, test_acc=test_acc)
            results["teacher"]["checkpoint"] = str(path)
        _log(ctx, f"[seed {seed}] {LABELS['teacher']}: test {test_acc:.2f}%  ({wall:.1f} s)")

    for variant in students:
        weights = variant_weights(variant, args)
        reseed()
        student = StudentCNN(in_channels, num_classes)
        start = time.perf_counter()
        out = train_student(student, teacher if weights.uses_teacher else None, train_loader, test_loader, cfg,
                            weights, student_name=variant)
        wall = time.perf_counter() - start
        backends_used = loss_backends(weights, device.type)
        results[variant] = _result(out["history"], out["train_acc"], out["test_acc"], wall, backends_used, weights)
        if writer:
            path = seed_dir / f"student_{variant}.pt"
            save_checkpoint(out["model"], path, variant=variant, seed=seed, dataset=args.dataset,
                            test_acc=out["test_acc"])
            results[variant]["checkpoint"] = str(path)
        _log(ctx, f"[seed {seed}] {LABELS[variant]}: test {out['test_acc']:.2f}%  ({wall:.1f} s)")

    teacher_test = results["teacher"]["test_acc"] if "teacher" in results else None
    scratch_test = results["scratch"]["test_acc"] if "scratch" in results else None
    for variant, res in results.items():
        if variant == "teacher":
            continue
        res["ts_gap"] = None if teacher_test is None else teacher_test - res["test_acc"]
        res["dist_gain"] = None if scratch_test is None or variant == "scratch" else res["test_acc"] - scratch_test
    return {"seed": seed, "variants": results}


def _result(history, train_acc, test_acc, wall, backends_used, weights):
    res = {"train_acc": train_acc, "test_acc": test_acc, "acc_gap": train_acc - test_acc, "ts_gap": None,
           "dist_gain": None, "wall_s": wall, "history": history, "loss_backends": backends_used}
    if history is not None:
        epochs = len(history["epoch_seconds"])
        res["train_s_per_epoch"] = sum(history["epoch_seconds"]) / epochs
        res["s_per_epoch"] = (sum(history["epoch_seconds"]) + sum(history["eval_seconds"])) / epochs
    if weights is not None:
        res["weights"] = {"kd": weights.kd, "dr": weights.dr, "ar": weights.ar, "qk": weights.qk,
                          "qk_backend": weights.qk_backend, "qk_n_modes": weights.qk_n_modes,
                          "qk_n_photons": weights.qk_n_photons, "temperature": weights.temperature,
                          "kd_alpha": weights.kd_alpha}
    return res


def _report(args, summary, runs, table, env, wall) -> str:
    lines = [
        f"# qrkd compare: {args.dataset}",
        "",
        f"subset {args.subset or 'all'}, batch {args.batch_size}, {args.epochs} epochs, lr {args.lr}, "
        f"seeds {', '.join(map(str, args.seeds))}, device {env['device']}"
        + (f" x {env['world_size']} processes" if env["world_size"] > 1 else "") + f"; total wall {wall:.1f} s.",
        "",
        table,
        "## Loss backends",
        "",
    ]
    for variant, res in runs[0]["variants"].items():
        if res.get("loss_backends"):
            used = ", ".join(f"{term}: {name}" for term, name in res["loss_backends"].items())
            lines.append(f"- {LABELS[variant]}: {used}")
    lines += ["", "## Time per variant", "", "| Variant | train s/epoch | train+eval s/epoch | wall (s) |",
              "|---|---:|---:|---:|"]
    for variant, cols in summary.items():
        lines.append(f"| {LABELS[variant]} | {_cell(cols['train_s_per_epoch'], 2)} | {_cell(cols['s_per_epoch'], 2)} "
                     f"| {_cell(cols['wall_s'], 1)} |")
    lines += ["", "![accuracy](accuracy.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (DataNotFoundError, CheckpointError, NotImplementedError, ValueError) as exc:
        if os.environ.get("QRKD_DEBUG"):
            raise
        hint = ""
        if isinstance(exc, NotImplementedError):
            hint = " (use --qk-backend simple, or the qrkd-simple variant)"
        print(f"qrkd compare: error: {exc}{hint}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.subset < 0:
        raise ValueError(f"--subset must be >= 0, got {args.subset}")
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data_root = Path(args.data_root) if args.data_root else default_data_root()
    teacher_ckpt = Path(args.teacher_checkpoint) if args.teacher_checkpoint else None
    if teacher_ckpt is not None:  # fail before any data is read or any model trained
        load_checkpoint(teacher_ckpt, arch="TeacherCNN", in_channels=IN_CHANNELS[args.dataset],
                        num_classes=NUM_CLASSES[args.dataset])
    width = min(StudentCNN().feature_dim, TeacherCNN().feature_dim)
    for variant in args.variants:  # builds each loss (and photonic kernel) once: bad options fail before training
        if variant != "teacher":
            weights = variant_weights(variant, args)
            if weights.qk > 0:
                weights._kernel(width, torch.device("cpu"))

    ctx, device = init_distributed(args.device)
    world = ctx.world_size if ctx else 1
    try:
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
        name = args.name or f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = Path(args.out) / name
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, device=str(device), verbose=not args.quiet,
                          max_batches=args.max_batches)
        env = {"qrkd": __version__, "torch": torch.__version__, "python": platform.python_version(),
               "device": str(device), "world_size": world, "threads": torch.get_num_threads()}
        _log(ctx, f"qrkd compare: {args.dataset} (data root {args.data_root}), variants {', '.join(args.variants)}, "
                  f"seeds {', '.join(map(str, args.seeds))}, device {device}" +
                  (f" x {world} processes" if world > 1 else "") + f" -> {out_dir}")
        start = time.perf_counter()
        runs = [run_seed(seed, args, cfg, device, ctx, out_dir, teacher_ckpt) for seed in args.seeds]
        wall = time.perf_counter() - start
        if ctx is not None and ctx.rank != 0:
            return 0
        shown = [v for v in VARIANTS if any(v in run["variants"] for run in runs)]  # + a teacher the students needed
        summary = summarise(runs, shown)
        table = format_table(summary, len(args.seeds))
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        results = {"config": config, "environment": env, "wall_s": wall, "summary": summary, "runs": runs}
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        title = f"KD vs RKD vs QRKD on {args.dataset.upper()}" + (f" ({args.subset} subset)" if args.subset else "")
        plot_accuracy(runs, shown, args.epochs, out_dir / "accuracy.png", title)
        (out_dir / "report.md").write_text(_report(args, summary, runs, table, env, wall))
        print()
        print(table)
        print(f"wrote {out_dir}/results.json, report.md, accuracy.png and checkpoints (total {wall:.1f} s)")
        return 0
    finally:
        if ctx is not None:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
