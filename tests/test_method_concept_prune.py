"""The wired ``concept-prune`` method: planted activation patterns through the real fit, its artefact,
folding and bad settings (the kernels' known values: tests/test_kernels_concept_prune.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from erasekit.arch import denoiser_of
from erasekit.cli import main
from erasekit.config import EraseConfig, load_config
from erasekit.errors import ConfigError
from erasekit.methods import RECORD_NAME, fold_erasures, get_method, load_erasure
from erasekit.methods.concept_prune import ConceptPruneErasure, kernels
from erasekit.methods.concept_prune import method as cp
from erasekit.methods.mask import MaskErasure
from erasekit.tiny import build_tiny_flux_pipeline, build_tiny_sd_pipeline
from tiny_settings import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = [
    "method=concept-prune",
    *tiny_overrides(),
]


def _config(*extra: str) -> EraseConfig:
    return load_config(None, [*SHARED, *extra])


class Planter:
    """Adds ``amount`` to chosen input channels of a layer while the prompts of one kind are scored.

    The pre-hook is registered before the fit's recorders, so they see the planted inputs. Which prompts
    are being scored is read off the fit's call of :func:`record_input_norms` (the concept prompts
    mention "cat").
    """

    def __init__(self, layer: torch.nn.Linear, plants: dict[int, tuple[float, float]]) -> None:
        self.plants = plants  # channel -> (added on concept prompts, added on base prompts)
        self.scoring: str | None = None
        self.handle = layer.register_forward_pre_hook(self.hook)

    def hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self.scoring is None:
            return None
        x = args[0].clone()
        for channel, (on_concept, on_base) in self.plants.items():
            x[..., channel] += on_concept if self.scoring == "concept" else on_base
        return (x, *args[1:])

    def wrap(self, record: Any) -> Any:
        def recording(pipe: Any, prompts: list[str], *args: Any, **kwargs: Any) -> Any:
            self.scoring = "concept" if all("cat" in p for p in prompts) else "base"
            try:
                return record(pipe, prompts, *args, **kwargs)
            finally:
                self.scoring = None

        return recording


def test_the_fit_prunes_the_neurons_planted_on_the_concept_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A FLUX single block's MLP columns (a site starting past the attention channels of ``proj_out``):
    a neuron driven hard on the concept prompts is pruned, one driven harder on the base prompts is not."""
    pipe = build_tiny_flux_pipeline(seed=0)
    arch, denoiser = denoiser_of(pipe)
    site = next(s for s in cp.neuron_sites(arch, denoiser) if s.start > 0)
    assert site.module.startswith("single_transformer_blocks.")
    layer = denoiser.get_submodule(site.module)
    concept_neuron, base_neuron = 3, 5
    planter = Planter(layer, {site.start + concept_neuron: (50.0, 0.0), site.start + base_neuron: (40.0, 80.0)})
    monkeypatch.setattr(cp, "record_input_norms", planter.wrap(cp.record_input_norms))
    share = 2 / site.num_units  # two neurons per step and layer
    config = _config(f"concept_prune.top_share={share}", "concept_prune.timesteps=2")
    erasure = get_method("concept-prune").fit(pipe, config, tmp_path / "e", model_id="tiny")
    planter.handle.remove()

    pruned = (erasure.logits[site.key] <= 0).nonzero().flatten().tolist()
    assert concept_neuron in pruned and base_neuron not in pruned
    assert 1 <= len(pruned) <= 4  # at most two per scored step
    assert set(erasure.logits[site.key].unique().tolist()) <= {cp.KEPT_LOGIT, cp.PRUNED_LOGIT}

    # every neuron site of the model is in the mask, and nothing else
    sites = cp.neuron_sites(arch, denoiser)
    assert sorted(erasure.logits) == sorted(s.key for s in sites)
    assert all(erasure.logits[s.key].shape == (s.num_units,) for s in sites)
    masked = sum(int((v <= 0).sum()) for v in erasure.logits.values())
    record = json.loads((tmp_path / "e" / RECORD_NAME).read_text())
    assert record["method"] == "concept-prune" and record["unit_kinds"] == ["neurons"]
    assert record["masked"] == {"neurons": {"masked": masked, "total": sum(s.num_units for s in sites)}}
    assert record["scoring"]["scored_steps"] == 2 and record["scoring"]["base"] == "anchor"
    assert erasure.cost.units_changed == masked and erasure.cost.parameters_changed == 0


def test_the_fit_scores_exactly_what_the_kernels_give_on_the_recorded_norms(tmp_path: Path) -> None:
    """The mask equals skilled_neurons of the WANDA neuron scores of the inputs recorded on the trajectory
    (concept prompts vs their anchor prompts from the same noise), layer by layer."""
    pipe = build_tiny_sd_pipeline(seed=0)
    arch, denoiser = denoiser_of(pipe)
    config = _config("sampling.guidance_scale=3.0", "concept_prune.top_share=0.05", "concept_prune.timesteps=2")
    erasure = get_method("concept-prune").fit(pipe, config, tmp_path / "e")
    sites = cp.neuron_sites(arch, denoiser)
    layers = {s.module: denoiser.get_submodule(s.module) for s in sites}
    from erasekit.data import build_concept_prompts

    prompts = build_concept_prompts(config.concept)
    seeds = list(range(len(prompts.concept)))
    concept = cp.record_input_norms(pipe, prompts.concept, seeds, layers, config)
    base = cp.record_input_norms(pipe, prompts.target, seeds, layers, config)
    assert len(concept) == 2
    for site in sites:
        weight = layers[site.module].weight
        keep = kernels.skilled_neurons(
            [kernels.neuron_scores(weight, step[site.module]) for step in concept],
            [kernels.neuron_scores(weight, step[site.module]) for step in base],
            0.05,
        )
        assert torch.equal(erasure.logits[site.key] > 0, keep), site.key
    assert any(not bool((v > 0).all()) for v in erasure.logits.values())


def test_the_input_norms_are_those_of_the_recorded_trajectory_inputs() -> None:
    """record_input_norms per step = the norms of what capture_layer_inputs captures at that step."""
    from erasekit.arch import capture_layer_inputs

    pipe = build_tiny_sd_pipeline(seed=0)
    arch, denoiser = denoiser_of(pipe)
    config = _config("sampling.guidance_scale=3.0", "concept_prune.timesteps=2", "concept_prune.batch_size=1")
    site = cp.neuron_sites(arch, denoiser)[0]
    layers = {site.module: denoiser.get_submodule(site.module)}
    prompts, seeds = ["a photo of a cat", "a cat"], [7, 8]
    norms = cp.record_input_norms(pipe, prompts, seeds, layers, config)  # two batches of one
    encoded = arch.encode_prompts(pipe, prompts, 16)
    captured = capture_layer_inputs(
        pipe, encoded, [site.module], resolution=32, steps=3, step_indices=[0, 1], seeds=seeds, guidance_scale=3.0
    )[site.module]
    for i in range(2):
        x = captured[i].reshape(-1, captured.shape[-1]).double()
        torch.testing.assert_close(norms[i][site.module], x.pow(2).sum(0).sqrt(), rtol=1e-5, atol=1e-6)


def test_a_concept_prune_erasure_is_a_mask_that_prune_folds(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    config = _config("concept_prune.top_share=0.1", "concept_prune.base=preservation")
    get_method("concept-prune").fit(pipe, config, tmp_path / "e")
    loaded = load_erasure(tmp_path / "e")
    assert type(loaded) is ConceptPruneErasure and isinstance(loaded, MaskErasure)
    assert loaded.record["scoring"]["base"] == "preservation"
    assert loaded.report()["masked_units"]["neurons"]["masked"] == loaded.cost.units_changed > 0
    folded = fold_erasures(build_tiny_flux_pipeline(seed=0), [tmp_path / "e"], "prune")
    _, small = denoiser_of(folded)
    _, full = denoiser_of(pipe)
    removed = sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in small.parameters())
    assert removed > 0
    # a mask artefact named as another method is refused by the mask's reader
    with pytest.raises(Exception, match="holds a 'concept-prune' erasure, not a mask one"):
        from erasekit.methods.mask.artifact import load_mask_artifact

        load_mask_artifact(tmp_path / "e")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("concept_prune.top_share=0", r"concept_prune.top_share must be in \(0, 1\], got 0.0"),
        ("concept_prune.top_share=1.5", r"concept_prune.top_share must be in \(0, 1\], got 1.5"),
        ("concept_prune.timesteps=0", "concept_prune.timesteps must be at least 1, got 0"),
        ("concept_prune.batch_size=0", "concept_prune.batch_size must be at least 1, got 0"),
    ],
)
def test_bad_settings_are_refused_before_loading(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_method("concept-prune").validate(_config(override))


def test_an_unknown_base_is_refused_by_the_schema() -> None:
    with pytest.raises(ConfigError, match="concept_prune.base: 'others' is not one of anchor, preservation"):
        _config("concept_prune.base=others")


def test_the_cli_erases_folds_and_refuses_in_one_line(
    tiny_flux_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", tiny_flux_path, "--set", "model.device=cpu", "--set", "sampling.resolution=32"]
    out = tmp_path / "e"

    def erase(output: Path, *sets: str) -> int:
        settings = [a for s in sets for a in ("--set", s)]
        return main(
            ["erase", "--method", "concept-prune", "--concept", "cat", "--output", str(output), *common, *settings]
        )

    assert erase(out, "sampling.steps=2", "concept_prune.top_share=0.1") == 0
    assert json.loads((out / RECORD_NAME).read_text())["method"] == "concept-prune"
    folded = tmp_path / "folded"
    assert main(["fold", "--model", tiny_flux_path, "--erasure", str(out), "--output", str(folded)]) == 0
    assert (folded / "model_index.json").is_file()
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert erase(bad, "concept_prune.top_share=2") == 2
    err = capsys.readouterr().err
    assert err.startswith("erasekit erase: error: concept_prune.top_share must be in") and err.count("\n") == 1
    assert not bad.exists() and not Path(f"{bad}.incomplete").exists()
