"""EAP wired on a real tiny pipeline: its loss is the kernels' formulas on the model's own predictions (x̂0
space, the frozen original's target), the adversary moves to the candidate the edit changes most, the
candidates sit in the sampled prompt's context, and a seed gives the same erasure (also across a resume)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from erasekit.arch import architecture_for
from erasekit.arch.guidance import Conditional
from erasekit.config import EraseConfig, load_config
from erasekit.errors import ConfigError
from erasekit.methods import get_method
from erasekit.methods.eap import (
    EapErasure,
    EapTrainer,
    gumbel_softmax,
    preservation_loss,
    x0_from_velocity,
)
from erasekit.methods.eap.method import candidate_prompt, concept_span, mix_encodings
from erasekit.methods.esd import esd_loss, esd_target
from erasekit.tiny import build_tiny_flux_pipeline
from erasekit.training.run import make_accelerator
from tiny_settings import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerator_state")

SHARED = [
    "method=eap",
    *tiny_overrides(),
    "concept.templates=['a photo of {concept}', 'a {concept} on a sofa']",
    "eap.variant=esd-x",
    "eap.eta=1.5",
    "eap.start_guidance=2.0",
    "eap.candidates=[tree, car, horse, house, cat]",
]


def _config(*extra: str) -> EraseConfig:
    return load_config(None, [*SHARED, *extra])


def _trainer(pipe: Any, config: EraseConfig, path: Path) -> EapTrainer:
    return EapTrainer(pipe, config, path / "out", make_accelerator(config, path))


def _sigma(trainer: EapTrainer, step: int) -> float:
    encoded = trainer.encode([trainer.prompts.concept[0]])
    s = trainer.config.sampling
    trajectory = trainer.arch.trajectory(
        trainer.pipe, encoded, [0], steps=s.steps, resolution=s.resolution, guidance_scale=1.0
    )
    assert trajectory.schedule is not None and trajectory.schedule.prediction_type == "flow"
    return trajectory.schedule.sigmas[step]


def _prediction(trainer: EapTrainer, prompt: str, z: torch.Tensor, step: int, role: str = "cond") -> torch.Tensor:
    """``role``'s prediction for ``prompt`` at ``z``, encoded on its own (not through the trainer's candidates)."""
    arch, s = architecture_for(trainer.pipe), trainer.config.sampling
    encoded = arch.encode_prompts(trainer.pipe, [prompt], s.max_sequence_length)
    trajectory = arch.trajectory(trainer.pipe, encoded, [0], steps=s.steps, resolution=s.resolution, guidance_scale=2.0)
    assert trajectory.predict is not None
    with torch.no_grad():
        return trajectory.predict(z, step, Conditional(role))


def test_candidates_take_the_sampled_prompts_context_and_leave_out_the_concepts_words(tmp_path: Path) -> None:
    assert concept_span("a blue disc on gray", "a blue square on gray") == ["disc"]
    assert concept_span("a red cross", "an orange cross") == ["a", "red"]
    assert concept_span("a photo of a cat", "a photo of") == ["a", "cat"]
    # the target's own text around the candidate is kept (punctuation, case); an empty anchor: inserted
    assert candidate_prompt("green circle, flat, Gray", "green square, flat, Gray", "star") == "green star, flat, Gray"
    assert candidate_prompt("a red cross", "an orange cross", "blue") == "blue cross"
    assert candidate_prompt("a photo of a cat", "a photo of", "tree") == "a photo of tree"
    assert candidate_prompt("cat on a mat", "on a mat", "dog") == "dog on a mat"
    trainer = _trainer(build_tiny_flux_pipeline(seed=0), _config(), tmp_path)
    assert trainer.words == ["tree", "car", "horse", "house"]  # "cat" is the concept
    assert len(trainer.candidates) == len(trainer.prompts.concept) == 2
    # row 1's candidates are "a tree on a sofa", ...: each row of the stack is that prompt's own encoding
    own = trainer.encode(["a horse on a sofa"])
    for key, stacked in trainer.candidates[1].items():
        assert torch.equal(stacked[2:3], own[key])
    # a one-hot mixture is exactly that candidate's encoding; a soft one the weighted sum of the sequences
    one_hot = mix_encodings(trainer.candidates[1], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert all(torch.equal(one_hot[key], own[key]) for key in own if not key.startswith("negative_"))
    half = mix_encodings(trainer.candidates[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    stacked = trainer.candidates[0]["prompt_embeds"]
    torch.testing.assert_close(half["prompt_embeds"][0], 0.5 * (stacked[0] + stacked[1]))


def test_the_vocabulary_search_gives_whole_words_near_the_concept(tmp_path: Path) -> None:
    config = _config("eap.candidates=[]", "eap.nearest=60", "eap.centres=5")
    trainer = _trainer(build_tiny_flux_pipeline(seed=0), config, tmp_path)
    tokenizer = trainer.pipe.tokenizer
    assert len(trainer.words) == 5 and "cat" not in trainer.words
    assert all(w.isalpha() and len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in trainer.words)
    with pytest.raises(ConfigError, match="eap.nearest must be at most"):
        _trainer(trainer.pipe, _config("eap.candidates=[]", "eap.nearest=1000000", "eap.centres=5"), tmp_path)


def test_eap_loss_is_the_kernels_esd_and_preservation_in_x0_space(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    # no ascent steps and one-hot draws: the preserved candidate is the draw of the untouched logits
    config = _config("eap.adversary_steps=0", "eap.hard=true", "eap.preservation_weight=3.0")
    trainer = _trainer(pipe, config, tmp_path)
    sample = 5
    esd = trainer.esd_sample(sample)
    z, step, row = esd.z, esd.step, trainer.concept_row(sample)
    sigma = _sigma(trainer, step)
    prompt = trainer.prompts.concept[row]
    concept, neutral = _prediction(trainer, prompt, z, step), _prediction(trainer, prompt, z, step, "uncond")
    assert not torch.equal(concept, neutral)
    target = esd_target(neutral, concept, 1.5)

    # the frozen model: preservation is zero, the loss ESD's in x0 = z - sigma v
    loss, parts = trainer.loss(sample)
    expected = esd_loss(x0_from_velocity(z, concept, sigma), x0_from_velocity(z, target, sigma))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-8)
    assert parts["preservation"] == 0.0

    # a changed model: ESD's term moves, and the preservation term compares the drawn candidate's x0
    generator = torch.Generator().manual_seed(trainer.noise_seed(sample, 2))
    drawn = int(gumbel_softmax(torch.zeros(len(trainer.words)), hard=True, generator=generator).argmax())
    candidate = candidate_prompt(prompt, trainer.prompts.target[row], trainer.words[drawn])
    with torch.no_grad(), trainer.original_weights():
        frozen_candidate = _prediction(trainer, candidate, z, step)
    with torch.no_grad():
        for p in trainer.params.values():
            p.add_(0.05 * torch.randn_like(p))
    moved, moved_candidate = _prediction(trainer, prompt, z, step), _prediction(trainer, candidate, z, step)
    erase = esd_loss(x0_from_velocity(z, moved, sigma), x0_from_velocity(z, target, sigma))
    preserve = preservation_loss(
        x0_from_velocity(z, moved_candidate, sigma), x0_from_velocity(z, frozen_candidate, sigma)
    )
    assert preserve > 0
    loss, parts = trainer.loss(sample)
    torch.testing.assert_close(loss, erase + 3.0 * preserve, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(torch.tensor(parts["preservation"]), preserve, rtol=1e-5, atol=1e-9)


def test_the_adversary_moves_to_the_planted_most_affected_candidate(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    trainer = _trainer(pipe, _config("eap.adversary_steps=3", "eap.adversary_lr=0.1"), tmp_path)
    planted = 2
    # an edit of the context embedder along one direction d of the text embeddings, and candidates of which
    # only the planted one has a component along d: the edit changes its prediction and no other's
    generator = torch.Generator().manual_seed(0)
    weight = pipe.transformer.context_embedder.weight
    d = torch.randn(weight.shape[1], generator=generator)
    d /= d.norm()
    for stack in trainer.candidates:
        embeds = stack["prompt_embeds"]
        embeds -= (embeds @ d).unsqueeze(-1) * d
        embeds[planted] += 3.0 * d
    with torch.no_grad():
        weight.add_(0.5 * torch.randn(weight.shape[0], 1, generator=generator) * d)
    for sample in range(4):
        trainer.loss(sample)
    weights = trainer.adversary_weights()
    assert int(weights.argmax()) == planted and weights[planted] > 0.5
    record = trainer.training_record()
    assert record["eap_adversary"][0][0] == trainer.words[planted]
    trainer._restore_pipeline()


def test_a_seed_gives_the_same_erasure_also_across_a_resume(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    config = _config("train.iterations=4", "train.checkpoint_every=2", "eap.lr=1e-3", "eap.adversary_lr=0.1")
    method = get_method("eap")
    first = method.fit(pipe, config, tmp_path / "a", accelerator=make_accelerator(config, tmp_path / "l1"))
    again = method.fit(pipe, config, tmp_path / "b", accelerator=make_accelerator(config, tmp_path / "l2"))
    assert isinstance(first, EapErasure) and first.weights
    assert all(torch.equal(again.weights[name], value) for name, value in first.weights.items())
    assert first.record["training"]["eap_adversary"] == again.record["training"]["eap_adversary"]
    # the adversary moved, and its state is in the checkpoints: a resumed run ends where the whole one does
    assert len({p for _, p in first.record["training"]["eap_adversary"]}) > 1
    method.fit(pipe, config, tmp_path / "c", accelerator=make_accelerator(config, tmp_path / "l3"), stop_after=2)
    resumed = method.fit(
        pipe, config, tmp_path / "c", accelerator=make_accelerator(config, tmp_path / "l4"), resume=True
    )
    for name, value in first.weights.items():
        torch.testing.assert_close(resumed.weights[name], value, rtol=0, atol=1e-6)
    assert resumed.record["training"]["eap_adversary"] == first.record["training"]["eap_adversary"]
    other = load_config(None, [*SHARED, "train.iterations=4", "eap.lr=1e-3", "train.seed=1"])
    third = method.fit(pipe, other, tmp_path / "d", accelerator=make_accelerator(other, tmp_path / "l5"))
    assert any(not torch.equal(third.weights[name], value) for name, value in first.weights.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eap.variant=xattn"], "eap.variant"),
        (["eap.lr=0"], "eap.lr must be positive"),
        (["eap.adversary_lr=0"], "eap.adversary_lr must be positive"),
        (["eap.preservation_weight=-1"], "eap.preservation_weight must not be negative"),
        (["eap.temperature=0"], "eap.temperature must be positive"),
        (["eap.centres=20", "eap.nearest=10"], "eap.centres must be at least 1 and at most eap.nearest"),
    ],
)
def test_bad_eap_settings_are_refused_before_loading_weights(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config = load_config(None, ["method=eap", "concept.concept=cat", *overrides])
        get_method("eap").validate(config)


def test_eap_refuses_class_conditioned_dit() -> None:
    from erasekit.errors import UnsupportedError
    from erasekit.tiny import build_tiny_dit_pipeline

    with pytest.raises(UnsupportedError, match="does not support the dit family"):
        get_method("eap").check_family(architecture_for(build_tiny_dit_pipeline(seed=0)))
