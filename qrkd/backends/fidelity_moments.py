"""The classical fidelity loss (DESIGN.md 3.4) from k x k moments of the features' outer products, k = d (d + 1) / 2:
O(N d^4) work and no N x N tensor, where the kernels themselves take O(N^2 d). For narrow features (d = min(Ds, Dt),
4 at the seed's shape) at larger N, the torch and cpp backends take it instead of their N x N passes.

K lies in [0, 1] on both sides, so every u = K_s - K_t lies in [-1, 1], where smooth_l1(u) = u^2 / 2 and its
derivative is u itself: the loss is sum_ij u_ij^2 / (2 N^2). Let phi_i be psi_i (x) psi_i reduced to its k entries
a <= b, those off the diagonal times sqrt 2, so that phi_i . phi_j = (psi_i . psi_j)^2 = K_ij. With delta = phi_s -
phi_t and sigma = phi_s + phi_t (N x k), u_ij = (delta_i . sigma_j + sigma_i . delta_j) / 2, so sum u^2 = (<P, Q> +
tr(R^2)) / 2 with P = delta^T delta, Q = sigma^T sigma, R = sigma^T delta. One product gives all three: M = [delta,
sigma]^T [sigma, delta] = [[R^T, P], [Q, R]], and sum u^2 = tr(M^2) / 4. Every term is of the order of delta, so
nothing cancels when the student is close to the teacher. For the gradient of S = sum u^2: dS/dphi_s,i = 4 sum_j u_ij
phi_s,j = [sigma_i, delta_i] (M_left + M_right), then through phi (the outer product) and psi (the normalisation).
All of it in float64: the outer products of float32 features are exact there, and no float32 norm overflows (the
N x N passes and the reference give K = 0 for float32 rows beyond about 1e19, whose squared norm is inf in float32).
"""

import math

import torch

EPS = 1e-12


def cheaper(n, width):
    """Whether the moments' work per point, 6 d^2 k + 4 k^2 multiply-adds, is below the N x N passes' N (d + 16). The
    callers add their own smallest N, below which their pass is a handful of ops. In turns (two threads, forward): D =
    4, N = 384 189 us against the torch pass's 378, N = 4096 1.7 against 35.5 ms; D = 8, N = 768 622 against 937 us;
    D = 16, N = 4096 36 against 19 ms (not taken)."""
    k = width * (width + 1) // 2
    return n * (width + 16) >= 6 * width * width * k + 4 * k * k


_BASES = {}


def _basis(width, device):
    """(B, F), float64. B (2 d^2 x 3k) takes a row [psi_s (x) psi_s, psi_t (x) psi_t] to [delta, sigma, delta];
    F (k x d^2) takes a gradient in the k coordinates of phi to the d x d matrix G + G^T, G that of the outer
    product. Kept per (d, device), except while torch.compile traces (which would otherwise keep its own tensors)."""
    if torch.compiler.is_compiling():
        return _new_basis(width, device)
    key = (width, device)
    if key not in _BASES:
        with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the first call runs in
            _BASES[key] = _new_basis(width, device)
    return _BASES[key]


def _new_basis(width, device):
    rows, cols = torch.triu_indices(width, width)
    k = rows.numel()
    w = torch.full((k,), math.sqrt(2.0), dtype=torch.float64).masked_fill_(rows == cols, 1.0)
    e = torch.zeros(width * width, k, dtype=torch.float64)
    e[rows * width + cols, torch.arange(k)] = w
    b = torch.cat((torch.cat((e, e, e), 1), torch.cat((-e, e, -e), 1)), 0)
    f = torch.zeros(k, width * width, dtype=torch.float64)
    f[torch.arange(k), rows * width + cols] += w
    f[torch.arange(k), cols * width + rows] += w
    return b.to(device), f.to(device)


def unit_rows_backward(psi, norm, d_psi):
    """dL/dx from dL/dpsi (d_psi, overwritten) through psi = x / max(|x|, 1e-12), row by row: (dpsi - psi (psi .
    dpsi)) / |x|, and below the clamp dpsi / 1e-12 with no projection. norm holds |x| (N x 1). Shared with the torch
    backend's N x N pass."""
    along = (psi * d_psi).sum(dim=1, keepdim=True).mul_(norm > EPS)
    return d_psi.sub_(psi * along).div_(norm.clamp(min=EPS))


def loss_and_grad(student, teacher, want_grad):
    """(loss, dloss/dstudent or None), both in the student's dtype."""
    n, width = student.shape
    x = torch.stack((student, teacher), 1).double()
    norm = torch.linalg.vector_norm(x, dim=2, keepdim=True)
    psi = x.div_(norm.clamp(min=EPS))
    b, f = _basis(width, student.device)
    k = f.shape[0]
    z = (psi.unsqueeze(3) * psi.unsqueeze(2)).view(n, 2 * width * width) @ b
    swapped = z[:, k:]  # [sigma, delta]
    m = z[:, : 2 * k].t() @ swapped
    pairs = float(n) ** 2
    loss = (m * m.t()).sum().div_(8.0 * pairs).to(student.dtype)
    if not want_grad:
        return loss, None
    outer_grad = ((swapped @ (m[:, :k] + m[:, k:])) @ f).view(n, width, width)
    psi_s = psi[:, 0]
    d_psi = torch.bmm(outer_grad, psi_s.unsqueeze(2)).squeeze(2).div_(2.0 * pairs)
    return loss, unit_rows_backward(psi_s, norm[:, 0], d_psi).to(student.dtype)
