"""pytest-benchmark: the RKD angle, RKD distance and classical fidelity-kernel losses, every implementation
(parametrised in conftest.py from RELATIONS and what is available)."""

RELATIONS = ("angle", "distance", "fidelity")


def test_loss(bench_run):
    bench_run()
