"""Known-value tests of the ESD kernels (erasekit.methods.esd)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from erasekit.errors import ConfigError
from erasekit.methods.esd import (
    esd_loss,
    esd_parameters,
    esd_target,
    esd_target_from_model,
    module_name_predicate,
)


class TinyDenoiser(nn.Module):
    """``pred = ff(x) + t · to_k(cond)``: one text-conditioning projection and one other module."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Module()
        self.block.attn2 = nn.Module()
        self.block.attn2.to_k = nn.Linear(3, 4)
        self.block.ff = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.block.ff(x) + t * self.block.attn2.to_k(cond)


def test_target_equals_its_formula_on_fixed_tensors() -> None:
    neutral = torch.tensor([1.0, -2.0, 0.5])
    concept = torch.tensor([3.0, 0.0, 0.5])
    # neutral - eta (concept - neutral), eta = 2: [1 - 4, -2 - 4, 0.5 - 0]
    assert esd_target(neutral, concept, 2.0).tolist() == [-3.0, -6.0, 0.5]
    # = (1 + eta) neutral - eta concept
    torch.testing.assert_close(esd_target(neutral, concept, 1.5), 2.5 * neutral - 1.5 * concept)
    assert esd_target(neutral, concept, 0.0).tolist() == neutral.tolist()
    with pytest.raises(ValueError, match="shape"):
        esd_target(neutral, concept[:2])


def test_targets_come_from_the_frozen_copy_without_gradient() -> None:
    model = TinyDenoiser()
    frozen = copy.deepcopy(model).requires_grad_(False)
    x, t = torch.randn(2, 4), torch.tensor(0.5)
    concept, empty = torch.randn(2, 3), torch.zeros(2, 3)
    # Two conditional predictions (the guidance-distilled form): concept vs the empty prompt.
    target = esd_target_from_model(frozen, x, t, concept, empty, eta=1.0)
    assert not target.requires_grad
    expected = 2 * frozen(x, t, empty) - frozen(x, t, concept)
    torch.testing.assert_close(target, expected)
    # Even a predictor with trainable parameters yields a target outside the graph.
    assert not esd_target_from_model(model, x, t, concept, empty).requires_grad

    loss = esd_loss(model(x, t, concept), target)
    loss.backward()
    with torch.no_grad():  # one SGD step by hand (torch.optim takes seconds to import)
        for parameter in model.parameters():
            parameter -= 0.1 * parameter.grad
    # The trained model moved; the frozen copy (and so the next targets) did not.
    assert not torch.equal(model.block.ff.weight, frozen.block.ff.weight)
    torch.testing.assert_close(esd_target_from_model(frozen, x, t, concept, empty, eta=1.0), target)
    with pytest.raises(ValueError, match="frozen copy"):
        esd_loss(model(x, t, concept), model(x, t, empty))


def test_parameter_sets_split_the_model() -> None:
    model = TinyDenoiser()
    is_text = module_name_predicate(["block.attn2.to_k"])
    x = [name for name, _ in esd_parameters(model.named_parameters(), is_text, "esd-x")]
    u = [name for name, _ in esd_parameters(model.named_parameters(), is_text, "esd-u")]
    everything = [name for name, _ in esd_parameters(model.named_parameters(), is_text, "esd-all")]
    assert x == ["block.attn2.to_k.weight", "block.attn2.to_k.bias"]
    assert u == ["block.ff.weight", "block.ff.bias"]
    assert sorted(everything) == sorted(x + u)
    # A parent name covers its children; a mere prefix of a name does not.
    assert module_name_predicate(["block.attn2"])("block.attn2.to_k")
    assert not module_name_predicate(["block.attn"])("block.attn2.to_k")
    with pytest.raises(ConfigError, match="xattn"):
        esd_parameters(model.named_parameters(), is_text, "xattn")
    with pytest.raises(ConfigError, match="selects no parameters"):
        esd_parameters(model.named_parameters(), module_name_predicate(["nowhere"]), "esd-x")
