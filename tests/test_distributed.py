"""The distributed path against one process on the concatenated batch: 2 CPU processes over gloo.

One spawn runs every case (spawning dominates the cost): the step's loss and gradients (DDP-averaged) for equal and
unequal per-process batches, and two epochs of train_student under DDP with a DistributedSampler, whose final
weights and accuracies must equal a single-process run over the same global batches. All in float64.
"""

import dataclasses
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from qrkd import DistillationLoss
from qrkd.models import StudentCNN, TeacherCNN
from qrkd.train import (BatchShard, DistContext, TrainConfig, anchor_range, dist_context, step_losses,
                        train_student)

WORLD = 2
CASES = {"equal": (4, 4), "unequal": (5, 3)}
DATA_SEED, SAMPLER_SEED, PER_RANK_BATCH, EPOCHS = 11, 7, 4, 2


def _weights():
    return DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend="simple")


def _step_problem(n):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    student, teacher = StudentCNN().double(), TeacherCNN().double().eval()
    return student, teacher, x, y


def _dataset():
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(22, 1, 8, 8, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 10, (22,), generator=g))


def _test_loader():
    g = torch.Generator().manual_seed(DATA_SEED + 1)
    test = TensorDataset(torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (9,), generator=g))
    return DataLoader(test, batch_size=4)


def _teacher():
    torch.manual_seed(1)
    return TeacherCNN().double()


def _worker(rank, port, out_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ctx = dist_context()
        results = {}
        for case, sizes in CASES.items():
            student, teacher, x, y = _step_problem(sum(sizes))
            start = sum(sizes[:rank])
            xs, ys = x[start : start + sizes[rank]], y[start : start + sizes[rank]]
            net = DistributedDataParallel(student)
            logits_s, feat_s = net(xs)
            with torch.no_grad():
                logits_t, feat_t = teacher(xs)
            total, task, distill = step_losses(_weights(), logits_s, ys, feat_s, logits_t, feat_t, ctx)
            total.backward()
            parts = torch.stack([total, task, distill]).detach()
            dist.all_reduce(parts)
            results[case] = {"loss": parts / WORLD, "grads": [p.grad.clone() for p in student.parameters()]}

        dataset = _dataset()
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=SAMPLER_SEED)
        loader = DataLoader(dataset, batch_size=PER_RANK_BATCH, sampler=sampler)
        torch.manual_seed(2)
        out = train_student(StudentCNN().double(), _teacher(), loader, _test_loader(), TrainConfig(epochs=EPOCHS),
                            _weights())
        results["train"] = {"state": out["model"].state_dict(), "history": out["history"]}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


class _GlobalBatches:
    """The global batches of the distributed run: at each epoch, batch i is the concatenation of every process's
    i-th batch under DistributedSampler."""

    def __init__(self, dataset):
        self.dataset, self.epoch = dataset, 0

    def _batches(self):
        per_rank = []
        for rank in range(WORLD):
            sampler = DistributedSampler(self.dataset, num_replicas=WORLD, rank=rank, shuffle=True, seed=SAMPLER_SEED)
            sampler.set_epoch(self.epoch)
            per_rank.append(list(sampler))
        n = len(per_rank[0])
        return [sum((idx[i : i + PER_RANK_BATCH] for idx in per_rank), []) for i in range(0, n, PER_RANK_BATCH)]

    def __iter__(self):
        batches = self._batches()
        self.epoch += 1
        return iter(batches)

    def __len__(self):
        return len(self._batches())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out_path = tmp_path_factory.mktemp("dist") / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(out_path)), nprocs=WORLD, join=True)
    return torch.load(out_path, weights_only=True)


def _close(a, b, rel=1e-10):
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    assert (a - b).abs().max().item() <= rel * scale + 1e-14


@pytest.mark.parametrize("case", list(CASES))
def test_step_loss_and_gradients_match_one_process(distributed, case):
    student, teacher, x, y = _step_problem(sum(CASES[case]))
    logits_s, feat_s = student(x)
    with torch.no_grad():
        logits_t, feat_t = teacher(x)
    total, task, distill = step_losses(_weights(), logits_s, y, feat_s, logits_t, feat_t)
    total.backward()
    got = distributed[case]
    _close(got["loss"], torch.stack([total, task, distill]).detach())
    for g_dist, p in zip(got["grads"], student.parameters()):
        _close(g_dist, p.grad, rel=1e-8)


def test_ddp_training_matches_one_process_on_the_global_batches(distributed):
    dataset = _dataset()
    loader = DataLoader(dataset, batch_sampler=_GlobalBatches(dataset))
    torch.manual_seed(2)
    out = train_student(StudentCNN().double(), _teacher(), loader, _test_loader(), TrainConfig(epochs=EPOCHS),
                        _weights())
    got = distributed["train"]
    for key, value in out["model"].state_dict().items():
        _close(got["state"][key], value, rel=1e-8)
    for key in ("loss", "task", "distill"):
        torch.testing.assert_close(torch.tensor(got["history"][key]), torch.tensor(out["history"][key]),
                                   rtol=1e-9, atol=1e-12)
    assert got["history"]["train_acc"] == out["history"]["train_acc"]
    assert got["history"]["test_acc"] == out["history"]["test_acc"]


def test_anchor_ranges_partition():
    for n in (1, 2, 7, 128):
        for world in (1, 2, 3, 8):
            ranges = [anchor_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@dataclasses.dataclass(frozen=True)
class _InProcessShard(BatchShard):
    """A BatchShard whose gathers return the global batch held here: K processes' parts computed in one process."""

    student_all: torch.Tensor = None
    teacher_all: torch.Tensor = None

    def gather(self, x, *, with_grad):
        return self.student_all if with_grad else self.teacher_all


@pytest.mark.parametrize("qk_backend", ["simple", "merlin"])
def test_loss_parts_over_shards_add_up_to_the_global_loss(qk_backend):
    """DistillationLoss(..., shard=) on each process's rows: the parts' mean is the loss of the global batch, and its
    gradient the global gradient (what DDP's average makes of the parts)."""
    sizes = (5, 3, 4)
    g = torch.Generator().manual_seed(4)
    n = sum(sizes)
    logits_s = torch.randn(n, 10, generator=g, dtype=torch.float64, requires_grad=True)
    logits_t = torch.randn(n, 10, generator=g, dtype=torch.float64)
    feat_s = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    feat_t = torch.randn(n, 6, generator=g, dtype=torch.float64)
    loss = DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend=qk_backend, qk_n_modes=5, qk_n_photons=2)
    whole = loss(logits_s, logits_t, feat_s, feat_t)
    want = torch.autograd.grad(whole, (logits_s, feat_s))
    parts = []
    for rank in range(len(sizes)):
        shard = _InProcessShard(DistContext(rank, len(sizes)), sizes, feat_s, feat_t)
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        parts.append(loss(logits_s[rows], logits_t[rows], feat_s[rows], feat_t[rows], shard=shard))
        assert set(loss.last_terms) == {"kd", "rkd_distance", "rkd_angle", "qk"}
    mean = sum(parts) / len(sizes)
    torch.testing.assert_close(mean, whole, rtol=1e-12, atol=0)
    for got, expected in zip(torch.autograd.grad(mean, (logits_s, feat_s)), want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_batch_shard_scale_and_anchors():
    shard = BatchShard(DistContext(1, 3), (5, 3, 4))
    assert shard.world_size == 3
    assert shard.mean_scale == 3 * 3 / 12
    assert shard.anchors() == anchor_range(12, 1, 3) == (4, 8)


def test_batch_shard_of_a_single_process_is_the_plain_loss():
    # the README's recipe for one's own DDP loop, run with one process: dist_context() is None, and so is the shard
    shard = BatchShard.of(7, dist_context(), "cpu")
    assert shard is None
    g = torch.Generator().manual_seed(0)
    logits_s, logits_t = torch.randn(7, 10, generator=g), torch.randn(7, 10, generator=g)
    feat_s, feat_t = torch.randn(7, 4, generator=g), torch.randn(7, 6, generator=g)
    loss = DistillationLoss(kd=0.5, dr=1.0, ar=2.0, backend="torch")
    torch.testing.assert_close(loss(logits_s, logits_t, feat_s, feat_t, shard=shard),
                               loss(logits_s, logits_t, feat_s, feat_t), rtol=0, atol=0)
