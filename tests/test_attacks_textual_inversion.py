"""The ``textual-inversion`` attack on a tiny FLUX pipeline: its budget and files, that it starts from its
initial word exactly, that learning lowers its objective, and its one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erasekit.arch import denoiser_of
from erasekit.arch.guidance import Conditional
from erasekit.attacks import Sampling, TextualInversion, TextualInversionConfig, run_attack
from erasekit.attacks.base import final_latents, row_distance
from erasekit.attacks.textual_inversion import LearnedWord, template_prompt
from erasekit.attacks.tokens import shared_vocabulary
from erasekit.errors import ConfigError
from test_attacks import ConstantJudge

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = Sampling(steps=2, resolution=32, guidance_scale=2.0, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe(tiny_flux_pipe):
    return tiny_flux_pipe


def _attack(pipe, **kwargs):
    arguments = dict(erasure=None, concept="a cat", judge=ConstantJudge(False), seeds=[3, 4], sampling=SAMPLING)
    arguments.update(kwargs)
    return run_attack(pipe, "textual-inversion", **arguments)


def test_it_runs_within_budget_writes_the_token_and_is_deterministic(pipe, tmp_path: Path):
    config = {"images": 2, "init_word": "picture"}
    result = _attack(pipe, budget=3, config=config, output=tmp_path / "run")
    # the concept images, then one denoiser call per optimiser step, then the pre- and post-attack images
    assert result.denoiser_calls == SAMPLING.steps + 3 + 2 * SAMPLING.steps
    assert result.kind == "continuous" and result.prompts is None
    assert result.search is not None and result.search["image_seeds"] == [900_000, 900_001]
    folder = tmp_path / "run"
    assert sorted(p.name for p in folder.iterdir()) == [
        "embeddings.safetensors",
        "images",
        "pre_images",
        "results.jsonl",
        "summary.json",
    ]
    tokens = load_file(str(folder / "embeddings.safetensors"))
    widths = {
        name: encoder.get_input_embeddings().weight.shape[1]
        for name, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2))
    }
    assert {k: tuple(v.shape) for k, v in tokens.items()} == {f"token.{k}": (1, w) for k, w in widths.items()}
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["attack"] == "textual-inversion" and summary["budget"] == 3
    assert summary["config"]["template"] == "a {}" and summary["config"]["images"] == 2

    again = _attack(pipe, budget=3, config=config)
    assert [i.tobytes() for i in again.images] == [i.tobytes() for i in result.images]
    for name, table in again.embeddings.items():
        torch.testing.assert_close(table, tokens[name], rtol=0, atol=0)


def test_the_token_starts_as_its_initial_word(pipe):
    # with a vanishing step size the token is still the word: the images are the template's with that word
    result = _attack(pipe, budget=1, config={"images": 1, "init_word": "picture", "lr": 1e-20})
    arch, _ = denoiser_of(pipe)
    encoded = arch.encode_prompts(pipe, ["a picture"] * 2, SAMPLING.max_sequence_length)
    latents, trajectory = final_latents(arch, pipe, encoded, [3, 4], SAMPLING)
    from erasekit.attacks.base import decode_images

    expected = decode_images(trajectory, latents)
    assert [i.tobytes() for i in result.images] == [i.tobytes() for i in expected]


def test_several_target_prompts_are_taken_in_turn(pipe):
    from erasekit.attacks.base import draw_images

    config = {"images": 2, "init_word": "picture", "target_prompt": ["a red cat", "a blue cat"]}
    result = _attack(pipe, budget=2, config=config)
    # before the attack, the seeds take the target prompts in turn
    arch, _ = denoiser_of(pipe)
    encoded = arch.encode_prompts(pipe, ["a red cat", "a blue cat"], SAMPLING.max_sequence_length)
    expected = draw_images(arch, pipe, encoded, [3, 4], SAMPLING)
    assert [i.tobytes() for i in result.pre_images] == [i.tobytes() for i in expected]
    # a list of one prompt is that prompt; the second prompt's images change what is learned
    one = _attack(pipe, budget=2, config={**config, "target_prompt": ["a red cat"]})
    plain = _attack(pipe, budget=2, config={**config, "target_prompt": "a red cat"})
    for name, table in one.embeddings.items():
        torch.testing.assert_close(table, plain.embeddings[name], rtol=0, atol=0)
        assert not torch.equal(table, result.embeddings[name])


def test_the_step_size_is_in_each_encoders_own_embedding_scale(pipe):
    arch, _ = denoiser_of(pipe)
    vocabulary = shared_vocabulary(arch, pipe)
    slot = LearnedWord(arch, pipe, template_prompt("a {}"), vocabulary, vocabulary.words.index("picture"), 16)
    seeds = [900_000]
    with torch.no_grad():
        encoded = arch.encode_prompts(pipe, ["a photo of a cat"], SAMPLING.max_sequence_length)
        x0, _ = final_latents(arch, pipe, encoded, seeds, SAMPLING)
    learned, _ = TextualInversion()._learn(slot, x0, seeds, 1, SAMPLING, TextualInversionConfig(lr=0.1))
    start = slot.start()
    for name, (_, encoder) in arch.text_encoders(pipe).items():
        # Adam's first step moves every coordinate by the step size (sign of the gradient): here 0.1 of
        # the encoder's embedding-table spread, whatever that spread is
        moved = (learned[name] - start[name]).abs().max()
        torch.testing.assert_close(moved, 0.1 * encoder.get_input_embeddings().weight.std(), rtol=1e-3, atol=0)


def test_learning_lowers_the_denoising_loss_on_the_concept_images(pipe):
    arch, _ = denoiser_of(pipe)
    vocabulary = shared_vocabulary(arch, pipe)
    word = vocabulary.words.index("picture")
    prompt = template_prompt("a {}")
    seeds = [900_000, 900_001]
    with torch.no_grad():
        wanted = arch.encode_prompts(pipe, ["a photo of a cat"] * 2, SAMPLING.max_sequence_length)
        x0, _ = final_latents(arch, pipe, wanted, seeds, SAMPLING)
    # lr in units of each encoder's embedding spread: the tiny model's CLIP table is narrow
    config = TextualInversionConfig(lr=0.2)
    attack = TextualInversion()
    slot = LearnedWord(arch, pipe, prompt, vocabulary, word, SAMPLING.max_sequence_length)
    learned, losses = attack._learn(slot, x0, seeds, 40, SAMPLING, config)
    start = slot.start()

    def objective(tokens) -> float:
        # every sampling step, one fixed noise draw: the loss the search lowers, without its sampling noise
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            encoded = slot.encode(tokens, 2)
            trajectory = arch.trajectory(pipe, encoded, seeds, **SAMPLING.as_kwargs())
            total = 0.0
            for step in range(trajectory.num_steps):
                noise = torch.randn(x0.shape, generator=generator)
                prediction = trajectory.predict(trajectory.add_noise(x0, noise, step), step, Conditional())
                total += float(row_distance(prediction, trajectory.schedule.target(x0, noise, step)).mean())
        return total

    assert len(losses) == 40
    # the tiny random model reads little of its text, so the gain is small, but it is real: 4.80 -> 4.73
    assert objective(learned) < 0.99 * objective(start)
    assert any(not torch.equal(learned[name], start[name]) for name in start)


@pytest.mark.parametrize(
    ("config", "seeds", "message"),
    [
        ({"template": "a picture"}, [0], "must hold one {}"),
        ({"template": "a {} of {}"}, [0], "must hold one {}"),
        ({"init_word": "cats"}, [0], "names the concept"),
        ({"template": "a cat {}"}, [0], "names the concept"),
        ({"init_word": "photo of"}, [0], "not one token"),
        ({"images": 0}, [0], "images must be a positive integer"),
        ({"lr": 0}, [0], "lr must be positive"),
        ({"image_seed": 10, "images": 3}, [11], "include judged seed"),
        ({"stop_on_success": True}, [0], "stop_on_success"),
        ({"target_prompt": []}, [0], "non-empty list of prompts"),
        ({"target_prompt": ["a cat", 3]}, [0], "non-empty list of prompts"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(pipe, tmp_path: Path, config, seeds, message):
    with pytest.raises(ConfigError, match=message) as info:
        _attack(pipe, concept="cat", seeds=seeds, budget=1, config=config, output=tmp_path / "run")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
