"""Bit-reproducible training on the CPU: MKL's conditional numerical reproducibility.

With more than one thread, MKL's matrix products (which the CPU convolutions' backward passes
use) may add their partial sums in another order from one call to the next, so two runs with the
same seed ended in files that differed in their last bits, and a resumed run did not end in the
bytes of an uninterrupted one. MKL computes reproducibly (for a given thread count) when
``MKL_CBWR`` is set before its first call; it cannot be switched on afterwards.

:func:`request_reproducible_blas` sets it, unless the user set it already: the pack calls it when
ComfyUI loads the extension, the command line before anything runs. :func:`blas_reproducible`
tells a run whether it took effect (another node pack may have used MKL before ours loaded).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# AUTO: MKL's fastest code path for this CPU, fixed for the process. It needs 64-byte aligned
# memory, which torch's CPU allocator gives; "AUTO,STRICT" would not need it but made a LoRA step
# at 64 px about 35% slower (bench/step_profile.py), AUTO cost nothing measurable.
MKL_CBWR = "AUTO"
_MKL_CBWR_BRANCH = 1  # mkl_cbwr_get(MKL_CBWR_BRANCH)
_MKL_CBWR_BRANCH_OFF = 1  # ... its value when reproducibility is off


def request_reproducible_blas() -> None:
    """Ask MKL for reproducible results (a no-op if MKL_CBWR is already set, or MKL has started)."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)


def blas_reproducible() -> bool | None:
    """True if torch's BLAS sums reproducibly (or torch has no MKL), False if MKL runs without
    reproducibility, None if MKL cannot be asked. Call it only after :func:`request_reproducible_blas`:
    the question starts MKL, which fixes its mode."""
    import torch

    if not torch.backends.mkl.is_available():
        return True
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(library)).mkl_serv_cbwr_get  # MKL is linked into torch; its service call
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_int
    get.argtypes = [ctypes.c_int]
    return get(_MKL_CBWR_BRANCH) != _MKL_CBWR_BRANCH_OFF
