"""What a library call could leave changed in its host process, as one comparable snapshot.

Host-safety tests (the core runs for days inside a ComfyUI server or a web UI) take a snapshot,
call the core, take another and compare: random generators, torch's global flags, threads and
dtypes, environment, ``sys.path``, cwd, warnings filters, logger configuration, signal handlers,
matplotlib's backend, accelerate's process-wide state.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import warnings
from typing import Any


def caller_draws() -> tuple[float, float, float]:
    """What the host's next random numbers are (torch, numpy, random)."""
    import numpy as np
    import torch

    return (float(torch.rand(1)), float(np.random.rand()), random.random())


def seed_caller(seed: int) -> None:
    """The host seeds its own generators (a test stands in for the host here)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _torch_flags() -> dict[str, Any]:
    import torch

    b = torch.backends
    flags: dict[str, Any] = {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn.enabled": b.cudnn.enabled,
        "cudnn.benchmark": b.cudnn.benchmark,
        "cudnn.deterministic": b.cudnn.deterministic,
        "mkldnn.enabled": b.mkldnn.enabled,
        "cuda.matmul.fp16_reduced": b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "cuda.matmul.bf16_reduced": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "sdp": (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled()),
    }
    # torch >= 2.9: the fp32_precision API (reading the legacy allow_tf32 flags can raise once it is used)
    if hasattr(b.cuda.matmul, "fp32_precision"):
        flags["fp32_precision"] = (b.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
                                   b.cudnn.rnn.fp32_precision, b.mkldnn.fp32_precision)
    else:
        flags["tf32"] = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    return flags


def _rng() -> tuple:
    import numpy as np
    import torch

    cuda = [torch.cuda.get_rng_state(i).tolist() for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return (torch.get_rng_state().tolist(), cuda, np.random.get_state()[1].tolist(), random.getstate())


def _loggers() -> dict[str, tuple]:
    out = {"<root>": (logging.root.level, tuple(logging.root.handlers), logging.root.manager.disable)}
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            out[name] = (lg.level, lg.propagate, lg.disabled, tuple(lg.handlers))
    return out


def _accelerate() -> Any:
    if "accelerate.state" not in sys.modules:
        return ([], [], [])  # not imported yet: no state, the same as an empty one
    from accelerate.state import AcceleratorState, GradientState, PartialState

    return tuple(sorted(map(str, cls._shared_state.items())) for cls in (PartialState, AcceleratorState, GradientState))


def _matplotlib() -> Any:
    if "matplotlib" not in sys.modules:
        return None
    import matplotlib

    return (dict.__getitem__(matplotlib.rcParams, "backend"), "matplotlib.pyplot" in sys.modules)


def snapshot() -> dict[str, Any]:
    return {
        "rng": _rng(),
        "torch": _torch_flags(),
        "environ": dict(os.environ),
        "cwd": os.getcwd(),
        "sys.path": list(sys.path),
        "warnings": list(warnings.filters),
        "loggers": _loggers(),
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
        "matplotlib": _matplotlib(),
        "accelerate": _accelerate(),
    }


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What differs; loggers created during the call (by a lazy import) do not count."""
    diff: dict[str, Any] = {}
    for key in before:
        a, b = before[key], after[key]
        if key == "loggers":
            changed = {n: (v, b.get(n)) for n, v in a.items() if b.get(n) != v}
            if changed:
                diff[key] = changed
        elif key == "torch" or key == "environ":
            changed = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
            if changed:
                diff[key] = changed
        elif a != b:
            diff[key] = "changed" if key == "rng" else (a, b)
    return diff
