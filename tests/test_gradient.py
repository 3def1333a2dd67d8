"""The checkpointed trajectory gradient equals plain backpropagation; the sampler matches diffusers."""

from __future__ import annotations

import pytest
import torch

from erasekit.arch import FLUX
from erasekit.arch.samplers import run_trajectory
from erasekit.methods.mask import MaskedModel, MaskSettings
from erasekit.tiny import build_tiny_flux_pipeline
from erasekit.training import gradient as gradient_module
from erasekit.training.gradient import checkpointed_gradient, naive_gradient, two_call_gradient


@pytest.fixture(scope="module")
def pipe64():
    pipe = build_tiny_flux_pipeline(seed=0, dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _setup(pipe, parameterization: str, steps: int = 4):
    denoiser = pipe.transformer
    denoiser.requires_grad_(False)
    masked = MaskedModel(denoiser, FLUX.sites(denoiser), MaskSettings(parameterization), init_lambda=0.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in masked.logits:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    masked.set_mode("train")
    masked.resample_noise(torch.Generator().manual_seed(0))
    encoded = FLUX.encode_prompts(pipe, ["a photo of a cat", "a red car"], max_sequence_length=16)
    trajectory = FLUX.trajectory(pipe, encoded, [1, 2], steps=steps, resolution=32, guidance_scale=0.0)
    target = torch.randn(
        trajectory.noise.shape, generator=torch.Generator().manual_seed(9), dtype=trajectory.noise.dtype
    )
    loss_fn = lambda z: (z - target).pow(2).mean()  # noqa: E731
    return masked, trajectory, loss_fn


@pytest.mark.parametrize("parameterization", ["sigmoid", "hard_concrete"])
def test_checkpointed_gradient_equals_naive_backprop(pipe64, parameterization):
    masked, trajectory, loss_fn = _setup(pipe64, parameterization)
    params = list(masked.logits)
    with masked:
        loss_naive, naive = naive_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
        loss_ours, ours = checkpointed_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
        _, two_calls = two_call_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
    flat_naive, flat_ours = torch.cat(naive), torch.cat(ours)
    assert flat_naive.abs().sum() > 0
    assert torch.allclose(loss_naive, loss_ours, rtol=1e-12)
    rel = (flat_ours - flat_naive).norm() / flat_naive.norm()
    assert rel < 1e-5, rel
    assert (torch.cat(two_calls) - flat_naive).norm() / flat_naive.norm() < 1e-5


def test_step_losses_give_the_same_gradients_both_ways(pipe64):
    """A loss on every intermediate latent (the trainer's intermediate preservation): the
    checkpointed walk, which adds each one to its step's autograd call, equals plain backpropagation,
    and the step losses change the gradient."""
    masked, trajectory, loss_fn = _setup(pipe64, "sigmoid")
    anchors = torch.randn(
        (3, *trajectory.noise.shape), generator=torch.Generator().manual_seed(5), dtype=trajectory.noise.dtype
    )
    seen = []

    def step_loss(i, z):
        seen.append(i)
        return (i + 1) * (z - anchors[i]).pow(2).mean()

    params = list(masked.logits)
    with masked:
        loss_plain, plain = naive_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
        loss_naive, naive = naive_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params, step_loss=step_loss)
        assert seen == [0, 1, 2]
        loss_ours, ours = checkpointed_gradient(
            trajectory.step, trajectory.noise, 4, loss_fn, params, step_loss=step_loss
        )
        assert seen == [0, 1, 2, 2, 1, 0]
    flat_naive, flat_ours, flat_plain = torch.cat(naive), torch.cat(ours), torch.cat(plain)
    assert loss_naive > loss_plain
    assert torch.allclose(loss_naive, loss_ours, rtol=1e-12)
    assert (flat_ours - flat_naive).norm() / flat_naive.norm() < 1e-5
    assert (flat_plain - flat_naive).norm() / flat_naive.norm() > 1e-3


def test_one_autograd_call_per_recomputed_step(pipe64, monkeypatch):
    masked, trajectory, loss_fn = _setup(pipe64, "sigmoid")
    calls = []
    step_calls = []

    def counting_step(z, i):
        step_calls.append(i)
        return trajectory.step(z, i)

    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(1)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(gradient_module.torch.autograd, "grad", counting_grad)
    with masked:
        checkpointed_gradient(counting_step, trajectory.noise, 4, loss_fn, list(masked.logits))
    assert len(calls) == 4  # one per step; the loss joins the last step's call
    # steps 0-2 without a graph, then 3, 2, 1, 0 with one: the last step is computed only once
    assert step_calls == [0, 1, 2, 3, 2, 1, 0]


def test_recomputed_step_reproduces_the_forward_step(pipe64):
    masked, trajectory, _ = _setup(pipe64, "hard_concrete")
    with masked:
        latents = run_trajectory(trajectory.step, trajectory.noise, 4, keep=True)
        for i in range(4):
            with torch.enable_grad():
                again = trajectory.step(latents[i].detach().requires_grad_(True), i)
            assert torch.equal(again.detach(), latents[i + 1])


def test_trajectory_matches_the_diffusers_pipeline():
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    encoded = FLUX.encode_prompts(pipe, ["a photo of a cat"], max_sequence_length=16)
    trajectory = FLUX.trajectory(pipe, encoded, [5], steps=3, resolution=32, guidance_scale=0.0)
    ours = trajectory.decode(run_trajectory(trajectory.step, trajectory.noise, 3)[-1])
    theirs = pipe(
        "a photo of a cat",
        num_inference_steps=3,
        height=32,
        width=32,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_true_cfg_trajectory_matches_the_diffusers_pipeline():
    """A FLUX model without guidance embedding gets FluxPipeline's true CFG (empty negative prompt)."""
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    assert not pipe.transformer.config.guidance_embeds
    encoded = FLUX.encode_prompts(pipe, ["a photo of a cat"], max_sequence_length=16)
    trajectory = FLUX.trajectory(pipe, encoded, [5], steps=3, resolution=32, guidance_scale=4.0)
    ours = trajectory.decode(run_trajectory(trajectory.step, trajectory.noise, 3)[-1])
    call = dict(num_inference_steps=3, height=32, width=32, max_sequence_length=16, output_type="pt")
    theirs = pipe(
        "a photo of a cat", negative_prompt="", true_cfg_scale=4.0, generator=torch.Generator().manual_seed(5), **call
    ).images
    unguided = pipe("a photo of a cat", generator=torch.Generator().manual_seed(5), **call).images
    assert torch.allclose(ours, theirs.float(), atol=1e-5)
    assert not torch.allclose(ours, unguided.float(), atol=1e-3)
