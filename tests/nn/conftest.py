"""Triton's interpreter for the Triton backend's tests where there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, triton's own library functions
included, so it must be set before anything imports triton: here, before collection.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
