"""Known-value tests of the EAP kernels (erasekit.methods.eap)."""

from __future__ import annotations

import pytest
import torch

from erasekit.errors import ConfigError
from erasekit.methods.eap import (
    adversarial_embedding,
    eap_candidates,
    eap_losses,
    gumbel_softmax,
    kmeans_centres,
    nearest_tokens,
    preservation_loss,
    x0_from_epsilon,
    x0_from_velocity,
)


def planted_vocabulary() -> tuple[torch.Tensor, torch.Tensor]:
    """A random vocabulary where rows 7, 21 and 33 are the concept plus growing noise (nearest in that order)."""
    g = torch.Generator().manual_seed(0)
    vocabulary = torch.randn(50, 8, generator=g)
    concept = torch.randn(8, generator=g)
    direction = torch.randn(8, generator=g)
    for row, scale in ((7, 0.01), (21, 0.1), (33, 0.3)):
        vocabulary[row] = concept + scale * direction
    return vocabulary, concept


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nearest_tokens_finds_the_planted_neighbours(metric: str) -> None:
    vocabulary, concept = planted_vocabulary()
    assert nearest_tokens(concept, vocabulary, 3, metric=metric).tolist() == [7, 21, 33]
    assert nearest_tokens(concept, vocabulary, 2, metric=metric, exclude=torch.tensor([7])).tolist() == [21, 33]


def test_nearest_tokens_bad_input() -> None:
    vocabulary, concept = planted_vocabulary()
    with pytest.raises(ConfigError, match="metric"):
        nearest_tokens(concept, vocabulary, 3, metric="dot")
    with pytest.raises(ConfigError, match="between 1 and 49"):
        nearest_tokens(concept, vocabulary, 50, exclude=torch.tensor([7, 7]))


def test_gumbel_softmax_draws_with_the_softmax_probabilities() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(1)
    # Gumbel-max: the argmax of a sample is distributed as softmax(logits).
    draws = gumbel_softmax(logits.expand(40000, 4), 0.5, hard=True, generator=g)
    assert set(draws.sum(-1).tolist()) == {1.0} and set(draws.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(draws.mean(0), torch.softmax(logits, 0), atol=0.01, rtol=0)
    # The same generator state draws the same sample; a soft sample is a distribution on the simplex.
    soft = gumbel_softmax(logits, 2.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(soft, gumbel_softmax(logits, 2.0, generator=torch.Generator().manual_seed(2)))
    assert soft.sum().item() == pytest.approx(1.0) and (soft > 0).all()
    # A low temperature makes the soft sample nearly its hard one.
    cold = gumbel_softmax(logits, 1e-3, generator=torch.Generator().manual_seed(3))
    hot = gumbel_softmax(logits, 1e-3, hard=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cold, hot, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="temperature"):
        gumbel_softmax(logits, 0.0)


def test_straight_through_gradient_is_the_soft_samples() -> None:
    logits = torch.tensor([0.5, -0.2, 0.1], requires_grad=True)
    target = torch.tensor([1.0, 2.0, 3.0])
    hard = gumbel_softmax(logits, 0.7, hard=True, generator=torch.Generator().manual_seed(4))
    (hard * target).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    soft = gumbel_softmax(logits, 0.7, generator=torch.Generator().manual_seed(4))
    (soft * target).sum().backward()
    torch.testing.assert_close(got, logits.grad)
    assert got.abs().sum() > 0


def test_kmeans_finds_separated_clusters() -> None:
    g = torch.Generator().manual_seed(5)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([m + 0.1 * torch.randn(20, 2, generator=g) for m in means])
    centres = kmeans_centres(points, 3, generator=torch.Generator().manual_seed(6))
    expected = torch.stack([points[20 * i : 20 * (i + 1)].mean(0) for i in range(3)])
    order = centres[:, 0] * 100 + centres[:, 1]  # (0,0) < (0,10) < (10,0)
    torch.testing.assert_close(centres[order.argsort()], expected[[0, 2, 1]], atol=1e-5, rtol=0)


def test_candidates_are_centres_of_the_nearest_tokens() -> None:
    vocabulary, concept = planted_vocabulary()
    # The three planted rows are the nearest; one centre of them is their mean.
    centre = eap_candidates(concept, vocabulary, nearest=3, centres=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(centre, vocabulary[[7, 21, 33]].mean(0, keepdim=True))
    three = eap_candidates(concept, vocabulary, nearest=3, centres=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        three[three[:, 0].argsort()], vocabulary[[7, 21, 33]][vocabulary[[7, 21, 33], 0].argsort()]
    )


def test_x0_conversions_invert_the_forward_processes() -> None:
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    sigma = 0.3
    torch.testing.assert_close(x0_from_velocity((1 - sigma) * x0 + sigma * noise, noise - x0, sigma), x0)
    alpha_bar = torch.tensor(0.64)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(x0_from_epsilon(x_t, noise, alpha_bar), x0)


def test_losses_alternate_model_and_adversary() -> None:
    g = torch.Generator().manual_seed(8)
    candidates = torch.randn(4, 3, generator=g)
    frozen = torch.randn(3, 2, generator=g)  # frozen x̂0 = c_r @ frozen
    trained = (frozen + 0.5 * torch.randn(3, 2, generator=g)).requires_grad_(True)
    logits = torch.zeros(4, requires_grad=True)

    weights = gumbel_softmax(logits, 1.0, generator=torch.Generator().manual_seed(9))
    c_r = adversarial_embedding(weights, candidates)
    torch.testing.assert_close(c_r, weights @ candidates)
    preserve = preservation_loss(c_r @ trained, c_r @ frozen)
    esd = torch.tensor(2.0)
    model_loss, adversary_loss = eap_losses(esd, preserve, 0.5)
    assert model_loss.item() == pytest.approx(2.0 + 0.5 * preserve.item())
    assert adversary_loss.item() == pytest.approx(-preserve.item())

    # One adversary step (gradient descent on -preservation) raises the preservation loss for the same noise.
    (logits_grad,) = torch.autograd.grad(adversary_loss, logits, retain_graph=True)
    stepped = (logits - 1.0 * logits_grad).detach()
    weights_after = gumbel_softmax(stepped, 1.0, generator=torch.Generator().manual_seed(9))
    c_after = adversarial_embedding(weights_after, candidates)
    assert preservation_loss(c_after @ trained, c_after @ frozen) > preserve
    # The model step's gradient reaches the trained weights only.
    (trained_grad,) = torch.autograd.grad(model_loss, trained)
    assert trained_grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="weight"):
        eap_losses(esd, preserve, -1.0)
