import os

import torch

# Without a GPU, Triton kernels run in its CPU interpreter. Set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
