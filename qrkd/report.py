"""The statistics, tables, report and plot of a `qrkd compare` run.

Per variant, over seeds: mean and standard deviation; for each distilled variant, its difference in test accuracy to
scratch and to RKD paired by seed (the students of one seed share initial weights and batches), with a Student-t
confidence interval.
"""

from __future__ import annotations

import math
from pathlib import Path

LABELS = {"teacher": "Teacher", "scratch": "Scratch", "kd": "KD", "rkd": "RKD", "qrkd": "QRKD",
          "qrkd-simple": "QRKD (simple)", "qrkd-detached": "QRKD (detached)"}

# The published single-seed (seed 42) MNIST table (reproduced_papers' QRKD report; full training set, batch 64,
# 10 epochs). Its "QRKD-merlin" row computes the photonic term on detached student features: our qrkd-detached.
PUBLISHED = {"mnist": {"teacher": 98.34, "scratch": 90.85, "kd": 95.05, "rkd": 94.35, "qrkd-simple": 95.39,
                       "qrkd-detached": 95.05}}


# ---------------------------------------------------------------------------------------------------------- stats


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _t_cdf_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer number of degrees of freedom (closed form, Abramowitz & Stegun
    26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided critical value t with P(|T| <= t) = confidence for Student's t with df degrees of freedom."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"df must be a positive int, got {df!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    lo, hi = 0.0, 1.0
    while _t_cdf_central(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_central(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a, b, confidence: float = 0.95):
    """Mean of a[i] - b[i] over pairs (seeds) with its t confidence interval; None when fewer than two pairs."""
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if len(diffs) < 2:
        return None
    mean, std = mean_std(diffs)
    half = t_quantile(confidence, len(diffs) - 1) * std / math.sqrt(len(diffs))
    return {"mean": mean, "std": std, "n": len(diffs), "ci_low": mean - half, "ci_high": mean + half,
            "confidence": confidence, "contains_zero": mean - half <= 0 <= mean + half}


def _per_seed(runs, variant, key):
    return [run["variants"][variant][key] if variant in run["variants"] else None for run in runs]


def summarise(runs, variants):
    """Per variant, over seeds: mean and std of train, test, acc_gap, ts_gap, dist_gain, seconds per epoch, wall;
    for the distilled variants, the paired (by seed) difference in test accuracy to scratch and to RKD."""
    summary = {}
    for variant in variants:
        rows = [run["variants"][variant] for run in runs if variant in run["variants"]]
        if not rows:
            continue
        cols = {}
        for key in ("train_acc", "test_acc", "acc_gap", "ts_gap", "dist_gain", "train_s_per_epoch",
                    "s_per_epoch", "wall_s"):
            mean, std = mean_std([row.get(key) for row in rows])
            cols[key] = None if mean is None else {"mean": mean, "std": std}
        cols["seeds"] = len(rows)
        if variant not in ("teacher", "scratch"):
            test = _per_seed(runs, variant, "test_acc")
            cols["vs_scratch"] = paired_difference(test, _per_seed(runs, "scratch", "test_acc"))
            cols["vs_rkd"] = None if variant == "rkd" else paired_difference(test, _per_seed(runs, "rkd", "test_acc"))
        summary[variant] = cols
    return summary


def _cell(stat, digits=2, signed=False):
    if stat is None:
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(stat["mean"])
    return text + f" ± {stat['std']:.{digits}f}" if stat.get("std") and stat["std"] > 0 else text


def _diff_cell(diff):
    if diff is None:
        return "-"
    text = f"{diff['mean']:+.2f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]"
    return text + " (contains 0)" if diff["contains_zero"] else text


def format_table(summary, n_seeds: int, published=None) -> str:
    pm = f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else ""
    head = "| Variant | Train (%) | Test (%) | Acc. gap | T&S gap | Dist. gain | s/epoch (train) | wall (s) |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if published:
        head, rule = head + " Published test (%) |", rule + "---:|"
    lines = [head, rule]
    for variant, cols in summary.items():
        line = (f"| {LABELS[variant]} | {_cell(cols['train_acc'])} | {_cell(cols['test_acc'])} | "
                f"{_cell(cols['acc_gap'], signed=True)} | {_cell(cols['ts_gap'], signed=True)} | "
                f"{_cell(cols['dist_gain'], signed=True)} | {_cell(cols['train_s_per_epoch'], 1)} | "
                f"{_cell(cols['wall_s'], 1)} |")
        if published:
            line += f" {published[variant]:.2f} |" if variant in published else " - |"
        lines.append(line)
    note = (f"Accuracies after the last epoch{pm}. Acc. gap = train - test; T&S gap = teacher test - student test; "
            "Dist. gain = student test - scratch test; s/epoch (train) = the optimisation steps alone.")
    if published:
        note += (" Published: the single-seed (42) table of the QRKD reproduction (its QRKD-merlin row computes the "
                 "photonic term on detached student features, as our QRKD (detached) does).")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    paired = [(v, c) for v, c in summary.items() if c.get("vs_scratch") or c.get("vs_rkd")]
    if paired:
        conf = next(c[k]["confidence"] for _, c in paired for k in ("vs_scratch", "vs_rkd") if c.get(k))
        text += ("\n| Variant | Test - Scratch, mean [CI] | Test - RKD, mean [CI] |\n|---|---:|---:|\n"
                 + "\n".join(f"| {LABELS[v]} | {_diff_cell(c.get('vs_scratch'))} | {_diff_cell(c.get('vs_rkd'))} |"
                             for v, c in paired)
                 + f"\n\nPaired by seed (the students of one seed share initial weights and batches): mean difference "
                   f"in test accuracy (points) with its {round(conf * 100)}% t confidence interval; '(contains 0)' "
                   "marks a difference these seeds cannot tell from none.\n")
    return text


# ---------------------------------------------------------------------------------------------------------- plots


def plot_accuracy(runs, variants, epochs: int, path: Path, title: str) -> None:
    """Test accuracy per epoch, mean over seeds with a band of one standard deviation (solid, markers x), and the
    mean train accuracy (thin dashed, markers o)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = list(range(1, epochs + 1))
    for i, variant in enumerate(variants):
        hists = [run["variants"][variant]["history"] for run in runs
                 if variant in run["variants"] and run["variants"][variant].get("history")]
        for key in ("test_acc", "train_acc"):
            curves = [h[key] for h in hists if len(h[key]) == epochs]
            if not curves:
                continue
            stats = [mean_std([c[e] for c in curves]) for e in range(epochs)]
            mean = [m for m, _ in stats]
            if key == "test_acc":
                ax.plot(xs, mean, label=f"{LABELS[variant]} test", marker="x", color=f"C{i}")
                if len(curves) > 1:
                    ax.fill_between(xs, [m - sd for m, sd in stats], [m + sd for m, sd in stats], color=f"C{i}",
                                    alpha=0.15, linewidth=0)
            else:
                ax.plot(xs, mean, label=f"{LABELS[variant]} train", marker="o", markersize=3, color=f"C{i}",
                        linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_xticks(xs)
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Accuracy (%)")
    seeds = len(runs)
    ax.set_title(title + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""))
    ax.grid(True)
    if ax.lines:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def published_for(args):
    """The published table, shown beside a run of its own setup (the paper preset's data, batch and epochs)."""
    same_setup = args.subset == 0 and args.epochs == 10 and args.batch_size == 64 and args.max_batches is None
    return PUBLISHED.get(args.dataset) if same_setup else None


def markdown_report(args, summary, runs, table, env, wall, session_wall) -> str:
    samples = runs[0].get("train_samples")
    lines = [
        f"# qrkd compare: {args.dataset}",
        "",
        f"preset {args.preset}; {samples} training samples (subset {args.subset or 'all'}), batch {args.batch_size}, "
        f"{args.epochs} epochs, lr {args.lr}, seeds {', '.join(map(str, args.seeds))}, device {env['device']}"
        + (f" x {env['world_size']} processes" if env["world_size"] > 1 else "")
        + f", {env['threads']} threads; training and evaluation {wall:.0f} s in all"
        + (f" (this invocation {session_wall:.0f} s: the run was resumed)" if env.get("resumed") else "") + ".",
        "",
        table,
        "## Loss backends",
        "",
    ]
    for variant, res in runs[0]["variants"].items():
        if res.get("loss_backends"):
            used = ", ".join(f"{term}: {name}" for term, name in res["loss_backends"].items())
            lines.append(f"- {LABELS[variant]}: {used}")
    lines += ["", "## Time per variant", "",
              "| Variant | steps s/epoch | epoch incl. loading and evaluation, s | wall (s) |", "|---|---:|---:|---:|"]
    for variant, cols in summary.items():
        lines.append(f"| {LABELS[variant]} | {_cell(cols['train_s_per_epoch'], 2)} | {_cell(cols['s_per_epoch'], 2)} "
                     f"| {_cell(cols['wall_s'], 1)} |")
    lines += ["", "## Per seed (test accuracy, %)", "",
              "| Variant | " + " | ".join(f"seed {run['seed']}" for run in runs) + " |",
              "|---|" + "---:|" * len(runs)]
    for variant in summary:
        cells = [f"{run['variants'][variant]['test_acc']:.2f}" if variant in run["variants"] else "-" for run in runs]
        lines.append(f"| {LABELS[variant]} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy](accuracy.png)", ""]
    return "\n".join(lines)
