"""The cpp photonic op's tiled path (csrc/cpu/photonic.cpp): a tile's n x n blocks come from one matrix product and
the permanents are walked four pairs at a time, so sizes that end mid-tile or mid-block, the float32 products, one
photon and the photon limit, and duplicate or zero rows are checked here against the naive permutation formula or
a closed form, and so are inputs with columns shared by every matrix (computed once, not in the tile product)."""

import math

import pytest
import torch

import qrkd
from parity import check_photonic_float32, make_matrices, matrix_grads, relative_error
from qrkd.backends import reference

pytestmark = pytest.mark.skipif("cpp" not in qrkd.available_backends(), reason="the compiled extension is not built")


def cpp(p, q):
    return qrkd.photonic_fidelity(p, q, backend="cpp")


# N, M: rows that end inside a row tile (8 rows) and inside a four-pair block; M past one column tile (160 columns
# at n = 3 in float64)
@pytest.mark.parametrize("N, M", [(61, 200), (200, None), (9, 1), (1, 9)])
def test_tiles_match_naive_permanent_float64(N, M):
    n, m = 3, 7
    P = make_matrices(N, n, m, seed=N)
    Q = None if M is None else make_matrices(M, n, m, seed=1000 + M)
    weight = torch.randn(N, N if M is None else M, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k_ref, g_ref = matrix_grads(reference.photonic_fidelity, P, Q, weight)
    k, g = matrix_grads(cpp, P, Q, weight)
    assert relative_error(k, k_ref) < 1e-10
    for a, b in zip(g, g_ref):
        assert relative_error(a, b) < 1e-8


def test_symmetric_kernel_is_exactly_symmetric():
    K = cpp(make_matrices(37, 4, 6, seed=2), None)
    assert torch.equal(K, K.T)


# float32 products across column tiles (192 columns at n = 4): the float32 criterion of DESIGN.md section 6
@pytest.mark.parametrize("M", [None, 200])
def test_tiles_float32_criterion(M):
    N, n, m = 200 if M is None else 11, 4, 6
    P64 = make_matrices(N, n, m, seed=5)
    Q64 = None if M is None else make_matrices(M, n, m, seed=6)
    weight = torch.randn(N, N if M is None else M, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    check_photonic_float32(cpp, P64, Q64, weight)


def _rank_one_rows(N, n, m, seed):
    """P_i with every row equal to one vector v_i (|v_i| <= 1): then A = P_i Q_j^H has every entry c = v_i . v_j^*,
    Perm(A) = n! c^n, and every cofactor is (n-1)! c^(n-1)."""
    v = make_matrices(N, 1, m, seed=seed)[:, 0]
    v = v / v.abs().pow(2).sum(1, keepdim=True).sqrt().clamp_min(1.0)
    return v, v.unsqueeze(1).expand(N, n, m).contiguous()


@pytest.mark.parametrize("n", [1, 7, 8, 9, 12])  # complex64 walks in float up to n = 8, in double from 9
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_one_photon_and_the_photon_limit_closed_form(n, dtype):
    N, M, m = 11, 10, 12
    u, P = _rank_one_rows(N, n, m, seed=1)
    v, Q = _rank_one_rows(M, n, m, seed=2)
    weight = torch.randn(N, M, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    k_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    k, (gp, gq) = matrix_grads(cpp, P.to(dtype), Q.to(dtype), weight.to(k_dtype))
    c = u @ v.conj().T  # N x M
    perm = math.factorial(n) * c**n
    # a rank-one A is the hard case of the Gray-code walks: terms up to n^n |c|^n cancel down to n! |c|^n
    assert relative_error(k.double(), perm.abs() ** 2) < (1e-9 if k_dtype == torch.float64 else 2e-5)
    # dL/dP_i[a] = sum_j Y_ij[a, :] Q_j with Y_ij = 2 G_ij Perm conj(cofactor) in every entry, Q_j's rows all v_j
    y = 2 * weight * perm * (math.factorial(n - 1) * c ** (n - 1)).conj()
    gp_ref = (n * y @ v).unsqueeze(1).expand(N, n, m)
    gq_ref = (n * y.conj().T @ u).unsqueeze(1).expand(M, n, m)
    tol = 1e-8 if k_dtype == torch.float64 else 1e-4
    assert relative_error(gp.to(torch.complex128), gp_ref) < tol
    assert relative_error(gq.to(torch.complex128), gq_ref) < tol


def test_duplicate_and_zero_rows():
    P = make_matrices(19, 3, 5, seed=8)
    P[7] = P[2]
    P[11] = P[2]
    P[4] = 0
    weight = torch.randn(19, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    k_ref, g_ref = matrix_grads(reference.photonic_fidelity, P, None, weight)
    k, (g,) = matrix_grads(cpp, P, None, weight)
    assert relative_error(k, k_ref) < 1e-10 and relative_error(g, g_ref[0]) < 1e-8
    assert relative_error(k[7], k[2]) < 1e-13 and relative_error(k[11], k[2]) < 1e-13
    assert (k[4] == 0).all() and (g[4] == 0).all()


def _with_shared_columns(P, columns, value):
    """P with the given columns set, in every matrix, to value's (n x len(columns)): the structure of the photonic
    circuit's m - d modes without a phase, whose block of A_ij the cpp op computes once."""
    P = P.clone()
    P[:, :, columns] = value
    return P


# the shared block alone (every column shared), the seed circuit's split (4 of 10 vary), one varying column, and a
# column shared within P and within Q but with other values in each (so not shared between them)
@pytest.mark.parametrize("shared, m, q_differs", [([0, 1, 2, 3, 4], 5, False), ([4, 5, 6, 7, 8, 9], 10, False),
                                                  ([0, 2, 3, 5], 6, False), ([1, 4], 7, True)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_shared_columns_match_naive_permanent(shared, m, q_differs, symmetric):
    n, N, M = 4, 37, 29
    value = make_matrices(1, n, len(shared), seed=50)[0]
    P = _with_shared_columns(make_matrices(N, n, m, seed=51), shared, value)
    Q = None
    if not symmetric:
        Q = _with_shared_columns(make_matrices(M, n, m, seed=52), shared, -value if q_differs else value)
    weight = torch.randn(N, N if symmetric else M, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    k_ref, g_ref = matrix_grads(reference.photonic_fidelity, P, Q, weight)
    k, g = matrix_grads(cpp, P, Q, weight)
    assert relative_error(k, k_ref) < 1e-10
    for a, b in zip(g, g_ref):
        assert relative_error(a, b) < 1e-8
    if len(shared) == m and not q_differs:  # every A_ij is the shared block: K is one value
        assert relative_error(k, torch.full_like(k, k_ref[0, 0].item())) < 1e-12


@pytest.mark.parametrize("symmetric", [True, False])
def test_shared_columns_float32_criterion(symmetric):
    n, m, N, M = 5, 10, 70, 45
    value = make_matrices(1, n, 6, seed=60)[0]
    P64 = _with_shared_columns(make_matrices(N, n, m, seed=61), [4, 5, 6, 7, 8, 9], value)
    Q64 = None if symmetric else _with_shared_columns(make_matrices(M, n, m, seed=62), [4, 5, 6, 7, 8, 9], value)
    weight = torch.randn(N, N if symmetric else M, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    check_photonic_float32(cpp, P64, Q64, weight)


@pytest.mark.parametrize("row", [0, 5])
def test_a_nan_in_one_matrix_stays_in_its_pairs(row):
    # a column shared by every matrix but one, whose entry there is NaN: K is NaN in that matrix's row and column
    # only, and matches the naive formula elsewhere
    P = _with_shared_columns(make_matrices(9, 3, 5, seed=70), [3, 4], make_matrices(1, 3, 2, seed=71)[0])
    P[row, 1, 4] = complex("nan")
    others = [i for i in range(9) if i != row]
    k_ref = reference.photonic_fidelity(P[others], None)
    for k in (cpp(P, None), cpp(P, P.clone())):
        assert torch.isnan(k[row]).all() and torch.isnan(k[:, row]).all()
        assert relative_error(k[others][:, others], k_ref) < 1e-10
