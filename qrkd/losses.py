"""nn.Module wrappers of the losses, and DistillationLoss: the seed notebook's class, with its arguments."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import functional as Fq


class KDLoss(nn.Module):
    def __init__(self, temperature: float = 4.0, alpha: float = 0.5):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student_logits, teacher_logits):
        return Fq.kd_loss(student_logits, teacher_logits, self.temperature, self.alpha)

    def extra_repr(self):
        return f"temperature={self.temperature}, alpha={self.alpha}"


class RKDDistanceLoss(nn.Module):
    def __init__(self, *, zero_diagonal: bool = False, backend: str = "auto"):
        super().__init__()
        self.zero_diagonal, self.backend = zero_diagonal, backend

    def forward(self, student, teacher):
        return Fq.rkd_distance_loss(student, teacher, zero_diagonal=self.zero_diagonal, backend=self.backend)

    def extra_repr(self):
        return f"zero_diagonal={self.zero_diagonal}, backend={self.backend!r}"


class RKDAngleLoss(nn.Module):
    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, student, teacher):
        return Fq.rkd_angle_loss(student, teacher, backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}"


class FidelityKernelLoss(nn.Module):
    """smooth_l1 between the student's and the teacher's fidelity kernels. `kernel` is 'simple' or a
    PhotonicFidelityKernel (then registered as a submodule, so its interferometer is saved with this module)."""

    def __init__(self, *, kernel="simple", backend: str = "auto"):
        super().__init__()
        self.kernel, self.backend = kernel, backend

    def forward(self, student, teacher):
        return Fq.fidelity_kernel_loss(student, teacher, kernel=self.kernel, backend=self.backend)

    def extra_repr(self):
        return f"backend={self.backend!r}" + (", kernel='simple'" if isinstance(self.kernel, str) else "")


_QK_BACKENDS = ("simple", "merlin")


class DistillationLoss(nn.Module):
    """kd * KD + dr * RKD distance + ar * RKD angle + qk * fidelity-kernel term; a term whose weight is 0 is skipped.

    qk_backend="simple" is the classical fidelity kernel of the normalised features; "merlin" is the photonic kernel
    of MerLin's FidelityKernel.simple (m = qk_n_modes, n = qk_n_photons), computed exactly and with gradient.
    forward(logits_s, logits_t, feat_s, feat_t) returns the weighted sum as a scalar; `last_terms` keeps the
    unweighted terms of the last call (detached) for logging. qk_detach_student=True computes the kernel term on
    detached student features, as the QRKD research code does: the term then sends no gradient.
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
        for name, value in (("kd", kd), ("dr", dr), ("ar", ar), ("qk", qk)):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if qk_backend not in _QK_BACKENDS:
            raise ValueError(f"qk_backend must be one of {_QK_BACKENDS}, got {qk_backend!r}")
        self.kd, self.dr, self.ar, self.qk = float(kd), float(dr), float(ar), float(qk)
        self.qk_backend, self.qk_n_modes, self.qk_n_photons = qk_backend, qk_n_modes, qk_n_photons
        self.temperature, self.kd_alpha, self.backend = temperature, kd_alpha, backend
        self.zero_diagonal, self.qk_seed, self.qk_from_merlin = zero_diagonal, qk_seed, qk_from_merlin
        if not isinstance(qk_detach_student, bool):
            raise TypeError(f"qk_detach_student must be a bool, got {type(qk_detach_student).__name__}")
        self.qk_detach_student = qk_detach_student
        self.kernels = nn.ModuleDict()  # photonic kernels, one per feature width, built on first use
        self.last_terms: dict = {}

    @property
    def uses_teacher(self) -> bool:
        return any(w > 0 for w in (self.kd, self.dr, self.ar, self.qk))

    def _kernel(self, width: int, device):
        if self.qk_backend == "simple":
            return "simple"
        key = str(width)
        if key not in self.kernels:
            self.kernels[key] = self._build_photonic_kernel(width).to(device)
        return self.kernels[key]

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

    def forward(self, logits_s, logits_t, feat_s, feat_t):
        terms = {}
        if self.kd > 0:
            terms["kd"] = (self.kd, Fq.kd_loss(logits_s, logits_t, self.temperature, self.kd_alpha))
        if self.dr > 0:
            loss = Fq.rkd_distance_loss(feat_s, feat_t, zero_diagonal=self.zero_diagonal, backend=self.backend)
            terms["rkd_distance"] = (self.dr, loss)
        if self.ar > 0:
            terms["rkd_angle"] = (self.ar, Fq.rkd_angle_loss(feat_s, feat_t, backend=self.backend))
        if self.qk > 0:
            kernel = self._kernel(min(feat_s.shape[-1], feat_t.shape[-1]), feat_s.device)
            feat_qk = feat_s.detach() if self.qk_detach_student else feat_s
            terms["qk"] = (self.qk, Fq.fidelity_kernel_loss(feat_qk, feat_t, kernel=kernel, backend=self.backend))
        self.last_terms = {name: loss.detach() for name, (_, loss) in terms.items()}
        if not terms:
            return feat_s.new_zeros(())
        return sum(weight * loss for weight, loss in terms.values())

    def extra_repr(self):
        return (
            f"kd={self.kd}, dr={self.dr}, ar={self.ar}, qk={self.qk}, qk_backend={self.qk_backend!r}, "
            f"temperature={self.temperature}, kd_alpha={self.kd_alpha}, backend={self.backend!r}"
        )
