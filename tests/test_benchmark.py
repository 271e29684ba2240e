"""The benchmark harness (qrkd.benchmark, `qrkd bench`): a tiny sweep end to end, and its bookkeeping.

No timing is asserted: only that measurements, failures and the report are recorded as the harness promises.
"""

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
