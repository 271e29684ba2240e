"""qrkd: fast, exact, differentiable relational knowledge-distillation losses for PyTorch."""

from .backends import available_backends, backend_status
from .functional import (
    fidelity_kernel_loss,
    fidelity_kernel_matrix,
    kd_loss,
    photonic_fidelity,
    rkd_angle_loss,
    rkd_distance_loss,
)
from .losses import DistillationLoss, FidelityKernelLoss, KDLoss, RKDAngleLoss, RKDDistanceLoss
from .photonic import PhotonicFidelityKernel

__version__ = "0.1.0"

__all__ = [
    "DistillationLoss",
    "FidelityKernelLoss",
    "KDLoss",
    "PhotonicFidelityKernel",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "available_backends",
    "backend_status",
    "fidelity_kernel_loss",
    "fidelity_kernel_matrix",
    "kd_loss",
    "photonic_fidelity",
    "rkd_angle_loss",
    "rkd_distance_loss",
]
