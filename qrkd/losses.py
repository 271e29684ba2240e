"""nn.Module wrappers of the losses, and DistillationLoss: the seed notebook's class, with its arguments."""

from __future__ import annotations

import math
import numbers
import re
import warnings

import numpy as np
import torch
from torch import nn

from . import backends
from . import functional


def _number(name: str, value) -> float:
    """A finite real number as a float. Python and numpy numbers are accepted alike; bools and tensors are refused
    (a 0-d tensor would be read once and detached: pass `t.item()` for a fixed weight)."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python or numpy number, got a torch.Tensor (pass {name}=t.item())")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_kd_arguments(temperature, alpha, alpha_name: str) -> tuple:
    temperature, alpha = _number("temperature", temperature), _number(alpha_name, alpha)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{alpha_name} must be in [0, 1], got {alpha}")
    return temperature, alpha


def _flag(name: str, value) -> bool:
    """A bool (numpy's np.bool_ too); 0/1 and strings are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _optional_int(name: str, value, minimum: int):
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class KDLoss(nn.Module):
    """Hinton's KD loss; temperature a finite number > 0, alpha in [0, 1]."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5):
        super().__init__()
        self.temperature, self.alpha = _check_kd_arguments(temperature, alpha, "alpha")

    def forward(self, student_logits, teacher_logits):
        return functional.kd_loss(student_logits, teacher_logits, self.temperature, self.alpha)

    def extra_repr(self):
        return f"temperature={self.temperature}, alpha={self.alpha}"


class RKDDistanceLoss(nn.Module):
    def __init__(self, *, zero_diagonal: bool = False, backend: str = "auto"):
        super().__init__()
        self.zero_diagonal, self.backend = _flag("zero_diagonal", zero_diagonal), backend

    def forward(self, student, teacher):
        return functional.rkd_distance_loss(student, teacher, zero_diagonal=self.zero_diagonal, backend=self.backend)

    def extra_repr(self):
        return f"zero_diagonal={self.zero_diagonal}, backend={self.backend!r}"


class RKDAngleLoss(nn.Module):
    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, student, teacher):
        return functional.rkd_angle_loss(student, teacher, backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}"


class FidelityKernelLoss(nn.Module):
    """smooth_l1 between the student's and the teacher's fidelity kernels. `kernel` is 'simple' or a
    PhotonicFidelityKernel (then registered as a submodule, so its interferometer is saved with this module)."""

    def __init__(self, *, kernel="simple", backend: str = "auto"):
        super().__init__()
        self.kernel, self.backend = kernel, backend

    def forward(self, student, teacher):
        return functional.fidelity_kernel_loss(student, teacher, kernel=self.kernel, backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}" + (", kernel='simple'" if isinstance(self.kernel, str) else "")


_QK_BACKENDS = ("simple", "merlin")


class DistillationLoss(nn.Module):
    """kd * KD + dr * RKD distance + ar * RKD angle + qk * fidelity-kernel term; a term whose weight is 0 is skipped.

    qk_backend="simple" is the classical fidelity kernel of the normalised features; "merlin" is the photonic kernel
    of MerLin's FidelityKernel.simple (m = qk_n_modes, n = qk_n_photons), computed exactly and with gradient.
    forward(logits_s, logits_t, feat_s, feat_t) returns the weighted sum as a scalar; `last_terms` keeps the
    unweighted terms of the last call (detached) for logging. qk_detach_student=True computes the kernel term on
    detached student features, as the QRKD research code does: the term then sends no gradient. This class is the
    one owner of the list of terms: in data-parallel training, forward(..., shard=) returns this process's part of
    the global-batch loss (see forward), and term_backends() reports which backend each term runs on.

    Weights are finite numbers >= 0, temperature a finite number > 0, kd_alpha in [0, 1], zero_diagonal a bool;
    numpy scalars are taken as the Python numbers they hold, torch tensors are refused (pass `t.item()`).

    Persistence: the photonic kernels (one per feature width, built on first use) are submodules, so their
    interferometers are in the state_dict as `kernels.<width>.*`; a fresh DistillationLoss with the same arguments
    builds the kernels a state_dict names before loading them, so `load_state_dict` (strict or not) restores the
    exact loss. The module pickles (and `torch.save`s) whole.
    """

    def __init__(
        self,
        kd: float = 0.5,
        dr: float = 0.1,
        ar: float = 0.1,
        qk: float = 0.0,
        qk_backend: str = "simple",
        qk_n_modes=None,
        qk_n_photons=None,
        temperature: float = 4.0,
        kd_alpha: float = 0.5,
        backend: str = "auto",
        *,
        zero_diagonal: bool = False,
        qk_seed: int = 0,
        qk_from_merlin: bool = False,
        qk_detach_student: bool = False,
    ):
        super().__init__()
        weights = {}
        for name, value in (("kd", kd), ("dr", dr), ("ar", ar), ("qk", qk)):
            weights[name] = _number(name, value)
            if weights[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {weights[name]}")
        if not isinstance(qk_backend, str) or qk_backend not in _QK_BACKENDS:
            raise ValueError(f"qk_backend must be one of {_QK_BACKENDS}, got {qk_backend!r}")
        temperature, kd_alpha = _check_kd_arguments(temperature, kd_alpha, "kd_alpha")
        qk_n_modes = _optional_int("qk_n_modes", qk_n_modes, 1)
        qk_n_photons = _optional_int("qk_n_photons", qk_n_photons, 1)
        if not isinstance(qk_seed, numbers.Integral) or isinstance(qk_seed, bool):
            raise TypeError(f"qk_seed must be an int, got {type(qk_seed).__name__}")
        self.kd, self.dr, self.ar, self.qk = weights["kd"], weights["dr"], weights["ar"], weights["qk"]
        self.qk_backend, self.qk_n_modes, self.qk_n_photons = qk_backend, qk_n_modes, qk_n_photons
        self.temperature, self.kd_alpha, self.backend = temperature, kd_alpha, backend
        self.zero_diagonal, self.qk_seed = _flag("zero_diagonal", zero_diagonal), int(qk_seed)
        self.qk_from_merlin = _flag("qk_from_merlin", qk_from_merlin)
        self.qk_detach_student = _flag("qk_detach_student", qk_detach_student)
        self.kernels = nn.ModuleDict()  # photonic kernels, one per feature width, built on first use
        self.last_terms: dict = {}

    @property
    def uses_teacher(self) -> bool:
        """Whether any term is on (forward needs the teacher's outputs)."""
        return any(w > 0 for w in (self.kd, self.dr, self.ar, self.qk))

    @property
    def uses_logits(self) -> bool:
        """Whether forward reads the logits (the KD term is on); when not, they may be None."""
        return self.kd > 0

    def kernel_for(self, width: int, device="cpu"):
        """The fidelity kernel of the qk term on features of `width` columns: "simple", or this width's photonic
        kernel (built on first use on `device`, then kept as a submodule)."""
        if self.qk_backend == "simple":
            return "simple"
        key = str(width)
        if key not in self.kernels:
            self.kernels[key] = self._build_photonic_kernel(width).to(device)
        return self.kernels[key]

    _KERNEL_KEY = re.compile(r"kernels\.([0-9]+)\.")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the kernels are built lazily: build the ones the state_dict names (before PyTorch recurses into the
        # submodules), so that their interferometers are loaded rather than reported unexpected or dropped
        if self.qk_backend == "merlin":
            device = next((k.unitary.device for k in self.kernels.values()), torch.device("cpu"))
            widths = {m.group(1) for m in (self._KERNEL_KEY.match(k[len(prefix):]) for k in state_dict
                                           if k.startswith(prefix)) if m}
            for width in sorted(widths - set(self.kernels)):
                unitary = state_dict.get(f"{prefix}kernels.{width}.unitary")
                modes = self.qk_n_modes or int(width) + 1
                if width != str(int(width)) or int(width) < 1 or not isinstance(unitary, torch.Tensor) or \
                        tuple(unitary.shape) != (modes, modes):
                    error_msgs.append(f"{prefix}kernels.{width} does not fit this DistillationLoss (a kernel for "
                                      f"width {int(width)} has a {modes} x {modes} unitary)")
                    continue
                try:
                    self.kernels[width] = self._build_photonic_kernel(int(width)).to(device)
                except (TypeError, ValueError) as exc:
                    error_msgs.append(f"{prefix}kernels.{width} cannot be built by this DistillationLoss: {exc}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _build_photonic_kernel(self, width: int):
        """The photonic kernel for features of this width: seeded by qk_seed (per width, so runs are reproducible),
        m = qk_n_modes (default width + 1), n = qk_n_photons (default: MerLin's alternating state). With
        qk_from_merlin, R is read out of MerLin's own FidelityKernel built under the same seed (needs merlinquantum)."""
        from .photonic import PhotonicFidelityKernel

        if not self.qk_from_merlin:
            seed = self.qk_seed + width
            return PhotonicFidelityKernel(width, self.qk_n_modes, n_photons=self.qk_n_photons, seed=seed)
        try:
            import merlin
        except ImportError as exc:
            raise ImportError("qk_from_merlin=True needs merlinquantum (pip install 'qrkd[merlin]')") from exc
        state = PhotonicFidelityKernel(width, self.qk_n_modes, n_photons=self.qk_n_photons, seed=0).input_state
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # MerLin 0.4 deprecates n_modes, still honours it
            torch.manual_seed(self.qk_seed + width)
            feature_map = merlin.FeatureMap.simple(input_size=width, n_modes=self.qk_n_modes, dtype=torch.float64)
            kernel = merlin.FidelityKernel(
                feature_map, input_state=state.tolist(), force_psd=False, dtype=torch.float64
            )
        return PhotonicFidelityKernel.from_merlin(kernel, dtype=torch.float32)

    def forward(self, logits_s, logits_t, feat_s, feat_t, *, shard=None):
        """The weighted sum of the terms that are on, a scalar. logits_* may be None when the KD term is off.

        shard: None for one process. In data-parallel training (K processes, each with its own rows of a global
        batch), this process's share (qrkd.train.BatchShard): the loss then returns this process's part of the
        global-batch loss, such that the parts' mean over the processes is the global loss and DDP's gradient
        average is the global gradient. The KD term, a per-sample mean, is scaled by `shard.mean_scale`; the
        relational terms see the global batch, the features gathered by `shard.gather` (the student's with its
        gradient path), and the angle term (O(N^3)) is split by anchors, this process taking `shard.anchors()`
        with its share multiplied by `shard.world_size`. `last_terms` then holds this process's unweighted parts.
        """
        terms = {}
        if self.kd > 0:
            weight = self.kd if shard is None else self.kd * shard.mean_scale
            terms["kd"] = (weight, functional.kd_loss(logits_s, logits_t, self.temperature, self.kd_alpha))
        if shard is not None and (self.dr > 0 or self.ar > 0 or self.qk > 0):
            feat_s, feat_t = shard.gather(feat_s, with_grad=True), shard.gather(feat_t, with_grad=False)
        if self.dr > 0:
            loss = functional.rkd_distance_loss(feat_s, feat_t, zero_diagonal=self.zero_diagonal,
                                                backend=self.backend)
            terms["rkd_distance"] = (self.dr, loss)
        if self.ar > 0:
            if shard is None:
                terms["rkd_angle"] = (self.ar, functional.rkd_angle_loss(feat_s, feat_t, backend=self.backend))
            else:
                share = functional.rkd_angle_loss(feat_s, feat_t, backend=self.backend, anchors=shard.anchors())
                terms["rkd_angle"] = (self.ar * shard.world_size, share)
        if self.qk > 0:
            kernel = self.kernel_for(min(feat_s.shape[-1], feat_t.shape[-1]), feat_s.device)
            feat_qk = feat_s.detach() if self.qk_detach_student else feat_s
            terms["qk"] = (self.qk, functional.fidelity_kernel_loss(feat_qk, feat_t, kernel=kernel,
                                                                    backend=self.backend))
        self.last_terms = {name: loss.detach() for name, (_, loss) in terms.items()}
        if not terms:
            return feat_s.new_zeros(())
        return sum(weight * loss for weight, loss in terms.values())

    def term_backends(self, device_type: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        """Which backend each term that is on runs on for features of `dtype` on `device_type`: what this loss's
        `backend` ("auto": $QRKD_BACKEND, else the automatic pick) resolves to here. {term: backend name}, with the
        kernel term named by its kernel; empty when no term is on."""
        chosen = self.backend
        if chosen == "auto":
            chosen = backends.env_backend() or "auto"

        def pick(op, op_dtype=dtype):
            return backends.auto_backend_name(op, device_type, op_dtype) if chosen == "auto" else chosen

        out = {}
        if self.kd > 0:
            out["kd"] = "torch (eager)"
        if self.dr > 0:
            out["rkd_distance"] = pick("rkd_distance_loss")
        if self.ar > 0:
            out["rkd_angle"] = pick("rkd_angle_loss")
        if self.qk > 0:
            if self.qk_backend == "simple":
                out["fidelity_kernel(simple)"] = pick("fidelity_kernel_loss")
            else:
                complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
                detached = ", student detached" if self.qk_detach_student else ""
                name = f"fidelity_kernel(merlin m={self.qk_n_modes} n={self.qk_n_photons}{detached})"
                out[name] = pick("photonic_fidelity", complex_dtype)
        return out

    def settings(self) -> dict:
        """The arguments that set the terms: weights, kernel, temperature (what an experiment's results record)."""
        return {"kd": self.kd, "dr": self.dr, "ar": self.ar, "qk": self.qk, "qk_backend": self.qk_backend,
                "qk_n_modes": self.qk_n_modes, "qk_n_photons": self.qk_n_photons,
                "qk_detach_student": self.qk_detach_student, "temperature": self.temperature,
                "kd_alpha": self.kd_alpha}

    def extra_repr(self):
        return (
            f"kd={self.kd}, dr={self.dr}, ar={self.ar}, qk={self.qk}, qk_backend={self.qk_backend!r}, "
            f"temperature={self.temperature}, kd_alpha={self.kd_alpha}, backend={self.backend!r}"
        )
