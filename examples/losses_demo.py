"""A short tour of the loss API on random features: each loss, its value and the backend that ran it."""

import torch

import qrkd
from qrkd import backends

torch.manual_seed(0)
n, ds, dt, classes = 128, 4, 31, 10  # the seed's batch and feature widths
feat_s = torch.randn(n, ds, requires_grad=True)
feat_t = torch.randn(n, dt)
logits_s = torch.randn(n, classes, requires_grad=True)
logits_t = torch.randn(n, classes)

print(f"qrkd {qrkd.__version__}; available backends: {', '.join(qrkd.available_backends())}")
rows = [
    ("kd_loss", "-", qrkd.kd_loss(logits_s, logits_t)),
    ("rkd_distance_loss", backends.auto_backend_name("rkd_distance_loss"), qrkd.rkd_distance_loss(feat_s, feat_t)),
    ("rkd_angle_loss", backends.auto_backend_name("rkd_angle_loss"), qrkd.rkd_angle_loss(feat_s, feat_t)),
    (
        "fidelity_kernel_loss",
        backends.auto_backend_name("fidelity_kernel_loss"),
        qrkd.fidelity_kernel_loss(feat_s, feat_t),
    ),
]
for name, backend, value in rows:
    print(f"{name:<22} {value.item():.6f}   backend={backend}")

loss = qrkd.DistillationLoss(kd=0.5, dr=0.1, ar=0.1, qk=0.1)(logits_s, logits_t, feat_s, feat_t)
loss.backward()
print(f"{'DistillationLoss':<22} {loss.item():.6f}   |grad feat_s| = {feat_s.grad.norm().item():.4g}")
