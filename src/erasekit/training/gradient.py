"""Gradients of a loss on the final latent (and optional ones on the intermediate latents) with respect
to mask logits, through the whole trajectory.

:func:`checkpointed_gradient` is erasekit's method: keep the T latents of a no-grad pass, then walk
back through the steps, recomputing each one with gradients on and obtaining, in ONE autograd call,
both its contribution to dL/dlambda and dL/dz for the step before (the last step is not recomputed:
it runs with its graph at once and the loss joins its autograd call). Peak memory is one step's graph
whatever T is. :func:`naive_gradient` (one graph over all steps) gives the same gradients without the
recomputed forward passes, for models small enough to keep the whole graph
(``train.gradient_checkpointing=false``) and to test the method against; :func:`two_call_gradient` (two
autograd calls per recomputed step, as the reference implementation does) exists to benchmark it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..arch.samplers import run_trajectory

StepFn = Callable[[torch.Tensor, int], torch.Tensor]
LossFn = Callable[[torch.Tensor], torch.Tensor]
StepLossFn = Callable[[int, torch.Tensor], torch.Tensor]


def _forward_and_final_gradient(
    step: StepFn, z_start: torch.Tensor, num_steps: int, loss_fn: LossFn
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The no-grad pass keeping every latent, the loss, and dL/dz0."""
    latents = run_trajectory(step, z_start, num_steps, keep=True)
    z_final = latents[-1].detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(z_final)
        (g,) = torch.autograd.grad(loss, z_final)
    return latents, loss, g


def checkpointed_gradient(
    step: StepFn,
    z_start: torch.Tensor,
    num_steps: int,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    before_step: Callable[[int], None] | None = None,
    step_loss: StepLossFn | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and d loss / d params, with step-wise recomputation (memory flat in ``num_steps``).

    Args:
        step: stateless ``z_i -> z_{i+1}``; it must give the same result when called again.
        z_start: initial noise (no gradient needed).
        loss_fn: loss of the final latent. Terms on the parameters alone (the sparsity penalty)
            are added by the caller: this function covers the trajectory.
        params: leaf tensors to differentiate (mask logits).
        before_step: optional callback before each recomputation (e.g. to move the progress bar).
        step_loss: optional loss of the latent after step ``i`` for every step but the last, added
            to ``loss_fn``'s; it joins the autograd call of the step that produced that latent.

    Returns:
        ``(loss, grads)`` with ``grads[k]`` shaped like ``params[k]`` (zeros where unused).
    """
    if num_steps < 1:
        raise ValueError("checkpointed_gradient needs at least one step")
    # The last step runs with gradients on straight away and the loss joins its autograd call: it
    # would otherwise be computed once without a graph and then again to differentiate it.
    latents = run_trajectory(step, z_start, num_steps - 1, keep=True)
    grads = [torch.zeros_like(p) for p in params]
    g: torch.Tensor | None = None
    loss = torch.zeros(())
    for i in reversed(range(num_steps)):
        if before_step is not None:
            before_step(i)
        z = latents[i].detach().requires_grad_(True)
        with torch.enable_grad():
            out = step(z, i)
            if g is None:
                loss = loss_fn(out)
                results = torch.autograd.grad(loss, [z, *params], allow_unused=True)
            elif step_loss is None:
                results = torch.autograd.grad(out, [z, *params], grad_outputs=g, allow_unused=True)
            else:
                extra = step_loss(i, out)
                loss = loss + extra.detach()
                results = torch.autograd.grad(
                    [out, extra], [z, *params], grad_outputs=[g, torch.ones_like(extra)], allow_unused=True
                )
        g = results[0]
        for acc, r in zip(grads, results[1:]):
            if r is not None:
                acc.add_(r)
        latents[i] = None  # type: ignore[call-overload]  # free the latent we no longer need
    return loss.detach(), grads


def naive_gradient(
    step: StepFn,
    z_start: torch.Tensor,
    num_steps: int,
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    step_loss: StepLossFn | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain backpropagation through one graph of all steps (memory grows with ``num_steps``);
    ``step_loss`` as in :func:`checkpointed_gradient`."""
    with torch.enable_grad():
        z = z_start
        losses = []
        for i in range(num_steps):
            z = step(z, i)
            if step_loss is not None and i < num_steps - 1:
                losses.append(step_loss(i, z))
        loss = sum(losses, loss_fn(z))
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def two_call_gradient(
    step: StepFn, z_start: torch.Tensor, num_steps: int, loss_fn: LossFn, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Step-wise recomputation with two autograd calls per step (parameters, then latent)."""
    latents, loss, g = _forward_and_final_gradient(step, z_start, num_steps, loss_fn)
    grads = [torch.zeros_like(p) for p in params]
    for i in reversed(range(num_steps)):
        z = latents[i].detach().requires_grad_(True)
        with torch.enable_grad():
            out = step(z, i)
            param_grads = torch.autograd.grad(out, list(params), grad_outputs=g, retain_graph=True, allow_unused=True)
            (g,) = torch.autograd.grad(out, z, grad_outputs=g)
        for acc, r in zip(grads, param_grads):
            if r is not None:
                acc.add_(r)
    return loss.detach(), grads
