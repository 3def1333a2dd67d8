"""DiT: class-name prompts, stateless DDIM / DPM-Solver trajectories, gradients, fold, prune, trainer."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from erasekit.arch.dit import DIT, class_ids, id2label_of
from erasekit.arch.samplers import run_trajectory
from erasekit.errors import ConfigError, MaskMismatchError, ModelLoadError, PromptError
from erasekit.generate import generate_latents
from erasekit.methods.mask import MaskedModel, MaskSettings
from erasekit.methods.mask.fold import fold_into_pipeline, save_folded_pipeline
from erasekit.tiny.dit import TINY_ID2LABEL, build_tiny_dit_pipeline, save_tiny_dit_pipeline
from erasekit.training.gradient import checkpointed_gradient, naive_gradient

PROMPTS = ["golden retriever", "tabby cat"]
SAMPLE = dict(steps=3, resolution=32, max_sequence_length=1)


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_dit_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe64():
    p = build_tiny_dit_pipeline(seed=0, dtype=torch.float64)
    p.set_progress_bar_config(disable=True)
    return p


def with_scheduler(pipe, cls):
    if isinstance(pipe.scheduler, cls):
        return pipe
    other = copy.copy(pipe)  # shares the models and labels; only the scheduler differs
    other.scheduler = cls.from_config(pipe.scheduler.config)
    return other


def test_class_names_synonyms_and_ids_map_to_labels(pipe):
    assert class_ids(pipe, ["golden retriever", "Tabby Cat", "TABBY", "tiger cat", "207", "  Goldfish ", ""]) == [
        207,
        281,
        281,
        282,
        207,
        1,
        1000,
    ]
    with pytest.raises(PromptError, match=r"closest names: 'golden retriever'.*templates=\['\{concept\}'\]"):
        class_ids(pipe, ["a photo of golden retrievr"])
    with pytest.raises(PromptError, match="out of range"):
        class_ids(pipe, ["1000"])
    assert id2label_of(pipe)[281] in ("tabby, tabby cat", "tabby cat, tabby")


def test_sites_norm_heads_neurons_per_block(pipe):
    sites = DIT.sites(pipe.transformer)
    assert [s.key for s in sites[:3]] == [
        "norm/transformer_blocks.0.norm1.linear",
        "heads/transformer_blocks.0.attn1.to_out.0",
        "neurons/transformer_blocks.0.ff.net.2",
    ]
    units = {k: sum(s.num_units for s in sites if s.kind == k) for k in ("heads", "neurons", "norm")}
    assert units == {"heads": 2 * 2, "neurons": 2 * 64, "norm": 2 * 6 * 16}


@pytest.mark.parametrize(
    "scheduler,guidance", [(DDIMScheduler, 4.0), (DDIMScheduler, 1.0), (DPMSolverMultistepScheduler, 4.0)]
)
def test_trajectory_matches_the_diffusers_pipeline(pipe, scheduler, guidance):
    p = with_scheduler(pipe, scheduler)
    encoded = DIT.encode_prompts(p, PROMPTS, 1)
    trajectory = DIT.trajectory(p, encoded, [5, 6], steps=4, resolution=32, guidance_scale=guidance)
    ours = trajectory.decode(run_trajectory(trajectory.step, trajectory.noise, trajectory.num_steps)[-1])
    theirs = torch.cat(
        [
            p(
                class_labels=[label],
                num_inference_steps=4,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images
            for label, seed in ((207, 5), (281, 6))
        ]
    )
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours - theirs).abs().max()


def test_unsupported_settings_are_refused(pipe):
    encoded = DIT.encode_prompts(pipe, PROMPTS, 1)
    with pytest.raises(ConfigError, match="sampling.resolution=32"):
        DIT.trajectory(pipe, encoded, [1, 2], steps=2, resolution=64, guidance_scale=4.0)
    with pytest.raises(ModelLoadError, match="init_noise_sigma"):
        DIT.trajectory(
            with_scheduler(pipe, EulerDiscreteScheduler), encoded, [1, 2], steps=2, resolution=32, guidance_scale=4.0
        )


def _setup(pipe, parameterization: str, steps: int = 4):
    denoiser = pipe.transformer
    denoiser.requires_grad_(False)
    masked = MaskedModel(denoiser, DIT.sites(denoiser), MaskSettings(parameterization), init_lambda=0.5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in masked.logits:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    masked.set_mode("train")
    masked.resample_noise(torch.Generator().manual_seed(0))
    trajectory = DIT.trajectory(
        pipe, DIT.encode_prompts(pipe, PROMPTS, 1), [1, 2], steps=steps, resolution=32, guidance_scale=4.0
    )
    target = torch.randn(
        trajectory.noise.shape, generator=torch.Generator().manual_seed(9), dtype=trajectory.noise.dtype
    )
    loss_fn = lambda z: (z - target).pow(2).mean()  # noqa: E731
    return masked, trajectory, loss_fn


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_recomputed_step_is_exact(pipe64, scheduler):
    masked, trajectory, _ = _setup(with_scheduler(pipe64, scheduler), "hard_concrete")
    with masked:
        latents = run_trajectory(trajectory.step, trajectory.noise, 4, keep=True)
        for i in range(4):
            with torch.enable_grad():
                again = trajectory.step(latents[i].detach().requires_grad_(True), i)
            assert torch.equal(again.detach(), latents[i + 1])


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_checkpointed_gradient_equals_naive_backprop(pipe64, scheduler):
    masked, trajectory, loss_fn = _setup(with_scheduler(pipe64, scheduler), "sigmoid")
    params = list(masked.logits)
    with masked:
        loss_naive, naive = naive_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
        loss_ours, ours = checkpointed_gradient(trajectory.step, trajectory.noise, 4, loss_fn, params)
    flat_naive, flat_ours = torch.cat(naive), torch.cat(ours)
    assert all(g.abs().sum() > 0 for g in naive)
    assert torch.allclose(loss_naive, loss_ours, rtol=1e-12)
    assert (flat_ours - flat_naive).norm() / flat_naive.norm() < 1e-5


def test_all_ones_mask_and_removed_hooks_leave_the_model_untouched(pipe):
    before, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=4.0, **SAMPLE)
    masked = MaskedModel(pipe.transformer, DIT.sites(pipe.transformer), init_lambda=3.0)
    masked.set_mode("binary")
    with masked:
        hooked, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=4.0, **SAMPLE)
    after, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=4.0, **SAMPLE)
    assert torch.equal(hooked, before) and torch.equal(after, before)


def random_mask(pipe, seed: int = 0) -> MaskedModel:
    masked = MaskedModel(pipe.transformer, DIT.sites(pipe.transformer))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site, p in masked.iter_sites():
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
            if site.key == "heads/transformer_blocks.0.attn1.to_out.0":
                p.copy_(torch.tensor([-1.0, 1.0]))  # one head removed
            if site.key == "heads/transformer_blocks.1.attn1.to_out.0":
                p.fill_(-1.0)  # every head dropped: one zeroed head is kept
            if site.key == "neurons/transformer_blocks.1.ff.net.2":
                p.fill_(-1.0)  # a whole MLP dropped: one zeroed neuron is kept
    masked.set_mode("binary")
    return masked.install()


@pytest.mark.parametrize("mode", ["zero", "prune"])
def test_folded_outputs_equal_the_hooked_mask(pipe, mode):
    p = copy.deepcopy(pipe)
    masked = random_mask(p)
    hooked, _ = generate_latents(p, PROMPTS, [1, 2], guidance_scale=4.0, **SAMPLE)
    before = sum(t.numel() for t in p.transformer.parameters())
    fold_into_pipeline(p, masked, mode)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in p.transformer.modules())
    folded, _ = generate_latents(p, PROMPTS, [1, 2], guidance_scale=4.0, **SAMPLE)
    assert torch.allclose(folded, hooked, atol=1e-4), (folded - hooked).abs().max()
    after = sum(t.numel() for t in p.transformer.parameters())
    if mode == "zero":
        assert after == before
    else:
        assert after < before
        assert p.transformer.config.pruned_layout == [[1, p.transformer.config.pruned_layout[0][1]], [1, 1]]


@pytest.mark.slow
def test_pruned_pipeline_loads_with_stock_diffusers_in_a_subprocess(pipe, tmp_path):
    p = copy.deepcopy(pipe)
    fold_into_pipeline(p, random_mask(p), "prune")
    out = save_folded_pipeline(p, tmp_path / "pruned", "prune", {"model": "tiny-dit"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["dit_pruned", "PrunedDiTTransformer2DModel"]
    assert index["id2label"]["207"] == "golden retriever"  # class names survive the save
    expected = p(
        class_labels=[207], num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="pt"
    ).images
    script = textwrap.dedent(
        f"""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert "erasekit" not in sys.modules, "erasekit was imported"
        assert type(pipe.transformer).__name__ == "PrunedDiTTransformer2DModel"
        labels = pipe.get_label_ids(["golden retriever"])
        image = pipe(
            class_labels=labels, num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="pt"
        ).images
        torch.save(image, {str(tmp_path / "image.pt")!r})
        """
    )
    subprocess.run(
        [sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert torch.allclose(torch.load(tmp_path / "image.pt", weights_only=True), expected, atol=1e-5)


def test_published_config_on_meta_gives_the_documented_unit_counts():
    from erasekit.inspect import inspect_model

    info = inspect_model("facebook/DiT-XL-2-256")
    layers, heads, width = 28, 16, 16 * 72
    assert info["denoiser_class"] == "DiTTransformer2DModel" and info["family"] == "dit"
    assert info["units"]["per_kind"] == {
        "heads": layers * heads,
        "neurons": layers * 4 * width,
        "norm": layers * 6 * width,
    }
    assert info["units"]["per_kind"] == {"heads": 448, "neurons": 129024, "norm": 193536}
    assert info["units"]["total"] == 323008
    # DiT-XL/2 has 675 M parameters; diffusers gives every block its own timestep + class embedder (+75 M)
    assert info["parameters"] == 749_826_464


def test_tiny_pipeline_saves_atomically_with_its_labels(tmp_path):
    from diffusers import DiffusionPipeline

    out = save_tiny_dit_pipeline(tmp_path / "tiny")
    assert (out / "erasekit_tiny_dit.json").is_file() and not list(tmp_path.glob(".tiny.*"))
    loaded = DiffusionPipeline.from_pretrained(out)
    assert type(loaded).__name__ == "DiTPipeline"
    assert class_ids(loaded, ["golden retriever", "tabby cat"]) == [207, 281]
    assert len(id2label_of(loaded)) == len(TINY_ID2LABEL)


def test_trainer_erases_a_class_towards_an_anchor_class(pipe, tmp_path):
    from erasekit.config import load_config
    from erasekit.methods.mask import apply_masks
    from erasekit.methods.mask.trainer import MaskTrainer
    from erasekit.tiny import build_tiny_flux_pipeline
    from erasekit.training.run import make_accelerator

    overrides = [
        "model.id=tiny-dit",
        "model.device=cpu",
        "model.dtype=float32",
        "concept.concept=golden retriever",
        "concept.anchor=tabby cat",
        "concept.synonyms=['207']",
        "concept.preservation_prompts=[goldfish, volcano]",
        "sampling.steps=2",
        "sampling.resolution=32",
        "train.iterations=2",
        "train.checkpoint_every=0",
        "mask.heads.enabled=true",
    ]
    cfg = load_config("configs/dit-xl-2.yaml", overrides)
    trainer = MaskTrainer(copy.deepcopy(pipe), cfg, tmp_path / "mask", make_accelerator(cfg, tmp_path / "logs"))
    assert trainer.prompts.concept == ["golden retriever", "207"] and trainer.prompts.target == [
        "tabby cat",
        "tabby cat",
    ]
    result = trainer.fit()
    record = json.loads((result.output / "erasure.json").read_text())
    assert record["family"] == "dit" and record["concept"] == "golden retriever" and record["anchor"] == "tabby cat"
    with pytest.raises(MaskMismatchError, match="DiTTransformer2DModel"):
        apply_masks(build_tiny_flux_pipeline(seed=0), [result.output])

    # the generic free-text templates are refused by name, before any training
    bad = load_config("configs/dit-xl-2.yaml", overrides + ["concept.templates=['a photo of {concept}']"])
    with pytest.raises(PromptError, match="not a class of this DiT"):
        MaskTrainer(copy.deepcopy(pipe), bad, tmp_path / "bad", make_accelerator(bad, tmp_path / "logs2")).fit()
    assert not (tmp_path / "bad").exists()
