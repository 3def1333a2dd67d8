"""SD3 / SD3.5 (``SD3Transformer2DModel``): sampler exactness, gradients, masks, fold/prune, configs, training."""

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
from erasekit.arch.sd3 import KNOWN_CONFIGS, SD3
from erasekit.arch.sd3_pruned import PrunedSD3Transformer2DModel
from erasekit.errors import MaskMismatchError
from erasekit.generate import generate_latents
from erasekit.methods.mask import MaskedModel, MaskSettings, apply_masks
from erasekit.methods.mask.artifact import base_model_record, save_mask_artifact
from erasekit.methods.mask.fold import fold_into_pipeline, save_folded_pipeline
from erasekit.tiny import build_tiny_flux_pipeline
from erasekit.tiny.sd3 import build_tiny_sd3_pipeline, save_tiny_sd3_pipeline
from erasekit.training.gradient import checkpointed_gradient, naive_gradient

PROMPT = "a photo of a cat"
SD30_LAYOUT = dict(dual_attention_layers=(), qk_norm=None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared small machine this is much faster for the tiny model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd35():
    return _quiet(build_tiny_sd3_pipeline(seed=0))


# ---------------------------------------------------------------------- sampler = stock pipeline
@pytest.mark.parametrize(
    "options, guidance",
    [({}, 4.5), ({}, 1.0), (SD30_LAYOUT, 7.0)],
    ids=["sd3.5-cfg", "sd3.5-no-cfg", "sd3.0-cfg"],
)
def test_trajectory_matches_the_diffusers_pipeline(options, guidance):
    pipe = _quiet(build_tiny_sd3_pipeline(seed=1, **options))
    encoded = SD3.encode_prompts(pipe, [PROMPT], max_sequence_length=16)
    trajectory = SD3.trajectory(pipe, encoded, [5], steps=4, resolution=32, guidance_scale=guidance)
    ours = trajectory.decode(run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1])
    theirs = pipe(
        PROMPT,
        num_inference_steps=4,
        height=32,
        width=32,
        guidance_scale=guidance,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    assert theirs.float().std() > 0.01
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours - theirs).abs().max()


def test_encoded_rows_and_batched_rows_match_single_rows(sd35):
    encoded = SD3.encode_prompts(sd35, [PROMPT, "a red car"], max_sequence_length=16)
    # CLIP-L (16) + CLIP-G (24) states zero-padded to T5's 48 channels, 77 CLIP + 16 T5 tokens; pooled 16 + 24.
    assert encoded["prompt_embeds"].shape == encoded["negative_prompt_embeds"].shape == (2, 77 + 16, 48)
    assert encoded["pooled_prompt_embeds"].shape == encoded["negative_pooled_prompt_embeds"].shape == (2, 40)
    assert torch.equal(encoded["negative_prompt_embeds"][0], encoded["negative_prompt_embeds"][1])
    both = SD3.trajectory(sd35, encoded, [1, 2], steps=2, resolution=32, guidance_scale=4.0)
    z_both = run_trajectory(both.step, both.noise, 2)[-1]
    single = SD3.trajectory(
        sd35, {k: v[1:] for k, v in encoded.items()}, [2], steps=2, resolution=32, guidance_scale=4.0
    )
    z_single = run_trajectory(single.step, single.noise, 2)[-1]
    assert torch.allclose(z_both[1:], z_single, atol=1e-5)
    assert not torch.allclose(z_both[0], z_both[1], atol=1e-3)
    with pytest.raises(ValueError, match="resolution 24"):
        SD3.trajectory(sd35, encoded, [1, 2], steps=2, resolution=24, guidance_scale=4.0)
    with pytest.raises(ValueError, match="positional embeddings"):
        SD3.trajectory(sd35, encoded, [1, 2], steps=2, resolution=512, guidance_scale=4.0)
    with pytest.raises(ValueError, match="noise seeds"):
        SD3.trajectory(sd35, encoded, [1], steps=2, resolution=32, guidance_scale=4.0)


# ---------------------------------------------------------------------- gradients and recompute
def _random_train_mask(pipe, parameterization="hard_concrete"):
    denoiser = pipe.transformer
    denoiser.requires_grad_(False)
    masked = MaskedModel(denoiser, SD3.sites(denoiser), MaskSettings(parameterization), init_lambda=0.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in masked.logits:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    masked.set_mode("train")
    masked.resample_noise(torch.Generator().manual_seed(0))
    return masked


@pytest.mark.parametrize("parameterization, guidance", [("hard_concrete", 4.0), ("sigmoid", 1.0)])
def test_recompute_is_exact_and_checkpointed_gradient_equals_naive(parameterization, guidance):
    pipe = _quiet(build_tiny_sd3_pipeline(seed=0, dtype=torch.float64))
    masked = _random_train_mask(pipe, parameterization)
    steps = 3
    encoded = SD3.encode_prompts(pipe, [PROMPT, "a red car"], max_sequence_length=16)
    trajectory = SD3.trajectory(pipe, encoded, [1, 2], steps=steps, resolution=32, guidance_scale=guidance)
    assert trajectory.noise.dtype == torch.float64
    target = torch.randn(
        trajectory.noise.shape, generator=torch.Generator().manual_seed(9), dtype=trajectory.noise.dtype
    )
    loss_fn = lambda z: (z - target).pow(2).mean()  # noqa: E731
    params = list(masked.logits)
    with masked:
        latents = run_trajectory(trajectory.step, trajectory.noise, steps, keep=True)
        for i in range(steps):
            with torch.enable_grad():
                again = trajectory.step(latents[i].detach().requires_grad_(True), i)
            assert torch.equal(again.detach(), latents[i + 1])
        loss_naive, naive = naive_gradient(trajectory.step, trajectory.noise, steps, loss_fn, params)
        loss_ours, ours = checkpointed_gradient(trajectory.step, trajectory.noise, steps, loss_fn, params)
    flat_naive, flat_ours = torch.cat(naive), torch.cat(ours)
    assert flat_naive.abs().sum() > 0
    # every unit kind (and SD3.5's attn2) receives gradient
    by_key = dict(zip(masked.keys, ours))
    for key in (
        "heads/transformer_blocks.0.attn2.to_out.0",
        "heads/transformer_blocks.2.attn.to_out.0",
        "norm/transformer_blocks.2.norm1_context.linear",
        "neurons/transformer_blocks.1.ff_context.net.2",
    ):
        assert by_key[key].abs().sum() > 0, key
    assert torch.allclose(loss_naive, loss_ours, rtol=1e-12)
    assert (flat_ours - flat_naive).norm() / flat_naive.norm() < 1e-5


# ---------------------------------------------------------------------- sites and hooks
def test_sites_follow_the_module_shapes(sd35):
    sites = {s.key: s for s in SD3.sites(sd35.transformer)}
    d = 32  # 4 heads x 8
    expected = {
        "norm/transformer_blocks.0.norm1.linear": 9 * d,  # SD35AdaLayerNormZeroX (dual attention)
        "norm/transformer_blocks.0.norm1_context.linear": 6 * d,
        "heads/transformer_blocks.0.attn.to_out.0": 4,
        "heads/transformer_blocks.0.attn.to_add_out": 4,
        "heads/transformer_blocks.0.attn2.to_out.0": 4,
        "neurons/transformer_blocks.0.ff.net.2": 4 * d,
        "neurons/transformer_blocks.0.ff_context.net.2": 4 * d,
        "norm/transformer_blocks.1.norm1.linear": 6 * d,  # AdaLayerNormZero
        "norm/transformer_blocks.1.norm1_context.linear": 6 * d,
        "heads/transformer_blocks.1.attn.to_out.0": 4,
        "heads/transformer_blocks.1.attn.to_add_out": 4,
        "neurons/transformer_blocks.1.ff.net.2": 4 * d,
        "neurons/transformer_blocks.1.ff_context.net.2": 4 * d,
        "norm/transformer_blocks.2.norm1.linear": 6 * d,
        "norm/transformer_blocks.2.norm1_context.linear": 2 * d,  # context_pre_only: AdaLayerNormContinuous
        "heads/transformer_blocks.2.attn.to_out.0": 4,  # no to_add_out, no ff_context in the last block
        "neurons/transformer_blocks.2.ff.net.2": 4 * d,
    }
    assert {k: s.num_units for k, s in sites.items()} == expected
    assert all(s.group == 8 for s in sites.values() if s.kind == "heads")
    assert sites["heads/transformer_blocks.0.attn2.to_out.0"].stream == "image_self"
    assert [s.hook for s in sites.values() if s.kind == "norm"] == ["output"] * 6


def test_all_ones_mask_and_removed_hooks_leave_the_model_untouched(sd35):
    encoded = SD3.encode_prompts(sd35, [PROMPT], max_sequence_length=16)
    trajectory = SD3.trajectory(sd35, encoded, [3], steps=3, resolution=32, guidance_scale=5.0)
    plain = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
    masked = MaskedModel(sd35.transformer, SD3.sites(sd35.transformer), init_lambda=3.0)
    masked.set_mode("binary")
    with masked:
        ones = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
        masked.logits[masked.keys.index("heads/transformer_blocks.0.attn2.to_out.0")].data.fill_(-1.0)
        changed = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
        with masked.disabled():
            disabled = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
    after = run_trajectory(trajectory.step, trajectory.noise, 3)[-1]
    assert torch.equal(ones, plain) and torch.equal(disabled, plain) and torch.equal(after, plain)
    assert not torch.allclose(changed, plain, atol=1e-6)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in sd35.transformer.modules())


# ---------------------------------------------------------------------- fold and prune
SAMPLE = dict(steps=3, resolution=32, guidance_scale=4.0, max_sequence_length=16)
PROMPTS = [PROMPT, "a lighthouse at night"]
B = "heads/transformer_blocks"


def _random_binary_mask(pipe, seed=0):
    masked = MaskedModel(pipe.transformer, SD3.sites(pipe.transformer))
    g = torch.Generator().manual_seed(seed)
    drop = {
        f"{B}.0.attn.to_out.0": [-1.0, 1.0, 1.0, 1.0],  # head 0 dropped by both streams: removable
        f"{B}.0.attn.to_add_out": [-1.0, 1.0, -1.0, 1.0],  # head 2 dropped by the text stream only: kept
        f"{B}.1.attn.to_out.0": [-1.0, -1.0, 1.0, 1.0],  # image drops 0, 1; text keeps all: all 4 kept
        f"{B}.1.attn.to_add_out": [1.0] * 4,
        f"{B}.2.attn.to_out.0": [-1.0, 1.0, -1.0, 1.0],  # last block: its text output is discarded -> 2 removed
        f"{B}.0.attn2.to_out.0": [-1.0] * 4,  # every attn2 head dropped: one zeroed head kept
    }
    with torch.no_grad():
        for site, p in masked.iter_sites():
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
            if site.key in drop:
                p.copy_(torch.tensor(drop[site.key]))
            if site.key == "neurons/transformer_blocks.1.ff_context.net.2":
                p.fill_(-1.0)  # a whole feed-forward dropped
    masked.set_mode("binary")
    return masked.install()


@pytest.mark.parametrize("mode", ["zero", "prune"])
def test_folded_outputs_equal_the_hooked_mask(sd35, mode):
    pipe = copy.deepcopy(sd35)
    masked = _random_binary_mask(pipe)
    hooked, _ = generate_latents(pipe, PROMPTS, [1, 2], **SAMPLE)
    before = sum(p.numel() for p in pipe.transformer.parameters())
    fold_into_pipeline(pipe, masked, mode)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.transformer.modules())
    folded, _ = generate_latents(pipe, PROMPTS, [1, 2], **SAMPLE)
    assert torch.allclose(folded, hooked, atol=1e-4), (folded - hooked).abs().max()
    unmasked, _ = generate_latents(sd35, PROMPTS, [1, 2], **SAMPLE)
    assert not torch.allclose(folded, unmasked, atol=1e-3)
    after = sum(p.numel() for p in pipe.transformer.parameters())
    if mode == "zero":
        assert after == before
        return
    assert after < before and isinstance(pipe.transformer, PrunedSD3Transformer2DModel)
    layout = pipe.transformer.config.pruned_layout
    assert [row[:2] for row in layout] == [[3, 1], [4, 0], [2, 0]]
    assert layout[1][3] == 1 and layout[2][3] == 0  # all ff_context neurons dropped: one zeroed; none in the last
    attn = pipe.transformer.transformer_blocks[2].attn
    assert attn.heads == 2 and attn.to_q.out_features == attn.add_k_proj.out_features == 16
    # the pruned model yields sites of its actual shapes
    sites = {s.key: s for s in SD3.sites(pipe.transformer)}
    assert sites[f"{B}.0.attn.to_add_out"].num_units == 3 and sites[f"{B}.0.attn2.to_out.0"].num_units == 1


_RELOAD = textwrap.dedent(
    """
    import sys, torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline", type(pipe)
    assert type(pipe.transformer).__name__ == "PrunedSD3Transformer2DModel", type(pipe.transformer)
    images = pipe("a photo of a cat", num_inference_steps=3, height=32, width=32, guidance_scale=4.0,
                  max_sequence_length=16, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert not any(name.startswith("erasekit") for name in sys.modules)
    torch.save(images, sys.argv[2])
    """
)


@pytest.mark.slow  # a fresh interpreter importing diffusers + transformers: ~15-30 s on 2 busy cores
def test_pruned_pipeline_reloads_with_stock_diffusers(sd35, tmp_path):
    pipe = copy.deepcopy(sd35)
    fold_into_pipeline(pipe, _random_binary_mask(pipe), "prune")
    out = save_folded_pipeline(pipe, tmp_path / "pruned", "prune", {"model": "tiny-sd3"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["sd3_pruned", "PrunedSD3Transformer2DModel"]
    code = (out / "transformer" / "sd3_pruned.py").read_text()
    assert "erasekit" not in "".join(line for line in code.splitlines() if line.lstrip().startswith(("import", "from")))
    latents, trajectory = generate_latents(pipe, [PROMPT], [1], **SAMPLE)
    ours = trajectory.decode(latents)
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
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
def _expected(cfg):
    """(blocks, dual blocks, heads, neurons, norm) by hand from a config dict."""
    n, h = cfg["num_layers"], cfg["num_attention_heads"]
    d = h * cfg["attention_head_dim"]
    dual = len(cfg.get("dual_attention_layers", []))
    heads = n * h + (n - 1) * h + dual * h  # image stream, text stream (not the last block), attn2
    neurons = n * 4 * d + (n - 1) * 4 * d  # ff, ff_context (not the last block)
    norm = (n - dual) * 6 * d + dual * 9 * d + (n - 1) * 6 * d + 2 * d  # norm1; norm1_context (last: scale+shift)
    return n, dual, heads, neurons, norm


DOCUMENTED = {
    "stabilityai/stable-diffusion-3-medium-diffusers": (24, 0, 1_128, 288_768, 436_224),
    "stabilityai/stable-diffusion-3.5-medium": (24, 13, 1_440, 288_768, 496_128),
    "stabilityai/stable-diffusion-3.5-large": (38, 0, 2_850, 729_600, 1_099_264),
    "stabilityai/stable-diffusion-3.5-large-turbo": (38, 0, 2_850, 729_600, 1_099_264),
}


@pytest.mark.parametrize("model_id", sorted(DOCUMENTED))
def test_published_configs_unit_counts(model_id):
    from diffusers import SD3Transformer2DModel

    cfg = KNOWN_CONFIGS[model_id]
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(cfg)
    sites = SD3.sites(model)
    per_kind = {"heads": 0, "neurons": 0, "norm": 0}
    for s in sites:
        per_kind[s.kind] += s.num_units
    blocks = len(model.transformer_blocks)
    dual = sum(b.attn2 is not None for b in model.transformer_blocks)
    got = (blocks, dual, per_kind["heads"], per_kind["neurons"], per_kind["norm"])
    assert got == _expected(cfg) == DOCUMENTED[model_id]
    assert all(s.group == 64 for s in sites if s.kind == "heads")
    assert model.transformer_blocks[-1].attn.to_add_out is None and model.transformer_blocks[-1].ff_context is None


# ---------------------------------------------------------------------- training and refusal
def test_trainer_writes_an_artifact_and_masks_do_not_cross_families(tmp_path):
    from erasekit.config import load_config
    from erasekit.methods import erase

    model_dir = save_tiny_sd3_pipeline(tmp_path / "tiny-sd3", seed=0)
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
            "sampling.guidance_scale=4.5",
            "sampling.max_sequence_length=16",
            "mask.heads.enabled=true",
            "train.iterations=2",
            "train.checkpoint_every=0",
        ],
    )
    result = erase(cfg, tmp_path / "mask").result
    record = json.loads((result.output / "erasure.json").read_text())
    assert record["family"] == "sd3"
    assert record["base_model"]["denoiser_class"] == "SD3Transformer2DModel"
    assert set(record["unit_kinds"]) == {"heads", "neurons", "norm"}
    assert (result.output / "masks.safetensors").is_file()

    flux = build_tiny_flux_pipeline(seed=0)
    with pytest.raises(MaskMismatchError, match="SD3Transformer2DModel"):
        apply_masks(flux, [result.output])

    flux_masked = MaskedModel(flux.transformer, FLUX.sites(flux.transformer))
    flux_config = {"method": "mask", "family": "flux", "base_model": base_model_record(flux.transformer, "tiny-flux")}
    flux_mask = save_mask_artifact(tmp_path / "flux-mask", flux_masked.logits_dict(), flux_config)
    sd3_pipe = build_tiny_sd3_pipeline(seed=0)
    with pytest.raises(MaskMismatchError, match="FluxTransformer2DModel"):
        apply_masks(sd3_pipe, [flux_mask])
    applied = apply_masks(sd3_pipe, [result.output])
    assert len(applied.sites) == len(SD3.sites(sd3_pipe.transformer)) == 17
    applied.remove()
