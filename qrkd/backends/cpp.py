"""Backend "cpp": the compiled extension qrkd._C (C++/OpenMP CPU kernels; CUDA kernels where it was built with them).

The ops are torch custom ops registered by the extension under torch.ops.qrkd.*. Loading the extension happens once,
on first use of the backend; a missing build never breaks `import qrkd`. When no prebuilt qrkd._C loads with the
running torch, the extension is built from the shipped sources into a per-user cache on first use (qrkd/_build.py; a
one-line message on stderr, minutes once; later processes load the cached build); QRKD_JIT=0 turns that off.

A portable x86-64 wheel holds the CPU kernels three times, compiled for the levels x86_64, x86_64_v3 (AVX2, FMA) and
x86_64_v4 (AVX-512), as the modules qrkd._cpu_<level>; qrkd._C then holds only the op schemas and the CUDA kernels, and
the highest level this CPU runs is loaded beside it (QRKD_CPU_ISA=<level> picks another). Only one of them is ever
loaded in a process, so the torch header code each was compiled with never mixes.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os

import torch

from ..relations import TABLE
from . import fidelity_moments, pure_torch
from .autograd_limits import functorch_transforms_active, fused_backward, vmap_refusal

_state = {"loaded": None, "detail": "", "cuda": False}


def _load():
    if _state["loaded"] is not None:
        return _state["loaded"]
    try:
        _C = importlib.import_module("qrkd._C")  # registers torch.ops.qrkd.*
        origin = "qrkd._C"
    except ImportError as exc:
        from qrkd import _build

        try:
            _C, folder = _build.load()
            origin = f"built on first use, cached in {folder}"
        except _build.ExtensionUnavailable as why:
            prebuilt = "" if isinstance(exc, ModuleNotFoundError) else f"qrkd._C does not load: {exc}; "
            _state["detail"] = f"{prebuilt}no extension for torch {torch.__version__}: {why}"
            _state["loaded"] = False
            return False
    _state["cuda"] = bool(getattr(_C, "WITH_CUDA", False))
    kernels = ("CPU + CUDA" if _state["cuda"] else "CPU") + " kernels"
    if getattr(_C, "CPU_KERNELS", "native") == "none":  # a portable wheel: CPU kernels per instruction-set level
        try:
            level, installed = _load_cpu_kernels(_C)
        except ImportError as exc:
            _state["detail"] = f"{origin} loads, but not its CPU kernels: {exc}"
            _state["loaded"] = False
            return False
        kernels += f"; the CPU ones for {level}, chosen of {', '.join(installed)}; QRKD_CPU_ISA overrides"
    _state["detail"] = f"{origin} ({kernels})"
    _state["loaded"] = True
    return True


CPU_LEVELS = ("x86_64", "x86_64_v3", "x86_64_v4")  # setup.py's, lowest first


def choose_cpu_level(installed, supported, requested=""):
    """The CPU kernel module to load: the highest level both installed and run by this CPU, or the one requested
    (QRKD_CPU_ISA), which must be both; ImportError says why not."""
    usable = [level for level in CPU_LEVELS if level in installed and level in supported]
    if requested:
        if requested not in installed:
            raise ImportError(f"QRKD_CPU_ISA={requested} names no installed CPU kernel module (installed: "
                              f"{', '.join(installed) or 'none'})")
        if requested not in supported:
            raise ImportError(f"QRKD_CPU_ISA={requested}: this CPU does not run that instruction set (it runs: "
                              f"{', '.join(supported) or 'none'})")
        return requested
    if not usable:
        raise ImportError(f"no installed CPU kernel module runs on this CPU (installed: {', '.join(installed) or 'none'};"
                          f" the CPU runs: {', '.join(supported) or 'none'})")
    return usable[-1]


def _load_cpu_kernels(_C):
    """Imports the qrkd._cpu_<level> module chosen by choose_cpu_level; (level, installed levels)."""
    installed = [level for level in CPU_LEVELS if importlib.util.find_spec(f"qrkd._cpu_{level}") is not None]
    level = choose_cpu_level(installed, list(_C.supported_cpu_levels()), os.environ.get("QRKD_CPU_ISA", "").strip())
    importlib.import_module(f"qrkd._cpu_{level}")  # registers the CPU implementations of torch.ops.qrkd.*
    return level, installed


def status():
    return _load(), _state["detail"]


def has_cuda_kernels() -> bool:
    return _load() and _state["cuda"]


# contract op -> the torch.ops.qrkd op whose presence means the extension implements it
_OP_KERNELS = {r.op: r.cpp_op for r in TABLE}


def supports(op, device_type, dtype):
    kernel = _OP_KERNELS.get(op)
    if kernel is None or not _load() or not hasattr(torch.ops.qrkd, kernel):
        return False
    if device_type == "cuda" and not _state["cuda"]:
        return False
    if op == "photonic_fidelity":
        return device_type in ("cpu", "cuda") and dtype in (torch.complex64, torch.complex128)
    return device_type == "cpu" and dtype in (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------ autograd
# Every op's autograd formula (setup_context + backward) is registered twice: with torch.library.register_autograd, for
# direct calls of torch.ops.qrkd.* (and opcheck), and in an autograd.Function with setup_context that the functions of
# this module call, because torch.func transforms (grad, grad_and_value) reject the Function that torch.library
# generates. vmap is not supported. The backward passes are not differentiable: double backward refuses (see
# autograd_limits.py).


# Below the autograd dispatch key an op runs its kernel directly; above it, even with grad mode off (as in a Function's
# forward), every call passes through the Python wrapper of torch.library.register_autograd: about 60 us of the seed's
# angle forward+backward (N = 128, 2 threads), against about 140 us for the whole Function.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:
    _unwrap_dead_wrappers = None


def _apply(function, *args):
    """function.apply(*args) without its signature binding, about 16 us a call of the seed's 600 us angle
    forward+backward: with setup_context, Function.apply binds the arguments to forward's signature to fill in
    defaults, and these forwards have none. Under torch.func transforms and torch.compile (or a torch without these
    hooks) the full apply."""
    if _unwrap_dead_wrappers is None or _compiling() or functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*_unwrap_dead_wrappers(args))


def _function(op_name, setup_context, backward, public_name):
    """An autograd.Function that calls torch.ops.qrkd.<op_name> with the op's own setup_context and backward."""

    def forward(*args):
        with _below_autograd():
            return getattr(torch.ops.qrkd, op_name)(*args)

    return type(
        f"_{op_name}",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "vmap": vmap_refusal("cpp", public_name),
        },
    )


# ------------------------------------------------------------- RKD distance, RKD angle, classical fidelity kernel
# Each loss op returns (loss, dL/dstudent): when the student needs a gradient the fused CPU kernel produces it in the
# same pass as the loss (with_grad=True) and backward only scales it by grad_output; otherwise it is an empty tensor.

def _with_grad(student: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and student.requires_grad


def _fake_loss_and_grad(student, with_grad):
    grad = student.new_empty(student.shape) if with_grad else student.new_empty((0,))
    return student.new_empty(()), grad


def _save_grad(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], inputs[0], inputs[1])  # the gradient, and the student and teacher it depends on


def _scale(grad, student, teacher, grad_loss):
    return grad * grad_loss


def _scaled_grad(n_inputs, op, supported):
    def backward(ctx, grad_loss, _unused):
        grad = ctx.saved_tensors[0]
        if grad.numel() == 0:
            raise RuntimeError("qrkd cpp backend: backward through a loss computed without a gradient (with_grad=False)")
        if torch.is_grad_enabled():  # create_graph=True: a node that refuses double backward
            scaled = fused_backward(_scale, (*ctx.saved_tensors, grad_loss), "cpp", op, supported)
        else:  # a plain backward (the usual case): no second autograd node on the small-batch path
            scaled = grad * grad_loss
        return (scaled,) + (None,) * (n_inputs - 1)

    return backward


def _save_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _fidelity_matrix_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return fused_backward(
        lambda x, grad: torch.ops.qrkd.fidelity_matrix_backward(grad, x),
        (x, grad),
        "cpp",
        "fidelity_kernel_matrix",
        ("reference", "torch"),
    )


_distance_backward = _scaled_grad(4, "rkd_distance_loss", ("reference", "torch"))
_angle_backward = _scaled_grad(5, "rkd_angle_loss", ("reference",))
_fidelity_loss_backward = _scaled_grad(3, "fidelity_kernel_loss", ("reference", "torch"))
_Distance = _function("rkd_distance", _save_grad, _distance_backward, "rkd_distance_loss")
_Angle = _function("rkd_angle", _save_grad, _angle_backward, "rkd_angle_loss")
_FidelityLoss = _function("fidelity_loss", _save_grad, _fidelity_loss_backward, "fidelity_kernel_loss")
_FidelityMatrix = _function("fidelity_matrix", _save_input, _fidelity_matrix_backward, "fidelity_kernel_matrix")


def rkd_distance_loss(student, teacher, zero_diagonal=False):
    return _apply(_Distance, student, teacher, bool(zero_diagonal), _with_grad(student))[0]


def rkd_angle_loss(student, teacher, anchor_start=0, anchor_stop=None):
    stop = student.shape[0] if anchor_stop is None else int(anchor_stop)
    return _apply(_Angle, student, teacher, int(anchor_start), stop, _with_grad(student))[0]


# from this N on, narrow features take the torch backend's moments (fidelity_moments) instead of the N x N kernel: in
# turns at D = 4, N = 512 263 against 268 us forward and 498 against 756 forward+backward, N = 4096 1.5 against 56.7 ms
_MOMENTS_MIN_N = 512


def fidelity_kernel_loss(student, teacher):
    n, width = student.shape
    if n >= _MOMENTS_MIN_N and fidelity_moments.cheaper(n, width):
        return pure_torch.fidelity_loss_from_moments(student, teacher)
    return _apply(_FidelityLoss, student, teacher, _with_grad(student))[0]


def fidelity_kernel_matrix(x):
    return _apply(_FidelityMatrix, x)


def _register_relation_ops():
    """Fake (meta) implementations and autograd formulas of the ops above, so that they run under torch.compile."""
    lib = torch.library

    @lib.register_fake("qrkd::rkd_distance")
    def _(student, teacher, zero_diagonal, with_grad):
        return _fake_loss_and_grad(student, with_grad)

    @lib.register_fake("qrkd::rkd_angle")
    def _(student, teacher, anchor_start, anchor_stop, with_grad):
        return _fake_loss_and_grad(student, with_grad)

    @lib.register_fake("qrkd::fidelity_loss")
    def _(student, teacher, with_grad):
        return _fake_loss_and_grad(student, with_grad)

    @lib.register_fake("qrkd::fidelity_matrix")
    def _(x):
        return x.new_empty((x.shape[0], x.shape[0]))

    @lib.register_fake("qrkd::fidelity_matrix_backward")
    def _(grad, x):
        return x.new_empty(x.shape)

    lib.register_autograd("qrkd::rkd_distance", _distance_backward, setup_context=_save_grad)
    lib.register_autograd("qrkd::rkd_angle", _angle_backward, setup_context=_save_grad)
    lib.register_autograd("qrkd::fidelity_loss", _fidelity_loss_backward, setup_context=_save_grad)
    lib.register_autograd("qrkd::fidelity_matrix", _fidelity_matrix_backward, setup_context=_save_input)


if _load() and hasattr(torch.ops.qrkd, "rkd_angle"):
    _register_relation_ops()


# ------------------------------------------------------------------------------------------------ photonic fidelity
# csrc/cpu/photonic.cpp and csrc/cuda/photonic.cu: photonic_fidelity(P, Q, symmetric) -> K (N x M, real) and
# photonic_fidelity_backward(grad, P, Q, symmetric) -> (dL/dP, dL/dQ). symmetric (Q is P): only pairs j >= i are
# computed and dL/dP holds both roles of P (dL/dQ is then empty).

def _photonic_setup(ctx, inputs, output):
    P, Q, symmetric = inputs
    ctx.symmetric = symmetric
    ctx.save_for_backward(P, Q)


def _photonic_backward(ctx, grad):
    P, Q = ctx.saved_tensors
    symmetric = ctx.symmetric
    grad_p, grad_q = fused_backward(
        lambda P, Q, grad: torch.ops.qrkd.photonic_fidelity_backward(grad.contiguous(), P, Q, symmetric),
        (P, Q, grad),
        "cpp",
        "photonic_fidelity",
        ("reference", "torch"),
    )
    if symmetric:
        return grad_p, None, None
    return (grad_p if ctx.needs_input_grad[0] else None), (grad_q if ctx.needs_input_grad[1] else None), None


_Photonic = _function("photonic_fidelity", _photonic_setup, _photonic_backward, "photonic_fidelity")


def photonic_fidelity(P, Q=None):
    if Q is None:
        return _apply(_Photonic, P, P, True)
    return _apply(_Photonic, P, Q, False)


def _register_photonic_ops():
    lib = torch.library

    @lib.register_fake("qrkd::photonic_fidelity")
    def _(P, Q, symmetric):
        real = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(P.dtype, P.dtype)
        return P.new_empty((P.shape[0], Q.shape[0]), dtype=real)

    @lib.register_fake("qrkd::photonic_fidelity_backward")
    def _(grad, P, Q, symmetric):
        return P.new_empty(P.shape), Q.new_empty((0,) + tuple(Q.shape[1:]) if symmetric else Q.shape)

    lib.register_autograd("qrkd::photonic_fidelity", _photonic_backward, setup_context=_photonic_setup)


if _load() and hasattr(torch.ops.qrkd, "photonic_fidelity"):
    _register_photonic_ops()
