"""pytest-benchmark: the photonic fidelity-kernel loss (the seed's circuit d=4, m=10, n=5), every qrkd backend and
MerLin's FidelityKernel (conftest.py parametrises each relation named by the marker with what is available)."""

import pytest

from qrkd.relations import TABLE


@pytest.mark.bench_relations(*(r.name for r in TABLE if r.benchmarked and r.complex_inputs))
def test_loss(bench_run):
    bench_run()
