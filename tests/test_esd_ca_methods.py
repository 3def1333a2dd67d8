"""ESD and CA wired on real tiny pipelines: their losses are the kernels' formulas on the model's own
predictions, the targets come from the frozen original, the parameter sets are the architecture's, the fit
leaves the pipeline as it was, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from erasekit.arch import architecture_for
from erasekit.arch.guidance import Conditional
from erasekit.config import EraseConfig, load_config
from erasekit.errors import ConfigError
from erasekit.methods import get_method, load_erasure
from erasekit.methods.ca import CaErasure
from erasekit.methods.ca.method import CaTrainer
from erasekit.methods.esd import EsdErasure
from erasekit.methods.esd.method import EsdTrainer
from erasekit.tiny import build_tiny_dit_pipeline, build_tiny_flux_pipeline, build_tiny_sd_pipeline
from erasekit.training.run import make_accelerator
from tiny_settings import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = [
    *tiny_overrides(),
]


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _config(method: str, *extra: str, recipe: str | None = None) -> EraseConfig:
    return load_config(recipe, [f"method={method}", *SHARED, *extra])


def _predict(
    pipe: Any, config: EraseConfig, prompt: str, seed: int, step: int, role: Any, guidance: float, at: Any = None
) -> Any:
    """The latent before ``step`` of the model's trajectory (or ``at``) and ``role``'s prediction there."""
    arch = architecture_for(pipe)
    s = config.sampling
    encoded = arch.encode_prompts(pipe, [prompt], s.max_sequence_length)
    trajectory = arch.trajectory(pipe, encoded, [seed], steps=s.steps, resolution=s.resolution, guidance_scale=guidance)
    with torch.no_grad():
        z = trajectory.noise
        for i in range(step):
            z = trajectory.step(z, i)
        z = z if at is None else at
        return z, trajectory.predict(z, step, role)


def _sample_step(trainer: Any, sample: int) -> int:
    return int(torch.randint(trainer.config.sampling.steps, (1,), generator=trainer.generator(sample)))


@pytest.mark.parametrize("build", [build_tiny_sd_pipeline, build_tiny_flux_pipeline], ids=["unet", "flux"])
def test_esd_loss_is_the_kernel_target_of_the_frozen_model(build: Any, tmp_path: Path) -> None:
    pipe = build(seed=0)
    config = _config("esd", "esd.eta=1.5", "esd.start_guidance=2.0")
    trainer = EsdTrainer(pipe, config, tmp_path / "out", make_accelerator(config, tmp_path))
    sample = 5
    step, prompt = _sample_step(trainer, sample), trainer.prompts.concept[trainer.concept_row(sample)]
    seed = trainer.noise_seed(sample)
    z, concept = _predict(pipe, config, prompt, seed, step, Conditional("cond"), 2.0)
    _, neutral = _predict(pipe, config, prompt, seed, step, Conditional("uncond"), 2.0)
    assert not torch.equal(concept, neutral)
    # untrained, the model's prediction is the frozen concept prediction: loss = (1 + eta)^2 mse(c, n)
    loss, _ = trainer.loss(sample)
    torch.testing.assert_close(loss, (1 + 1.5) ** 2 * F.mse_loss(concept, neutral), rtol=1e-5, atol=1e-7)

    # change the trained weights: the target stays the frozen original's, the prediction moves
    with torch.no_grad():
        for p in trainer.params.values():
            p.add_(0.05 * torch.randn_like(p))
    target = neutral - 1.5 * (concept - neutral)
    # the trained model predicts at the frozen model's latent x_t
    _, moved = _predict(pipe, config, prompt, seed, step, Conditional("cond"), 2.0, at=z)
    loss, _ = trainer.loss(sample)
    assert not torch.allclose(moved, concept)
    torch.testing.assert_close(loss, F.mse_loss(moved, target), rtol=1e-5, atol=1e-7)
    with torch.no_grad(), trainer.original_weights():
        frozen_z, frozen_concept = _predict(pipe, config, prompt, seed, step, Conditional("cond"), 2.0)
    assert torch.equal(frozen_z, z) and torch.equal(frozen_concept, concept)
    # (the changed model's own trajectory would give another x_t: ESD samples it with the frozen one)
    assert not torch.equal(_predict(pipe, config, prompt, seed, step, Conditional("cond"), 2.0)[0], z)


def test_esd_parameter_sets_are_the_architectures_text_conditioning(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    arch = architecture_for(pipe)
    text = set(arch.text_conditioning_modules(pipe.transformer))
    assert {"context_embedder", "time_text_embed.text_embedder.linear_1"} <= text
    config = _config("esd")
    x = EsdTrainer(pipe, config, tmp_path / "x", make_accelerator(config, tmp_path))
    assert {name.rpartition(".")[0] for name in x.params} == text
    config_u = _config("esd", "esd.variant=esd-u")
    u = EsdTrainer(pipe, config_u, tmp_path / "u", make_accelerator(config_u, tmp_path))
    everything = {name for name, _ in pipe.transformer.named_parameters()}
    assert set(u.params) == everything - set(x.params) and set(u.params)

    dit = build_tiny_dit_pipeline(seed=0)
    dit_config = _config(
        "esd",
        "concept.concept=golden retriever",
        "concept.anchor=tabby cat",
        "esd.variant=esd-x",  # the DiT recipe sets esd-u; esd-x is what must be refused there
        recipe="configs/dit-xl-2.yaml",
    )
    with pytest.raises(ConfigError, match=r"dit family has none \(it is class-conditioned\); use esd.variant=esd-u"):
        EsdTrainer(dit, dit_config, tmp_path / "d", make_accelerator(dit_config, tmp_path))


def test_esd_fit_erases_towards_its_target_and_leaves_the_pipeline_as_it_was(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = _config("esd", "train.iterations=12", "esd.lr=3e-3", "concept.templates=['a photo of {concept}']")
    probe = EsdTrainer(pipe, config, tmp_path / "probe", make_accelerator(config, tmp_path))
    first = [float(probe.loss(s)[0]) for s in range(4)]
    probe._restore_pipeline()
    erasure = get_method("esd").fit(pipe, config, tmp_path / "esd", accelerator=make_accelerator(config, tmp_path))
    assert isinstance(erasure, EsdErasure)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    # only the cross-attention keys and values changed, and the loss on the same samples fell
    assert erasure.weights and all(".attn2.to_" in name for name in erasure.weights)
    handle = erasure.apply(pipe)
    after = [float(probe.loss(s)[0]) for s in range(4)]
    handle.remove()
    assert sum(after) < 0.7 * sum(first)


def test_an_interrupted_esd_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    extra = ["train.iterations=4", "train.checkpoint_every=2", "esd.lr=1e-3"]
    config = _config("esd", *extra)
    method = get_method("esd")
    whole = method.fit(pipe, config, tmp_path / "whole", accelerator=make_accelerator(config, tmp_path / "l1"))
    stopped = method.fit(
        pipe, config, tmp_path / "resumed", accelerator=make_accelerator(config, tmp_path / "l2"), stop_after=2
    )
    assert not stopped.weights and (tmp_path / "resumed.incomplete" / "checkpoints" / "step-0000002").is_dir()
    resumed = method.fit(
        pipe, config, tmp_path / "resumed", accelerator=make_accelerator(config, tmp_path / "l3"), resume=True
    )
    assert set(resumed.weights) == set(whole.weights)
    for name, value in whole.weights.items():
        torch.testing.assert_close(resumed.weights[name], value, rtol=0, atol=1e-6)
    assert isinstance(load_erasure(tmp_path / "resumed"), EsdErasure)


def test_ca_loss_is_the_stop_gradient_anchor_match_on_anchor_images(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    config = _config("ca", "ca.anchor_images=2", "concept.templates=['a photo of {concept}']")
    trainer = CaTrainer(pipe, config, tmp_path / "out", make_accelerator(config, tmp_path))
    trainer.prepare()
    assert trainer.prompts.target == ["a photo of dog"] and trainer.images is not None
    # the anchor images are the original model's final latents of the anchor prompt
    arch, s = architecture_for(pipe), config.sampling
    encoded = arch.encode_prompts(pipe, ["a photo of dog"], s.max_sequence_length)
    trajectory = arch.trajectory(
        pipe, encoded, [trainer.noise_seed(1, 3)], steps=s.steps, resolution=s.resolution, guidance_scale=0.0
    )
    with torch.no_grad():
        z = trajectory.noise
        for i in range(s.steps):
            z = trajectory.step(z, i)
    torch.testing.assert_close(trainer.images[1:2], z)

    # the loss: mse(concept prediction, anchor prediction), gradient through the concept branch only
    sample = 3
    generator = trainer.generator(sample)
    image = int(torch.randint(2, (1,), generator=generator))
    step = int(torch.randint(s.steps, (1,), generator=generator))
    x0 = trainer.images[image : image + 1]
    noise = torch.randn(x0.shape, generator=generator)
    zt = trajectory.add_noise(x0, noise, step)
    with torch.no_grad():
        anchor = trajectory.predict(zt, step, Conditional("cond"))
        concept_encoded = arch.encode_prompts(pipe, ["a photo of cat"], s.max_sequence_length)
        other = arch.trajectory(pipe, concept_encoded, [0], steps=s.steps, resolution=s.resolution, guidance_scale=0.0)
        concept = other.predict(zt, step, Conditional("cond"))
    for p in trainer.params.values():
        p.requires_grad_(True)  # as fit() does
    loss, _ = trainer.loss(sample)
    torch.testing.assert_close(loss, F.mse_loss(concept, anchor), rtol=1e-5, atol=1e-8)
    loss.backward()
    grads = [p.grad for p in trainer.params.values()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)  # type: ignore[union-attr]
    trainer._restore_pipeline()


def test_ca_fit_pulls_the_concept_towards_the_anchor(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    config = _config(
        "ca", "train.iterations=10", "ca.lr=3e-3", "ca.anchor_images=2", "concept.templates=['a photo of {concept}']"
    )
    probe = CaTrainer(pipe, config, tmp_path / "probe", make_accelerator(config, tmp_path))
    probe.prepare()
    first = [float(probe.loss(s)[0]) for s in range(4)]
    probe._restore_pipeline()
    erasure = get_method("ca").fit(pipe, config, tmp_path / "ca", accelerator=make_accelerator(config, tmp_path))
    assert isinstance(erasure, CaErasure) and all(".attn2.to_" in name for name in erasure.weights)
    handle = erasure.apply(pipe)
    after = [float(probe.loss(s)[0]) for s in range(4)]
    handle.remove()
    assert sum(after) < 0.7 * sum(first)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=esd", "esd.variant=xattn"], "esd.variant"),
        (["method=esd", "esd.lr=0"], "esd.lr must be positive"),
        (["method=esd", "esd.eta=-1"], "esd.eta must not be negative"),
        (["method=ca", "ca.parameters=embedding"], "not one of cross-attn, attn, full-weight"),
        (["method=ca", "ca.anchor_images=0"], "ca.anchor_images must be at least 1"),
        (["method=ca", "ca.prior_weight=-0.1"], "ca.prior_weight"),
    ],
)
def test_bad_settings_are_refused_before_loading_weights(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config = load_config(None, ["concept.concept=cat", *overrides])
        get_method(config.method).validate(config)


def test_a_method_section_sets_the_runs_length() -> None:
    from erasekit.methods.finetune import with_run_length

    config = load_config(None, ["method=esd", "train.iterations=300", "train.batch_size=4", "esd.iterations=7"])
    resolved = with_run_length(config, config.esd)
    assert (resolved.train.iterations, resolved.train.batch_size) == (7, 4)
    assert config.train.iterations == 300  # the caller's config is not changed
    assert with_run_length(config, config.ca) is config  # nothing set: the shared values
