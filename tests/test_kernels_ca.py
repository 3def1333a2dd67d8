"""Known-value tests of the concept-ablation kernels (erasekit.methods.ca)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erasekit.errors import ConfigError
from erasekit.methods.ca import ca_loss, ca_loss_from_model, ca_parameters, masked_mse
from erasekit.methods.esd import module_name_predicate


class Conditioned(nn.Module):
    """``pred = W x + t · to_v(cond)``: the concept and anchor predictions share every parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Linear(4, 4, bias=False)
        self.to_v = nn.Linear(3, 4, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.mix(x) + t * self.to_v(cond)


def test_gradient_flows_only_through_the_trainable_prediction() -> None:
    model = Conditioned()
    x, t = torch.randn(2, 4), torch.tensor(0.7)
    concept, anchor = torch.randn(2, 3), torch.randn(2, 3)
    ca_loss_from_model(model, x, t, concept, anchor).backward()
    got = [p.grad.clone() for p in model.parameters()]

    # Reference: the anchor prediction as a constant, d/dθ mean((f(c) - const)^2) by hand.
    model.zero_grad()
    with torch.no_grad():
        residual = model(x, t, concept) - model(x, t, anchor)
    scale = 2 * residual / residual.numel()
    assert torch.allclose(got[0], scale.T @ x, atol=1e-6)
    assert torch.allclose(got[1], t * scale.T @ concept, atol=1e-6)

    # Without the stop-gradient the gradient would differ (the anchor branch would pull too).
    model.zero_grad()
    ((model(x, t, concept) - model(x, t, anchor)) ** 2).mean().backward()
    assert not torch.allclose(model.to_v.weight.grad, got[1], atol=1e-4)

    # ca_loss detaches a target that still carries a graph.
    model.zero_grad()
    prediction, target = model(x, t, concept), model(x, t, anchor)
    ca_loss(prediction, target).backward()
    assert torch.allclose(model.to_v.weight.grad, got[1], atol=1e-6)


def test_prior_term_and_mask() -> None:
    prediction = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # Sample 0: only 1^2 counts -> 1; sample 1: 0. Mean 0.5.
    assert masked_mse(prediction, target, mask).item() == pytest.approx(0.5)
    assert masked_mse(prediction, target).item() == pytest.approx(5 / 4)
    noise = torch.ones(2, 2)
    total = ca_loss(prediction, target, mask, prior_prediction=torch.zeros(2, 2), prior_noise=noise, prior_weight=0.5)
    assert total.item() == pytest.approx(0.5 + 0.5 * 1.0)
    with pytest.raises(ValueError, match="both"):
        ca_loss(prediction, target, prior_prediction=noise)


def test_parameter_groups() -> None:
    model = Conditioned()
    kv = module_name_predicate(["to_v"])
    assert [n for n, _ in ca_parameters(model.named_parameters(), is_text_conditioning=kv)] == ["to_v.weight"]
    every = ca_parameters(model.named_parameters(), "full-weight", is_text_conditioning=kv)
    assert [n for n, _ in every] == ["mix.weight", "to_v.weight"]
    with pytest.raises(ConfigError, match="not available"):
        ca_parameters(model.named_parameters(), "attn", is_text_conditioning=kv)
    with pytest.raises(ConfigError, match="unknown CA parameter group"):
        ca_parameters(model.named_parameters(), "kv", is_text_conditioning=kv)
