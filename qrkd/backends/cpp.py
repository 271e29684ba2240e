"""Backend "cpp": the compiled extension qrkd._C (C++/OpenMP CPU kernels; CUDA kernels where it was built with them).

The ops are torch custom ops registered by the extension under torch.ops.qrkd.*. Loading the extension happens once,
on first use of the backend; a missing build never breaks `import qrkd`. QRKD_JIT=1 opts into a ninja JIT build of
csrc/ when no prebuilt extension is importable (minutes on a small machine: never done implicitly).
"""

from __future__ import annotations

import glob
import os

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_state = {"loaded": None, "detail": "", "cuda": False}


def _jit_build():
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join(_ROOT, "csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        raise RuntimeError(f"QRKD_JIT=1 but no C++ sources under {os.path.join(_ROOT, 'csrc')}")
    cuda_sources = sorted(glob.glob(os.path.join(_ROOT, "csrc", "cuda", "*.cu")))
    with_cuda = bool(cuda_sources) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    cpp_extension.load(
        name="qrkd_C_jit",
        sources=sources + (cuda_sources if with_cuda else []),
        extra_cflags=["-O3", "-fopenmp"] + (["-DWITH_CUDA"] if with_cuda else []),
        extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
        is_python_module=False,
        verbose=False,
    )
    return with_cuda


def _load():
    if _state["loaded"] is not None:
        return _state["loaded"]
    try:
        from qrkd import _C  # noqa: F401  (registers torch.ops.qrkd.*)

        _state["cuda"] = bool(getattr(_C, "WITH_CUDA", False))
        _state["detail"] = f"qrkd._C ({'CPU + CUDA' if _state['cuda'] else 'CPU'} kernels)"
        _state["loaded"] = True
    except ImportError as exc:
        if os.environ.get("QRKD_JIT", "") not in ("", "0"):
            try:
                _state["cuda"] = _jit_build()
                _state["detail"] = f"JIT-built extension ({'CPU + CUDA' if _state['cuda'] else 'CPU'} kernels)"
                _state["loaded"] = True
            except Exception as jit_exc:
                _state["detail"] = f"qrkd._C not built and the QRKD_JIT=1 build failed: {jit_exc}"
                _state["loaded"] = False
        else:
            _state["detail"] = f"qrkd._C not built ({exc}); build it with `make build` or set QRKD_JIT=1"
            _state["loaded"] = False
    return _state["loaded"]


def status():
    return _load(), _state["detail"]


def has_cuda_kernels() -> bool:
    return _load() and _state["cuda"]


# contract op -> the torch.ops.qrkd op whose presence means the extension implements it (filled per relation)
_OP_KERNELS: dict = {}


def supports(op, device_type, dtype):
    kernel = _OP_KERNELS.get(op)
    if kernel is None or not _load() or not hasattr(torch.ops.qrkd, kernel):
        return False
    if device_type == "cuda" and not _state["cuda"]:
        return False
    if op == "photonic_fidelity":
        return device_type in ("cpu", "cuda") and dtype in (torch.complex64, torch.complex128)
    return device_type == "cpu" and dtype in (torch.float32, torch.float64)
