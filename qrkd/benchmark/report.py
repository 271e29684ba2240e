"""The results of a sweep: ratios across the impls of a case, the JSON file and the markdown tables."""

from __future__ import annotations

import json
import math
import os
import statistics

from .cases import COMPILED, MODE_TITLES, MODES, REFERENCE_IMPLS, RELATIONS, Case
from .formatting import _fmt_bytes, _fmt_count, _fmt_ratio, _fmt_time
from .implementations import _impl_order, reference_impl
from .measure import TURN_ROUNDS, TURN_TARGET_PER_IMPL, median_interval
from .plots import write_plots
from .roofline import describe_rates

SCHEMA = "qrkd-bench/2"


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


def annotate_turns(records: list, turns: dict) -> None:
    """Fills `turns` in each measured record of one case (after annotate_case) from a measure_in_turns result over
    them: its median time in turns, and for every impl but the case's reference impl the median over the rounds of
    the reference's time / its own, a distribution-free interval for that median (median_interval) and the verdict:
    faster or slower where the interval lies above or below 1, tie where it holds 1."""
    measured = [r for r in records if r["status"] == "ok"]
    if turns["status"] != "ok":
        for r in measured:
            r["turns"] = {"status": turns["status"], "detail": turns.get("detail", "")}
        return
    ref = records[0]["reference_impl"]
    base = turns["samples_s"][ref]
    for r in measured:
        mine = turns["samples_s"].get(r["impl"])
        if mine is None:
            continue
        entry = {"status": "ok", "rounds": len(mine), "inner": turns["inner"][r["impl"]],
                 "median_s": statistics.median(mine), "samples_s": mine}
        if r["impl"] != ref:
            ratio = median_interval([b / m for b, m in zip(base, mine)])
            verdict = "faster" if ratio["low"] > 1 else "slower" if ratio["high"] < 1 else "tie"
            entry.update(speedup=ratio["median"], low=ratio["low"], high=ratio["high"], level=ratio["level"],
                         verdict=verdict)
        r["turns"] = entry


def turns_text(r: dict) -> str:
    """A record's ratio in turns as printed: "1.23x [1.17, 1.29] faster"; "" where it has none."""
    t = r.get("turns") or {}
    if t.get("status") != "ok" or "speedup" not in t:
        return t.get("status", "") if t.get("status") not in (None, "ok") else ""
    return f"{_fmt_ratio(t['speedup'])} [{t['low']:.2f}, {t['high']:.2f}] {t['verdict']}"


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
        + "  "
    )
    lines.append(describe_rates(data.get("roofline")))
    lines.append("")
    repeats = cfg.get("repeats", 1)
    processes = (f"{repeats} fresh processes, in turns across the implementations (a cell's time is the median of the "
                 "processes' medians; " if repeats > 1 else "its own fresh process (")
    lines.append(
        f"Each (case, implementation) ran in {processes}device {cfg['device']}, "
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
    lines += _turns_section(data)
    lines += _roofline_section(data)
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


def _turns_section(data: dict) -> list:
    """With --turns: per impl how many cases it was faster, tied or slower in, then one row per case."""
    timed = [r for r in data["results"] if r.get("turns")]
    if not timed:
        return []
    lines = ["", "## In turns", ""]
    fewest, most = TURN_ROUNDS
    lines.append("After a case's processes, one more process timed its implementations against each other in turns "
                 f"(a round times each once, the order rotating; at least {fewest} rounds, up to {most} within "
                 f"{TURN_TARGET_PER_IMPL} sample targets per implementation). Cells: the median over the rounds of the "
                 "reference's time divided by this one's (> 1 is faster), a distribution-free interval for that median "
                 "(order statistics, at least 95%), and the verdict: faster or slower where the interval lies above or "
                 f"below 1, tie where it holds 1. Skipped: {fewest} rounds did not fit the case's budget.")
    lines.append("")
    cases = _group(timed)
    impls = _impl_order({r["impl"] for r in timed if "speedup" in r["turns"]})
    for impl in impls:
        verdicts = [r["turns"].get("verdict") for r in timed if r["impl"] == impl]
        counts = ", ".join(f"{v} in {verdicts.count(v)}" for v in ("faster", "tie", "slower") if v in verdicts)
        skipped = sum(v is None for v in verdicts)
        lines.append(f"- {impl}: {counts or 'no ratio'} of {len(verdicts) - skipped} cases"
                     + (f" ({skipped} skipped)" if skipped else ""))
    lines += ["", "| relation | shape | mode | " + " | ".join(impls) + " |", "|" + "---|" * (3 + len(impls))]
    order = {r: i for i, r in enumerate(RELATIONS)}
    rows = sorted(cases.values(), key=lambda g: (order[g[0]["case"]["relation"]], MODES.index(g[0]["case"]["mode"]),
                                                 g[0]["case"]["ds"], g[0]["case"]["dt"], g[0]["case"]["n"]))
    for recs in rows:
        c = Case.from_dict(recs[0]["case"])
        by_impl = {r["impl"]: r for r in recs}
        lines.append(f"| {c.relation} | {c.describe()} | {MODE_TITLES[c.mode]} | "
                     + " | ".join(turns_text(by_impl[i]) if i in by_impl else "" for i in impls) + " |")
    return lines


def _roofline_cell(r: dict) -> str:
    if r is None or r["status"] != "ok" or r.get("throughput") is None:
        return ""
    text = f"{_fmt_count(r['throughput'])}/s"
    if r.get("gemm_fraction") is not None:
        text = f"{100 * r['gemm_fraction']:.3g}% · {text} · {r['gemm_equivalent_gflop']:.3g}"
    return text


def _roofline_section(data: dict) -> list:
    """One row per case: the work model (unit, flops per unit) and per impl its fraction of the measured GEMM rate,
    its throughput and its time x GEMM GFLOP/s."""
    rates = data.get("roofline")
    measured = [r for r in data["results"] if r["status"] == "ok" and r.get("work")]
    if not measured:
        return []
    lines = ["", "## Roofline", ""]
    if rates and rates.get("gemm_gflops"):
        lines.append(f"Cells: fraction of the measured float32 GEMM rate ({rates['gemm_gflops']:.1f} GFLOP/s) under "
                     "the work model (qrkd/benchmark/roofline.py, README Performance) · throughput in the relation's "
                     "unit (unordered pairs or triplets, student and teacher together) · equivalent GEMM GFLOP "
                     "(time x GEMM GFLOP/s).")
    else:
        lines.append("Cells: throughput in the relation's unit (no GEMM rate was measured in this run).")
    lines.append("")
    cases = _group(measured)
    impls = _impl_order({r["impl"] for r in measured})
    lines.append("| relation | shape | mode | unit | flops/unit | " + " | ".join(impls) + " |")
    lines.append("|" + "---|" * (5 + len(impls)))
    order = {r: i for i, r in enumerate(RELATIONS)}
    rows = sorted(cases.values(), key=lambda g: (order[g[0]["case"]["relation"]], MODES.index(g[0]["case"]["mode"]),
                                                 g[0]["case"]["ds"], g[0]["case"]["dt"], g[0]["case"]["n"]))
    for recs in rows:
        c = Case.from_dict(recs[0]["case"])
        work = recs[0]["work"]
        by_impl = {r["impl"]: r for r in recs}
        per_unit = "-" if work["flops_per_unit"] is None else f"{work['flops_per_unit']:,.0f}"  # N=1: no pairs
        lines.append(f"| {c.relation} | {c.describe()} | {MODE_TITLES[c.mode]} | {work['unit']} | {per_unit} | "
                     + " | ".join(_roofline_cell(by_impl.get(i)) for i in impls) + " |")
    return lines


def _value_tolerance(r: dict) -> float:
    return 1e-6 if r["case"]["dtype"] == "float64" else 1e-2


def write_report(data: dict, stem: str, plots: bool = True) -> list:
    write_markdown(data, stem + ".md")
    return [stem + ".md"] + (write_plots(data, stem) if plots else [])


def _write_json(data: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
