"""Memory modes for a sequence of flow steps.

``"none"``: plain autograd, activations of every step are kept.
``"checkpoint"``: each step's internals are recomputed in backward from its stored input.
``"invertible"``: nothing inside the sequence is stored; backward rebuilds each step's input from its
output with the exact inverse, then recomputes that step's graph (the RevNet idea the Glow paper
points to), so activation memory does not grow with the number of steps.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

MEMORY_MODES = ("none", "checkpoint", "invertible")


class _InvertibleSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, steps, num_params, *params):
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
    def backward(ctx, grad_y, grad_logdet):
        (y,) = ctx.saved_tensors
        y = y.detach()
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        param_grads: list[torch.Tensor | None] = []
        for step, count in zip(reversed(ctx.steps), reversed(ctx.num_params)):
            with torch.no_grad():
                x = step.inverse(y)
            x = x.detach().requires_grad_(True)
            step_params = [p for p in step.parameters() if p.requires_grad]
            with torch.enable_grad():
                y_re, ld = step(x)
            grads = torch.autograd.grad((y_re, ld), [x, *step_params], (grad_y, grad_logdet),
                                        allow_unused=True)
            grad_y = grads[0]
            param_grads = list(grads[1:]) + param_grads
            y = x.detach()
        return (grad_y, None, None, *param_grads)


def run_steps(steps: nn.ModuleList, x: torch.Tensor, memory: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``steps`` in order: ``[B, C, H, W] -> ([B, C, H, W], logdet [B])`` under a memory mode."""
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
