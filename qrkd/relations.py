"""The relations qrkd computes, one row each: every other list of relations or ops is derived from this table.

A relation used to go by four names (`angle` in the bench, `rkd_angle` for the C++ op and the tests, `rkd_angle_loss`
in the backend contract, `ar` as a weight of DistillationLoss); a row holds them together:

    name           short name: the bench's relations (`qrkd bench --relations`), test ids
    op             the backend contract function (qrkd/backends/__init__.py), one per backend module
    cpp_op         the extension's op, torch.ops.qrkd.<cpp_op> (csrc/)
    weight         the DistillationLoss weight of its term (None: not a loss term of its own)
    time_exponent  the work grows as N ** time_exponent (the bench predicts timeouts at the next size from it)
    benchmarked    measured by `qrkd bench` and bench/
    complex_inputs the op takes per-sample complex matrices (P, Q), not real student/teacher features

The order is the bench's (angle first); backends.OPS follows it. This module imports nothing.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Relation:
    name: str
    op: str
    cpp_op: str
    weight: str | None
    time_exponent: int
    benchmarked: bool = True
    complex_inputs: bool = False


TABLE = (
    Relation("angle", "rkd_angle_loss", "rkd_angle", "ar", 3),
    Relation("distance", "rkd_distance_loss", "rkd_distance", "dr", 2),
    Relation("fidelity", "fidelity_kernel_loss", "fidelity_loss", "qk", 2),
    Relation("fidelity_matrix", "fidelity_kernel_matrix", "fidelity_matrix", None, 2, benchmarked=False),
    # the quantum kernel term (weight qk) with qk_backend="merlin"
    Relation("photonic", "photonic_fidelity", "photonic_fidelity", "qk", 2, complex_inputs=True),
)

BY_NAME = {r.name: r for r in TABLE}
BY_OP = {r.op: r for r in TABLE}

OPS = tuple(r.op for r in TABLE)  # the backend contract's functions
FEATURE_OPS = tuple(r.op for r in TABLE if not r.complex_inputs)  # those on real (student, teacher) features
BENCHMARKED = tuple(r.name for r in TABLE if r.benchmarked)
