"""qrkd's losses and the seed's CNNs in torchdistill's registries (torchdistill 1.1.x).

Importing this module registers, under names of their own (torchdistill's built-ins stay as they are):

  mid-level losses   'qrkd.RKDLoss'             torchdistill's RKDLoss, same arguments and value, qrkd's kernels
                     'qrkd.FidelityKernelLoss'  QRKD's fidelity-kernel term (classical or photonic)
                     'qrkd.DistillationLoss'    the seed's combination kd + dr + ar + qk (qrkd.DistillationLoss)
  models             'qrkd.TeacherCNN', 'qrkd.StudentCNN'  the seed's CNNs, shaped for torchdistill (TorchdistillCNN)

A torchdistill configuration loads it through its own import hook, the top-level `dependencies` list:

    dependencies:
      - 'qrkd.integrations.torchdistill'

and an existing RKD term switches to qrkd by its name alone: `key: 'RKDLoss'` -> `key: 'qrkd.RKDLoss'`, the kwargs
(student_output_path, teacher_output_path, dist_factor, angle_factor, reduction) unchanged.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torchdistill.losses.registry import register_mid_level_loss
from torchdistill.models.registry import register_model

from .. import functional
from ..losses import DistillationLoss as _DistillationLoss
from ..models import StudentCNN, TeacherCNN, load_checkpoint

REDUCTIONS = ("mean", "sum")


def _factor(name: str, value) -> float:
    """A loss weight: a finite number >= 0; None means 0, as in torchdistill's RKDLoss."""
    if value is None:
        return 0.0
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _reduction(value) -> str:
    if value not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {REDUCTIONS}, got {value!r} (qrkd's relational losses reduce inside their "
            "kernels and never materialise the per-entry losses that 'none' would return)"
        )
    return value


def _path(name: str, value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a module path (str), got {type(value).__name__}")
    return value


def _flat_output(io_dict, path: str):
    return io_dict[path]["output"].flatten(1)


@register_mid_level_loss(key="qrkd.RKDLoss")
class RKDLoss(nn.Module):
    """torchdistill's RKDLoss computed by qrkd: dist_factor * RKD distance + angle_factor * RKD angle between the
    flattened outputs of the modules at student_output_path and teacher_output_path.

    Same arguments and conventions as torchdistill's RKDLoss (the original RKD code): zero diagonal distances, each
    side normalised by the mean of its positive distances, angles of normalised differences, smooth L1 (beta 1)
    averaged over the N^2 distances and the N^3 triplets (`reduction='mean'`) or summed (`'sum'`); a factor that is
    0 or None skips its term. The values agree to rounding; the differences are where torchdistill's own formulas
    fail: a triplet whose anchor coincides with another of its points (e.g. two all-zero ReLU feature rows) sends no
    gradient here instead of a gradient scaled by 1e12, and a batch with no positive distance (N = 1) gives 0, not
    NaN. `reduction='none'` is refused. `zero_diagonal=False` selects the seed's distance convention instead, and
    `backend` picks qrkd's backend ('auto' by default).
    """

    def __init__(self, student_output_path, teacher_output_path, dist_factor, angle_factor, reduction, *,
                 zero_diagonal: bool = True, backend: str = "auto"):
        super().__init__()
        self.student_output_path = _path("student_output_path", student_output_path)
        self.teacher_output_path = _path("teacher_output_path", teacher_output_path)
        self.dist_factor = _factor("dist_factor", dist_factor)
        self.angle_factor = _factor("angle_factor", angle_factor)
        self.reduction = _reduction(reduction)
        self.zero_diagonal, self.backend = bool(zero_diagonal), backend

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        student = _flat_output(student_io_dict, self.student_output_path)
        teacher = _flat_output(teacher_io_dict, self.teacher_output_path)
        n = student.shape[0]
        terms = []
        if self.dist_factor:
            distance = functional.rkd_distance_loss(student, teacher, zero_diagonal=self.zero_diagonal,
                                                    backend=self.backend)
            terms.append(self.dist_factor * (distance * n**2 if self.reduction == "sum" else distance))
        if self.angle_factor:
            angle = functional.rkd_angle_loss(student, teacher, backend=self.backend)
            terms.append(self.angle_factor * (angle * n**3 if self.reduction == "sum" else angle))
        if not terms:
            return student.new_zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
        return sum(terms[1:], terms[0])

    def extra_repr(self):
        return (f"student_output_path={self.student_output_path!r}, teacher_output_path={self.teacher_output_path!r}, "
                f"dist_factor={self.dist_factor}, angle_factor={self.angle_factor}, reduction={self.reduction!r}, "
                f"zero_diagonal={self.zero_diagonal}, backend={self.backend!r}")


@register_mid_level_loss(key="qrkd.FidelityKernelLoss")
class FidelityKernelLoss(nn.Module):
    """QRKD's fidelity-kernel term between the flattened outputs at student_output_path and teacher_output_path:
    smooth L1 between the two N x N kernels, averaged (`reduction='mean'`) or summed (`'sum'`).

    kernel='simple' is the classical kernel (psi_i . psi_j)^2 of the normalised features; kernel='merlin' is the
    photonic kernel of MerLin's FidelityKernel.simple (n_modes, n_photons, seed, from_merlin as DistillationLoss's
    qk_n_modes, qk_n_photons, qk_seed, qk_from_merlin), with gradient to the student. Both sides are cut to their
    first min(Ds, Dt) columns, as in the seed.
    """

    def __init__(self, student_output_path, teacher_output_path, kernel: str = "simple", reduction: str = "mean", *,
                 n_modes=None, n_photons=None, seed: int = 0, from_merlin: bool = False, backend: str = "auto"):
        super().__init__()
        self.student_output_path = _path("student_output_path", student_output_path)
        self.teacher_output_path = _path("teacher_output_path", teacher_output_path)
        self.reduction = _reduction(reduction)
        # DistillationLoss owns the per-width photonic kernels (built on first use, saved with the module)
        self.term = _DistillationLoss(kd=0.0, dr=0.0, ar=0.0, qk=1.0, qk_backend=kernel, qk_n_modes=n_modes,
                                      qk_n_photons=n_photons, backend=backend, qk_seed=seed,
                                      qk_from_merlin=from_merlin)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        student = _flat_output(student_io_dict, self.student_output_path)
        teacher = _flat_output(teacher_io_dict, self.teacher_output_path)
        loss = self.term(None, None, student, teacher)
        return loss * student.shape[0] ** 2 if self.reduction == "sum" else loss

    def extra_repr(self):
        return (f"student_output_path={self.student_output_path!r}, teacher_output_path={self.teacher_output_path!r}, "
                f"reduction={self.reduction!r}")


@register_mid_level_loss(key="qrkd.DistillationLoss")
class DistillationLoss(nn.Module):
    """The seed's distillation loss, kd * KD + dr * RKD distance + ar * RKD angle + qk * fidelity kernel
    (qrkd.DistillationLoss, whose keyword arguments it takes), on torchdistill's I/O dicts: the logits are the
    outputs of the modules at student_logits_path / teacher_logits_path ('.' is the model's own output), the
    features those at student_feature_path / teacher_feature_path. The task loss (cross-entropy) is a separate
    term of the configuration, as in torchdistill. `last_terms` holds the unweighted terms of the last call."""

    def __init__(self, student_feature_path: str = "features", teacher_feature_path: str = "features",
                 student_logits_path: str = ".", teacher_logits_path: str = ".", **kwargs):
        super().__init__()
        self.student_feature_path = _path("student_feature_path", student_feature_path)
        self.teacher_feature_path = _path("teacher_feature_path", teacher_feature_path)
        self.student_logits_path = _path("student_logits_path", student_logits_path)
        self.teacher_logits_path = _path("teacher_logits_path", teacher_logits_path)
        self.loss = _DistillationLoss(**kwargs)

    @property
    def last_terms(self) -> dict:
        return self.loss.last_terms

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        needs_logits = self.loss.uses_logits
        logits_s = student_io_dict[self.student_logits_path]["output"] if needs_logits else None
        logits_t = teacher_io_dict[self.teacher_logits_path]["output"] if needs_logits else None
        feat_s = _flat_output(student_io_dict, self.student_feature_path)
        feat_t = _flat_output(teacher_io_dict, self.teacher_feature_path)
        return self.loss(logits_s, logits_t, feat_s, feat_t)


class TorchdistillCNN(nn.Module):
    """One of the seed's CNNs shaped as torchdistill expects a classifier: forward returns the logits (what
    torchdistill's cross-entropy and KD terms read at module path '.'), and the features that the relational losses
    compare pass through the identity module `features`, so that a forward hook on the module path 'features'
    records them (`forward_hook: {output: ['features']}`). The seed's network is `model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.features = nn.Identity()

    def forward(self, x):
        logits, features = self.model(x)
        self.features(features)
        return logits


def _build(cls, in_channels: int, num_classes: int, checkpoint) -> TorchdistillCNN:
    if checkpoint is None:
        return TorchdistillCNN(cls(in_channels=in_channels, num_classes=num_classes))
    model, _ = load_checkpoint(checkpoint, arch=cls.__name__, in_channels=in_channels, num_classes=num_classes)
    return TorchdistillCNN(model)


@register_model(key="qrkd.TeacherCNN")
def teacher_cnn(in_channels: int = 1, num_classes: int = 10, checkpoint=None) -> TorchdistillCNN:
    """The seed's teacher; `checkpoint` is a qrkd checkpoint (qrkd.models.save_checkpoint, e.g. the teacher.pt that
    `qrkd compare` writes). A torchdistill checkpoint goes to the model's `src_ckpt` instead."""
    return _build(TeacherCNN, in_channels, num_classes, checkpoint)


@register_model(key="qrkd.StudentCNN")
def student_cnn(in_channels: int = 1, num_classes: int = 10, checkpoint=None) -> TorchdistillCNN:
    """The seed's student; `checkpoint` as for teacher_cnn."""
    return _build(StudentCNN, in_channels, num_classes, checkpoint)
