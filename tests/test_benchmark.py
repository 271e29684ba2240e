"""The benchmark harness (qrkd.benchmark, `qrkd bench`): a tiny sweep end to end, and its bookkeeping.

No timing is asserted: only that measurements, failures and the report are recorded as the harness promises.
"""

import copy
import json
import os

import pytest

from qrkd import benchmark as qb
from qrkd import cli


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """distance at N=2048 runs (reference and torch); the angle loss at N=2048 cannot: the reference needs
    N^3 floats (32 GiB) against a 1 GiB address-space limit (OOM), the torch backend's O(N^3) scalar work takes far
    longer than the 4 s budget (timeout; about 40 s on 2 cores)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["--relations", "angle,distance", "--modes", "fwd", "--n", "2048", "--d", "4", "--no-named",
            "--impls", "reference,torch", "--case-timeout", "4", "--mem-limit-gb", "1", "--max-minutes", "0",
            "--out", str(out), "--machine", "testbox"]
    rc = qb.main(argv)
    files = sorted(os.listdir(out))
    stem = [f for f in files if f.endswith(".json")]
    assert len(stem) == 1, files
    with open(out / stem[0]) as f:
        data = json.load(f)
    return rc, out, stem[0][:-5], data


def _result(data, relation, impl):
    (rec,) = [r for r in data["results"] if r["case"]["relation"] == relation and r["impl"] == impl]
    return rec


def test_sweep_writes_schema(tiny_sweep):
    rc, _, stem, data = tiny_sweep
    assert rc == 0
    assert stem.startswith("testbox-")
    assert data["schema"] == qb.SCHEMA
    assert data["machine"]["name"] == "testbox" and data["machine"]["cpu_count"] >= 1
    assert data["versions"]["torch"] and data["versions"]["qrkd"]
    assert data["backends"]["reference"]["available"] is True
    assert data["config"]["mem_limit_bytes"] == 1 << 30 and data["config"]["case_timeout_s"] == 4
    assert data["command"].startswith("qrkd bench ")
    assert data["finished"] and data["wall_s"] > 0
    assert len(data["results"]) == 4
    for rec in data["results"]:
        assert rec["case"]["n"] == 2048 and rec["case"]["mode"] == "fwd" and rec["case"]["dtype"] == "float32"
        assert rec["case_id"] == qb.Case.from_dict(rec["case"]).id
        assert rec["kind"] == ("reference" if rec["impl"] == "reference" else "backend")
        assert rec["reference_impl"] == "reference"


def test_sweep_measures_what_runs(tiny_sweep):
    _, _, _, data = tiny_sweep
    ref, fast = _result(data, "distance", "reference"), _result(data, "distance", "torch")
    for rec in (ref, fast):
        assert rec["status"] == "ok", rec
        assert rec["predicted"] is False
        assert rec["reps"] == len(rec["samples_s"]) >= 1
        assert rec["median_s"] > 0 and rec["iqr_s"] >= 0 and rec["min_s"] <= rec["median_s"]
        assert rec["mem_method"].startswith("VmHWM")
        assert rec["peak_mem_bytes"] >= 0 and rec["peak_rss_bytes"] >= rec["baseline_mem_bytes"] > 0
        assert rec["child_maxrss_bytes"] > 0
    # the reference materialises several N x N float32 matrices (16 MiB each): its peak must show them
    assert ref["peak_mem_bytes"] >= 16 << 20
    assert fast["ratio_to_reference"] == pytest.approx(ref["median_s"] / fast["median_s"])
    assert fast["speedup"] == {"reference": fast["ratio_to_reference"]}
    assert ref["ratio_to_reference"] == pytest.approx(1.0)
    # same inputs, same loss: the harness compares the values it measured
    assert fast["value"] == pytest.approx(ref["value"], rel=1e-3)
    assert fast["value_rel_diff"] < 1e-3


def test_sweep_records_oom_and_timeout(tiny_sweep):
    _, _, _, data = tiny_sweep
    oom, slow = _result(data, "angle", "reference"), _result(data, "angle", "torch")
    assert oom["status"] == "oom" and oom["predicted"] is False, oom
    assert "allocate" in oom["detail"].lower() or "memory" in oom["detail"].lower()
    assert slow["status"] == "timeout" and slow["predicted"] is False, slow
    assert slow["wall_s"] >= 4
    for rec in (oom, slow):
        assert rec["ratio_to_reference"] is None and rec.get("median_s") is None


def test_sweep_writes_markdown_and_plots(tiny_sweep):
    _, out, stem, _ = tiny_sweep
    with open(out / f"{stem}.md") as f:
        md = f.read()
    assert "## Headline" in md and "## distance, forward (float32)" in md and "## angle, forward (float32)" in md
    assert "| N | Ds | Dt | reference | torch |" in md
    assert "OOM" in md and "timeout" in md
    assert _png(out / f"{stem}-distance.png")
    assert not os.path.exists(out / f"{stem}-angle.png")  # nothing ran there: no empty plot


def test_report_rewrites_from_json(tiny_sweep, tmp_path):
    _, out, stem, data = tiny_sweep
    path = tmp_path / "again.json"
    path.write_text(json.dumps(data))
    assert qb.main(["--report", str(path)]) == 0
    assert (tmp_path / "again.md").read_text() == (out / f"{stem}.md").read_text()
    assert _png(tmp_path / "again-distance.png")


def _history(*events):
    history = {}
    for relation, impl, mode, n, status, median, peak in events:
        case = qb.make_case(relation, mode, n, 128, 128)
        rec = {"status": status, "median_s": median, "peak_mem_bytes": peak}
        qb._record_history(history, case, impl, rec)
    return history


def test_failures_predict_larger_sizes():
    history = _history(("angle", "reference", "fwd", 512, "oom", None, None))
    at = lambda n, mode="fwd", d=128: qb._predict_failure(qb.make_case("angle", mode, n, d, d), "reference",
                                                           history, 60.0, 8 << 30)
    assert at(1024)[0] == "oom" and "N=512" in at(1024)[1]
    assert at(512, "fwdbwd")[0] == "oom"  # forward+backward costs at least the forward
    assert at(256) is None
    assert at(1024, d=4) is None  # another series
    # forward+backward failing does not say the forward fails
    history = _history(("angle", "torch", "fwdbwd", 512, "timeout", None, None))
    assert qb._predict_failure(qb.make_case("angle", "fwd", 512, 128, 128), "torch", history, 60.0, None) is None


def test_growth_predicts_timeouts():
    # 1 s at N=256 and 8 s at N=512: N^3, so ~64 s at N=1024 exceeds a 60 s budget
    history = _history(("angle", "torch", "fwd", 256, "ok", 1.0, 1 << 20),
                       ("angle", "torch", "fwd", 512, "ok", 8.0, 4 << 20))
    status, detail = qb._predict_failure(qb.make_case("angle", "fwd", 1024, 128, 128), "torch", history, 60.0, 8 << 30)
    assert status == "timeout" and "N=512" in detail
    # fixed costs: barely growing times give a small exponent (capped below by 1), so N=1024 still runs
    history = _history(("angle", "torch", "fwd", 256, "ok", 10.0, 1 << 20),
                       ("angle", "torch", "fwd", 512, "ok", 11.0, 1 << 20))
    assert qb._predict_failure(qb.make_case("angle", "fwd", 1024, 128, 128), "torch", history, 60.0, 8 << 30) is None
    # one point: the theoretical exponent must overshoot threefold
    history = _history(("distance", "torch", "fwd", 1024, "ok", 10.0, 1 << 20))
    assert qb._predict_failure(qb.make_case("distance", "fwd", 2048, 128, 128), "torch", history, 60.0, 1 << 40) is None
    status, _ = qb._predict_failure(qb.make_case("distance", "fwd", 8192, 128, 128), "torch", history, 60.0, 1 << 40)
    assert status == "timeout"
    # memory: the materialising angle reference grows as N^3
    history = _history(("angle", "reference", "fwd", 512, "ok", 1.0, 3 << 30))
    status, _ = qb._predict_failure(qb.make_case("angle", "fwd", 2048, 128, 128), "reference", history, 1e9, 20 << 30)
    assert status == "oom"


def test_plans_contain_the_quoted_shapes():
    full = {(c.relation, c.n, c.ds, c.dt): c.tags for c in qb.plan("cpu", quick=False)}
    assert "seed" in full[("angle", 128, 4, 31)] and "seed" in full[("photonic", 128, 4, 4)]
    for shape in [("angle", 512, 128, 512), ("angle", 4096, 512, 512), ("distance", 2048, 512, 512),
                  ("fidelity", 2048, 512, 512), ("photonic", 4096, 4, 4)]:
        assert shape in full and full[shape], shape
    assert {n for (r, n, _, _) in full if r == "distance"} == {64, 128, 256, 512, 1024, 2048, 4096}
    assert {d for (r, _, d, dt) in full if r == "fidelity" and d == dt} == {4, 128, 512}
    quick = {(c.relation, c.mode, c.n, c.ds, c.dt) for c in qb.plan("cpu", quick=True)}
    assert ("angle", "fwdbwd", 128, 4, 31) in quick and ("photonic", "fwd", 128, 4, 4) in quick
    gpu = {(c.relation, c.n, c.ds) for c in qb.plan("cuda", quick=True)}
    assert ("angle", 1024, 512) in gpu and ("angle", 8192, 512) in gpu and ("photonic", 8192, 4) in gpu
    cases = qb.plan("cpu", quick=False)
    assert [c.n for c in cases] == sorted(c.n for c in cases)  # failures at one size can predict the next
    assert len({c for c in cases}) == len(cases)


def test_implementations_come_from_the_registry():
    import qrkd

    case = qb.make_case("distance", "fwdbwd", 64, 8, 8)
    impls = qb.implementations(case, compiled="all")
    assert impls[:3] == ["reference", "reference-compiled", "reference-zd"]
    expected = [b for b in qrkd.available_backends() if b not in ("reference", "triton")]
    assert impls[3:] == expected  # every available CPU backend, Triton's interpreter excluded
    assert "reference-compiled" not in qb.implementations(case, compiled="none")
    assert qb.implementations(case, include={"torch"}) == ["torch"]


def test_annotate_case_ratios():
    case = qb.make_case("photonic", "fwd", 16, 4, 4).to_dict()
    recs = [
        {"case": case, "impl": "merlin", "status": "ok", "median_s": 2.0, "value": 0.5},
        {"case": case, "impl": "reference", "status": "ok", "median_s": 0.5, "value": 0.25},
        {"case": case, "impl": "cpp", "status": "ok", "median_s": 0.01, "value": 0.25},
        {"case": case, "impl": "torch", "status": "timeout", "detail": ""},
    ]
    qb.annotate_case(recs)
    merlin, ref, cpp, torch_rec = recs
    assert cpp["reference_impl"] == "merlin"  # the photonic kernel is compared with the MerLin code it replaces
    assert cpp["ratio_to_reference"] == pytest.approx(200.0)
    assert cpp["speedup"] == pytest.approx({"merlin": 200.0, "reference": 50.0})
    assert cpp["value_rel_diff"] == 0.0 and merlin["value_rel_diff"] is None  # MerLin draws its own circuit
    assert torch_rec["ratio_to_reference"] is None and torch_rec["speedup"] == {}


def test_cli_forwards_options(capsys):
    assert cli.main(["bench", "--quick", "--list", "--relations", "fidelity"]) == 0
    out = capsys.readouterr().out
    assert "fidelity-fwdbwd-float32-cpu-N128-Ds4-Dt31" in out and "measurements" in out


@pytest.mark.parametrize("argv", [["--relations", "nope"], ["--modes", "back"], ["--n", "0"], ["--n", "x"]])
def test_bad_arguments(argv, capsys):
    assert qb.main(argv + ["--list"]) == 2
    assert "qrkd bench:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- the roofline

from qrkd.benchmark import roofline  # noqa: E402


def test_sweep_records_the_roofline(tiny_sweep):
    _, out, stem, data = tiny_sweep
    rates = data["roofline"]
    assert rates["gemm_gflops"] > 0 and rates["gemm_n"] >= 256 and rates["gemm_dtype"] == "float32"
    assert rates["bandwidth_gbs"] > 0 and len(rates["gemm_samples_s"]) == 5
    ok = _result(data, "distance", "torch")
    assert ok["work"]["unit"] == "pairs" and ok["work"]["units"] == 2048 * 2047 / 2
    assert ok["throughput"] == pytest.approx(ok["work"]["units"] / ok["median_s"])
    assert ok["gemm_fraction"] == pytest.approx(ok["work"]["flops"] / ok["median_s"] / 1e9 / rates["gemm_gflops"])
    assert ok["gemm_equivalent_gflop"] == pytest.approx(ok["median_s"] * rates["gemm_gflops"])
    failed = _result(data, "angle", "reference")
    assert failed["work"]["unit"] == "triplets" and failed["throughput"] is None and failed["gemm_fraction"] is None
    md = (out / f"{stem}.md").read_text()
    assert f"float32 GEMM {rates['gemm_gflops']:.1f} GFLOP/s" in md and "## Roofline" in md


def test_report_of_a_single_sample_case_has_no_flops_per_unit(tiny_sweep, tmp_path):
    # N=1 has no pairs: its work model has no flops per unit, and the report says so instead of failing
    _, _, _, data = tiny_sweep
    data = copy.deepcopy(data)
    single = copy.deepcopy(_result(data, "distance", "torch"))
    single["case"]["n"] = 1
    single["case_id"] = qb.Case.from_dict(single["case"]).id
    single.update(roofline.roofline_fields(single["case"], single["median_s"], data["roofline"]["gemm_gflops"]))
    assert single["work"]["flops_per_unit"] is None and single["throughput"] == 0
    data["results"].append(single)
    path = tmp_path / "single.json"
    path.write_text(json.dumps(data))
    assert qb.main(["--report", str(path)]) == 0
    (row,) = [line for line in (tmp_path / "single.md").read_text().splitlines() if "| N=1 Ds=4 Dt=4 |" in line]
    assert "| pairs | - |" in row


def _gray_code_ryser(a):
    """Ryser's permanent in Gray-code order, counting its real flops the way the work model does."""
    n = len(a)
    rows, total, flops = [0j] * n, 0j, 0
    for step in range(1, 1 << n):
        col = (step & -step).bit_length() - 1
        gray = step ^ (step >> 1)
        sign_col = 1 if (gray >> col) & 1 else -1
        rows = [r + sign_col * a[i][col] for i, r in enumerate(rows)]
        flops += 2 * n
        prod = rows[0]
        for r in rows[1:]:
            prod *= r
        flops += 6 * (n - 1)
        total += prod if bin(gray).count("1") % 2 == n % 2 else -prod
        flops += 2
    return total, flops


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_ryser_count_is_a_working_permanent(n):
    import torch

    from qrkd.backends import reference

    g = torch.Generator().manual_seed(n)
    a = torch.complex(torch.randn(n, n, generator=g, dtype=torch.float64),
                      torch.randn(n, n, generator=g, dtype=torch.float64))
    value, flops = _gray_code_ryser(a.tolist())
    assert value == pytest.approx(complex(reference.permanent(a)), rel=1e-12, abs=1e-12)
    assert flops == roofline.ryser_flops(n) == ((1 << n) - 1) * (8 * n - 4)


def test_work_model_counts():
    assert set(roofline.UNITS) == set(qb.RELATIONS)  # every benchmarked relation has a work model
    assert roofline.case_work(dict(qb.make_case("angle", "fwd", 8, 4, 4).to_dict(), relation="new")) is None
    assert roofline.units("distance", 5) == 10 and roofline.units("photonic", 128) == 128 * 127 / 2
    assert roofline.units("angle", 4) == 4 * 6  # anchor a, unordered {b, c}
    # distance: 2 D per side for the dot product, 14 for the rest of both sides, the tail 6; backward 4 Ds + 10
    assert roofline.flops_per_unit("distance", "fwd", 4, 31) == 2 * 35 + 20
    assert roofline.flops_per_unit("distance", "fwdbwd", 4, 31) == 2 * 35 + 20 + 4 * 4 + 10
    # fidelity: both sides cut to min(Ds, Dt) = 4
    assert roofline.flops_per_unit("fidelity", "fwd", 4, 31) == 4 * 4 + 8
    assert roofline.flops_per_unit("fidelity", "fwdbwd", 4, 31) == 4 * 4 + 8 + 4 * 4 + 4
    assert roofline.flops_per_unit("angle", "fwd", 4, 31) == 14
    assert roofline.flops_per_unit("angle", "fwdbwd", 4, 31) == 25
    # photonic at the seed's circuit: per side the product over the d = 4 varying columns 8 n^2 d = 800, the shared
    # block of the other 6 added 2 n^2 = 50, Ryser 31 x 36 = 1116, |perm|^2 3
    assert roofline.photonic_side_flops(5, 10, 4) == 1969
    assert roofline.photonic_side_flops(5, 10, 10) == 2000 + 1116 + 3  # no shared column: no block to add
    assert roofline.flops_per_unit("photonic", "fwd", 4, 4, modes=10, photons=5) == 2 * 1969 + 6
    back = 24 * 25 * 4 + 50 + 31 * (25 + 100 - 6) + 6 * 25 + 2
    assert back == 6291
    assert roofline.flops_per_unit("photonic", "fwdbwd", 4, 4, modes=10, photons=5) == 2 * 1969 + 6 + back
    # the angle loss adds its pairwise part: squared distances of both sides (and dx = 2 H x in backward)
    assert roofline.work_flops("angle", "fwd", 3, 4, 31) == 9 * 14 + 3 * (2 * 35 + 2)
    assert roofline.work_flops("angle", "fwdbwd", 3, 4, 31) == 9 * 25 + 3 * (2 * 35 + 2 + 4 * 4 + 1)
    work = roofline.case_work(qb.make_case("photonic", "fwd", 4096, 4, 4).to_dict())
    assert work["unit"] == "pairs" and work["flops_per_unit"] == 3944 and work["flops"] == 3944 * 4096 * 4095 / 2
    with pytest.raises(ValueError, match="relation"):
        roofline.units("nope", 3)
    with pytest.raises(ValueError, match="mode"):
        roofline.flops_per_unit("angle", "back", 4, 4)


def test_roofline_fields_from_given_times():
    case = qb.make_case("angle", "fwdbwd", 2048, 4, 31).to_dict()
    flops = roofline.work_flops("angle", "fwdbwd", 2048, 4, 31)
    got = roofline.roofline_fields(case, 2.0, 200.0)
    assert got["throughput"] == pytest.approx(2048 * 2048 * 2047 / 2 / 2.0)
    assert got["gflops"] == pytest.approx(flops / 2.0 / 1e9)
    assert got["gemm_fraction"] == pytest.approx(flops / 2.0 / 200e9)
    assert got["gemm_equivalent_gflop"] == pytest.approx(400.0)  # the "time x GEMM GFLOP/s"
    assert roofline.roofline_fields(case, 2.0, None)["gemm_fraction"] is None
    recs = [{"case": case, "status": "ok", "median_s": 1.0}, {"case": case, "status": "timeout"}]
    roofline.annotate_roofline(recs, {"gemm_gflops": 100.0})
    assert recs[0]["gemm_fraction"] == pytest.approx(flops / 100e9)
    assert recs[1]["throughput"] is None and recs[1]["work"]["flops"] == flops


def test_roofline_in_the_markdown(tmp_path):
    case = qb.make_case("photonic", "fwd", 4096, 4, 4).to_dict()
    rec = {"case": case, "case_id": qb.Case.from_dict(case).id, "impl": "cpp", "kind": "backend", "status": "ok",
           "predicted": False, "median_s": 0.5, "peak_mem_bytes": 1 << 20, "value": 0.1}
    qb.annotate_case([rec])
    rates = {"gemm_gflops": 200.0, "gemm_n": 2048, "gemm_samples_s": [0.1] * 5, "gemm_threads": 2,
             "bandwidth_gbs": 10.0, "bandwidth_bytes_per_call": 3 << 27, "bandwidth_method": "triad"}
    roofline.annotate_roofline([rec], rates)
    data = {"machine": {"name": "box", "cpu": "cpu", "cpu_count": 2, "mem_total_bytes": 1 << 30}, "versions": {},
            "backends": {}, "config": {"device": "cpu", "mem_limit_bytes": 1 << 30, "case_timeout_s": 60},
            "command": "qrkd bench", "started": "2026-12-02T00:00:00", "results": [rec], "roofline": rates}
    qb.write_markdown(data, str(tmp_path / "r.md"))
    md = (tmp_path / "r.md").read_text()
    assert "float32 GEMM 200.0 GFLOP/s (torch.matmul, 2048^3" in md and "memory bandwidth 10.0 GB/s" in md
    fraction = 3944 * 4096 * 4095 / 2 / 0.5 / 200e9
    row = f"| photonic | N=4096 d=4 m=10 n=5 | forward | pairs | 3,944 | {100 * fraction:.3g}% · 16.8 M/s · 100 |"
    assert row in md
    del data["roofline"]
    qb.write_markdown(data, str(tmp_path / "old.md"))  # a results file from before the roofline
    assert "Roofline: not measured in this run." in (tmp_path / "old.md").read_text()


def test_machine_rates_are_measured():
    gemm = roofline.measure_gemm("cpu", reps=2, max_n=256)
    assert gemm["gemm_n"] == 256 and gemm["gemm_gflops"] > 0 and len(gemm["gemm_samples_s"]) == 2
    bw = roofline.measure_bandwidth("cpu", reps=2, megabytes=4)
    assert bw["bandwidth_gbs"] > 0 and bw["bandwidth_bytes_per_call"] == 3 * 4 << 20


def test_selected_shapes(capsys):
    assert qb.main(["--shapes", "angle:2048:4:31@cpp,photonic:4096@cpp+torch,distance:96", "--tags", "seed",
                    "--modes", "fwdbwd", "--list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if "-float32-" in line}
    assert lines["angle-fwdbwd-float32-cpu-N2048-Ds4-Dt31"].split()[1:] == ["selected", "cpp"]
    assert lines["photonic-fwdbwd-float32-cpu-N4096-d4-m10-n5"].split()[2:] == ["torch,", "cpp"]
    assert "selected" in lines["distance-fwdbwd-float32-cpu-N96-Ds4-Dt4"] and "reference" in lines[
        "distance-fwdbwd-float32-cpu-N96-Ds4-Dt4"]
    assert {name.split("-")[0] for name, line in lines.items() if " seed " in line} == set(qb.RELATIONS)
    assert len(lines) == 3 + 4  # the three shapes and the four seed shapes, no grid
    assert qb.main(["--tags", "issue4", "--list"]) == 0
    out = capsys.readouterr().out
    assert "photonic-fwd-float32-cpu-N4096-d4-m10-n5" in out and "N128" not in out
    # --grid: the same selection and the grid in one run; a grid case that is a named shape is listed once, tagged
    assert qb.main(["--shapes", "angle:2048:4:31@cpp", "--tags", "seed,issue3", "--grid", "--relations",
                    "fidelity,angle", "--modes", "fwd", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "-float32-" in line]
    grid = qb.plan(relations=("fidelity", "angle"), modes=("fwd",), named=False)
    assert set(c.id for c in grid) < set(names) and len(names) == len(set(names))
    assert "angle-fwd-float32-cpu-N2048-Ds4-Dt31" in names and "fidelity-fwd-float32-cpu-N128-Ds4-Dt31" in names
    assert len(names) == len(grid) + 1 + 2 + 2  # the shape, the seed's two and issue3's angle shapes off the grid
    # a shape on the grid keeps the grid's impls and adds its own (a sweep that lost them did not compare the rest)
    assert qb.main(["--shapes", "angle:64:4@cpp", "--grid", "--relations", "angle", "--modes", "fwd", "--n", "64",
                    "--d", "4", "--impls", "reference,torch", "--no-named", "--list"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "-float32-" in line]
    assert line.split() == ["angle-fwd-float32-cpu-N64-Ds4-Dt4", "selected", "reference,", "torch,", "cpp"]


@pytest.mark.parametrize("argv", [["--shapes", "angle"], ["--shapes", "cube:12"], ["--shapes", "angle:x"],
                                  ["--shapes", "angle:0"], ["--tags", "nope"],
                                  ["--shapes", "angle:64", "--relations", "distance"]])
def test_bad_selections(argv, capsys):
    assert qb.main(argv + ["--list"]) == 2
    assert "qrkd bench:" in capsys.readouterr().err


@pytest.mark.parametrize("relation", ["angle", "distance", "fidelity"])
def test_the_compiled_reference_computes_the_same_loss_as_the_reference(relation):
    # the seed's shape has Ds != Dt: the fidelity loss cuts both sides to min(Ds, Dt) columns, which the compiled
    # baseline must do too (it once compiled the bare backend function and measured a 31-wide teacher kernel)
    case = qb.make_case(relation, "fwd", 24, 4, 7)
    reference, _ = qb.build_call(case, "reference")
    compiled, _ = qb.build_call(case, "reference-compiled")
    assert abs(float(compiled()) - float(reference())) <= 1e-5 * abs(float(reference()))


def test_repeated_processes_give_the_median_of_their_medians():
    from qrkd.benchmark.measure import combine_processes

    def rec(median, samples, peak, faults=0.0):
        return {"status": "ok", "median_s": median, "samples_s": samples, "peak_mem_bytes": peak,
                "peak_rss_bytes": peak + 10, "value": 1.0, "faults_per_call": faults}

    cell = combine_processes([rec(2.0, [2.0, 2.1], 5, 900.0), rec(1.0, [1.0, 0.9], 7, 3.0), rec(1.5, [1.5, 1.6], 6)])
    assert cell["median_s"] == 1.5 and cell["process_medians_s"] == [2.0, 1.0, 1.5]
    assert cell["faults_per_call"] == 3.0 and cell["process_faults_per_call"] == [900.0, 3.0, 0.0]
    assert cell["reps"] == 6 and cell["min_s"] == 0.9 and cell["peak_mem_bytes"] == 7 and cell["peak_rss_bytes"] == 17
    failed = {"status": "timeout", "detail": "over budget"}
    assert combine_processes([rec(1.0, [1.0], 5), failed])["status"] == "timeout"
    skipped = {"status": "skipped", "detail": "not run: the sweep's 20 min were spent"}
    assert combine_processes([rec(1.0, [1.0], 5), skipped])["median_s"] == 1.0
    assert combine_processes([skipped])["status"] == "skipped"


def test_repeats_counter_ends_at_its_total_when_an_impl_fails(tmp_path, capsys):
    # the reference angle loss at N=512 needs N^3 floats (512 MiB) against a 256 MiB limit: it fails in the first
    # round and is not run again, so the progress counter's total drops by the rounds it skips
    argv = ["--relations", "angle", "--modes", "fwd", "--n", "512", "--d", "4", "--no-named", "--impls",
            "reference,torch", "--repeats", "2", "--mem-limit-gb", "0.25", "--no-roofline", "--no-plots", "--out",
            str(tmp_path), "--machine", "testbox"]
    assert qb.main(argv) == 0
    counters = [line[1:].split()[0] for line in capsys.readouterr().out.splitlines()
                if line.startswith("[")]
    assert counters[-1] == "3/3", counters
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / name) as f:
        assert _result(json.load(f), "angle", "reference")["status"] == "oom"


def test_repeats_run_each_impl_in_several_processes_in_turns(tmp_path, capsys):
    argv = ["--relations", "distance", "--modes", "fwd", "--n", "32", "--d", "4", "--no-named", "--impls",
            "reference,torch", "--repeats", "3", "--no-roofline", "--no-plots", "--out", str(tmp_path),
            "--machine", "testbox"]
    assert qb.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "distance" in line and "N=32" in line]
    order = [next(w for w in line.split() if w in ("reference", "torch")) for line in lines]
    assert order == ["reference", "torch", "torch", "reference", "reference", "torch"]
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / name) as f:
        data = json.load(f)
    assert data["config"]["repeats"] == 3
    for impl in ("reference", "torch"):
        rec = _result(data, "distance", impl)
        assert len(rec["process_medians_s"]) == 3 and rec["median_s"] == sorted(rec["process_medians_s"])[1]
    with open(tmp_path / (name[:-5] + ".md")) as f:
        assert "ran in 3 fresh processes, in turns" in f.read()


def test_measure_counts_page_faults_a_call(monkeypatch):
    # a call that maps and touches 1 MiB of fresh pages faults about 256 times; one that reuses its memory hardly at
    # all: the difference the reference's N x N temporaries make between processes (glibc mapping them afresh or not)
    import importlib
    import mmap

    from qrkd.benchmark.cases import make_case

    qm = importlib.import_module("qrkd.benchmark.measure")  # the module (the package exports its function measure)

    def fresh_pages():
        with mmap.mmap(-1, 1 << 20) as m:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                m.madvise(mmap.MADV_NOHUGEPAGE)
            for offset in range(0, 1 << 20, 4096):
                m[offset] = 1
        return 0.0

    kept = bytearray(1 << 20)

    def same_pages():
        for offset in range(0, 1 << 20, 4096):
            kept[offset] = 1
        return 0.0

    settings = dict(budget_s=5.0, slow_s=1.0, slow_cap_s=2.0, target_s=0.05, min_sample_s=0.002, max_reps=20,
                    min_reps=3)
    case = make_case("distance", "fwd", 8, 2, 2)
    faults = {}
    for name, call in (("fresh", fresh_pages), ("same", same_pages)):
        monkeypatch.setattr(qm, "build_call", lambda case, impl, call=call: (call, lambda: None))
        faults[name] = qm.measure(case, "reference", settings)["faults_per_call"]
    assert faults["fresh"] >= 200 and faults["same"] < 10


def _coverage(n, k):
    """1 - 2 P(Binomial(n, 1/2) < k): what the order statistics x_(k), x_(n+1-k) cover of the median."""
    from math import comb

    return 1 - 2 * sum(comb(n, j) for j in range(k)) / 2**n


@pytest.mark.parametrize("n", [1, 2, 5, 6, 11, 20, 25, 41])
def test_median_interval_takes_the_narrowest_order_statistics_that_cover_95_percent(n):
    from qrkd.benchmark.measure import median_interval

    values = [float(v) for v in range(n, 0, -1)]  # n, ..., 1: the function must sort
    got = median_interval(values)
    ks = [k for k in range(1, (n + 1) // 2 + 1) if _coverage(n, k) >= 0.95]
    k = max(ks) if ks else 1
    assert (got["low"], got["high"]) == (float(k), float(n + 1 - k))
    assert got["level"] == pytest.approx(_coverage(n, k)) and got["n"] == n
    assert got["median"] == (n + 1) / 2
    if n >= 6:
        assert got["level"] >= 0.95 and _coverage(n, k + 1) < 0.95


def _fake_turns(monkeypatch, durations):
    """measure_in_turns with calls that take `durations[impl]` seconds of a fake clock, and the order they ran in."""
    import importlib

    qm = importlib.import_module("qrkd.benchmark.measure")
    clock = [0.0]
    ran = []

    def build_call(case, impl):
        def call():
            clock[0] += durations[impl]
            ran.append(impl)
            return 0.0

        return call, lambda: None

    monkeypatch.setattr(qm, "build_call", build_call)
    monkeypatch.setattr(qm, "_clock", lambda: clock[0])
    return qm, ran


def _turn_settings(**kw):
    return dict(dict(budget_s=100.0, target_s=0.05, min_sample_s=2.0**-8, turns_target_s=0.0), **kw)


def test_measure_in_turns_rotates_the_order_and_times_equal_loops(monkeypatch):
    from qrkd.benchmark.cases import make_case

    qm, ran = _fake_turns(monkeypatch, {"reference": 2.0**-8, "torch": 2.0**-10})
    out = qm.measure_in_turns(make_case("distance", "fwd", 8, 2, 2), ["reference", "torch"], _turn_settings())
    assert out["status"] == "ok" and out["rounds"] == qm.TURN_ROUNDS[0]
    assert out["inner"] == {"reference": 1, "torch": 4}  # as many calls a sample as fill min_sample_s
    assert out["samples_s"]["reference"] == pytest.approx([2.0**-8] * 6)
    assert out["samples_s"]["torch"] == pytest.approx([2.0**-10] * 6)
    timed = ran[-6 * 5:]  # after the warm-up: rounds of one reference call and four torch calls
    firsts = [timed[5 * r] for r in range(6)]
    assert firsts == ["reference", "torch"] * 3
    longer = qm.measure_in_turns(make_case("distance", "fwd", 8, 2, 2), ["reference", "torch"],
                                 _turn_settings(turns_target_s=10.0))
    assert longer["rounds"] == qm.TURN_ROUNDS[1]
    skipped = qm.measure_in_turns(make_case("distance", "fwd", 8, 2, 2), ["reference", "torch"],
                                  _turn_settings(budget_s=0.05))
    assert skipped["status"] == "skipped" and "6 rounds do not fit" in skipped["detail"]
    qm, ran = _fake_turns(monkeypatch, {"reference": 10.0, "torch": 2.0**-10})
    early = qm.measure_in_turns(make_case("distance", "fwd", 8, 2, 2), ["reference", "torch"],
                                _turn_settings(budget_s=30.0))
    assert early["status"] == "skipped" and "over 10 s" in early["detail"]
    assert ran == ["reference"]  # one call told it: neither the reference's warm-up nor torch's calls ran


@pytest.mark.parametrize("torch_s, verdict", [(0.001, "faster"), (0.003, "tie"), (0.006, "slower")])
def test_turns_give_paired_ratios_and_verdicts(monkeypatch, torch_s, verdict):
    from qrkd.benchmark.cases import make_case
    from qrkd.benchmark.report import annotate_turns, turns_text

    qm, _ = _fake_turns(monkeypatch, {"reference": 0.003, "torch": torch_s})
    case = make_case("distance", "fwd", 8, 2, 2)
    records = [{"impl": impl, "status": "ok", "case": case.to_dict(), "case_id": case.id, "median_s": 1.0,
                "value": 1.0} for impl in ("reference", "torch")]
    qb.annotate_case(records)
    annotate_turns(records, qm.measure_in_turns(case, ["reference", "torch"], _turn_settings()))
    ref, other = records
    assert "speedup" not in ref["turns"] and ref["turns"]["rounds"] == 6
    assert other["turns"]["speedup"] == pytest.approx(0.003 / torch_s)
    assert other["turns"]["verdict"] == verdict and verdict in turns_text(other)
    annotate_turns(records, {"status": "skipped", "detail": "too slow"})
    assert other["turns"] == {"status": "skipped", "detail": "too slow"} and turns_text(other) == "skipped"


def test_sweep_with_turns_reports_them(tmp_path, capsys):
    argv = ["--relations", "distance", "--modes", "fwd", "--n", "32", "--d", "4", "--no-named", "--impls",
            "reference,torch", "--turns", "--no-roofline", "--no-plots", "--out", str(tmp_path), "--machine",
            "testbox"]
    assert qb.main(argv) == 0
    assert any(line.startswith("[turns") and "torch" in line for line in capsys.readouterr().out.splitlines())
    (name,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / name) as f:
        data = json.load(f)
    assert data["config"]["turns"] is True
    turns = _result(data, "distance", "torch")["turns"]
    assert turns["status"] == "ok" and 6 <= turns["rounds"] <= 41 and turns["verdict"] in ("faster", "tie", "slower")
    assert turns["low"] <= turns["speedup"] <= turns["high"]
    md = (tmp_path / (name[:-5] + ".md")).read_text()
    assert "## In turns" in md and f"- torch: {turns['verdict']} in 1 of 1 cases" in md
