"""Failures predicted from the sizes a series already ran: larger sizes are recorded instead of being run."""

from __future__ import annotations

import math

from .cases import COMPILED, MODES, TIME_EXPONENT, Case
from .formatting import _fmt_bytes, _fmt_time

# growth exponents in N used to predict a failure at the next size: time (cases.TIME_EXPONENT), and memory of the
# materialising references
_N3_MEMORY_IMPLS = ("reference", COMPILED)


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
    t_exp = TIME_EXPONENT[case.relation]
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
