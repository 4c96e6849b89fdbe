"""Where the Triton tests run: the GPU where there is one, else the CPU under Triton's
interpreter. conftest.py imports it before anything imports triton: triton.jit reads
TRITON_INTERPRET when it decorates, triton.language's own functions included."""

from __future__ import annotations

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
TOLERANCE = dict(rtol=1e-4, atol=1e-5) if INTERPRETED else dict(rtol=1e-3, atol=1e-4)
