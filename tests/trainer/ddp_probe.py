"""Run by ``accelerate launch`` in tests/trainer/test_host_safety.py: two trainings in one launched
process, recording what each rank saw in the first one.

Observers only (the training runs unchanged): torch's global optimizer step hooks record the
gradients the optimizer is about to apply at step 1 and the weights right after it; a pass-through
wrapper around the loss records each micro-batch's latents. Written per rank to ``OUT/rank<r>.pt``.
The second training (same settings, same process) reuses the process group the first one formed
(kept, with its PartialState); its file must equal the first one's. The third runs after the "host" formed the
group itself (``PartialState()``): that group and state must survive it.

Usage: ``accelerate launch ... ddp_probe.py OUT SETTINGS.json`` (TrainConfig fields, output aside)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from facediffuser.trainer import training_loop as tl
from facediffuser.trainer.config import TrainConfig

out, config_file = Path(sys.argv[1]), Path(sys.argv[2])
settings = json.loads(config_file.read_text())
record: dict = {"latents": [], "grads": None, "weights": None}
recording = True


def _pre(optimizer, args, kwargs):
    if recording and record["grads"] is None:
        record["grads"] = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]]


def _post(optimizer, args, kwargs):
    if recording and record["weights"] is None:
        record["weights"] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]


register_optimizer_step_pre_hook(_pre)
register_optimizer_step_post_hook(_post)
_loss = tl._diffusion_loss


def _observed_loss(config, models, batch, *rest, **kw):
    if recording:
        record["latents"].append(batch["latents"].detach().clone())
    return _loss(config, models, batch, *rest, **kw)


tl._diffusion_loss = _observed_loss

rank = int(os.environ["RANK"])
first = tl.train(TrainConfig(**{**settings, "output": str(out / "first" / "face.safetensors")}))
record["world"] = int(os.environ["WORLD_SIZE"])
record["group_left"] = dist.is_initialized()  # a group the run formed is kept for the next run
torch.save(record, out / f"rank{rank}.pt")
recording = False
second = tl.train(TrainConfig(**{**settings, "output": str(out / "second" / "face.safetensors")}))

# A host whose PartialState and process group exist before a training keeps them through it.
from accelerate.state import PartialState  # noqa: E402

host = PartialState(cpu=True)
host_state = dict(PartialState._shared_state)
third = tl.train(TrainConfig(**{**settings, "output": str(out / "third" / "face.safetensors")}))
x = torch.tensor([float(rank + 1)])
dist.all_reduce(x)  # the host's group still works
kept = dist.is_initialized() and dict(PartialState._shared_state) == host_state and x.item() == 3.0
print(f"rank {rank}: {first.status} {second.status} {third.status} host-group-kept={kept}", flush=True)
