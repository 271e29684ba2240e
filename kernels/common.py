"""Triton kernels shared by the relations: pairwise squared distances and the pair-gradient products.

Both distance-based losses (RKD distance, RKD angle) are functions of q_uv = |x_u - x_v|^2. Their backward passes
reduce to a pairwise gradient matrix G = dL/dq and then dx_u = 2 sum_v (G_uv + G_vu)(x_u - x_v); the fidelity kernel
needs the same product without the Laplacian form, dpsi_u = sum_v (W_uv + W_vu) psi_v.
"""

import triton
import triton.language as tl


@triton.jit
def block_range(start, BLOCK: tl.constexpr, N):
    """The indices start .. start + BLOCK - 1 of a dimension of size N, and the mask of those below N."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < N


@triton.jit
def pairwise_sq_dist_kernel(
    x_ptr,
    q_ptr,
    stats_ptr,
    N,
    D,
    STATS: tl.constexpr,
    ZERO_DIAG: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """q[i, j] = sum_k (x[i, k] - x[j, k])^2 for a BLOCK_I x BLOCK_J tile, summed from differences so that exact
    duplicates give exactly 0 and close points keep their accuracy (no Gram cancellation).

    With STATS, also writes this tile's (sum of d over d > 0, count of d > 0) for d = sqrt(max(q, 1e-12)), the
    diagonal set to 0 when ZERO_DIAG: the two sums that give the RKD distance normaliser mu, to stats_ptr[2 * pid].
    """
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows_i, mask_i = block_range(pid_i * BLOCK_I, BLOCK_I, N)
    rows_j, mask_j = block_range(pid_j * BLOCK_J, BLOCK_J, N)
    base_i = rows_i.to(tl.int64) * D
    base_j = rows_j.to(tl.int64) * D
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=q_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_D):
        cols, mask_k = block_range(k0, BLOCK_D, D)
        xi = tl.load(x_ptr + base_i[:, None] + cols[None, :], mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        xj = tl.load(x_ptr + base_j[:, None] + cols[None, :], mask=mask_j[:, None] & mask_k[None, :], other=0.0)
        diff = xi[:, None, :] - xj[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    mask = mask_i[:, None] & mask_j[None, :]
    tl.store(q_ptr + rows_i.to(tl.int64)[:, None] * N + rows_j[None, :], acc, mask=mask)
    if STATS:
        d = tl.sqrt(tl.where(acc < 1e-12, 1e-12, acc))  # where, not maximum: NaN must propagate
        if ZERO_DIAG:
            d = tl.where(rows_i[:, None] == rows_j[None, :], 0.0, d)
        positive = mask & (d > 0)
        total = tl.sum(tl.where(positive, d, 0.0))
        count = tl.sum(positive.to(tl.float32))
        pid = pid_i * tl.num_programs(1) + pid_j
        tl.store(stats_ptr + 2 * pid, total.to(tl.float64))
        tl.store(stats_ptr + 2 * pid + 1, count.to(tl.float64))


@triton.jit
def pair_matmul_kernel(
    w_ptr,
    y_ptr,
    out_ptr,
    N,
    D,
    LAPLACIAN: tl.constexpr,
    BLOCK_U: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """With H = W + W^T (W is N x N, y is N x D, both contiguous):
    LAPLACIAN: out_u = 2 sum_v H_uv (y_u - y_v) = 2 (rowsum(H)_u y_u - (H y)_u)   (dL/dx from dL/dq)
    otherwise: out_u = (H y)_u.
    Pass centred y in the Laplacian form: the result is translation invariant and centring avoids cancellation."""
    rows_u, mask_u = block_range(tl.program_id(0) * BLOCK_U, BLOCK_U, N)
    cols, mask_d = block_range(tl.program_id(1) * BLOCK_D, BLOCK_D, D)
    rows_u64 = rows_u.to(tl.int64)
    acc = tl.zeros((BLOCK_U, BLOCK_D), dtype=y_ptr.dtype.element_ty)
    rowsum = tl.zeros((BLOCK_U,), dtype=y_ptr.dtype.element_ty)
    for v0 in range(0, N, BLOCK_V):
        rows_v, mask_v = block_range(v0, BLOCK_V, N)
        rows_v64 = rows_v.to(tl.int64)
        m = mask_u[:, None] & mask_v[None, :]
        h = tl.load(w_ptr + rows_u64[:, None] * N + rows_v[None, :], mask=m, other=0.0)
        h += tl.load(w_ptr + rows_v64[None, :] * N + rows_u[:, None], mask=m, other=0.0)
        yv = tl.load(y_ptr + rows_v64[:, None] * D + cols[None, :], mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        acc += tl.dot(h, yv, input_precision="ieee")
        if LAPLACIAN:
            rowsum += tl.sum(h, axis=1)
    out_mask = mask_u[:, None] & mask_d[None, :]
    if LAPLACIAN:
        yu = tl.load(y_ptr + rows_u64[:, None] * D + cols[None, :], mask=out_mask, other=0.0)
        acc = 2.0 * (rowsum[:, None] * yu - acc)
    tl.store(out_ptr + rows_u64[:, None] * D + cols[None, :], acc, mask=out_mask)
