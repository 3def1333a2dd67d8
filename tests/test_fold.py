"""Zero-fold and prune-fold give the hooked binary mask's outputs, and save as stock diffusers pipelines."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from erasekit.arch import FLUX
from erasekit.generate import generate_latents
from erasekit.methods.mask import MaskedModel
from erasekit.methods.mask.fold import fold_into_pipeline, save_folded_pipeline
from erasekit.tiny import build_tiny_flux_pipeline

SAMPLE = dict(steps=3, resolution=32, max_sequence_length=16)
PROMPTS = ["a photo of a cat", "a lighthouse at night"]


@pytest.fixture(scope="module")
def base_pipe():
    return build_tiny_flux_pipeline(seed=0)


def random_mask(pipe, seed: int = 0) -> MaskedModel:
    denoiser = pipe.transformer
    masked = MaskedModel(denoiser, FLUX.sites(denoiser))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site, p in masked.iter_sites():
            p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
            if site.key in ("heads/transformer_blocks.0.attn.to_out.0", "heads/transformer_blocks.0.attn.to_add_out"):
                p.copy_(torch.tensor([-1.0, 1.0]))  # head 0 dropped by both streams: removable
            if site.key == "heads/transformer_blocks.1.attn.to_out.0":
                p.copy_(torch.tensor([-1.0, 1.0]))  # only the image stream drops head 0: zeroed, kept
            if site.key == "neurons/single_transformer_blocks.1.proj_out":
                p.fill_(-1.0)  # a whole MLP dropped: one zeroed neuron is kept for valid shapes
    masked.set_mode("binary")
    return masked.install()


@pytest.mark.parametrize("mode", ["zero", "prune"])
def test_folded_outputs_equal_the_hooked_mask(base_pipe, mode):
    pipe = copy.deepcopy(base_pipe)
    masked = random_mask(pipe)
    hooked, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=0.0, **SAMPLE)
    before = sum(p.numel() for p in pipe.transformer.parameters())
    fold_into_pipeline(pipe, masked, mode)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in pipe.transformer.modules())
    folded, _ = generate_latents(pipe, PROMPTS, [1, 2], guidance_scale=0.0, **SAMPLE)
    assert torch.allclose(folded, hooked, atol=1e-4), (folded - hooked).abs().max()
    after = sum(p.numel() for p in pipe.transformer.parameters())
    if mode == "zero":
        assert after == before
    else:
        assert after < before
        layout = pipe.transformer.config.pruned_layout
        assert layout["double"][0][0] == 1 and layout["double"][1][0] == 2
        assert layout["single"][1][1] == 1


def test_pruned_pipeline_saves_with_its_component_code(base_pipe, tmp_path):
    pipe = copy.deepcopy(base_pipe)
    fold_into_pipeline(pipe, random_mask(pipe), "prune")
    out = save_folded_pipeline(pipe, tmp_path / "pruned", "prune", {"model": "tiny"})
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["flux_pruned", "PrunedFluxTransformer2DModel"]
    assert (out / "transformer" / "flux_pruned.py").is_file()
    code = (out / "transformer" / "flux_pruned.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+erasekit", code, re.MULTILINE)  # stock diffusers + torch only
    with pytest.raises(FileExistsError):
        save_folded_pipeline(pipe, out, "prune")
    assert not list(tmp_path.glob(".*partial"))
