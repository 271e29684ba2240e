"""The loss functions: input checks, then dispatch to a backend (DESIGN.md sections 3 and 4).

The teacher side never receives gradient: it is detached here, before any backend sees it. Half-precision features
are computed in float32 (the relations divide by distances and norms) and the loss is returned in float32.

Autograd: torch.func.grad works on every backend; torch.func.vmap is refused with an error. Double backward
(differentiating a gradient, e.g. a gradient penalty) is exact in backend="reference" for every relation and in
"torch" for all but the angle loss; the other backends compute the first gradient under create_graph=True and raise
a RuntimeError naming a backend that supports it when that gradient is differentiated. A NaN or inf in the features gives a NaN loss in every backend.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import backends

_UPCAST = (torch.float16, torch.bfloat16)


def check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, features), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (batch size N >= 1), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature column, got shape {tuple(x.shape)}")


def _prepare_pair(student, teacher):
    check_features("student", student)
    check_features("teacher", teacher)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must have the same batch size, got {student.shape[0]} and {teacher.shape[0]}"
        )
    if student.device != teacher.device:
        raise ValueError(f"student and teacher must be on one device, got {student.device} and {teacher.device}")
    if student.dtype in _UPCAST:
        student = student.float()
    return student, teacher.detach().to(student.dtype)


def _prepare_single(name, x):
    check_features(name, x)
    return x.float() if x.dtype in _UPCAST else x


def kd_loss(student_logits, teacher_logits, temperature: float = 4.0, alpha: float = 0.5):
    """alpha * T^2 * KL(softmax(t / T) || softmax(s / T)), batch-mean (Hinton et al.)."""
    student_logits, teacher_logits = _prepare_pair(student_logits, teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have one shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return alpha * temperature**2 * F.kl_div(log_p_s, p_t, reduction="batchmean")


def rkd_distance_loss(student, teacher, *, zero_diagonal: bool = False, backend: str = "auto"):
    """RKD distance loss (DESIGN.md 3.2). zero_diagonal=False is the seed's convention, True the original RKD one.

    Neither this nor rkd_angle_loss centres the features: every fast backend is translation invariant by construction
    (squared distances from differences or from a Gram of features it centres itself, gradient tails on centred
    features), so that features with a large common offset (ReLU outputs) do not cancel."""
    student, teacher = _prepare_pair(student, teacher)
    impl = backends.resolve(backend, "rkd_distance_loss", student)
    return impl.rkd_distance_loss(student, teacher, bool(zero_diagonal))


# a call over more triplets than this runs for minutes to hours (the whole batch at N ~ 4600); warned once per process
ANGLE_TRIPLETS_WARNING = 1e11
_angle_cost_warned = False


def _warn_angle_cost(n: int, start: int, stop: int) -> None:
    global _angle_cost_warned
    triplets = (stop - start) * n * n
    if _angle_cost_warned or triplets <= ANGLE_TRIPLETS_WARNING:
        return
    _angle_cost_warned = True
    warnings.warn(
        f"rkd_angle_loss: N={n} means {triplets:.3g} triplets in this call (O(N^3) work: minutes to hours on a CPU, "
        f"beyond interactive sizes from about {ANGLE_TRIPLETS_WARNING:.0e}). Shard the anchors across processes with "
        f"anchors=(start, stop): the shares of a partition of range(N) add up to the loss. Ctrl-C stops the call. "
        f"(Warned once per process.)",
        RuntimeWarning,
        stacklevel=3,
    )


def rkd_angle_loss(student, teacher, *, backend: str = "auto", anchors=None):
    """RKD angle loss over all N^3 triplets (DESIGN.md 3.3).

    anchors=(start, stop) computes only the triplets whose anchor index is in [start, stop), still divided by N^3:
    the shares of a partition of the anchors add up to the loss (how the distributed trainer splits the work; every
    share centres on the mean of the whole batch).

    Cost: O(N^3) time ((stop - start) * N^2 triplets) in O(N^2) memory. A call over more than ANGLE_TRIPLETS_WARNING
    (1e11) triplets, the whole batch from N ~ 4600 on, warns once per process with the estimate and the `anchors`
    sharding; Ctrl-C stops a long call (cpp and torch backends) within a fraction of a second.
    """
    student, teacher = _prepare_pair(student, teacher)
    n = student.shape[0]
    start, stop = (0, n) if anchors is None else anchors
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= n):
        raise ValueError(f"anchors must be a pair of ints (start, stop) with 0 <= start <= stop <= N={n}, got {anchors!r}")
    impl = backends.resolve(backend, "rkd_angle_loss", student)
    _warn_angle_cost(n, start, stop)
    if (start, stop) == (0, n):
        return impl.rkd_angle_loss(student, teacher)
    return impl.rkd_angle_loss(student, teacher, start, stop)


def _is_photonic(kernel) -> bool:
    return not isinstance(kernel, str)


def _check_kernel_name(kernel) -> None:
    if kernel != "simple":
        raise ValueError(f"kernel must be 'simple' or a PhotonicFidelityKernel, got {kernel!r}")


def fidelity_kernel_matrix(x, *, kernel="simple", backend: str = "auto"):
    """The N x N fidelity kernel of x: 'simple' is (psi_i . psi_j)^2 on the normalised rows (DESIGN.md 3.4);
    a PhotonicFidelityKernel module gives its photonic kernel (DESIGN.md 3.5)."""
    if _is_photonic(kernel):
        check_features("x", x)
        return kernel(x, backend=backend)
    _check_kernel_name(kernel)
    x = _prepare_single("x", x)
    impl = backends.resolve(backend, "fidelity_kernel_matrix", x)
    return impl.fidelity_kernel_matrix(x)


def common_columns(student, teacher):
    """Both sides cut to their first min(Ds, Dt) columns, as the seed does before its fidelity kernels."""
    if student.shape[1] == teacher.shape[1]:
        return student, teacher  # (two slices cost 5 us, a tenth of the seed's whole fidelity loss)
    width = min(student.shape[1], teacher.shape[1])
    return student[:, :width], teacher[:, :width]


_TAIL_CHUNK = 1 << 20  # elements: 4 MiB float32 temporaries, which glibc reuses instead of mapping fresh pages


def _smooth_l1_mean_no_grad(a, b):
    """F.smooth_l1_loss(a, b) (mean, beta 1) of two same-shape CPU tensors, without autograd, in chunks: at N = 4096 the
    whole call faults in a 64 MiB temporary afresh every time (16,380 page faults a call, 57 ms; in chunks 710 and
    13 ms, 2 threads). The chunks' sums are added in float64."""
    a, b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, a.numel(), _TAIL_CHUNK):
        stop = start + _TAIL_CHUNK
        total += F.huber_loss(a[start:stop], b[start:stop], reduction="sum", delta=1.0).double()
    return (total / a.numel()).to(a.dtype)


def fidelity_kernel_loss(student, teacher, *, kernel="simple", backend: str = "auto"):
    """smooth_l1(K(student) - K(teacher)) over the N^2 kernel entries. When the widths differ, both sides are cut to
    their first min(Ds, Dt) columns first (common_columns)."""
    student, teacher = common_columns(*_prepare_pair(student, teacher))
    if _is_photonic(kernel):
        with torch.no_grad():
            k_t = kernel(teacher, backend=backend)
        k_s = kernel(student, backend=backend)
        if torch.is_grad_enabled() or k_s.device.type != "cpu":
            return F.smooth_l1_loss(k_s, k_t)
        return _smooth_l1_mean_no_grad(k_s, k_t)
    _check_kernel_name(kernel)
    impl = backends.resolve(backend, "fidelity_kernel_loss", student)
    return impl.fidelity_kernel_loss(student.contiguous(), teacher.contiguous())


PHOTONIC_MAX_PHOTONS = 12  # photons per state; the C++ side's limit is kMaxPhotons in csrc/photonic.h


def _check_photonic_matrices(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_complex():
        if x.is_floating_point() and x.dim() == 4 and x.shape[-1] == 2:
            x = torch.view_as_complex(x.float() if x.dtype in _UPCAST else x.contiguous())
        else:
            raise TypeError(
                f"{name} must be complex (N, n, m), or real (N, n, m, 2) real/imaginary pairs; got dtype {x.dtype} "
                f"and shape {tuple(x.shape)}"
            )
    if x.dtype == torch.complex32:
        x = x.to(torch.complex64)
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D (batch, photons n, modes m), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (batch size >= 1), got shape {tuple(x.shape)}")
    if not 1 <= x.shape[1] <= PHOTONIC_MAX_PHOTONS:
        raise ValueError(
            f"{name} must have 1 to {PHOTONIC_MAX_PHOTONS} rows per sample (photons), got shape {tuple(x.shape)}"
        )
    if x.shape[2] == 0:
        raise ValueError(f"{name} must have at least one column (mode), got shape {tuple(x.shape)}")
    return x


def photonic_fidelity(P, Q=None, *, backend: str = "auto"):
    """K_ij = |Perm(P_i Q_j^H)|^2 for per-sample n x m complex matrices P (N x n x m) and Q (M x n x m; default P,
    then K is symmetric): the fused pairwise permanent behind the photonic fidelity kernel (DESIGN.md 3.5).
    Differentiable in P and Q; n <= 12. Returns N x M, real, in P's precision."""
    P = _check_photonic_matrices("P", P)
    if Q is not None:
        Q = _check_photonic_matrices("Q", Q)
        if Q.shape[1:] != P.shape[1:]:
            raise ValueError(
                f"P and Q must have the same (photons, modes) sizes, got {tuple(P.shape)} and {tuple(Q.shape)}"
            )
        if Q.device != P.device:
            raise ValueError(f"P and Q must be on one device, got {P.device} and {Q.device}")
        if Q.dtype != P.dtype:
            common = torch.promote_types(P.dtype, Q.dtype)
            P, Q = P.to(common), Q.to(common)
    impl = backends.resolve(backend, "photonic_fidelity", P)
    return impl.photonic_fidelity(P, Q)
