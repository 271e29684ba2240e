"""Triton kernels of the RKD distance loss (DESIGN.md 3.2): the elementwise tail and its reductions, fused.

The squared distances come from common.pairwise_sq_dist_kernel (with STATS, which also yields the sums that give the
normalisers mu). With d = sqrt(max(q, 1e-12)) (diagonal 0 under ZERO_DIAG), s = d_s / mu_s, t = d_t / mu_t,
u = s - t and g = clamp(u, -1, 1) = smooth_l1'(u):
    loss * N^2 = sum smooth_l1(u)
    dL/dd_ij * N^2 = g_ij / mu_s - [d_ij > 0] (sum_kl g_kl d_kl) / (mu_s^2 count_s)     (the second term: through mu_s)
    G_ij = dL/dq_ij = dL/dd_ij / (2 d_ij) where q_ij >= 1e-12 (and off the zeroed diagonal), else 0.
"""

import triton
import triton.language as tl

from .common import block_range, pair_matmul_kernel, pairwise_sq_dist_kernel  # noqa: F401  (the kernels re-exported)


@triton.jit
def distance_tail_kernel(
    qs_ptr,
    qt_ptr,
    mu_terms_ptr,
    part_ptr,
    g_ptr,
    N,
    BACKWARD: tl.constexpr,
    ZERO_DIAG: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """mu_terms = (1/mu_s, 1/mu_t, (sum g d_s) / (mu_s^2 count_s)), 1/mu = 0 where no entry is positive.
    Forward: part[2 pid] = sum smooth_l1(u) over the tile, part[2 pid + 1] = sum g d_s (kept for backward).
    Backward: writes the tile of G (unscaled: the caller applies grad_output / N^2)."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows_i, mask_i = block_range(pid_i * BLOCK_I, BLOCK_I, N)
    rows_j, mask_j = block_range(pid_j * BLOCK_J, BLOCK_J, N)
    mask = mask_i[:, None] & mask_j[None, :]
    offs = rows_i.to(tl.int64)[:, None] * N + rows_j[None, :]
    qs = tl.load(qs_ptr + offs, mask=mask, other=0.0)
    qt = tl.load(qt_ptr + offs, mask=mask, other=0.0)
    inv_s = tl.load(mu_terms_ptr)
    inv_t = tl.load(mu_terms_ptr + 1)
    # where-forms instead of maximum/minimum: on a GPU those drop NaN, and NaN features must give a NaN loss
    ds = tl.sqrt(tl.where(qs < 1e-12, 1e-12, qs))
    dt = tl.sqrt(tl.where(qt < 1e-12, 1e-12, qt))
    diag = rows_i[:, None] == rows_j[None, :]
    if ZERO_DIAG:  # d * 0, not 0: a non-finite row keeps its NaN diagonal (a NaN loss even at N = 1)
        ds = tl.where(diag, ds * 0.0, ds)
        dt = tl.where(diag, dt * 0.0, dt)
    u = ds * inv_s - dt * inv_t
    g = tl.where(u > 1.0, 1.0, tl.where(u < -1.0, -1.0, u))
    if BACKWARD:
        mu_term = tl.load(mu_terms_ptr + 2)
        dl_dd = g * inv_s - tl.where(ds > 0, mu_term, 0.0)
        grad = tl.where(qs >= 1e-12, dl_dd * 0.5 / tl.where(ds > 0, ds, 1.0), 0.0)
        if ZERO_DIAG:
            grad = tl.where(diag, 0.0, grad)
        tl.store(g_ptr + offs, grad, mask=mask)
    else:
        au = tl.abs(u)
        loss = tl.where(mask, tl.where(au < 1.0, 0.5 * u * u, au - 0.5), 0.0)
        gd = tl.where(mask, g * ds, 0.0)
        pid = pid_i * tl.num_programs(1) + pid_j
        tl.store(part_ptr + 2 * pid, tl.sum(loss).to(tl.float64))
        tl.store(part_ptr + 2 * pid + 1, tl.sum(gd).to(tl.float64))
