"""Triton kernels of qrkd, one module per relation (launched by qrkd.backends.triton_launch).

Importing this package imports triton: only the triton backend does so, and it catches the failure. Set
TRITON_INTERPRET=1 before the import to run the kernels on CPU tensors through Triton's interpreter (slow: tests).
"""

from . import common, fidelity, rkd_angle, rkd_distance

__all__ = ["common", "fidelity", "rkd_angle", "rkd_distance"]
