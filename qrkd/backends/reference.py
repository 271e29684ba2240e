"""The oracle: the seed's formulas in eager torch, materialising every relation (DESIGN.md section 3).

Memory is O(N^2 D + N^3) for the angle loss; that is the point of comparison, not a bug. The one departure from the
seed is DESIGN.md 3.3's rule that an angle triplet whose anchor coincides with one of its other points contributes
its value 0 and no gradient. This module imports nothing of the package.
"""

import itertools

import torch
import torch.nn.functional as F

EPS = 1e-12


def status():
    return True, "eager torch, materialising (the oracle)"


def supports(op, device_type, dtype):
    return dtype in (torch.float32, torch.float64) or (op == "photonic_fidelity" and dtype.is_complex)


def pairwise_distances(x, zero_diagonal=False):
    """pd(X)_ij = sqrt(clamp(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12)), the seed's Gram formula.

    The diagonal is a point's distance to itself, 0 before the clamp: the seed's formula leaves the rounding of
    |x_i|^2 - x_i.x_i there, which for shifted float64 features exceeds 1e-12 and would move the truth itself.
    It is set as q_ii * 0 (and d_ii * 0 under zero_diagonal), not a constant, so that a NaN or inf row still makes the
    diagonal NaN: even at N = 1 non-finite features give a NaN loss.
    """
    sq = x.pow(2).sum(dim=1)
    q = sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.t())
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    d = torch.where(eye, q * 0.0, q).clamp(min=EPS).sqrt()
    if zero_diagonal:
        d = torch.where(eye, d * 0.0, d)
    return d


def _normalise_by_mean(d):
    positive = d[d > 0]
    if positive.numel() == 0:
        return d * 0.0
    return d / (positive.mean() + EPS)


def rkd_distance_loss(student, teacher, zero_diagonal=False):
    with torch.no_grad():
        t = _normalise_by_mean(pairwise_distances(teacher, zero_diagonal))
    s = _normalise_by_mean(pairwise_distances(student, zero_diagonal))
    return F.smooth_l1_loss(s, t)


def triplet_angles(x, anchor_start=0, anchor_stop=None):
    """The cosines e_ab . e_ac (flattened) of every triplet whose anchor a is in [anchor_start, anchor_stop) (default:
    all N^3), e_ab = (x_b - x_a) / max(|x_b - x_a|, 1e-12).

    A pair whose difference is exactly zero gives e_ab = 0 with no gradient (DESIGN.md 3.3): the seed's
    normalisation would differentiate 0 / 1e-12 there. A NaN difference is not zero: it stays NaN.
    """
    diff = x.unsqueeze(0) - x[anchor_start:anchor_stop].unsqueeze(1)  # diff[a, b] = x_b - x_a
    sq = diff.pow(2).sum(dim=2, keepdim=True)
    coincident = sq == 0
    norm = torch.where(coincident, torch.ones_like(sq), sq).sqrt().clamp(min=EPS)
    unit = torch.where(coincident, torch.zeros_like(diff), diff / norm)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def rkd_angle_loss(student, teacher, anchor_start=0, anchor_stop=None):
    """Mean of smooth_l1 over all N^3 triplets; with an anchor range, that range's share of the same mean (the sum of
    the shares over a partition of the anchors is the loss)."""
    with torch.no_grad():
        t = triplet_angles(teacher, anchor_start, anchor_stop)
    s = triplet_angles(student, anchor_start, anchor_stop)
    return F.smooth_l1_loss(s, t, reduction="sum") / float(len(student)) ** 3


def fidelity_kernel_matrix(x):
    """K_ij = (psi_i . psi_j)^2 with psi_i = x_i / max(|x_i|, 1e-12)."""
    psi = F.normalize(x, p=2, dim=1, eps=EPS)
    return (psi @ psi.t()).pow(2)


def fidelity_kernel_loss(student, teacher):
    with torch.no_grad():
        kt = fidelity_kernel_matrix(teacher)
    return F.smooth_l1_loss(fidelity_kernel_matrix(student), kt)


def permanent(a):
    """Perm of the last two (n x n) dimensions by its definition: the sum over all n! permutations."""
    n = a.shape[-1]
    perms = torch.tensor(list(itertools.permutations(range(n))), device=a.device)  # n! x n
    rows = torch.arange(n, device=a.device)
    picked = a[..., rows, perms]  # ... x n! x n: a[..., r, perm[r]]
    return picked.prod(dim=-1).sum(dim=-1)


def photonic_fidelity(P, Q=None):
    """K_ij = |Perm(P_i Q_j^H)|^2, materialising every n x n product and every permutation."""
    Q = P if Q is None else Q
    a = torch.einsum("iak,jbk->ijab", P, Q.conj())
    return permanent(a).abs().pow(2)
