"""Ring-a-Bell (erasekit.attacks.ring_a_bell): the concept vector on a stub encoder with known outputs, the
genetic search on a toy fitness, and both attacks on the tiny FLUX pipeline (budget, files, determinism,
the prompts read back by ``evaluate --prompts``, bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erasekit.arch import denoiser_of
from erasekit.attacks import Sampling, concept_vector, genetic_search, get_attack, run_attack
from erasekit.attacks.base import count_denoiser_calls
from erasekit.attacks.ring_a_bell import load_pairs, squared_distance
from erasekit.errors import ConfigError, PromptError
from erasekit.evaluation.prompts import load_prompt_set

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = Sampling(steps=2, resolution=32, guidance_scale=0.0, max_sequence_length=16)
PAIRS = [["a photo of a cat", "a photo of a dog"], ["a cat on a mat", "a dog on a mat"]]
#: a short search: 3 generations of 8 prompts
SEARCH = {"pairs": PAIRS, "population": 8, "length": 4}
BOTH = ("prompt_embeds", "pooled_prompt_embeds")


@pytest.fixture(scope="module")
def pipe(tiny_flux_pipe):
    return tiny_flux_pipe


class CountingJudge:
    """Says the concept is there in every other image; counts the images it saw."""

    name = "alternate"
    threshold = None

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return [i % 2 == 0 for i in range(len(images))]


# --------------------------------------------------------------------------- the concept vector
def test_concept_vector_is_the_mean_difference_of_a_stub_encoders_outputs():
    outputs = {
        "with a": ([[1.0, 2.0], [3.0, 4.0]], [10.0]),
        "without a": ([[0.0, 0.0], [1.0, 1.0]], [4.0]),
        "with b": ([[5.0, 0.0], [0.0, 5.0]], [1.0]),
        "without b": ([[1.0, 2.0], [3.0, 4.0]], [7.0]),
        "with c": ([[2.0, 2.0], [2.0, 2.0]], [0.0]),
        "without c": ([[2.0, 2.0], [2.0, 0.0]], [3.0]),
    }
    calls = []

    def encode(prompts):
        calls.append(len(prompts))
        return {
            "prompt_embeds": torch.tensor([outputs[p][0] for p in prompts]),
            "pooled_prompt_embeds": torch.tensor([outputs[p][1] for p in prompts]),
            "text_ids": torch.zeros(len(prompts), 2, 3),  # not a text-encoder output: no vector
        }

    pairs = [("with a", "without a"), ("with b", "without b"), ("with c", "without c")]
    # differences: [[1,2],[2,3]] + [[4,-2],[-3,1]] + [[0,0],[0,2]] = [[5,0],[-1,6]]; pooled 6 - 6 - 3 = -3
    expected = {
        "prompt_embeds": torch.tensor([[5.0, 0.0], [-1.0, 6.0]]) / 3,
        "pooled_prompt_embeds": torch.tensor([-1.0]),
    }
    vector = concept_vector(encode, pairs, batch_size=2)
    assert set(vector) == set(expected) and calls == [2, 2, 1, 1]
    for key, value in expected.items():
        assert torch.allclose(vector[key], value, atol=1e-7)
    one_by_one = concept_vector(encode, pairs, batch_size=1)
    assert all(torch.equal(one_by_one[k], vector[k]) for k in vector)
    distance = squared_distance({k: v.unsqueeze(0) + 1.0 for k, v in vector.items()}, vector)
    assert distance.tolist() == [pytest.approx(5.0, rel=1e-6)]  # 4 sequence entries and 1 pooled entry, each off by 1


def test_pairs_come_from_a_csv_file_or_a_list_and_bad_pairs_are_refused(tmp_path: Path):
    good = tmp_path / "pairs.csv"
    good.write_text('with_concept,without_concept\na cat,a dog\n"a cat, sitting","a dog, sitting"\n', encoding="utf-8")
    assert load_pairs(str(good)) == [("a cat", "a dog"), ("a cat, sitting", "a dog, sitting")]
    assert load_pairs(PAIRS) == [tuple(p) for p in PAIRS]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,neutral\na cat,a dog\n", encoding="utf-8")
    for pairs, message in [
        (None, "needs prompt pairs"),
        (str(tmp_path / "missing.csv"), "cannot read the pairs file"),
        (str(bad), "has no column with_concept, without_concept"),
        ([["a cat"]], "two non-empty prompts"),
        ([["a cat", " "]], "two non-empty prompts"),
        ([], "no concept pairs"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            load_pairs(pairs)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- the genetic search
def _toy_search(**overrides):
    """Find the ids 1..6 (as text) among ids 0..9: the fitness is the number of positions that differ."""
    goal = "1 2 3 4 5 6"

    def fitness(texts):
        return [sum(a != b for a, b in zip(t.split(), goal.split())) for t in texts]

    settings = dict(
        length=6,
        generations=40,
        population=20,
        elites=10,
        crossover_rate=0.5,
        mutation_rate=0.25,
        seed=3,
    )
    settings.update(overrides)
    return genetic_search(fitness, lambda ids: " ".join(map(str, ids)), range(10), **settings)


def test_genetic_search_improves_keeps_its_best_and_is_deterministic():
    found = _toy_search()
    assert found.generations == 40 == len(found.best_per_generation)
    history = found.best_per_generation
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert found.fitness < history[0] and found.fitness <= 1
    assert found.text == " ".join(map(str, found.ids)) and len(found.ids) == 6
    assert _toy_search() == found
    assert _toy_search(seed=4).best_per_generation != history


def test_genetic_search_counts_its_evaluations_and_respects_what_is_banned():
    # no crossover and no mutation: after the first generation the population is the elites, unchanged
    frozen = _toy_search(crossover_rate=0.0, mutation_rate=0.0, generations=5)
    assert frozen.evaluations == 20 + 4 * 10
    assert frozen.best_per_generation == [frozen.fitness] * 5
    found = _toy_search(allowed=lambda text: "4" not in text.split())
    assert "4" not in found.text.split() and found.fitness >= 1


def test_word_tokens_keeps_whole_alphabetic_words_only(pipe):
    from erasekit.attacks.ring_a_bell import word_tokens

    tokenizer = pipe.tokenizer  # the real CLIP vocabulary
    tokens = ["cat</w>", "ca", "!</w>", "\u00c0</w>", "dog</w>", "4</w>"]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert len(set(ids)) == len(tokens) and tokenizer.unk_token_id not in ids
    assert word_tokens(tokenizer, ids) == [ids[0], ids[4]]


# --------------------------------------------------------------------------- ring-a-bell on the tiny pipeline
def test_ring_a_bell_runs_within_budget_writes_prompts_and_is_deterministic(
    pipe, tiny_flux_path: str, tmp_path: Path, capsys
):
    judge = CountingJudge()
    with count_denoiser_calls(pipe) as outside:
        result = run_attack(
            pipe,
            "ring-a-bell",
            erasure=None,
            concept="cat",
            judge=judge,
            seeds=[3, 4],
            sampling=SAMPLING,
            budget=3,
            output=tmp_path / "run",
            config={**SEARCH, "start_prompt": "a photo"},
        )
    # black-box: the search never runs the denoiser; pre-attack, start and found prompt: one pass each
    assert result.denoiser_calls == outside.calls == 3 * SAMPLING.steps
    assert judge.seen == 3 * 2
    assert result.search["generations"] == 3 and result.budget_used == 3 == result.budget
    assert 8 <= result.search["fitness_evaluations"] <= 8 + 2 * 16  # the population varies with the crossovers
    assert result.search["best_distance"] < result.search["best_distance_per_generation"][0] or (
        result.search["best_distance_per_generation"] == [result.search["best_distance"]] * 3
    )
    prompt = result.prompts[0]
    assert result.prompts == [prompt, prompt] and prompt.strip() and "cat" not in prompt.lower().split()
    # the loss is the found prompt's distance to the target, the search's best
    assert result.per_seed[0].loss == pytest.approx(result.search["best_distance"], rel=1e-5)

    folder = tmp_path / "run"
    assert sorted(p.name for p in folder.iterdir()) == [
        "images",
        "pre_images",
        "prompts.csv",
        "results.jsonl",
        "summary.json",
    ]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["attack"] == "ring-a-bell" and summary["kind"] == "discrete" and summary["budget"] == 3
    assert summary["config"]["pairs"]["count"] == 2 and summary["config"]["pairs"]["source"] == "given"
    assert summary["search"]["generations"] == 3 and summary["sampling"]["scheduler"] == "pipeline"
    assert summary["pre_attack_rate"] == 0.5 and summary["start_rate"] == 0.5

    # the same search finds the same prompt; another search seed another one
    again = run_attack(
        pipe, "ring-a-bell", erasure=None, concept="cat", judge=CountingJudge(), seeds=[3, 4], sampling=SAMPLING,
        budget=3, config={**SEARCH, "start_prompt": "a photo"},
    )  # fmt: skip
    assert again.prompts == result.prompts and again.search == result.search
    assert [i.tobytes() for i in again.images] == [i.tobytes() for i in result.images]

    # `evaluate --prompts` reads the prompts (with their seeds) and draws them
    loaded = load_prompt_set(str(folder / "prompts.csv"))
    assert [(item.prompt, item.seed) for item in loaded.items] == [(prompt, 3), (prompt, 4)]
    from erasekit.cli import main as cli

    prompts = str(folder / "prompts.csv")
    code = cli(["evaluate", "--model", tiny_flux_path, "--prompts", prompts, "--steps", "2", "--resolution", "32",
                "--max-sequence-length", "16", "--device", "cpu", "--output", str(tmp_path / "eval")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "eval" / "images").rglob("*.png"))) == 2


def test_ring_a_bell_embedding_feeds_the_target_and_writes_it(pipe, tmp_path: Path):
    strength = 2.5
    settings = {"pairs": PAIRS, "start_prompt": "a photo", "strength": strength, "outputs": list(BOTH)}
    result = run_attack(
        pipe,
        "ring-a-bell-embedding",
        erasure=None,
        concept="cat",
        judge=CountingJudge(),
        seeds=[5, 6],
        sampling=SAMPLING,
        output=tmp_path / "run",
        config=settings,
    )
    assert result.budget == 1 and result.prompts is None and result.denoiser_calls == 3 * SAMPLING.steps
    arch, _ = denoiser_of(pipe)

    def encode(prompts):
        return arch.encode_prompts(pipe, prompts, SAMPLING.max_sequence_length)

    vector = concept_vector(encode, [tuple(p) for p in PAIRS])
    start = encode(["a photo"])
    saved = load_file(tmp_path / "run" / "embeddings.safetensors")
    assert set(saved) == set(BOTH) == set(vector)
    for key, v in vector.items():
        expected = start[key][0] + strength * v
        assert saved[key].shape == (2, *expected.shape)
        assert torch.allclose(saved[key][1], expected, atol=1e-5)
    assert all(r.loss == pytest.approx(0.0, abs=1e-6) for r in result.per_seed)  # the target itself
    assert result.search["start_distance"] == pytest.approx(
        strength**2 * sum(float(v.double().pow(2).sum()) for v in vector.values()), rel=1e-4
    )
    # strength 0 is the start prompt; by default FLUX's vector is CLIP-L's, the pooled embedding
    plain = run_attack(
        pipe, "ring-a-bell-embedding", erasure=None, concept="cat", judge=CountingJudge(), seeds=[5],
        sampling=SAMPLING, config={"pairs": PAIRS, "start_prompt": "a photo", "strength": 0.0},
    )  # fmt: skip
    assert set(plain.embeddings) == {"pooled_prompt_embeds"}
    assert torch.equal(plain.embeddings["pooled_prompt_embeds"][0], start["pooled_prompt_embeds"][0])
    again = run_attack(
        pipe, "ring-a-bell-embedding", erasure=None, concept="cat", judge=CountingJudge(), seeds=[5],
        sampling=SAMPLING, config=settings,
    )  # fmt: skip
    assert again.images[0].tobytes() == result.images[0].tobytes() != plain.images[0].tobytes()
    assert get_attack("ring-a-bell-embedding").kind == "continuous"


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("ring-a-bell", {"budget": 0}, ConfigError, "positive integer"),
        ("ring-a-bell-embedding", {"budget": 2}, ConfigError, "its budget is 1"),
        ("ring-a-bell", {"config": {}}, ConfigError, "needs prompt pairs"),
        ("ring-a-bell", {"config": {**SEARCH, "start_prompt": "a Cat photo"}}, ConfigError, "names the concept"),
        ("ring-a-bell", {"config": {**SEARCH, "stop_on_success": True}}, ConfigError, "leave stop_on_success off"),
        ("ring-a-bell", {"config": {**SEARCH, "population": 1}}, ConfigError, "population must be at least 2"),
        ("ring-a-bell", {"config": {**SEARCH, "mutation_rate": 2.0}}, ConfigError, "between 0 and 1"),
        ("ring-a-bell", {"config": {**SEARCH, "length": 1}}, ConfigError, "at least 2"),
        ("ring-a-bell", {"config": {**SEARCH, "outputs": ["text_ids"]}}, ConfigError, "not text-encoder outputs"),
        ("ring-a-bell-embedding", {"config": {"pairs": PAIRS, "population": 8}}, ConfigError, "unknown setting"),
        ("ring-a-bell", {"concept": ""}, PromptError, "concept is empty"),
        ("ring-a-bell", {"sampling": Sampling(steps=2, resolution=32, scheduler="nope")}, ConfigError, "scheduler"),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(pipe, tmp_path: Path, name, kwargs, error, message):
    judge = CountingJudge()
    arguments = dict(
        erasure=None, concept="cat", judge=judge, seeds=[0], sampling=SAMPLING, budget=1, config=SEARCH,
        output=tmp_path / "run",
    )  # fmt: skip
    if name == "ring-a-bell-embedding":
        arguments.pop("budget")
        arguments["config"] = {"pairs": PAIRS}
    arguments.update(kwargs)
    with pytest.raises(error, match=message) as info:
        run_attack(pipe, name, **arguments)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == [] and judge.seen == 0


def test_run_attack_samples_with_the_generation_steps_and_puts_the_scheduler_back(pipe):
    own = pipe.scheduler
    sampling = Sampling(steps=5, generation_steps=1, resolution=32, max_sequence_length=16, scheduler="flow-euler")
    seen = []

    class SchedulerJudge(CountingJudge):
        def __call__(self, images):
            seen.append((type(pipe.scheduler).__name__, pipe.scheduler is own))
            return super().__call__(images)

    result = run_attack(
        pipe, "ring-a-bell-embedding", erasure=None, concept="cat", judge=SchedulerJudge(), seeds=[0],
        sampling=sampling, config={"pairs": PAIRS, "start_prompt": "a photo"},
    )  # fmt: skip
    assert result.denoiser_calls == 3 * 1 and result.sampling["steps"] == 1
    assert seen == [("FlowMatchEulerDiscreteScheduler", False)] * 3 and pipe.scheduler is own


def test_the_attack_command_gives_ring_a_bell_the_worlds_pairs(tmp_path: Path, capsys):
    from erasekit.cli import main as cli

    out = tmp_path / "rab"
    args = ["attack", "--world", "shapes", "--concept", "circle", "--attack", "ring-a-bell", "--budget", "2"]
    assert cli([*args, "--set", "population=6", "--set", "words_only=true", "--seed", "100", "--output", str(out)]) == 0
    assert "before the attack" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["pairs"]["count"] == 1533  # 7 other objects for each of 219 template fillings
    assert summary["config"]["pairs"]["first"] == [
        "a red circle in flat style on a black background",
        "a red square in flat style on a black background",
    ]
    assert summary["search"]["generations"] == 2 and summary["judge"]["name"] == "shapes"
    header, row = (out / "prompts.csv").read_text().splitlines()
    prompt = row.rpartition(",")[0]
    assert header == "prompt,seed" and all(word.isalpha() for word in prompt.split()) and "circle" not in prompt
    bad = [*args[:6], "ring-a-bell", "--concept", "banana", "--output", str(tmp_path / "x")]
    assert cli(bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a ShapesCanvas concept" in err
    assert not (tmp_path / "x").exists()
