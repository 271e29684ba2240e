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
import shutil
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .backends import backend_status
from .data import DATASETS, IN_CHANNELS, NUM_CLASSES, DataNotFoundError, default_data_root, make_loaders
from .losses import DistillationLoss
from .models import CheckpointError, StudentCNN, TeacherCNN, load_checkpoint, save_checkpoint
from .report import LABELS, format_table, markdown_report, plot_accuracy, published_for, summarise
from .train import TrainConfig, batches_per_epoch, evaluate, init_distributed, train_student, train_teacher

VARIANTS = ("teacher", "scratch", "kd", "rkd", "qrkd", "qrkd-simple", "qrkd-detached")
DEFAULT_VARIANTS = ("teacher", "scratch", "kd", "rkd", "qrkd")
RELATIONAL = ("rkd", "qrkd", "qrkd-simple", "qrkd-detached")  # variants whose loss needs two or more samples

# Named configurations. "seed" is the seed notebook's (the default, `make demo`); "paper" is the setup of the
# published 10-epoch MNIST table: the whole training set, batch 64, Adam lr 1e-3, 10 epochs, every variant.
# An explicit flag always overrides its preset's value.
PRESETS = {
    "seed": {"subset": 10_000, "epochs": 3, "batch_size": 128, "lr": 1e-3, "seeds": [1337],
             "variants": list(DEFAULT_VARIANTS)},
    "paper": {"subset": 0, "epochs": 10, "batch_size": 64, "lr": 1e-3, "seeds": [42, 1, 2, 3, 4],
              "variants": ["teacher", "scratch", "kd", "rkd", "qrkd-simple", "qrkd", "qrkd-detached"]},
}

# the options that decide what is trained: a resumed run must agree with the interrupted one on all of them
TRAINING_OPTIONS = ("dataset", "subset", "epochs", "batch_size", "lr", "seeds", "variants", "qk_backend", "qk_modes",
                    "qk_photons", "loss_backend", "teacher_checkpoint", "max_batches")
RUN_FILES = ("run.json", "results.json", "report.md", "accuracy.png")


def variant_weights(variant: str, args) -> DistillationLoss:
    """The seed notebook's DistillationLoss for each student variant."""
    common = dict(temperature=4.0, kd_alpha=0.5, backend=args.loss_backend)
    if variant == "scratch":
        return DistillationLoss(kd=0.0, dr=0.0, ar=0.0, qk=0.0, **common)
    if variant == "kd":
        return DistillationLoss(kd=0.5, dr=0.0, ar=0.0, qk=0.0, **common)
    if variant == "rkd":
        return DistillationLoss(kd=0.0, dr=0.1, ar=0.1, qk=0.0, **common)
    if variant in ("qrkd", "qrkd-simple", "qrkd-detached"):
        qk_backend = "simple" if variant == "qrkd-simple" else args.qk_backend
        return DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend=qk_backend, qk_n_modes=args.qk_modes,
                                qk_n_photons=args.qk_photons, qk_detach_student=variant == "qrkd-detached",
                                **common)
    raise ValueError(f"unknown student variant {variant!r}")


def _variants(text: str):
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"variants must be a comma list of {', '.join(VARIANTS)}; got {text!r}")
    return list(dict.fromkeys(names))


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def convert(text: str):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return convert


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _seed_list(text: str):
    try:
        return [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None


def _positive_float(text: str):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrkd compare",
        description="Train a teacher and distilled students (the seed experiment) and compare them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    seed = PRESETS["seed"]
    p.add_argument("--preset", choices=tuple(PRESETS), default="seed",
                   help="named configuration: 'seed' is the seed notebook's, 'paper' the published table's (whole "
                        "training set, batch 64, 10 epochs, seeds 42 1 2 3 4, every variant); flags override it")
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (default: $QRKD_DATA_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download missing files")
    p.add_argument("--subset", type=_non_negative_int, default=None,
                   help=f"training samples drawn per seed (0: all; preset seed: {seed['subset']})")
    p.add_argument("--epochs", type=_positive_int, default=None, help=f"(preset seed: {seed['epochs']})")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"global batch, split over processes (preset seed: {seed['batch_size']})")
    p.add_argument("--lr", type=_positive_float, default=None, help=f"Adam's learning rate (preset seed: {seed['lr']})")
    p.add_argument("--seeds", type=_seed_list, nargs="+", default=None,
                   help="one or more seeds: '--seeds 1337 1 2' or '--seeds 1337,1,2' (preset seed: 1337)")
    p.add_argument("--variants", type=_variants, default=None,
                   help=f"comma list of {', '.join(VARIANTS)} (preset seed: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--qk-backend", choices=("merlin", "simple"), default="merlin",
                   help="fidelity kernel of the qrkd and qrkd-detached variants (qrkd-simple always uses 'simple')")
    p.add_argument("--qk-modes", type=_positive_int, default=10, help="photonic kernel: modes m")
    p.add_argument("--qk-photons", type=_positive_int, default=5, help="photonic kernel: photons n")
    p.add_argument("--loss-backend", default="auto", help="backend of the relational losses (see `qrkd info`)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--out", default="runs", help="output folder; results go to <out>/<name>/")
    p.add_argument("--name", default=None, help="run name (default: <dataset>-<date>-<time>)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted run <out>/<name> from its last finished epoch")
    again.add_argument("--overwrite", action="store_true", help="replace an existing run <out>/<name>")
    p.add_argument("--teacher-checkpoint", default=None,
                   help="reuse this teacher (a checkpoint written by qrkd) instead of training one")
    p.add_argument("--max-batches", type=_positive_int, default=None,
                   help="training batches per epoch (default: all; for quick runs)")
    p.add_argument("--threads", type=_non_negative_int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is often faster on a busy machine")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line and fills every option left unset from the preset."""
    args = build_parser().parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    if args.seeds and isinstance(args.seeds[0], list):  # nargs="+" of comma lists
        args.seeds = [s for group in args.seeds for s in group]
    return args


# ------------------------------------------------------------------------------------------------------------ run


def _log(ctx, *parts):
    if ctx is None or ctx.rank == 0:
        print(*parts, flush=True)


class _RunProgress:
    """One bar over every training batch of the whole run (all seeds and variants): its remaining time is the run's."""

    def __init__(self, args, ctx, trained_per_seed: int):
        self.enabled = not args.quiet and (ctx is None or ctx.rank == 0)
        self.models = len(args.seeds) * trained_per_seed
        self.args, self.bar = args, None

    def start(self, batches_per_epoch: int):
        if self.enabled and self.bar is None and self.models:
            from tqdm.auto import tqdm

            interval = 0.5 if sys.stderr.isatty() else 30.0
            total = self.models * self.args.epochs * batches_per_epoch
            self.bar = tqdm(total=total, desc="run", unit="batch", dynamic_ncols=True, mininterval=interval,
                            smoothing=0.05, position=0)
        return self.bar

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_seed(seed, args, cfg, device, ctx, out_dir: Path, teacher_ckpt, progress: _RunProgress | None = None):
    """Trains the requested variants for one seed; returns {"seed", "variants": {name: result}}. Every model's
    training state is saved after each epoch in <out_dir>/seed<S>/state_<variant>.pt, and a model whose state file
    exists continues from it (a finished one is not trained again)."""
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
    run_bar = progress.start(batches_per_epoch(train_loader, cfg)) if progress is not None else None

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
            wall = time.perf_counter() - start
            _log(ctx, f"[seed {seed}] teacher from {teacher_ckpt}: train {train_acc:.2f}%  test {test_acc:.2f}%")
        else:
            reseed()
            teacher, history = train_teacher(TeacherCNN(in_channels, num_classes), train_loader, cfg, test_loader,
                                             state_path=seed_dir / "state_teacher.pt", run_bar=run_bar)
            train_acc, test_acc = history["train_acc"][-1], history["test_acc"][-1]
            wall = sum(history["wall_seconds"])
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
        out = train_student(student, teacher if weights.uses_teacher else None, train_loader, test_loader, cfg,
                            weights, student_name=variant, state_path=seed_dir / f"state_{variant}.pt",
                            run_bar=run_bar)
        wall = sum(out["history"]["wall_seconds"])
        backends_used = weights.term_backends(device.type)
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
    train_samples = len(train_loader.dataset)
    return {"seed": seed, "train_samples": train_samples, "test_samples": len(test_loader.dataset),
            "variants": results}


def _result(history, train_acc, test_acc, wall, backends_used, weights):
    res = {"train_acc": train_acc, "test_acc": test_acc, "acc_gap": train_acc - test_acc, "ts_gap": None,
           "dist_gain": None, "wall_s": wall, "history": history, "loss_backends": backends_used}
    if history is not None:
        epochs = len(history["step_seconds"])
        res["train_s_per_epoch"] = sum(history["step_seconds"]) / epochs
        res["s_per_epoch"] = sum(history["wall_seconds"]) / epochs
    if weights is not None:
        res["weights"] = weights.settings()
    return res


def main(argv=None) -> int:
    args = parse_args(argv)
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


def _check_options(args) -> None:
    """Every option that can be wrong is checked here, before any data is read or any model trained."""
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds repeats {', '.join(map(str, repeated))}: each seed is one paired replicate")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.loss_backend != "auto":
        status = backend_status()
        if args.loss_backend not in status:
            raise ValueError(f"--loss-backend must be 'auto' or one of {', '.join(status)}; got {args.loss_backend!r}")
        ok, detail = status[args.loss_backend]
        if not ok:
            raise ValueError(f"--loss-backend {args.loss_backend!r} is not available here ({detail}); available: "
                             f"{', '.join(n for n, (a, _) in status.items() if a)}")
    relational = [v for v in args.variants if v in RELATIONAL]
    if relational and args.batch_size < 2:
        raise ValueError(f"--batch-size {args.batch_size} leaves the relational terms of {', '.join(relational)} "
                         "nothing to relate (they are 0 for one sample): use a batch of at least 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file, not a folder")


def _prepare_run_dir(args, out_dir: Path, config: dict) -> bool:
    """Refuses to mix with an earlier run unless --overwrite or --resume says what to do. Returns True when
    resuming."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a run folder")
    earlier = out_dir.is_dir() and (any((out_dir / f).exists() for f in RUN_FILES) or any(out_dir.glob("seed*")))
    if args.resume:
        if not (out_dir / "run.json").is_file():
            raise ValueError(f"--resume: {out_dir} holds no run to resume (no run.json)")
        saved = json.loads((out_dir / "run.json").read_text())["config"]
        differ = [k for k in TRAINING_OPTIONS if saved.get(k) != config.get(k)]
        if differ:
            raise ValueError("--resume: the options differ from the interrupted run's: " + "; ".join(
                f"{k} was {saved.get(k)!r}, now {config.get(k)!r}" for k in differ))
        return True
    if earlier and not args.overwrite:
        raise ValueError(f"{out_dir} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                         "or choose another --name")
    if earlier:  # --overwrite: remove what an earlier run wrote, nothing else
        for f in RUN_FILES:
            (out_dir / f).unlink(missing_ok=True)
        for d in out_dir.glob("seed*"):
            if d.is_dir():
                shutil.rmtree(d)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.json").write_text(json.dumps({"config": config}, indent=2))
    return False


def _run(args) -> int:
    _check_options(args)
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
            variant_weights(variant, args).kernel_for(width)

    ctx, device = init_distributed(args.device)
    world = ctx.world_size if ctx else 1
    try:
        if args.batch_size % world:
            raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
        name = args.name or f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
        out_dir = Path(args.out) / name
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        resumed = False
        if ctx is None or ctx.rank == 0:
            resumed = _prepare_run_dir(args, out_dir, config)
        if ctx is not None:
            flag = [resumed]
            torch.distributed.broadcast_object_list(flag, src=0)
            resumed = flag[0]
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, device=str(device), verbose=not args.quiet,
                          max_batches=args.max_batches)
        env = {"qrkd": __version__, "torch": torch.__version__, "python": platform.python_version(),
               "device": str(device), "world_size": world, "threads": torch.get_num_threads(), "resumed": resumed}
        _log(ctx, f"qrkd compare: {args.dataset} (data root {args.data_root}), preset {args.preset}, variants "
                  f"{', '.join(args.variants)}, seeds {', '.join(map(str, args.seeds))}, {args.epochs} epochs, "
                  f"batch {args.batch_size}, device {device}" + (f" x {world} processes" if world > 1 else "")
                  + f" -> {out_dir}" + (" (resuming)" if resumed else ""))
        trained = sum(1 for v in args.variants if v != "teacher") + (teacher_ckpt is None and (
            "teacher" in args.variants or any(variant_weights(v, args).uses_teacher for v in args.variants
                                              if v != "teacher")))
        progress = _RunProgress(args, ctx, trained)
        start = time.perf_counter()
        try:
            runs = [run_seed(seed, args, cfg, device, ctx, out_dir, teacher_ckpt, progress) for seed in args.seeds]
        finally:
            progress.close()
        session_wall = time.perf_counter() - start
        if ctx is not None and ctx.rank != 0:
            return 0
        for run in runs:
            if args.subset and run["train_samples"] < args.subset:
                _log(ctx, f"note: --subset {args.subset} exceeds the {run['train_samples']} training samples of "
                          f"{args.dataset}: seed {run['seed']} used all {run['train_samples']}")
        wall = sum(res["wall_s"] for run in runs for res in run["variants"].values())
        shown = [v for v in VARIANTS if any(v in run["variants"] for run in runs)]  # + a teacher the students needed
        summary = summarise(runs, shown)
        table = format_table(summary, len(args.seeds), published_for(args))
        results = {"config": config, "environment": env, "wall_s": wall, "session_wall_s": session_wall,
                   "summary": summary, "runs": runs}
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        title = f"{args.dataset.upper()}: test accuracy per epoch" + (f" ({args.subset} subset)" if args.subset else "")
        plot_accuracy(runs, shown, args.epochs, out_dir / "accuracy.png", title)
        (out_dir / "report.md").write_text(markdown_report(args, summary, runs, table, env, wall, session_wall))
        print()
        print(table)
        print(f"wrote {out_dir}/results.json, report.md, accuracy.png and checkpoints (training and evaluation "
              f"{wall:.1f} s; this invocation {session_wall:.1f} s)")
        return 0
    finally:
        if ctx is not None:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
