"""Pure torch, O(N^2) memory for every relation: the portable fallback (backend "torch").

The angle loss walks the anchors in chunks so that no N^3 tensor exists; per side it forms the cosines as dot products
of unit difference vectors (a batched matmul, narrow features) or by the law of cosines on float64 squared distances
(wide features; DESIGN.md 3.3). When the loss will be differentiated, the same pass also forms the student gradient
(N x D, kept for backward), so forward+backward walks the triplets once; otherwise backward recomputes. The distance
loss sums small batches' squared distances from differences, larger ones from the Gram matrix with the cancelling
pairs refined, and forms its student gradient by hand in the forward. The classical fidelity loss forms the upper
triangle of its symmetric kernels in blocks of rows, with the student gradient in the same pass when it will be needed;
narrow features at larger N take the loss from small moment matrices instead (fidelity_moments.py): no N x N tensor.
Every long loop works in chunks of a few million elements, so that Python's Ctrl-C handler runs between them.

Double backward: the distance and fidelity losses' backward under create_graph=True and the photonic backward
recompute their formulas under autograd, so all three differentiate twice (torch.func transforms take those formulas
from the start); the angle backward (chunked, in place) refuses with a clear error.
"""

import torch
import torch.nn.functional as F

from . import fidelity_moments
from .autograd_limits import functorch_transforms_active, fused_backward, vmap_refusal

EPS = 1e-12
# elements of one anchor chunk (chunk x N x N); about a dozen such temporaries are alive at once
_CHUNK_ELEMENTS = 1 << 22
# the angle pass while one anchor's N x N fits: smaller chunks, whose temporaries glibc mostly hands back from its heap
# on the next call instead of mapping fresh pages (the seed's N = 128 forward: 1,238 page faults a call against 3,435 at
# _CHUNK_ELEMENTS; medians of three processes 11.9 ms against 17.6 ms; N = 512, Ds = 4, Dt = 31: 404-444 ms against
# 550-562 ms)
_ANGLE_SMALL_CHUNK_ELEMENTS = 1 << 19


def status():
    return True, "pure torch, O(N^2) memory"


def supports(op, device_type, dtype):
    if op == "photonic_fidelity":
        return dtype in (torch.complex64, torch.complex128)
    return dtype in (torch.float32, torch.float64)


class _LossWithGrad(torch.autograd.Function):
    """A loss whose forward forms its student gradient too, with fused(student, teacher, *options) -> (loss, grad);
    backward scales that gradient. Under create_graph=True backward differentiates graph(student, teacher, *options),
    the same loss as torch ops, so that double backward stays exact. torch.func transforms call `graph` from the start,
    which lets this Function keep the ctx-in-forward form: about 6 us a call, where setup_context's signature binding
    costs 23."""

    @staticmethod
    def forward(ctx, fused, graph, student, teacher, *options):
        loss, ctx.grad = fused(student, teacher, *options)
        ctx.graph, ctx.options = graph, options
        ctx.save_for_backward(student, teacher)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True
            student, teacher = ctx.saved_tensors
            with torch.enable_grad():
                loss = ctx.graph(student, teacher, *ctx.options)
                (grad,) = torch.autograd.grad(loss, student, grad_output, create_graph=True)
        else:
            grad = ctx.grad * grad_output
        return (None, None, grad, None) + (None,) * len(ctx.options)


def smooth_l1_terms_(a, b):
    """(smooth_l1(a - b), clamp(a - b, -1, 1)) elementwise, in place: the terms overwrite b, the clamp (smooth_l1's
    derivative) overwrites a. smooth_l1(u) = g (u - g / 2) with g = clamp(u, -1, 1): no temporaries of a's size."""
    u = torch.sub(a, b, out=b)
    g = torch.clamp(u, -1.0, 1.0, out=a)
    return u.sub_(g, alpha=0.5).mul_(g), g


# ---------------------------------------------------------------------------------------------------------- distance


# a pair whose Gram formula cancels below this fraction of |x_i|^2 + |x_j|^2 is summed again from differences
_GRAM_REFINE = 0.125
# up to this many N x N x D elements the squared distances are summed from differences outright (exact, and three ops
# where the Gram route takes a dozen: at small N the number of ops is the cost)
_DIFFERENCES_MAX_ELEMENTS = 1 << 16


def squared_distances(x):
    n, width = x.shape
    if n * n * width <= _DIFFERENCES_MAX_ELEMENTS:
        return (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=2)
    return squared_distances_gram(x)


def squared_distances_gram(x):
    """|x_i - x_j|^2 from the Gram matrix of the centred features, with an exact zero diagonal. The pairs where the
    formula cancels (duplicate and nearly coincident rows) take their value from differences: a GEMM does not promise
    equal entries for equal rows, and the cancellation costs close pairs their digits. Their gradient stays the Gram
    formula's (the same function). Few, fused torch ops: at small N their count is the cost."""
    xc = x - x.mean(dim=0, keepdim=True)
    sq_norms = xc.pow(2).sum(dim=1)
    norms = sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0)
    q = torch.addmm(norms, xc, xc.t(), alpha=-2.0)
    q.diagonal().mul_(0.0)  # 0, or NaN for a non-finite row (as the reference); addmm keeps no output for backward
    fix = _refinement(xc.detach(), q.detach(), norms.detach())
    return q if fix is None else q + fix


@torch.no_grad()
def _refinement(xc, q, norms):
    """None when no pair i < j has q_ij < _GRAM_REFINE (|x_i|^2 + |x_j|^2); else 0 except at those pairs: there (and at
    j, i), the sum of squared differences minus q_ij (minus q_ji). Overwrites norms (its caller is done with them)."""
    cancels = torch.lt(q, norms.mul_(_GRAM_REFINE)).triu_(1)  # the diagonal always qualifies: it stays exactly 0
    if not cancels.any():  # the usual case, in four cheap ops
        return None
    i, j = torch.nonzero(cancels, as_tuple=True)
    fix = torch.zeros_like(q)
    step = max(1, _CHUNK_ELEMENTS // xc.shape[1])
    for start in range(0, len(i), step):
        a, b = i[start : start + step], j[start : start + step]
        exact = (xc[a] - xc[b]).pow(2).sum(dim=1)
        fix[a, b] = exact - q[a, b]
        fix[b, a] = exact - q[b, a]  # a GEMM is not bitwise symmetric either
    return fix


def normalised_distances(x, zero_diagonal):
    q = squared_distances(x)
    in_place = not q.requires_grad  # no graph to keep: two N x N temporaries fewer for the allocator to fault in
    d = q.clamp_(min=EPS).sqrt_() if in_place else q.clamp(min=EPS).sqrt()
    if not zero_diagonal:
        # every entry is >= 1e-6 > 0 (or NaN, and then so is the loss): the mean of the positive ones is the mean
        mu = d.mean() + EPS
        return d.div_(mu) if in_place else d / mu
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    d = torch.where(eye, d * 0.0, d)
    mu, _, _ = _positive_mean(d)
    return d * 0.0 if mu is None else d / mu


def _positive_mean(d):
    """(mean of d's positive entries + EPS, the mask of those entries, their count); the mean is None when there are
    none (zero_diagonal's normalisation: the loss is then 0)."""
    positive = d > 0
    count = positive.sum()
    if count == 0:
        return None, positive, count
    return torch.where(positive, d, torch.zeros_like(d)).sum() / count + EPS, positive, count


def _distance_loss_graph(student, teacher, zero_diagonal):
    """The loss as differentiable torch ops (without gradient, under torch.func transforms and in double backward)."""
    with torch.no_grad():
        t = normalised_distances(teacher, zero_diagonal)
    return F.smooth_l1_loss(normalised_distances(student, zero_diagonal), t)


def distance_loss_and_grad(student, teacher, zero_diagonal):
    """The loss and its student gradient, the gradient by hand instead of through autograd's dozen nodes a side:
    with nd = d / mu and g = clamp(nd - nd_t, -1, 1) / N^2, dL/dd = g / mu - (sum g d / mu^2) dmu/dd, where dmu/dd is
    1 / N^2 (every entry counts in the mean) or, under zero_diagonal, 1 / count on the positive entries; through
    d = sqrt(max(q, 1e-12)): dL/dq = dL/dd / (2 d) where q >= 1e-12, 0 elsewhere (the diagonal)."""
    with torch.no_grad():
        nd_t = normalised_distances(teacher, zero_diagonal)
        n = student.shape[0]
        q = squared_distances(student)
        d = q.clamp(min=EPS).sqrt_()
        if zero_diagonal:
            d.diagonal().mul_(0.0)
            mu, positive, count = _positive_mean(d)
            if mu is None:
                return F.smooth_l1_loss(d * 0.0, nd_t), torch.zeros_like(student)
            d_mu = positive.to(d.dtype).div_(count)
        else:
            mu = d.mean() + EPS
            d_mu = 1.0 / float(n) ** 2
        nd = d / mu
        loss = F.smooth_l1_loss(nd, nd_t)
        g = torch.sub(nd, nd_t, out=nd_t).clamp_(-1.0, 1.0).div_(float(n) ** 2)
        weighted = (g * d).sum() / mu.square()
        d_d = g.div_(mu).sub_(weighted * d_mu)
        two_d = d.mul_(2.0)
        if zero_diagonal:
            two_d.diagonal().fill_(1.0)  # d_ii = 0 there; the mask below zeroes the diagonal's term
        d_q = d_d.div_(two_d).mul_(q >= EPS)
        return loss, grad_from_pair_grad(student, d_q)


def rkd_distance_loss(student, teacher, zero_diagonal=False):
    if functorch_transforms_active() or not (torch.is_grad_enabled() and student.requires_grad):
        return _distance_loss_graph(student, teacher, zero_diagonal)
    return _LossWithGrad.apply(distance_loss_and_grad, _distance_loss_graph, student, teacher, zero_diagonal)


# ------------------------------------------------------------------------------------------------------------- angle

# Two ways to the cosines of one side, chosen per side by its feature width (DESIGN.md 3.3):
# - "dot": e_ab . e_ac as a batched matmul of the anchor's unit difference vectors (the reference's formula, no
#   cancellation, O(N^3 D) flops in a GEMM, few passes over the N^3 cosines): faster while D is small;
# - "law of cosines": (q_ab + q_ac - q_bc) / (2 d_ab d_ac) from float64 squared distances, O(N^3) scalar work
#   whatever D, but more passes (some in float64): faster for wide features.
# Measured side by side on 2 CPU cores (N = 128, 256, 512): the dot form wins at D = 4, 31 and 128 (up to 2-3x), the
# law of cosines at D = 512 (2-3x).
_DOT_MAX_WIDTH = 128


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


class _AngleSide:
    """What one side (student or teacher) needs for the cosines of any anchor chunk: its features for the dot-product
    form, or its float64 squared distances and scaled inverse distances for the law of cosines."""

    def __init__(self, x, work_dtype):
        self.x = x
        self.dot = x.shape[1] <= _DOT_MAX_WIDTH
        if not self.dot:
            self.sq_dist = squared_distances_exact(x)
            # sqrt(1/2) / d, 0 where d = 0: a product of two is 1 / (2 d_ab d_ac)
            self.half_inv_dist = (_inverse(self.sq_dist.sqrt()) * 0.5**0.5).to(work_dtype)

    def angles(self, rows):
        """(A, aux): A[a, b, c] for the anchors `rows` (chunk x N x N, in x's dtype for the dot form, the work dtype
        for the law of cosines) and what the gradient of this side needs."""
        if self.dot:
            diff = self.x.unsqueeze(0) - self.x[rows].unsqueeze(1)  # diff[a, b] = x_b - x_a
            norm = torch.linalg.vector_norm(diff, dim=2, keepdim=True)
            # the reference's diff / max(|diff|, 1e-12) (0 where the points coincide; a NaN stays NaN), a division as
            # there: a one-dimensional unit is then exactly +-1, and its gradient's projection cancels exactly
            unit = diff.div_(norm.clamp(min=EPS))
            return torch.bmm(unit, unit.transpose(1, 2)), (unit, norm)
        q, h = self.sq_dist, self.half_inv_dist
        qa, ha = q[rows], h[rows]
        r = ha.unsqueeze(2) * ha.unsqueeze(1)  # 1 / (2 d_ab d_ac), 0 where either is 0
        # the numerator in float64, the rest in the work dtype
        angles = torch.add(qa.unsqueeze(2), qa.unsqueeze(1)).sub_(q.unsqueeze(0)).to(r.dtype).mul_(r)
        return angles, r


def angle_pass(student, teacher, want_grad, anchor_start=0, anchor_stop=None, work_dtype=None):
    """Sum of smooth_l1 over the triplets whose anchor is in [anchor_start, anchor_stop) (default: all N^3), in float64,
    and, if asked, its gradient in the student features (in the student's dtype, not yet divided by N^3)."""
    n, width = student.shape
    anchor_stop = n if anchor_stop is None else anchor_stop
    work_dtype = student.dtype if work_dtype is None else work_dtype
    s_side, t_side = _AngleSide(student, work_dtype), _AngleSide(teacher, work_dtype)
    widest = max(n, width if s_side.dot else 0, teacher.shape[1] if t_side.dot else 0)
    per_anchor = n * widest
    budget = _ANGLE_SMALL_CHUNK_ELEMENTS if per_anchor <= _ANGLE_SMALL_CHUNK_ELEMENTS else _CHUNK_ELEMENTS
    chunk = max(1, min(n, budget // per_anchor))
    total = torch.zeros((), dtype=torch.float64, device=student.device)
    grad_x = torch.zeros_like(student) if want_grad and s_side.dot else None
    grad_q = torch.zeros_like(s_side.sq_dist) if want_grad and not s_side.dot else None
    for start in range(anchor_start, anchor_stop, chunk):
        rows = slice(start, min(start + chunk, anchor_stop))
        a_s, aux = s_side.angles(rows)
        a_t, _ = t_side.angles(rows)
        a_t = a_t.to(a_s.dtype)
        if not want_grad or not s_side.dot:  # one fused pass (and one chunk-sized temporary)
            # huber_loss at delta 1 is smooth_l1 at beta 1, value for value; torch's CPU kernel of smooth_l1_loss ran
            # the seed's 128^3 triplets in 1.6-3.9 ms (medians of three processes), huber_loss in 1.5-1.7 ms
            total += F.huber_loss(a_s, a_t, reduction="sum", delta=1.0).double()
            if not want_grad:
                continue
            g = torch.sub(a_s, a_t, out=a_t).clamp_(-1.0, 1.0)  # the law-of-cosines gradient needs A_s again
        else:  # in place, no N^3 temporaries
            terms, g = smooth_l1_terms_(a_s, a_t)
            total += terms.sum().double()
        # g = d smooth_l1(u) / du, u = A_s - A_t: symmetric in b, c
        if s_side.dot:
            unit, norm = aux
            inv_norm = norm.clamp(min=EPS).reciprocal_().mul_(norm > 0)  # 0 where the points coincide: no gradient
            # A = U U^T per anchor: dL/dU = 2 g U; through U = diff / |diff|: (dU - U (U . dU)) / |diff| (below the
            # 1e-12 clamp U = diff / 1e-12: no projection)
            d_unit = torch.bmm(g, unit).mul_(2.0)
            along = (unit * d_unit).sum(dim=2, keepdim=True).mul_(norm >= EPS)
            d_diff = d_unit.sub_(unit.mul_(along)).mul_(inv_norm)
            grad_x += d_diff.sum(dim=0)  # diff[a, b] = x_b - x_a
            grad_x[rows] -= d_diff.sum(dim=1)
        else:
            r = aux
            inv_q = 2.0 * s_side.half_inv_dist[rows] ** 2  # 1 / q_ab
            gr = g.mul(r)  # zero wherever the student's d_ab or d_ac is 0: no gradient there
            # dA/dq_ab = r - A / (2 q_ab); the b<->c symmetry doubles the q_ab term into the q_ac one
            grad_q[rows] += 2.0 * gr.sum(dim=2) - inv_q * g.mul_(a_s).sum(dim=2)
            grad_q -= gr.sum(dim=0)  # dA/dq_bc = -r
    if grad_q is not None:
        grad_x = grad_from_pair_grad(student, grad_q)
    return total, grad_x


def grad_from_pair_grad(x, grad_q):
    """dL/dx from dL/dq for q_uv = |x_u - x_v|^2 over ordered pairs: dx_u = 2 sum_v (G_uv + G_vu)(x_u - x_v), in
    grad_q's precision on centred x (translation invariant; rowsum(H) x_u - (H x)_u cancels less), in x's dtype."""
    h = grad_q + grad_q.t()
    xc = x.to(h.dtype)
    xc = xc - xc.mean(dim=0, keepdim=True)
    return (2.0 * (h.sum(dim=1, keepdim=True) * xc - h @ xc)).to(x.dtype)


class _AngleLoss(torch.autograd.Function):
    """When the loss will be differentiated (grad mode on and a student that requires grad), the forward computes the
    student gradient in the same pass over the triplets and keeps it (N x D) for backward, instead of a second pass;
    otherwise the backward recomputes it. `store` carries it from forward to backward."""

    vmap = vmap_refusal("torch", "rkd_angle_loss")

    @staticmethod
    def forward(student, teacher, anchor_start, anchor_stop, store):
        want_grad = store is not None
        total, grad = angle_pass(student, teacher, want_grad, anchor_start, anchor_stop)
        if want_grad:
            store["grad"] = grad
        return (total / float(student.shape[0]) ** 3).to(student.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, anchor_start, anchor_stop, store = inputs
        ctx.save_for_backward(student, teacher)
        ctx.anchors = (anchor_start, anchor_stop)
        ctx.store = store

    @staticmethod
    def backward(ctx, grad_output):
        anchors, store = ctx.anchors, ctx.store

        def compute(student, teacher, grad_output):
            grad = store.get("grad") if store is not None else None
            if grad is None:
                _, grad = angle_pass(student, teacher, True, *anchors)
            return grad * (grad_output / float(student.shape[0]) ** 3)

        grad = fused_backward(compute, (*ctx.saved_tensors, grad_output), "torch", "rkd_angle_loss")
        return grad, None, None, None, None


def rkd_angle_loss(student, teacher, anchor_start=0, anchor_stop=None):
    store = {} if torch.is_grad_enabled() and student.requires_grad else None
    anchor_stop = student.shape[0] if anchor_stop is None else anchor_stop
    return _AngleLoss.apply(student, teacher, anchor_start, anchor_stop, store)


# ----------------------------------------------------------------------------------------------- fidelity (classical)
# The reference's formula is O(N^2) already; at small N the number of ops is its cost and at large N its GEMMs and
# N x N temporaries, so these take fewer of each.


class _SymmetricGram(torch.autograd.Function):
    """psi psi^T, whose backward is one product, (G + G^T) psi, where autograd's takes one per operand. The backward
    is torch ops on the saved input: differentiable again (double backward), and vmap derives its rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(psi):
        return psi @ psi.transpose(-1, -2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (psi,) = ctx.saved_tensors
        return (grad + grad.transpose(-1, -2)) @ psi


def _unit_rows(x):
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(EPS)


# from this many multiply-adds (N^2 D) on, the GEMM saved by _SymmetricGram's backward outweighs its Python overhead
_SYMMETRIC_GRAM_MIN = 1 << 22


def fidelity_kernel_matrix(x):
    """K_ij = (psi_i . psi_j)^2 with psi_i = x_i / max(|x_i|, 1e-12)."""
    psi = _unit_rows(x)
    n, width = x.shape[-2:]
    gram = _SymmetricGram.apply(psi) if n * n * width >= _SYMMETRIC_GRAM_MIN else psi @ psi.transpose(-1, -2)
    return gram.square()


def _fidelity_loss_graph(student, teacher):
    """The loss as differentiable torch ops (the route of torch.func transforms and of double backward)."""
    with torch.no_grad():
        k_t = fidelity_kernel_matrix(teacher)
    return F.smooth_l1_loss(fidelity_kernel_matrix(student), k_t)


# Gram entries (student and teacher together) of one block of rows of the loss's pass: 1 MiB of float32
_FIDELITY_BLOCK_ELEMENTS = 1 << 18
# without gradient the whole matrices serve up to N^2 = _FIDELITY_BLOCK_ELEMENTS (N = 512) unless N^2 D exceeds this:
# the blocks' upper triangle saves a quarter of the GEMM, but costs their ops and a lopsided first block (N = 384 takes
# 341 rows). In turns, forward, blocks against whole matrices (then summed by huber_loss): N = 384, D = 64 728 against 452 us (the reference 568),
# D = 512 (N^2 D = 75 M) 2537 against 2329 (2513); N = 448, D = 256 1708 against 1590; N = 512, D = 64 985 against 744;
# N = 512, D = 512 (134 M) 3548 against 3912, kept in blocks
_FIDELITY_WHOLE_FORWARD_WORK = 3 << 25


def fidelity_pass(student, teacher, want_grad):
    """(loss, dloss/dstudent or None) of the loss: the mean over the N^2 ordered pairs of smooth_l1(K_s - K_t).
    Below N = 363 (2 N^2 <= _FIDELITY_BLOCK_ELEMENTS; without gradient up to N = 512 unless N^2 D is large) it forms the
    whole matrices. u = K_s - K_t lies in [-1, 1], where smooth_l1(u) = u^2 / 2 and its derivative is u (as in
    fidelity_moments), so the loss is the sum of u^2, squared in place (a float32 dot product would be faster but 30x
    less accurate: 1.8e-6 against 6e-8 at N = 512, D = 128), and dS/dpsi_u = 4 sum_v u_uv G_uv psi_v for the sum S (G
    the student Gram). Beyond, narrow features take fidelity_moments where that costs less; the rest uses K's symmetry:
    the upper triangle only, in blocks of rows i0:i1 against the columns i0:N (their sums added in float64), a block's
    diagonal square counted once, the rest of it twice, each block's product adding its rows' gradient terms and,
    transposed, its columns' beyond the square."""
    n, width = student.shape
    if 2 * n * n > _FIDELITY_BLOCK_ELEMENTS and fidelity_moments.cheaper(n, width):
        return fidelity_moments.loss_and_grad(student, teacher, want_grad)
    x = torch.stack((student, teacher))  # the common width (the public loss cuts both sides to it)
    norm = torch.linalg.vector_norm(x, dim=2, keepdim=True)
    psi = x.div_(norm.clamp(min=EPS))
    pairs = float(n) ** 2
    psi_s = psi[0]
    whole = 2 * n * n <= _FIDELITY_BLOCK_ELEMENTS or (
        not want_grad and n * n <= _FIDELITY_BLOCK_ELEMENTS and n * n * width <= _FIDELITY_WHOLE_FORWARD_WORK)
    if whole:
        gram = torch.bmm(psi, psi.transpose(1, 2))
        k = torch.square(gram) if want_grad else gram.square_()
        u = k[0].sub_(k[1])
        d_psi = gram[0].mul_(u) @ psi_s if want_grad else None
        loss = u.square_().sum().mul_(0.5 / pairs)
        if not want_grad:
            return loss, None
        return loss, fidelity_moments.unit_rows_backward(psi_s, norm[0], d_psi.mul_(4.0 / pairs))
    d_psi = None
    i0 = 0
    # every block's product (and, with gradient, its square) in one allocation a call: fresh tensors a block were
    # mapped by glibc and faulted in again by the next (about 1,100 page faults a call at N = 2048, D = 4). A block
    # holds at most _FIDELITY_BLOCK_ELEMENTS entries, or one row's 2 (N - i0) where a row alone is more
    room = max(min(_FIDELITY_BLOCK_ELEMENTS, 2 * n * n), 2 * n)
    buffers = psi.new_empty((2 if want_grad else 1, room))
    while i0 < n:
        i1 = min(n, i0 + max(1, _FIDELITY_BLOCK_ELEMENTS // (2 * (n - i0))))
        shape, size = (2, i1 - i0, n - i0), 2 * (i1 - i0) * (n - i0)
        gram = torch.bmm(psi[:, i0:i1], psi[:, i0:].transpose(1, 2), out=buffers[0, :size].view(shape))
        if not want_grad:
            k_s, k_t = gram.square_().unbind()
            square = F.huber_loss(k_s[:, : i1 - i0], k_t[:, : i1 - i0], reduction="sum", delta=1.0)
            rest = F.huber_loss(k_s[:, i1 - i0 :], k_t[:, i1 - i0 :], reduction="sum", delta=1.0)
            part = square.double() + 2.0 * rest.double()
        else:
            f, g = smooth_l1_terms_(*torch.square(gram, out=buffers[1, :size].view(shape)).unbind())
            w = g.mul_(gram[0])
            part = f[:, : i1 - i0].sum().double() + 2.0 * f[:, i1 - i0 :].sum().double()
            if d_psi is None:
                d_psi = torch.zeros_like(psi_s)
            d_psi[i0:i1] += w @ psi_s[i0:]
            if i1 < n:
                d_psi[i1:] += w[:, i1 - i0 :].t() @ psi_s[i0:i1]
        total = part if i0 == 0 else total + part
        i0 = i1
    loss = (total / pairs).to(student.dtype)
    if not want_grad:
        return loss, None
    return loss, fidelity_moments.unit_rows_backward(psi_s, norm[0], d_psi.mul_(4.0 / pairs))


def _fidelity_loss(route, student, teacher):
    """The loss from route(student, teacher, want_grad) -> (loss, gradient or None), differentiable: the route's own
    gradient when autograd needs one, the formula under torch.func transforms."""
    if functorch_transforms_active():
        return _fidelity_loss_graph(student, teacher)
    if torch.is_grad_enabled() and student.requires_grad:
        return _LossWithGrad.apply(lambda s, t: route(s, t, True), _fidelity_loss_graph, student, teacher)
    return route(student, teacher, False)[0]


def fidelity_kernel_loss(student, teacher):
    return _fidelity_loss(fidelity_pass, student, teacher)


def fidelity_loss_from_moments(student, teacher):
    """The loss through fidelity_moments whatever N (the cpp backend's route for narrow features)."""
    return _fidelity_loss(fidelity_moments.loss_and_grad, student, teacher)


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
