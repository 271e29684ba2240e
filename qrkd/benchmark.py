"""`qrkd bench`: every relation of every available backend, side by side with the implementations it replaces.

Implementations ("impls") of a case:
    reference            the `reference` backend: the seed's materialising formulas, eager torch (the oracle)
    reference-compiled   the same functions under torch.compile(dynamic=False)
    reference-zd         the reference with zero_diagonal=True: the original RKD code's distance convention
    merlin               MerLin's FidelityKernel.simple (photonic relation; only when merlinquantum is importable)
    <backend>            every other qrkd backend that says it runs the relation on the device and dtype
                         (qrkd.available_backends() + supports(), discovered at run time: torch, cpp, triton, ...)
Relations: angle, distance, fidelity (classical "simple" kernel), photonic (PhotonicFidelityKernel, the seed's circuit
d=4, m=10, n=5 by default). Modes: fwd (the loss under torch.no_grad) and fwdbwd (loss + backward to the student).

Every (case, impl) runs in its own child process, forked from a fork server that has imported torch and qrkd once
(a fresh interpreter per measurement would cost more than most measurements). On the CPU the child limits its own
address space (RLIMIT_AS: its size after the imports plus --mem-limit-gb), so an allocation beyond that fails as an
out-of-memory error instead of swapping or waking the kernel's OOM killer; the parent kills a child that outlives its
time budget. Both are recorded (status "oom" / "timeout") and the sweep goes on. Once an impl fails at some N, or
its measured growth predicts a failure (time ~ N^3 for the angle loss, N^2 otherwise; memory ~ N^3 for the
materialising angle references), the larger sizes of that series are recorded with the same status and
"predicted": true instead of being run. The implementations of one case run one after the other (their order rotates
from case to case), so slow drifts of the machine hit all of them alike.

Timing: two warm-up calls (torch.compile compiles, Triton JIT-compiles during the first), then timed calls until the
sample target is met; calls faster than a few milliseconds are timed in loops; on a GPU each sample is synchronised.
Slow calls (over `slow_s`) are not repeated for nothing: the second warm-up is a sample, and so is the first unless it
took over 1.5 times as long (a compilation or a lazy initialisation); torch.compile gets extra time for compiling.
Peak memory: on the CPU the child's peak resident set size (VmHWM, reset through /proc/self/clear_refs just
before the measured calls, after gc and malloc_trim) minus its resident size at that moment: the working memory of
the implementation above its inputs, libraries and compiled code; on a GPU torch.cuda.max_memory_allocated minus
memory_allocated at the same point.

Output (bench/results by default): <machine>-<date>[-quick].json, .md (tables) and -<relation>.png (time and peak
memory vs N, log-log, one line per impl). JSON schema "qrkd-bench/1":
    {schema, machine{name, hostname, platform, cpu, cpu_count, mem_total_bytes, gpu}, versions{python, torch, qrkd,
     triton, merlinquantum, ...}, backends{name: {available, detail}}, config{...}, command, started, finished,
     wall_s, results: [{case{relation, mode, n, ds, dt, dtype, device, modes, photons, tags}, case_id, impl, kind,
     status, predicted, detail, median_s, iqr_s, mean_s, min_s, samples_s, reps, inner, first_call_s, setup_s,
     peak_mem_bytes, baseline_mem_bytes, peak_rss_bytes, child_maxrss_bytes, mem_method, value, value_rel_diff,
     threads, wall_s, reference_impl, ratio_to_reference, speedup{ref impl: ratio}}]}
ratio_to_reference = median of the case's reference impl / median of this impl (> 1: faster than the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import sys
import time
import warnings

SCHEMA = "qrkd-bench/1"
RELATIONS = ("angle", "distance", "fidelity", "photonic")
MODES = ("fwd", "fwdbwd")
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward+backward"}
OPS = {
    "angle": "rkd_angle_loss",
    "distance": "rkd_distance_loss",
    "fidelity": "fidelity_kernel_loss",
    "photonic": "photonic_fidelity",
}
REFERENCE_IMPLS = ("reference", "reference-compiled", "reference-zd", "merlin")
COMPILED = "reference-compiled"
PHOTONIC_CIRCUIT = (4, 10, 5)  # the seed's kernel: d = 4 features (min(Ds, Dt)), m = 10 modes, n = 5 photons
FAILED = ("oom", "timeout", "error")

# growth exponents in N used to predict a failure at the next size: time, and memory of the materialising references
_TIME_EXPONENT = {"angle": 3, "distance": 2, "fidelity": 2, "photonic": 2}
_N3_MEMORY_IMPLS = ("reference", COMPILED)

# the named shapes: the seed's, and the ones the kernels issues state their targets at (always part of a sweep)
_SEED = [("angle", 128, 4, 31), ("distance", 128, 4, 31), ("fidelity", 128, 4, 31), ("photonic", 128, 4, 4)]
NAMED = {
    "cpu": [(*s, "seed") for s in _SEED]
    + [
        ("angle", 512, 128, 512, "issue3"),
        ("angle", 4096, 512, 512, "issue3"),
        ("distance", 128, 512, 512, "issue3"),
        ("distance", 2048, 512, 512, "issue3"),
        ("fidelity", 128, 512, 512, "issue3"),
        ("fidelity", 2048, 512, 512, "issue3"),
        ("photonic", 4096, 4, 4, "issue4"),
    ],
    "cuda": [(*s, "seed") for s in _SEED]
    + [
        ("angle", 1024, 512, 512, "issue3"),
        ("angle", 8192, 512, 512, "issue3"),
        ("distance", 8192, 512, 512, "gpu-max"),
        ("fidelity", 8192, 512, 512, "gpu-max"),
        ("photonic", 8192, 4, 4, "issue4"),
    ],
}
# (device, quick) -> {relation: (N list, D list)}; the photonic relation uses the seed's circuit for every N
GRIDS = {
    ("cpu", False): {
        "angle": ([64, 128, 256, 512, 1024, 2048], [4, 128, 512]),
        "distance": ([64, 128, 256, 512, 1024, 2048, 4096], [4, 128, 512]),
        "fidelity": ([64, 128, 256, 512, 1024, 2048, 4096], [4, 128, 512]),
        "photonic": ([64, 128, 256, 512, 1024, 2048, 4096], [4]),
    },
    ("cpu", True): {
        "angle": ([64, 256], [128]),
        "distance": ([64, 256], [128]),
        "fidelity": ([64, 256], [128]),
        "photonic": ([16, 64], [4]),
    },
    ("cuda", False): {
        "angle": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4, 128, 512]),
        "distance": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4, 128, 512]),
        "fidelity": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4, 128, 512]),
        "photonic": ([64, 128, 256, 512, 1024, 2048, 4096, 8192], [4]),
    },
    ("cuda", True): {  # the named shapes only: the GPU check has minutes for build, tests and sweep together
        "angle": ([], [512]),
        "distance": ([], [512]),
        "fidelity": ([], [512]),
        "photonic": ([], [4]),
    },
}

# per-profile measurement settings (seconds): see the module docstring
PROFILES = {
    "quick": dict(case_timeout=30.0, named_timeout_factor=1.0, compile_allowance=40.0, target_s=0.25, min_reps=3, max_reps=15, slow_s=1.0,
                  slow_cap_s=4.0, min_sample_s=0.002, max_minutes=2.75, merlin_max_n=16),
    "full": dict(case_timeout=60.0, named_timeout_factor=4.0, compile_allowance=60.0, target_s=0.5, min_reps=5, max_reps=30, slow_s=2.0,
                 slow_cap_s=10.0, min_sample_s=0.005, max_minutes=20.0, merlin_max_n=128),
}

_PREWARM_ENV = "QRKD_BENCH_PREWARM"


# ------------------------------------------------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration; every impl of a case sees the same inputs (seeded by N)."""

    relation: str
    mode: str
    n: int
    ds: int
    dt: int
    dtype: str = "float32"
    device: str = "cpu"
    modes: int = 0  # photonic: m
    photons: int = 0  # photonic: n
    tags: tuple = dataclasses.field(default=(), compare=False)

    @property
    def shape(self) -> str:
        if self.relation == "photonic":
            return f"N{self.n}-d{self.ds}-m{self.modes}-n{self.photons}"
        return f"N{self.n}-Ds{self.ds}-Dt{self.dt}"

    @property
    def id(self) -> str:
        return f"{self.relation}-{self.mode}-{self.dtype}-{self.device}-{self.shape}"

    @property
    def series(self) -> tuple:
        """What stays fixed while N grows."""
        return (self.relation, self.ds, self.dt, self.dtype, self.device, self.modes, self.photons)

    def describe(self) -> str:
        if self.relation == "photonic":
            return f"N={self.n} d={self.ds} m={self.modes} n={self.photons}"
        return f"N={self.n} Ds={self.ds} Dt={self.dt}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        d = dict(d)
        d["tags"] = tuple(d.get("tags", ()))
        return cls(**d)


def make_case(relation, mode, n, ds, dt, dtype="float32", device="cpu", tags=()) -> Case:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if relation == "photonic":
        d, m, p = PHOTONIC_CIRCUIT
        return Case(relation, mode, n, d, d, dtype, device, m, p, tuple(tags))
    return Case(relation, mode, n, ds, dt, dtype, device, 0, 0, tuple(tags))


def plan(device="cpu", quick=False, relations=RELATIONS, modes=MODES, dtypes=("float32",), ns=None, ds=None,
         named=True) -> list:
    """The cases of a sweep, smallest N first (so that failures at one size predict the next), each once; a case that
    is both on the grid and a named shape carries the name as a tag."""
    grid = GRIDS[(device, quick)]
    if device == "cuda" and quick and modes == MODES:
        modes = ("fwdbwd",)  # the GPU check has minutes for build, tests and sweep together
    found: dict = {}

    def add(relation, n, d_s, d_t, tags=()):
        for dtype in dtypes:
            for mode in modes:
                case = make_case(relation, mode, n, d_s, d_t, dtype, device, tags)
                if case in found:
                    merged = tuple(sorted(set(found[case].tags) | set(tags)))
                    found[case] = dataclasses.replace(found[case], tags=merged)
                else:
                    found[case] = case

    for relation in relations:
        n_list, d_list = grid[relation]
        n_list = ns if ns else n_list
        d_list = [PHOTONIC_CIRCUIT[0]] if relation == "photonic" else (ds if ds else d_list)
        for n in n_list:
            for d in d_list:
                add(relation, n, d, d)
    if named:
        for relation, n, d_s, d_t, tag in NAMED[device]:
            if relation in relations and (not quick or tag == "seed" or device == "cuda"):
                add(relation, n, d_s, d_t, (tag,))
    order = {r: i for i, r in enumerate(RELATIONS)}
    return sorted(found.values(), key=lambda c: (c.n, order[c.relation], c.ds, c.dt, c.dtype, MODES.index(c.mode)))


def _compiled_wanted(case: Case, policy: str, quick: bool) -> bool:
    """torch.compile costs 5-30 s per case on a small CPU: by default it runs at the named shapes and along one
    series of the angle loss (the relation where compiling the reference could matter most), not everywhere."""
    if case.relation == "photonic" or policy == "none":
        return False
    if policy == "all":
        return True
    if quick:  # one compiled case: the seed's shape on a CPU, the GPU target of the kernels issue on a GPU
        wanted = "seed" if case.device == "cpu" else "issue3"
        return case.relation == "angle" and wanted in case.tags and case.n <= 2048
    if case.tags:
        return case.n <= (1024 if case.device == "cpu" else 2048) or case.relation != "angle"
    grid_d = 512 if case.device == "cuda" else 128
    return case.relation == "angle" and case.ds == case.dt == grid_d and case.n <= 1024


def _merlin_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("merlin") is not None


def implementations(case: Case, *, compiled="auto", quick=False, merlin_max_n=128, include=None, exclude=()) -> list:
    """The impls measured for a case: the references first, then every qrkd backend that runs the relation there."""
    import torch

    import qrkd
    from qrkd import backends

    dtype = getattr(torch, case.dtype)
    op = OPS[case.relation]
    names = []
    if case.relation == "photonic":
        if _merlin_available() and case.n <= merlin_max_n:
            names.append("merlin")
        op_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        qrkd_names = list(backends.available_backends()) if hasattr(qrkd, "PhotonicFidelityKernel") else []
    else:
        names.append("reference")
        if _compiled_wanted(case, compiled, quick):
            names.append(COMPILED)
        if case.relation == "distance":
            names.append("reference-zd")
        op_dtype = dtype
        qrkd_names = [b for b in backends.available_backends() if b != "reference"]
    for name in qrkd_names:
        if name == "triton" and case.device == "cpu":
            continue  # Triton's interpreter is a correctness tool, not a performance path
        if backends._supports(name, op, case.device, op_dtype):
            names.append(name)
    if include:
        names = [n for n in names if n in include]
    return [n for n in names if n not in exclude]


def reference_impl(relation: str, measured: dict) -> str | None:
    """The impl a case's ratios are taken against: the reference backend, MerLin for the photonic kernel."""
    order = ("merlin", "reference") if relation == "photonic" else ("reference",)
    for name in order:
        if name in measured:
            return name
    return None


# ------------------------------------------------------------------------------------------ one measurement (child)


def build_call(case: Case, impl: str):
    """(call, sync): call() runs one forward (under no_grad) or forward+backward of `impl` on the case's inputs and
    returns the loss; sync() waits for the device. Used by the sweep's children and by the pytest-benchmark suites."""
    import torch

    dtype = getattr(torch, case.dtype)
    device = torch.device(case.device)
    gen = torch.Generator().manual_seed(1000 + case.n)
    student = torch.randn(case.n, case.ds, generator=gen, dtype=dtype).to(device)
    teacher = torch.randn(case.n, case.dt, generator=gen, dtype=dtype).to(device)
    loss = _loss_function(case, impl, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if case.mode == "fwd":

        def call():
            with torch.no_grad():
                return loss(student, teacher)

    else:
        student.requires_grad_(True)

        def call():
            student.grad = None
            out = loss(student, teacher)
            out.backward()
            return out.detach()

    return call, sync


def _loss_function(case: Case, impl: str, device, dtype):
    import torch
    import torch.nn.functional as F

    import qrkd
    from qrkd.backends import reference

    if impl == "merlin":
        if case.relation != "photonic":
            raise ValueError(f"impl 'merlin' measures the photonic relation only, not {case.relation!r}")
        import merlin

        mk = merlin.FidelityKernel.simple(
            input_size=case.ds, n_modes=case.modes, dtype=dtype, device=device, force_psd=False
        )
        if sum(int(s) for s in mk.input_state) != case.photons:
            raise ValueError(f"MerLin's simple kernel has {sum(mk.input_state)} photons, the case wants {case.photons}")
        mk.requires_grad_(False)  # its interferometers are Parameters the seed never trains

        def merlin_loss(s, t):
            with torch.no_grad():
                k_t = mk(t)
            return F.smooth_l1_loss(mk(s), k_t)

        return merlin_loss
    if impl == COMPILED:
        if case.relation == "photonic":
            raise ValueError("the photonic relation has no compiled reference")
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # no pool of compile workers for a handful of kernels
        compiled = torch.compile(getattr(reference, OPS[case.relation]), dynamic=False)
        if case.relation == "distance":
            return lambda s, t: compiled(s, t, False)
        return compiled
    if impl == "reference-zd":
        return lambda s, t: qrkd.rkd_distance_loss(s, t, zero_diagonal=True, backend="reference")
    backend = impl
    if case.relation == "angle":
        return lambda s, t: qrkd.rkd_angle_loss(s, t, backend=backend)
    if case.relation == "distance":
        return lambda s, t: qrkd.rkd_distance_loss(s, t, zero_diagonal=False, backend=backend)
    if case.relation == "fidelity":
        return lambda s, t: qrkd.fidelity_kernel_loss(s, t, backend=backend)
    kernel = qrkd.PhotonicFidelityKernel(case.ds, case.modes, n_photons=case.photons, seed=0, dtype=dtype).to(device)
    return lambda s, t: qrkd.fidelity_kernel_loss(s, t, kernel=kernel, backend=backend)


def _proc_status(field: str) -> int:
    """A /proc/self/status size in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryProbe:
    """Peak memory of the calls made between reset() and peak(), above the memory in use at reset()."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"
        self.base = 0
        self.method = ""

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda.max_memory_allocated"
            return
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            self.method = "VmHWM"
        except OSError:
            self.method = "VmHWM-since-start"  # cannot reset: the peak includes everything since the child started
        self.base = _proc_status("VmRSS")

    def peak(self) -> tuple:
        """(peak above the reset point, absolute peak)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            top = torch.cuda.max_memory_allocated()
        else:
            top = _proc_status("VmHWM")
        return max(0, top - self.base), top


def _stats(samples: list) -> dict:
    ordered = sorted(samples)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return dict(
        median_s=statistics.median(ordered),
        iqr_s=q3 - q1,
        mean_s=statistics.fmean(ordered),
        min_s=ordered[0],
        samples_s=samples,
        reps=len(samples),
    )


def measure(case: Case, impl: str, settings: dict, started: float | None = None) -> dict:
    """Times `impl` on `case` in this process and measures its peak memory (see the module docstring)."""
    import torch

    started = time.perf_counter() if started is None else started
    now = time.perf_counter
    budget_end = started + settings["budget_s"]
    call, sync = build_call(case, impl)
    setup_s = now() - started
    probe = MemoryProbe(case.device)
    probe.reset()
    calls_start = t0 = now()
    value = float(call())
    sync()
    first = now() - t0
    samples = []
    slow = first >= settings["slow_s"] and impl != COMPILED
    if slow:
        # the first call may still hold a JIT compilation (Triton) or a lazy initialisation: time a second one when
        # the budget allows, and keep the first as a sample only if it was not much slower
        per_call = first
        if first < settings["slow_cap_s"] and now() + first < budget_end:
            t0 = now()
            call()
            sync()
            per_call = now() - t0
            samples = [per_call] if first > 1.5 * per_call else [first, per_call]
        else:
            samples = [first]
        peak, peak_abs = probe.peak()
    else:
        t0 = now()
        call()
        sync()
        per_call = now() - t0
        probe.reset()
    inner = 1
    if per_call < settings["min_sample_s"]:
        inner = max(1, min(1000, int(settings["min_sample_s"] / max(per_call, 1e-7))))
    timing_start = now()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(samples) < settings["max_reps"]:
            spent = now() - (calls_start if slow else timing_start)
            if len(samples) >= settings["min_reps"] and spent >= settings["target_s"]:
                break
            if slow and spent >= settings["slow_cap_s"]:
                break
            if samples and now() + per_call * inner > budget_end:
                break
            t0 = now()
            for _ in range(inner):
                call()
            sync()
            samples.append((now() - t0) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    if not slow:
        peak, peak_abs = probe.peak()
    out = _stats(samples)
    out.update(
        status="ok",
        detail="",
        inner=inner,
        first_call_s=first,
        setup_s=setup_s,
        peak_mem_bytes=peak,
        baseline_mem_bytes=probe.base,
        peak_rss_bytes=peak_abs,
        mem_method=probe.method,
        value=value,
        threads=torch.get_num_threads(),
    )
    return out


_OOM_PATTERNS = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc", "memoryerror")


def classify_failure(exc: BaseException) -> dict:
    text = f"{type(exc).__name__}: {exc}"
    status = "oom" if isinstance(exc, MemoryError) or any(p in text.lower() for p in _OOM_PATTERNS) else "error"
    return {"status": status, "detail": text[:800]}


def _limit_address_space(extra_bytes: int) -> None:
    """Address space = what this process maps now (torch alone maps gigabytes of libraries) + extra_bytes."""
    current = _proc_status("VmSize")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = current + int(extra_bytes)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _child_main(job: dict) -> None:
    """In a child forked by the server: measure, write the result file. Never returns (os._exit)."""
    started = time.perf_counter()
    try:
        os.setsid()  # its own process group: a timeout kills it together with any compiler it started
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        warnings.simplefilter("ignore")  # e.g. MerLin's deprecation notices, once per child: noise in the progress
        case = Case.from_dict(job["case"])
        if case.device == "cpu" and job.get("mem_limit"):
            _limit_address_space(job["mem_limit"])
        result = measure(case, job["impl"], job["settings"], started)
    except BaseException as exc:  # a failure of the measured code is a result, not a crash of the sweep
        result = classify_failure(exc)
    try:
        gc.collect()
        tmp = job["result_path"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, job["result_path"])
    finally:
        os._exit(0)


# ---------------------------------------------------------------------------------------------- the parent's side


def _prewarm(spec: str) -> None:
    """Runs in the fork server, once: everything every child would otherwise redo, none of it running a torch op
    (OpenMP's thread pool and CUDA must start in the children)."""
    import torch  # noqa: F401

    import qrkd  # noqa: F401

    parts = spec.split(",")
    if "cpu" in parts:
        from qrkd import backends

        backends.backend_status()
    if "compile" in parts:
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401

        if "cpu" in parts:
            from torch._inductor import cpu_vec_isa

            cpu_vec_isa.pick_vec_isa()  # builds and loads probe programs (seconds), cached for every child
    if "merlin" in parts:
        with contextlib.suppress(ImportError):
            import merlin  # noqa: F401
    if torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the benchmark's fork server: its children could not use it")


def _serve(fd: int) -> None:
    """The fork server: reads one job (JSON) per line on stdin, forks a child for it, reports on `fd`
    "pid <pid>" when the child runs and {"pid", "status", "maxrss"} (os.wait4) when it is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and closes our stdin
    out = os.fdopen(fd, "w", buffering=1)
    _prewarm(os.environ.pop(_PREWARM_ENV, ""))
    gc.collect()
    gc.freeze()  # the children's gc then leaves these objects (and their copy-on-write pages) alone
    out.write("ready\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                with contextlib.suppress(OSError):
                    os.close(fd)
                _child_main(job)
            finally:
                os._exit(1)  # never back into the server's loop
        out.write(f"pid {pid}\n")
        _, status, usage = os.wait4(pid, 0)
        out.write(json.dumps({"pid": pid, "status": status, "maxrss": usage.ru_maxrss * 1024}) + "\n")


class ServerDied(RuntimeError):
    pass


class Runner:
    """Runs each measurement in a child of one fork server: a process that has imported torch and qrkd once."""

    def __init__(self, device="cpu", mem_limit=None, prewarm=("cpu",)):
        self.device = device
        self.mem_limit = mem_limit
        self.prewarm = ",".join(prewarm)
        self.server = None
        self._fd = None
        self._buf = b""
        self._tmp = None
        self.started_s = None

    def start(self) -> float:
        """Starts the fork server (its imports and prewarming happen now, not in the first case's budget)."""
        if self.server is not None and self.server.poll() is None:
            return self.started_s
        import subprocess
        import tempfile

        self.close()
        t0 = time.perf_counter()
        self._tmp = tempfile.mkdtemp(prefix="qrkd-bench-")
        r, w = os.pipe()
        env = dict(os.environ)
        env[_PREWARM_ENV] = self.prewarm
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # torch.cuda.is_available() without creating a CUDA context
        code = "import sys; from qrkd.benchmark import _serve; _serve(int(sys.argv[1]))"
        self.server = subprocess.Popen([sys.executable, "-c", code, str(w)], stdin=subprocess.PIPE, pass_fds=(w,),
                                       env=env)
        os.close(w)
        self._fd, self._buf = r, b""
        line = self._readline(900.0)
        if line != "ready":
            self.close()
            raise ServerDied(f"the benchmark fork server did not start ({line!r})")
        self.started_s = time.perf_counter() - t0
        return self.started_s

    def _readline(self, timeout: float):
        """The server's next line, or None after `timeout` seconds; ServerDied at end of file."""
        import select

        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready:
                chunk = os.read(self._fd, 65536)
                if not chunk:
                    raise ServerDied("the benchmark fork server exited")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def run(self, case: Case, impl: str, settings: dict, timeout: float) -> dict:
        try:
            return self._run(case, impl, settings, timeout)
        except ServerDied as exc:
            self.close()  # the next measurement starts a new server
            return {"status": "error", "detail": str(exc), "wall_s": 0.0}

    def _run(self, case, impl, settings, timeout) -> dict:
        self.start()
        path = os.path.join(self._tmp, "result.json")
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        job = {"case": case.to_dict(), "impl": impl, "settings": settings, "mem_limit": self.mem_limit,
               "result_path": path}
        try:
            self.server.stdin.write(json.dumps(job).encode() + b"\n")
            self.server.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ServerDied(f"the benchmark fork server is gone ({exc})") from exc
        line = self._readline(120.0)
        if not line or not line.startswith("pid "):
            raise ServerDied(f"the benchmark fork server did not fork ({line!r})")
        pid = int(line.split()[1])
        t0 = time.perf_counter()
        timed_out = False
        try:
            line = self._readline(timeout)
            if line is None:
                timed_out = True
                self._kill(pid)
                line = self._readline(60.0)
        except KeyboardInterrupt:
            self._kill(pid)
            raise
        if line is None:
            raise ServerDied(f"child {pid} could not be reaped")
        wall = time.perf_counter() - t0
        done = json.loads(line)
        status = done["status"]
        result = None
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
        if timed_out:
            result = {"status": "timeout", "detail": f"killed after the {timeout:g} s budget"}
        elif result is None:
            if os.WIFSIGNALED(status):
                sig = os.WTERMSIG(status)
                oom = sig == signal.SIGKILL
                result = {"status": "oom" if oom else "error",
                          "detail": f"the child died of {signal.Signals(sig).name}"
                          + (" (by the kernel's OOM killer, most likely)" if oom else "")}
            else:
                result = {"status": "error",
                          "detail": f"the child exited with code {os.WEXITSTATUS(status)} without a result"}
        result["wall_s"] = wall
        result["child_maxrss_bytes"] = done["maxrss"]
        return result

    @staticmethod
    def _kill(pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)  # the child made itself a group leader
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stdin.close()
            try:
                self.server.wait(10)
            except Exception:
                self.server.kill()
                self.server.wait()
            self.server = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self._tmp:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _predict_failure(case: Case, impl: str, history: dict, timeout: float, mem_limit) -> tuple | None:
    """(status, detail) when the same impl already failed at a smaller size (or at this size, forward only) of the
    series, or when its growth predicts a failure here; None to run it.

    The growth exponent is the one measured between the last two sizes, capped by the theoretical one (fixed costs
    make small sizes look slower than the power law); from a single size the theoretical exponent is used and the
    prediction must exceed the limit threefold."""
    key = (case.series, impl)
    failed = history.get(("failed",) + key)
    if failed and failed[:2] <= (case.n, MODES.index(case.mode)):
        n, _, status, mode = failed
        return status, f"not run: {status} at N={n} ({mode})"
    points = history.get(("ok",) + key + (case.mode,), [])
    if not points:
        return None
    n1, t1, m1 = points[-1]
    margin = 1.0 if len(points) >= 2 else 3.0
    t_exp = _TIME_EXPONENT[case.relation]
    m_exp = 3 if (case.relation == "angle" and impl in _N3_MEMORY_IMPLS) else 2
    if len(points) >= 2:
        n0, t0, m0 = points[-2]
        t_exp = min(t_exp, max(1.0, math.log(max(t1, 1e-9) / max(t0, 1e-9)) / math.log(n1 / n0)))
        m_exp = min(m_exp, max(1.0, math.log(max(m1, 1 << 16) / max(m0, 1 << 16)) / math.log(n1 / n0)))
    grow = case.n / n1
    t_pred = t1 * grow**t_exp
    if t_pred > margin * timeout:
        return "timeout", f"not run: {_fmt_time(t1)} at N={n1} predicts ~{_fmt_time(t_pred)} (budget {timeout:g} s)"
    m_pred = m1 * grow**m_exp
    if mem_limit and m_pred > margin * mem_limit:
        return "oom", (f"not run: {_fmt_bytes(m1)} at N={n1} predicts ~{_fmt_bytes(m_pred)} "
                       f"(limit {_fmt_bytes(mem_limit)})")
    return None


def _record_history(history: dict, case: Case, impl: str, rec: dict) -> None:
    key = (case.series, impl)
    rank = (case.n, MODES.index(case.mode))
    if rec["status"] in ("oom", "timeout"):
        old = history.get(("failed",) + key)
        if old is None or rank < old[:2]:
            history[("failed",) + key] = (case.n, rank[1], rec["status"], case.mode)
    elif rec["status"] == "ok":
        points = history.setdefault(("ok",) + key + (case.mode,), [])
        points.append((case.n, rec["median_s"], rec["peak_mem_bytes"]))
        points.sort()


def _value_group(impl: str) -> str:
    # values comparable with the reference: not the other distance convention, not MerLin's own random circuit
    return {"reference-zd": "zd", "merlin": "merlin"}.get(impl, "main")


def annotate_case(records: list) -> None:
    """Fills reference_impl, ratio_to_reference, speedup and value_rel_diff across the impls of one case."""
    ok = {r["impl"]: r for r in records if r["status"] == "ok"}
    all_impls = {r["impl"] for r in records}
    relation = records[0]["case"]["relation"]
    ref = reference_impl(relation, all_impls)
    refs = {name: r for name, r in ok.items() if name in REFERENCE_IMPLS}
    main_values = [r for r in records if r["status"] == "ok" and _value_group(r["impl"]) == "main"]
    anchor = ok.get("reference") or (main_values[0] if main_values else None)
    for r in records:
        r["reference_impl"] = ref
        r["ratio_to_reference"] = None
        r["speedup"] = {}
        r["value_rel_diff"] = None
        if r["status"] != "ok":
            continue
        if ref in ok and r["median_s"] > 0:
            r["ratio_to_reference"] = ok[ref]["median_s"] / r["median_s"]
        r["speedup"] = {name: x["median_s"] / r["median_s"] for name, x in refs.items() if r["median_s"] > 0}
        if anchor is not None and _value_group(r["impl"]) == "main" and r is not anchor:
            a, b = anchor["value"], r["value"]
            r["value_rel_diff"] = abs(a - b) / max(abs(a), 1e-30) if math.isfinite(a) and math.isfinite(b) else None


def _fmt_time(s) -> str:
    if s is None:
        return "-"
    for scale, unit in ((1.0, "s"), (1e-3, "ms")):
        if s >= 0.9995 * scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e6:.3g} us"


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= 0.9995 * size:
            return f"{b / size:.3g} {unit}"
    return f"{int(b)} B"


def _fmt_ratio(x) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}x" if x < 1000 else f"{x:,.0f}x"


# ------------------------------------------------------------------------------------------------ machine, versions


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem_total = 0
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    gpu = None
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}"}
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem_total,
        "gpu": gpu,
    }


def machine_name(info: dict) -> str:
    def slug(text):
        text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", text.lower())
        return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "machine"

    if info.get("gpu"):
        return slug(info["gpu"]["name"])
    return f"{slug(info['cpu'])}-{info['cpu_count']}cpu"


def versions() -> dict:
    from importlib import metadata

    import torch

    import qrkd

    out = {"python": platform.python_version(), "torch": torch.__version__, "qrkd": qrkd.__version__,
           "cuda": torch.version.cuda}
    for dist in ("triton", "merlinquantum", "numpy", "pytest-benchmark", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _mem_available() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 8 << 30


# ----------------------------------------------------------------------------------------------------------- report


def _impl_order(names) -> list:
    order = ("merlin", "reference", COMPILED, "reference-zd", "torch", "cpp", "triton")
    rank = {name: i for i, name in enumerate(order)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _cell(r: dict, with_ratio: bool) -> str:
    if r is None:
        return ""
    status = r["status"]
    if status != "ok":
        label = {"oom": "OOM", "timeout": "timeout", "error": "error"}.get(status, status)
        return label + ("*" if r.get("predicted") else "")
    text = _fmt_time(r["median_s"])
    if with_ratio and r.get("ratio_to_reference") is not None and r["impl"] != r.get("reference_impl"):
        text += f" ({_fmt_ratio(r['ratio_to_reference'])})"
    return f"{text}<br>{_fmt_bytes(r['peak_mem_bytes'])}"


def _group(results: list) -> dict:
    cases: dict = {}
    for r in results:
        cases.setdefault(r["case_id"], []).append(r)
    return cases


def headline_rows(results: list) -> list:
    """[(case dict, {impl: record})]: the named shapes, and per series and mode the largest N the reference ran."""
    cases = _group(results)
    rows, best = [], {}
    for recs in cases.values():
        case = recs[0]["case"]
        by_impl = {r["impl"]: r for r in recs}
        if case["tags"]:
            rows.append((case, by_impl))
        c = Case.from_dict(case)
        for name in ("merlin", "reference"):  # the photonic kernel has two baselines: MerLin and the naive reference
            if name in by_impl and by_impl[name]["status"] == "ok":
                key = (c.series, c.mode, name)
                if key not in best or best[key][0]["n"] < c.n:
                    best[key] = (case, by_impl)
    seen = {id(c) for c, _ in rows}
    for value in best.values():
        if id(value[0]) not in seen:
            seen.add(id(value[0]))
            rows.append(value)
    order = {r: i for i, r in enumerate(RELATIONS)}
    rows.sort(key=lambda x: (order[x[0]["relation"]], MODES.index(x[0]["mode"]), x[0]["ds"], x[0]["dt"], x[0]["n"]))
    return rows


def write_markdown(data: dict, path: str) -> None:
    results = data["results"]
    m, v, cfg = data["machine"], data["versions"], data["config"]
    lines = [f"# qrkd benchmark: {m['name']}, {data['started'][:10]}", ""]
    lines.append(f"Command: `{data['command']}`  ")
    hw = f"{m['cpu']}, {m['cpu_count']} CPUs, {_fmt_bytes(m['mem_total_bytes'])} RAM"
    if m.get("gpu"):
        hw = f"{m['gpu']['name']} ({_fmt_bytes(m['gpu']['memory_bytes'])}); host: {hw}"
    lines.append(f"Machine: {hw}  ")
    lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + "  ")
    lines.append(
        "Backends: " + "; ".join(f"{k}: {'yes' if b['available'] else 'no'} ({b['detail']})"
                                 for k, b in data["backends"].items())
    )
    lines.append("")
    lines.append(
        f"Each (case, implementation) ran in its own fresh process (device {cfg['device']}, "
        f"address-space limit {_fmt_bytes(cfg['mem_limit_bytes'])} above the imports on the CPU, time budget "
        f"{cfg['case_timeout_s']:g} s, x{cfg.get('named_timeout_factor', 1):g} at the named shapes, "
        f"+{cfg.get('compile_allowance_s', 0):g} s for torch.compile). Cells: median time of one call (its speedup over the reference: the "
        "reference's median divided by this one, > 1 is faster), then peak memory above the inputs. "
        "OOM / timeout: failed when run; OOM* / timeout*: not run, predicted from a failure or the growth measured "
        f"at a smaller N. Total wall time {data.get('wall_s', 0) / 60:.1f} min."
    )
    rows = headline_rows(results)
    impls = _impl_order({i for _, by in rows for i in by})
    if rows:
        lines += ["", "## Headline", ""]
        lines.append("| relation | shape | tags | mode | " + " | ".join(impls) + " |")
        lines.append("|" + "---|" * (4 + len(impls)))
    for case, by_impl in rows:
        c = Case.from_dict(case)
        cells = []
        for name in impls:
            r = by_impl.get(name)
            cell = _cell(r, with_ratio=True) if r else ""
            if r and r["status"] == "ok" and COMPILED in r.get("speedup", {}) and name not in REFERENCE_IMPLS:
                cell = cell.replace("<br>", f", {_fmt_ratio(r['speedup'][COMPILED])} vs compiled<br>", 1)
            cells.append(cell)
        lines.append(f"| {c.relation} | {c.describe()} | {' '.join(c.tags)} | {MODE_TITLES[c.mode]} | "
                     + " | ".join(cells) + " |")
    cases = _group(results)
    order = {r: i for i, r in enumerate(RELATIONS)}
    sections: dict = {}
    for recs in cases.values():
        c = Case.from_dict(recs[0]["case"])
        sections.setdefault((order[c.relation], c.relation, MODES.index(c.mode), c.dtype), []).append(recs)
    for (_, relation, mode_i, dtype), groups in sorted(sections.items()):
        groups.sort(key=lambda g: (g[0]["case"]["ds"], g[0]["case"]["dt"], g[0]["case"]["n"]))
        impls = _impl_order({r["impl"] for g in groups for r in g})
        lines += ["", f"## {relation}, {MODE_TITLES[MODES[mode_i]]} ({dtype})", ""]
        if relation == "photonic":
            lines += [f"Ratios against MerLin's FidelityKernel where it ran (N <= {cfg.get('merlin_max_n')}), "
                      "elsewhere against the reference backend (permanents by summing over all n! permutations).", ""]
        first = "| N | d | m | n |" if relation == "photonic" else "| N | Ds | Dt |"
        lines.append(first + " " + " | ".join(impls) + " |")
        lines.append("|" + "---|" * (first.count("|") - 1 + len(impls)))
        for g in groups:
            c = Case.from_dict(g[0]["case"])
            by_impl = {r["impl"]: r for r in g}
            head = (f"| {c.n} | {c.ds} | {c.modes} | {c.photons} |" if relation == "photonic"
                    else f"| {c.n} | {c.ds} | {c.dt} |")
            lines.append(head + " " + " | ".join(_cell(by_impl.get(i), True) for i in impls) + " |")
    errors = [r for r in results if r["status"] == "error"]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r['case_id']} / {r['impl']}: {r['detail']}" for r in errors]
    mismatched = [r for r in results if (r.get("value_rel_diff") or 0) > _value_tolerance(r)]
    if mismatched:
        lines += ["", "## Loss values that differ from the reference's", ""]
        lines += [f"- {r['case_id']} / {r['impl']}: relative difference {r['value_rel_diff']:.2e}" for r in mismatched]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _value_tolerance(r: dict) -> float:
    return 1e-6 if r["case"]["dtype"] == "float64" else 1e-2


def write_plots(data: dict, stem: str) -> list:
    """One PNG per relation: rows = feature widths, columns = time and peak memory vs N; solid fwd+bwd, dashed fwd."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    results = data["results"]
    for relation in RELATIONS:
        recs = [r for r in results if r["case"]["relation"] == relation]
        if not any(r["status"] == "ok" for r in recs):
            continue
        widths = sorted({(r["case"]["ds"], r["case"]["dt"]) for r in recs if r["case"]["ds"] == r["case"]["dt"]})
        if not widths:
            continue
        impls = _impl_order({r["impl"] for r in recs})
        colours = {name: f"C{i}" for i, name in enumerate(impls)}
        fig, axes = plt.subplots(len(widths), 2, figsize=(11, 3.6 * len(widths)), squeeze=False)
        for row, (d_s, d_t) in enumerate(widths):
            ax_t, ax_m = axes[row]
            for impl in impls:
                for mode, style in (("fwdbwd", "-"), ("fwd", "--")):
                    pts = sorted(
                        (r["case"]["n"], r) for r in recs
                        if r["impl"] == impl and r["case"]["mode"] == mode
                        and (r["case"]["ds"], r["case"]["dt"]) == (d_s, d_t)
                    )
                    ok = [(n, r) for n, r in pts if r["status"] == "ok"]
                    if not ok:
                        continue
                    fail = next((f"{r['status']} at N={n}" for n, r in pts if r["status"] in FAILED), "")
                    label = f"{impl} {MODE_TITLES[mode]}" + (f" ({fail})" if fail else "")
                    ns = [n for n, _ in ok]
                    ax_t.plot(ns, [r["median_s"] for _, r in ok], style, marker="o", ms=3, color=colours[impl],
                              label=label)
                    ax_m.plot(ns, [max(r["peak_mem_bytes"], 1 << 16) / (1 << 20) for _, r in ok], style, marker="o",
                              ms=3, color=colours[impl], label=label)
            what = f"D={d_s}"
            if relation == "photonic":
                what = f"d={d_s}, m={PHOTONIC_CIRCUIT[1]}, n={PHOTONIC_CIRCUIT[2]}"
            for ax, ylabel in ((ax_t, "median time per call (s)"), (ax_m, "peak memory above inputs (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (batch size)")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{relation}, {what}")
                ax.grid(True, which="both", alpha=0.3)
            ax_t.legend(fontsize=7)
        fig.suptitle(f"qrkd {relation}: {data['machine']['name']} ({data['config']['dtype']}, "
                     f"{data['config']['device']})")
        fig.tight_layout()
        path = f"{stem}-{relation}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(data: dict, stem: str, plots: bool = True) -> list:
    write_markdown(data, stem + ".md")
    return [stem + ".md"] + (write_plots(data, stem) if plots else [])


def _write_json(data: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------------------- CLI


def _csv(text, convert=str) -> list:
    return [convert(x) for x in text.split(",") if x.strip()] if text else []


def _positive(convert):
    """An argparse type: a finite number > 0 (argparse turns the ValueError into a usage error naming the option)."""
    def parse(text):
        value = convert(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
        return value
    parse.__name__ = f"positive {convert.__name__}"
    return parse


def _non_negative(convert):
    def parse(text):
        value = convert(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
        return value
    parse.__name__ = f"non-negative {convert.__name__}"
    return parse


def _fail(message: str) -> int:
    print(f"qrkd bench: error: {message}", file=sys.stderr)
    return 2


def _read_results(path: str):
    """The results file behind --report, or the one-line reason it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None, f"--report {path}: no such file"
    except IsADirectoryError:
        return None, f"--report {path}: is a folder, not a results file"
    except OSError as exc:
        return None, f"--report {path}: cannot be read ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, f"--report {path}: not a JSON results file of qrkd bench (not valid UTF-8 JSON)"
    if not isinstance(data, dict) or not isinstance(data.get("results"), list) or \
            not all(k in data for k in ("machine", "versions", "config", "backends")):
        return None, f"--report {path}: not a results file of qrkd bench (schema {SCHEMA})"
    return data, None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrkd bench",
        description="Benchmark sweep: every relation of every available qrkd backend against its references, each "
        "measurement in its own process with a memory limit and a time budget. Writes JSON, a markdown table and "
        "PNG plots.",
    )
    p.add_argument("--quick", action="store_true", help="a small sweep (under 3 minutes on 2 CPU cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32,float64 (default float32)")
    p.add_argument("--relations", default=",".join(RELATIONS), help=f"comma-separated subset of {RELATIONS}")
    p.add_argument("--modes", default=",".join(MODES), help="fwd,fwdbwd (default both; --quick on cuda: fwdbwd)")
    p.add_argument("--n", help="comma-separated batch sizes replacing the grid's")
    p.add_argument("--d", help="comma-separated feature widths (Ds = Dt) replacing the grid's")
    p.add_argument("--no-named", action="store_true", help="leave out the seed's and the issues' named shapes")
    p.add_argument("--impls", help="measure only these impls (comma-separated)")
    p.add_argument("--exclude-impls", default="", help="comma-separated impls to leave out")
    p.add_argument("--compiled", choices=("auto", "all", "none"), default="auto",
                   help="where torch.compile(reference) runs: auto = named shapes and one feature width")
    p.add_argument("--merlin-max-n", type=_non_negative(int),
                   help="largest N MerLin is run at (default 128; --quick 16)")
    p.add_argument("--case-timeout", type=_positive(float), help="seconds per measurement, > 0 (default 60, four "
                   "times that at the named shapes; --quick 30)")
    p.add_argument("--mem-limit-gb", type=_positive(float), help="address space per child above its imports, CPU, "
                   "> 0 (default 75%% of the memory available at the start)")
    p.add_argument("--max-minutes", type=_non_negative(float), help="after this long only the named shapes still "
                   "run, the rest is recorded as skipped (default 20; --quick 2.75; 0 = no limit)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="output folder (default bench/results)")
    p.add_argument("--machine", help="machine name in the file names (default from the CPU or GPU model)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="print the planned measurements and exit")
    p.add_argument("--report", metavar="JSON", help="only rewrite the markdown and the plots of a results file")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        data, problem = _read_results(args.report)
        if problem:
            return _fail(problem)
        stem = args.report[:-5] if args.report.endswith(".json") else args.report
        for path in write_report(data, stem, plots=not args.no_plots):
            print(path)
        return 0

    import torch

    from qrkd import backends

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("qrkd bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    relations, modes, dtypes = _csv(args.relations), _csv(args.modes), _csv(args.dtypes)
    for name, values, allowed in (("relations", relations, RELATIONS), ("modes", modes, MODES),
                                  ("dtypes", dtypes, ("float32", "float64"))):
        bad = [x for x in values if x not in allowed]
        if bad or not values:
            print(f"qrkd bench: --{name} must be a comma-separated subset of {allowed}, got {bad or values}",
                  file=sys.stderr)
            return 2
    try:
        ns, ds = _csv(args.n, int), _csv(args.d, int)
    except ValueError:
        print("qrkd bench: --n and --d take comma-separated integers", file=sys.stderr)
        return 2
    if any(x < 1 for x in ns + ds):
        print("qrkd bench: --n and --d must be >= 1", file=sys.stderr)
        return 2
    if not args.list and os.path.exists(args.out) and not os.path.isdir(args.out):
        return _fail(f"--out {args.out}: is a file, not a folder")
    profile = dict(PROFILES["quick" if args.quick else "full"])
    timeout = args.case_timeout if args.case_timeout else profile["case_timeout"]
    merlin_max_n = args.merlin_max_n if args.merlin_max_n is not None else profile["merlin_max_n"]
    max_minutes = args.max_minutes if args.max_minutes is not None else profile["max_minutes"]
    if device == "cuda":
        mem_limit = torch.cuda.get_device_properties(0).total_memory  # for predictions; CUDA raises its own OOM
    else:
        mem_limit = int(args.mem_limit_gb * (1 << 30)) if args.mem_limit_gb else int(0.75 * _mem_available())
    settings = {k: profile[k] for k in ("target_s", "min_reps", "max_reps", "slow_s", "slow_cap_s", "min_sample_s")}

    cases = plan(device, args.quick, relations, tuple(m for m in MODES if m in modes), tuple(dtypes), ns or None,
                 ds or None, named=not args.no_named)
    include = set(_csv(args.impls)) or None
    exclude = set(_csv(args.exclude_impls))
    work = [(c, implementations(c, compiled=args.compiled, quick=args.quick, merlin_max_n=merlin_max_n,
                                include=include, exclude=exclude)) for c in cases]
    work = [(c, impls) for c, impls in work if impls]
    total = sum(len(impls) for _, impls in work)
    if args.list:
        for c, impls in work:
            print(f"{c.id:<52} {' '.join(c.tags):<8} {', '.join(impls)}")
        print(f"{len(work)} cases, {total} measurements")
        return 0
    if not work:
        print("qrkd bench: nothing to measure with these options", file=sys.stderr)
        return 2

    info = machine_info(device)
    info["name"] = args.machine or machine_name(info)
    started = datetime.datetime.now(datetime.timezone.utc)
    stem_name = f"{info['name']}-{started:%Y-%m-%d}" + ("-quick" if args.quick else "")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        return _fail(f"--out {args.out}: cannot create the folder ({exc.strerror or exc})")
    stem = os.path.join(args.out, stem_name)
    data = {
        "schema": SCHEMA,
        "machine": info,
        "versions": versions(),
        "backends": {k: {"available": ok, "detail": d} for k, (ok, d) in backends.backend_status().items()},
        "config": {
            "device": device, "dtype": ",".join(dtypes), "quick": args.quick, "mem_limit_bytes": mem_limit,
            "case_timeout_s": timeout, "compile_allowance_s": profile["compile_allowance"],
            "named_timeout_factor": profile["named_timeout_factor"],
            "max_minutes": max_minutes, "merlin_max_n": merlin_max_n,
            "compiled": args.compiled, "settings": settings, "torch_threads": torch.get_num_threads(),
        },
        "command": "qrkd bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": started.isoformat(timespec="seconds"),
        "results": [],
    }
    prewarm = [device]
    if device == "cpu" and any(COMPILED in impls for _, impls in work):
        prewarm.append("compile")  # not on a GPU: nothing that might touch CUDA before the fork
    if any("merlin" in impls for _, impls in work):
        prewarm.append("merlin")
    runner = Runner(device, mem_limit if device == "cpu" else None, prewarm)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` stops us: kill the running measurement, then the server
    print(f"qrkd bench: {len(work)} cases, {total} measurements on {info['name']} ({device}); "
          f"budget {timeout:g} s each, memory limit {_fmt_bytes(mem_limit)}; writing {stem}.json", flush=True)
    _write_json(data, stem + ".json")
    try:
        print(f"fork server ready in {runner.start():.1f} s", flush=True)
        t_start = time.perf_counter()
        deadline = t_start + max_minutes * 60 if max_minutes else None
        history: dict = {}
        done = 0
        for index, (case, impls) in enumerate(work):
            shift = index % len(impls)
            records = []
            for impl in impls[shift:] + impls[:shift]:
                done += 1
                base = {"case": case.to_dict(), "case_id": case.id, "impl": impl,
                        "kind": "reference" if impl in REFERENCE_IMPLS else "backend", "predicted": False}
                # the named shapes are the ones quoted: they get a longer budget (the angle loss at N=4096)
                case_timeout = timeout * (profile["named_timeout_factor"] if case.tags else 1.0)
                predicted = _predict_failure(case, impl, history, case_timeout, mem_limit)
                if deadline is not None and time.perf_counter() > deadline and not case.tags:
                    # past the deadline only the named shapes (the ones quoted) still run
                    rec = dict(base, status="skipped", detail=f"not run: the sweep's {max_minutes:g} min were spent")
                elif predicted:
                    rec = dict(base, status=predicted[0], detail=predicted[1], predicted=True)
                else:
                    extra = profile["compile_allowance"] if impl == COMPILED else 0.0  # compiling is in the child
                    run_settings = dict(settings, budget_s=0.75 * case_timeout + extra)
                    rec = dict(base, **runner.run(case, impl, run_settings, case_timeout + extra))
                    _record_history(history, case, impl, rec)
                records.append(rec)
                _progress(done, total, t_start, case, rec)
            records.sort(key=lambda r: impls.index(r["impl"]))
            annotate_case(records)
            data["results"].extend(records)
            data["wall_s"] = time.perf_counter() - t_start
            _write_json(data, stem + ".json")
    except KeyboardInterrupt:
        print(f"qrkd bench: interrupted; {stem}.json holds the cases finished so far "
              f"(`qrkd bench --report {stem}.json` writes their tables and plots)", file=sys.stderr)
        return 130
    finally:
        runner.close()
    data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data["wall_s"] = time.perf_counter() - t_start
    _write_json(data, stem + ".json")
    written = write_report(data, stem, plots=not args.no_plots)
    print(f"wrote {stem}.json " + " ".join(written))
    print(f"done in {data['wall_s'] / 60:.1f} min")
    errors = [r for r in data["results"] if r["status"] == "error"]
    for r in errors:
        print(f"ERROR {r['case_id']} / {r['impl']}: {r['detail']}", file=sys.stderr)
    return 1 if errors else 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _progress(done: int, total: int, t_start: float, case: Case, rec: dict) -> None:
    elapsed = time.perf_counter() - t_start
    head = f"[{done:>4}/{total} {int(elapsed) // 60:>3}:{int(elapsed) % 60:02d}] {case.relation:<9}{case.mode:<7}" \
           f"{case.describe():<26}{rec['impl']:<19}"
    if rec["status"] == "ok":
        tail = (f"{_fmt_time(rec['median_s']):>10} IQR {_fmt_time(rec['iqr_s']):>9}  "
                f"peak {_fmt_bytes(rec['peak_mem_bytes']):>9}")
    else:
        tail = f"{rec['status'].upper():>10}  {rec['detail'][:110]}"
    print(head + tail, flush=True)


if __name__ == "__main__":
    sys.exit(main())
