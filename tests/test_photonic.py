"""The photonic fidelity kernel (DESIGN.md 3.5): what the op's contract test (tests/test_backend_contract.py: every
backend against the naive permutation formula, float32, gradients, NaN) leaves out, the module against MerLin's
FidelityKernel, gradients, the kernel's properties, bad input and the seed's QRKD configuration."""

import warnings

import pytest
import torch

import qrkd
from parity import make_matrices, matrix_grads, relative_error
from qrkd import PhotonicFidelityKernel
from qrkd.backends import reference
from qrkd.photonic import default_input_state

try:
    import merlin
except ImportError:  # the GPU machine has no merlinquantum
    merlin = None

needs_merlin = pytest.mark.skipif(merlin is None, reason="merlinquantum is not installed")
FAST = [b for b in ("torch", "cpp") if b in qrkd.available_backends()]
CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------- the fused op itself


def test_op_twelve_photons_cpp_matches_torch():
    if "cpp" not in qrkd.available_backends():
        pytest.skip("the compiled extension is not built")
    P, Q = make_matrices(2, 12, 12, seed=5), make_matrices(3, 12, 12, seed=6)
    w = torch.randn(2, 3, dtype=torch.float64)
    k_c, g_c = matrix_grads(lambda p, q: qrkd.photonic_fidelity(p, q, backend="cpp"), P, Q, w)
    k_t, g_t = matrix_grads(lambda p, q: qrkd.photonic_fidelity(p, q, backend="torch"), P, Q, w)
    assert relative_error(k_c, k_t) < 1e-9
    for a, b in zip(g_c, g_t):
        assert relative_error(a, b) < 1e-8


def test_op_real_imaginary_pairs():
    P = make_matrices(4, 3, 5, seed=9)
    K = qrkd.photonic_fidelity(torch.view_as_real(P), backend="torch")
    assert relative_error(K, reference.photonic_fidelity(P)) < 1e-12


def test_op_bad_input():
    P = make_matrices(3, 2, 4)
    with pytest.raises(TypeError, match="P"):
        qrkd.photonic_fidelity(P.real)
    with pytest.raises(ValueError, match="P"):
        qrkd.photonic_fidelity(P[0])
    with pytest.raises(ValueError, match="P"):
        qrkd.photonic_fidelity(P[:0])
    with pytest.raises(ValueError, match="12"):
        qrkd.photonic_fidelity(make_matrices(2, 13, 13))
    with pytest.raises(ValueError, match="Q"):
        qrkd.photonic_fidelity(P, make_matrices(3, 2, 5))
    with pytest.raises(TypeError, match="P"):
        qrkd.photonic_fidelity([[1.0]])


def test_op_custom_op_registration():
    if "cpp" not in qrkd.available_backends():
        pytest.skip("the compiled extension is not built")
    P, Q = make_matrices(3, 2, 4, seed=1), make_matrices(5, 2, 4, seed=2)
    torch.library.opcheck(torch.ops.qrkd.photonic_fidelity.default, (P, Q, False))
    torch.library.opcheck(torch.ops.qrkd.photonic_fidelity.default, (P, P, True))
    G = torch.randn(3, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.qrkd.photonic_fidelity_backward.default, (G, P, Q, False))


# --------------------------------------------------------------------------------------------------- the module


@pytest.mark.parametrize(
    "m, n, expected",
    [
        (10, 5, [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]),
        (6, 4, [1, 1, 1, 0, 1, 0]),
        (5, None, [1, 0, 1, 0, 1]),
        (5, 2, [1, 0, 1, 0, 0]),
        (3, 3, [1, 1, 1]),
    ],
)
def test_input_state_rule(m, n, expected):
    assert default_input_state(m, n) == expected


@pytest.mark.parametrize("backend", FAST)
def test_kernel_properties(backend):
    k = PhotonicFidelityKernel(4, 10, n_photons=5, seed=3, dtype=torch.float64)
    x = torch.randn(23, 4, dtype=torch.float64)
    x[5] = x[2]
    K = k(x, backend=backend)
    assert K.shape == (23, 23)
    assert torch.allclose(K, K.T, atol=1e-14, rtol=0)
    assert torch.allclose(torch.diagonal(K), torch.ones(23, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (K[5] - K[2]).abs().max() < 1e-12
    assert torch.linalg.eigvalsh(K).min() > -1e-10
    assert ((K >= -1e-15) & (K <= 1 + 1e-12)).all()
    # depends on differences only
    assert (k(x + 0.7, backend=backend) - K).abs().max() < 1e-12
    y = torch.randn(6, 4, dtype=torch.float64)
    Kxy = k(x, y, backend=backend)
    assert Kxy.shape == (23, 6)
    assert (Kxy - k(y, x, backend=backend).T).abs().max() < 1e-13


def test_kernel_bunched_state_has_unit_diagonal():
    k = PhotonicFidelityKernel(3, 4, input_state=[2, 0, 1, 1], seed=1, dtype=torch.float64)
    K = k(torch.randn(5, 3, dtype=torch.float64))
    assert torch.allclose(torch.diagonal(K), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_kernel_dtypes():
    k = PhotonicFidelityKernel(3, seed=0)
    x = torch.randn(4, 3)
    assert k(x).dtype == torch.float32
    assert k(x.double()).dtype == torch.float64
    assert PhotonicFidelityKernel(3, seed=0, dtype=torch.float64)(x).dtype == torch.float64
    assert (k(x).double() - k(x.double())).abs().max() < 1e-5


def test_kernel_seeded_and_saved():
    a, b = PhotonicFidelityKernel(4, 6, seed=5), PhotonicFidelityKernel(4, 6, seed=5)
    assert torch.equal(a.unitary, b.unitary)
    c = PhotonicFidelityKernel(4, 6, seed=6)
    assert not torch.equal(a.unitary, c.unitary)
    eye = torch.eye(6, dtype=torch.complex128)
    assert (a.unitary @ a.unitary.conj().T - eye).abs().max() < 1e-13
    c.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(c(x), a(x))
    # the input state is part of the saved state too
    d = PhotonicFidelityKernel(4, 6, input_state=[2, 0, 1, 0, 0, 1], seed=7)
    c.load_state_dict(d.state_dict())
    assert c.n_photons == 4 and c.rows == [0, 0, 2, 5] and c.normalisation == 2.0
    assert torch.equal(c(x), d(x))


@pytest.mark.parametrize("backend", FAST)
def test_kernel_gradcheck(backend):
    k = PhotonicFidelityKernel(3, 5, n_photons=2, seed=2, dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: k(a, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda a, b: k(a, b, backend=backend), (x, y))


@pytest.mark.parametrize("backend", FAST)
def test_kernel_grad_matches_naive(backend):
    k = PhotonicFidelityKernel(4, 7, input_state=[2, 0, 1, 0, 1, 0, 0], seed=4, dtype=torch.float64)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 9, dtype=torch.float64)
    (g,) = torch.autograd.grad((k(x, backend=backend) * w).sum(), (x,))
    (g_ref,) = torch.autograd.grad((k(x, backend="reference") * w).sum(), (x,))
    assert relative_error(g, g_ref) < 1e-8


def test_kernel_bad_input():
    with pytest.raises(ValueError, match="n_modes"):
        PhotonicFidelityKernel(4, 3)
    with pytest.raises(ValueError, match="n_photons"):
        PhotonicFidelityKernel(4, 10, n_photons=11)
    with pytest.raises(ValueError, match="n_photons"):
        PhotonicFidelityKernel(4, 10, n_photons=0)
    with pytest.raises(ValueError, match="n_photons"):
        PhotonicFidelityKernel(2, 3, input_state=[1, 1, 0], n_photons=3)
    with pytest.raises(ValueError, match="input_state"):
        PhotonicFidelityKernel(2, 3, input_state=[1, 0])
    with pytest.raises(ValueError, match="input_state"):
        PhotonicFidelityKernel(2, 3, input_state=[1, -1, 1])
    with pytest.raises(ValueError, match="input_state"):
        PhotonicFidelityKernel(2, 3, input_state=[0, 0, 0])
    with pytest.raises(ValueError, match="12"):
        PhotonicFidelityKernel(4, 14, n_photons=13)
    with pytest.raises(ValueError, match="12"):
        PhotonicFidelityKernel(2, 3, input_state=[7, 6, 0])
    with pytest.raises(ValueError, match="input_size"):
        PhotonicFidelityKernel(0)
    k = PhotonicFidelityKernel(4, seed=0)
    with pytest.raises(ValueError, match="input_size=4"):
        k(torch.randn(5, 3))
    with pytest.raises(ValueError, match="input_size=4"):
        k(torch.randn(5, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="x"):
        k(torch.randn(4))
    with pytest.raises(TypeError, match="x"):
        k(torch.ones(3, 4, dtype=torch.long))


def test_kernel_in_fidelity_functions():
    k = PhotonicFidelityKernel(4, 6, seed=1, dtype=torch.float64)
    s = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(10, 4, dtype=torch.float64)
    assert torch.equal(qrkd.fidelity_kernel_matrix(t, kernel=k), k(t))
    loss = qrkd.fidelity_kernel_loss(s, t, kernel=k)
    expected = torch.nn.functional.smooth_l1_loss(k(s[:, :4]), k(t))
    assert abs(loss.item() - expected.item()) < 1e-14
    (g,) = torch.autograd.grad(loss, (s,))
    assert g[:, :4].abs().max() > 0 and g[:, 4:].abs().max() == 0


# ------------------------------------------------------------------------------------------- against MerLin itself


def _merlin_kernel(d, m, n, *, state=None, scale=1.0, dtype=torch.float64):
    torch.manual_seed(1000 * d + (m or 0) + (n or 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = merlin.FeatureMap.simple(input_size=d, n_modes=m, dtype=dtype, angle_encoding_scale=scale)
        return merlin.FidelityKernel(fm, input_state=state, n_photons=n, force_psd=False, dtype=dtype)


@needs_merlin
@pytest.mark.parametrize(
    "d, m, n, state, scale",
    [
        (4, None, None, None, 1.0),
        (4, 10, 5, None, 1.0),
        (3, 6, 4, None, 1.0),
        (2, 5, 1, None, 1.0),
        (1, 3, 3, None, 1.0),
        (3, 4, None, [2, 0, 1, 0], 1.0),
        (3, 5, None, None, 0.37),
    ],
)
def test_matches_merlin(d, m, n, state, scale):
    mk = _merlin_kernel(d, m, n, state=state, scale=scale)
    k = PhotonicFidelityKernel.from_merlin(mk)
    assert k.input_state.tolist() == list(mk.input_state)
    g = torch.Generator().manual_seed(d)
    x = torch.rand(7, d, generator=g, dtype=torch.float64) * 6 - 3
    y = torch.rand(4, d, generator=g, dtype=torch.float64) * 6 - 3
    with torch.no_grad():
        K_ref, Kxy_ref = mk(x), mk(x, y)
    for backend in FAST:
        assert (k(x, backend=backend) - K_ref).abs().max() < 1e-10
        assert (k(x, y, backend=backend) - Kxy_ref).abs().max() < 1e-10
        assert (k(x.float(), backend=backend).double() - K_ref).abs().max() < 5e-5
    # the reference backend and the module's own construction rule agree with MerLin's state rule
    assert (k(x, backend="reference") - K_ref).abs().max() < 1e-10
    if state is None:
        assert PhotonicFidelityKernel(d, m, n_photons=n, seed=0).input_state.tolist() == list(mk.input_state)


@needs_merlin
def test_matches_merlin_simple_float32():
    """FidelityKernel.simple as the seed builds it (float32, force_psd=True by default)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mk = merlin.FidelityKernel.simple(input_size=4, n_modes=10)
    k = PhotonicFidelityKernel.from_merlin(mk)
    assert k.dtype == torch.float32 and k.n_photons == 5
    x = torch.rand(6, 4) * 4 - 2
    with torch.no_grad():
        assert (k(x) - mk(x)).abs().max() < 5e-5


def test_from_merlin_rejects_other_objects():
    with pytest.raises(TypeError, match="FidelityKernel"):
        PhotonicFidelityKernel.from_merlin(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------- the seed's QRKD configuration


def _qk_term(crit, fs, ft):
    width = min(fs.shape[1], ft.shape[1])
    return qrkd.fidelity_kernel_loss(fs, ft, kernel=crit.kernel_for(width, fs.device))


def test_seed_qrkd_configuration_sends_student_gradient():
    torch.manual_seed(0)
    crit = qrkd.DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1, qk_backend="merlin", qk_n_modes=10, qk_n_photons=5)
    no_qk = qrkd.DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.0)
    logits_s, logits_t = torch.randn(12, 10, dtype=torch.float64), torch.randn(12, 10, dtype=torch.float64)
    fs = torch.rand(12, 4, dtype=torch.float64, requires_grad=True)
    ft = torch.rand(12, 31, dtype=torch.float64) * 2
    total = crit(logits_s, logits_t, fs, ft)
    assert set(crit.last_terms) == {"kd", "rkd_distance", "rkd_angle", "qk"}
    kernel = crit.kernels["4"]
    assert isinstance(kernel, PhotonicFidelityKernel) and kernel.n_modes == 10 and kernel.n_photons == 5
    (g_total,) = torch.autograd.grad(total, (fs,))
    (g_rest,) = torch.autograd.grad(no_qk(logits_s, logits_t, fs, ft), (fs,))
    g_qk = (g_total - g_rest) / 0.1
    assert g_qk.abs().max() > 1e-6
    # central finite differences of the qk term
    fd = torch.zeros_like(fs)
    h = 1e-6
    with torch.no_grad():
        for i in range(fs.shape[0]):
            for j in range(fs.shape[1]):
                e = torch.zeros_like(fs)
                e[i, j] = h
                fd[i, j] = (_qk_term(crit, fs + e, ft) - _qk_term(crit, fs - e, ft)) / (2 * h)
    assert (g_qk - fd).abs().max() <= 1e-7 + 1e-5 * fd.abs().max()
    # the teacher side gets no gradient and the kernel is built once per width
    ft.requires_grad_()
    crit(logits_s, logits_t, fs, ft).backward()
    assert ft.grad is None or ft.grad.abs().max() == 0
    assert list(crit.kernels) == ["4"]


def test_distillation_kernel_is_seeded():
    a = qrkd.DistillationLoss(qk=0.1, qk_backend="merlin", qk_n_modes=10, qk_n_photons=5, qk_seed=3)
    b = qrkd.DistillationLoss(qk=0.1, qk_backend="merlin", qk_n_modes=10, qk_n_photons=5, qk_seed=3)
    assert torch.equal(a.kernel_for(4, "cpu").unitary, b.kernel_for(4, "cpu").unitary)


@needs_merlin
def test_distillation_from_merlin_matches_merlin_kernel():
    crit = qrkd.DistillationLoss(qk=0.1, qk_backend="merlin", qk_n_modes=6, qk_n_photons=3, qk_from_merlin=True)
    k = crit.kernel_for(3, "cpu")
    torch.manual_seed(crit.qk_seed + 3)  # the rule _build_photonic_kernel uses
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = merlin.FeatureMap.simple(input_size=3, n_modes=6, dtype=torch.float64)
        mk = merlin.FidelityKernel(fm, n_photons=3, force_psd=False, dtype=torch.float64)
    x = torch.rand(5, 3, dtype=torch.float64)
    with torch.no_grad():
        assert (k(x.double()) - mk(x)).abs().max() < 1e-10


# ------------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1, 2, 5, 8, 12])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_cuda_op_matches_cpu(n, dtype):
    from qrkd.backends import cpp

    if not cpp.has_cuda_kernels():
        pytest.skip("qrkd._C was built without CUDA kernels")
    N, M, m = (37, 19, n + 2) if n <= 8 else (5, 3, n)
    P, Q = make_matrices(N, n, m, dtype=dtype, seed=n), make_matrices(M, n, m, dtype=dtype, seed=50 + n)
    rtol = 1e-10 if dtype == torch.complex128 else 1e-5
    for q in (None, Q):
        w = torch.randn(N, N if q is None else M, dtype=torch.float64).to(P.real.dtype)
        k_cpu, g_cpu = matrix_grads(lambda p, qq: qrkd.photonic_fidelity(p, qq, backend="cpp"), P, q, w)
        k_gpu, g_gpu = matrix_grads(
            lambda p, qq: qrkd.photonic_fidelity(p, qq, backend="cpp"),
            P.cuda(),
            None if q is None else q.cuda(),
            w.cuda(),
        )
        assert k_gpu.is_cuda and relative_error(k_gpu.cpu(), k_cpu) < rtol
        for a, b in zip(g_gpu, g_cpu):
            assert relative_error(a.cpu(), b) < 10 * rtol


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_module_matches_cpu():
    k = PhotonicFidelityKernel(4, 10, n_photons=5, seed=0, dtype=torch.float64)
    x = torch.randn(300, 4, dtype=torch.float64)
    K = k(x)
    K_gpu = k.cuda()(x.cuda())
    assert (K_gpu.cpu() - K).abs().max() < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_photonic_loss_without_grad_is_the_same_mean(dtype):
    # under no_grad the loss's smooth_l1 over the N x N entries runs in chunks of 2^20 (N = 1100: two chunks, the
    # second partial); it must be the value autograd's path gives
    from qrkd.functional import _smooth_l1_mean_no_grad

    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(1100, 1100, generator=g, dtype=dtype), torch.randn(1100, 1100, generator=g, dtype=dtype)
    got, want = _smooth_l1_mean_no_grad(a, b), torch.nn.functional.smooth_l1_loss(a, b)
    assert got.dtype == dtype and abs(got.item() - want.item()) <= (1e-6 if dtype == torch.float32 else 1e-13) * want
    kernel = qrkd.PhotonicFidelityKernel(3, 5, n_photons=2, seed=1, dtype=dtype)
    s, t = torch.randn(40, 3, generator=g, dtype=dtype), torch.randn(40, 3, generator=g, dtype=dtype)
    with_grad = qrkd.fidelity_kernel_loss(s, t, kernel=kernel, backend="torch")
    with torch.no_grad():
        without = qrkd.fidelity_kernel_loss(s, t, kernel=kernel, backend="torch")
    assert abs(without.item() - with_grad.item()) <= (1e-6 if dtype == torch.float32 else 1e-13) * with_grad.item()
