"""The inference-time methods ``sld`` and ``flowedit``: the sampling override they install, that the wired
methods compute what their kernels say on a tiny model, and their one-line refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from erasekit.arch import Conditional, architecture_for, run_trajectory
from erasekit.arch.override import SamplingOverride, install_sampling_override, sampling_override
from erasekit.cli import main
from erasekit.config import load_config
from erasekit.errors import ConfigError, UnsupportedError
from erasekit.generate import generate_latents
from erasekit.methods import RECORD_NAME, apply_erasures, get_method, load_erasure
from erasekit.methods.flowedit import flowedit
from erasekit.methods.flowedit.method import FlowEditErasure, edit_seed
from erasekit.methods.sld import SLDErasure, SLDGuidance, sld_preset, sld_step
from erasekit.methods.sld.method import resolve_settings
from erasekit.tiny import build_tiny_flux_pipeline, build_tiny_sd_pipeline
from erasekit.tiny.flux import TinyFluxSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = dict(resolution=32, max_sequence_length=16)
BASE = [
    "model.id=tiny",
    "model.device=cpu",
    "model.dtype=float32",
    "concept.concept=cat",
    "concept.anchor=dog",
    "sampling.resolution=32",
    "sampling.max_sequence_length=16",
    "train.trackers=[]",
]


def _fit(method: str, pipe: Any, folder: Path, *overrides: str) -> Any:
    config = load_config(None, [f"method={method}", *BASE, *overrides])
    return get_method(method).fit(pipe, config, folder, model_id="tiny")


def _latents(pipe: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> torch.Tensor:
    return generate_latents(pipe, prompts, seeds, steps=steps, guidance_scale=guidance, **SAMPLING)[0]


# --------------------------------------------------------------------------- the override mechanism
class _Constant(SamplingOverride):
    name = "constant override"

    def sample(self, pipe: Any, prompts: list[str], seeds: list[int], **kwargs: Any) -> Any:
        return torch.zeros(len(prompts), 1), None


def test_one_override_at_a_time_and_remove_restores_the_default_sampler() -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    original = _latents(pipe, ["a photo of a cat"], [1], 2, 0.0)
    handle = install_sampling_override(pipe, _Constant())
    assert sampling_override(pipe) is handle.override
    assert torch.equal(_latents(pipe, ["a photo of a cat", "x"], [1, 2], 2, 0.0), torch.zeros(2, 1))
    with pytest.raises(UnsupportedError) as info:
        install_sampling_override(pipe, _Constant())
    assert str(info.value) == (
        "a constant override already changes how this pipeline samples; inference-time erasures do not "
        "combine, so constant override cannot be applied with it"
    )
    handle.remove()
    handle.remove()  # idempotent
    assert sampling_override(pipe) is None
    assert torch.equal(_latents(pipe, ["a photo of a cat"], [1], 2, 0.0), original)
    # another pipeline never sees it
    other = build_tiny_flux_pipeline(seed=0)
    install_sampling_override(pipe, _Constant())
    assert sampling_override(other) is None


def test_two_inference_time_erasures_are_refused_and_leave_nothing_installed(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    _fit("sld", pipe, tmp_path / "sld", "sampling.guidance_scale=4.0")
    _fit("flowedit", pipe, tmp_path / "flowedit", "sampling.steps=2")
    with pytest.raises(UnsupportedError, match="inference-time erasures do not combine"):
        apply_erasures(pipe, [tmp_path / "sld", tmp_path / "flowedit"])
    assert sampling_override(pipe) is None


# --------------------------------------------------------------------------- sld
def test_sld_settings_are_the_preset_with_the_set_fields_over_it() -> None:
    config = load_config(None, ["sld.preset=strong", "sld.sld_threshold=0.5", "sld.sld_warmup_steps=2"])
    settings = resolve_settings(config.sld)
    strong = sld_preset("strong")
    assert settings.sld_threshold == 0.5 and settings.sld_warmup_steps == 2
    assert (settings.sld_guidance_scale, settings.sld_momentum_scale, settings.sld_mom_beta) == (
        strong.sld_guidance_scale,
        strong.sld_momentum_scale,
        strong.sld_mom_beta,
    )
    with pytest.raises(ConfigError, match=r"^sld.preset: 'huge' is not one of weak, medium, strong, max$"):
        load_config(None, ["sld.preset=huge"])
    with pytest.raises(ConfigError, match="sld_mom_beta must be in"):
        resolve_settings(load_config(None, ["sld.sld_mom_beta=2.0"]).sld)


def test_the_sld_erasure_samples_with_the_kernel_on_the_three_predictions(tmp_path: Path) -> None:
    """Two steps of the tiny FLUX model: each step's prediction is ``sld_step`` of the unconditional, prompt
    and safety-concept predictions, the second step reading the momentum the first left."""
    pipe = build_tiny_flux_pipeline(seed=0)
    erasure = _fit(
        "sld", pipe, tmp_path / "e", "sampling.guidance_scale=4.0", "sld.preset=strong", "sld.sld_warmup_steps=1"
    )
    assert isinstance(erasure, SLDErasure) and erasure.safety_concept == "cat"
    settings = erasure.sld_settings
    assert settings == resolve_settings({"preset": "strong", "sld_warmup_steps": 1})
    assert erasure.cost.extra_denoiser_calls_per_step == 1.0 and erasure.cost.parameters_changed == 0

    arch = architecture_for(pipe)
    prompts, seeds = ["a photo of a cat", "a red car on a road"], [5, 6]
    encoded = arch.encode_prompts(pipe, prompts, 16)
    safety = arch.encode_prompts(pipe, ["cat"], 16)
    plain = arch.trajectory(pipe, encoded, seeds, steps=2, resolution=32, guidance_scale=4.0)

    def by_hand(z: torch.Tensor, i: int, momentum: Any) -> tuple[torch.Tensor, Any]:
        u = plain.predict(z, i, Conditional("uncond"))
        c = plain.predict(z, i, Conditional("cond"))
        s = plain.predict(z, i, Conditional("safety", {"safety": safety}))
        return sld_step(u, c, s, i, 4.0, settings, momentum)

    guided = arch.trajectory(
        pipe, encoded, seeds, steps=2, resolution=32, guidance_scale=4.0, guidance=SLDGuidance(settings, 4.0, safety)
    )
    z0 = guided.noise
    expected0, momentum = by_hand(z0, 0, None)
    torch.testing.assert_close(guided.predict(z0, 0), expected0, rtol=1e-5, atol=1e-6)
    z1 = guided.step(z0, 0)
    expected1, _ = by_hand(z1, 1, momentum)
    torch.testing.assert_close(guided.predict(z1, 1), expected1, rtol=1e-5, atol=1e-6)
    # the warm-up kept step 0 plain CFG; step 1 steers away from the concept
    torch.testing.assert_close(expected0, plain.predict(z0, 0), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected1, plain.predict(z1, 1), atol=1e-4)

    # the applied erasure generates exactly that trajectory
    handle = erasure.apply(pipe)
    erased = _latents(pipe, prompts, seeds, 2, 4.0)
    handle.remove()
    assert torch.equal(erased, run_trajectory(guided.step, guided.noise, 2)[-1])


def test_sld_at_safety_scale_zero_is_plain_classifier_free_guidance(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    erasure = _fit("sld", pipe, tmp_path / "e", "sampling.guidance_scale=4.0", "sld.sld_guidance_scale=0.0")
    prompts, seeds = ["a photo of a cat", "a red car on a road"], [5, 6]
    plain = _latents(pipe, prompts, seeds, 3, 4.0)
    handle = erasure.apply(pipe)
    erased = _latents(pipe, prompts, seeds, 3, 4.0)
    handle.remove()
    # the same arithmetic; only the batch the denoiser runs (three roles, not two) differs
    torch.testing.assert_close(erased, plain, rtol=1e-5, atol=1e-5)


def test_sld_refuses_a_model_without_cfg_and_a_guidance_scale_it_cannot_change(tmp_path: Path) -> None:
    distilled = build_tiny_flux_pipeline(TinyFluxSpec(guidance_embeds=True), seed=0)
    with pytest.raises(UnsupportedError) as info:
        _fit("sld", distilled, tmp_path / "d", "sampling.guidance_scale=4.0")
    assert str(info.value) == (
        "sld needs classifier-free guidance, and this flux model has none (it is guidance-distilled); "
        "use a model with an unconditional branch"
    )
    assert not (tmp_path / "d").exists()
    with pytest.raises(ConfigError, match=r"needs sampling.guidance_scale above 1, got 1$"):
        get_method("sld").validate(load_config(None, [*BASE, "sampling.guidance_scale=1.0"]))
    pipe = build_tiny_flux_pipeline(seed=0)
    handle = _fit("sld", pipe, tmp_path / "e", "sampling.guidance_scale=4.0").apply(pipe)
    with pytest.raises(ConfigError, match=r"needs a guidance scale above 1; got 0 \(pass --guidance\)$"):
        _latents(pipe, ["a cat"], [0], 2, 0.0)
    handle.remove()


# --------------------------------------------------------------------------- flowedit
def test_flowedit_leaves_prompts_without_the_concept_exactly_as_the_original_model_draws_them(
    tmp_path: Path,
) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    erasure = _fit("flowedit", pipe, tmp_path / "e", "sampling.steps=3", "sampling.guidance_scale=3.0")
    others = ["a red car on a road", "a bowl of fruit"]
    original = _latents(pipe, others, [1, 2], 3, 3.0)
    mixed_original = _latents(pipe, ["A photo of a CAT", *others], [0, 1, 2], 3, 3.0)
    handle = erasure.apply(pipe)
    assert torch.equal(_latents(pipe, others, [1, 2], 3, 3.0), original)
    mixed = _latents(pipe, ["A photo of a CAT", *others], [0, 1, 2], 3, 3.0)
    alone = _latents(pipe, ["A photo of a CAT"], [0], 3, 3.0)
    handle.remove()
    # the row naming the concept (any case) is edited, the others are the original model's, bit for bit
    assert not torch.allclose(mixed[0], mixed_original[0], atol=1e-3)
    assert torch.equal(mixed[1:], mixed_original[1:])
    # an image's edit draws its noise from its own seed: it does not depend on its batch companions
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-5, atol=1e-5)


def test_flowedit_edits_prompts_that_name_the_concept_as_a_word() -> None:
    from erasekit.methods.flowedit.method import FlowEditOverride

    edit = FlowEditOverride(["red", "crimson"], "blue", {})
    assert edit.target_prompt("a Red circle, crimson style") == "a blue circle, blue style"
    assert edit.target_prompt("a green circle in checkered style") is None  # "red" inside a word is not the concept
    assert edit.target_prompt("red") == "blue"


def test_flowedit_one_edit_step_by_hand(tmp_path: Path) -> None:
    """Two steps, the edit over the last one (strength 0.5): ``x_src + (0 - σ1) (v_tar - v_src)`` at the
    noised source ``(1 - σ1) x_src + σ1 ε``, with ε the first draw of the image's edit generator."""
    pipe = build_tiny_flux_pipeline(seed=0)
    erasure = _fit("flowedit", pipe, tmp_path / "e", "sampling.steps=2", "flowedit.strength=0.5")
    assert isinstance(erasure, FlowEditErasure)
    assert erasure.cost.extra_denoiser_calls_per_step == 1.0  # 2 velocities on 1 of 2 steps
    prompt, seed = "a photo of a cat", 7
    arch = architecture_for(pipe)
    source, trajectory = generate_latents(pipe, [prompt], [seed], steps=2, guidance_scale=0.0, **SAMPLING)
    src = arch.trajectory(
        pipe, arch.encode_prompts(pipe, [prompt], 16), [seed], steps=2, resolution=32, guidance_scale=0
    )
    tar = arch.trajectory(
        pipe, arch.encode_prompts(pipe, ["a photo of a dog"], 16), [seed], steps=2, resolution=32, guidance_scale=0
    )
    sigma = trajectory.schedule.sigmas[1]
    eps = torch.randn(source.shape, generator=torch.Generator().manual_seed(edit_seed(seed)))
    z = (1 - sigma) * source + sigma * eps
    expected = source + (0.0 - sigma) * (tar.velocity_at(z, sigma) - src.velocity_at(z, sigma))
    handle = erasure.apply(pipe)
    edited = _latents(pipe, [prompt], [seed], 2, 0.0)
    handle.remove()
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-6)


def test_flowedit_refuses_other_families_and_windows_the_steps_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match=r"^method 'flowedit' does not support the unet family; it supports: "):
        get_method("flowedit").check_family(architecture_for(build_tiny_sd_pipeline(seed=0)))
    method = get_method("flowedit")
    with pytest.raises(ConfigError, match=r"^flowedit.strength must be in \(0, 1\], got 0$"):
        method.validate(load_config(None, [*BASE, "flowedit.strength=0"]))
    with pytest.raises(ConfigError, match="needs 0 <= flowedit.n_min <= 3, got n_min=5"):
        method.validate(load_config(None, [*BASE, "sampling.steps=4", "flowedit.strength=0.75", "flowedit.n_min=5"]))


def test_the_flowedit_kernel_takes_one_generator_per_row() -> None:
    """Per-row generators: a row's result is the same alone as in a batch (a row-wise velocity field)."""

    def velocity(z: torch.Tensor, sigma: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + c * sigma

    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([1.0, 0.6, 0.3, 0.0])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = flowedit(velocity, x, 0.0, 1.0, sigmas, n_avg=2, n_min=1, generator=gens([1, 2, 3]))
    alone = flowedit(velocity, x[1:2], 0.0, 1.0, sigmas, n_avg=2, n_min=1, generator=gens([2]))
    torch.testing.assert_close(together[1:2], alone)
    with pytest.raises(ConfigError, match="got 2 generators for 3 rows"):
        flowedit(velocity, x, 0.0, 1.0, sigmas, generator=gens([1, 2]))


# --------------------------------------------------------------------------- the commands
def test_the_cli_erases_generates_and_refuses_to_fold_an_inference_time_erasure(
    tiny_flux_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    erasure = tmp_path / "sld"
    argv = ["erase", "--method", "sld", "--model", tiny_flux_path, "--concept", "cat", "--anchor", "dog"]
    sets = ["--set", "sampling.guidance_scale=4.0", "--set", "model.device=cpu", "--set", "train.trackers=[]"]
    assert main([*argv, *sets, "--steps", "2", "--resolution", "32", "--output", str(erasure)]) == 0
    assert "sld written to" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sld"]  # no staging folder left behind
    record = json.loads((erasure / RECORD_NAME).read_text())
    assert record["payload"] == {} and record["safety_concept"] == "cat" and record["generation"]["guidance_scale"] == 4
    assert load_erasure(erasure).cost.artifact_bytes == 0
    images = tmp_path / "images"
    assert (
        main(
            [
                "generate",
                "--model",
                tiny_flux_path,
                "--erasure",
                str(erasure),
                "--prompt",
                "a cat",
                "--output",
                str(images),
            ]
        )
        == 0
    )
    assert len(list(images.glob("*.png"))) == 1
    capsys.readouterr()
    folded = tmp_path / "folded"
    assert main(["fold", "--model", tiny_flux_path, "--erasure", str(erasure), "--output", str(folded)]) == 2
    err = capsys.readouterr().err
    assert "a sld erasure changes sampling, not weights, and cannot be folded" in err and err.count("\n") == 1
    assert not folded.exists()
