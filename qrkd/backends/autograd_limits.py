"""What the fused backward passes cannot do, refused with clear errors: double backward and torch.func.vmap.

Double backward. The compiled and Triton kernels produce the student gradient with fused code, and the torch
backend's angle backward is a chunked pass over in-place temporaries: none of them is itself differentiable. Such a
backward runs its computation through `fused_backward`, an autograd node whose own backward raises. A backward run
with create_graph=True (`torch.autograd.grad(..., create_graph=True)`, `loss.backward(create_graph=True)`,
`torch.func.grad`) therefore returns the right gradient, and differentiating that gradient raises a RuntimeError that
names the backend and the backends that do support double backward. Without it the gradient would be detached from
the graph and its own derivative would silently come out as zero. The computation runs inside the node's forward, on
plain tensors even under torch.func transforms (whose wrapped tensors a Triton kernel could not read).

vmap. The autograd Functions have no batching rule; `vmap_refusal` makes torch.func.vmap over one say so.
"""

from __future__ import annotations

import torch


class _FusedBackward(torch.autograd.Function):
    @staticmethod
    def forward(compute, message, *tensors):
        return compute(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def fused_backward(compute, tensors, backend: str, op: str, supported=("reference",)):
    """compute(*tensors): a backward computation returning a tensor or a tuple of tensors. `tensors` must hold
    everything the result depends on (the inputs of the loss, not only the intermediates computed from them, and the
    incoming gradient), so that any derivative of the result reaches this node and raises."""
    where = " or ".join(f"backend={name!r}" for name in supported)
    message = (
        f"qrkd: double backward (differentiating the gradient of {op}) is not supported by backend={backend!r}; "
        f"double backward is supported by {where}"
    )
    return _FusedBackward.apply(compute, message, *tensors)


_transforms_active_hook = getattr(torch._C, "_are_functorch_transforms_active", None)


def functorch_transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is tracing this call; True on a torch without the hook, so that
    callers take the route that works under transforms."""
    return _transforms_active_hook is None or _transforms_active_hook()


def vmap_refusal(backend: str, op: str):
    """A `vmap` staticmethod for an autograd.Function: torch.func.vmap over it raises a clear error."""

    def vmap(info, in_dims, *args):
        raise RuntimeError(
            f"qrkd: torch.func.vmap is not supported by backend={backend!r} ({op}); call the loss once per batch "
            "element instead (torch.func.grad and grad_and_value are supported)"
        )

    return staticmethod(vmap)
