"""Known-value tests of the UCE closed form (erasekit.methods.uce)."""

from __future__ import annotations

import pytest
import torch

from erasekit.errors import ConfigError
from erasekit.methods.uce import last_word_token_index, uce_edit, uce_solve, uce_statistics, uce_targets


def random_layer(seed: int = 0, out_features: int = 6, in_features: int = 5) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def test_result_satisfies_the_normal_equations() -> None:
    g = torch.Generator().manual_seed(1)
    w = random_layer()
    erase = torch.randn(3, 5, generator=g)  # three concepts at once
    targets = uce_targets(w, torch.randn(3, 5, generator=g))
    preserve = torch.randn(4, 5, generator=g)
    lam, s_e, s_p = 0.7, 1.3, 0.4
    edited = uce_edit(w.double(), erase, targets, preserve, lam=lam, erase_scale=s_e, preserve_scale=s_p)
    # The gradient of the objective, written out term by term, vanishes at the solution.
    w64, e, p = w.double(), erase.double(), preserve.double()
    gradient = s_e * (edited @ e.T - targets.T) @ e + s_p * (edited @ p.T - w64 @ p.T) @ p + lam * (edited - w64)
    assert gradient.abs().max().item() < 1e-10

    # And it is the minimum: a perturbation raises the objective.
    def objective(m: torch.Tensor) -> float:
        return float(
            s_e * ((m @ e.T - targets.T) ** 2).sum()
            + s_p * ((m @ p.T - w64 @ p.T) ** 2).sum()
            + lam * ((m - w64) ** 2).sum()
        )

    assert objective(edited + 1e-3 * torch.randn(6, 5, generator=g, dtype=torch.float64)) > objective(edited)


def test_strong_edit_maps_concepts_to_their_targets() -> None:
    g = torch.Generator().manual_seed(2)
    w = random_layer()
    erase = torch.randn(2, 5, generator=g)
    targets = uce_targets(w, torch.randn(2, 5, generator=g))
    edited = uce_edit(w, erase, targets, lam=1e-6)
    assert edited.dtype == torch.float32
    torch.testing.assert_close(edited @ erase.T, targets.T.float(), atol=1e-4, rtol=1e-4)
    # The unedited model maps them elsewhere, so the test is not vacuous.
    assert (w @ erase.T - targets.T.float()).abs().max() > 0.5


def test_no_concepts_or_huge_lambda_returns_the_weight() -> None:
    g = torch.Generator().manual_seed(3)
    w = random_layer().double()
    torch.testing.assert_close(uce_edit(w, None, None), w, atol=1e-12, rtol=0)
    erase = torch.randn(2, 5, generator=g)
    edited = uce_edit(w, erase, uce_targets(w, torch.randn(2, 5, generator=g)), lam=1e12)
    torch.testing.assert_close(edited, w, atol=1e-9, rtol=0)
    # A moderate lambda does change it.
    assert (uce_edit(w, erase, uce_targets(w, torch.randn(2, 5, generator=g))) - w).abs().max() > 1e-2


def test_preserved_inputs_keep_their_values() -> None:
    g = torch.Generator().manual_seed(4)
    w = random_layer().double()
    erase = torch.randn(1, 5, generator=g)
    preserve = torch.randn(3, 5, generator=g)
    targets = uce_targets(w, torch.randn(1, 5, generator=g))
    weak = uce_edit(w, erase, targets, preserve, preserve_scale=1.0)
    strong = uce_edit(w, erase, targets, preserve, preserve_scale=1e4)
    drift = lambda m: (m @ preserve.double().T - w @ preserve.double().T).norm().item()  # noqa: E731
    assert drift(strong) < 1e-2 * drift(weak)


def test_statistics_add_up_over_chunks() -> None:
    g = torch.Generator().manual_seed(5)
    w = random_layer()
    erase = torch.randn(4, 5, generator=g)
    targets = uce_targets(w, torch.randn(4, 5, generator=g))
    preserve = torch.randn(2, 5, generator=g)
    whole = uce_statistics(w, erase, targets, preserve)
    parts = uce_statistics(w, erase[:1], targets[:1], preserve) + uce_statistics(w, erase[1:], targets[1:], None)
    assert parts.count == whole.count == 6
    torch.testing.assert_close(uce_solve(w, parts), uce_solve(w, whole))


def test_bad_input() -> None:
    w = random_layer()
    with pytest.raises(ConfigError, match="lambda"):
        uce_edit(w, None, None, lam=-1.0)
    with pytest.raises(ConfigError, match="singular"):
        uce_edit(w, torch.ones(1, 5), torch.ones(1, 6), lam=0.0)
    with pytest.raises(ConfigError, match="scales"):
        uce_edit(w, None, None, erase_scale=-1.0)
    with pytest.raises(ValueError, match="targets"):
        uce_edit(w, torch.ones(2, 5), torch.ones(1, 6))
    with pytest.raises(ValueError, match=r"\(n, 5\)"):
        uce_edit(w, torch.ones(2, 4), torch.ones(2, 6))


def test_last_word_token_index() -> None:
    # CLIP "[BOS] a cat [EOS]" -> "cat" at 2; T5 "a cat </s>" -> 1; T5 "" is only "</s>" -> clamped to 0.
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert last_word_token_index(mask).tolist() == [2, 1, 0]
