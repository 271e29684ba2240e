"""Times, sizes and ratios as the progress lines and the report print them."""

from __future__ import annotations


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


def _fmt_count(x) -> str:
    """A count or rate with an SI prefix: 1.94 G, 312 k."""
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= 0.9995 * scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g}"
