"""The seed's teacher and student CNNs (DESIGN.md section 7) and their checkpoints.

Both share one shape: conv1 (3x3) -> ReLU -> conv2 (3x3) -> ReLU -> max-pool 2 -> adaptive avg-pool 4x4 -> conv3
(1x1 to 12 channels) -> ReLU -> flatten (192) -> fc1 -> ReLU = features -> head = logits. forward returns
(logits, features).
"""

from __future__ import annotations

import os
import re
import zipfile

import torch
from torch import nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "qrkd-checkpoint"
CHECKPOINT_VERSION = 1


class SmallCNN(nn.Module):
    """The seed's CNN with widths (c1, c2, hidden); `hidden` is the feature width the relational losses see."""

    def __init__(self, c1: int, c2: int, hidden: int, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        for name, value in (("c1", c1), ("c2", c2), ("hidden", hidden), ("in_channels", in_channels),
                            ("num_classes", num_classes)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.widths = (c1, c2, hidden)
        self.in_channels, self.num_classes = in_channels, num_classes
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv3 = nn.Conv2d(c2, 12, 1, bias=False)
        self.fc1 = nn.Linear(12 * 4 * 4, hidden)
        self.head = nn.Linear(hidden, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def feature_dim(self) -> int:
        return self.widths[2]

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.pool(F.max_pool2d(x, 2))
        x = F.relu(self.conv3(x))
        features = F.relu(self.fc1(x.flatten(1)))
        return self.head(features), features


class TeacherCNN(SmallCNN):
    """(c1, c2, hidden) = (1, 18, 31): 6,690 parameters on MNIST."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__(1, 18, 31, in_channels=in_channels, num_classes=num_classes)


class StudentCNN(SmallCNN):
    """(c1, c2, hidden) = (19, 4, 4): 1,725 parameters on MNIST."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__(19, 4, 4, in_channels=in_channels, num_classes=num_classes)


ARCHITECTURES = {"TeacherCNN": TeacherCNN, "StudentCNN": StudentCNN}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the model asked for."""


def save_checkpoint(model: SmallCNN, path, **meta) -> None:
    """Saves the weights with what rebuilds the model; `meta` (numbers, strings, lists, dicts) goes along."""
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise TypeError(f"model must be one of {sorted(ARCHITECTURES)}, got {arch}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "in_channels": model.in_channels,
        "num_classes": model.num_classes,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # never leaves a half-written checkpoint under the real name


def _unreadable_cause(path: str, exc: Exception) -> str:
    """Why torch.load(weights_only=True) could not read `path`, in qrkd's words. torch's own message advises retrying
    with weights_only=False, which runs arbitrary code from the file: it is never passed on."""
    message = str(exc)
    if os.path.getsize(path) == 0:
        return "the file is empty (0 bytes)"
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if unsupported:
        return (f"it holds a Python object ({unsupported.group(1)}) that no qrkd checkpoint contains; qrkd reads "
                "checkpoints without running code from them, write them with qrkd.models.save_checkpoint")
    with open(path, "rb") as f:
        start = f.read(4)
    if start.startswith(b"PK") and not zipfile.is_zipfile(path):
        return "the file is a truncated or damaged torch archive (corrupt, or not written completely)"
    first = message.splitlines()[0] if message else ""
    if first and "weights_only" not in message and "weights only" not in message.lower():
        return f"the file is corrupt, truncated or not a torch file ({type(exc).__name__}: {first})"
    return "the file is corrupt, truncated or not a torch file"


def load_checkpoint(path, arch: str | None = None, in_channels: int | None = None, num_classes: int | None = None,
                    map_location="cpu"):
    """Loads a checkpoint written by save_checkpoint (with weights_only=True: no code is unpickled).

    Returns (model, meta). `arch`, `in_channels`, `num_classes`, when given, must match the file: otherwise a
    CheckpointError says what differs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated zips, pickles and foreign objects
        cause = _unreadable_cause(path, exc)
        raise CheckpointError(f"checkpoint {path!r} is not a readable qrkd checkpoint: {cause}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path!r} is not a qrkd checkpoint (no '{CHECKPOINT_FORMAT}' header); "
                              "write checkpoints with qrkd.models.save_checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {payload.get('version')!r}, this qrkd reads "
                              f"version {CHECKPOINT_VERSION}")
    found = {"arch": payload.get("arch"), "in_channels": payload.get("in_channels"),
             "num_classes": payload.get("num_classes")}
    wanted = {"arch": arch, "in_channels": in_channels, "num_classes": num_classes}
    for key, value in wanted.items():
        if value is not None and found[key] != value:
            raise CheckpointError(f"checkpoint {path!r} holds {key}={found[key]!r}, expected {key}={value!r}")
    if found["arch"] not in ARCHITECTURES:
        raise CheckpointError(f"checkpoint {path!r} names an unknown architecture {found['arch']!r}")
    try:
        model = ARCHITECTURES[found["arch"]](in_channels=found["in_channels"], num_classes=found["num_classes"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path!r} does not fit {found['arch']}: {exc}") from None
    return model, payload.get("meta", {})
