"""``unlearndiffatk``: adversarial prefix tokens found with the diffusion-classifier objective (Zhang et
al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate Unsafe
Images ... For Now", ECCV 2024).

Threat model: white-box on the erased model, and a target image of the concept (the official code
draws it with the original SD; here the original model -- the pipeline with the erasure removed --
draws the concept prompt, ``target_prompt``, from each seed's noise). The attacked prompt is
``num_tokens`` free prefix tokens followed by ``init_prompt``. The objective is the erased model's
denoising loss on the target: for a step ``i`` and fresh noise ``e`` drawn each iteration,
``|| target(x0, e, i) - pred_erased(add_noise(x0, e, i), i, prefix + init_prompt) ||^2`` with the
conditional prediction (no guidance: the diffusion classifier reads the model's own conditional
likelihood), ``target`` the noise, velocity or sample the family predicts.

Search (as the official ``text_grad`` attacker): each free token is a point on the simplex over the
vocabulary; every iteration draws one word per slot from it (a multinomial sample, straight-through:
the gradient reaches the whole distribution), steps Adam (``lr`` 0.01, ``weight_decay`` 0.1: the
official defaults) and projects each slot back onto the simplex. The prompt found is each slot's most
probable word. The official attack stops as soon as the judge sees the concept, which selects on the
judge; here every seed runs the whole budget and nothing looks at images during the search.

Budget: iterations (each one conditional denoiser call with gradients). The official run allows up to
50 timesteps x 40 iterations with early stopping; on ShapesCanvas the default is measured in
``docs/attacks.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..arch.guidance import Conditional
from .base import register_attack, row_distance
from .tokens import Search, SlotPrompt, TokenAttack, TokenAttackConfig


@dataclass
class UnlearnDiffAtkConfig(TokenAttackConfig):
    """The official attacker's defaults: Adam ``lr`` 0.01, ``weight_decay`` 0.1, 5 prefix tokens; the
    steps drawn from the noisier half of the schedule (``step_fraction`` 0.5), where the shape is laid
    out (on ShapesCanvas tuning seeds 7000-7007, 100 iterations: circles in 6 of 8 seeds, against 4 of
    8 from the whole schedule, 5 of 8 with ``lr`` 0.03 and 4 of 8 from the first third)."""

    lr: float = 0.01
    step_fraction: float = 0.5


def project_to_simplex(weights: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row of the last dimension onto the probability simplex
    (sort-based, Held et al. 1974 / Duchi et al. 2008)."""
    size = weights.shape[-1]
    ordered, _ = weights.sort(dim=-1, descending=True)
    cumulative = ordered.cumsum(-1) - 1
    steps = torch.arange(1, size + 1, device=weights.device, dtype=weights.dtype)
    support = (ordered - cumulative / steps > 0).sum(-1, keepdim=True)
    threshold = cumulative.gather(-1, support - 1) / support.to(weights.dtype)
    return (weights - threshold).clamp_min(0)


@register_attack
class UnlearnDiffAtk(TokenAttack):
    """Prefix-token distributions optimised with the denoising loss on the target images (module docstring)."""

    name = "unlearndiffatk"
    default_budget = 100
    config_class = UnlearnDiffAtkConfig

    def slot_prompt(self, config: TokenAttackConfig) -> SlotPrompt:
        return SlotPrompt([*[None] * config.num_tokens, config.init_prompt])

    def _loss(
        self, state: Search, tokens: torch.Tensor, embeddings: dict[str, torch.Tensor], x0: torch.Tensor
    ) -> torch.Tensor:
        i = state.random_step()
        noise = torch.randn(x0.shape, generator=state.generator).to(device=x0.device, dtype=x0.dtype)
        trajectory = state.trajectory(state.encode(tokens, embeddings))
        noisy = trajectory.add_noise(x0, noise, i)
        assert trajectory.schedule is not None
        wanted = trajectory.schedule.target(x0, noise, i)
        return row_distance(trajectory.predict(noisy, i, Conditional()), wanted)

    def search(self, state: Search, budget: int, config: TokenAttackConfig) -> torch.Tensor:
        rows, size = len(state.seeds), len(state.vocabulary)
        weights = torch.full((rows, config.num_tokens, size), 1.0 / size, requires_grad=True)
        optimizer = torch.optim.Adam([weights], lr=config.lr, weight_decay=config.weight_decay)
        for iteration in self.search_steps(budget, state.seeds):
            sample = torch.multinomial(weights.detach().flatten(0, 1), 1, generator=state.generator)
            tokens = sample.view(rows, config.num_tokens)
            one_hot = F.one_hot(tokens, size).to(weights.dtype)
            # straight through: the words drawn are encoded, the gradient reaches the whole distribution
            mixed = one_hot + weights - weights.detach()
            x0 = state.reference_at(iteration).states[-1]  # the target image
            loss = self._loss(state, tokens, state.vocabulary.embed(mixed), x0).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                weights.copy_(project_to_simplex(weights))
        return weights.detach().argmax(-1)

    def objective(self, state: Search, prompts: list[str]) -> list[float]:
        """The denoising loss of the found prompts at every sampling step and on every target image, one
        fresh noise draw each, averaged."""
        with torch.no_grad():
            encoded = state.arch.encode_prompts(state.pipe, prompts, state.sampling.max_sequence_length)
            trajectory = state.trajectory(encoded)
            assert trajectory.schedule is not None
            total = torch.zeros(len(prompts))
            for reference in state.references:
                x0 = reference.states[-1]
                for i in range(trajectory.num_steps):
                    noise = torch.randn(x0.shape, generator=state.generator).to(device=x0.device, dtype=x0.dtype)
                    prediction = trajectory.predict(trajectory.add_noise(x0, noise, i), i, Conditional())
                    total += row_distance(prediction, trajectory.schedule.target(x0, noise, i)).cpu()
        return (total / (trajectory.num_steps * len(state.references))).tolist()
