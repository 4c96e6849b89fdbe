"""Where the Triton tests run: the GPU where there is one, else the CPU under Triton's
interpreter. Imported before any module that imports the kernel: triton.jit reads
TRITON_INTERPRET when it decorates."""

from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
TOLERANCE = dict(rtol=1e-4, atol=1e-5) if INTERPRETED else dict(rtol=1e-3, atol=1e-4)
