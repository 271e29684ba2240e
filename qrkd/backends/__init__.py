"""Backend registry and dispatch.

Every backend module implements the same contract (DESIGN.md section 4). Each relation is a function that takes
validated inputs (student features differentiable, teacher features already detached and of the student's dtype and
device) and returns a scalar loss, differentiable in the student:

    rkd_distance_loss(student, teacher, zero_diagonal) -> Tensor
    rkd_angle_loss(student, teacher, anchor_start=0, anchor_stop=None) -> Tensor   # anchors a in [start, stop):
                                                          # that range's share of the N^3 mean (the loss when whole)
    fidelity_kernel_loss(student, teacher) -> Tensor      # the classical ("simple") kernel, columns already truncated
    fidelity_kernel_matrix(x) -> Tensor                   # N x N
    photonic_fidelity(P, Q) -> Tensor                     # N x M, P and Q complex per-sample n x m matrices

and two queries:

    status() -> (available: bool, detail: str)            # once per process; detail says why
    supports(op, device_type, dtype) -> bool              # op is one of OPS

A backend module may leave out a relation it does not implement; `supports` then says False for it.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from ..relations import OPS  # the contract's functions, one per relation (qrkd/relations.py)

# name -> module path; order is only for listing
_MODULES = {
    "reference": "qrkd.backends.reference",
    "torch": "qrkd.backends.pure_torch",
    "cpp": "qrkd.backends.cpp",
    "triton": "qrkd.backends.triton_launch",
}

# what "auto" tries, fastest first, per device type
_AUTO_ORDER = {
    "cpu": ("cpp", "torch"),
    "cuda": ("triton", "cpp", "torch"),
}

_loaded: dict = {}
_status: dict = {}
_warned: set = set()


def _module(name: str):
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            ok, detail = mod.status()
        except Exception as exc:  # a broken optional backend must never break the package
            mod, ok, detail = None, False, f"import failed: {type(exc).__name__}: {exc}"
        _loaded[name] = mod
        _status[name] = (ok, detail)
    return _loaded[name]


def backend_module(name: str):
    """The module of backend `name` (None when it failed to import); it runs an op where supports() says so."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {list(_MODULES)}; got {name!r}")
    return _module(name)


def backend_status() -> dict:
    """{name: (available, detail)} for every known backend."""
    for name in _MODULES:
        _module(name)
    return {name: _status[name] for name in _MODULES}


def available_backends() -> list:
    """Names of the backends that can run in this process."""
    return [name for name, (ok, _) in backend_status().items() if ok]


def env_backend() -> str:
    """$QRKD_BACKEND with surrounding blanks removed ('' when unset): the backend that replaces "auto"."""
    return os.environ.get("QRKD_BACKEND", "").strip()


def _require_ext() -> bool:
    return os.environ.get("QRKD_REQUIRE_EXT", "") not in ("", "0")


def _supports(name: str, op: str, device_type: str, dtype: torch.dtype) -> bool:
    mod = _module(name)
    return mod is not None and _status[name][0] and hasattr(mod, op) and mod.supports(op, device_type, dtype)


def supports(backend: str, op: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether `backend` is available in this process and runs `op` (one of OPS) on `device_type` tensors of `dtype`."""
    if backend not in _MODULES:
        raise ValueError(f"backend must be one of {list(_MODULES)}; got {backend!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}; got {op!r}")
    return _supports(backend, op, device_type, dtype)


def resolve(backend: str, op: str, tensor: torch.Tensor):
    """The backend module that runs `op` for `tensor` (its device and dtype)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device_type, dtype = tensor.device.type, tensor.dtype
    source = ""
    if backend == "auto":
        backend = env_backend() or "auto"
        source = "" if backend == "auto" else " (from QRKD_BACKEND)"
    if backend != "auto":
        if backend not in _MODULES:
            if source:
                raise ValueError(f"QRKD_BACKEND must be 'auto' or one of {list(_MODULES)}; got {backend!r}")
            raise ValueError(f"backend must be 'auto' or one of {list(_MODULES)}; got {backend!r}")
        if not _module(backend) or not _status[backend][0]:
            raise ValueError(
                f"backend {backend!r}{source} is not available ({_status[backend][1]}); "
                f"available: {available_backends()}"
            )
        if not _supports(backend, op, device_type, dtype):
            raise ValueError(
                f"backend {backend!r}{source} does not run {op} on {device_type} tensors of dtype {dtype}; "
                f"available: {available_backends()}"
            )
        return _module(backend)

    order = _AUTO_ORDER.get(device_type, ("torch",))
    for name in order:
        if _supports(name, op, device_type, dtype):
            if name == "torch" and order[0] != "torch":
                _fallback(order[0], op, device_type, dtype)
            return _module(name)
    raise ValueError(f"no backend runs {op} on {device_type} tensors of dtype {dtype}")


def _fallback(preferred: str, op: str, device_type: str, dtype: torch.dtype) -> None:
    ok, detail = _status[preferred] if preferred in _status else (False, "not loaded")
    why = detail if not ok else f"it does not run {op} on {device_type}/{dtype}"
    msg = f"qrkd: backend {preferred!r} unavailable for {op} ({why}); falling back to the pure-torch backend"
    if _require_ext():
        raise RuntimeError(msg + " [QRKD_REQUIRE_EXT=1 forbids the fallback]")
    key = (preferred, device_type)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def auto_backend_name(op: str, device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """Which backend "auto" would pick, without warning or raising."""
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        if _supports(name, op, device_type, dtype):
            return name
    return "none"
