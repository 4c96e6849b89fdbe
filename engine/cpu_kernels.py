"""The C++ CPU kernels of engine/cpu_kernels.cpp, cpu_matmul.cpp, cpu_fp32.cpp,
cpu_vnni.cpp and cpu_decoder.cpp, compiled once and cached by torch.

`load()` builds them once per machine and source version (torch's cpp_extension keeps
the result under ~/.cache/torch_extensions, named by the source's hash) and returns the
module, or None where they cannot run here: no AVX2/FMA, no C++ compiler, a failed
build. Each reason is logged once; callers keep a torch path for None.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / f"cpu_{name}.cpp" for name in ("kernels", "matmul", "fp32", "vnni", "decoder")]
HEADERS = [HERE / "cpu_simd.h", HERE / "cpu_rows.h"]
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels, or None (with one logged line saying why)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        log.warning("CPU kernels: this CPU lacks AVX2 (%s); torch's ops run instead", capability)
        return None
    # named by the source's hash: checkouts of different versions on one machine each
    # keep their own build instead of rebuilding over each other's
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(code + " ".join(CFLAGS).encode()).hexdigest()[:12]
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(
            name=f"symphony_cpu_{digest}",
            sources=[str(path) for path in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a compiler missing or failing: any error, one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("CPU kernels: build failed (%s); torch's ops run instead", first)
        return None


if __name__ == "__main__":  # `make install` builds them ahead of the first server
    logging.basicConfig(format="%(message)s")
    print("CPU kernels:", "built" if load() is not None else "not available (see above)")
