"""PixArt-α / PixArt-Σ: sites, stateless DPM-Solver / DDIM / Euler trajectories, gradients, fold, prune, trainer."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PixArtAlphaPipeline

from erasekit.arch.pixart import PIXART, StatelessSampler
from erasekit.arch.samplers import run_trajectory
from erasekit.errors import MaskMismatchError, ModelLoadError
from erasekit.generate import generate_latents
from erasekit.methods.mask import MaskedModel, MaskSettings
from erasekit.methods.mask.fold import fold_into_pipeline, save_folded_pipeline
from erasekit.tiny.pixart import TinyPixArtSpec, build_tiny_pixart_pipeline, save_tiny_pixart_pipeline
from erasekit.training.gradient import checkpointed_gradient, naive_gradient

PROMPTS = ["a photo of a cat", "a lighthouse at night"]
SAMPLE = dict(steps=3, resolution=32, max_sequence_length=16)
SCHEDULERS = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pixart_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe64():
    p = build_tiny_pixart_pipeline(seed=0, dtype=torch.float64)
    p.set_progress_bar_config(disable=True)
    return p


def with_scheduler(pipe, name: str):
    if name == "dpm":  # the pipeline's own
        return pipe
    other = type(pipe)(**{**pipe.components, "scheduler": SCHEDULERS[name].from_config(pipe.scheduler.config)})
    other.set_progress_bar_config(disable=True)  # shares the models; only the scheduler differs
    return other


def test_sites_cover_self_and_cross_heads_neurons_and_the_shared_norm(pipe):
    sites = PIXART.sites(pipe.transformer)
    keys = [s.key for s in sites]
    assert keys[:3] == [
        "heads/transformer_blocks.0.attn1.to_out.0",
        "heads/transformer_blocks.0.attn2.to_out.0",
        "neurons/transformer_blocks.0.ff.net.2",
    ]
    assert keys[-1] == "norm/adaln_single.linear"
    units = {k: sum(s.num_units for s in sites if s.kind == k) for k in ("heads", "neurons", "norm")}
    assert units == {"heads": 2 * 2 * 2, "neurons": 2 * 64, "norm": 6 * 16}


@pytest.mark.parametrize(
    "scheduler,guidance,variant",
    [
        ("dpm", 4.5, "sigma"),
        ("dpm", 1.0, "sigma"),
        ("ddim", 4.5, "sigma"),
        ("euler", 4.5, "sigma"),
        ("dpm", 4.5, "alpha"),
    ],
)
def test_trajectory_matches_the_diffusers_pipeline(pipe, scheduler, guidance, variant):
    p = with_scheduler(pipe, scheduler)
    if variant == "alpha":
        p = PixArtAlphaPipeline(**p.components)
        p.set_progress_bar_config(disable=True)
    encoded = PIXART.encode_prompts(p, [PROMPTS[0]], max_sequence_length=16)
    trajectory = PIXART.trajectory(p, encoded, [5], steps=4, resolution=32, guidance_scale=guidance)
    ours = trajectory.decode(run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1])
    theirs = p(
        PROMPTS[0],
        num_inference_steps=4,
        height=32,
        width=32,
        guidance_scale=guidance,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
        use_resolution_binning=False,
    ).images
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours - theirs).abs().max()


def _setup(pipe, parameterization: str, steps: int = 4, guidance: float = 4.5):
    denoiser = pipe.transformer
    denoiser.requires_grad_(False)
    masked = MaskedModel(denoiser, PIXART.sites(denoiser), MaskSettings(parameterization), init_lambda=0.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in masked.logits:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    masked.set_mode("train")
    masked.resample_noise(torch.Generator().manual_seed(0))
    encoded = PIXART.encode_prompts(pipe, PROMPTS, max_sequence_length=16)
    trajectory = PIXART.trajectory(pipe, encoded, [1, 2], steps=steps, resolution=32, guidance_scale=guidance)
    target = torch.randn(
        trajectory.noise.shape, generator=torch.Generator().manual_seed(9), dtype=trajectory.noise.dtype
    )
    loss_fn = lambda z: (z - target).pow(2).mean()  # noqa: E731
    return masked, trajectory, loss_fn


def test_dpm_history_travels_in_the_state_and_the_recomputed_step_is_exact(pipe64):
    masked, trajectory, _ = _setup(pipe64, "hard_concrete")
    with masked:
        latents = run_trajectory(trajectory.step, trajectory.noise, 4, keep=True)
        # DPM-Solver++ order 2: the state carries one previous model output between steps
        assert [z.shape[1] for z in latents] == [4, 8, 8, 8, 4]
        for i in range(4):
            with torch.enable_grad():
                again = trajectory.step(latents[i].detach().requires_grad_(True), i)
            assert torch.equal(again.detach(), latents[i + 1])


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_checkpointed_gradient_equals_naive_backprop(pipe64, scheduler):
    # sigmoid: every unit has a nonzero gradient (hard-concrete clamps some gates to exactly 0 or 1)
    masked, trajectory, loss_fn = _setup(with_scheduler(pipe64, scheduler), "sigmoid")
    params = list(masked.logits)
    with masked:
        loss_naive, naive = naive_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
        loss_ours, ours = checkpointed_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
    flat_naive, flat_ours = torch.cat(naive), torch.cat(ours)
    assert flat_naive.abs().sum() > 0
    assert all(g.abs().sum() > 0 for g in naive)  # every site (the shared norm too) gets a gradient
    assert torch.allclose(loss_naive, loss_ours, rtol=1e-12)
    assert (flat_ours - flat_naive).norm() / flat_naive.norm() < 1e-5


def test_unsupported_schedulers_are_refused_by_name(pipe):
    from diffusers import PNDMScheduler

    with pytest.raises(
        ModelLoadError, match="PNDMScheduler.*DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler"
    ):
        StatelessSampler(PNDMScheduler(), 4, torch.device("cpu"), 4)
    sde = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    with pytest.raises(ModelLoadError, match="sde-dpmsolver"):
        StatelessSampler(sde, 4, torch.device("cpu"), 4)


def test_all_ones_mask_and_removed_hooks_leave_the_model_untouched(pipe):
    before, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=4.5, **SAMPLE)
    masked = MaskedModel(pipe.transformer, PIXART.sites(pipe.transformer), init_lambda=3.0)
    masked.set_mode("binary")
    with masked:
        hooked, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=4.5, **SAMPLE)
    after, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=4.5, **SAMPLE)
    assert torch.equal(hooked, before) and torch.equal(after, before)


def random_mask(pipe, seed: int = 0) -> MaskedModel:
    masked = MaskedModel(pipe.transformer, PIXART.sites(pipe.transformer))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site, p in masked.iter_sites():
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
            if site.key == "heads/transformer_blocks.0.attn1.to_out.0":
                p.copy_(torch.tensor([-1.0, 1.0]))  # one self-attention head removed
            if site.key == "heads/transformer_blocks.1.attn2.to_out.0":
                p.fill_(-1.0)  # every cross-attention head dropped: one zeroed head is kept
            if site.key == "neurons/transformer_blocks.1.ff.net.2":
                p.fill_(-1.0)  # a whole MLP dropped: one zeroed neuron is kept
    masked.set_mode("binary")
    return masked.install()


@pytest.mark.parametrize("mode", ["zero", "prune"])
def test_folded_outputs_equal_the_hooked_mask(pipe, mode):
    p = copy.deepcopy(pipe)
    masked = random_mask(p)
    hooked, _ = generate_latents(p, PROMPTS, [1, 2], guidance_scale=4.5, **SAMPLE)
    before = sum(t.numel() for t in p.transformer.parameters())
    fold_into_pipeline(p, masked, mode)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in p.transformer.modules())
    folded, _ = generate_latents(p, PROMPTS, [1, 2], guidance_scale=4.5, **SAMPLE)
    assert torch.allclose(folded, hooked, atol=1e-4), (folded - hooked).abs().max()
    after = sum(t.numel() for t in p.transformer.parameters())
    if mode == "zero":
        assert after == before
    else:
        assert after < before
        layout = p.transformer.config.pruned_layout
        assert layout[0][0] == 1 and layout[1][1] == 1 and layout[1][2] == 1
        # the pruned model still yields consistent (smaller) sites
        assert PIXART.sites(p.transformer)[0].num_units == 1


@pytest.mark.slow
def test_pruned_pipeline_loads_with_stock_diffusers_in_a_subprocess(pipe, tmp_path):
    p = copy.deepcopy(pipe)
    fold_into_pipeline(p, random_mask(p), "prune")
    out = save_folded_pipeline(p, tmp_path / "pruned", "prune", {"model": "tiny-pixart"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["pixart_pruned", "PrunedPixArtTransformer2DModel"]
    call = dict(
        num_inference_steps=3,
        height=32,
        width=32,
        guidance_scale=4.5,
        max_sequence_length=16,
        output_type="pt",
        use_resolution_binning=False,
    )
    expected = p(PROMPTS[0], generator=torch.Generator().manual_seed(4), **call).images
    script = textwrap.dedent(
        f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert "erasekit" not in sys.modules, "erasekit was imported"
        assert type(pipe.transformer).__name__ == "PrunedPixArtTransformer2DModel"
        image = pipe({PROMPTS[0]!r}, generator=torch.Generator().manual_seed(4), **{call!r}).images
        torch.save(image, {str(tmp_path / "image.pt")!r})
        """
    )
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=tmp_path,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    loaded = torch.load(tmp_path / "image.pt", weights_only=True)
    assert torch.allclose(loaded, expected, atol=1e-5)


@pytest.mark.parametrize("hub_id", ["PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArt-alpha/PixArt-XL-2-1024-MS"])
def test_published_configs_on_meta_give_the_documented_unit_counts(hub_id):
    from erasekit.inspect import inspect_model

    info = inspect_model(hub_id)
    layers, heads, width = 28, 16, 16 * 72
    assert info["denoiser_class"] == "PixArtTransformer2DModel" and info["family"] == "pixart"
    assert info["units"]["per_kind"] == {"heads": 2 * layers * heads, "neurons": layers * 4 * width, "norm": 6 * width}
    assert info["units"]["per_kind"] == {"heads": 896, "neurons": 129024, "norm": 6912}
    assert info["units"]["total"] == 136832
    assert info["units"]["per_block_type"]["heads:block/cross"] == 448
    assert 0.6e9 < info["parameters"] < 0.65e9  # PixArt XL-2: about 611 M parameters


def test_tiny_pipeline_saves_atomically_and_reloads(tmp_path):
    from diffusers import DiffusionPipeline

    out = save_tiny_pixart_pipeline(tmp_path / "tiny", TinyPixArtSpec(num_layers=1))
    assert (out / "erasekit_tiny_pixart.json").is_file() and not list(tmp_path.glob(".tiny.*"))
    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded).__name__ == "PixArtSigmaPipeline" and len(loaded.transformer.transformer_blocks) == 1
    with pytest.raises(ValueError, match="not an empty folder"):
        save_tiny_pixart_pipeline(out)


def test_trainer_writes_an_artifact_refused_by_flux_and_vice_versa(pipe, tmp_path):
    from erasekit.config import load_config
    from erasekit.methods.mask import apply_masks
    from erasekit.methods.mask.trainer import MaskTrainer
    from erasekit.tiny import build_tiny_flux_pipeline
    from erasekit.training.run import make_accelerator

    cfg = load_config(
        "configs/pixart-sigma.yaml",
        [
            "model.id=tiny-pixart",
            "model.device=cpu",
            "model.dtype=float32",
            "concept.concept=cat",
            "concept.anchor=dog",
            "concept.preservation_prompts=[a red car]",
            "sampling.steps=2",
            "sampling.resolution=32",
            "sampling.max_sequence_length=16",
            "train.iterations=2",
            "train.checkpoint_every=0",
            "mask.heads.enabled=true",
        ],
    )
    output = tmp_path / "mask"
    trainer = MaskTrainer(copy.deepcopy(pipe), cfg, output, make_accelerator(cfg, tmp_path / "logs"))
    result = trainer.fit()
    assert result.output == output and (output / "masks.safetensors").is_file()
    record = json.loads((output / "erasure.json").read_text())
    assert record["family"] == "pixart" and record["base_model"]["denoiser_class"] == "PixArtTransformer2DModel"
    masked = apply_masks(pipe, [output])  # fits its own family
    masked.remove()
    with pytest.raises(MaskMismatchError, match="PixArtTransformer2DModel"):
        apply_masks(build_tiny_flux_pipeline(seed=0), [output])

    from erasekit.arch import FLUX
    from erasekit.methods.mask import base_model_record, save_mask_artifact

    flux = build_tiny_flux_pipeline(seed=0)
    flux_logits = {s.key: torch.ones(s.num_units) for s in FLUX.sites(flux.transformer)}
    flux_mask = save_mask_artifact(
        tmp_path / "flux-mask", flux_logits, {"base_model": base_model_record(flux.transformer, "tiny-flux")}
    )
    with pytest.raises(MaskMismatchError, match="FluxTransformer2DModel"):
        apply_masks(pipe, [flux_mask])
