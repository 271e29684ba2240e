"""The seed's thin trainer (DESIGN.md section 7): TrainConfig, train_teacher, train_student, and the distributed path.

One student step: loss = cross_entropy(student logits, labels) + DistillationLoss(logits_s, logits_t, feat_s, feat_t),
the teacher in eval mode under no_grad, Adam. History per epoch: mean total loss, mean task loss, mean distillation
loss (over the epoch's batches) and train/test accuracy (%) in eval mode over the whole training set and test set.

Distributed (torch.distributed initialised with world size K > 1, e.g. under torchrun): the model is wrapped in
DistributedDataParallel and every loss is arranged so that, after DDP averages the gradients over the K processes,
they equal those of one process on the concatenated (global) batch:
- cross-entropy and KD are per-sample means: each process scales its local mean by K * n_local / N_global;
- the relational losses see the global batch: student features are gathered with gradient (backward sums the
  gradient over processes and keeps this process's rows), teacher features without. RKD distance and the kernel
  term are computed whole on every process (O(N^2)); the angle loss (O(N^3)) is split by anchors, process r taking
  a contiguous 1/K of them, and its share is multiplied by K.
The trainer scales its cross-entropy and hands DistillationLoss a BatchShard (this process's rows of the global
batch: the scale, the gathers, the anchors); the loss applies these rules to its own terms.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from .losses import DistillationLoss

HISTORY_KEYS = ("loss", "task", "distill", "train_acc", "test_acc")
# per epoch: the optimisation steps alone (forward, losses, backward, optimizer), the whole epoch's training loop
# (steps + loading batches), the accuracy evaluation, and all of the epoch
TIME_KEYS = ("step_seconds", "epoch_seconds", "eval_seconds", "wall_seconds")


@dataclass
class TrainConfig:
    """epochs, lr (Adam), device ('cpu', 'cuda', 'cuda:1', or 'auto'), verbose (tqdm bars), max_batches (training
    batches per epoch, None for all: for quick runs), weight_decay (Adam's)."""

    epochs: int = 3
    lr: float = 1e-3
    device: str = "cpu"
    verbose: bool = False
    max_batches: int | None = None
    weight_decay: float = 0.0

    def __post_init__(self):
        if not isinstance(self.epochs, int) or isinstance(self.epochs, bool) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise ValueError(f"max_batches must be a positive int or None, got {self.max_batches!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        resolve_device(self.device)  # raises on a bad name

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def resolve_device(device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


# --------------------------------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    """This process's place in the job; `group` is a second process group kept for the feature gathers, so that
    they never interleave with DDP's own gradient all-reduces."""

    rank: int
    world_size: int
    group: object = None


_GROUPS: dict = {}


def dist_context() -> DistContext | None:
    """The context of the initialised default process group, or None when not distributed (or world size 1).
    Collective: every process must call it (it creates the gather group on first use)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(range(world)))
    return DistContext(dist.get_rank(), world, _GROUPS[key])


def init_distributed(device: str = "auto") -> tuple[DistContext | None, torch.device]:
    """Initialises torch.distributed from torchrun's environment (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA,
    one GPU per process by LOCAL_RANK. Returns (context or None, the device this process trains on)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return None, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist_context(), dev


def anchor_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous anchors [start, stop) of process `rank` when n anchors are split over world_size processes."""
    return n * rank // world_size, n * (rank + 1) // world_size


def _gather_sizes(n: int, ctx: DistContext, device) -> list:
    sizes = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(sizes) for _ in range(ctx.world_size)]
    dist.all_gather(out, sizes, group=ctx.group)
    return [int(s) for s in out]


def _all_gather_rows(x, sizes, ctx):
    """Concatenation of every process's x (rows may differ in number: padded to the largest, then cut)."""
    top = max(sizes)
    padded = x.new_zeros((top,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous(), group=ctx.group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, sizes, ctx):
        fctx.sizes, fctx.ctx = sizes, ctx
        return _all_gather_rows(x, sizes, ctx)

    @staticmethod
    def backward(fctx, grad):
        # every process's loss depends on every process's rows: sum the gradients, keep this process's rows
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=fctx.ctx.group)
        start = sum(fctx.sizes[: fctx.ctx.rank])
        return grad[start : start + fctx.sizes[fctx.ctx.rank]], None, None


def gather_features(x, ctx: DistContext, sizes=None, *, with_grad: bool):
    """The global batch of features: with_grad=True keeps the autograd path to this process's rows."""
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], ctx, x.device)
    if with_grad:
        return _GatherWithGrad.apply(x, sizes, ctx)
    with torch.no_grad():
        return _all_gather_rows(x.detach(), sizes, ctx)


@dataclass(frozen=True)
class BatchShard:
    """This process's rows of a global batch split over the processes of `ctx` (`sizes`: every process's number of
    rows): what DistillationLoss(..., shard=) needs to return this process's part of the global-batch loss."""

    ctx: DistContext
    sizes: tuple

    @classmethod
    def of(cls, n_local: int, ctx: DistContext | None, device) -> BatchShard | None:
        """The shard of this process's n_local rows; None for one process (ctx None, as dist_context() gives then),
        which DistillationLoss(..., shard=None) treats as the whole batch. Collective: every process calls it."""
        if ctx is None:
            return None
        return cls(ctx, tuple(_gather_sizes(n_local, ctx, device)))

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def mean_scale(self) -> float:
        """The factor that turns a mean over this process's rows into its part of the mean over the global batch
        (after DDP's average over the processes)."""
        return self.ctx.world_size * self.sizes[self.ctx.rank] / sum(self.sizes)

    def anchors(self) -> tuple[int, int]:
        """This process's contiguous share of the global batch's anchors (for the O(N^3) angle loss)."""
        return anchor_range(sum(self.sizes), self.ctx.rank, self.ctx.world_size)

    def gather(self, x, *, with_grad: bool):
        """The global batch of x's rows (with_grad=True keeps the autograd path to this process's rows)."""
        return gather_features(x, self.ctx, list(self.sizes), with_grad=with_grad)


def step_losses(weights: DistillationLoss, logits_s, labels, feat_s, logits_t=None, feat_t=None, ctx=None):
    """(total, task, distill) of one student step. Without ctx: cross-entropy + weights(...) on this batch. With a
    DistContext: this process's part of the global-batch loss (module docstring), the distillation part from
    weights(..., shard=); the parts' mean over processes is the global loss, and DDP's gradient average gives the
    global gradient."""
    use_teacher = weights is not None and weights.uses_teacher
    if use_teacher and (logits_t is None or feat_t is None):
        raise ValueError("these distillation weights need a teacher's logits and features")
    shard = None if ctx is None else BatchShard.of(logits_s.shape[0], ctx, logits_s.device)
    task = F.cross_entropy(logits_s, labels)
    if shard is not None:
        task = task * shard.mean_scale  # local mean -> this process's part of the global mean
    distill = weights(logits_s, logits_t, feat_s, feat_t, shard=shard) if use_teacher else task.new_zeros(())
    return task + distill, task, distill


def _all_reduce_mean(values: torch.Tensor, ctx) -> torch.Tensor:
    if ctx is not None:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= ctx.world_size
    return values


# ------------------------------------------------------------------------------------------------------ evaluation


def _eval_loader(loader: DataLoader, ctx) -> DataLoader:
    """A sequential loader over the whole dataset (this process's interleaved share when distributed): accuracy
    never consumes RNG nor depends on the training sampler."""
    dataset = loader.dataset
    if ctx is not None:
        dataset = Subset(dataset, list(range(ctx.rank, len(loader.dataset), ctx.world_size)))
    return DataLoader(dataset, batch_size=loader.batch_size or 256, shuffle=False, num_workers=0)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device=None, ctx=None) -> float:
    """Accuracy (%) of model over all of loader's dataset, in eval mode (summed over processes when distributed)."""
    if ctx is None:
        ctx = dist_context()
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, labels in _eval_loader(loader, ctx):
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)[0]
        counts[0] += (logits.argmax(dim=1) == labels).sum()
        counts[1] += labels.numel()
    if ctx is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    model.train(was_training)
    return 100.0 * counts[0].item() / max(counts[1].item(), 1.0)


# -------------------------------------------------------------------------------------------------------- training


def _progress(loader, cfg: TrainConfig, desc: str, ctx):
    total = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    if not cfg.verbose or (ctx is not None and ctx.rank != 0):
        return None
    import sys

    from tqdm.auto import tqdm

    # a log file (a background run) gets a line every few seconds instead of ten redraws per second
    interval = 0.1 if sys.stderr.isatty() else 5.0
    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, mininterval=interval)


def batches_per_epoch(loader, cfg: TrainConfig) -> int:
    return len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)


STATE_FORMAT = "qrkd-train-state"


def _save_state(path, model, optimizer, history, epoch, train_loader) -> None:
    """Everything that makes a resumed fit continue exactly as an uninterrupted one: weights, optimizer moments,
    history, and the RNG states that decide the next epoch's batches. Written atomically."""
    generator = getattr(train_loader, "generator", None)
    state = {
        "format": STATE_FORMAT,
        "epoch": epoch,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "loader_rng": generator.get_state() if generator is not None else None,
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path, model, optimizer, history, train_loader, epochs: int) -> int:
    """Restores a state written by _save_state into the fresh model/optimizer/history; returns the epochs done."""
    from .models import CheckpointError

    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"training state {os.fspath(path)!r} is unreadable ({type(exc).__name__}); delete it "
                              "to restart that model from scratch") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{os.fspath(path)!r} is not a qrkd training state")
    if not 0 <= state["epoch"] <= epochs:
        raise CheckpointError(f"training state {os.fspath(path)!r} is at epoch {state['epoch']}, beyond the {epochs} "
                              "epochs asked for")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for key in history:
        history[key] = list(state["history"].get(key, []))
    torch.set_rng_state(state["torch_rng"])
    generator = getattr(train_loader, "generator", None)
    if generator is not None and state["loader_rng"] is not None:
        generator.set_state(state["loader_rng"])
    return state["epoch"]


class _StepClock:
    """Sums the time of the training steps of an epoch. On the CPU with perf_counter; on a GPU with CUDA events,
    read once at the end of the epoch, so that timing adds no host-device synchronisation per step."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self):
        self.total, self.events = 0.0, []

    def start(self):
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        else:
            self.begun = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.total += time.perf_counter() - self.begun

    def seconds(self) -> float:
        """The epoch's step time (call after synchronising the device)."""
        return self.total + sum(begin.elapsed_time(end) for begin, end in self.events) / 1000.0


def _fit(model, teacher, weights, train_loader, test_loader, cfg: TrainConfig, name: str, state_path=None,
         run_bar=None):
    device = cfg.torch_device()
    ctx = dist_context()
    model = model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval()  # frozen: it runs under no_grad and is never given to the optimizer
    if weights is not None:
        weights = weights.to(device)
    use_teacher = weights is not None and weights.uses_teacher
    net = model
    if ctx is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = {key: [] for key in HISTORY_KEYS + TIME_KEYS}
    first_epoch = 0
    if state_path is not None and os.path.exists(state_path):
        first_epoch = _load_state(state_path, model, optimizer, history, train_loader, cfg.epochs)
        if run_bar is not None:
            run_bar.update(first_epoch * batches_per_epoch(train_loader, cfg))
    step_clock = _StepClock(device)

    for epoch in range(first_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        net.train()
        bar = _progress(train_loader, cfg, f"{name} {epoch + 1}/{cfg.epochs}", ctx)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        batches = 0
        step_clock.reset()
        for inputs, labels in train_loader:
            if cfg.max_batches is not None and batches >= cfg.max_batches:
                break
            step_clock.start()  # the step alone: not the loader, not the bars
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits_s, feat_s = net(inputs)
            logits_t = feat_t = None
            if use_teacher:
                with torch.no_grad():
                    logits_t, feat_t = teacher(inputs)
            loss, task, distill = step_losses(weights, logits_s, labels, feat_s, logits_t, feat_t, ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach(), task.detach(), distill.detach()]).to(sums.dtype)
            step_clock.stop()
            batches += 1
            if bar is not None:
                bar.update(1)
                if batches % 10 == 0:
                    bar.set_postfix(loss=f"{sums[0].item() / batches:.4f}")
            if run_bar is not None:
                run_bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        history["epoch_seconds"].append(time.perf_counter() - epoch_start)
        history["step_seconds"].append(step_clock.seconds())
        means = _all_reduce_mean(sums / max(batches, 1), ctx).tolist()
        for key, value in zip(("loss", "task", "distill"), means):
            history[key].append(value)

        start = time.perf_counter()
        history["train_acc"].append(evaluate(model, train_loader, device, ctx))
        if test_loader is not None:
            history["test_acc"].append(evaluate(model, test_loader, device, ctx))
        history["eval_seconds"].append(time.perf_counter() - start)
        if bar is not None:
            bar.close()
        if run_bar is not None:
            post = {"last": name, "loss": f"{means[0]:.4f}", "train": f"{history['train_acc'][-1]:.2f}%"}
            if history["test_acc"]:
                post["test"] = f"{history['test_acc'][-1]:.2f}%"
            run_bar.set_postfix(post)
        history["wall_seconds"].append(time.perf_counter() - epoch_start)
        if state_path is not None and (ctx is None or ctx.rank == 0):
            _save_state(state_path, model, optimizer, history, epoch + 1, train_loader)
    return model, history


def _check_model(name, model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")


def _check_config(cfg):
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")


def train_teacher(model: nn.Module, train_loader, cfg: TrainConfig, test_loader=None, *, state_path=None,
                  run_bar=None):
    """Trains `model` with cross-entropy. Returns (model, history); history has the keys of HISTORY_KEYS (distill is
    0; test_acc is empty without a test_loader) plus the per-epoch times of TIME_KEYS.

    state_path: a file written after every epoch (weights, optimizer, history, RNG states); when it exists at the
    start, training continues from it and ends with the numbers an uninterrupted run would have had. run_bar: a
    tqdm bar over a whole run, advanced by one per training batch."""
    _check_model("model", model)
    _check_config(cfg)
    return _fit(model, None, None, train_loader, test_loader, cfg, "teacher", state_path, run_bar)


def train_student(student: nn.Module, teacher, train_loader, test_loader, cfg: TrainConfig, weights,
                  student_name: str | None = None, *, state_path=None, run_bar=None) -> dict:
    """Trains `student` with cross-entropy + weights(logits_s, logits_t, feat_s, feat_t) against a frozen teacher
    (None: cross-entropy alone, e.g. the scratch student). Returns {"test_acc", "train_acc", "history", "model"}.
    state_path and run_bar as in train_teacher."""
    _check_model("student", student)
    _check_config(cfg)
    if weights is None:
        weights = DistillationLoss(kd=0.0, dr=0.0, ar=0.0, qk=0.0)
    if not isinstance(weights, DistillationLoss):
        raise TypeError(f"weights must be a qrkd.DistillationLoss, got {type(weights).__name__}")
    if weights.uses_teacher:
        if teacher is None:
            raise ValueError("weights has nonzero distillation terms but teacher is None")
        _check_model("teacher", teacher)
    if test_loader is None:
        raise ValueError("train_student needs a test_loader")
    model, history = _fit(student, teacher if weights.uses_teacher else None, weights, train_loader, test_loader,
                          cfg, student_name or "student", state_path, run_bar)
    return {"test_acc": history["test_acc"][-1], "train_acc": history["train_acc"][-1], "history": history,
            "model": model}
