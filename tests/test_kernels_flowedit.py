"""Known-value tests of the FlowEdit update (erasekit.methods.flowedit) on analytic velocity fields."""

from __future__ import annotations

import pytest
import torch

from erasekit.errors import ConfigError
from erasekit.methods.flowedit import flowedit

SIGMAS = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=torch.float64)
SOURCE = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)


def test_velocity_independent_of_z_gives_source_plus_integral_of_the_difference() -> None:
    directions = {"cat": torch.tensor([1.0, 0.0, 2.0]), "dog": torch.tensor([0.0, 3.0, -1.0])}
    calls: list[str] = []

    def velocity(z: torch.Tensor, sigma: torch.Tensor, conditioning: str) -> torch.Tensor:
        calls.append(conditioning)
        return (1 + sigma**2) * directions[conditioning].to(z.dtype).expand_as(z)

    result = flowedit(velocity, SOURCE, "cat", "dog", SIGMAS, n_avg=3, n_max=3)
    # Only the last three steps: sum of (sigma' - sigma) (1 + sigma^2) (d_dog - d_cat).
    integral = sum((SIGMAS[i + 1] - SIGMAS[i]) * (1 + SIGMAS[i] ** 2) for i in (2, 3, 4))
    torch.testing.assert_close(result, SOURCE + integral * (directions["dog"] - directions["cat"]).double())
    assert len(calls) == 2 * 3 * 3 and calls.count("dog") == 9


def point_mass_velocity(z: torch.Tensor, sigma: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """The exact rectified-flow velocity when the data is the single point ``centre``: ``(z − centre) / σ``."""
    return (z - centre) / sigma


@pytest.mark.parametrize(("n_min", "n_max", "n_avg"), [(0, 5, 1), (0, 3, 2), (2, 4, 1), (5, 5, 1)])
def test_editing_a_point_mass_lands_on_the_target_point(n_min: int, n_max: int, n_avg: int) -> None:
    # Euler on this field is exact, whatever the noise: the edit of the source point is the target point.
    source_centre = SOURCE.clone()
    target_centre = torch.tensor([[-2.0, 0.25, 1.0]], dtype=torch.float64)
    result = flowedit(
        point_mass_velocity,
        SOURCE,
        source_centre,
        target_centre,
        SIGMAS,
        n_avg=n_avg,
        n_min=n_min,
        n_max=n_max,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(result, target_centre)


def test_same_conditioning_or_empty_window_leaves_the_source() -> None:
    generator = torch.Generator().manual_seed(1)
    same = flowedit(point_mass_velocity, SOURCE, SOURCE, SOURCE, SIGMAS, generator=generator)
    torch.testing.assert_close(same, SOURCE)
    untouched = flowedit(point_mass_velocity, SOURCE, SOURCE, 2 * SOURCE, SIGMAS, n_max=0)
    assert torch.equal(untouched, SOURCE)


def test_noise_draws_follow_the_generator() -> None:
    def velocity(z: torch.Tensor, sigma: torch.Tensor, conditioning: float) -> torch.Tensor:
        return conditioning * z**2  # depends on z, so the result depends on the noise

    def run(seed: int) -> torch.Tensor:
        return flowedit(velocity, SOURCE, 1.0, 2.0, SIGMAS, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match="strictly decreasing"):
        flowedit(point_mass_velocity, SOURCE, SOURCE, SOURCE, SIGMAS.flip(0))
    with pytest.raises(ConfigError, match="n_min <= n_max"):
        flowedit(point_mass_velocity, SOURCE, SOURCE, SOURCE, SIGMAS, n_min=3, n_max=2)
    with pytest.raises(ConfigError, match="n_avg"):
        flowedit(point_mass_velocity, SOURCE, SOURCE, SOURCE, SIGMAS, n_avg=0)
