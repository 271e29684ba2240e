"""Triton kernel of the RKD angle loss (DESIGN.md 3.3): the triplet pass over squared distances, O(N^2) memory.

For an anchor a and points b, c, with q the squared distances (common.pairwise_sq_dist_kernel, from differences)
and i_ab = 1 / max(sqrt(q_ab), 1e-12) (0 where q_ab = 0: a coincident pair gives angle 0 and no gradient),
    A(a, b, c) = (q_ab + q_ac - q_bc) r_abc,   r_abc = i_ab i_ac / 2
which is e_ab . e_ac with the seed's clamped normalisation. With u = A_s - A_t and g = clamp(u, -1, 1):
    dA/dq_ab = r - A k_ab / 2  (k_ab = i_ab^2 where sqrt(q_ab) >= 1e-12, else 0: the clamped norm is constant)
    dA/dq_bc = -r
Each program owns one (b-tile, c-tile) pair with c-tile >= b-tile and a range of anchors; angle(a, b, c) =
angle(a, c, b), so an off-diagonal tile pair counts twice and the diagonal one once. The q_bc tiles stay in
registers across the anchors; the per-anchor rows q_a. are two short vector loads.

With WORK_F32, q is float64 (for float32 features) and only the numerators q_ab + q_ac - q_bc are formed in float64,
the rest of the triplet work in float32: the numerator cancels to ~d_ab d_ac when d_ab << d_ac (near-duplicate,
collinear and one-dimensional points), which float32 squared distances cannot resolve.
"""

import triton
import triton.language as tl


@triton.jit
def _inverse_distance(q):
    d = tl.sqrt(q)
    inv = tl.where(q > 0, 1.0 / tl.maximum(d, 1e-12), 0.0)
    k = tl.where(d >= 1e-12, inv * inv, 0.0)
    return inv, k


@triton.jit
def _work(x, WORK_F32: tl.constexpr):
    if WORK_F32:
        y = x.to(tl.float32)
    else:
        y = x
    return y


@triton.jit(do_not_specialize=["a_begin", "a_end"])
def angle_triplet_kernel(
    qs_ptr,
    qt_ptr,
    part_ptr,
    g_ptr,
    N,
    a_begin,
    a_end,
    BACKWARD: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK: tl.constexpr,
    WORK_F32: tl.constexpr = False,
):
    """Grid (anchor chunks of BLOCK_A in [a_begin, a_end), b-tiles, c-tiles); programs with c-tile < b-tile do
    nothing. Forward: part[pid] = this program's share of sum smooth_l1(u) (float64). Backward: atomically adds
    the program's contributions to G = d(sum smooth_l1)/dq_s (N x N, zero-initialised, float of the data)."""
    pid_a = tl.program_id(0)
    bt = tl.program_id(1)
    ct = tl.program_id(2)
    if ct >= bt:
        rows_b = bt * BLOCK + tl.arange(0, BLOCK)
        rows_c = ct * BLOCK + tl.arange(0, BLOCK)
        mask_b = rows_b < N
        mask_c = rows_c < N
        mask = mask_b[:, None] & mask_c[None, :]
        tile = rows_b.to(tl.int64)[:, None] * N + rows_c[None, :]
        qs_bc = tl.load(qs_ptr + tile, mask=mask, other=0.0)
        qt_bc = tl.load(qt_ptr + tile, mask=mask, other=0.0)
        weight = 2.0 - _work((bt == ct).to(qs_bc.dtype), WORK_F32)
        acc = _work(tl.zeros((BLOCK, BLOCK), dtype=qs_bc.dtype), WORK_F32)
        a0 = a_begin + pid_a * BLOCK_A
        a1 = tl.minimum(a0 + BLOCK_A, a_end)
        row0 = a0.to(tl.int64) * N
        for i in range(0, a1 - a0):
            row = row0 + i * N
            qs_ab = tl.load(qs_ptr + row + rows_b, mask=mask_b, other=0.0)
            qs_ac = tl.load(qs_ptr + row + rows_c, mask=mask_c, other=0.0)
            qt_ab = tl.load(qt_ptr + row + rows_b, mask=mask_b, other=0.0)
            qt_ac = tl.load(qt_ptr + row + rows_c, mask=mask_c, other=0.0)
            is_b, ks_b = _inverse_distance(qs_ab)
            is_c, ks_c = _inverse_distance(qs_ac)
            it_b, _ = _inverse_distance(qt_ab)
            it_c, _ = _inverse_distance(qt_ac)
            is_b, ks_b, it_b = _work(is_b, WORK_F32), _work(ks_b, WORK_F32), _work(it_b, WORK_F32)
            is_c, ks_c, it_c = _work(is_c, WORK_F32), _work(ks_c, WORK_F32), _work(it_c, WORK_F32)
            # masked rows and columns load q = 0, so their inverses and hence r and A are 0 on both sides
            r_s = (0.5 * is_b)[:, None] * is_c[None, :]
            a_s = _work(qs_ab[:, None] + qs_ac[None, :] - qs_bc, WORK_F32) * r_s
            a_t = _work(qt_ab[:, None] + qt_ac[None, :] - qt_bc, WORK_F32) * ((0.5 * it_b)[:, None] * it_c[None, :])
            u = a_s - a_t
            if BACKWARD:
                g = tl.where(u > 1.0, 1.0, tl.where(u < -1.0, -1.0, u))
                gr = g * r_s
                ga = g * a_s
                to_b = weight * (tl.sum(gr, axis=1) - 0.5 * ks_b * tl.sum(ga, axis=1))
                to_c = weight * (tl.sum(gr, axis=0) - 0.5 * ks_c * tl.sum(ga, axis=0))
                tl.atomic_add(g_ptr + row + rows_b, to_b, mask=mask_b)
                tl.atomic_add(g_ptr + row + rows_c, to_c, mask=mask_c)
                acc += gr
            else:
                au = tl.abs(u)
                acc += tl.where(au < 1.0, 0.5 * u * u, au - 0.5)
        if BACKWARD:
            tl.atomic_add(g_ptr + tile, -weight * acc, mask=mask)
        else:
            pid = (pid_a * tl.num_programs(1) + bt) * tl.num_programs(2) + ct
            tl.store(part_ptr + pid, (weight * tl.sum(acc)).to(tl.float64))
