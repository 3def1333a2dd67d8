"""Stable Diffusion UNets (SD 1.x/2.x, SDXL): sampler exactness, gradients, masks, fold/prune, configs, training."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from erasekit.arch import FLUX
from erasekit.arch.samplers import run_trajectory
from erasekit.arch.unet import KNOWN_CONFIGS, SUPPORTED_SCHEDULERS, UNET, transformer_blocks, use_scheduler
from erasekit.arch.unet_pruned import PrunedUNet2DConditionModel
from erasekit.errors import MaskMismatchError
from erasekit.generate import generate_latents
from erasekit.methods.mask import MaskedModel, MaskSettings, apply_masks
from erasekit.methods.mask.artifact import base_model_record, save_mask_artifact
from erasekit.methods.mask.fold import fold_into_pipeline, save_folded_pipeline
from erasekit.tiny import build_tiny_flux_pipeline
from erasekit.tiny.unet import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline, save_tiny_sd_pipeline
from erasekit.training.gradient import checkpointed_gradient, naive_gradient

PROMPT = "a photo of a cat"
SAMPLERS = ["ddim", "euler", "dpm"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: one intra-op thread is fastest, and on a busy machine two threads can be 50x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd():
    return _quiet(build_tiny_sd_pipeline(seed=0))


@pytest.fixture(scope="module")
def sdxl():
    return _quiet(build_tiny_sdxl_pipeline(seed=0))


# ---------------------------------------------------------------------- sampler = stock pipeline
@pytest.mark.parametrize(
    "family, sampler, options",
    [
        ("sd", "ddim", {}),
        ("sd", "euler", {}),
        ("sd", "dpm", {}),
        ("sd", "pndm", {}),  # SD 1.5's own sampler (PLMS)
        ("sd", "ddim", {"prediction_type": "v_prediction", "use_linear_projection": True}),  # SD 2.x-like
        ("sdxl", "euler", {}),
        ("sdxl", "dpm", {}),
    ],
)
def test_trajectory_matches_the_diffusers_pipeline(family, sampler, options):
    builder = build_tiny_sd_pipeline if family == "sd" else build_tiny_sdxl_pipeline
    pipe = _quiet(builder(seed=1, scheduler=sampler, **options))
    encoded = UNET.encode_prompts(pipe, [PROMPT], max_sequence_length=77)
    trajectory = UNET.trajectory(pipe, encoded, [5], steps=4, resolution=32, guidance_scale=5.0)
    assert trajectory.num_steps == (5 if sampler == "pndm" else 4)  # PNDM's timesteps repeat one step
    ours = trajectory.decode(run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1])
    theirs = pipe(
        PROMPT,
        num_inference_steps=4,
        height=32,
        width=32,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert theirs.float().std() > 0.01
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours - theirs).abs().max()


def test_no_guidance_and_batched_rows_match_single_rows(sd):
    encoded = UNET.encode_prompts(sd, [PROMPT, "a red car"], max_sequence_length=77)
    both = UNET.trajectory(sd, encoded, [1, 2], steps=2, resolution=32, guidance_scale=1.0)
    z_both = run_trajectory(both.step, both.noise, 2)[-1]
    single = UNET.trajectory(
        sd, {k: v[1:] for k, v in encoded.items()}, [2], steps=2, resolution=32, guidance_scale=1.0
    )
    z_single = run_trajectory(single.step, single.noise, 2)[-1]
    assert torch.allclose(z_both[1:], z_single, atol=1e-5)
    assert not torch.allclose(z_both[0], z_both[1], atol=1e-3)


def test_dpm_solver_of_order_three_matches_the_pipeline():
    from diffusers import DPMSolverMultistepScheduler

    pipe = _quiet(build_tiny_sd_pipeline(seed=2, scheduler="dpm"))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=3)
    encoded = UNET.encode_prompts(pipe, [PROMPT], max_sequence_length=77)
    trajectory = UNET.trajectory(pipe, encoded, [4], steps=5, resolution=32, guidance_scale=5.0)
    latents = run_trajectory(trajectory.step, trajectory.noise, 5, keep=True)
    assert [z.shape[1] for z in latents] == [4, 8, 12, 12, 12, 4]  # two previous data predictions carried
    theirs = pipe(
        PROMPT,
        num_inference_steps=5,
        height=32,
        width=32,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(4),
        output_type="pt",
    ).images
    assert torch.allclose(trajectory.decode(latents[-1]), theirs.float(), atol=1e-4)


def test_unsupported_scheduler_is_refused_by_name(sd):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = copy.copy(sd)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sd.scheduler.config)
    encoded = UNET.encode_prompts(sd, [PROMPT], max_sequence_length=77)
    with pytest.raises(ValueError, match="EulerAncestralDiscreteScheduler") as info:
        UNET.trajectory(pipe, encoded, [0], steps=2, resolution=32, guidance_scale=5.0)
    for name in SUPPORTED_SCHEDULERS:
        assert name in str(info.value)
    use_scheduler(pipe, "dpm")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match="resolution"):
        UNET.trajectory(pipe, encoded, [0], steps=2, resolution=30, guidance_scale=5.0)


# ---------------------------------------------------------------------- gradients and recompute
def _random_train_mask(pipe, parameterization="hard_concrete"):
    denoiser = pipe.unet
    denoiser.requires_grad_(False)
    masked = MaskedModel(denoiser, UNET.sites(denoiser), MaskSettings(parameterization), init_lambda=0.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in masked.logits:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    masked.set_mode("train")
    masked.resample_noise(torch.Generator().manual_seed(0))
    return masked


@pytest.mark.parametrize(
    "family, sampler", [("sd", "ddim"), ("sd", "euler"), ("sd", "dpm"), ("sd", "pndm"), ("sdxl", "euler")]
)
def test_recompute_is_exact_and_checkpointed_gradient_equals_naive(family, sampler):
    builder = build_tiny_sd_pipeline if family == "sd" else build_tiny_sdxl_pipeline
    pipe = _quiet(builder(seed=0, dtype=torch.float64, scheduler=sampler))
    masked = _random_train_mask(pipe)
    steps = 4
    encoded = UNET.encode_prompts(pipe, [PROMPT, "a red car"], max_sequence_length=77)
    trajectory = UNET.trajectory(pipe, encoded, [1, 2], steps=steps, resolution=32, guidance_scale=4.0)
    target = torch.randn(
        trajectory.noise.shape, generator=torch.Generator().manual_seed(9), dtype=trajectory.noise.dtype
    )
    loss_fn = lambda z: (z - target).pow(2).mean()  # noqa: E731
    params = list(masked.logits)
    steps = trajectory.num_steps
    with masked:
        latents = run_trajectory(trajectory.step, trajectory.noise, steps, keep=True)
        if sampler == "dpm":  # the multistep state carries the previous data prediction
            assert [z.shape[1] for z in latents] == [4, 8, 8, 8, 4]
        if sampler == "pndm":  # PLMS: previous noise predictions, and step 0's sample before step 1
            assert [z.shape[1] for z in latents] == [4, 12, 8, 12, 16, 4]
        for i in range(steps):
            with torch.enable_grad():
                again = trajectory.step(latents[i].detach().requires_grad_(True), i)
            assert torch.equal(again.detach(), latents[i + 1])
        loss_naive, naive = naive_gradient(trajectory.step, trajectory.noise, steps, loss_fn, params)
        loss_ours, ours = checkpointed_gradient(trajectory.step, trajectory.noise, steps, loss_fn, params)
    flat_naive, flat_ours = torch.cat(naive), torch.cat(ours)
    assert flat_naive.abs().sum() > 0
    assert torch.allclose(loss_naive, loss_ours, rtol=1e-12)
    assert (flat_ours - flat_naive).norm() / flat_naive.norm() < 1e-5


# ---------------------------------------------------------------------- sites and hooks
def test_sites_follow_the_module_shapes(sd, sdxl):
    sites = UNET.sites(sd.unet)
    blocks = transformer_blocks(sd.unet)
    assert len(blocks) == 4 and len(sites) == 12
    assert {s.kind for s in sites} == {"heads", "neurons"}  # plain LayerNorm blocks: no norm units
    first = {s.key: s for s in sites}
    attn = first["heads/down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    assert (attn.num_units, attn.group, attn.block_type, attn.stream) == (2, 8, "down", "self")
    ff = first["neurons/mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    assert (
        ff.num_units == 4 * 32
        and sd.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj").out_features == 2 * 128
    )
    # 2 transformer layers per attention at the 32-channel level: 1 down attention, the mid block, 2 up attentions
    assert len(transformer_blocks(sdxl.unet)) == 2 + 2 + 2 * 2


def test_all_ones_mask_and_removed_hooks_leave_the_model_untouched(sd):
    encoded = UNET.encode_prompts(sd, [PROMPT], max_sequence_length=77)
    trajectory = UNET.trajectory(sd, encoded, [3], steps=3, resolution=32, guidance_scale=5.0)
    plain = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
    masked = MaskedModel(sd.unet, UNET.sites(sd.unet), init_lambda=3.0)
    masked.set_mode("binary")
    with masked:
        ones = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
        masked.logits[0].data.fill_(-1.0)
        changed = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
        with masked.disabled():
            disabled = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
    after = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
    assert torch.equal(ones, plain) and torch.equal(disabled, plain) and torch.equal(after, plain)
    assert not torch.allclose(changed, plain, atol=1e-6)
    assert not any(m._forward_pre_hooks for m in sd.unet.modules())


# ---------------------------------------------------------------------- fold and prune
SAMPLE = dict(steps=3, resolution=32, guidance_scale=4.0, max_sequence_length=77)
PROMPTS = [PROMPT, "a lighthouse at night"]
FULLY_DROPPED = {
    "heads/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",  # SD: a whole cross-attention
    "heads/down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0",  # SDXL: a whole cross-attention
    "neurons/mid_block.attentions.0.transformer_blocks.0.ff.net.2",  # both: a whole feed-forward
}
HALF_HEADS = "heads/mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"  # 4 heads, 2 dropped


def _random_binary_mask(pipe, seed=0):
    masked = MaskedModel(pipe.unet, UNET.sites(pipe.unet))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site, p in masked.iter_sites():
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
            if site.key in FULLY_DROPPED:
                p.fill_(-1.0)
            if site.key == HALF_HEADS:
                p.copy_(torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    masked.set_mode("binary")
    return masked.install()


@pytest.mark.parametrize("family, mode", [("sd", "zero"), ("sd", "prune"), ("sdxl", "prune")])
def test_folded_outputs_equal_the_hooked_mask(sd, sdxl, family, mode):
    pipe = copy.deepcopy(sd if family == "sd" else sdxl)
    masked = _random_binary_mask(pipe)
    hooked, _ = generate_latents(pipe, PROMPTS, [1, 2], **SAMPLE)
    before = sum(p.numel() for p in pipe.unet.parameters())
    fold_into_pipeline(pipe, masked, mode)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.unet.modules())
    folded, _ = generate_latents(pipe, PROMPTS, [1, 2], **SAMPLE)
    assert torch.allclose(folded, hooked, atol=1e-4), (folded - hooked).abs().max()
    after = sum(p.numel() for p in pipe.unet.parameters())
    if mode == "zero":
        assert after == before
        return
    assert after < before and isinstance(pipe.unet, PrunedUNet2DConditionModel)
    layout = pipe.unet.config.pruned_layout
    dropped_attn = (
        "down_blocks.0.attentions.0.transformer_blocks.0"
        if family == "sd"
        else "down_blocks.1.attentions.0.transformer_blocks.1"
    )
    assert layout[dropped_attn][1] == 1  # every head dropped: one zero-folded head keeps the shapes valid
    assert layout["mid_block.attentions.0.transformer_blocks.0"][0] == 2
    assert layout["mid_block.attentions.0.transformer_blocks.0"][2] == 1
    attn = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1")
    assert attn.heads == 2 and attn.to_q.out_features == 16 and attn.to_out[0].in_features == 16
    proj = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj")
    assert proj.out_features == 2  # GEGLU: value and gate rows of the one kept neuron
    # the pruned model gives sites of its actual shapes
    sites = {s.key: s for s in UNET.sites(pipe.unet)}
    assert sum(s.num_units for s in sites.values()) < sum(
        s.num_units for s in UNET.sites((sd if family == "sd" else sdxl).unet)
    )


_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "PrunedUNet2DConditionModel", type(pipe.unet)
    images = pipe("a photo of a cat", num_inference_steps=3, height=32, width=32, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert not any(name.startswith("erasekit") for name in sys.modules)
    torch.save(images, sys.argv[2])
    """
)


@pytest.mark.slow  # a fresh interpreter importing diffusers: ~6 s idle, 20+ s on a busy machine
def test_pruned_pipeline_reloads_with_stock_diffusers(sd, tmp_path):
    pipe = copy.deepcopy(sd)
    fold_into_pipeline(pipe, _random_binary_mask(pipe), "prune")
    out = save_folded_pipeline(pipe, tmp_path / "pruned", "prune", {"model": "tiny-sd"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["unet_pruned", "PrunedUNet2DConditionModel"]
    latents, trajectory = generate_latents(pipe, [PROMPT], [1], **SAMPLE)
    ours = trajectory.decode(latents)
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "images.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "images.pt", weights_only=True)
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours - theirs).abs().max()


# ---------------------------------------------------------------------- published configs
def _meta_counts(model_id):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(KNOWN_CONFIGS[model_id])
    sites = UNET.sites(unet)
    per_kind = {"heads": 0, "neurons": 0, "norm": 0}
    for s in sites:
        per_kind[s.kind] += s.num_units
    assert sum(p.numel() for p in unet.parameters()) == PARAMETERS[model_id]  # the published sizes: configs are right
    return len(transformer_blocks(unet)), per_kind, sites


PARAMETERS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 859_520_964,
    "stabilityai/stable-diffusion-2-1": 865_910_724,
    "stabilityai/stable-diffusion-xl-base-1.0": 2_567_463_684,
}


def _expected(levels):
    """levels: (channels, heads, transformer blocks) -> (blocks, heads, neurons) by hand."""
    blocks = sum(n for _, _, n in levels)
    heads = sum(2 * h * n for _, h, n in levels)  # attn1 + attn2
    neurons = sum(4 * c * n for c, _, n in levels)  # GEGLU inner width = 4 x channels
    return blocks, heads, neurons


@pytest.mark.parametrize(
    "model_id, levels",
    [
        # SD 1.5: 8 heads everywhere; down 2 blocks/level x 3 cross levels, mid 1, up 3 blocks/level x 3
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", [(320, 8, 2 + 3), (640, 8, 2 + 3), (1280, 8, 2 + 1 + 3)]),
        # SD 2.1: heads 5/10/20 (head_dim 64)
        ("stabilityai/stable-diffusion-2-1", [(320, 5, 2 + 3), (640, 10, 2 + 3), (1280, 20, 2 + 1 + 3)]),
        # SDXL: 640 ch: 2x2 down + 3x2 up; 1280 ch: 2x10 down + 10 mid + 3x10 up
        ("stabilityai/stable-diffusion-xl-base-1.0", [(640, 10, 4 + 6), (1280, 20, 20 + 10 + 30)]),
    ],
)
def test_published_configs_unit_counts(model_id, levels):
    blocks, per_kind, sites = _meta_counts(model_id)
    assert (blocks, per_kind["heads"], per_kind["neurons"]) == _expected(levels)
    assert per_kind["norm"] == 0
    assert all(s.group == 64 for s in sites if s.kind == "heads") or model_id.startswith("stable-diffusion-v1")
    documented = {
        "stable-diffusion-v1-5/stable-diffusion-v1-5": (16, 256, 49_920),
        "stabilityai/stable-diffusion-2-1": (16, 390, 49_920),
        "stabilityai/stable-diffusion-xl-base-1.0": (70, 2_600, 332_800),
    }
    assert (blocks, per_kind["heads"], per_kind["neurons"]) == documented[model_id]


def test_published_sdxl_config_matches_its_added_embedding():
    cfg = KNOWN_CONFIGS["stabilityai/stable-diffusion-xl-base-1.0"]
    assert cfg["projection_class_embeddings_input_dim"] == 6 * cfg["addition_time_embed_dim"] + 1280
    assert cfg["cross_attention_dim"] == 768 + 1280


# ---------------------------------------------------------------------- training and refusal
def test_trainer_writes_an_artifact_and_masks_do_not_cross_families(tmp_path):
    from erasekit.config import load_config
    from erasekit.methods import erase

    model_dir = save_tiny_sd_pipeline(tmp_path / "tiny-sd", seed=0)
    cfg = load_config(
        None,
        [
            f"model.id={model_dir}",
            "model.device=cpu",
            "model.dtype=float32",
            "concept.concept=a cat",
            "concept.anchor=a dog",
            "sampling.steps=2",
            "sampling.resolution=32",
            "sampling.guidance_scale=3.0",
            "mask.heads.enabled=true",
            "train.iterations=2",
            "train.checkpoint_every=0",
        ],
    )
    result = erase(cfg, tmp_path / "mask").result
    record = json.loads((result.output / "erasure.json").read_text())
    assert record["family"] == "unet"
    assert record["base_model"]["denoiser_class"] == "UNet2DConditionModel"
    assert set(record["unit_kinds"]) == {"heads", "neurons"}
    assert (result.output / "masks.safetensors").is_file()

    flux = build_tiny_flux_pipeline(seed=0)
    with pytest.raises(MaskMismatchError, match="UNet2DConditionModel"):
        apply_masks(flux, [result.output])

    flux_masked = MaskedModel(flux.transformer, FLUX.sites(flux.transformer))
    flux_config = {"method": "mask", "family": "flux", "base_model": base_model_record(flux.transformer, "tiny-flux")}
    flux_mask = save_mask_artifact(tmp_path / "flux-mask", flux_masked.logits_dict(), flux_config)
    sd_pipe = build_tiny_sd_pipeline(seed=0)
    with pytest.raises(MaskMismatchError, match="FluxTransformer2DModel"):
        apply_masks(sd_pipe, [flux_mask])
    applied = apply_masks(sd_pipe, [result.output])
    assert len(applied.sites) == 12
    applied.remove()
