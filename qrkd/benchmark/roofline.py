"""The roofline: the machine's measured float32 GEMM rate and memory bandwidth, and the work model that turns a
measured time into a throughput and a fraction of that GEMM rate.

Work model (README, Performance). A call of a loss does its relation on the student and on the teacher features.
Its work is counted in units of the relation, each covering both sides:
    distance, fidelity, photonic   unordered pairs {i, j}, i < j:            N (N - 1) / 2 per call
    angle                          unordered triplets (a; {b, c}), b < c:    N N (N - 1) / 2 per call
and in flops (a multiply, an add, a compare, an abs, a min/max, a sqrt each count 1; a complex multiply-add 8). Only
the terms that grow with the number of units are counted (O(N D) normalisations and the O(N) diagonal are left out),
and only the work the relation needs, not an implementation's choices (a recomputation in backward is not counted),
with one exception: the photonic permanent is counted as Ryser's formula, while the CPU kernel evaluates Glynn's, whose
Gray-code walk takes 2^(n-1) steps to Ryser's 2^n - 1, so the CPU kernel's fraction under this model is higher than
the flops it executes (at the seed's n = 5 the model counts about 1.4x the forward flops the kernel executes: 1,969
per side against about 1,420).
The loss tail of a pair or triplet, both sides' values given, is u = v_s - v_t (1), smooth_l1(u) (|u|, compare and
0.5 u^2 or |u| - 0.5: 4) and the running sum (1): 6 flops. The backward is counted for the student only (the teacher
gets no gradient).

    distance  forward  2 (Ds + Dt) + 20 per pair: per side the dot product x_i.x_j (2D), q = |x_i|^2 + |x_j|^2 - 2 g
                       (3), the clamp (1), sqrt (1), the sum for the mean and the division by it (2); the tail (6).
              backward 4 Ds + 10 per pair: smooth_l1'(u) (2) over the mean (1), the mean's own term (4), dq = g / 2d
                       (2), the row sum (1), and dx = 2 (H x) with H symmetric (a GEMM: 4 Ds per unordered pair).
    fidelity  forward  4 D + 8 per pair, D = min(Ds, Dt) (both sides are cut to it): per side psi_i.psi_j (2D) and
                       its square (1); the tail (6).
              backward 4 D + 4 per pair: smooth_l1'(u) (2), dL/dG = 2 G dL/dK (2), dpsi = 2 (dG psi) (4 D).
              For narrow features at larger N the torch and cpp backends take the loss from moments instead, O(N D^4)
              (qrkd/backends/fidelity_moments.py). The model still counts the pairs there, so their fraction can pass
              1: no pairwise pass could finish in that time at the machine's GEMM rate.
    angle     forward  14 per triplet: per side the numerator q_ab + q_ac - q_bc (2) and its scaling by
                       (1/d_ab) (1/d_ac) / 2 (2); the tail (6); plus per pair the squared distances of both sides,
                       2 (Ds + Dt) + 2 (the dot product, the norms' sum, the square root).
              backward 11 per triplet: smooth_l1'(u) (2), g r (1), g A (1), dq_ab and dq_ac (3 each: a multiply by
                       1/q and two adds), dq_bc (1); plus per pair dx = 2 (H x) (4 Ds) and the row sum (1).
    photonic  forward  per pair and side, n photons in m modes of which d carry the features' phases: the n x n
                       product P_i P_j^H over the d varying columns (n^2 d complex multiply-adds: 8 n^2 d) plus, when
                       d < m, the block of the m - d columns every P_i shares (the same for every pair: added, 2 n^2),
                       Ryser's permanent over the 2^n - 1 non-empty column subsets in Gray-code order, each step
                       updating the n row sums (2n), multiplying them (n - 1 complex products: 6 (n - 1)) and adding
                       the signed product (2): (2^n - 1) (8n - 4); then |perm|^2 (3). Two sides, and the tail (6).
                       At the seed's d = 4, m = 10, n = 5: 2 x 1,969 + 6 = 3,944.
              backward per pair, student side: recomputing the product (8 n^2 d + 2 n^2), the cofactor walk
                       ((2^n - 1) steps of the row update (2n), suffix products (6 (n - 1)), prefix times suffix and the
                       prefix update per row (12 n) and the cofactor sums of the subset's columns (2 per member, n^2 / 2
                       on average over the rows: n^2)), Y = w conj(C) (6 n^2) and the two gradient products Y Q_j and
                       Y^H P_i over the varying columns (2 x 8 n^2 d; the features reach only those):
                       24 n^2 d + 2 n^2 + (2^n - 1)(n^2 + 20 n - 6) + 6 n^2 + 2 (smooth_l1'(u)); 6,291 at the seed's.

The fraction of the GEMM rate is (work / time) / (measured GEMM flops per second), and "equivalent GEMM GFLOP" is
time x measured GEMM GFLOP/s: the size of the float32 GEMM the machine would finish in the kernel's time.
"""

from __future__ import annotations

import statistics
import time

TAIL = 6  # u = v_s - v_t, smooth_l1(u), the running sum

UNITS = {"angle": "triplets", "distance": "pairs", "fidelity": "pairs", "photonic": "pairs"}


def units(relation: str, n: int) -> float:
    """How many units (unordered pairs or triplets, both sides) one call of the loss works on."""
    pairs = n * (n - 1) / 2
    if relation == "angle":
        return n * pairs
    if relation in UNITS:
        return pairs
    raise ValueError(f"relation must be one of {tuple(UNITS)}, got {relation!r}")


def ryser_flops(photons: int) -> int:
    """Ryser's permanent of an n x n complex matrix, Gray-code order: (2^n - 1) steps of 8n - 4 flops."""
    return ((1 << photons) - 1) * (8 * photons - 4)


def _shared_block_flops(photons: int, modes: int, varying: int) -> int:
    return 2 * photons * photons if varying < modes else 0


def photonic_side_flops(photons: int, modes: int, varying: int) -> int:
    """One K_ij = |Perm(P_i P_j^H)|^2, `varying` of the m columns of P_i carrying the features: the product over
    them and the shared block, the permanent, the squared modulus."""
    n = photons
    return 8 * n * n * varying + _shared_block_flops(n, modes, varying) + ryser_flops(n) + 3


def photonic_backward_flops(photons: int, modes: int, varying: int) -> int:
    n = photons
    return (24 * n * n * varying + _shared_block_flops(n, modes, varying) + ((1 << n) - 1) * (n * n + 20 * n - 6)
            + 6 * n * n + 2)


def flops_per_unit(relation: str, mode: str, ds: int, dt: int, modes: int = 0, photons: int = 0) -> float:
    """Flops of one unit (pair or triplet) for the loss (mode "fwd") or the loss and its student gradient ("fwdbwd"),
    the per-pair part of the angle loss left out (see work_flops)."""
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    backward = mode == "fwdbwd"
    if relation == "distance":
        return 2 * (ds + dt) + 14 + TAIL + (4 * ds + 10 if backward else 0)
    if relation == "fidelity":
        d = min(ds, dt)
        return 4 * d + 2 + TAIL + (4 * d + 4 if backward else 0)
    if relation == "angle":
        return 8 + TAIL + (11 if backward else 0)
    if relation == "photonic":
        if photons < 1 or modes < 1:
            raise ValueError(f"the photonic work model needs modes >= 1 and photons >= 1, got {modes}, {photons}")
        varying = min(ds, modes)  # the circuit's d phase-carrying modes
        return (2 * photonic_side_flops(photons, modes, varying) + TAIL
                + (photonic_backward_flops(photons, modes, varying) if backward else 0))
    raise ValueError(f"relation must be one of {tuple(UNITS)}, got {relation!r}")


def work_flops(relation: str, mode: str, n: int, ds: int, dt: int, modes: int = 0, photons: int = 0) -> float:
    """The flops of one call under the work model: units x flops per unit, plus for the angle loss its pairwise part
    (the squared distances of both sides, and in backward dx = 2 (H x))."""
    total = units(relation, n) * flops_per_unit(relation, mode, ds, dt, modes, photons)
    if relation == "angle":
        per_pair = 2 * (ds + dt) + 2 + (4 * ds + 1 if mode == "fwdbwd" else 0)
        total += units("distance", n) * per_pair
    return total


def case_work(case: dict) -> dict | None:
    """The work model of a case (a Case.to_dict()): unit, units, flops and flops per unit (all the call's flops over
    its units, the angle loss's pairwise part included); None for a relation without a work model."""
    if case["relation"] not in UNITS:
        return None
    args = (case["relation"], case["mode"], case["n"], case["ds"], case["dt"], case.get("modes", 0),
            case.get("photons", 0))
    count = units(case["relation"], case["n"])
    flops = work_flops(*args)
    return {"unit": UNITS[case["relation"]], "units": count, "flops": flops,
            "flops_per_unit": flops / count if count else None}


def roofline_fields(case: dict, median_s, gemm_gflops) -> dict:
    """What the report shows for one measured (case, impl): throughput in units/s, GFLOP/s under the work model, the
    fraction of the measured GEMM rate and the equivalent GEMM GFLOP (time x GEMM GFLOP/s). None where not known."""
    work = case_work(case)
    out = {"work": work, "throughput": None, "gflops": None, "gemm_fraction": None, "gemm_equivalent_gflop": None}
    if work is None or median_s is None or median_s <= 0:
        return out
    out["throughput"] = work["units"] / median_s
    out["gflops"] = work["flops"] / median_s / 1e9
    if gemm_gflops:
        out["gemm_fraction"] = out["gflops"] / gemm_gflops
        out["gemm_equivalent_gflop"] = median_s * gemm_gflops
    return out


def annotate_roofline(records: list, machine_rates: dict | None) -> None:
    """Adds the roofline fields to every record of a sweep (failed ones get the work model and None elsewhere)."""
    gemm = (machine_rates or {}).get("gemm_gflops")
    for r in records:
        median = r.get("median_s") if r.get("status") == "ok" else None
        r.update(roofline_fields(r["case"], median, gemm))


# ------------------------------------------------------------------------------------------- measuring the machine


def _time(call, sync, reps: int) -> list:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        sync()
        samples.append(time.perf_counter() - t0)
    return samples


def measure_gemm(device: str = "cpu", reps: int = 5, max_n: int | None = None, min_call_s: float = 0.05) -> dict:
    """Float32 GEMM rate (torch.matmul of two n x n matrices, 2 n^3 flops): n doubles from 1024 (4096 on a GPU: sizes
    where a GEMM is efficient, whatever a busy machine makes a small one look like) until one call takes min_call_s
    or n reaches max_n (4096 on a CPU, 8192 on a GPU); then `reps` timed calls, the median. On a GPU matmul runs in
    full float32 (TF32 off) for the measurement."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    max_n = max_n or (8192 if dev.type == "cuda" else 4096)
    gen = torch.Generator().manual_seed(0)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        n = min(max_n, 4096 if dev.type == "cuda" else 1024)
        while True:
            a = torch.randn(n, n, generator=gen).to(dev)
            b = torch.randn(n, n, generator=gen).to(dev)
            out = torch.empty(n, n, device=dev)
            call = lambda: torch.matmul(a, b, out=out)  # noqa: E731
            call()
            sync()
            (first,) = _time(call, sync, 1)
            if first >= min_call_s or 2 * n > max_n:
                break
            n *= 2
        samples = _time(call, sync, reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    median = statistics.median(samples)
    return {"gemm_gflops": 2.0 * n**3 / median / 1e9, "gemm_n": n, "gemm_dtype": "float32",
            "gemm_samples_s": samples, "gemm_threads": torch.get_num_threads()}


def measure_bandwidth(device: str = "cpu", reps: int = 5, megabytes: int = 128) -> dict:
    """Memory bandwidth from a triad a = b + s c over three float32 arrays of `megabytes` MB each (far beyond the
    caches): 3 x megabytes MB moved per call (reads of b, c and the write of a), median of `reps` calls."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    count = megabytes * (1 << 20) // 4
    b = torch.ones(count, device=dev)
    c = torch.ones(count, device=dev)
    a = torch.empty(count, device=dev)
    call = lambda: torch.add(b, c, alpha=0.5, out=a)  # noqa: E731
    call()
    sync()
    samples = _time(call, sync, reps)
    moved = 3 * count * 4
    return {"bandwidth_gbs": moved / statistics.median(samples) / 1e9, "bandwidth_bytes_per_call": moved,
            "bandwidth_method": "triad a = b + s c, float32", "bandwidth_samples_s": samples}


def measure_machine(device: str = "cpu", reps: int = 5, gemm_max_n: int | None = None,
                    bandwidth_megabytes: int = 128) -> dict:
    """The machine's rates for the roofline: GEMM GFLOP/s and memory GB/s, measured now, in this process."""
    started = time.perf_counter()
    rates = {"device": device}
    rates.update(measure_gemm(device, reps, gemm_max_n))
    rates.update(measure_bandwidth(device, reps, bandwidth_megabytes))
    rates["wall_s"] = time.perf_counter() - started
    return rates


def describe_rates(rates: dict | None) -> str:
    """One line for the report's header."""
    if not rates or not rates.get("gemm_gflops"):
        return "Roofline: not measured in this run."
    return (f"Roofline: float32 GEMM {rates['gemm_gflops']:.1f} GFLOP/s (torch.matmul, {rates['gemm_n']}^3, median of "
            f"{len(rates['gemm_samples_s'])}, {rates.get('gemm_threads', '?')} threads); memory bandwidth "
            f"{rates['bandwidth_gbs']:.1f} GB/s ({rates['bandwidth_method']}, "
            f"{rates['bandwidth_bytes_per_call'] / 3 / (1 << 20):.0f} MiB arrays), measured at the start of the run.")
