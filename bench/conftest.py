"""pytest-benchmark suites: `pytest bench --benchmark-only`.

One test per (relation, mode, dtype, N, D, implementation): a test names its relations with the marker
`bench_relations` (taken from qrkd/relations.py) and is parametrised from what is available at run time (the same
discovery as `qrkd bench`: qrkd.available_backends(), supports(), the references of qrkd.benchmark). Each test
is in the benchmark group of its case, so the implementations of a case are listed side by side, and test names are
stable, so `--benchmark-autosave` / `--benchmark-compare` compare runs. Peak memory goes into extra_info: on the CPU
the peak resident set of a fresh child process making the same call (qrkd.benchmark.Runner), on a GPU
torch.cuda.max_memory_allocated around one call.

Sizes: --bench-n (default 64,256), --bench-d (128), --bench-photonic-n (16,128), --bench-dtype (float32),
--bench-mode (fwd,fwdbwd), --bench-device (cuda when available, else cpu), --bench-impls, --bench-compiled
(auto|all|none), --bench-merlin-max-n (16), --bench-no-memory.
"""

import os

import pytest
import torch

from qrkd import benchmark as qb

# timing settings of the memory child: one warm-up call, the memory reset, one measured call
_MEMORY_SETTINGS = dict(target_s=0.0, min_reps=1, max_reps=1, slow_s=1e9, slow_cap_s=1e9, min_sample_s=0.0,
                        budget_s=600.0)


def pytest_addoption(parser):
    group = parser.getgroup("qrkd-bench", "qrkd benchmark sizes")
    group.addoption("--bench-n", default="64,256", help="comma-separated batch sizes")
    group.addoption("--bench-d", default="128", help="comma-separated feature widths (Ds = Dt)")
    group.addoption("--bench-photonic-n", default="16,128", help="batch sizes of the photonic kernel")
    group.addoption("--bench-dtype", default="float32", help="float32 and/or float64")
    group.addoption("--bench-mode", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--bench-impls", default=None, help="only these implementations (comma-separated)")
    group.addoption("--bench-compiled", default="auto", choices=("auto", "all", "none"),
                    help="where torch.compile(reference) is measured (auto: feature width 128 on the CPU)")
    group.addoption("--bench-merlin-max-n", type=int, default=16, help="largest N MerLin is measured at")
    group.addoption("--bench-no-memory", action="store_true", help="leave out the peak-memory measurement")


_IMPLS_COLLECTED = set()  # what the memory server must prewarm for


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_relations(*names): the relations (qrkd/relations.py) a test measures")


def _csv(text, convert=str):
    return [convert(x) for x in (text or "").split(",") if x.strip()]


def _device(config):
    device = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--bench-device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda, but torch sees no CUDA device")
    return device


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker("bench_relations")
    if "bench_case" not in metafunc.fixturenames or marker is None:
        return
    config = metafunc.config
    device = _device(config)
    include = set(_csv(config.getoption("--bench-impls"))) or None
    params = []
    for relation in marker.args:
        ns = _csv(config.getoption("--bench-photonic-n" if relation == "photonic" else "--bench-n"), int)
        ds = [qb.PHOTONIC_CIRCUIT[0]] if relation == "photonic" else _csv(config.getoption("--bench-d"), int)
        for dtype in _csv(config.getoption("--bench-dtype")):
            for mode in _csv(config.getoption("--bench-mode")):
                for n in ns:
                    for d in ds:
                        case = qb.make_case(relation, mode, n, d, d, dtype, device)
                        impls = qb.implementations(case, compiled=config.getoption("--bench-compiled"),
                                                   merlin_max_n=config.getoption("--bench-merlin-max-n"),
                                                   include=include)
                        params += [pytest.param(case, impl, id=f"{case.id}-{impl}") for impl in impls]
                        _IMPLS_COLLECTED.update(impls)
    metafunc.parametrize(("bench_case", "bench_impl"), params)


@pytest.fixture(scope="session")
def _memory_runner(pytestconfig):
    if pytestconfig.getoption("--bench-no-memory") or _device(pytestconfig) != "cpu":
        yield None
        return
    prewarm = ["cpu"]
    if qb.COMPILED in _IMPLS_COLLECTED:
        prewarm.append("compile")
    if "merlin" in _IMPLS_COLLECTED:
        prewarm.append("merlin")
    mem_limit = int(0.75 * qb._mem_available())
    with qb.Runner("cpu", mem_limit, prewarm) as runner:
        yield runner


@pytest.fixture
def bench_memory(pytestconfig, _memory_runner):
    """memory(case, impl, call, sync) -> dict for extra_info."""

    def memory(case, impl, call, sync):
        if pytestconfig.getoption("--bench-no-memory"):
            return {}
        if case.device == "cuda":
            probe = qb.MemoryProbe("cuda")
            probe.reset()
            call()
            sync()
            peak, top = probe.peak()
            return {"peak_mem_bytes": peak, "peak_allocated_bytes": top, "mem_method": probe.method}
        rec = _memory_runner.run(case, impl, _MEMORY_SETTINGS, timeout=300.0)
        if rec["status"] != "ok":
            return {"memory_status": rec["status"], "memory_detail": rec.get("detail", "")}
        return {k: rec[k] for k in ("peak_mem_bytes", "peak_rss_bytes", "baseline_mem_bytes", "mem_method")}

    return memory


@pytest.fixture
def bench_run(benchmark, bench_case, bench_impl, bench_memory):
    """Runs the test's measurement: bench_run()."""
    return lambda: _run_benchmark(benchmark, bench_case, bench_impl, bench_memory)


def _run_benchmark(benchmark, case, impl, memory):
    """Times one implementation of one case with pytest-benchmark (warm-up first: torch.compile compiles there)."""
    try:
        call, sync = qb.build_call(case, impl)
        value = float(call())
        sync()
    except Exception as exc:
        failure = qb.classify_failure(exc)
        if failure["status"] == "oom":
            pytest.skip(f"out of memory at this size: {failure['detail'][:200]}")
        raise
    benchmark.group = case.id
    benchmark.extra_info.update(case.to_dict())
    benchmark.extra_info.update(impl=impl, kind="reference" if impl in qb.REFERENCE_IMPLS else "backend",
                                value=value, threads=torch.get_num_threads(),
                                cpu_count=os.cpu_count())
    benchmark.extra_info.update(memory(case, impl, call, sync))

    def once():
        call()
        sync()

    benchmark(once)
