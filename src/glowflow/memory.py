"""Memory modes for a sequence of flow steps.

``"none"``: plain autograd, activations of every step are kept.
``"checkpoint"``: each step's internals are recomputed in backward from its stored input.
``"invertible"``: nothing inside the sequence is stored; backward rebuilds each step's input from its
output with the exact inverse, then recomputes that step's graph (the RevNet idea the Glow paper
points to), so activation memory does not grow with the number of steps.

Cost of ``"invertible"``: the forward pass runs without a graph, and backward adds each step's
inverse, whose coupling-net evaluation is shared with the recomputation: about one extra forward
pass. ``benchmarks/memory.py`` measures 1.4-1.6x the plain training step on CPU at batch 8 (per-op
overhead weighs more there) and 1.3-1.4x at batch 32, with peak activation memory flat in K.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .layers import Coupling, FlowStep

MEMORY_MODES = ("none", "checkpoint", "invertible")


class _Baton:
    """What one backward pass through an invertible sequence holds: the output of the step whose
    backward runs next (``index`` is that step's position), rebuilt step by step by the inverses."""

    __slots__ = ("tensor", "index")

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.index = -1


class _InvertibleStep(torch.autograd.Function):
    """One flow step ``(x, *params) -> (y, logdet)`` that keeps none of its activations.

    Only the sequence's last step saves its output. In backward, step ``k`` takes its output from the
    baton (left there by step ``k + 1``), rebuilds its input ``x = step.inverse(y)`` without a graph,
    recomputes ``step(x)`` with one, and differentiates it: that gives its parameter gradients and
    the gradient for step ``k - 1``, to which it passes ``x`` on the baton. One autograd node per
    step, so each step's parameter gradients are released (and, under DDP, all-reduced) as soon as
    its backward is done. The forward's autocast state is restored for the inverse and the
    recomputation, so the recomputed graph is the one the plain path builds (coupling nets in
    bf16/fp16, the flow's main path in float32).
    """

    @staticmethod
    def forward(ctx, x, step, index, baton, is_last, *params):
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        with torch.no_grad():
            y, logdet = step(x)
        ctx.step, ctx.index, ctx.baton, ctx.is_last, ctx.params = step, index, baton, is_last, params
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
        step = ctx.step
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        params = list(ctx.params)  # the step's trainable parameters, as run_steps found them
        need_x = ctx.needs_input_grad[0]
        enabled, dtype = ctx.autocast
        with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            backward_step = _flow_step_backward if _has_shared_net(step) else _generic_step_backward
            x, grad_x, grads = backward_step(step, y, grad_y, grad_logdet, params, need_x)
        # step 0 hands its input to nobody: drop it rather than keep it until the graph is freed
        ctx.baton.tensor, ctx.baton.index = (x.detach(), ctx.index - 1) if ctx.index > 0 else (None, -1)
        return (grad_x, None, None, None, None, *grads)


def _generic_step_backward(step, y, grad_y, grad_logdet, params, need_x):
    """Any invertible step: ``x = step.inverse(y)``, then differentiate a recomputed ``step(x)``.

    Returns ``(x, dL/dx or None, [dL/dp for p in params])``.
    """
    with torch.no_grad():
        x = step.inverse(y)
    x = x.detach().requires_grad_(need_x)
    with torch.enable_grad():
        y_re, logdet = step(x)
    inputs = ([x] if need_x else []) + params
    grads = list(torch.autograd.grad((y_re, logdet), inputs, (grad_y, grad_logdet), allow_unused=True)
                 if inputs else ())
    grad_x = grads.pop(0) if need_x else None
    return x.detach(), grad_x, grads


def _has_shared_net(step) -> bool:
    return type(step) is FlowStep and type(step.coupling) is Coupling


def _flow_step_backward(step, y, grad_y, grad_logdet, params, need_x):
    """:class:`FlowStep` (actnorm -> permutation -> coupling), evaluating the coupling net once.

    The coupling's inverse needs ``net(y1)`` and its recomputed forward needs ``net(x1)``, and
    ``x1 == y1`` exactly (that half passes through), so one evaluation with a graph serves both:
    one net evaluation per step fewer than the generic path. The coupling's two formulas below
    mirror :meth:`Coupling.forward` / :meth:`Coupling.inverse` (tests/test_memory.py checks the
    gradients against plain autograd for both kinds); actnorm and permutation go the generic way.
    """
    c = step.coupling
    n = c.num_pass
    with torch.enable_grad():
        u1 = y[:, :n].detach().requires_grad_(True)
        shift, scale = c._shift_scale(u1)
        y2 = y[:, n:]
        if scale is None:
            u2 = (y2 - shift).detach().requires_grad_(True)
            y2_re, logdet_c = u2 + shift, None
        else:
            u2 = (y2 / scale - shift).detach().requires_grad_(True)
            y2_re, logdet_c = (u2 + shift) * scale, torch.log(scale).flatten(1).sum(1)
    pre = [step.actnorm, step.permute]
    pre_ids = {id(p) for m in pre for p in m.parameters()}
    pre_params = [p for p in params if id(p) in pre_ids]
    coupling_params = [p for p in params if id(p) not in pre_ids]
    outputs, grad_outputs = (y2_re,), (grad_y[:, n:],)
    if logdet_c is not None:
        outputs, grad_outputs = (y2_re, logdet_c), (grad_y[:, n:], grad_logdet)
    g = torch.autograd.grad(outputs, [u1, u2, *coupling_params], grad_outputs, allow_unused=True)
    grad_u = torch.cat([grad_y[:, :n] + (g[0] if g[0] is not None else 0), g[1]], 1)
    u = torch.cat([u1.detach(), u2.detach()], 1)  # the coupling's input, rebuilt

    with torch.no_grad():
        x = step.actnorm.inverse(step.permute.inverse(u))
    x = x.requires_grad_(need_x)
    with torch.enable_grad():
        a, logdet_a = step.actnorm(x)
        u_re, logdet_p = step.permute(a)
        logdet_pre = logdet_a + logdet_p
    inputs = ([x] if need_x else []) + pre_params
    h = list(torch.autograd.grad((u_re, logdet_pre), inputs, (grad_u, grad_logdet), allow_unused=True)
             if inputs else ())
    grad_x = h.pop(0) if need_x else None
    by_param = {id(p): gp for p, gp in zip(coupling_params, g[2:])}
    by_param.update({id(p): gp for p, gp in zip(pre_params, h)})
    return x.detach(), grad_x, [by_param[id(p)] for p in params]


def saved_tensor_bytes(loss_fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``loss_fn()`` builds its
    graph; then runs backward, so the stored graph is shown to suffice. What a memory mode saves."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(storages.values())


def run_steps(steps: nn.ModuleList, x: torch.Tensor, memory: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``steps`` in order: ``[B, C, H, W] -> ([B, C, H, W], logdet [B])`` under a memory mode.

    Without grad mode every memory mode is the plain loop (nothing is stored anyway).
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    invertible = memory == "invertible" and torch.is_grad_enabled()
    baton = _Baton() if invertible else None
    logdet = x.new_zeros(x.shape[0])
    for k, step in enumerate(steps):
        if invertible:
            params = [p for p in step.parameters() if p.requires_grad]
            x, ld = _InvertibleStep.apply(x, step, k, baton, k == len(steps) - 1, *params)
        elif memory == "checkpoint" and torch.is_grad_enabled():
            x, ld = checkpoint(step, x, use_reentrant=False)
        else:
            x, ld = step(x)
        logdet = logdet + ld
    return x, logdet
