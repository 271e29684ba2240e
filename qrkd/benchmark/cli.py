"""`qrkd bench`: its options, the sweep over the planned measurements, progress lines and the files it writes."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import sys
import time

from .cases import COMPILED, MODES, NAMED, REFERENCE_IMPLS, RELATIONS, Case, make_case, plan
from .formatting import _fmt_bytes, _fmt_time
from .implementations import implementations
from .machine import _mem_available, machine_info, machine_name, versions
from .measure import TURN_TARGET_PER_IMPL, combine_processes
from .prediction import _predict_failure, _record_history
from .report import SCHEMA, _write_json, annotate_case, annotate_turns, turns_text, write_report
from .roofline import annotate_roofline, describe_rates, measure_machine
from .runner import Runner

# per-profile measurement settings (seconds): see the package docstring (qrkd/benchmark/__init__.py)
PROFILES = {
    "quick": dict(case_timeout=30.0, named_timeout_factor=1.0, compile_allowance=40.0, target_s=0.25, min_reps=3, max_reps=15, slow_s=1.0,
                  slow_cap_s=4.0, min_sample_s=0.002, max_minutes=2.75, merlin_max_n=16),
    "full": dict(case_timeout=60.0, named_timeout_factor=4.0, compile_allowance=60.0, target_s=0.5, min_reps=5, max_reps=30, slow_s=2.0,
                 slow_cap_s=10.0, min_sample_s=0.005, max_minutes=20.0, merlin_max_n=128),
}


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
    p.add_argument("--tags", help="only the named shapes with one of these tags (comma-separated, e.g. seed,issue4), "
                   "no grid unless --grid")
    p.add_argument("--shapes", help="only these exact shapes (and the named ones unless --no-named or --tags), no "
                   "grid unless --grid: comma-separated RELATION:N[:DS[:DT]][@IMPL+IMPL...], e.g. "
                   "angle:2048:4:31@cpp,photonic:4096")
    p.add_argument("--grid", action="store_true", help="with --tags or --shapes: the grid as well, so that one run "
                   "holds both")
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
    p.add_argument("--repeats", type=_positive(int), default=1, help="fresh processes per (case, implementation), "
                   "run in turns across the implementations; a cell is the median of their medians (default 1)")
    p.add_argument("--turns", action="store_true", help="after a case's processes, one more times its "
                   "implementations against each other in turns: paired ratios to the reference, each with a 95%% "
                   "interval and a verdict (faster, tie, slower)")
    p.add_argument("--no-roofline", action="store_true", help="skip measuring the GEMM rate and memory bandwidth")
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

    mode_list = tuple(m for m in MODES if m in modes)
    try:
        shapes = parse_shapes(args.shapes, relations)
        tags = set(_csv(args.tags))
        known = {tag for entries in NAMED.values() for *_, tag in entries}
        if tags - known:
            raise ValueError(f"--tags: unknown tag(s) {sorted(tags - known)}; the named shapes have {sorted(known)}")
    except ValueError as exc:
        return _fail(str(exc))
    cases = plan(device, args.quick, relations, mode_list, tuple(dtypes), ns or None, ds or None,
                 named=not args.no_named)
    include = set(_csv(args.impls)) or None
    impls_for = {}
    if shapes is not None or tags:
        grid = plan(device, args.quick, relations, mode_list, tuple(dtypes), ns or None, ds or None,
                    named=False) if args.grid else []
        cases = [c for c in cases if set(c.tags) & tags] if tags else \
            ([] if args.no_named else [c for c in cases if c.tags])
        cases += [c for c in grid if c not in cases]
        for relation, n, d_s, d_t, only in shapes or []:
            for dtype in dtypes:
                for mode in mode_list:
                    case = make_case(relation, mode, n, d_s, d_t, dtype, device, ("selected",))
                    if only:
                        impls_for[case] = set(only) | impls_for.get(case, set())
                    if case in cases:  # a named shape or a grid case: measured once, tagged "selected" as well
                        i = cases.index(case)
                        cases[i] = dataclasses.replace(cases[i], tags=tuple(sorted({*cases[i].tags, "selected"})))
                    else:
                        cases.append(case)
        for case in grid:  # a grid case keeps the grid's impls; a shape's @IMPL adds to them
            if case in impls_for:
                impls_for[case] = None if include is None else impls_for[case] | include
        order = {r: i for i, r in enumerate(RELATIONS)}
        cases.sort(key=lambda c: (c.n, order[c.relation], c.ds, c.dt, c.dtype, MODES.index(c.mode)))
    exclude = set(_csv(args.exclude_impls))
    work = [(c, implementations(c, compiled=args.compiled, quick=args.quick, merlin_max_n=merlin_max_n,
                                include=impls_for.get(c, include), exclude=exclude)) for c in cases]
    work = [(c, impls) for c, impls in work if impls]
    total = sum(len(impls) for _, impls in work) * args.repeats
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
            "repeats": args.repeats, "turns": args.turns,
        },
        "command": "qrkd bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "started": started.isoformat(timespec="seconds"),
        "results": [],
    }
    if not args.no_roofline:
        print("qrkd bench: measuring the machine's GEMM rate and memory bandwidth ...", flush=True)
        data["roofline"] = measure_machine(device)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(describe_rates(data["roofline"]), flush=True)
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
            runs: dict = {impl: [] for impl in impls}
            # the named shapes are the ones quoted: they get a longer budget (the angle loss at N=4096)
            case_timeout = timeout * (profile["named_timeout_factor"] if case.tags else 1.0)
            # --repeats: one fresh process per (impl, round), the impls in turns so that a slow spell of the machine
            # falls on all of them
            for round_ in range(args.repeats):
                turn = (shift + round_) % len(impls)
                for impl in impls[turn:] + impls[:turn]:
                    if runs[impl] and runs[impl][-1]["status"] != "ok":
                        continue  # failed, or predicted to: not run again
                    done += 1
                    base = {"case": case.to_dict(), "case_id": case.id, "impl": impl,
                            "kind": "reference" if impl in REFERENCE_IMPLS else "backend", "predicted": False}
                    predicted = _predict_failure(case, impl, history, case_timeout, mem_limit)
                    if deadline is not None and time.perf_counter() > deadline and not case.tags:
                        # past the deadline only the named shapes (the ones quoted) still run
                        spent = f"not run: the sweep's {max_minutes:g} min were spent"
                        rec = dict(base, status="skipped", detail=spent)
                    elif predicted:
                        rec = dict(base, status=predicted[0], detail=predicted[1], predicted=True)
                    else:
                        extra = profile["compile_allowance"] if impl == COMPILED else 0.0  # compiling is in the child
                        run_settings = dict(settings, budget_s=0.75 * case_timeout + extra)
                        rec = dict(base, **runner.run(case, impl, run_settings, case_timeout + extra))
                    runs[impl].append(rec)
                    if rec["status"] != "ok":
                        total -= args.repeats - 1 - round_  # the rounds it will not run are no longer counted
                    _progress(done, total, t_start, case, rec)
            records = []
            for impl in impls:
                rec = combine_processes(runs[impl])
                if not rec.get("predicted") and rec["status"] != "skipped":
                    _record_history(history, case, impl, rec)
                records.append(rec)
            records.sort(key=lambda r: impls.index(r["impl"]))
            annotate_case(records)
            measured = [r["impl"] for r in records if r["status"] == "ok"]
            if args.turns and records[0]["reference_impl"] in measured and len(measured) > 1:
                extra = profile["compile_allowance"] if COMPILED in measured else 0.0
                turn_settings = dict(settings, budget_s=0.75 * case_timeout + extra,
                                     turns_target_s=TURN_TARGET_PER_IMPL * settings["target_s"] * len(measured))
                annotate_turns(records, runner.run(case, measured, turn_settings, case_timeout + extra))
                _progress_turns(t_start, case, records)
            annotate_roofline(records, data.get("roofline"))
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


def parse_shapes(text, relations=RELATIONS):
    """--shapes: [(relation, n, ds, dt, impls or None)], or None when not given. DS defaults to the seed's student
    width (4), DT to DS; the photonic relation always runs the seed's circuit (d = 4)."""
    if text is None:
        return None
    shapes = []
    for item in _csv(text):
        spec, _, impls = item.strip().partition("@")
        parts = spec.split(":")
        relation = parts[0]
        if relation not in RELATIONS:
            raise ValueError(f"--shapes {item!r}: the relation must be one of {RELATIONS}")
        if relation not in relations:
            raise ValueError(f"--shapes {item!r}: {relation} is not in --relations")
        try:
            sizes = [int(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"--shapes {item!r}: N, DS and DT must be integers") from None
        if not 1 <= len(sizes) <= 3 or any(v < 1 for v in sizes):
            raise ValueError(f"--shapes {item!r}: expected RELATION:N[:DS[:DT]] with sizes >= 1")
        n, d_s = sizes[0], sizes[1] if len(sizes) > 1 else 4
        d_t = sizes[2] if len(sizes) > 2 else d_s
        only = [x for x in impls.split("+") if x] if impls else None
        shapes.append((relation, n, d_s, d_t, only))
    return shapes


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _progress_turns(t_start: float, case: Case, records: list) -> None:
    elapsed = time.perf_counter() - t_start
    parts = [f"{r['impl']} {turns_text(r)}" for r in records if turns_text(r)]
    print(f"[turns {int(elapsed) // 60:>3}:{int(elapsed) % 60:02d}] {case.relation:<9}{case.mode:<7}"
          f"{case.describe():<26}" + " · ".join(parts), flush=True)


def _progress(done: int, total: int, t_start: float, case: Case, rec: dict) -> None:
    elapsed = time.perf_counter() - t_start
    head = f"[{done:>4}/{total} {int(elapsed) // 60:>3}:{int(elapsed) % 60:02d}] {case.relation:<9}{case.mode:<7}" \
           f"{case.describe():<26}{rec['impl']:<19}"
    if rec["status"] == "ok":
        faults = rec.get("faults_per_call")
        tail = (f"{_fmt_time(rec['median_s']):>10} IQR {_fmt_time(rec['iqr_s']):>9}  "
                f"peak {_fmt_bytes(rec['peak_mem_bytes']):>9}")
        if faults is not None:
            tail += f"  {faults:>7.0f} faults"
    else:
        tail = f"{rec['status'].upper():>10}  {rec['detail'][:110]}"
    print(head + tail, flush=True)
