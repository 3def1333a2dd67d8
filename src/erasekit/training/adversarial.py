"""The inner attack of adversarial erasure training (AdvUnlearn's, on the conditioning the denoiser sees).

Between two optimiser steps of an erasure, an attacker who holds the erasure as it is now looks for
conditioning that brings the concept back; the erasure's next step is then taken on that conditioning
instead of the plain concept prompt's, so that it learns to erase what the attacker found too.

The attack here is AdvUnlearn's inner problem, min over the conditioning c of
``|| f_erased(z_i, i, c) - f_original(z_i, i, c_concept) ||^2`` at one denoising step ``i`` (the erased
model's prediction made to match the original model's prediction for the concept prompt), solved with a
few Adam steps on the text-encoder outputs (``prompt_embeds`` and, where the family has it,
``pooled_prompt_embeds``: the space the ``soft-prompt`` attack searches) starting from the concept
prompt's own encoding. One step and one denoiser call per attack step keep it cheap beside the whole
trajectory the erasure's loss runs; the state ``z_i`` is the original model's own latent of the concept
prompt before step ``i``, where the concept is on its way.

AdvUnlearn attacks one prefix token in word-embedding space and trains the text encoder; the continuous
conditioning is the stronger attacker (every token position and the pooled vector move) and needs no
gradient through the text encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: The text-encoder outputs the attacker moves, where a family's encoding has them.
ATTACKED_KEYS = ("prompt_embeds", "pooled_prompt_embeds")


def adversarial_conditioning(
    predict: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    encoded: dict[str, torch.Tensor],
    target: torch.Tensor,
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Adam on the attacked keys of ``encoded`` so that ``predict(conditioning)`` moves towards ``target``.

    Args:
        predict: the erased model's prediction at the attacked state for a conditioning dict (built from
            ``encoded`` with the attacked keys replaced), differentiable in the conditioning.
        encoded: where the attack starts (the concept prompts' encoding), batch-first.
        target: the original model's prediction for the concept prompts at the same state.
        steps: Adam steps (0 returns ``encoded`` unchanged).
        lr: Adam's step size (the first step moves each element by about ``lr``).

    Returns:
        The conditioning found (``encoded`` with the attacked keys replaced, detached) and the objective
        (sum over rows of the per-row mean squared distance) before each step and after the last.
    """
    keys = [k for k in ATTACKED_KEYS if k in encoded]
    if steps <= 0 or not keys:
        return dict(encoded), []
    params = {k: encoded[k].detach().clone().requires_grad_(True) for k in keys}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    history: list[float] = []

    def objective() -> torch.Tensor:
        prediction = predict({**encoded, **params})
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1).sum()

    with torch.enable_grad():
        for _ in range(steps):
            loss = objective()
            history.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, list(params.values()))
            for p, g in zip(params.values(), grads):
                p.grad = g
            optimizer.step()
    with torch.no_grad():
        history.append(float(objective()))
    return {**encoded, **{k: p.detach() for k, p in params.items()}}, history
