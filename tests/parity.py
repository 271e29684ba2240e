"""Parity criteria of DESIGN.md section 6 and the inputs they run on, shared by the backend tests."""

import contextlib
import math

import torch

from qrkd.backends import reference
from qrkd.functional import common_columns
from qrkd.relations import BY_NAME, TABLE

# conventions of a relation besides its default: the extra arguments of its contract op
VARIANTS = {"distance": {"distance": {"zero_diagonal": False}, "distance_zero_diag": {"zero_diagonal": True}}}
# the loss terms on real features in qrkd/relations.py, each of their conventions under its own name:
# name -> (contract op, its extra arguments)
_CALLS = {
    name: (r.op, kwargs)
    for r in TABLE
    if r.weight and not r.complex_inputs
    for name, kwargs in VARIANTS.get(r.name, {r.name: {}}).items()
}
RELATIONS = tuple(_CALLS)
_EQUAL_WIDTHS = {"fidelity"}  # its contract op takes features truncated to the smaller width (DESIGN.md 3.4)


def contract_op(relation):
    """The backend contract function of a relation of RELATIONS or of qrkd/relations.py."""
    return _CALLS[relation][0] if relation in _CALLS else BY_NAME[relation].op


def loss_fn(module, relation):
    """The relation's loss in a backend module (or the reference), as f(student, teacher)."""
    if relation not in _CALLS:
        raise ValueError(relation)
    op, kwargs = _CALLS[relation]

    def loss(s, t):
        if relation in _EQUAL_WIDTHS:
            s, t = (x.contiguous() for x in common_columns(s, t))
        return getattr(module, op)(s, t, **kwargs)

    return loss


def make_features(n, d, kind="random", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "duplicates" and n >= 3:
        x[n // 2] = x[0]
        x[n - 1] = x[1]
    elif kind == "zero_rows" and n >= 2:
        x[0] = 0.0
        x[n - 1] = 0.0
    elif kind == "shifted":
        x = 0.1 * x + 3.0  # mean >> spread
    elif kind == "identical":
        x = x[:1].expand(n, d).clone()
    return x.to(dtype)


def value_and_grad(fn, s, t, grad_output=1.0):
    s = s.detach().clone().requires_grad_(True)
    loss = fn(s, t)
    (grad,) = torch.autograd.grad(loss * grad_output, s)
    return loss.detach(), grad


def check_parity(relation, impl, s64, t64, grad_output=1.0, against=reference):
    """Checks `impl` (a backend module) against the reference on float64 inputs (relative 1e-10 on the value, 1e-8 of
    max|grad| on the gradient) and float32 inputs (no more than twice the float32 reference's own error plus the
    floors 2e-5 relative on values, 1e-5 max|grad| + 1e-6 on gradients). Returns the measured errors. `against` puts
    another backend in the reference's place, for sizes whose N^3 tensors the reference cannot hold."""
    ref = loss_fn(against, relation)
    fn = loss_fn(impl, relation)
    truth_loss, truth_grad = value_and_grad(ref, s64, t64, grad_output)
    scale = truth_grad.abs().max().item()

    loss64, grad64 = value_and_grad(fn, s64, t64, grad_output)
    assert loss64.dtype == torch.float64 and grad64.dtype == torch.float64
    err_v64 = abs(loss64.item() - truth_loss.item())
    err_g64 = (grad64 - truth_grad).abs().max().item()
    assert torch.isfinite(loss64) and torch.isfinite(grad64).all()
    assert err_v64 <= 1e-10 * abs(truth_loss.item()) + 1e-14, f"{relation} float64 value error {err_v64:.3g}"
    assert err_g64 <= 1e-8 * scale + 1e-14, f"{relation} float64 gradient error {err_g64:.3g} (max {scale:.3g})"

    with torch.no_grad():  # the forward-only paths (no gradient wanted) must give the same loss
        err_f64 = abs(fn(s64, t64).item() - truth_loss.item())
    assert err_f64 <= 1e-10 * abs(truth_loss.item()) + 1e-14, f"{relation} float64 forward-only error {err_f64:.3g}"

    s32, t32 = s64.float(), t64.float()
    ref_loss32, ref_grad32 = value_and_grad(ref, s32, t32, grad_output)
    loss32, grad32 = value_and_grad(fn, s32, t32, grad_output)
    assert loss32.dtype == torch.float32 and grad32.dtype == torch.float32
    ref_err_v = abs(ref_loss32.double().item() - truth_loss.item())
    ref_err_g = (ref_grad32.double() - truth_grad).abs().max().item()
    err_v32 = abs(loss32.double().item() - truth_loss.item())
    err_g32 = (grad32.double() - truth_grad).abs().max().item()
    assert err_v32 <= 2 * ref_err_v + 2e-5 * abs(truth_loss.item()) + 1e-12, (
        f"{relation} float32 value error {err_v32:.3g} (reference's own {ref_err_v:.3g})"
    )
    with torch.no_grad():
        err_f32 = abs(fn(s32, t32).double().item() - truth_loss.item())
    assert err_f32 <= 2 * ref_err_v + 2e-5 * abs(truth_loss.item()) + 1e-12, (
        f"{relation} float32 forward-only error {err_f32:.3g} (reference's own {ref_err_v:.3g})"
    )
    assert err_g32 <= 2 * ref_err_g + 1e-5 * scale + 1e-6, (
        f"{relation} float32 gradient error {err_g32:.3g} (reference's own {ref_err_g:.3g}, max {scale:.3g})"
    )
    return {"value64": err_v64, "grad64": err_g64, "value32": err_v32, "grad32": err_g32, "scale": scale}


def check_identical_rows(impl, relation, n, device="cpu"):
    """All rows identical on both sides: loss 0 and zero, finite gradient (the classical fidelity kernel is 1 on both
    sides up to the rounding of (psi . psi)^2, so there the loss and gradient are only tiny)."""
    for dtype in (torch.float32, torch.float64):
        s = make_features(n, 5, "identical", seed=11, dtype=dtype).mul(7.3).to(device).requires_grad_(True)
        t = make_features(n, 3, "identical", seed=12, dtype=dtype).to(device)
        loss = loss_fn(impl, relation)(s, t)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()
        if relation == "fidelity":
            assert loss.item() < 1e-10 and grad.abs().max().item() < 1e-5
        else:
            assert loss.item() == 0.0 and grad.abs().max().item() == 0.0


def check_coincident_points_send_no_angle_gradient(impl, device="cpu"):
    """DESIGN.md 3.3: a triplet whose anchor coincides with another point has value 0 and no gradient (the seed's
    formula gives ~1e10 there); the result still matches the reference."""
    s = make_features(9, 4, seed=13)
    s[4] = s[2]
    t = make_features(9, 4, seed=14)
    for dtype in (torch.float32, torch.float64):
        x = s.to(dtype).to(device).requires_grad_(True)
        (grad,) = torch.autograd.grad(impl.rkd_angle_loss(x, t.to(dtype).to(device)), x)
        assert torch.isfinite(grad).all() and grad.abs().max().item() < 1.0
    if impl is not reference:
        check_parity("angle", impl, s.to(device), t.to(device))


def check_angle_shares_add_up(impl, s, t, ranges):
    """The anchor-range shares of a partition of the anchors add up to the loss, values and gradients."""
    x = s.clone().requires_grad_(True)
    full = impl.rkd_angle_loss(x, t)
    (g_full,) = torch.autograd.grad(full, x)
    parts = [impl.rkd_angle_loss(x, t, a, b) for a, b in ranges]
    (g_parts,) = torch.autograd.grad(sum(parts), x)
    torch.testing.assert_close(sum(parts), full, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------------------------------------- photonic kernel


def make_matrices(N, n, m, dtype=torch.complex128, seed=0, device="cpu"):
    """N random complex n x m matrices (the per-sample P of DESIGN.md 3.5)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(N, n, m, 2, generator=g, dtype=torch.float64) / math.sqrt(2 * m)
    return torch.view_as_complex(real).to(device=device, dtype=dtype)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def matrix_grads(fn, P, Q, weight):
    """K = fn(P, Q) and the gradients of sum(K * weight) in P (and Q unless it is None)."""
    P = P.detach().clone().requires_grad_()
    Q = None if Q is None else Q.detach().clone().requires_grad_()
    K = fn(P, Q)
    inputs = (P,) if Q is None else (P, Q)
    return K.detach(), torch.autograd.grad((K * weight).sum(), inputs)


def check_photonic_float32(fn, P64, Q64, weight):
    """The float32 criterion of DESIGN.md section 6 for a photonic op fn(P, Q) (Q None: symmetric): on the complex64
    casts of P64, Q64 its K and gradients are within twice the float32 reference's own error of the float64 truth,
    plus a floor."""
    k64, g64 = matrix_grads(reference.photonic_fidelity, P64, Q64, weight)
    to32 = (lambda x: None if x is None else x.to(torch.complex64))
    k_r32, g_r32 = matrix_grads(reference.photonic_fidelity, to32(P64), to32(Q64), weight.float())
    k32, g32 = matrix_grads(fn, to32(P64), to32(Q64), weight.float())
    assert k32.dtype == torch.float32
    ref_err = (k_r32.double() - k64).abs().max()
    assert (k32.double() - k64).abs().max() <= 2 * ref_err + 2e-5 * k64.abs().max()
    for a, r, b in zip(g32, g_r32, g64):
        ref_err = (r.to(torch.complex128) - b).abs().max()
        assert (a.to(torch.complex128) - b).abs().max() <= 2 * ref_err + 1e-5 * b.abs().max() + 1e-6


@contextlib.contextmanager
def torch_threads(threads):
    """torch's intra-op thread count set to `threads` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_fidelity_moments_route(monkeypatch, backend, dtype):
    """N = 521, D = 4 (the seed's width) through the public loss, with and without gradient, a wide teacher cut to the
    student's width first: the backend takes the moments, and its loss and gradient are the float64 reference's."""
    import qrkd
    from qrkd.backends import fidelity_moments

    calls = []
    original = fidelity_moments.loss_and_grad
    monkeypatch.setattr(fidelity_moments, "loss_and_grad", lambda *a: calls.append(a[2]) or original(*a))
    g = torch.Generator().manual_seed(73)
    x, t = torch.randn(521, 4, generator=g, dtype=dtype), torch.randn(521, 31, generator=g, dtype=dtype)
    truth, grad_truth = value_and_grad(reference.fidelity_kernel_loss, x.double(), t[:, :4].double())
    rtol = 1e-12 if dtype == torch.float64 else 3e-7
    with torch.no_grad():
        torch.testing.assert_close(qrkd.fidelity_kernel_loss(x, t, backend=backend).double(), truth, rtol=rtol, atol=0)
    y = x.clone().requires_grad_(True)
    loss = qrkd.fidelity_kernel_loss(y, t, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss.detach().double(), truth, rtol=rtol, atol=0)
    torch.testing.assert_close(y.grad.double(), grad_truth, rtol=rtol, atol=rtol * grad_truth.abs().max().item())
    assert calls == [False, True]
