"""The plots of a sweep: time and peak memory against N, one PNG per relation."""

from __future__ import annotations

from .cases import FAILED, MODE_TITLES, PHOTONIC_CIRCUIT, RELATIONS
from .implementations import _impl_order


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
