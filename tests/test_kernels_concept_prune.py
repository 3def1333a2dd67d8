"""Known-value tests of the ConceptPrune kernels (erasekit.methods.concept_prune)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erasekit.errors import ConfigError
from erasekit.methods.concept_prune import (
    InputNormRecorder,
    neuron_scores,
    skilled_neurons,
    skilled_weights,
    wanda_scores,
)

HIDDEN = 16


def hidden_activations(step: int, concept: bool, seed: int) -> torch.Tensor:
    """``(batch, tokens, HIDDEN)`` feed-forward hidden activations with a planted pattern.

    Concept prompts light up neurons 3 and 7 at step 0 and 5 and 11 at step 1; neuron 0 is loud on every
    prompt (louder on the base prompts), so it is never concept-specific.
    """
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x[..., 0] *= 50.0 if concept else 60.0
    if concept:
        for neuron in (3, 7) if step == 0 else (5, 11):
            x[..., neuron] *= 20.0
    return x


def test_picks_the_top_units_of_a_planted_activation_pattern() -> None:
    torch.manual_seed(0)
    ff_out = nn.Linear(HIDDEN, 4)
    concept_scores, base_scores = [], []
    with InputNormRecorder({"ff.net.2": ff_out}) as recorder:
        for step in range(2):
            for concept, scores in ((True, concept_scores), (False, base_scores)):
                recorder.reset()
                for seed in range(3):  # several prompts accumulate into one norm
                    ff_out(hidden_activations(step, concept, 10 * step + seed))
                scores.append(neuron_scores(ff_out.weight, recorder.norms()["ff.net.2"]))
    keep = skilled_neurons(concept_scores, base_scores, top_share=2 / HIDDEN)
    assert sorted(torch.nonzero(~keep).flatten().tolist()) == [3, 5, 7, 11]
    # One step only: its two planted neurons.
    only_first = skilled_neurons(concept_scores[:1], base_scores[:1], top_share=2 / HIDDEN)
    assert sorted(torch.nonzero(~only_first).flatten().tolist()) == [3, 7]
    # The hooks are gone after the block.
    assert not ff_out._forward_pre_hooks


def test_recorder_norms_and_wanda_scores_by_hand() -> None:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
    with InputNormRecorder({"out": layer}) as recorder:
        layer(torch.tensor([[3.0, 0.0, 1.0]]))
        layer(torch.tensor([[[4.0, 1.0, 0.0]]]))
    norms = recorder.norms()["out"]
    torch.testing.assert_close(norms, torch.tensor([5.0, 1.0, 1.0], dtype=torch.float64))
    scores = wanda_scores(layer.weight, norms)
    torch.testing.assert_close(scores, torch.tensor([[5.0, 2.0, 0.5], [0.0, 3.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(neuron_scores(layer.weight, norms), torch.tensor([5.0, 5.0, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="do not fit"):
        wanda_scores(layer.weight, norms[:2])


def test_weight_level_selection_is_per_row_and_needs_concept_above_base() -> None:
    concept = torch.tensor([[9.0, 1.0, 5.0, 2.0], [1.0, 8.0, 2.0, 7.0]])
    base = torch.tensor([[10.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # Row 0: 9 is not above its base 10, so the top eligible is 5; row 1: 8.
    keep = skilled_weights([concept], [base], top_share=0.25)
    assert keep.tolist() == [[True, True, False, True], [True, False, True, True]]
    # Fewer eligible entries than the share asks for: only the eligible ones go.
    keep = skilled_weights([concept], [concept + 1.0], top_share=0.5)
    assert keep.all()
    with pytest.raises(ConfigError, match="share"):
        skilled_neurons([concept[0]], [base[0]], top_share=1.5)
    with pytest.raises(ValueError, match="same number"):
        skilled_neurons([concept[0]], [], top_share=0.5)
