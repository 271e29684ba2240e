"""What is specific to the pure-torch backend and the reference; the contract every backend meets (parity with the
reference, special inputs, gradients, gradcheck, identical rows, non-finite input, anchor ranges) is checked for both
in tests/test_backend_contract.py."""

import pytest
import torch

from parity import check_fidelity_moments_route, check_parity, value_and_grad
from qrkd.backends import reference


def test_angle_values_match_the_seed_formula_on_degenerate_triplets():
    # b == c coincident with x_b != x_a gives 1; x_b == x_a gives 0 (DESIGN.md 3.3)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    angles = reference.triplet_angles(x).view(3, 3, 3)
    assert angles[0, 1, 2].item() == pytest.approx(1.0)
    assert angles[1, 2, 0].item() == 0.0 and angles[1, 1, 0].item() == 0.0


def test_fidelity_symmetric_gram_path(monkeypatch):
    # large N^2 D takes _SymmetricGram (one product in the backward instead of two); here at a small size, with the
    # reference beside it: the matrix and the loss, their gradients, the double backward and vmap
    from qrkd.backends import pure_torch

    monkeypatch.setattr(pure_torch, "_SYMMETRIC_GRAM_MIN", 0)
    g = torch.Generator().manual_seed(60)
    x, t = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    x[3] = 0.0  # a zero row: psi = 0, no gradient
    w = torch.randn(9, 9, generator=g, dtype=torch.float64)  # not symmetric: the backward's G + G^T matters
    for fn, ref in ((lambda y: (pure_torch.fidelity_kernel_matrix(y) * w).sum(),
                     lambda y: (reference.fidelity_kernel_matrix(y) * w).sum()),
                    (lambda y: pure_torch.fidelity_kernel_loss(y, t), lambda y: reference.fidelity_kernel_loss(y, t))):
        y, y_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        (got,) = torch.autograd.grad(fn(y), y)
        (want,) = torch.autograd.grad(ref(y_ref), y_ref)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: (pure_torch.fidelity_kernel_matrix(z) * w).sum(), (y,))
    assert torch.autograd.gradgradcheck(lambda z: (pure_torch.fidelity_kernel_matrix(z) * w).sum(), (y,))
    batch = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(pure_torch.fidelity_kernel_matrix)(batch),
                               torch.stack([reference.fidelity_kernel_matrix(b) for b in batch]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("block_elements", [1 << 18, 60, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fidelity_loss_upper_triangle_blocks(monkeypatch, block_elements, dtype):
    # the loss's pass forms the upper triangle in blocks of rows (from N = 363 on at the default size); a small block
    # size takes it here, at odd N, with a zero row and duplicate rows: the value with and without gradient, the
    # gradient, the double backward (the formula differentiated again) and torch.func against the reference
    from qrkd.backends import pure_torch

    monkeypatch.setattr(pure_torch, "_FIDELITY_BLOCK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(61)
    x, t = torch.randn(11, 4, generator=g, dtype=torch.float64), torch.randn(11, 4, generator=g, dtype=torch.float64)
    x[3] = 0.0
    x[7] = x[5]
    t[2] = t[9]
    x, t = x.to(dtype), t.to(dtype)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-7)
    y, y_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, want = pure_torch.fidelity_kernel_loss(y, t), reference.fidelity_kernel_loss(y_ref, t)
    torch.testing.assert_close(got, want, **tol)
    with torch.no_grad():
        torch.testing.assert_close(pure_torch.fidelity_kernel_loss(x, t), want.detach(), **tol)
    (grad,), (grad_ref,) = torch.autograd.grad(got, y), torch.autograd.grad(want, y_ref)
    scale = grad_ref.abs().max().item()
    torch.testing.assert_close(grad, grad_ref, rtol=tol["rtol"], atol=tol["rtol"] * scale)
    if dtype != torch.float64:
        return
    torch.testing.assert_close(torch.func.grad(lambda z: pure_torch.fidelity_kernel_loss(z, t))(x), grad_ref,
                               rtol=1e-12, atol=1e-15)
    v = torch.randn(11, 4, generator=g, dtype=dtype)
    hvps = []
    for fn in (pure_torch.fidelity_kernel_loss, reference.fidelity_kernel_loss):
        z = x.clone().requires_grad_(True)
        (dz,) = torch.autograd.grad(fn(z, t), z, create_graph=True)
        hvps.append(torch.autograd.grad((dz * v).sum(), z)[0])
    # the zero row's second derivative is NaN in both (that of |x| at 0); every other row's is a number
    assert int(torch.isfinite(hvps[1]).sum()) == 40
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-10, atol=1e-12, equal_nan=True)
    x[3] = torch.randn(4, generator=g, dtype=dtype)  # gradcheck's finite differences need |x| away from 0
    loss = lambda z: pure_torch.fidelity_kernel_loss(z, t)  # noqa: E731
    assert torch.autograd.gradcheck(loss, (x.clone().requires_grad_(True),))
    assert torch.autograd.gradgradcheck(loss, (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("width", [1, 2, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fidelity_moments_match_reference(width, dtype):
    # the moments' loss and gradient at odd N with a zero row, duplicate rows on both sides and, at width 1, every
    # kernel entry 1 or 0: against the float64 reference on the same values (the moments work in float64, so float32
    # features lose only the final rounding)
    from qrkd.backends import fidelity_moments

    g = torch.Generator().manual_seed(70 + width)
    x, t = (torch.randn(37, width, generator=g, dtype=torch.float64) for _ in range(2))
    x[3] = 0.0
    x[7] = x[5]
    t[2] = t[9]
    x, t = x.to(dtype), t.to(dtype)
    truth, grad_truth = value_and_grad(reference.fidelity_kernel_loss, x.double(), t.double())
    rtol = 1e-12 if dtype == torch.float64 else 3e-7
    loss, grad = fidelity_moments.loss_and_grad(x, t, True)
    loss_only, none = fidelity_moments.loss_and_grad(x, t, False)
    assert none is None and loss.dtype == grad.dtype == dtype and loss_only.item() == loss.item()
    torch.testing.assert_close(loss.double(), truth, rtol=rtol, atol=1e-15)
    torch.testing.assert_close(grad.double(), grad_truth, rtol=rtol, atol=rtol * grad_truth.abs().max().item())


def test_fidelity_moments_student_close_to_teacher():
    # every moment is of the order of the student-teacher gap: a student 1e-6 from its teacher keeps its digits (the
    # plain |phi_s^T phi_s|^2 - 2 |phi_s^T phi_t|^2 + |phi_t^T phi_t|^2, in float64, is off by 3.7e-5 relative here)
    from qrkd.backends import fidelity_moments

    g = torch.Generator().manual_seed(72)
    t = torch.randn(200, 4, generator=g, dtype=torch.float64)
    x = t + 1e-6 * torch.randn(200, 4, generator=g, dtype=torch.float64)
    truth, grad_truth = value_and_grad(reference.fidelity_kernel_loss, x.double(), t.double())
    loss, grad = fidelity_moments.loss_and_grad(x, t, True)
    torch.testing.assert_close(loss, truth, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad, grad_truth, rtol=1e-8, atol=1e-8 * grad_truth.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fidelity_loss_takes_moments_for_narrow_features(monkeypatch, dtype):
    check_fidelity_moments_route(monkeypatch, "torch", dtype)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fidelity_moments_non_finite(side, value):
    from qrkd.backends import fidelity_moments

    g = torch.Generator().manual_seed(74)
    x, t = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    (x if side == "student" else t)[4, 1] = value
    loss, grad = fidelity_moments.loss_and_grad(x, t, True)
    assert torch.isnan(loss) and torch.isnan(fidelity_moments.loss_and_grad(x, t, False)[0])
    assert torch.isnan(grad).any()


def test_fidelity_moments_float32_beyond_the_float32_norm():
    # rows of ~1e20: |x|^2 overflows in float32, which gives the float32 reference K = 0 for them; the moments normalise
    # in float64 and give the kernel of the same values in float64
    from qrkd.backends import fidelity_moments

    g = torch.Generator().manual_seed(75)
    x, t = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    x[:4] *= 1e20
    truth, _ = value_and_grad(reference.fidelity_kernel_loss, x.double(), t.double())
    assert reference.fidelity_kernel_loss(x, t).item() != pytest.approx(truth.item(), rel=1e-3)
    torch.testing.assert_close(fidelity_moments.loss_and_grad(x, t, False)[0].double(), truth, rtol=3e-7, atol=0)


@pytest.mark.parametrize("n, width", [(400, 16), (384, 512), (520, 16), (512, 400)])
def test_fidelity_forward_whole_or_blocks(n, width):
    # without gradient: whole matrices at N = 400 and at N = 384, D = 512 (N^2 D below _FIDELITY_WHOLE_FORWARD_WORK),
    # blocks at N = 520 and at N = 512, D = 400; the value is the reference's either way
    from qrkd.backends import pure_torch

    g = torch.Generator().manual_seed(78)
    x, t = (torch.randn(n, width, generator=g, dtype=torch.float64) for _ in range(2))
    x[5] = x[2]
    with torch.no_grad():
        torch.testing.assert_close(pure_torch.fidelity_kernel_loss(x, t), reference.fidelity_kernel_loss(x, t),
                                   rtol=1e-12, atol=0)


def test_fidelity_moments_under_compile_and_inference_mode():
    # the moments' basis is kept per (width, device) as plain tensors: not a fake one from torch.compile's trace, not
    # an inference tensor from a first call under inference_mode; compiled and eager agree through the moments route
    import qrkd
    from qrkd.backends import fidelity_moments

    fidelity_moments._BASES.clear()
    g = torch.Generator().manual_seed(79)
    x, t = torch.randn(400, 4, generator=g, dtype=torch.float64), torch.randn(400, 4, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        first = qrkd.fidelity_kernel_loss(x, t, backend="torch")
    assert not any(b.is_inference() for bases in fidelity_moments._BASES.values() for b in bases)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: qrkd.fidelity_kernel_loss(a, b, backend="torch"), backend="aot_eager")
    y, y_eager = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    value = compiled(y, t)
    value.backward()
    eager = qrkd.fidelity_kernel_loss(y_eager, t, backend="torch")
    eager.backward()
    torch.testing.assert_close(value.detach(), eager.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(first, eager.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(y.grad, y_eager.grad, rtol=1e-12, atol=1e-15)
    assert all(type(b) is torch.Tensor for bases in fidelity_moments._BASES.values() for b in bases)


@pytest.mark.parametrize("swap", [False, True])
def test_fidelity_whole_gradient_where_u_reaches_one(swap):
    # parallel rows (K = 1 for every pair; scaled, some negated) against orthogonal ones (K = 0 off the diagonal): every
    # u = K_s - K_t off the diagonal sits at +-1, the edge of smooth_l1's quadratic part, which the whole-matrix pass
    # with gradient (N < 363) takes as u^2 / 2 with derivative u, unclamped
    from qrkd.backends import pure_torch

    n = 24
    g = torch.Generator().manual_seed(5)
    parallel = torch.randn(n, 1, generator=g, dtype=torch.float64) * torch.randn(1, n, generator=g, dtype=torch.float64)
    orthogonal = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    orthogonal = orthogonal * (1 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    s, t = (orthogonal, parallel) if swap else (parallel, orthogonal)
    check_parity("fidelity", pure_torch, s, t)
