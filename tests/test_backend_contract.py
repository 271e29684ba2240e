"""The backend contract (DESIGN.md sections 4 and 6), once for every available backend x relation.

The grid is derived, not listed: backends from qrkd.backends (what is available in this process), relations from
qrkd/relations.py through parity.RELATIONS, each backend on the first device it runs the op on (triton: CPU tensors
under TRITON_INTERPRET=1, CUDA tensors on a GPU). A new backend is tested here by registering it; its own file keeps
only what is specific to it.

Interpreted Triton costs milliseconds per program instance, so the backends in SMALL_GRID run a grid with N <= 33
(their full grid is in their own file, on a GPU); every other backend runs the full one.
"""

import pytest
import torch

import qrkd
from parity import (
    RELATIONS,
    check_angle_shares_add_up,
    check_coincident_points_send_no_angle_gradient,
    check_identical_rows,
    check_photonic_float32,
    check_parity,
    contract_op,
    loss_fn,
    make_features,
    make_matrices,
    matrix_grads,
    relative_error,
)
from qrkd import backends
from qrkd.backends import reference
from qrkd.relations import BY_OP

SMALL_GRID = {"triton"}


def _device(backend, op):
    """The device whose tensors `backend` runs `op` on (CPU first), or None."""
    dtype = torch.complex128 if BY_OP[op].complex_inputs else torch.float64
    for device in ("cpu", "cuda"):
        if backends.supports(backend, op, device, dtype):
            return device
    return None


def _grid_of(backend):
    return "small" if backend in SMALL_GRID else "full"


AVAILABLE = backends.available_backends()
FAST = [b for b in AVAILABLE if b != "reference"]
DEVICES = {(b, r): _device(b, contract_op(r)) for b in AVAILABLE for r in (*RELATIONS, "photonic")}


def params(cases=None, relations=RELATIONS, include_reference=False):
    """pytest params (backend, relation[, case]) for every backend that runs the relation; `cases`: a list, or a dict
    from "full" and "small" to the cases of that grid."""
    out = []
    for backend in (AVAILABLE if include_reference else FAST):
        for relation in relations:
            if DEVICES[(backend, relation)] is None:
                continue
            if cases is None:
                out.append(pytest.param(backend, relation, id=f"{backend}-{relation}"))
                continue
            for case in cases[_grid_of(backend)] if isinstance(cases, dict) else cases:
                case_id = "-".join(map(str, case)) if isinstance(case, tuple) else str(case)
                out.append(pytest.param(backend, relation, case, id=f"{backend}-{relation}-{case_id}"))
    return out


def module(backend):
    return backends.backend_module(backend)


def device(backend, relation):
    return DEVICES[(backend, relation)]


# ---------------------------------------------------------------------------------- relations on real features

RANDOM_SHAPES = {  # (N, Ds, Dt): the section 6 sizes, Ds != Dt in most
    "full": [(1, 4, 4), (1, 1, 130), (2, 1, 4), (2, 130, 31), (3, 4, 31), (3, 31, 1), (17, 31, 4), (17, 130, 130),
             (17, 4, 1), (128, 4, 31), (128, 130, 4), (300, 31, 1), (300, 4, 130)],
    "small": [(1, 4, 4), (2, 1, 4), (3, 4, 31), (17, 31, 4), (33, 130, 5)],
}


@pytest.mark.parametrize("backend, relation, shape", params(RANDOM_SHAPES))
def test_parity_random(backend, relation, shape):
    n, ds, dt = shape
    s, t = make_features(n, ds, seed=1), make_features(n, dt, seed=2)
    on = device(backend, relation)
    check_parity(relation, module(backend), s.to(on), t.to(on))


KINDS = ["duplicates", "zero_rows", "shifted"]
SPECIAL = {  # (kind, N); the student's width when the teacher carries the structure is WIDTHS[grid]
    "full": [(kind, n) for kind in KINDS for n in (3, 17, 33, 128)],
    "small": [(kind, n) for kind in KINDS for n in (3, 33)],
}
WIDTHS = {"full": (6, 31), "small": (6,)}


@pytest.mark.parametrize("backend, relation, case", params(SPECIAL))
def test_parity_special_inputs(backend, relation, case):
    # the student carries the special structure with a random teacher, then the other way round
    kind, n = case
    impl, on = module(backend), device(backend, relation)
    check_parity(relation, impl, make_features(n, 5, kind, seed=3).to(on), make_features(n, 7, seed=4).to(on))
    for width in WIDTHS[_grid_of(backend)]:
        s, t = make_features(n, width, seed=5), make_features(n, 4, kind, seed=6)
        check_parity(relation, impl, s.to(on), t.to(on))


GRAD_OUTPUTS = {  # (grad_output, student seed, teacher seed) at N = 17, Ds = 6, Dt = 9
    "full": [(-2.5, 7, 8), (-2.5, 9, 10), (3.0, 9, 10)],
    "small": [(-2.5, 9, 10)],
}


@pytest.mark.parametrize("backend, relation, case", params(GRAD_OUTPUTS))
def test_grad_output_scales_gradient(backend, relation, case):
    grad_output, seed_s, seed_t = case
    on = device(backend, relation)
    s, t = make_features(17, 6, seed=seed_s).to(on), make_features(17, 9, seed=seed_t).to(on)
    check_parity(relation, module(backend), s, t, grad_output=grad_output)


GRADCHECKS = {  # (N, student seed, teacher seed); Ds = 3, Dt = 5
    "full": [(6, 10, 9), (2, 14, 13), (5, 14, 13), (7, 14, 13)],
    "small": [(6, 13, 14)],
}


@pytest.mark.parametrize("backend, relation, case", params(GRADCHECKS))
def test_gradcheck_float64(backend, relation, case):
    n, seed_s, seed_t = case
    fn, on = loss_fn(module(backend), relation), device(backend, relation)
    t = make_features(n, 5, seed=seed_t).to(on)
    s = make_features(n, 3, seed=seed_s).to(on).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (s,))


@pytest.mark.parametrize("backend, relation, n", params([1, 2, 9]))
def test_identical_rows_give_zero_loss_and_zero_gradient(backend, relation, n):
    check_identical_rows(module(backend), relation, n, device(backend, relation))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the Triton interpreter
@pytest.mark.parametrize("backend, relation, n", params({"full": [7, 150], "small": [7]}))
def test_non_finite_features_give_nan_loss(backend, relation, n):
    fn, on = loss_fn(module(backend), relation), device(backend, relation)
    for dtype in (torch.float32, torch.float64):
        for value in (float("nan"), float("inf")):
            s, t = make_features(n, 4, seed=38, dtype=dtype).to(on), make_features(n, 4, seed=39, dtype=dtype).to(on)
            s[3, 1] = value
            x = s.clone().requires_grad_(True)
            loss = fn(x, t)
            assert torch.isnan(loss)
            loss.backward()  # must return, whatever the gradient holds
            assert fn(t, s).isnan()  # non-finite teacher


@pytest.mark.parametrize("backend, relation", params(relations=("angle",), include_reference=True))
def test_angle_coincident_points_send_no_gradient(backend, relation):
    check_coincident_points_send_no_angle_gradient(module(backend), device(backend, relation))


ANCHOR_PARTITIONS = {  # (N, the student's kind, student seed, teacher seed, a partition of the anchors); Ds 5, Dt 7
    "full": [
        (13, "duplicates", 15, 16, ((0, 1), (1, 8), (8, 8), (8, 13))),
        (40, "zero_rows", 22, 23, ((0, 1), (1, 19), (19, 19), (19, 40))),
    ],
    "small": [(13, "duplicates", 15, 16, ((0, 1), (1, 8), (8, 8), (8, 13)))],
}


@pytest.mark.parametrize(
    "backend, relation, case", params(ANCHOR_PARTITIONS, relations=("angle",), include_reference=True)
)
def test_angle_anchor_shares_add_up(backend, relation, case):
    n, kind, seed_s, seed_t, ranges = case
    on = device(backend, relation)
    s, t = make_features(n, 5, kind, seed=seed_s).to(on), make_features(n, 7, seed=seed_t).to(on)
    check_angle_shares_add_up(module(backend), s, t, list(ranges))


# ------------------------------------------------------------------------------------------ the photonic kernel
# through the public function with backend=<name>: the op against the naive permutation formula of the reference


def photonic(backend):
    return lambda p, q: qrkd.photonic_fidelity(p, q, backend=backend)


PHOTONIC_SIZES = [(n, sizes) for n in (1, 2, 3, 5, 6) for sizes in ((1, 1), (2, 3), (17, 3), (13, None))]


@pytest.mark.parametrize(
    "backend, relation, case", params(PHOTONIC_SIZES, relations=("photonic",))
)
def test_photonic_float64_matches_naive_permanent(backend, relation, case):
    n, (N, M) = case
    m = n + 3
    P = make_matrices(N, n, m, seed=n)
    Q = None if M is None else make_matrices(M, n, m, seed=100 + n)
    weight = torch.randn(N, N if M is None else M, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    k_ref, g_ref = matrix_grads(reference.photonic_fidelity, P, Q, weight)
    k, g = matrix_grads(photonic(backend), P, Q, weight)
    assert k.shape == k_ref.shape and k.dtype == torch.float64
    assert relative_error(k, k_ref) < 1e-10
    for a, b in zip(g, g_ref):
        assert relative_error(a, b) < 1e-8


@pytest.mark.parametrize("backend, relation, n", params([2, 4], relations=("photonic",)))
def test_photonic_float32_criterion(backend, relation, n):
    N, M, m = 17, 5, 7
    P64, Q64 = make_matrices(N, n, m, seed=3), make_matrices(M, n, m, seed=4)
    check_photonic_float32(photonic(backend), P64, Q64, torch.randn(N, M, dtype=torch.float64))


@pytest.mark.parametrize("backend, relation", params(relations=("photonic",)))
def test_photonic_gradcheck(backend, relation):
    P = make_matrices(4, 3, 4, seed=11).requires_grad_()
    Q = make_matrices(3, 3, 4, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(photonic(backend), (P, Q))
    assert torch.autograd.gradcheck(lambda p: qrkd.photonic_fidelity(p, backend=backend), (P,))


@pytest.mark.parametrize("backend, relation", params(relations=("photonic",)))
def test_photonic_grad_output_and_partial_requires_grad(backend, relation):
    P, Q = make_matrices(5, 2, 3, seed=1), make_matrices(6, 2, 3, seed=2).requires_grad_()
    K = qrkd.photonic_fidelity(P, Q, backend=backend)
    (gq,) = torch.autograd.grad(3.0 * K.sum(), (Q,))
    Qr = Q.detach().clone().requires_grad_()
    (gq_ref,) = torch.autograd.grad(3.0 * reference.photonic_fidelity(P, Qr).sum(), (Qr,))
    assert relative_error(gq, gq_ref) < 1e-8


@pytest.mark.parametrize("backend, relation", params(relations=("photonic",)))
def test_photonic_nan_propagates(backend, relation):
    P = make_matrices(3, 2, 4)
    P[1, 0, 0] = float("nan")
    K = qrkd.photonic_fidelity(P, backend=backend)
    assert torch.isnan(K[1]).all() and torch.isfinite(K[0, 0])
