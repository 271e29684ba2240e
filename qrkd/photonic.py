"""The photonic fidelity kernel of MerLin's `FidelityKernel.simple`, exactly and with gradients (DESIGN.md 3.5).

MerLin's feature map is U(x) = R D(x) L: a fixed interferometer L, phase shifts D(x) = diag(e^{i c x_1}, ...,
e^{i c x_d}, 1, ..., 1) on the first d modes, a fixed interferometer R, fed the Fock state s. Its kernel
|<s| U(x_i) U(x_j)^H |s>|^2 is, with S the occupied modes (mode k repeated s_k times, n photons in all),

    K(x_i, x_j) = |Perm(P_i P_j^H)|^2 / prod_k(s_k!)^2,     P_i = R[S, :] D(x_i)   (n x m, one per sample)

L cancels. The pairwise permanents are one fused op, `qrkd.functional.photonic_fidelity`; this module holds R and
s and builds the per-sample matrices P.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from . import functional

MAX_PHOTONS = functional.PHOTONIC_MAX_PHOTONS


def haar_unitary(m: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An m x m Haar-random unitary (complex128): QR of a complex Gaussian matrix with the phases of R's diagonal
    moved into Q (Mezzadri's recipe)."""
    re = torch.randn(m, m, generator=generator, dtype=torch.float64)
    im = torch.randn(m, m, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(torch.complex(re, im))
    d = torch.diagonal(r)
    return q * (d / d.abs()).unsqueeze(0)


def _is_int(v) -> bool:
    """Python and numpy integers (np.int64 from a config or an array), never bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    """Python and numpy real numbers, never bool; tensors are refused (a 0-d tensor would be read once, detached)."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, torch.Tensor))


def default_input_state(n_modes: int, n_photons: int | None = None) -> list:
    """MerLin's FidelityKernel rule: alternating single photons [1, 0, 1, 0, ...]; with a photon count, the
    alternating positions are filled first, then the remaining positions left to right."""
    if n_photons is None:
        return [1 if i % 2 == 0 else 0 for i in range(n_modes)]
    if not _is_int(n_photons):
        raise TypeError(f"n_photons must be an int, got {type(n_photons).__name__}")
    if n_photons <= 0 or n_photons > n_modes:
        raise ValueError(
            f"n_photons must be between 1 and n_modes={n_modes} (one photon per mode at most when the state is "
            f"derived from a photon count), got {n_photons}"
        )
    n_photons = int(n_photons)
    slots = (n_modes + 1) // 2
    state = [0] * n_modes
    if n_photons <= slots:
        for i in range(n_photons):
            state[2 * i] = 1
        return state
    state = [1 if i % 2 == 0 else 0 for i in range(n_modes)]
    remaining = n_photons - slots
    for i in range(1, n_modes, 2):
        if remaining <= 0:
            break
        state[i] = 1
        remaining -= 1
    return state


def _check_input_state(input_state, n_modes: int, n_photons) -> list:
    if isinstance(input_state, torch.Tensor):
        input_state = input_state.tolist()
    try:
        state = list(input_state)
    except TypeError:
        raise TypeError(f"input_state must be a sequence of ints, got {type(input_state).__name__}") from None
    if not all(_is_int(s) for s in state):
        raise TypeError(f"input_state must hold ints (photons per mode), got {state!r}")
    state = [int(s) for s in state]
    if len(state) != n_modes:
        raise ValueError(f"input_state must have one entry per mode (n_modes={n_modes}), got length {len(state)}")
    if any(s < 0 for s in state):
        raise ValueError(f"input_state must not be negative, got {state!r}")
    if sum(state) == 0:
        raise ValueError(f"input_state must hold at least one photon, got {state!r}")
    if n_photons is not None and sum(state) != n_photons:
        raise ValueError(f"n_photons={n_photons} does not match the photon count {sum(state)} of input_state {state}")
    return state


class PhotonicFidelityKernel(nn.Module):
    """K(x, y)_ij = |<s| U(x_i) U(y_j)^H |s>|^2 for MerLin's simple feature map, exact and differentiable.

    Args:
        input_size: d, the feature width (features are encoded as phases on modes 0..d-1).
        n_modes: m (default d + 1, as MerLin); must be >= input_size.
        n_photons: derive the input state from a photon count by MerLin's rule (1 <= n_photons <= m).
        input_state: the Fock state, photons per mode (several photons in a mode are allowed); overrides the rule.
        seed: seeds the Haar-random interferometer R (None: torch's global generator).
        angle_scale: c in D(x) = diag(e^{i c x}), MerLin's angle_encoding_scale.
        dtype: the lowest precision the kernel is computed in: a float32 input with dtype=torch.float64 is computed
            (and returned) in float64; float64 inputs are always computed in float64.

    `k(x)` is the N x N matrix, `k(x, y)` the N x M one. The total photon count must be at most 12.

    The interferometer R is a complex buffer (`unitary`), complex128 when built. Module casts keep it exact on every
    path PyTorch moves a module by (`.to`, `.double`, `.float`, `.half`, `.type`, `.cuda`, `.to_empty`): a cast to
    float64 (or complex128) makes it complex128 and the module's dtype float64; a cast to float32, float16 or
    bfloat16 (or complex64) makes it complex64 and the dtype float32 (half-precision features are computed in
    float32, as everywhere in qrkd); a cast to a non-floating dtype is a TypeError. Its imaginary part is never
    dropped, and `to_empty` keeps its values (and the input state): they are constants, not uninitialised weights.
    A state_dict is checked before anything is copied: an input state with no photon, a negative count or more than
    12 photons, or a matrix that is not complex and unitary, is refused and leaves the module unchanged.
    """

    def __init__(
        self,
        input_size: int,
        n_modes: int | None = None,
        *,
        n_photons: int | None = None,
        input_state=None,
        seed: int | None = None,
        angle_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not _is_int(input_size):
            raise TypeError(f"input_size must be an int, got {type(input_size).__name__}")
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        if n_modes is None:
            n_modes = input_size + 1
        if not _is_int(n_modes):
            raise TypeError(f"n_modes must be an int, got {type(n_modes).__name__}")
        if n_modes < input_size:
            raise ValueError(f"n_modes must be >= input_size={input_size} (one phase per feature), got {n_modes}")
        if input_state is None:
            state = default_input_state(n_modes, n_photons)
        else:
            state = _check_input_state(input_state, n_modes, n_photons)
        if sum(state) > MAX_PHOTONS:
            raise ValueError(f"at most {MAX_PHOTONS} photons are supported, the input state {state} has {sum(state)}")
        if not _is_real(angle_scale) or not math.isfinite(angle_scale):
            raise TypeError(f"angle_scale must be a finite number, got {angle_scale!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if seed is not None and not _is_int(seed):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.input_size, self.n_modes = int(input_size), int(n_modes)
        self.angle_scale, self.dtype = float(angle_scale), dtype
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("unitary", haar_unitary(self.n_modes, generator))
        self.register_buffer("input_state", torch.tensor(state, dtype=torch.long))
        self._sync_state()

    # ----------------------------------------------------------------------------------------------------- state
    def _sync_state(self) -> None:
        """The Python-side copies of the input state (read per call without a device sync, and traceable)."""
        state = self.input_state.tolist()
        problem = self._state_problem(self.input_state)
        if problem:
            raise ValueError(problem)
        self.n_photons = sum(state)
        self._rows = [k for k, s in enumerate(state) for _ in range(s)]
        self._normalisation = float(math.prod(math.factorial(s) for s in state))

    def _state_problem(self, state) -> str | None:
        """Why `state` cannot be this module's input state (None when it can)."""
        if not isinstance(state, torch.Tensor) or state.is_floating_point() or state.is_complex() or \
                state.dtype == torch.bool:
            return f"input_state must be an integer tensor, got {type(state).__name__} {getattr(state, 'dtype', '')}"
        if tuple(state.shape) != (self.n_modes,):
            return f"input_state must have shape ({self.n_modes},) (one entry per mode), got {tuple(state.shape)}"
        values = state.tolist()
        if min(values) < 0 or not 1 <= sum(values) <= MAX_PHOTONS:
            return (f"input_state {values} is not a valid state of {self.n_modes} modes: photon counts must be >= 0 "
                    f"with 1 to {MAX_PHOTONS} photons in all")
        return None

    def _unitary_problem(self, u) -> str | None:
        """Why `u` cannot be this module's interferometer (None when it can)."""
        m = self.n_modes
        if not isinstance(u, torch.Tensor) or not u.is_complex():
            return f"unitary must be a complex {m} x {m} tensor, got {type(u).__name__} {getattr(u, 'dtype', '')}"
        if tuple(u.shape) != (m, m):
            return f"unitary must have shape ({m}, {m}), got {tuple(u.shape)}"
        if u.device.type == "meta":
            return None
        single = u.dtype in (torch.complex32, torch.complex64)
        u = u.detach().to(torch.complex128)
        err = (u @ u.conj().T - torch.eye(m, dtype=u.dtype, device=u.device)).abs().max().item()
        if not err <= (1e-4 if single else 1e-9):  # also refuses NaN
            return f"unitary is not unitary: max |U U^H - I| = {err:.3g}"
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # all or nothing: nothing is copied unless both buffers present are valid
        problems = []
        if prefix + "unitary" in state_dict:
            problems.append(self._unitary_problem(state_dict[prefix + "unitary"]))
        if prefix + "input_state" in state_dict:
            problems.append(self._state_problem(state_dict[prefix + "input_state"]))
        problems = [p for p in problems if p]
        if problems:
            error_msgs.extend(f"{prefix or type(self).__name__ + '.'}{p}; the module was left unchanged"
                              for p in problems)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._sync_state()

    def _apply(self, fn, recurse=True):
        # nn.Module.to(float64) turns a complex buffer into a real one (dropping the imaginary part) and to_empty
        # forgets its values: the interferometer and the input state are constants that only follow the device,
        # and the interferometer the precision, of the cast (see the class docstring). PyTorch's own _apply does
        # not see them; what fn does to floating tensors is read off two empty probes.
        probe32, probe64 = (fn(torch.zeros(0, dtype=d, device=self.unitary.device))
                            for d in (torch.float32, torch.float64))
        target = probe32.dtype if probe32.dtype != torch.float32 else probe64.dtype
        if probe32.dtype == torch.float32 and probe64.dtype == torch.float64:
            target = None  # no precision change: a move, to_empty, share_memory...
        elif not (target.is_floating_point or target.is_complex):
            raise TypeError(f"{type(self).__name__} cannot be cast to {target}: its interferometer is complex and "
                            "its computations floating point")
        if target is None:
            cdtype, dtype = self.unitary.dtype, self.dtype
        else:
            wide = target in (torch.float64, torch.complex128)
            cdtype = torch.complex128 if wide else torch.complex64
            dtype = torch.float64 if wide else torch.float32
        order = list(self._buffers)
        constants = {name: self._buffers.pop(name) for name in ("unitary", "input_state")}
        moved = constants
        try:
            super()._apply(fn, recurse)
            moved = {name: self._move_constant(fn, t, probe32.device, cdtype if t.is_complex() else t.dtype,
                                               target is None) for name, t in constants.items()}
        finally:  # back in their places (the state_dict's order), moved or, after an error, as they were
            rest = dict(self._buffers)
            self._buffers.clear()
            self._buffers.update({name: moved[name] if name in moved else rest[name] for name in order})
        self.dtype = dtype
        return self

    @staticmethod
    def _move_constant(fn, t: torch.Tensor, device, dtype, same_dtype: bool) -> torch.Tensor:
        if t.device.type == "meta":  # no values to keep
            return fn(t).to(device, dtype)
        if same_dtype and fn(t) is t:  # in place (share_memory_) or nothing to do
            return t
        return t.to(device, dtype)  # values kept: never fn's (to_empty's are uninitialised)

    @property
    def rows(self) -> list:
        """The occupied modes, mode k repeated s_k times: the rows of R that P uses."""
        return list(self._rows)

    @property
    def normalisation(self) -> float:
        """prod_k s_k!: the permanent of P_i P_j^H divided by this is the transition amplitude."""
        return self._normalisation

    def _working_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, self.dtype) if x.dtype in (torch.float32, torch.float64) else self.dtype

    def _check_x(self, name: str, x) -> torch.Tensor:
        functional.check_features(name, x)
        if x.shape[1] != self.input_size:
            raise ValueError(
                f"{name} must have input_size={self.input_size} feature columns, got shape {tuple(x.shape)}"
            )
        if x.device != self.unitary.device:
            raise ValueError(f"{name} is on {x.device} but the kernel is on {self.unitary.device}; move it with .to()")
        return x

    def matrices(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The per-sample matrices P_i = R[S, :] D(x_i): N x n x m complex, differentiable in x."""
        dtype = dtype or self._working_dtype(x)
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        theta = x.to(dtype) * self.angle_scale
        phases = torch.complex(torch.cos(theta), torch.sin(theta))
        fixed = self.n_modes - self.input_size
        if fixed:
            phases = torch.cat([phases, phases.new_ones(x.shape[0], fixed)], dim=1)
        r_s = self.unitary[self._rows].to(cdtype)
        return r_s.unsqueeze(0) * phases.unsqueeze(1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
        x = self._check_x("x", x)
        if y is None:
            k = functional.photonic_fidelity(self.matrices(x), backend=backend)
        else:
            y = self._check_x("y", y)
            dtype = torch.promote_types(self._working_dtype(x), self._working_dtype(y))
            k = functional.photonic_fidelity(self.matrices(x, dtype), self.matrices(y, dtype), backend=backend)
        norm = self.normalisation
        return k if norm == 1.0 else k / norm**2

    def extra_repr(self):
        return (
            f"input_size={self.input_size}, n_modes={self.n_modes}, input_state={self.input_state.tolist()}, "
            f"angle_scale={self.angle_scale}, dtype={self.dtype}"
        )

    # ------------------------------------------------------------------------------------------------ from MerLin
    @classmethod
    def from_merlin(cls, kernel, *, dtype: torch.dtype | None = None) -> "PhotonicFidelityKernel":
        """Read R, the angle scale and the input state out of a MerLin FidelityKernel whose feature map is one
        angle-encoding layer between two fixed interferometers (what `FidelityKernel.simple` builds), once.
        dtype: the module's dtype (default: the MerLin kernel's).

        R is recovered up to a phase per encoded column and a unitary mixing of the other columns, which leave the
        kernel unchanged: probing one feature at a time, U(t e_k) U(0)^H - I = (e^{i c t} - 1) r_k r_k^H is rank one.
        The result is checked against MerLin's unitary at a random point; anything else is a ValueError.
        """
        layer = getattr(kernel, "_quantum_layer", None)
        feature_map = getattr(kernel, "feature_map", None)
        if layer is None or feature_map is None or not hasattr(layer, "_compute_unitary"):
            raise TypeError(f"from_merlin expects a merlin FidelityKernel, got {type(kernel).__name__}")
        if getattr(kernel, "shots", 0):
            raise ValueError(f"from_merlin supports exact kernels only (shots=0), got shots={kernel.shots}")
        space = getattr(kernel, "computation_space", None)
        if space is not None and getattr(space, "name", str(space)).upper() != "FOCK":
            raise ValueError(f"from_merlin supports computation_space='fock' only, got {space}")
        if getattr(kernel, "has_custom_noise_model", False):
            raise ValueError("from_merlin does not support MerLin kernels with a noise model")
        d = int(kernel.input_size)
        m = int(feature_map.circuit.m)
        state = [int(s) for s in kernel.input_state]

        def unitary(x):
            with torch.no_grad():
                xt = torch.as_tensor(x, dtype=kernel.dtype)
                return layer._compute_unitary(layer._encode_single(xt)).detach().to(torch.complex128).cpu()

        single = kernel.dtype != torch.float64
        tol = 1e-4 if single else 1e-9
        u0_h = unitary([0.0] * d).conj().T
        eye = torch.eye(m, dtype=torch.complex128)

        def probe(k, t):
            x = [0.0] * d
            x[k] = t
            w = unitary(x) @ u0_h
            theta = torch.angle(torch.trace(w) - (m - 1)).item()
            return w - eye, theta

        columns, scales = [], []
        for k in range(d):
            diff, theta = probe(k, 0.5)
            if diff.abs().max().item() < tol:
                raise ValueError(f"feature {k} does not change the MerLin circuit: not a supported feature map")
            c = theta / 0.5
            # refine where the phase is large (better relative accuracy), unwrapping with the first estimate
            t2 = 3.0 / abs(c) if abs(c) > 1e-3 else 0.5
            diff, theta2 = probe(k, t2)
            c = (theta2 + 2 * math.pi * round((c * t2 - theta2) / (2 * math.pi))) / t2
            j = int(diff.abs().pow(2).sum(0).argmax())
            columns.append(diff[:, j] / diff[:, j].norm())
            scales.append(c)
        scale = sum(scales) / d
        if any(abs(c - scale) > tol * max(1.0, abs(scale)) for c in scales):
            raise ValueError(f"from_merlin supports one angle scale for all features, the kernel encodes {scales}")
        enc = torch.stack(columns, dim=1)
        full, _ = torch.linalg.qr(enc, mode="complete")
        r = torch.cat([enc, full[:, d:]], dim=1)
        u, _, vh = torch.linalg.svd(r)  # nearest unitary (removes the probe's rounding)
        r = u @ vh

        gen = torch.Generator().manual_seed(1234)
        x = (torch.rand(d, generator=gen, dtype=torch.float64) * 2 - 1) * (2.0 / max(abs(scale), 1e-3))
        phases = torch.ones(m, dtype=torch.complex128)
        phases[:d] = torch.polar(torch.ones(d, dtype=torch.float64), scale * x)
        expected = (r * phases) @ r.conj().T
        err = (unitary(x.tolist()) @ u0_h - expected).abs().max().item()
        if not err <= 10 * tol:
            raise ValueError(
                "from_merlin supports feature maps made of one angle-encoding layer (feature k -> a phase on one "
                "mode) between two fixed interferometers, as FidelityKernel.simple builds; this kernel's unitary "
                f"differs from that form by {err:.3g}"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dtype is None:
                dtype = torch.float32 if single else torch.float64
            out = cls(d, m, input_state=state, angle_scale=scale, dtype=dtype)
        out.unitary.copy_(r)
        return out
