"""Pure torch, O(N^2) memory for every relation: the portable fallback (backend "torch").

The angle loss uses the law of cosines on pairwise squared distances (DESIGN.md 3.3), walks the anchors in chunks so
that no N^3 tensor exists, and recomputes in backward instead of saving intermediates. Every long loop works in
chunks of a few million elements, so that Python's Ctrl-C handler runs between them.

Double backward: the distance and classical fidelity losses are plain torch and the photonic backward recomputes under
autograd, so all three differentiate twice; the angle backward (chunked, in place) refuses with a clear error.
"""

import torch
import torch.nn.functional as F

from .autograd_limits import fused_backward, vmap_refusal

# the classical fidelity kernel (normalise, one GEMM, square) is O(N^2) in eager torch already: the reference serves
from .reference import fidelity_kernel_loss, fidelity_kernel_matrix  # noqa: F401

EPS = 1e-12
# elements of one anchor chunk (chunk x N x N); about a dozen such temporaries are alive at once
_CHUNK_ELEMENTS = 1 << 22


def status():
    return True, "pure torch, O(N^2) memory"


def supports(op, device_type, dtype):
    if op == "photonic_fidelity":
        return dtype in (torch.complex64, torch.complex128)
    return dtype in (torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------------- distance


# a pair whose Gram formula cancels below this fraction of |x_i|^2 + |x_j|^2 is summed again from differences
_GRAM_REFINE = 0.125


def squared_distances_gram(x):
    """|x_i - x_j|^2 from the Gram matrix of the centred features, with an exact zero diagonal. The pairs where the
    formula cancels (duplicate and nearly coincident rows) take their value from differences: a GEMM does not promise
    equal entries for equal rows, and the cancellation costs close pairs their digits. Their gradient stays the Gram
    formula's (the same function)."""
    xc = x - x.mean(dim=0, keepdim=True)
    gram = xc @ xc.t()
    sq = gram.diagonal()
    norms = sq.unsqueeze(1) + sq.unsqueeze(0)
    q = norms - 2.0 * gram
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    q = torch.where(eye, q * 0.0, q)  # 0, or NaN for a non-finite row (as the reference)
    return q + _refinement(xc.detach(), q.detach(), norms.detach())


@torch.no_grad()
def _refinement(xc, q, norms):
    """0, except for the pairs i < j with q_ij < _GRAM_REFINE (|x_i|^2 + |x_j|^2): there (and at j, i), the sum of
    squared differences minus q_ij (minus q_ji)."""
    i, j = torch.nonzero(torch.triu(q < _GRAM_REFINE * norms, diagonal=1), as_tuple=True)
    fix = torch.zeros_like(q)
    step = max(1, _CHUNK_ELEMENTS // xc.shape[1])
    for start in range(0, len(i), step):
        a, b = i[start : start + step], j[start : start + step]
        exact = (xc[a] - xc[b]).pow(2).sum(dim=1)
        fix[a, b] = exact - q[a, b]
        fix[b, a] = exact - q[b, a]  # a GEMM is not bitwise symmetric either
    return fix


def normalised_distances(x, zero_diagonal):
    d = squared_distances_gram(x).clamp(min=EPS).sqrt()
    if zero_diagonal:
        eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
        d = torch.where(eye, d * 0.0, d)
    positive = d > 0
    count = positive.sum()
    if count == 0:
        return d * 0.0
    mu = torch.where(positive, d, torch.zeros_like(d)).sum() / count + EPS
    return d / mu


def rkd_distance_loss(student, teacher, zero_diagonal=False):
    with torch.no_grad():
        t = normalised_distances(teacher, zero_diagonal)
    return F.smooth_l1_loss(normalised_distances(student, zero_diagonal), t)


# ------------------------------------------------------------------------------------------------------------- angle


def squared_distances_exact(x):
    """|x_i - x_j|^2 summed from differences: exact duplicates give exactly 0, close points stay accurate. In float64
    whatever x's dtype: the law of cosines' q_ab + q_ac - q_bc cancels to ~d_ab d_ac when d_ab << d_ac (near-duplicate,
    collinear and one-dimensional points), which float32 squared distances cannot resolve."""
    x = x.double()
    n = x.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // n)  # row blocks of a few million pairs (one block up to N = 2048)
    if rows >= n:
        return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    q = x.new_empty((n, n))
    for start in range(0, n, rows):
        block = torch.cdist(x[start : start + rows], x, compute_mode="donot_use_mm_for_euclid_dist")
        torch.pow(block, 2, out=q[start : start + rows])
    return q


def _inverse(d):
    return torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _angles(q, half_inv_d, rows):
    """Angles of the anchors `rows`: A[a, b, c] = (q_ab + q_ac - q_bc) r_abc with r_abc = 1 / (2 d_ab d_ac), 0 where
    either distance is 0. half_inv_d = sqrt(1/2) / d (0 where d = 0). Returns (A, r), both chunk x N x N."""
    qa, ha = q[rows], half_inv_d[rows]
    r = ha.unsqueeze(2) * ha.unsqueeze(1)
    angles = torch.add(qa.unsqueeze(2), qa.unsqueeze(1)).sub_(q.unsqueeze(0)).to(r.dtype).mul_(r)
    return angles, r


def angle_pass(qs, qt, want_grad, anchor_start=0, anchor_stop=None, dtype=None):
    """Sum of smooth_l1 over the triplets whose anchor is in [anchor_start, anchor_stop) (default: all N^3) and, if
    asked, G = d(sum)/dq_s (N x N, ordered pairs). The numerators q_ab + q_ac - q_bc are formed in q's precision, the
    rest of the triplet work in `dtype` (default q's); the sum and G accumulate in q's precision."""
    n = qs.shape[0]
    anchor_stop = n if anchor_stop is None else anchor_stop
    half = 0.5**0.5
    dtype = qs.dtype if dtype is None else dtype
    hs, ht = (_inverse(qs.sqrt()) * half).to(dtype), (_inverse(qt.sqrt()) * half).to(dtype)
    chunk = max(1, min(n, _CHUNK_ELEMENTS // (n * n)))
    total = qs.new_zeros(())
    grad = torch.zeros_like(qs) if want_grad else None
    for start in range(anchor_start, anchor_stop, chunk):
        rows = slice(start, min(start + chunk, anchor_stop))
        a_s, r = _angles(qs, hs, rows)
        a_t, _ = _angles(qt, ht, rows)
        if not want_grad:
            total = total + F.smooth_l1_loss(a_s, a_t, reduction="sum")
            continue
        g = a_t.neg_().add_(a_s).clamp_(-1.0, 1.0)  # d smooth_l1(u) / du, u = A_s - A_t
        inv_q = 2.0 * hs[rows] * hs[rows]  # 1 / q_ab
        gr = g.mul(r)  # zero wherever the student's d_ab or d_ac is 0: no gradient there
        # dA/dq_ab = r - A / (2 q_ab); the b<->c symmetry doubles the q_ab term into the q_ac one
        grad[rows] += 2.0 * gr.sum(dim=2) - inv_q * g.mul_(a_s).sum(dim=2)
        grad -= gr.sum(dim=0)  # dA/dq_bc = -r
    return total, grad


def grad_from_pair_grad(x, grad_q):
    """dL/dx from dL/dq for q_uv = |x_u - x_v|^2 over ordered pairs: dx_u = 2 sum_v (G_uv + G_vu)(x_u - x_v), in
    grad_q's precision on centred x (translation invariant; rowsum(H) x_u - (H x)_u cancels less), in x's dtype."""
    h = grad_q + grad_q.t()
    xc = x.to(h.dtype)
    xc = xc - xc.mean(dim=0, keepdim=True)
    return (2.0 * (h.sum(dim=1, keepdim=True) * xc - h @ xc)).to(x.dtype)


class _AngleLoss(torch.autograd.Function):
    vmap = vmap_refusal("torch", "rkd_angle_loss")

    @staticmethod
    def forward(student, teacher, anchor_start, anchor_stop):
        qs, qt = squared_distances_exact(student), squared_distances_exact(teacher)
        total, _ = angle_pass(qs, qt, False, anchor_start, anchor_stop, student.dtype)
        return (total / float(student.shape[0]) ** 3).to(student.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, anchor_start, anchor_stop = inputs
        ctx.save_for_backward(student, teacher)
        ctx.anchors = (anchor_start, anchor_stop)

    @staticmethod
    def backward(ctx, grad_output):
        anchors = ctx.anchors

        def compute(student, teacher, grad_output):
            qs, qt = squared_distances_exact(student), squared_distances_exact(teacher)
            _, grad_q = angle_pass(qs, qt, True, *anchors, student.dtype)
            scale = grad_output / float(student.shape[0]) ** 3
            return grad_from_pair_grad(student, grad_q) * scale

        grad = fused_backward(compute, (*ctx.saved_tensors, grad_output), "torch", "rkd_angle_loss")
        return grad, None, None, None


def rkd_angle_loss(student, teacher, anchor_start=0, anchor_stop=None):
    return _AngleLoss.apply(student, teacher, anchor_start, student.shape[0] if anchor_stop is None else anchor_stop)


# ------------------------------------------------------------------------------------------------ photonic fidelity

# pair elements of one chunk (pairs x n x 2^n complex row sums); a few such temporaries are alive at once
_PHOTONIC_CHUNK_ELEMENTS = 1 << 22


def _ryser_tables(n, dtype, device):
    """The 2^n - 1 non-empty column subsets as a 0/1 matrix (subsets x n) and Ryser's signs (-1)^(n - |S|)."""
    masks = torch.arange(1, 1 << n, device=device)
    member = (masks.unsqueeze(1) >> torch.arange(n, device=device)) & 1
    signs = 1.0 - 2.0 * ((n - member.sum(dim=1)) % 2)
    return member.to(dtype), signs.to(dtype)


def _pair_kernel(P, Q, member, signs):
    """|Perm(P_i Q_j^H)|^2 for every pair of a chunk: Ryser over all subsets at once (rows sums as one matmul)."""
    a = torch.einsum("iak,jbk->ijab", P, Q.conj())  # rows x M x n x n
    row_sums = a @ member.t()  # rows x M x n x subsets
    perm = row_sums.prod(dim=-2) @ signs
    return perm.real.square() + perm.imag.square()


def _photonic_steps(P, Q):
    """(rows, columns) of one chunk of pairs, so that a chunk holds about _PHOTONIC_CHUNK_ELEMENTS row sums."""
    per_pair = P.shape[1] * (1 << P.shape[1])
    cols = max(1, min(Q.shape[0], _PHOTONIC_CHUNK_ELEMENTS // per_pair))
    rows = max(1, _PHOTONIC_CHUNK_ELEMENTS // (per_pair * cols))
    return rows, cols


class _PhotonicFidelity(torch.autograd.Function):
    """Chunks of pairs; backward recomputes each chunk under autograd instead of keeping the subset tables. Under
    create_graph=True the recomputation stays on the graph of P, Q and the incoming gradient, which makes the backward
    itself differentiable: double backward is exact."""

    vmap = vmap_refusal("torch", "photonic_fidelity")

    @staticmethod
    def forward(P, Q):
        member, signs = _ryser_tables(P.shape[1], P.dtype, P.device)
        rows, cols = _photonic_steps(P, Q)
        out = P.real.new_empty((P.shape[0], Q.shape[0]))
        for i in range(0, P.shape[0], rows):
            for j in range(0, Q.shape[0], cols):
                out[i : i + rows, j : j + cols] = _pair_kernel(P[i : i + rows], Q[j : j + cols], member, signs)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        P, Q = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()
        member, signs = _ryser_tables(P.shape[1], P.dtype, P.device)
        rows, cols = _photonic_steps(P, Q)
        want_p, want_q = ctx.needs_input_grad[:2]
        # per block of rows of P (of Q), the sum of its chunks' gradients, added out of place (safe on the graph)
        blocks_p, blocks_q = {}, {}
        for i in range(0, P.shape[0], rows):
            for j in range(0, Q.shape[0], cols):
                with torch.enable_grad():
                    p, q = P[i : i + rows], Q[j : j + cols]
                    if not create_graph:
                        p, q = p.detach().requires_grad_(want_p), q.detach().requires_grad_(want_q)
                    k = _pair_kernel(p, q, member, signs)
                    inputs = [t for t, w in ((p, want_p), (q, want_q)) if w]
                    grads = torch.autograd.grad(
                        k, inputs, grad[i : i + rows, j : j + cols], create_graph=create_graph
                    )
                if want_p:
                    blocks_p[i] = blocks_p[i] + grads[0] if i in blocks_p else grads[0]
                if want_q:
                    blocks_q[j] = blocks_q[j] + grads[-1] if j in blocks_q else grads[-1]
        grad_p = torch.cat([blocks_p[i] for i in sorted(blocks_p)]) if want_p else None
        grad_q = torch.cat([blocks_q[j] for j in sorted(blocks_q)]) if want_q else None
        return grad_p, grad_q


def photonic_fidelity(P, Q=None):
    return _PhotonicFidelity.apply(P, P if Q is None else Q)
