import os

import torch

# Triton kernels run on the CPU through the interpreter where no GPU is present; it must be set before they are
# decorated, so before qrkd is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
