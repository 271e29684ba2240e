"""One measurement, in the process that makes it: time and peak memory of an impl on a case, and failures."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import resource
import statistics
import time

from .cases import COMPILED, Case
from .implementations import build_call

_clock = time.perf_counter  # measure_in_turns' clock (a test gives it one that its fake calls advance)


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


def _page_faults() -> int:
    """This process's page faults so far, minor and major (a minor one is a fresh page mapped in: an allocation that
    glibc served from new pages instead of its heap)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


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


def combine_processes(records: list) -> dict:
    """One cell from the records of the same (case, impl) measured in several fresh processes (`--repeats`): the
    median of the processes' medians (one process's median can be off by up to 2x on a shared machine), the IQR over
    every sample, the largest peak memory, the median of the page faults a call; the first failure if any process
    failed. A round the sweep's deadline skipped leaves the processes that ran."""
    if any(r["status"] == "ok" for r in records):
        records = [r for r in records if r["status"] != "skipped"]
    failed = [r for r in records if r["status"] != "ok"]
    if failed or len(records) == 1:
        return dict(failed[0] if failed else records[0], process_medians_s=[r["median_s"] for r in records
                                                                           if r["status"] == "ok"])
    medians = [r["median_s"] for r in records]
    out = dict(records[0])
    out.update(_stats([x for r in records for x in r["samples_s"]]))
    faults = [r.get("faults_per_call") for r in records]  # None: a slow call timed by its first samples only
    counted = [f for f in faults if f is not None]
    out.update(
        median_s=statistics.median(medians),
        process_medians_s=medians,
        faults_per_call=statistics.median(counted) if counted else None,
        process_faults_per_call=faults,
        peak_mem_bytes=max(r["peak_mem_bytes"] for r in records),
        peak_rss_bytes=max(r["peak_rss_bytes"] for r in records),
    )
    return out


def _calls_per_sample(per_call: float, min_sample_s: float) -> int:
    """Calls timed as one sample: as many as fill min_sample_s (at most 1000), one for a slower call."""
    return max(1, min(1000, int(min_sample_s / max(per_call, 1e-7)))) if per_call < min_sample_s else 1


@contextlib.contextmanager
def _gc_paused():
    """No garbage collection inside the timed calls (a collection would land in one sample)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median_interval(values: list, level: float = 0.95) -> dict:
    """The median of `values` and a distribution-free interval for it: the order statistics x_(k) and x_(n+1-k) for
    the largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at least `level`. Where n is too small for any k
    to reach it, the smallest and the largest value, and `level` says what they cover (1 - 2^(1-n))."""
    ordered = sorted(values)
    n = len(ordered)
    k, cover = 1, 1.0 - 2.0 * 0.5**n
    below = 1  # the number of subsets behind P(B < k + 1) = (C(n,0) + ... + C(n,k)) / 2^n
    for j in range(1, (n + 1) // 2):
        below += math.comb(n, j)
        wider = 1.0 - 2.0 * below / 2.0**n
        if wider < level:
            break
        k, cover = j + 1, wider
    return dict(median=statistics.median(ordered), low=ordered[k - 1], high=ordered[n - k], level=cover, n=n)


TURN_ROUNDS = (6, 41)  # the fewest and the most rounds of measure_in_turns (6: min to max, a 96.9% interval)
TURN_TARGET_PER_IMPL = 2  # rounds run for this many sample targets (target_s) per impl, past the fewest


def measure_in_turns(case: Case, impls: list, settings: dict, started: float | None = None) -> dict:
    """Times the impls of one case in this process, in turns: each round times every impl once (`inner` calls each,
    the same count in every round), the order rotating from round to round. A slow spell of the machine then falls on
    all of them, and one round's times of two impls make a paired ratio. After a warm-up (a first call, then up to
    three while they are cheap), rounds run until settings["turns_target_s"] has passed and TURN_ROUNDS[0] are done,
    at most TURN_ROUNDS[1]; status "skipped" when the fewest rounds would not fit the budget."""
    import torch

    now = _clock
    started = now() if started is None else started
    budget_end = started + settings["budget_s"]
    calls = {impl: build_call(case, impl) for impl in impls}
    fewest, most = TURN_ROUNDS
    per_call = {}
    for impl, (call, sync) in calls.items():
        t0 = now()
        call()
        sync()
        per_call[impl] = now() - t0
        if now() + fewest * sum(per_call.values()) > budget_end:
            break  # no need to warm up the rest: the rounds cannot fit
        warm_end = now() + settings["target_s"] / 2
        for _ in range(3):
            if now() + per_call[impl] > warm_end:
                break
            t0 = now()
            call()
            sync()
            per_call[impl] = min(per_call[impl], now() - t0)
    inner = {impl: _calls_per_sample(t, settings["min_sample_s"]) for impl, t in per_call.items()}
    round_s = sum(inner[i] * per_call[i] for i in per_call)
    if len(per_call) < len(impls) or now() + fewest * round_s > budget_end:
        return {"status": "skipped", "detail": f"a round of turns takes {'over ' if len(per_call) < len(impls) else ''}"
                f"{round_s:.3g} s: {fewest} rounds do not fit the {settings['budget_s']:g} s budget"}
    samples = {impl: [] for impl in impls}
    turns_end = now() + settings["turns_target_s"]
    with _gc_paused():
        for round_ in range(most):
            if round_ >= fewest and (now() >= turns_end or now() + round_s > budget_end):
                break
            shift = round_ % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                call, sync = calls[impl]
                t0 = now()
                for _ in range(inner[impl]):
                    call()
                sync()
                samples[impl].append((now() - t0) / inner[impl])
    return {"status": "ok", "detail": "", "rounds": len(samples[impls[0]]), "inner": inner, "samples_s": samples,
            "threads": torch.get_num_threads()}


_WARM_UP_CALLS = 5  # at most, after the first, for calls faster than slow_s


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
        # more warm-up calls while they are cheap: an op's first few calls can each run several times slower than the
        # rest (lazy initialisation, first allocations), and the calls per sample are sized from the fastest of them
        warm_end = now() + settings["target_s"] / 2
        per_call = float("inf")
        for _ in range(_WARM_UP_CALLS):
            t0 = now()
            call()
            sync()
            per_call = min(per_call, now() - t0)
            if now() >= warm_end:
                break
        probe.reset()
    inner = _calls_per_sample(per_call, settings["min_sample_s"])
    timing_start = now()
    faults_start, timed_calls = _page_faults(), 0
    with _gc_paused():
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
            timed_calls += inner
    faults_per_call = (_page_faults() - faults_start) / timed_calls if timed_calls else None
    if not slow:
        peak, peak_abs = probe.peak()
    out = _stats(samples)
    out.update(
        status="ok",
        detail="",
        inner=inner,
        faults_per_call=faults_per_call,
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
