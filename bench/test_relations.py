"""pytest-benchmark: the RKD angle, RKD distance and classical fidelity-kernel losses, every implementation
(conftest.py parametrises each relation named by the marker with what is available)."""

import pytest

from qrkd.relations import TABLE


@pytest.mark.bench_relations(*(r.name for r in TABLE if r.benchmarked and not r.complex_inputs))
def test_loss(bench_run):
    bench_run()
