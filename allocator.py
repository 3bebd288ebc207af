"""In a process of our own (the ``facediffuser`` command), glibc's malloc keeps freed memory for reuse.

Why: by default glibc serves every request of 32 MiB or more (and, until its adaptive threshold
rises, of 128 KiB or more) with a fresh ``mmap`` and unmaps it on ``free``. A CPU training step
allocates such blocks hundreds of times: oneDNN reorders each float32 convolution weight into a
new buffer on every call (118 MiB for SD1.5's 2560->1280 3x3 convolution), and large activations
and their gradients come and go. Each fresh block is zero-filled page by page on first touch: on
the project's 2-core box a 256-px SD1.5 LoRA step took 300 000-600 000 minor page faults, and the
oneDNN call above ran 93 ms with them and 38 ms without (bench/bench_alloc.py; bench/RESULTS.md). With
``M_MMAP_MAX = 0`` and no trimming, freed blocks stay in the heap and the next step reuses them.

The cost: memory freed during a run is not handed back to the system before the process exits,
so the resident size stays at its peak (which a training run reaches anyway).

Only for our own processes (the command run as a program, :func:`..cli.entry`):
``facediffuser train`` calls :func:`keep_freed_memory` once the models are loaded and the latent
cache is built, just before the first step. Measured (bench/RESULTS.md, 12-08 §1a):
- at process start, the load's 2 GB temporaries stayed resident: training-phase RSS 6.37 vs 5.65 GiB;
- from the end of loading, the cache build ran 1.25x faster, but the peak RSS rose (9.36 vs 7.82
  GiB at 512 px), or the training RSS did without a trim in between (up to 6.62 GiB at 256 px).
``generate``, ``eval`` and ``demo`` call it at their start (CPU generation 1.11x faster, the same
peak RSS). Library code that runs inside a host (a ComfyUI server or a web UI owns its
allocator) never calls it.
It does nothing where the user chose for themselves (``MALLOC_*`` variables, a preloaded
jemalloc/tcmalloc, ``FACEDIFFUSER_MALLOC=system``) or where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
#: M_TRIM_THRESHOLD takes an int: the largest one (2 GiB) means "do not trim" for any free below it
NO_TRIM = 2**31 - 1
OPT_OUT = "FACEDIFFUSER_MALLOC"


def _user_choice() -> str | None:
    """Why to leave the allocator alone, or None."""
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return f"{OPT_OUT}=system"
    mine = sorted(k for k in os.environ if k.startswith("MALLOC_")
                  or (k == "GLIBC_TUNABLES" and "malloc" in os.environ[k]))
    if mine:
        return f"{mine[0]} is set"
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload:
        return f"LD_PRELOAD={preload}"
    return None


def keep_freed_memory() -> str:
    """Switch glibc's malloc of this process to keep freed memory; returns what was done (for logs)."""
    if not sys.platform.startswith("linux"):
        return f"left as is: {sys.platform} is not Linux/glibc"
    why = _user_choice()
    if why:
        return f"left as is: {why}"
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "left as is: the C library is not glibc"
    version.restype = ctypes.c_char_p
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, NO_TRIM)):
        return "left as is: mallopt refused"
    return f"glibc {version().decode()}: freed memory kept for reuse (M_MMAP_MAX=0, no trimming)"

