"""pytest-benchmark: the photonic fidelity-kernel loss (the seed's circuit d=4, m=10, n=5), every qrkd backend and
MerLin's FidelityKernel (parametrised in conftest.py from RELATIONS and what is available)."""

RELATIONS = ("photonic",)


def test_loss(bench_run):
    bench_run()
