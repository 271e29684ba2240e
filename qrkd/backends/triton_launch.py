"""Backend "triton": launches the Triton kernels of qrkd.kernels behind autograd Functions.

CUDA tensors on a GPU; CPU tensors when TRITON_INTERPRET=1 was set before this module was imported (Triton's
interpreter: slow, meant for tests at small N). triton is imported here and nowhere else in the backend layer, and a
missing or broken triton only makes status() report the backend unavailable.

Every relation saves its O(N^2) intermediates (squared distances, normalised rows) for the backward pass; none keeps
an N x N x D or N^3 buffer. Reductions go through per-program partial sums in float64, summed by torch: the result
does not depend on the launch order.

The autograd Functions use setup_context, so torch.func.grad works (vmap does not); the intermediates travel as
extra, non-differentiable outputs of forward. Their backward passes are kernels with no derivative of their own:
double backward refuses with a clear error (autograd_limits.py).
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..relations import FEATURE_OPS
from .autograd_limits import fused_backward, vmap_refusal

_INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")

try:
    import triton

    from qrkd import kernels

    _IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a triton that fails while initialising
    triton = None
    kernels = None
    _IMPORT_ERROR = exc

EPS = 1e-12
_OPS = FEATURE_OPS  # every relation on real features; not the photonic kernel
_DTYPES = (torch.float32, torch.float64)

# Block sizes per kernel family, one row per family: (under the interpreter, on a GPU in float32, in float64).
#   sq: (BLOCK_I, BLOCK_J, max BLOCK_D, warps)   tail: (BLOCK_I, BLOCK_J, warps)   angle: (BLOCK_A, BLOCK, warps)
#   pair: (BLOCK_U, BLOCK_V, max BLOCK_D, warps)  fid: (BLOCK_I, BLOCK_J, max BLOCK_D, warps)
#   rows: (BLOCK_N, BLOCK_D, warps)
# Under the interpreter every program instance costs milliseconds whatever its size, so one program covers a whole
# 64 x 64 tile there; tests shrink these to exercise the multi-tile paths. The GPU sizes are chosen so that no variant
# spills registers on sm_90 (checked with cuobjdump on the AOT-compiled kernels, triton 3.7); not yet tuned by timing.
_BLOCK_TABLE = {
    "sq": ((64, 64, 32, 4), (32, 32, 8, 4), (32, 32, 4, 4)),
    "tail": ((64, 64, 4), (64, 64, 8), (32, 32, 4)),
    "angle": ((64, 64, 4), (64, 64, 16), (64, 32, 8)),
    "pair": ((64, 64, 256, 4), (64, 32, 64, 8), (32, 32, 32, 4)),
    "fid": ((64, 64, 256, 4), (64, 64, 32, 8), (32, 32, 16, 4)),
    "rows": ((64, 256, 4), (16, 128, 4), (16, 64, 4)),
}
INTERPRETER_BLOCKS = {kind: sizes[0] for kind, sizes in _BLOCK_TABLE.items()}
GPU_BLOCKS = {
    dtype: {kind: sizes[column] for kind, sizes in _BLOCK_TABLE.items()}
    for column, dtype in ((1, torch.float32), (2, torch.float64))
}


def status():
    if _IMPORT_ERROR is not None:
        return False, f"triton not importable ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"
    version = getattr(triton, "__version__", "?")
    if _INTERPRET:
        return True, f"triton {version} under TRITON_INTERPRET=1 (CPU tensors through the interpreter: slow, for tests)"
    if torch.cuda.is_available():
        return True, f"triton {version} on {torch.cuda.get_device_name()}"
    return False, f"triton {version} is importable but no CUDA device is visible (TRITON_INTERPRET=1 runs it on the CPU)"


def supports(op, device_type, dtype):
    if _IMPORT_ERROR is not None or op not in _OPS or dtype not in _DTYPES:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and _INTERPRET


# ------------------------------------------------------------------------------------------------------ launching


def _blocks(kind, dtype):
    return INTERPRETER_BLOCKS[kind] if _INTERPRET else GPU_BLOCKS[dtype][kind]


def _pow2(n, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _on_device(x):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _prepare(x):
    if x.dtype not in _DTYPES:
        raise TypeError(f"the triton backend runs float32 and float64 features, got {x.dtype}")
    return x.contiguous()


def _sq_distances(x, stats_zero_diagonal=None):
    """q = |x_i - x_j|^2 (N x N) and, if stats_zero_diagonal is not None, the normaliser sums of the distances."""
    n, d = x.shape
    bi, bj, bd, warps = _blocks("sq", x.dtype)
    grid = (triton.cdiv(n, bi), triton.cdiv(n, bj))
    q = torch.empty(n, n, dtype=x.dtype, device=x.device)
    want_stats = stats_zero_diagonal is not None
    stats = torch.empty(grid[0] * grid[1], 2, dtype=torch.float64, device=x.device) if want_stats else q
    kernels.common.pairwise_sq_dist_kernel[grid](
        x, q, stats, n, d,
        STATS=want_stats, ZERO_DIAG=bool(stats_zero_diagonal),
        BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=_pow2(d, 4, bd), num_warps=warps,
    )  # fmt: skip
    return q, (stats if want_stats else None)


def _pair_matmul(w, y, laplacian):
    """H = W + W^T; laplacian: 2 (rowsum(H) y - H y), else H y (y must be contiguous)."""
    n, d = y.shape
    bu, bv, bd, warps = _blocks("pair", y.dtype)
    bd = _pow2(d, 16, bd)
    out = torch.empty_like(y)
    grid = (triton.cdiv(n, bu), triton.cdiv(d, bd))
    kernels.common.pair_matmul_kernel[grid](
        w, y, out, n, d, LAPLACIAN=laplacian, BLOCK_U=bu, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps
    )
    return out


def _grad_from_pair_grad(x, grad_q, precision=None):
    """dx_u = 2 sum_v (G_uv + G_vu)(x_u - x_v), on centred x (translation invariant; avoids cancellation), computed in
    `precision` (default x's dtype) and returned in x's dtype."""
    xc = x.to(precision or x.dtype)
    xc = (xc - xc.mean(dim=0, keepdim=True)).contiguous()
    return _pair_matmul(grad_q.to(xc.dtype), xc, laplacian=True).to(x.dtype)


def _save(ctx, inputs, output):
    """setup_context of every Function here: forward returns (result, *intermediates); the tensor inputs and the
    intermediates (not differentiable) are saved, the other inputs kept as ctx.options."""
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*(x for x in inputs if isinstance(x, torch.Tensor)), *output[1:])
    ctx.options = tuple(x for x in inputs if not isinstance(x, torch.Tensor))
    ctx.n_inputs = len(inputs)


def _function(op, forward, gradient, double_backward_in=("reference",)):
    """An autograd.Function: forward(*inputs) -> (result, *intermediates); backward runs the fused
    gradient(*tensor inputs, *intermediates, incoming gradient, *options) -> d result / d first input through
    fused_backward, so that differentiating it again refuses by name (backends in double_backward_in support it)."""

    def backward(ctx, grad, *_intermediates):
        options = ctx.options

        def compute(*tensors):
            with _on_device(tensors[0]):
                return gradient(*tensors, *options)

        dx = fused_backward(compute, (*ctx.saved_tensors, grad), "triton", op, double_backward_in)
        return (dx,) + (None,) * (ctx.n_inputs - 1)

    members = {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(_save),
        "backward": staticmethod(backward),
        "vmap": vmap_refusal("triton", op),
    }
    return type(f"_{op}", (torch.autograd.Function,), members)


# ------------------------------------------------------------------------------------------------------- distance


def _inverse_mean(stats):
    """1 / (mean of the positive distances + 1e-12), 0 when there is none (float64 scalars), and the count."""
    total, count = stats.sum(dim=0).unbind()
    mu = total / count.clamp(min=1.0) + EPS
    return torch.where(count > 0, 1.0 / mu, torch.zeros_like(mu)), count


def _distance_tail(qs, qt, mu_terms, zero_diagonal, grad_out=None):
    n = qs.shape[0]
    bi, bj, warps = _blocks("tail", qs.dtype)
    grid = (triton.cdiv(n, bi), triton.cdiv(n, bj))
    parts = torch.empty(grid[0] * grid[1], 2, dtype=torch.float64, device=qs.device) if grad_out is None else qs
    kernels.rkd_distance.distance_tail_kernel[grid](
        qs, qt, mu_terms, parts, qs if grad_out is None else grad_out, n,
        BACKWARD=grad_out is not None, ZERO_DIAG=zero_diagonal, BLOCK_I=bi, BLOCK_J=bj, num_warps=warps,
    )  # fmt: skip
    return parts


def _distance_forward(student, teacher, zero_diagonal):
    s, t = _prepare(student), _prepare(teacher)
    n = s.shape[0]
    with _on_device(s):
        qs, stats_s = _sq_distances(s, zero_diagonal)
        qt, stats_t = _sq_distances(t, zero_diagonal)
        inv_s, count_s = _inverse_mean(stats_s)
        inv_t, _ = _inverse_mean(stats_t)
        mu_terms = torch.stack([inv_s, inv_t, torch.zeros_like(inv_s)]).to(s.dtype)
        parts = _distance_tail(qs, qt, mu_terms, zero_diagonal)
    loss_sum, gd_sum = parts.sum(dim=0).unbind()
    # the gradient through mu_s: (sum g d_s) / (mu_s^2 count_s)
    mu_term = gd_sum * inv_s * inv_s / count_s.clamp(min=1.0)
    return (loss_sum / float(n) ** 2).to(s.dtype), qs, qt, torch.stack([inv_s, inv_t, mu_term]).to(s.dtype)


def _distance_gradient(student, teacher, qs, qt, mu_terms, grad_output, zero_diagonal):
    grad_q = torch.empty_like(qs)
    _distance_tail(qs, qt, mu_terms, zero_diagonal, grad_out=grad_q)
    return _grad_from_pair_grad(_prepare(student), grad_q) * (grad_output / float(qs.shape[0]) ** 2)


_DistanceLoss = _function("rkd_distance_loss", _distance_forward, _distance_gradient, ("reference", "torch"))


def rkd_distance_loss(student, teacher, zero_diagonal=False):
    return _DistanceLoss.apply(student, teacher, bool(zero_diagonal))[0]


# ---------------------------------------------------------------------------------------------------------- angle


def _angle_pass(qs, qt, anchor_start, anchor_stop, grad_q=None, work_f32=False):
    """q is float64 whatever the features' dtype (see kernels/rkd_angle.py); work_f32 for float32 features."""
    n = qs.shape[0]
    block_a, block, warps = _blocks("angle", qs.dtype)
    tiles = triton.cdiv(n, block)
    grid = (triton.cdiv(anchor_stop - anchor_start, block_a), tiles, tiles)
    parts = torch.zeros(grid[0] * tiles * tiles, dtype=torch.float64, device=qs.device) if grad_q is None else qs
    kernels.rkd_angle.angle_triplet_kernel[grid](
        qs, qt, parts, qs if grad_q is None else grad_q, n, anchor_start, anchor_stop,
        BACKWARD=grad_q is not None, BLOCK_A=block_a, BLOCK=block, WORK_F32=work_f32, num_warps=warps,
    )  # fmt: skip
    return parts


def _angle_forward(student, teacher, anchor_start, anchor_stop):
    s, t = _prepare(student), _prepare(teacher)
    n = s.shape[0]
    if anchor_stop == anchor_start:
        empty = s.new_empty((0,))
        return s.new_zeros(()), empty, empty
    with _on_device(s):
        qs, _ = _sq_distances(s.double())
        qt, _ = _sq_distances(t.double())
        total = _angle_pass(qs, qt, anchor_start, anchor_stop, work_f32=s.dtype == torch.float32).sum()
    return (total / float(n) ** 3).to(s.dtype), qs, qt


def _angle_gradient(student, teacher, qs, qt, grad_output, anchor_start, anchor_stop):
    if qs.numel() == 0:  # an empty anchor range
        return torch.zeros_like(student)
    s = _prepare(student)
    grad_q = torch.zeros(qs.shape, dtype=s.dtype, device=qs.device)
    _angle_pass(qs, qt, anchor_start, anchor_stop, grad_q=grad_q, work_f32=s.dtype == torch.float32)
    return _grad_from_pair_grad(s, grad_q, torch.float64) * (grad_output / float(qs.shape[0]) ** 3)


_AngleLoss = _function("rkd_angle_loss", _angle_forward, _angle_gradient)


def rkd_angle_loss(student, teacher, anchor_start=0, anchor_stop=None):
    n = student.shape[0]
    anchor_stop = n if anchor_stop is None else anchor_stop
    if not (0 <= anchor_start <= anchor_stop <= n):
        raise ValueError(f"anchor range must satisfy 0 <= start <= stop <= N={n}, got ({anchor_start}, {anchor_stop})")
    return _AngleLoss.apply(student, teacher, int(anchor_start), int(anchor_stop))[0]


# ---------------------------------------------------------------------------------------- fidelity (classical)


def _normalize(x):
    n, d = x.shape
    bn, bd, warps = _blocks("rows", x.dtype)
    psi = torch.empty_like(x)
    norm = torch.empty(n, dtype=x.dtype, device=x.device)
    kernels.fidelity.normalize_rows_kernel[(triton.cdiv(n, bn),)](
        x, psi, norm, n, d, BLOCK_N=bn, BLOCK_D=_pow2(d, 4, bd), num_warps=warps
    )
    return psi, norm


def _normalize_backward(psi, norm, dpsi):
    n, d = psi.shape
    bn, bd, warps = _blocks("rows", psi.dtype)
    dx = torch.empty_like(psi)
    kernels.fidelity.normalize_rows_backward_kernel[(triton.cdiv(n, bn),)](
        psi, norm, dpsi, dx, n, d, BLOCK_N=bn, BLOCK_D=_pow2(d, 4, bd), num_warps=warps
    )
    return dx


def _fidelity_tiles(mode, ps, pt=None, gk=None, out=None):
    n, d = ps.shape
    bi, bj, bd, warps = _blocks("fid", ps.dtype)
    grid = (triton.cdiv(n, bi), triton.cdiv(n, bj))
    parts = torch.empty(grid[0] * grid[1], dtype=torch.float64, device=ps.device) if out is None else ps
    kernels.fidelity.fidelity_tile_kernel[grid](
        ps, ps if pt is None else pt, ps if gk is None else gk, ps if out is None else out, parts, n, d,
        MODE=mode, BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=_pow2(d, 16, bd), num_warps=warps,
    )  # fmt: skip
    return parts


def _fidelity_backward(psi, norm, w, scale):
    dpsi = _pair_matmul(w, psi, laplacian=False)
    return _normalize_backward(psi, norm, dpsi) * scale


def _fidelity_loss_forward(student, teacher):
    s, t = _prepare(student), _prepare(teacher)
    if s.shape[1] != t.shape[1]:
        raise ValueError(
            f"student and teacher must have the same width here (truncate first), got {s.shape[1]} and {t.shape[1]}"
        )
    with _on_device(s):
        psi_s, norm_s = _normalize(s)
        psi_t, _ = _normalize(t)
        total = _fidelity_tiles(kernels.fidelity.MODE_LOSS, psi_s, pt=psi_t).sum()
    return (total / float(s.shape[0]) ** 2).to(s.dtype), psi_s, norm_s, psi_t


def _fidelity_loss_gradient(student, teacher, psi_s, norm_s, psi_t, grad_output):
    n = psi_s.shape[0]
    w = torch.empty(n, n, dtype=psi_s.dtype, device=psi_s.device)
    _fidelity_tiles(kernels.fidelity.MODE_GRAD_LOSS, psi_s, pt=psi_t, out=w)
    return _fidelity_backward(psi_s, norm_s, w, grad_output / float(n) ** 2)


_FidelityLoss = _function(
    "fidelity_kernel_loss", _fidelity_loss_forward, _fidelity_loss_gradient, ("reference", "torch")
)


def fidelity_kernel_loss(student, teacher):
    return _FidelityLoss.apply(student, teacher)[0]


def _fidelity_matrix_forward(x):
    x = _prepare(x)
    n = x.shape[0]
    with _on_device(x):
        psi, norm = _normalize(x)
        k = torch.empty(n, n, dtype=x.dtype, device=x.device)
        _fidelity_tiles(kernels.fidelity.MODE_MATRIX, psi, out=k)
    return k, psi, norm


def _fidelity_matrix_gradient(x, psi, norm, grad_k):
    w = torch.empty(psi.shape[0], psi.shape[0], dtype=psi.dtype, device=psi.device)
    _fidelity_tiles(kernels.fidelity.MODE_GRAD_MATRIX, psi, gk=grad_k.to(psi.dtype).contiguous(), out=w)
    return _fidelity_backward(psi, norm, w, 1.0)


_FidelityMatrix = _function(
    "fidelity_kernel_matrix", _fidelity_matrix_forward, _fidelity_matrix_gradient, ("reference", "torch")
)


def fidelity_kernel_matrix(x):
    return _FidelityMatrix.apply(x)[0]
