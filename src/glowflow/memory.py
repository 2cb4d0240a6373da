"""Memory modes for a sequence of invertible layers (:class:`glowflow.layers.Chain`).

``"none"``: plain autograd, activations of every layer are kept.
``"checkpoint"``: each layer's internals are recomputed in backward from its stored input.
``"invertible"``: nothing inside the sequence is stored; backward rebuilds each layer's input from
its output with the exact inverse, then recomputes that layer's graph (the RevNet idea the Glow
paper points to), so activation memory does not grow with the number of layers.

Any layer of the interface works (``forward``, ``inverse`` and ``backward_from_output``, which
:class:`~glowflow.layers.InvertibleLayer` provides); this module knows no layer's internals. The
cost of ``"invertible"`` is about one extra forward pass: the coupling's network is evaluated once
for both the inverse and the recomputation (``Coupling.backward_from_output``).
``benchmarks/memory.py`` measures it (docs/results.md).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = ["MEMORY_MODES", "run_layers"]

MEMORY_MODES = ("none", "checkpoint", "invertible")


class _Baton:
    """What one backward pass through an invertible sequence holds: the output of the layer whose
    backward runs next (``index`` is that layer's position), rebuilt layer by layer by the inverses."""

    __slots__ = ("tensor", "index")

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.index = -1


class _InvertibleStep(torch.autograd.Function):
    """One layer ``(x, *params) -> (y, logdet)`` that keeps none of its activations.

    Only the sequence's last layer saves its output. In backward, layer ``k`` takes its output from
    the baton (left there by layer ``k + 1``), and ``layer.backward_from_output`` rebuilds its input
    and differentiates a recomputed forward: that gives its parameter gradients and the gradient for
    layer ``k - 1``, to which it passes its input on the baton. One autograd node per layer, so each
    layer's parameter gradients are released (and, under DDP, all-reduced) as soon as its backward
    is done. The forward's autocast state is restored for the inverse and the recomputation, so the
    recomputed graph is the one the plain path builds (coupling nets in bf16/fp16, the flow's main
    path in float32).
    """

    @staticmethod
    def forward(ctx, x, layer, index, baton, is_last, condition, *params):
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        with torch.no_grad():
            y, logdet = layer(x, **_given(layer, condition))
        ctx.layer, ctx.index, ctx.baton, ctx.is_last, ctx.params = layer, index, baton, is_last, params
        ctx.condition = condition
        if is_last:
            ctx.save_for_backward(y)
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        if ctx.is_last:
            (y,) = ctx.saved_tensors
        elif ctx.baton.index == ctx.index:
            y = ctx.baton.tensor
        else:
            raise RuntimeError("invertible memory mode: the backward pass reached flow steps out of order "
                               f"(step {ctx.index} found the output of step {ctx.baton.index}); "
                               "use memory='checkpoint' for this use of autograd")
        y = y.detach()
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        condition = ctx.condition
        if condition is not None:  # a fresh leaf, so the layer's gradient for it stops there
            condition = condition.detach().requires_grad_(ctx.needs_input_grad[5])
        enabled, dtype = ctx.autocast
        with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            x, grad_x, grads = ctx.layer.backward_from_output(y, grad_y, grad_logdet, ctx.needs_input_grad[0],
                                                              **_given(ctx.layer, condition))
        grad_condition = grads.pop(condition, None) if condition is not None and condition.requires_grad else None
        # layer 0 hands its input to nobody: drop it rather than keep it until the graph is freed
        ctx.baton.tensor, ctx.baton.index = (x.detach(), ctx.index - 1) if ctx.index > 0 else (None, -1)
        return (grad_x, None, None, None, None, grad_condition, *(grads.get(p) for p in ctx.params))


def _given(layer, condition) -> dict:
    return {"condition": condition} if condition is not None and layer.takes_condition else {}


def run_layers(layers, x: torch.Tensor, memory: str = "none",
               condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``layers`` in order: ``x -> (y, logdet [B])``, gradients computed under a memory mode.
    ``condition`` goes to the layers that take one (``layer.takes_condition``), by keyword.

    Without grad mode every memory mode is the plain loop (nothing is stored anyway).
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    grad = torch.is_grad_enabled()
    baton = _Baton() if memory == "invertible" and grad else None
    logdet = x.new_zeros(x.shape[0])
    for k, layer in enumerate(layers):
        if baton is not None:
            params = [p for p in layer.parameters() if p.requires_grad]
            x, ld = _InvertibleStep.apply(x, layer, k, baton, k == len(layers) - 1,
                                          condition if _given(layer, condition) else None, *params)
        elif memory == "checkpoint" and grad:
            x, ld = checkpoint(layer, x, use_reentrant=False, **_given(layer, condition))
        else:
            x, ld = layer(x, **_given(layer, condition))
        logdet = logdet + ld
    return x, logdet
