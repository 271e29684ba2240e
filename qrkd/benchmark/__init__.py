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

Timing: warm-up calls (torch.compile compiles, Triton JIT-compiles during the first; then up to five more, within half
the sample target, since an op's first few calls can each be several times slower than the rest), then timed calls
until the sample target is met; calls faster than a few milliseconds are timed in loops, as many per sample as the
fastest warm-up call says; on a GPU each sample is synchronised.
Slow calls (over `slow_s`) are not repeated for nothing: the second warm-up is a sample, and so is the first unless it
took over 1.5 times as long (a compilation or a lazy initialisation); torch.compile gets extra time for compiling.
Peak memory: on the CPU the child's peak resident set size (VmHWM, reset through /proc/self/clear_refs just
before the measured calls, after gc and malloc_trim) minus its resident size at that moment: the working memory of
the implementation above its inputs, libraries and compiled code; on a GPU torch.cuda.max_memory_allocated minus
memory_allocated at the same point.

In turns (--turns): after a case's processes, one more child times the implementations that ran against each other
(measure_in_turns): a round times each once, as many calls a sample as fill min_sample_s, the order rotating from round
to round, at least 6 rounds and up to 41 within twice the sample target per impl. Each round's reference time over an
impl's is a paired ratio; report.annotate_turns gives their median, a distribution-free interval for it
(measure.median_interval: order statistics covering at least 95%) and a verdict (faster, tie, slower).

Roofline: before the sweep, in the parent process, the machine's float32 GEMM rate (torch.matmul from 1024^3, 4096^3 on
a GPU, doubling until one call takes >= 50 ms, median of 5) and memory bandwidth (a triad over 128 MiB arrays) on the sweep's device; every
record gets its work under the model of `roofline` (unit, units, flops), its throughput (units/s) and, against the
GEMM rate, its fraction and its equivalent GEMM GFLOP (time x GEMM GFLOP/s). --no-roofline skips the measurement.

Selection: --relations, --modes, --n, --d, --impls select from the grid; --tags keeps only the named shapes with those
tags, --shapes RELATION:N[:DS[:DT]][@IMPL+...] measures exact shapes (tagged "selected"), both without the grid
unless --grid.

Output (bench/results by default): <machine>-<date>[-quick].json, .md (tables) and -<relation>.png (time and peak
memory vs N, log-log, one line per impl). JSON schema "qrkd-bench/2":
    {schema, machine{name, hostname, platform, cpu, cpu_count, mem_total_bytes, gpu}, versions{python, torch, qrkd,
     triton, merlinquantum, ...}, backends{name: {available, detail}}, config{...}, command, started, finished,
     wall_s, roofline{device, gemm_gflops, gemm_n, gemm_dtype, gemm_samples_s, gemm_threads, bandwidth_gbs,
     bandwidth_bytes_per_call, bandwidth_method, bandwidth_samples_s, wall_s},
     results: [{case{relation, mode, n, ds, dt, dtype, device, modes, photons, tags}, case_id, impl, kind,
     status, predicted, detail, median_s, iqr_s, mean_s, min_s, samples_s, reps, inner, faults_per_call,
     first_call_s, setup_s, peak_mem_bytes, baseline_mem_bytes, peak_rss_bytes, child_maxrss_bytes, mem_method,
     value, value_rel_diff, threads, wall_s, process_medians_s and process_faults_per_call (--repeats),
     reference_impl, ratio_to_reference, speedup{ref impl: ratio}, work{unit, units, flops,
     flops_per_unit}, throughput, gflops, gemm_fraction, gemm_equivalent_gflop, turns{status, detail, rounds, inner,
     median_s, samples_s, and but for the reference impl speedup, low, high, level, verdict} (--turns)}]}
ratio_to_reference = median of the case's reference impl / median of this impl (> 1: faster than the reference).
Schema 1 files (no roofline) still load with --report.

Modules, one per concern:
    cases            relations, modes, named shapes, grids; Case, make_case, plan
    implementations  which impls a case gets (qrkd.backends.supports), build_call: the call each one makes
    measure          one measurement in the process making it: timing, in turns, MemoryProbe, classify_failure
    runner           the fork server and its children: Runner
    prediction       failures predicted from the sizes a series already ran
    machine          machine_info, machine_name, versions
    report           annotate_case, annotate_turns, the JSON file and the markdown tables; plots: the PNGs
    roofline         the work model per relation, the machine's GEMM rate and bandwidth, the roofline fields
    formatting       times, sizes and ratios as printed
    cli              `qrkd bench` (main): options, the sweep loop, progress
"""

from .cases import (
    COMPILED,
    FAILED,
    GRIDS,
    MODE_TITLES,
    MODES,
    NAMED,
    OPS,
    PHOTONIC_CIRCUIT,
    REFERENCE_IMPLS,
    RELATIONS,
    Case,
    make_case,
    plan,
)
from .cli import PROFILES, build_parser, main
from .implementations import build_call, implementations, reference_impl
from .machine import machine_info, machine_name, versions
from .measure import MemoryProbe, classify_failure, measure
from .plots import write_plots
from .report import SCHEMA, annotate_case, headline_rows, write_markdown, write_report
from .runner import Runner, ServerDied

# internals that bench/conftest.py and tests/test_benchmark.py reach through `qrkd.benchmark`
from .machine import _mem_available  # noqa: F401
from .prediction import _predict_failure, _record_history  # noqa: F401

__all__ = [
    "COMPILED",
    "FAILED",
    "GRIDS",
    "MODE_TITLES",
    "MODES",
    "NAMED",
    "OPS",
    "PHOTONIC_CIRCUIT",
    "PROFILES",
    "REFERENCE_IMPLS",
    "RELATIONS",
    "SCHEMA",
    "Case",
    "MemoryProbe",
    "Runner",
    "ServerDied",
    "annotate_case",
    "build_call",
    "build_parser",
    "classify_failure",
    "headline_rows",
    "implementations",
    "machine_info",
    "machine_name",
    "main",
    "make_case",
    "measure",
    "plan",
    "reference_impl",
    "versions",
    "write_markdown",
    "write_plots",
    "write_report",
]
