"""Without a GPU the Triton kernels run under the Triton interpreter. Triton reads
TRITON_INTERPRET when it is imported (its library functions are decorated then), and torch
may import it early, so the variable is set here, before any test module imports einc."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
