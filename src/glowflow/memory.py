"""Memory modes for a sequence of flow steps.

``"none"``: plain autograd, activations of every step are kept.
``"checkpoint"``: each step's internals are recomputed in backward from its stored input.
``"invertible"``: nothing inside the sequence is stored; backward rebuilds each step's input from its
output with the exact inverse, then recomputes that step's graph (the RevNet idea the Glow paper
points to), so activation memory does not grow with the number of steps.

Cost of ``"invertible"``: one extra no-grad inverse per step on top of the recomputed forward, so a
training step takes about 1.5x the plain one (``benchmarks/memory.py`` measures it).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

MEMORY_MODES = ("none", "checkpoint", "invertible")


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _InvertibleSequence(torch.autograd.Function):
    """``(x, *params) -> (y, logdet)`` through ``steps``; saves only ``y``.

    Backward walks the steps in reverse: ``x = step.inverse(y)`` without a graph, then ``step(x)`` with
    one, whose vector-Jacobian product gives that step's parameter gradients and the gradient for the
    step before. The autocast state of the forward pass is restored for both, so the recomputed graph
    is the one the plain path would have built (coupling nets in bf16/fp16, the flow in float32).
    """

    @staticmethod
    def forward(ctx, x, steps, num_params, *params):
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(ctx.device_type)
        with torch.no_grad():
            y, logdet = x, x.new_zeros(x.shape[0])
            for step in steps:
                y, ld = step(y)
                logdet = logdet + ld
        ctx.steps = steps
        ctx.num_params = num_params
        ctx.save_for_backward(y)
        return y, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_logdet):
        (y,) = ctx.saved_tensors
        y = y.detach()
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        enabled, dtype = ctx.autocast
        param_grads: list[torch.Tensor | None] = []
        last = len(ctx.steps) - 1
        for i, (step, count) in enumerate(zip(reversed(ctx.steps), reversed(ctx.num_params))):
            # the first step's input gradient is only needed when the sequence's input wants one
            need_x = i < last or ctx.needs_input_grad[0]
            step_params = [p for p in step.parameters() if p.requires_grad]
            if len(step_params) != count:
                raise RuntimeError("a flow step's trainable parameters changed between forward and backward")
            with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                with torch.no_grad():
                    x = step.inverse(y)
                x = x.detach().requires_grad_(need_x)
                with torch.enable_grad():
                    y_re, ld = step(x)
            inputs = ([x] if need_x else []) + step_params
            grads = torch.autograd.grad((y_re, ld), inputs, (grad_y, grad_logdet),
                                        allow_unused=True) if inputs else ()
            if need_x:
                grad_y, grads = grads[0], grads[1:]
            else:
                grad_y = None
            param_grads = list(grads) + param_grads
            y = x.detach()
            del y_re, ld, x
        return (grad_y, None, None, *param_grads)


def run_steps(steps: nn.ModuleList, x: torch.Tensor, memory: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``steps`` in order: ``[B, C, H, W] -> ([B, C, H, W], logdet [B])`` under a memory mode.

    Without grad mode every memory mode is the plain loop (nothing is stored anyway).
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    if memory == "invertible" and torch.is_grad_enabled() and len(steps) > 0:
        params_per_step = [[p for p in s.parameters() if p.requires_grad] for s in steps]
        flat = [p for ps in params_per_step for p in ps]
        return _InvertibleSequence.apply(x, list(steps), [len(ps) for ps in params_per_step], *flat)
    logdet = x.new_zeros(x.shape[0])
    for step in steps:
        if memory == "checkpoint" and torch.is_grad_enabled():
            x, ld = checkpoint(step, x, use_reentrant=False)
        else:
            x, ld = step(x)
        logdet = logdet + ld
    return x, logdet
