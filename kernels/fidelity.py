"""Triton kernels of the classical ("simple") fidelity kernel (DESIGN.md 3.4).

psi_i = x_i / max(|x_i|, 1e-12), c = psi psi^T, K = c^2, loss = mean smooth_l1(K_s - K_t).
Backward: W = dL/dc = 2 c dL/dK; dpsi = (W + W^T) psi (common.pair_matmul_kernel);
dx_i = (dpsi_i - [|x_i| >= 1e-12] psi_i (psi_i . dpsi_i)) / max(|x_i|, 1e-12).
"""

import triton
import triton.language as tl

from .common import block_range, pair_matmul_kernel  # noqa: F401  (pair_matmul_kernel re-exported)

MODE_MATRIX = 0  # out = K
MODE_LOSS = 1  # part[pid] = sum smooth_l1(K_s - K_t) over the tile
MODE_GRAD_LOSS = 2  # out = W = 2 c_s clamp(K_s - K_t, -1, 1)
MODE_GRAD_MATRIX = 3  # out = W = 2 c gk


@triton.jit
def _row_columns(base, mask_n, k0, D, BLOCK_D: tl.constexpr):
    """Offsets and mask of the columns k0 .. k0 + BLOCK_D - 1 of the rows that start at offsets `base` (BLOCK_N x 1)."""
    cols, mask_d = block_range(k0, BLOCK_D, D)
    return base + cols[None, :], mask_n[:, None] & mask_d[None, :]


@triton.jit
def _row_dots(a_ptr, b_ptr, base, mask_n, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """sum_k a_ik b_ik for each of the rows that start at offsets `base`, in the data's precision."""
    acc = tl.zeros((BLOCK_N,), dtype=a_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_D):
        offs, m = _row_columns(base, mask_n, k0, D, BLOCK_D)
        acc += tl.sum(tl.load(a_ptr + offs, mask=m, other=0.0) * tl.load(b_ptr + offs, mask=m, other=0.0), axis=1)
    return acc


@triton.jit
def normalize_rows_kernel(x_ptr, psi_ptr, norm_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """norm_i = |x_i|, psi_i = x_i / max(norm_i, 1e-12)."""
    rows, mask_n = block_range(tl.program_id(0) * BLOCK_N, BLOCK_N, N)
    base = rows.to(tl.int64)[:, None] * D
    norm = tl.sqrt(_row_dots(x_ptr, x_ptr, base, mask_n, D, BLOCK_N, BLOCK_D))
    tl.store(norm_ptr + rows, norm, mask=mask_n)
    inv = 1.0 / tl.where(norm < 1e-12, 1e-12, norm)
    for k0 in range(0, D, BLOCK_D):
        offs, m = _row_columns(base, mask_n, k0, D, BLOCK_D)
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        tl.store(psi_ptr + offs, x * inv[:, None], mask=m)


@triton.jit
def normalize_rows_backward_kernel(
    psi_ptr, norm_ptr, dpsi_ptr, dx_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows, mask_n = block_range(tl.program_id(0) * BLOCK_N, BLOCK_N, N)
    base = rows.to(tl.int64)[:, None] * D
    dot = _row_dots(psi_ptr, dpsi_ptr, base, mask_n, D, BLOCK_N, BLOCK_D)
    norm = tl.load(norm_ptr + rows, mask=mask_n, other=1.0)
    # below the clamp psi = x / 1e-12 has no normalisation term
    dot = tl.where(norm >= 1e-12, dot, 0.0)
    inv = 1.0 / tl.where(norm < 1e-12, 1e-12, norm)
    for k0 in range(0, D, BLOCK_D):
        offs, m = _row_columns(base, mask_n, k0, D, BLOCK_D)
        psi = tl.load(psi_ptr + offs, mask=m, other=0.0)
        dpsi = tl.load(dpsi_ptr + offs, mask=m, other=0.0)
        tl.store(dx_ptr + offs, (dpsi - psi * dot[:, None]) * inv[:, None], mask=m)


@triton.jit
def fidelity_tile_kernel(
    ps_ptr,
    pt_ptr,
    gk_ptr,
    out_ptr,
    part_ptr,
    N,
    D,
    MODE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One BLOCK_I x BLOCK_J tile of c = psi psi^T (tl.dot in IEEE precision), then the MODE's elementwise tail.
    pt_ptr (the teacher's psi) is read in the loss modes only, gk_ptr (dL/dK) in MODE_GRAD_MATRIX only."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows_i, mask_i = block_range(pid_i * BLOCK_I, BLOCK_I, N)
    rows_j, mask_j = block_range(pid_j * BLOCK_J, BLOCK_J, N)
    base_i = rows_i.to(tl.int64)[:, None] * D
    base_j = rows_j.to(tl.int64)[None, :] * D
    cs = tl.zeros((BLOCK_I, BLOCK_J), dtype=ps_ptr.dtype.element_ty)
    ct = tl.zeros((BLOCK_I, BLOCK_J), dtype=ps_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_D):
        cols, mask_k = block_range(k0, BLOCK_D, D)
        mi = mask_i[:, None] & mask_k[None, :]
        mj = mask_k[:, None] & mask_j[None, :]
        a = tl.load(ps_ptr + base_i + cols[None, :], mask=mi, other=0.0)
        b = tl.load(ps_ptr + base_j + cols[:, None], mask=mj, other=0.0)  # BLOCK_D x BLOCK_J: psi_j^T
        cs += tl.dot(a, b, input_precision="ieee")
        if MODE == 1 or MODE == 2:
            a = tl.load(pt_ptr + base_i + cols[None, :], mask=mi, other=0.0)
            b = tl.load(pt_ptr + base_j + cols[:, None], mask=mj, other=0.0)
            ct += tl.dot(a, b, input_precision="ieee")
    mask = mask_i[:, None] & mask_j[None, :]
    offs = rows_i.to(tl.int64)[:, None] * N + rows_j[None, :]
    if MODE == 0:
        tl.store(out_ptr + offs, cs * cs, mask=mask)
    elif MODE == 1:
        u = cs * cs - ct * ct
        au = tl.abs(u)
        loss = tl.where(mask, tl.where(au < 1.0, 0.5 * u * u, au - 0.5), 0.0)
        tl.store(part_ptr + pid_i * tl.num_programs(1) + pid_j, tl.sum(loss).to(tl.float64))
    elif MODE == 2:
        u = cs * cs - ct * ct
        g = tl.where(u > 1.0, 1.0, tl.where(u < -1.0, -1.0, u))
        tl.store(out_ptr + offs, 2.0 * cs * g, mask=mask)
    else:
        gk = tl.load(gk_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, 2.0 * cs * gk, mask=mask)
