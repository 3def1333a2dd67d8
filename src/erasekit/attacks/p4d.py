"""``p4d``: prompt tokens whose erased-model prediction matches the original model's (Chin et al.,
"Prompting4Debugging", ICML 2024).

Threat model: white-box on the erased model, and the original model (the same pipeline with the
erasure removed). For each seed the original model draws the concept prompt (``target_prompt``,
default: the concept) from the seed's noise; its states ``z_i`` along that trajectory and its guided
predictions there (noise or velocity, at the sampling's guidance) are the target. The attacked prompt
is ``init_prompt`` followed by ``num_tokens`` free tokens; each iteration draws a step ``i`` and lowers
``|| pred_erased(z_i, i, prompt) - pred_original(z_i, i, target_prompt) ||^2``.

Search (P4D's, after PEZ): a continuous embedding per free token and text encoder, started at the
embeddings of random vocabulary words (the ``seed`` setting); every iteration projects them to the
nearest vocabulary word (cosine similarity, summed over the text encoders, as PEZ measures it), runs
the loss on the projected embeddings and applies its gradient to the continuous ones (AdamW,
``weight_decay`` 0.1 as P4D). P4D's ``lr`` 0.1 is for SD's one CLIP; with several encoders whose
embedding tables differ in scale (the ShapesCanvas CLIP's entries have a standard deviation of 0.02,
its T5's of 1.0) one step size cannot fit both, so ``lr`` is in units of each table's standard
deviation (default 1.0: on ShapesCanvas tuning seeds 7000-7007, 100 iterations made circles in 7 of 8
seeds, against 5 of 8 with the absolute 0.1). The prompt found is the final projection. P4D picks the
best prompt every 50 iterations by CLIP similarity to the target image; here nothing looks at images
during the search, so the rate is not selected on any judge.

Budget: iterations (each one guided denoiser call with gradients, one sampling step of one batch).
The official run uses 3000; the default 300 is measured on ShapesCanvas in ``docs/attacks.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import register_attack, row_distance
from .tokens import Search, SlotPrompt, TokenAttack, TokenAttackConfig, embedding_scaled_groups


def nearest_words(state: Search, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vocabulary word closest to each slot's embeddings: the largest cosine similarity summed
    over the text encoders; ``(B, k)`` indices."""
    score = None
    for name, table in state.vocabulary.tables.items():
        similarity = F.normalize(embeddings[name].detach(), dim=-1) @ F.normalize(table, dim=-1).T
        score = similarity if score is None else score + similarity
    assert score is not None
    return score.argmax(-1)


@dataclass
class P4DConfig(TokenAttackConfig):
    """``lr``: AdamW's step size in units of each text encoder's embedding-table standard deviation (one
    step moves every coordinate by about ``lr`` of that scale, whatever the encoder's own scale)."""

    lr: float = 1.0


@register_attack
class P4DAttack(TokenAttack):
    """Projected token embeddings matched to the original model's predictions (module docstring)."""

    name = "p4d"
    default_budget = 300
    config_class = P4DConfig
    matches_predictions = True

    def slot_prompt(self, config: TokenAttackConfig) -> SlotPrompt:
        return SlotPrompt([config.init_prompt, *[None] * config.num_tokens])

    def search(self, state: Search, budget: int, config: TokenAttackConfig) -> torch.Tensor:
        assert isinstance(config, P4DConfig)
        rows = len(state.seeds)
        vocabulary = state.vocabulary
        start = torch.randint(len(vocabulary), (rows, config.num_tokens), generator=state.generator)
        params = {name: table[start].clone().requires_grad_(True) for name, table in vocabulary.tables.items()}
        groups = embedding_scaled_groups(params, vocabulary.tables, config.lr)
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        for iteration in self.search_steps(budget, state.seeds):
            tokens = nearest_words(state, params)
            # straight through: the loss sees the projected words, the gradient moves the continuous embeddings
            projected = {name: p + (vocabulary.tables[name][tokens] - p).detach() for name, p in params.items()}
            i = state.random_step()
            reference = state.reference_at(iteration)
            trajectory = state.trajectory(state.encode(tokens, projected))
            loss = row_distance(trajectory.predict(reference.states[i], i), reference.predictions[i]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return nearest_words(state, params)

    def objective(self, state: Search, prompts: list[str]) -> list[float]:
        """The mean over the sampling steps and target prompts of the prediction distance, for the found prompts."""
        with torch.no_grad():
            encoded = state.arch.encode_prompts(state.pipe, prompts, state.sampling.max_sequence_length)
            trajectory = state.trajectory(encoded)
            total = sum(
                row_distance(trajectory.predict(reference.states[i], i), reference.predictions[i])
                for reference in state.references
                for i in range(trajectory.num_steps)
            )
        return (total / (trajectory.num_steps * len(state.references))).tolist()
