"""The machine a sweep runs on: hardware, its name in the file names, library versions, free memory."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import socket


def machine_info(device: str) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem_total = 0
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    gpu = None
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}"}
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem_total,
        "gpu": gpu,
    }


def machine_name(info: dict) -> str:
    def slug(text):
        text = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$", " ", text.lower())
        return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "machine"

    if info.get("gpu"):
        return slug(info["gpu"]["name"])
    return f"{slug(info['cpu'])}-{info['cpu_count']}cpu"


def versions() -> dict:
    from importlib import metadata

    import torch

    import qrkd

    out = {"python": platform.python_version(), "torch": torch.__version__, "qrkd": qrkd.__version__,
           "cuda": torch.version.cuda}
    for dist in ("triton", "merlinquantum", "numpy", "pytest-benchmark", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _mem_available() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return 8 << 30
