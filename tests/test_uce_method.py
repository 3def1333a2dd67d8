"""The wired ``uce`` method: its edit satisfies UCE's normal equations on the inputs the tiny models' layers
really read, it edits the right projections per family, and it takes several concepts at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from erasekit.arch import denoiser_of
from erasekit.config import EraseConfig, load_config
from erasekit.errors import ConfigError
from erasekit.methods import get_method, load_erasure
from erasekit.methods.uce.method import UCEErasure, concept_pairs
from erasekit.tiny import build_tiny_flux_pipeline, build_tiny_sd_pipeline
from tiny_settings import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = [
    *tiny_overrides(steps=2),
    "method=uce",
    'concept.templates=["a photo of {concept}", "{concept}"]',
    "concept.preservation_prompts=[a red car, a tree]",
    "uce.lam=0.3",
    "uce.erase_scale=0.7",
    "uce.preserve_scale=0.4",
    "uce.batch_size=3",  # several passes, one of them partial
]


def _config(*extra: str) -> EraseConfig:
    return load_config(None, [*SHARED, *extra])


def _normal_equations_residual(
    w: torch.Tensor, w_new: torch.Tensor, c: torch.Tensor, g: torch.Tensor, p: torch.Tensor, cfg: EraseConfig
) -> float:
    """``|W' A - B| / |B|`` with A and B of UCE's normal equations, built here from the inputs."""
    u = cfg.uce
    w, w_new, c, g, p = (t.to(torch.float64) for t in (w, w_new, c, g, p))
    a = u.lam * torch.eye(w.shape[1], dtype=torch.float64) + u.erase_scale * c.T @ c + u.preserve_scale * p.T @ p
    b = u.lam * w + u.erase_scale * (g @ w.T).T @ c + u.preserve_scale * (p @ w.T).T @ p
    return float((w_new @ a - b).norm() / b.norm())


def _fit(pipe: Any, cfg: EraseConfig, tmp_path: Path) -> UCEErasure:
    erasure = get_method("uce").fit(pipe, cfg, tmp_path / "uce", model_id="tiny")
    assert isinstance(erasure, UCEErasure)
    return erasure


def test_the_unet_edit_solves_the_normal_equations_on_the_text_embeddings(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    cfg = _config()
    arch, unet = denoiser_of(pipe)
    originals = {n: p.detach().clone() for n, p in unet.named_parameters()}
    erasure = _fit(pipe, cfg, tmp_path)
    # every cross-attention key and value projection, nothing else; the model itself is left as it was
    expected = {n for n in originals if n.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))}
    assert set(erasure.weights) == expected and len(expected) >= 4
    assert all(torch.equal(p, originals[n]) for n, p in unet.named_parameters())
    assert erasure.record["modules"] == sorted(n.removesuffix(".weight") for n in expected)
    assert erasure.cost.parameters_changed == sum(originals[n].numel() for n in expected)

    # a UNet's attn2.to_k/to_v read the CLIP sequence itself: every position of every prompt
    concepts, targets, preserve = concept_pairs(cfg)
    assert concepts == ["a photo of cat", "cat"] and targets == ["a photo of dog", "dog"]

    def embeds(prompts: list[str]) -> torch.Tensor:
        e = arch.encode_prompts(pipe, prompts, 16)["prompt_embeds"]
        return e.reshape(-1, e.shape[-1])

    c, g, p = embeds(concepts), embeds(targets), embeds(preserve)
    for name in sorted(expected):
        residual = _normal_equations_residual(originals[name], erasure.weights[name], c, g, p, cfg)
        assert residual < 1e-5, (name, residual)
        # and it is an edit, not the original
        assert _normal_equations_residual(originals[name], originals[name], c, g, p, cfg) > 1e-3


def test_the_flux_edit_solves_them_on_the_context_and_pooled_projections(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    cfg = _config()
    arch, transformer = denoiser_of(pipe)
    originals = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    erasure = _fit(pipe, cfg, tmp_path)
    assert set(erasure.weights) == {"context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"}
    concepts, targets, preserve = concept_pairs(cfg)

    def encoded(prompts: list[str], key: str) -> torch.Tensor:
        e = arch.encode_prompts(pipe, prompts, 16)[key]
        return e.reshape(-1, e.shape[-1])

    for name, key in (
        ("context_embedder.weight", "prompt_embeds"),  # the T5 sequence
        ("time_text_embed.text_embedder.linear_1.weight", "pooled_prompt_embeds"),  # pooled CLIP
    ):
        c, g, p = encoded(concepts, key), encoded(targets, key), encoded(preserve, key)
        assert _normal_equations_residual(originals[name], erasure.weights[name], c, g, p, cfg) < 1e-5, name

    # the saved artefact gives the same weights back
    loaded = load_erasure(tmp_path / "uce")
    assert isinstance(loaded, UCEErasure)
    assert all(torch.equal(loaded.weights[n], erasure.weights[n]) for n in erasure.weights)


def test_several_concepts_in_one_solve(tmp_path: Path) -> None:
    cfg = _config("uce.concepts=[bird]")
    concepts, targets, _ = concept_pairs(cfg)
    assert concepts == ["a photo of cat", "cat", "a photo of bird", "bird"]
    assert targets == ["a photo of dog", "dog", "a photo of dog", "dog"]
    pipe = build_tiny_sd_pipeline(seed=0)
    arch, unet = denoiser_of(pipe)
    name = next(n for n, _ in unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    original = unet.get_parameter(name).detach().clone()
    both = _fit(pipe, cfg, tmp_path)
    assert both.record["concepts"] == ["cat", "bird"]

    def embeds(prompts: list[str]) -> torch.Tensor:
        e = arch.encode_prompts(pipe, prompts, 16)["prompt_embeds"]
        return e.reshape(-1, e.shape[-1])

    _, _, preserve = concept_pairs(cfg)
    c, g, p = embeds(concepts), embeds(targets), embeds(preserve)
    assert _normal_equations_residual(original, both.weights[name], c, g, p, cfg) < 1e-5
    # templates left out: each concept alone is its prompt, the anchor its target
    bare = _config("uce.concepts=[bird, fish]", "concept.templates=[]", "concept.prompts=[cat]")
    assert concept_pairs(bare)[:2] == (["cat", "bird", "fish"], ["dog", "dog", "dog"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("uce.lam=-1", "uce.lam must be >= 0"),
        ("uce.erase_scale=-0.5", "uce.erase_scale and uce.preserve_scale must be >= 0"),
        ("uce.batch_size=0", "uce.batch_size must be >= 1"),
        ("uce.kinds=[keys]", "uce.kinds: unknown kind 'keys'"),
        ("uce.concepts=['  ']", "uce.concepts has an empty concept"),
    ],
)
def test_bad_settings_are_refused_before_loading_anything(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_method("uce").validate(_config(override))


def test_a_kind_the_family_lacks_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unet has no text-conditioning modules of kind context"):
        get_method("uce").fit(build_tiny_sd_pipeline(seed=0), _config("uce.kinds=[context]"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_cli_erases_and_merge_folds_a_uce_edit(
    tiny_flux_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import DiffusionPipeline

    from erasekit.cli import main

    erasure = tmp_path / "uce"
    sets = ["sampling.steps=2", "sampling.resolution=32", "sampling.max_sequence_length=16", "model.device=cpu"]
    argv = ["erase", "--method", "uce", "--model", tiny_flux_path, "--concept", "cat", "--anchor", "dog"]
    assert main([*argv, *(a for s in sets for a in ("--set", s)), "--output", str(erasure)]) == 0
    capsys.readouterr()
    pruned = tmp_path / "pruned"
    assert main(["fold", "--model", tiny_flux_path, "--erasure", str(erasure), "--output", str(pruned)]) == 2
    err = capsys.readouterr().err
    assert "a uce erasure edits weights and folds with --mode merge" in err and err.count("\n") == 1
    assert not pruned.exists()
    merged = tmp_path / "merged"
    args = ["fold", "--model", tiny_flux_path, "--erasure", str(erasure), "--mode", "merge", "--output", str(merged)]
    assert main(args) == 0
    stock = DiffusionPipeline.from_pretrained(merged)
    edited = load_erasure(erasure)
    assert isinstance(edited, UCEErasure)
    for name, value in edited.weights.items():
        assert torch.equal(stock.transformer.get_parameter(name), value)
