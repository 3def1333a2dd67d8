"""Text encoders with gradients (``Architecture.encode_token_embeddings``) and the token attacks
(``p4d``, ``unlearndiffatk``) on tiny pipelines: the encoding equals ``encode_prompts`` for one-hot
tokens, its gradient matches finite differences, the attacks respect their budget, write their
files, are deterministic, and their prompts are read back by the evaluation's prompt reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from erasekit.arch import DIT, denoiser_of
from erasekit.arch.base import TokenEmbeddings
from erasekit.arch.override import SamplingOverride, install_sampling_override
from erasekit.attacks import Sampling, get_attack, run_attack
from erasekit.attacks.tokens import SlotPrompt, encode_slots, prompts_of, shared_vocabulary
from erasekit.attacks.unlearndiffatk import project_to_simplex
from erasekit.errors import ConfigError, UnsupportedError
from erasekit.evaluation.prompts import load_prompt_set
from erasekit.methods.sld import SLDErasure
from erasekit.tiny import build_tiny_sd_pipeline
from test_attacks import ConstantJudge

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = Sampling(steps=2, resolution=32, guidance_scale=2.0, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe(tiny_flux_pipe):
    return tiny_flux_pipe


@pytest.fixture(scope="module")
def sd_pipe():
    return build_tiny_sd_pipeline(seed=0)


# --------------------------------------------------------------------------- the encoding
def _one_hot_case(pipe, words: list[list[str]]):
    arch, _ = denoiser_of(pipe)
    vocabulary = shared_vocabulary(arch, pipe)
    prompt = SlotPrompt([None, "a red", None, "box"])
    tokens = torch.tensor([[vocabulary.words.index(w) for w in row] for row in words])
    embeddings = vocabulary.embed(F.one_hot(tokens, len(vocabulary)).float())
    return arch, vocabulary, prompt, tokens, embeddings


def _model(family: str, pipe, sd_pipe):
    from erasekit.tiny import build_tiny_pixart_pipeline, build_tiny_sd3_pipeline, build_tiny_sdxl_pipeline

    builders = {"sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline, "pixart": build_tiny_pixart_pipeline}
    return {"flux": pipe, "sd": sd_pipe}.get(family) or builders[family](seed=0)


@pytest.mark.parametrize("family", ["flux", "sd", "sdxl", "sd3", "pixart"])
def test_one_hot_tokens_encode_as_the_prompt_text_does(family, pipe, sd_pipe):
    model = _model(family, pipe, sd_pipe)
    arch, vocabulary, prompt, tokens, embeddings = _one_hot_case(model, [["cat", "dog"], ["house", "tree"]])
    encoded = encode_slots(arch, model, prompt, vocabulary, tokens, embeddings, 16)
    texts = prompts_of(prompt, vocabulary, tokens)
    assert texts == ["cat a red dog box", "house a red tree box"]
    plain = arch.encode_prompts(model, texts, 16)
    assert set(encoded) == set(plain)
    for key, value in plain.items():
        # the replaced rows are the very embedding rows the tokens look up; only the summation order differs
        torch.testing.assert_close(encoded[key], value, rtol=1e-5, atol=1e-5)
    assert encoded["prompt_embeds"].requires_grad
    # other slot embeddings change the encoding (the replacement is used)
    other = {k: v + 0.5 for k, v in embeddings.items()}
    moved = encode_slots(arch, model, prompt, vocabulary, tokens, other, 16)
    assert not torch.allclose(moved["prompt_embeds"], plain["prompt_embeds"])


def test_encode_prompts_is_the_pipelines_own_encoding(pipe):
    """``encode_prompts`` (now through ``encode_conditional``) returns the pipeline's tensors bit for bit."""
    arch, _ = denoiser_of(pipe)
    prompts = ["a cat", "a red box on a lake"]
    encoded = arch.encode_prompts(pipe, prompts, 16)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=16)
        negative, negative_pooled, _ = pipe.encode_prompt(prompt=[""], prompt_2=None, max_sequence_length=16)
    assert torch.equal(encoded["prompt_embeds"], embeds) and torch.equal(encoded["pooled_prompt_embeds"], pooled)
    assert torch.equal(encoded["negative_prompt_embeds"][1], negative[0])
    assert torch.equal(encoded["negative_pooled_prompt_embeds"][1], negative_pooled[0])
    assert not encoded["prompt_embeds"].requires_grad


@pytest.mark.parametrize("family", ["flux", "sd"])
def test_gradient_through_the_text_encoders_matches_finite_differences(family, pipe, sd_pipe):
    """d(a fixed linear read-out of every conditional output)/d(slot embeddings of every encoder), along
    a random direction, equals the central difference (float64)."""
    model = (pipe if family == "flux" else sd_pipe).to(torch.float64)
    try:
        arch, vocabulary, prompt, tokens, _ = _one_hot_case(model, [["cat", "dog"]])
        generator = torch.Generator().manual_seed(0)
        params = {name: table[tokens].clone().requires_grad_(True) for name, table in vocabulary.tables.items()}
        # a step of the embeddings' own scale in every coordinate
        direction = {
            name: torch.randn(p.shape, generator=generator, dtype=torch.float64) * float(vocabulary.tables[name].std())
            for name, p in params.items()
        }
        keys = ["prompt_embeds", "pooled_prompt_embeds"] if family == "flux" else ["prompt_embeds"]
        base = arch.encode_prompts(model, prompts_of(prompt, vocabulary, tokens), 16)
        readout = {k: torch.randn(base[k].shape, generator=generator, dtype=torch.float64) for k in keys}

        def objective(values: dict[str, torch.Tensor]) -> torch.Tensor:
            encoded = encode_slots(arch, model, prompt, vocabulary, tokens, values, 16)
            return sum((encoded[k] * readout[k]).sum() for k in keys)

        objective(params).backward()
        analytic = sum(float((p.grad * direction[name]).sum()) for name, p in params.items())
        # T5's layer norm takes its variance in float32 even in a float64 model: below h ~ 1e-3 that
        # rounding dominates the difference
        h = 3e-3

        def shifted(sign: float) -> float:
            with torch.no_grad():
                return float(objective({n: p + sign * h * direction[n] for n, p in params.items()}))

        numeric = (shifted(1.0) - shifted(-1.0)) / (2 * h)
        assert abs(analytic) > 1e-3
        assert analytic == pytest.approx(numeric, rel=1e-3)
    finally:
        model.to(torch.float32)


def test_replacement_is_applied_once_and_checked():
    arch = denoiser_of(build_tiny_sd_pipeline(seed=0))[0]
    with pytest.raises(UnsupportedError) as info:
        DIT.text_encoders(None)
    assert "\n" not in str(info.value) and "dit" in str(info.value)
    model = build_tiny_sd_pipeline(seed=0)
    values = torch.zeros(1, 1, model.text_encoder.config.hidden_size)
    with pytest.raises(ConfigError, match="no text encoder text_encoder_9"):
        arch.encode_token_embeddings(
            model, ["a cat"], 16, {"text_encoder_9": TokenEmbeddings(torch.tensor([1]), values)}
        )
    with pytest.raises(ConfigError, match="past the 77 tokens"):
        arch.encode_token_embeddings(
            model, ["a cat"], 16, {"text_encoder": TokenEmbeddings(torch.tensor([76]), values)}
        )


def test_the_vocabulary_leaves_out_the_concept_and_keeps_single_tokens(pipe):
    arch, _ = denoiser_of(pipe)
    vocabulary = shared_vocabulary(arch, pipe, exclude_concept="a cat")
    assert "cat" not in vocabulary.words and "cats" not in vocabulary.words and "dog" in vocabulary.words
    for name, (tokenizer, _) in arch.text_encoders(pipe).items():
        for word, token in list(zip(vocabulary.words, vocabulary.ids[name].tolist()))[::997]:
            assert tokenizer(word, add_special_tokens=False)["input_ids"] == [token]


def test_simplex_projection():
    weights = torch.tensor([[0.5, 0.5, 0.0], [2.0, 0.0, -1.0], [0.4, 0.3, 0.1], [-1.0, -1.0, -1.0]])
    projected = project_to_simplex(weights)
    torch.testing.assert_close(projected.sum(-1), torch.ones(4))
    assert bool((projected >= 0).all())
    torch.testing.assert_close(projected[0], weights[0])  # already on the simplex
    torch.testing.assert_close(projected[1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(projected[2], torch.tensor([0.4, 0.3, 0.1]) + 0.2 / 3)
    torch.testing.assert_close(projected[3], torch.full((3,), 1 / 3))


# --------------------------------------------------------------------------- the attacks
@pytest.mark.slow
@pytest.mark.parametrize(("name", "fixed_calls"), [("p4d", 6), ("unlearndiffatk", 5)])
def test_token_attack_runs_within_budget_writes_prompts_and_is_deterministic(pipe, tmp_path: Path, name, fixed_calls):
    judge = ConstantJudge(False)
    kwargs = dict(erasure=None, concept="a cat", judge=judge, seeds=[3, 4], sampling=SAMPLING, budget=3)
    config = {"num_tokens": 2, "init_prompt": "a picture"}
    result = run_attack(pipe, name, output=tmp_path / "run", config=config, **kwargs)
    # reference, (p4d: targets,) pre-attack, start and final images and the final objective: one pass
    # each; each iteration one denoiser call
    assert result.denoiser_calls == fixed_calls * SAMPLING.steps + 3
    assert [r.budget_used for r in result.per_seed] == [3, 3] and judge.seen == 3 * 2
    assert all(p.startswith("a picture ") if name == "p4d" else p.endswith(" a picture") for p in result.prompts)
    assert all(len(p.split()) == 4 for p in result.prompts)
    assert all("cat" not in p for p in result.prompts)

    folder = tmp_path / "run"
    assert sorted(p.name for p in folder.iterdir()) == [
        "images",
        "pre_images",
        "prompts.csv",
        "results.jsonl",
        "summary.json",
    ]
    loaded = load_prompt_set(str(folder / "prompts.csv"))
    assert [(item.prompt, item.seed) for item in loaded.items] == list(zip(result.prompts, [3, 4]))
    with (folder / "prompts.csv").open() as handle:
        assert [row["prompt"] for row in csv.DictReader(handle)] == result.prompts
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["attack"] == name and summary["kind"] == "discrete" and summary["budget"] == 3
    assert summary["config"]["vocabulary_size"] > 1000
    assert [json.loads(line)["prompt"] for line in (folder / "results.jsonl").open()] == result.prompts

    again = run_attack(pipe, name, config=config, **kwargs)
    assert again.prompts == result.prompts
    assert [r.loss for r in again.per_seed] == [r.loss for r in result.per_seed]
    assert [i.tobytes() for i in again.images] == [i.tobytes() for i in result.images]
    other = run_attack(pipe, name, config={**config, "seed": 1}, **kwargs)
    assert other.prompts != result.prompts


@pytest.mark.parametrize(("name", "passes_per_target"), [("p4d", 3), ("unlearndiffatk", 2)])
def test_several_target_prompts_are_taken_in_turn(pipe, name, passes_per_target):
    kwargs = dict(erasure=None, concept="a cat", judge=ConstantJudge(False), seeds=[3], sampling=SAMPLING, budget=2)
    config = {"num_tokens": 1, "init_prompt": "a picture"}
    both = run_attack(pipe, name, config={**config, "target_prompt": ["a red cat", "a blue cat"]}, **kwargs)
    # per target prompt: its reference trajectory, (p4d: its predictions,) and the final objective; then
    # the pre-attack, start and final images, and one denoiser call per iteration
    assert both.denoiser_calls == (2 * passes_per_target + 3) * SAMPLING.steps + 2
    one = run_attack(pipe, name, config={**config, "target_prompt": ["a red cat"]}, **kwargs)
    plain = run_attack(pipe, name, config={**config, "target_prompt": "a red cat"}, **kwargs)
    assert one.prompts == plain.prompts and [r.loss for r in one.per_seed] == [r.loss for r in plain.per_seed]
    assert one.denoiser_calls == (passes_per_target + 3) * SAMPLING.steps + 2
    # the objective is averaged over both targets
    assert [r.loss for r in both.per_seed] != [r.loss for r in one.per_seed]


def test_the_attack_command_runs_p4d_and_unlearndiffatk_on_the_embedded_world(tmp_path, capsys):
    from erasekit.cli import main as cli

    for name in ("p4d", "unlearndiffatk"):
        out = tmp_path / name
        args = ["attack", "--world", "shapes", "--concept", "circle", "--attack", name, "--budget", "2"]
        assert cli([*args, "--set", "target_prompt=a red circle", "--seed", "100", "--output", str(out)]) == 0
        assert "before the attack" in capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["attack"] == name and summary["seeds"] == [100] and summary["budget"] == 2
        assert summary["pre_attack_rate"] == 1.0 and summary["judge"]["name"] == "shapes"
        (prompt,) = [item.prompt for item in load_prompt_set(str(out / "prompts.csv")).items]
        assert "circle" not in prompt and "a shape" in prompt


# --------------------------------------------------------------------------- bad input
class _Override(SamplingOverride):
    name = "test override"

    def sample(self, pipe, prompts, seeds, **kwargs):
        raise AssertionError("never sampled")


class OverrideErasure:
    """An inference-time erasure: it installs a sampling override."""

    def apply(self, pipe):
        return install_sampling_override(pipe, _Override())


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("p4d", {"budget": 0}, "positive integer"),
        ("p4d", {"config": {"num_tokens": 0}}, "num_tokens"),
        ("unlearndiffatk", {"config": {"stop_on_success": True}}, "stop_on_success"),
        ("unlearndiffatk", {"config": {"init_prompt": "two cats"}}, "names the concept"),
        ("p4d", {"erasure": OverrideErasure()}, "changes how images are sampled"),
        ("completion", {"erasure": SLDErasure({"method": "sld"})}, "changes how images are sampled"),
        ("p4d", {"config": {"num_tokens": 40}}, "free tokens reach position"),
        ("unlearndiffatk", {"config": {"target_prompt": []}}, "non-empty list of prompts"),
        ("p4d", {"config": {"target_prompt": ["a cat", " "]}}, "non-empty list of prompts"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(pipe, tmp_path: Path, name, kwargs, message):
    arguments = dict(
        erasure=None, concept="cat", judge=ConstantJudge(False), seeds=[0], sampling=SAMPLING, output=tmp_path / "run"
    )
    arguments.update(kwargs)
    with pytest.raises(ConfigError, match=message) as info:
        run_attack(pipe, name, **arguments)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_attack_that_needs_the_original_model_refuses_a_folded_pipeline(pipe, tmp_path: Path):
    folded = tmp_path / "folded"
    folded.mkdir()
    (folded / "erasekit_fold.json").write_text("{}")
    previous = pipe.config["_name_or_path"]
    pipe.register_to_config(_name_or_path=str(folded))
    try:
        assert get_attack("p4d").needs_original
        with pytest.raises(ConfigError, match="needs the original model") as info:
            run_attack(
                pipe, "p4d", erasure=None, concept="cat", judge=ConstantJudge(False), seeds=[0], sampling=SAMPLING
            )
        assert "\n" not in str(info.value)
    finally:
        pipe.register_to_config(_name_or_path=previous)
