"""A leaner forward for peft's LoRA layers while we train: one fused GEMM instead of four passes.

peft's ``lora.Linear`` / ``lora.Conv2d`` compute ``result = result + lora_B(lora_A(dropout(x))) *
scaling``: after the base layer, a rank-r GEMM, a second GEMM that writes a full-size tensor, a
full-size multiply by ``scaling`` (even when it is 1) and a full-size add — and, with a bfloat16
base and float32 adapter, a full-size up-cast copy of ``x`` that autocast then casts straight back.
Each of those is a pass over a full-size activation (and its backward), for each of the 192 modules.
Measured on an idle 2-core CPU (bench/RESULTS.md, issue 14, 2026-12-08): the full SD1.5 step
1.045x and 1.037x faster at 256 px (system and kept-memory allocator) and 1.023x at 512 px, each
over 3 interleaved rounds; it halves the adapters' cost over the frozen UNet (peft - base 0.257 s,
lean - base 0.115 s at 256 px). The GPU check measures it where kernel launches and memory passes
cost more.

Here the up-projection is ``torch.addmm(result, h, B^T, alpha=scaling)``: the GEMM adds into the
base output and applies the scale in the same kernel, so the multiply, the add and their
backward passes are gone, and nothing is cast that autocast would cast anyway. SD1.5's 1x1-conv
``proj_in``/``proj_out`` adapters become matrix products on the NCHW tensor's ``(C, H*W)`` view
(a 1x1 convolution with rank-4 channels otherwise takes torch's slow reference convolution on CPU).

The result is the same function (the same parameters, the same gradients up to float rounding
order); the layer objects, their parameter names and state dicts stay peft's, so checkpoints,
the kohya export and ``--resume`` are unaffected. :func:`enable_lean_forward` patches the
*instances* of one model (:func:`lean_lora_forward`: for the duration of a block): nothing global,
and every case the fast path does not cover (merged or disabled adapters, several active
adapters, DoRA, mixed-adapter batches, a float32 adapter on a lower-precision base outside
autocast, channels-last input) runs peft's own forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch


def _plain_adapter(layer: Any, x: "torch.Tensor", args: tuple, kwargs: dict) -> str | None:
    """The one adapter the fast path may run, or None to fall back to peft's forward."""
    import torch

    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return None
    a = layer.lora_A[name].weight
    if a.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        return None  # peft computes the adapter in its own dtype here; keep its numerics
    return name


def _linear_forward(layer: Any, x: "torch.Tensor", *args: Any, **kwargs: Any) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    name = _plain_adapter(layer, x, args, kwargs)
    if name is None:
        return type(layer).forward(layer, x, *args, **kwargs)
    a = layer.lora_A[name].weight  # (r, in)
    b = layer.lora_B[name].weight  # (out, r)
    result = layer.base_layer(x)
    h = F.linear(layer.lora_dropout[name](x), a.to(x.dtype))
    shape = result.shape
    out = torch.addmm(result.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype),
                      b.t().to(result.dtype), alpha=layer.scaling[name])
    return out.view(shape)


def _conv1x1_forward(layer: Any, x: "torch.Tensor", *args: Any, **kwargs: Any) -> "torch.Tensor":
    import torch

    name = _plain_adapter(layer, x, args, kwargs)
    if name is None or x.dim() != 4 or not x.is_contiguous():
        return type(layer).forward(layer, x, *args, **kwargs)
    a = layer.lora_A[name].weight  # (r, in, 1, 1)
    b = layer.lora_B[name].weight  # (out, r, 1, 1)
    result = layer.base_layer(x)
    if not result.is_contiguous():
        return type(layer).forward(layer, x, *args, **kwargs)
    n, c, hgt, wid = x.shape
    xd = layer.lora_dropout[name](x).reshape(n, c, hgt * wid)
    h = torch.matmul(a.reshape(a.shape[0], c).to(x.dtype), xd)  # (n, r, HW)
    res = result.reshape(n, result.shape[1], hgt * wid)
    b2 = b.reshape(b.shape[0], b.shape[1]).to(res.dtype)
    if n == 1:
        out = torch.addmm(res[0], b2, h[0].to(res.dtype), alpha=layer.scaling[name]).unsqueeze(0)
    else:
        out = torch.baddbmm(res, b2.expand(n, -1, -1), h.to(res.dtype), alpha=layer.scaling[name])
    return out.view(result.shape)


def _fast_forward_for(layer: Any) -> Any:
    """The replacement forward for a peft LoRA layer, or None when it has no fast path."""
    import torch
    from peft.tuners.lora import layer as lora_layer

    if type(layer) is lora_layer.Linear:
        return _linear_forward
    if type(layer) is lora_layer.Conv2d:
        base = layer.get_base_layer()
        ok = (isinstance(base, torch.nn.Conv2d) and tuple(base.kernel_size) == (1, 1) and tuple(base.stride) == (1, 1)
              and tuple(base.padding) == (0, 0) and base.groups == 1 and tuple(base.dilation) == (1, 1))
        if ok and all(tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1) and m.groups == 1 and m.bias is None
                      for m in list(layer.lora_A.values()) + list(layer.lora_B.values())):
            return _conv1x1_forward
    return None


def enable_lean_forward(model: "torch.nn.Module") -> int:
    """Switch ``model``'s peft LoRA Linear and 1x1-conv layers to the fused forward (an attribute
    on each instance, nothing global); returns how many. For a model this process owns, such as
    the trainer's own UNet; :func:`lean_lora_forward` does it for one block only."""
    import types

    n = 0
    for module in model.modules():
        fn = _fast_forward_for(module)
        if fn is not None and "forward" not in vars(module):
            module.forward = types.MethodType(fn, module)
            n += 1
    return n


def disable_lean_forward(model: "torch.nn.Module") -> None:
    """Give every layer :func:`enable_lean_forward` switched its class's forward back."""
    for module in model.modules():
        fn = vars(module).get("forward")
        if getattr(fn, "__func__", None) in (_linear_forward, _conv1x1_forward):
            del module.forward


@contextmanager
def lean_lora_forward(model: "torch.nn.Module") -> Iterator[int]:
    """Within the block, ``model``'s peft LoRA layers use the fused forward; yields how many."""
    n = enable_lean_forward(model)
    try:
        yield n
    finally:
        disable_lean_forward(model)
