"""The attack framework (erasekit.attacks) on the tiny FLUX pipeline: registry, budgets, files,
determinism, the soft-prompt gradient against finite differences, and the pre-/post-attack accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from erasekit.arch import denoiser_of
from erasekit.arch.samplers import run_trajectory
from erasekit.attacks import (
    AttackResult,
    Sampling,
    SeedResult,
    attack_names,
    get_attack,
    run_attack,
    save_attack_result,
)
from erasekit.attacks.base import TargetPath, count_denoiser_calls
from erasekit.attacks.soft_prompt import soft_prompt_objective
from erasekit.errors import ConfigError, ErasekitError, PromptError
from erasekit.evaluation.prompts import load_prompt_set
from erasekit.methods.mask.model import MaskedModel

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = Sampling(steps=2, resolution=32, guidance_scale=0.0, max_sequence_length=16)


@pytest.fixture(scope="module")
def pipe(tiny_flux_pipe):
    return tiny_flux_pipe


class HalfNeuronsMask:
    """A test erasure: today's binary mask hooks (what ``methods.mask.apply_masks`` installs) closing every
    other feed-forward neuron; ``applied`` counts installs, ``removed`` removals."""

    def __init__(self) -> None:
        self.applied = 0
        self.removed = 0

    def apply(self, pipe) -> MaskedModel:
        arch, denoiser = denoiser_of(pipe)
        sites = [s for s in arch.sites(denoiser) if s.kind == "neurons"]
        logits = {s.key: torch.tensor([3.0, -3.0]).repeat(s.num_units // 2 + 1)[: s.num_units] for s in sites}
        masked = MaskedModel(denoiser, sites, logits=logits)
        masked.set_mode("binary")
        self.applied += 1
        outer = self

        class Handle:
            def remove(self) -> None:
                masked.remove()
                outer.removed += 1

        masked.install()
        return Handle()  # type: ignore[return-value]


class ConstantJudge:
    """Says ``answer`` for every image; counts the images it saw."""

    threshold = None

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.name = f"always-{answer}"
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return [self.answer] * len(images)


def _hooks(pipe) -> int:
    _, denoiser = denoiser_of(pipe)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in denoiser.modules())


# --------------------------------------------------------------------------- registry
def test_registry_lists_attacks_and_refuses_unknown_names():
    assert {"soft-prompt", "completion"} <= set(attack_names())
    assert get_attack("soft-prompt").kind == "continuous"
    assert get_attack("completion").kind == "probe"
    with pytest.raises(ConfigError) as info:
        get_attack("nope")
    message = str(info.value)
    assert "\n" not in message and "completion" in message and "soft-prompt" in message


# --------------------------------------------------------------------------- soft-prompt
def test_soft_prompt_runs_within_budget_writes_files_and_is_deterministic(pipe, tmp_path: Path, capsys):
    erasure = HalfNeuronsMask()
    judge = ConstantJudge(False)
    hooks_before = _hooks(pipe)
    with count_denoiser_calls(pipe) as outside:
        result = run_attack(
            pipe,
            "soft-prompt",
            erasure=erasure,
            concept="a cat",
            judge=judge,
            seeds=[3, 4],
            sampling=SAMPLING,
            budget=2,
            output=tmp_path / "run",
            config={"lr": 0.1},
        )
    steps = SAMPLING.steps
    # target, pre-attack and starting images: one pass each, and the original model's prediction at each
    # of the target's states; each optimiser step: a no-grad pass of T - 1 steps, T recomputed steps and
    # T predictions at the target's states; the final images: one pass (the counting hook counts calls)
    expected = 4 * steps + 2 * (3 * steps - 1) + steps
    assert result.denoiser_calls == expected == outside.calls
    assert "soft-prompt seeds 3-4" in capsys.readouterr().err  # the search's progress bar
    assert [r.budget_used for r in result.per_seed] == [2, 2]
    assert erasure.applied == erasure.removed == 1 and _hooks(pipe) == hooks_before
    assert judge.seen == 3 * 2  # pre, start, post: the judge never sees the search
    assert result.post_rate == 0.0 and result.attack_success_rate == 0.0

    folder = tmp_path / "run"
    assert sorted(p.name for p in folder.iterdir()) == [
        "embeddings.safetensors",
        "images",
        "pre_images",
        "results.jsonl",
        "summary.json",
    ]
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["seed3.png", "seed4.png"]
    saved = load_file(folder / "embeddings.safetensors")
    assert set(saved) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.equal(saved["prompt_embeds"], result.embeddings["prompt_embeds"])
    lines = (folder / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["seed"] for line in lines] == [3, 4]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["budget"] == 2 and summary["seeds"] == [3, 4] and summary["early_stopping"] is False
    assert summary["judge"] == {"name": "always-False", "threshold": None}
    assert summary["provenance"]["model"]["denoiser_class"] == "FluxTransformer2DModel"

    # the embeddings moved away from the starting prompt, and the same call finds the same ones
    arch, _ = denoiser_of(pipe)
    start = arch.encode_prompts(pipe, ["a shape"] * 2, SAMPLING.max_sequence_length)
    assert not torch.allclose(result.embeddings["prompt_embeds"], start["prompt_embeds"])
    again = run_attack(
        pipe,
        "soft-prompt",
        erasure=erasure,
        concept="a cat",
        judge=judge,
        seeds=[3, 4],
        sampling=SAMPLING,
        budget=2,
        config={"lr": 0.1},
        progress=False,
    )
    assert "soft-prompt" not in capsys.readouterr().err
    for key in result.embeddings:
        assert torch.equal(again.embeddings[key], result.embeddings[key])
    assert [r.loss for r in again.per_seed] == [r.loss for r in result.per_seed]


def test_soft_prompt_lowers_its_objective(pipe):
    """Against the original model, more steps bring the final latent closer to the concept's."""
    kwargs = dict(erasure=None, concept="a cat", judge=ConstantJudge(False), seeds=[5], sampling=SAMPLING)
    losses = [
        run_attack(pipe, "soft-prompt", budget=budget, config={"lr": 0.1}, **kwargs).per_seed[0].loss
        for budget in (1, 8)
    ]
    assert losses[1] < 0.8 * losses[0]


def test_soft_prompt_gradient_matches_finite_differences(pipe):
    """The trajectory gradient w.r.t. the embeddings, along one random direction, equals the central
    difference of the objective (final and intermediate states, and the predictions at the target
    path's states; float64, with true classifier-free guidance so the embeddings also pass through the
    guided batch)."""
    pipe64 = pipe.to(torch.float64)
    try:
        sampling = Sampling(steps=3, resolution=32, guidance_scale=2.0, max_sequence_length=16)
        arch, _ = denoiser_of(pipe64)
        start = arch.encode_prompts(pipe64, ["a shape"], sampling.max_sequence_length)
        wanted = arch.encode_prompts(pipe64, ["a cat"], sampling.max_sequence_length)
        trajectory = arch.trajectory(pipe64, wanted, [7], **sampling.as_kwargs())
        target = TargetPath.of(trajectory, with_predictions=True)
        path, predictions = target.states, target.predictions
        assert predictions is not None
        params = {k: start[k].detach().clone().requires_grad_(True) for k in ("prompt_embeds", "pooled_prompt_embeds")}
        loss, grads, _ = soft_prompt_objective(
            arch, pipe64, start, params, target, [7], sampling, path_weight=0.5, prediction_weight=0.7
        )

        generator = torch.Generator().manual_seed(0)
        direction = {k: torch.randn(p.shape, generator=generator, dtype=p.dtype) for k, p in params.items()}
        analytic = sum(float((g * direction[k]).sum()) for k, g in zip(params, grads))
        # the sampler keeps its schedule in float32: below h ~ 1e-3 that rounding dominates the difference
        h = 3e-3

        def objective(sign: float) -> float:
            shifted = {k: (p + sign * h * direction[k]).detach() for k, p in params.items()}
            with torch.no_grad():
                traj = arch.trajectory(pipe64, {**start, **shifted}, [7], **sampling.as_kwargs())
                states = run_trajectory(traj.step, traj.noise, traj.num_steps, keep=True)
                moves = [traj.predict(path[i], i) for i in range(traj.num_steps)]
            distances = [float((z - p).pow(2).flatten(1).mean(1).sum()) for z, p in zip(states[1:], path[1:])]
            misses = [float((m - p).pow(2).flatten(1).mean(1).sum()) for m, p in zip(moves, predictions)]
            return distances[-1] + 0.5 * sum(distances[:-1]) + 0.7 * sum(misses) / len(misses)

        numeric = (objective(1.0) - objective(-1.0)) / (2 * h)
        assert abs(analytic) > 1e-6
        assert analytic == pytest.approx(numeric, rel=1e-3)
        assert float(loss) == pytest.approx(objective(0.0), rel=1e-6)
    finally:
        pipe.to(torch.float32)


def test_soft_prompt_stops_on_the_judge_only_when_asked_and_records_it(pipe, tmp_path: Path):
    result = run_attack(
        pipe,
        "soft-prompt",
        erasure=None,
        concept="a cat",
        judge=ConstantJudge(True),
        seeds=[1, 2],
        sampling=SAMPLING,
        budget=5,
        output=tmp_path / "run",
        config={"stop_on_success": True},
    )
    assert [r.budget_used for r in result.per_seed] == [0, 0]
    assert all(r.stopped_early for r in result.per_seed)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["early_stopping"] is True and summary["stopped_early"] == 2 and summary["budget_used"] == 0
    # stopped before any update: the embeddings are the starting prompt's
    arch, _ = denoiser_of(pipe)
    start = arch.encode_prompts(pipe, ["a shape"] * 2, SAMPLING.max_sequence_length)
    assert torch.equal(result.embeddings["prompt_embeds"], start["prompt_embeds"])


# --------------------------------------------------------------------------- pre-/post-attack accounting
def test_pre_attack_successes_are_not_attack_successes(pipe, tmp_path: Path):
    result = run_attack(
        pipe,
        "completion",
        erasure=HalfNeuronsMask(),
        concept="a cat",
        judge=ConstantJudge(True),
        seeds=[0, 1, 2],
        sampling=SAMPLING,
        output=tmp_path / "run",
    )
    assert result.pre_rate == 1.0 and result.post_rate == 1.0
    assert result.new_successes == 0 and result.attack_success_rate is None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["pre_attack_rate"] == 1.0 and summary["post_attack_rate"] == 1.0
    assert summary["new_successes"] == 0 and summary["attack_success_rate"] is None
    assert all(json.loads(line)["attack_success"] is False for line in (tmp_path / "run" / "results.jsonl").open())


def test_attack_success_rate_counts_only_new_successes():
    outcomes = [(True, True), (False, True), (False, False), (True, False)]
    result = _result(
        [SeedResult(seed=i, pre_success=a, post_success=b, budget_used=1) for i, (a, b) in enumerate(outcomes)]
    )
    assert (result.pre_rate, result.post_rate, result.new_successes) == (0.5, 0.5, 1)
    assert result.attack_success_rate == 0.5


def _result(per_seed: list[SeedResult], prompts: list[str] | None = None) -> AttackResult:
    image = Image.new("RGB", (8, 8))
    return AttackResult(
        attack="test",
        kind="discrete" if prompts is not None else "probe",
        concept="cat",
        judge={"name": "test", "threshold": None},
        budget=1,
        seeds=[r.seed for r in per_seed],
        per_seed=per_seed,
        images=[image] * len(per_seed),
        pre_images=[image] * len(per_seed),
        seconds=0.0,
        denoiser_calls=0,
        prompts=prompts,
    )


def test_prompts_csv_is_read_back_by_the_evaluation_prompt_reader(tmp_path: Path):
    prompts = ['a "quoted", comma prompt', "ünïcode cat", "plain"]
    per_seed = [SeedResult(seed=s, pre_success=False, post_success=True, budget_used=1) for s in (11, 12, 13)]
    save_attack_result(_result(per_seed, prompts), tmp_path / "run")
    loaded = load_prompt_set(str(tmp_path / "run" / "prompts.csv"))
    assert [(item.prompt, item.seed) for item in loaded.items] == list(zip(prompts, [11, 12, 13]))


# --------------------------------------------------------------------------- completion
def test_completion_runs_within_budget_and_hands_over(pipe, tmp_path: Path):
    sampling = Sampling(steps=3, resolution=32, guidance_scale=0.0, max_sequence_length=16)
    erasure = HalfNeuronsMask()
    result = run_attack(
        pipe,
        "completion",
        erasure=erasure,
        concept="a cat",
        judge=ConstantJudge(False),
        seeds=[0, 1],
        sampling=sampling,
        budget=1,
        output=tmp_path / "run",
    )
    # the erased model from the noise (3 calls), the original model for 1 step, the erased one for 2
    assert result.denoiser_calls == 3 + 1 + 2
    assert [r.budget_used for r in result.per_seed] == [1, 1]
    assert erasure.applied == erasure.removed == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "images",
        "pre_images",
        "results.jsonl",
        "summary.json",
    ]
    # the hand-over changes the image (the erasure alone would have drawn the pre-attack one)
    assert result.images[0].tobytes() != result.pre_images[0].tobytes()
    again = run_attack(
        pipe,
        "completion",
        erasure=erasure,
        concept="a cat",
        judge=ConstantJudge(False),
        seeds=[0, 1],
        sampling=sampling,
        budget=1,
    )
    assert [i.tobytes() for i in again.images] == [i.tobytes() for i in result.images]
    # without an erasure both halves are the original model: the image is the plain one
    plain = run_attack(
        pipe,
        "completion",
        erasure=None,
        concept="a cat",
        judge=ConstantJudge(False),
        seeds=[0],
        sampling=sampling,
        budget=2,
    )
    assert plain.images[0].tobytes() == plain.pre_images[0].tobytes()
    assert get_attack("completion").default_budget_for(sampling) == 2


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("name", "kwargs", "error"),
    [
        ("nope", {}, ConfigError),
        ("soft-prompt", {"budget": 0}, ConfigError),
        ("soft-prompt", {"seeds": []}, ConfigError),
        ("soft-prompt", {"config": {"learning_rate": 1.0}}, ConfigError),
        ("soft-prompt", {"concept": " "}, PromptError),
        ("soft-prompt", {"config": {"init_prompt": "a cat on a mat"}}, ConfigError),
        ("completion", {"budget": 2}, ConfigError),
        ("completion", {"config": {"stop_on_success": True}}, ConfigError),
        ("completion", {"judge": "no-such-detector"}, ErasekitError),
        ("completion", {"judge": "shapes", "concept": "a banana"}, ErasekitError),
    ],
)
def test_bad_input_is_a_one_line_error_and_writes_nothing(pipe, tmp_path: Path, name, kwargs, error):
    arguments = dict(
        erasure=None, concept="a cat", judge=ConstantJudge(False), seeds=[0], sampling=SAMPLING, output=tmp_path / "run"
    )
    arguments.update(kwargs)
    with pytest.raises(error) as info:
        run_attack(pipe, name, **arguments)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_refused_before_any_work(pipe, tmp_path: Path):
    (tmp_path / "run").mkdir()
    judge = ConstantJudge(False)
    with pytest.raises(ErasekitError, match="already exists"):
        run_attack(
            pipe,
            "completion",
            erasure=None,
            concept="a cat",
            judge=judge,
            seeds=[0],
            sampling=SAMPLING,
            output=tmp_path / "run",
        )
    assert judge.seen == 0


def test_the_attack_command_runs_on_the_embedded_world_and_refuses_an_unknown_attack(tmp_path, capsys):
    from erasekit.cli import main as cli

    out = tmp_path / "completion"
    args = ["attack", "--world", "shapes", "--concept", "circle", "--attack", "completion"]
    assert cli([*args, "--set", "prompt=a red circle", "--seed", "100", "--seed", "101", "--output", str(out)]) == 0
    assert "before the attack" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attack"] == "completion" and summary["seeds"] == [100, 101] and summary["budget"] == 6
    assert summary["pre_attack_rate"] == 1.0 and summary["judge"]["name"] == "shapes"
    assert len(list((out / "images").iterdir())) == 2
    bad = ["attack", "--world", "shapes", "--concept", "circle", "--attack", "nope", "--output", str(tmp_path / "x")]
    assert cli(bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown attack 'nope'" in err and "soft-prompt" in err
    assert not (tmp_path / "x").exists()
