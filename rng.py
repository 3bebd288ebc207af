"""The process-wide random generators belong to the host (a ComfyUI server, a web UI, a notebook).

The core never reseeds them. Where code must draw from them -- peft's LoRA initialisation, dropout,
the weight init of a third-party model constructor whose weights are then overwritten -- it runs
inside one of two blocks, both built on ``torch.random.fork_rng``:

* :class:`RNGStream` -- a private, seeded torch stream (CPU and the CUDA devices in use) that
  stands in for the global generators inside ``with stream:``; on exit its advanced state is kept
  for the next block (and for a checkpoint) and the caller's state is put back.
* :func:`preserve_global_rng` -- whatever the block draws (torch, numpy, ``random``), the caller's
  generators are put back afterwards, as if it had drawn nothing.

Neither is a lock: a host thread that draws from the global torch generator *while* such a block
runs on another thread sees (and disturbs) the block's stream. ComfyUI runs prompts on one worker
thread, so that does not happen there.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    import torch


def _cuda_index(device: "torch.device | str | int") -> int | None:
    import torch

    if isinstance(device, int):
        return device
    d = torch.device(device)
    if d.type != "cuda":
        return None
    return d.index if d.index is not None else torch.cuda.current_device()


class RNGStream:
    """A private stream for the global torch generators: ``with stream: ...`` draws from it.

    Seeded without touching the global generators (a fresh ``torch.Generator`` has the same state
    as the global one after ``torch.manual_seed(seed)``), so ``RNGStream(s)`` gives the numbers a
    script gets after ``torch.manual_seed(s)``. ``devices``: the CUDA devices whose generators the
    block uses (dropout on a GPU draws from that GPU's generator); CPU-only code passes none."""

    def __init__(self, seed: int, devices: Iterable["torch.device | str | int"] = ()) -> None:
        import torch

        self.devices = sorted({i for i in (_cuda_index(d) for d in devices) if i is not None})
        self.cpu_state = torch.Generator().manual_seed(int(seed)).get_state()
        self.cuda_states = [torch.Generator(device=f"cuda:{i}").manual_seed(int(seed)).get_state() for i in self.devices]
        self._stack: ExitStack | None = None

    def __enter__(self) -> "RNGStream":
        import torch

        if self._stack is not None:
            raise RuntimeError("RNGStream is not re-entrant")
        stack = ExitStack()
        stack.enter_context(torch.random.fork_rng(devices=self.devices))
        torch.set_rng_state(self.cpu_state)
        for i, state in zip(self.devices, self.cuda_states):
            torch.cuda.set_rng_state(state, i)
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        stack, self._stack = self._stack, None
        try:
            self.cpu_state = torch.get_rng_state()
            self.cuda_states = [torch.cuda.get_rng_state(i) for i in self.devices]
        finally:
            assert stack is not None
            stack.close()  # the caller's generators come back

    def state_dict(self) -> dict[str, Any]:
        """For a checkpoint (``torch.load(weights_only=True)`` reads it back)."""
        return {"torch": self.cpu_state.clone(), "cuda": [s.clone() for s in self.cuda_states]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`. A CUDA list saved for other devices (another GPU
        count) leaves the CUDA part as it is; the CPU part is always restored."""
        self.cpu_state = state["torch"].clone()
        cuda = list(state.get("cuda") or [])
        if len(cuda) == len(self.devices):
            self.cuda_states = [s.clone() for s in cuda]


@contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Put back the caller's ``random``, numpy and torch (CPU, CUDA) generator states on exit.

    For blocks that draw from the global generators only as a side effect (module constructors
    whose random init is overwritten by loaded weights): the caller's next draws are the ones it
    would have got without the block. A CUDA context first created inside the block gets its
    generators reset to their initial seed, as the caller would have found them."""
    import random

    import numpy as np
    import torch

    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda_ready = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda_ready else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if not cuda_ready and torch.cuda.is_available() and torch.cuda.is_initialized():
            for gen in torch.cuda.default_generators:
                gen.manual_seed(gen.initial_seed())
