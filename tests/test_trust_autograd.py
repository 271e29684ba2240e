"""Trust in the autograd results (issue 9): double backward, NaN/inf propagation and torch.func.grad, on every backend
and every relation.

- Double backward: `reference` supports it for every relation (gradgradcheck in float64); the torch backend supports
  it where its ops are plain torch (distance, classical fidelity) or recomputed under autograd (photonic). Every other
  backend/relation returns the right first gradient under create_graph=True and refuses to differentiate it with a
  RuntimeError naming the backend and the backend that does support it: never a silent zero.
- A NaN or +inf anywhere in the student or the teacher gives a NaN loss, and backward returns.
- torch.func.grad gives torch.autograd.grad's gradient.

Triton runs on CPU tensors under the interpreter (tests/conftest.py), at tiny N.
"""

import math

import pytest
import torch

import qrkd
from qrkd import PhotonicFidelityKernel
from qrkd.backends import reference

DEVICE_TRITON = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("reference", "torch", "cpp", "triton") if b in qrkd.available_backends()]
RELATIONS = ("distance", "distance_zero_diag", "angle", "fidelity", "photonic")
# (backend, relation) pairs whose backward is itself differentiable; every other pair refuses
DOUBLE_BACKWARD = {("reference", r) for r in RELATIONS} | {
    ("torch", "distance"),
    ("torch", "distance_zero_diag"),
    ("torch", "fidelity"),
    ("torch", "photonic"),
}


def _kernel():
    return PhotonicFidelityKernel(3, 4, n_photons=2, seed=3, dtype=torch.float64)


def loss_of(relation, backend, kernel=None):
    """f(student, teacher) through the public API."""
    if relation == "distance":
        return lambda s, t: qrkd.rkd_distance_loss(s, t, backend=backend)
    if relation == "distance_zero_diag":
        return lambda s, t: qrkd.rkd_distance_loss(s, t, zero_diagonal=True, backend=backend)
    if relation == "angle":
        return lambda s, t: qrkd.rkd_angle_loss(s, t, backend=backend)
    if relation == "fidelity":
        return lambda s, t: qrkd.fidelity_kernel_loss(s, t, backend=backend)
    if relation == "photonic":
        kernel = kernel or _kernel()
        return lambda s, t: qrkd.fidelity_kernel_loss(s, t, kernel=kernel, backend=backend)
    raise ValueError(relation)


def runs(backend, relation):
    return not (backend == "triton" and relation == "photonic")  # no photonic op in triton


def device_of(backend):
    return DEVICE_TRITON if backend == "triton" else "cpu"


def features(n, d, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def hvp(fn, s, t, v):
    """(gradient, Hessian-vector product) of fn(., t) at s."""
    x = s.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x, t), x, create_graph=True)
    (h,) = torch.autograd.grad((g * v).sum(), x)
    return g.detach(), h


# ----------------------------------------------------------------------------------------------- double backward

GRID = [(b, r) for b in BACKENDS for r in RELATIONS if runs(b, r)]


@pytest.mark.parametrize("relation", RELATIONS)
def test_reference_double_backward_passes_gradgradcheck(relation):
    fn = loss_of(relation, "reference")
    s, t = features(5, 3, seed=1), features(5, 4, seed=2)
    assert torch.autograd.gradgradcheck(lambda x: fn(x, t), (s.requires_grad_(True),))


@pytest.mark.parametrize("backend,relation", GRID)
def test_double_backward_is_right_or_refused(backend, relation):
    device = device_of(backend)
    kernel = _kernel()
    s, t = features(6, 3, seed=3, device=device), features(6, 4, seed=4, device=device)
    v = features(6, 3, seed=5, device=device)
    g_ref, h_ref = hvp(loss_of(relation, "reference", kernel), s.cpu(), t.cpu(), v.cpu())
    fn = loss_of(relation, backend, kernel)
    if (backend, relation) in DOUBLE_BACKWARD:
        g, h = hvp(fn, s, t, v)
        torch.testing.assert_close(g.cpu(), g_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h.cpu(), h_ref, rtol=1e-8, atol=1e-10 * h_ref.abs().max().item())
        assert torch.autograd.gradgradcheck(lambda x: fn(x, t), (s.clone().requires_grad_(True),))
        return
    # the first backward under create_graph=True gives the right gradient
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x, t), x, create_graph=True)
    torch.testing.assert_close(g.detach().cpu(), g_ref, rtol=1e-9, atol=1e-12)
    # differentiating it is a clear error, also when only part of a larger expression depends on it
    with pytest.raises(RuntimeError, match=rf"double backward.*backend='{backend}'.*supported by backend='reference'"):
        torch.autograd.grad((g * v).sum() + x.pow(2).sum(), x)
    # loss.backward(create_graph=True) leaves a .grad that refuses the same way
    y = s.clone().requires_grad_(True)
    fn(y, t).backward(create_graph=True)
    torch.testing.assert_close(y.grad.detach().cpu(), g_ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match=f"backend='{backend}'"):
        y.grad.sum().backward()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "torch", "cpp")])
def test_photonic_op_double_backward_in_both_arguments(backend):
    g = torch.Generator().manual_seed(6)

    def mats(n_rows):
        return torch.view_as_complex(torch.randn(n_rows, 2, 3, 2, generator=g, dtype=torch.float64) / 2)

    P, Q = mats(3).requires_grad_(True), mats(2).requires_grad_(True)
    fn = lambda p, q: qrkd.photonic_fidelity(p, q, backend=backend)  # noqa: E731
    if backend in ("reference", "torch"):
        assert torch.autograd.gradgradcheck(fn, (P, Q))
        assert torch.autograd.gradgradcheck(lambda p: qrkd.photonic_fidelity(p, backend=backend), (P,))
        return
    w = torch.randn(3, 2, generator=g, dtype=torch.float64)
    gp, gq = torch.autograd.grad((fn(P, Q) * w).sum(), (P, Q), create_graph=True)
    rp, rq = torch.autograd.grad((reference.photonic_fidelity(P, Q) * w).sum(), (P, Q))
    torch.testing.assert_close(gp.detach(), rp, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gq.detach(), rq, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match=f"double backward.*backend='{backend}'"):
        torch.autograd.grad(gq.abs().sum(), P)


# ---------------------------------------------------------------------------------------------------- NaN / inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("backend,relation", GRID)
def test_non_finite_features_give_nan_loss(backend, relation, side, value):
    device = device_of(backend)
    kernel = _kernel()
    fn = loss_of(relation, backend, kernel)
    for n, row in ((1, 0), (5, 3)):
        for dtype in (torch.float32, torch.float64):
            s, t = features(n, 3, seed=7, dtype=dtype, device=device), features(n, 4, seed=8, dtype=dtype, device=device)
            (s if side == "student" else t)[row, 1] = value
            x = s.clone().requires_grad_(True)
            loss = fn(x, t)
            assert torch.isnan(loss), f"{backend} {relation} N={n} {dtype}: {loss.item()} with a {value} in the {side}"
            loss.backward()  # returns, whatever the gradient holds


# ------------------------------------------------------------------------------------------------ torch.func.grad


@pytest.mark.parametrize("backend,relation", GRID)
def test_func_grad_matches_autograd(backend, relation):
    device = device_of(backend)
    fn = loss_of(relation, backend, _kernel())
    s, t = features(7, 3, seed=9, device=device), features(7, 4, seed=10, device=device)
    x = s.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(fn(x, t), x)
    got = torch.func.grad(lambda y: fn(y, t))(s)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    got2, value = torch.func.grad_and_value(lambda y: fn(y, t))(s)
    torch.testing.assert_close(got2, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(value, fn(s, t), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_func_grad_of_func_grad_is_right_or_refused(backend):
    s, t = features(5, 3, seed=11), features(5, 4, seed=12)
    s, t = s.to(device_of(backend)), t.to(device_of(backend))
    for relation in ("distance", "angle"):
        fn = loss_of(relation, backend)
        second = torch.func.grad(lambda y: torch.func.grad(lambda z: fn(z, t))(y).sum())
        if (backend, relation) in DOUBLE_BACKWARD:
            want = torch.func.grad(lambda y: torch.func.grad(lambda z: loss_of(relation, "reference")(z, t))(y).sum())
            torch.testing.assert_close(second(s), want(s), rtol=1e-9, atol=1e-12)
        else:
            with pytest.raises(RuntimeError, match=f"double backward.*backend='{backend}'"):
                second(s)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("torch", "cpp")])
def test_func_grad_through_the_fidelity_matrix_and_photonic_op(backend):
    x = features(6, 3, seed=13)
    w = features(6, 6, seed=14)
    f = lambda y: (qrkd.fidelity_kernel_matrix(y, backend=backend) * w).sum()  # noqa: E731
    x_ = x.clone().requires_grad_(True)
    torch.testing.assert_close(torch.func.grad(f)(x), torch.autograd.grad(f(x_), x_)[0], rtol=1e-12, atol=1e-14)
    P = torch.view_as_complex(features(4, 2 * 3 * 2, seed=15).view(4, 2, 3, 2)) / math.sqrt(6)
    wp = features(4, 4, seed=16)
    h = lambda p: (qrkd.photonic_fidelity(p, backend=backend) * wp).sum()  # noqa: E731
    P_ = P.clone().requires_grad_(True)
    torch.testing.assert_close(torch.func.grad(h)(P), torch.autograd.grad(h(P_), P_)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend,relation", [(b, r) for b, r in GRID if r != "photonic"])
def test_vmap_matches_a_loop_or_is_refused(backend, relation):
    device = device_of(backend)
    fn = loss_of(relation, backend)
    s, t = features(3 * 6, 2, seed=17, device=device).view(3, 6, 2), features(6, 3, seed=18, device=device)
    try:
        batched = torch.func.vmap(lambda x: fn(x, t))(s)
    except RuntimeError as exc:  # never a silent wrong result; the fused backends say so in their own words
        if backend != "reference" and (backend, relation) not in DOUBLE_BACKWARD:
            assert f"vmap is not supported by backend='{backend}'" in str(exc)
        return
    torch.testing.assert_close(batched, torch.stack([fn(x, t) for x in s]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fidelity_matrix_double_backward_is_right_or_refused(backend):
    device = device_of(backend)
    x, w = features(5, 3, seed=19, device=device), features(5, 5, seed=20, device=device)
    fn = lambda y: (qrkd.fidelity_kernel_matrix(y, backend=backend) * w).sum()  # noqa: E731
    if backend in ("reference", "torch"):
        assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(True),))
        return
    y = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(y), y, create_graph=True)
    y_ref = x.cpu().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((reference.fidelity_kernel_matrix(y_ref) * w.cpu()).sum(), y_ref)
    torch.testing.assert_close(g.detach().cpu(), g_ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match=f"double backward.*backend='{backend}'"):
        g.sum().backward()
