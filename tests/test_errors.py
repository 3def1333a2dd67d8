"""Every user error of the CLI: one line on stderr, the right exit code, and no output folder left.

"No output folder left" means that neither OUTPUT, nor erase's staging folder ``OUTPUT.incomplete``,
nor an atomic-write temporary sibling ``.OUTPUT.*.partial`` exists: every run writes into an
otherwise empty ``runs/`` folder, which must still be empty after the failure.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from erasekit.cli import main

# Keys of erase that make a one-iteration CPU run of the tiny pipeline.
QUICK_ERASE = [
    "--steps", "1",
    "--resolution", "32",
    "--iterations", "1",
    "--set", "model.device=cpu",
    "--set", "model.dtype=float32",
    "--set", "sampling.max_sequence_length=16",
]  # fmt: skip

# Denoisers of other model families, none of which erasekit supports (the first unsupported one is used).
FOREIGN_CLASSES = ("CogVideoXTransformer3DModel", "HunyuanDiT2DModel", "LTXVideoTransformer3DModel")


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """An empty folder to put every --output in."""
    folder = tmp_path / "runs"
    folder.mkdir()
    return folder


def fail(capsys, *args: object, code: int = 2) -> str:
    """Run ``erasekit ARGS`` in-process, check the exit code and that stderr is one error line; return it."""
    argv = [str(a) for a in args]
    assert main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"erasekit {argv[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


def assert_nothing_left(output: Path) -> None:
    assert not output.exists()
    assert not output.with_name(output.name + ".incomplete").exists()
    assert not list(output.parent.glob(f".{output.name}.*.partial"))
    assert not list(output.parent.iterdir()), sorted(p.name for p in output.parent.iterdir())


def foreign_class() -> str:
    from erasekit.arch import supported_classes

    # a made-up name when every listed family has become supported
    return next((name for name in FOREIGN_CLASSES if name not in supported_classes()), "NoSuchFamilyTransformer2DModel")


def write_mask(folder: Path, denoiser: torch.nn.Module, model_id: str, seed: int = 0) -> Path:
    """A mask artefact with random logits for every site of ``denoiser`` (no training)."""
    from erasekit.arch import architecture_for
    from erasekit.methods.mask.artifact import base_model_record, save_mask_artifact

    generator = torch.Generator().manual_seed(seed)
    sites = architecture_for(denoiser).sites(denoiser)
    logits = {site.key: torch.randn(site.num_units, generator=generator) for site in sites}
    config = {"method": "mask", "base_model": base_model_record(denoiser, model_id)}
    return save_mask_artifact(folder, logits, config)


@pytest.fixture(scope="module")
def masks(tiny_flux_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Mask folders: ``good`` fits the tiny pipeline, the others do not or are broken."""
    from diffusers import FluxTransformer2DModel

    from erasekit.inspect import instantiate_denoiser_on_meta

    root = tmp_path_factory.mktemp("masks")
    denoiser = instantiate_denoiser_on_meta(tiny_flux_path)
    good = write_mask(root / "good", denoiser, tiny_flux_path)

    # another tiny FLUX: three heads instead of two, so the head and width shapes differ
    config = json.loads((Path(tiny_flux_path) / "transformer" / "config.json").read_text())
    config["num_attention_heads"] = config["num_attention_heads"] + 1
    with torch.device("meta"):
        other = FluxTransformer2DModel.from_config(config)
    other_mask = write_mask(root / "other-model", other, "other/tiny-flux")

    # the mask of this model, but recorded as made for another denoiser class
    other_class = root / "other-class"
    shutil.copytree(good, other_class)
    record = json.loads((other_class / "erasure.json").read_text())
    record["base_model"]["denoiser_class"] = "SomeOtherTransformer2DModel"
    (other_class / "erasure.json").write_text(json.dumps(record))

    # a mask of a shallower model of the same width (1+1 blocks against 2+2): every key and shape fits
    config = json.loads((Path(tiny_flux_path) / "transformer" / "config.json").read_text())
    config.update(num_layers=config["num_layers"] - 1, num_single_layers=config["num_single_layers"] - 1)
    with torch.device("meta"):
        shallower = FluxTransformer2DModel.from_config(config)
    other_depth = write_mask(root / "other-depth", shallower, "other/shallower-tiny-flux")

    # valid JSON that is not an object
    not_object = root / "not-object"
    shutil.copytree(good, not_object)
    (not_object / "erasure.json").write_text("[1, 2, 3]")

    # NaN logits (written by something other than erasekit, or damaged): NaN > 0 is False, so NaN would read as closed
    from safetensors.torch import load_file, save_file

    nan_logits = root / "nan-logits"
    shutil.copytree(good, nan_logits)
    tensors = load_file(str(nan_logits / "masks.safetensors"))
    first = next(iter(tensors))
    tensors[first][0] = float("nan")
    save_file(tensors, str(nan_logits / "masks.safetensors"))
    from erasekit.outputs import file_sha256

    record = json.loads((nan_logits / "erasure.json").read_text())  # a record that matches the damaged payload
    record["payload"]["masks.safetensors"] = file_sha256(nan_logits / "masks.safetensors")
    (nan_logits / "erasure.json").write_text(json.dumps(record))

    # a truncated masks.safetensors (as after an interrupted copy)
    corrupt = root / "corrupt"
    shutil.copytree(good, corrupt)
    weights = corrupt / "masks.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # written by a newer erasekit whose format this one would misread
    newer = root / "newer-version"
    shutil.copytree(good, newer)
    record = json.loads((newer / "erasure.json").read_text())
    record["format_version"] = 2
    (newer / "erasure.json").write_text(json.dumps(record))
    return {
        "good": good,
        "other-model": other_mask,
        "other-class": other_class,
        "corrupt": corrupt,
        "other-depth": other_depth,
        "not-object": not_object,
        "nan-logits": nan_logits,
        "newer-version": newer,
    }


@pytest.fixture(scope="module")
def foreign_pipeline(tiny_flux_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the tiny pipeline whose model_index.json and transformer config name another family."""
    name = foreign_class()
    folder = tmp_path_factory.mktemp("foreign") / "pipeline"
    shutil.copytree(tiny_flux_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", name]
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["_class_name"] = name
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return folder, name


def command(name: str, model: str | Path, masks: dict[str, Path] | None = None) -> list[object]:
    """A valid invocation of ``name`` on ``model`` (without --output)."""
    if name == "erase":
        return ["erase", "--model", model, "--concept", "cat", *QUICK_ERASE]
    if name == "generate":
        return [
            "generate",
            "--model",
            model,
            "--prompt",
            "a cat",
            "--steps",
            "1",
            "--resolution",
            "32",
            "--device",
            "cpu",
        ]
    assert masks is not None
    return ["fold", "--model", model, "--masks", masks["good"]]


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["erase", "generate", "fold"])
def test_unknown_model_family(name, foreign_pipeline, masks, runs, capsys):
    folder, denoiser = foreign_pipeline
    output = runs / "out"
    line = fail(capsys, *command(name, folder, masks), "--output", output)
    from erasekit.arch import supported_classes

    assert "unsupported model family" in line and denoiser in line
    assert all(supported in line for supported in supported_classes())
    assert_nothing_left(output)


def test_unknown_model_family_inspect(foreign_pipeline, capsys):
    folder, denoiser = foreign_pipeline
    line = fail(capsys, "inspect", folder)
    assert "unsupported model family" in line and denoiser in line and "FluxTransformer2DModel" in line


@pytest.mark.parametrize("name", ["erase", "generate", "fold"])
def test_missing_model_path(name, masks, runs, tmp_path, capsys):
    output = runs / "out"
    missing = tmp_path / "no-such-pipeline"
    line = fail(capsys, *command(name, missing, masks), "--output", output)
    assert repr(str(missing)) in line and "does not exist" in line
    assert_nothing_left(output)


def test_folder_without_model_index(tmp_path, runs, capsys):
    output = runs / "out"
    line = fail(capsys, "generate", "--model", tmp_path, "--prompt", "a cat", "--output", output)
    assert "model_index.json" in line
    assert_nothing_left(output)


def test_uncached_hub_id_offline(runs, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = runs / "out"
    line = fail(capsys, "generate", "--model", "erasekit-tests/no-such-model", "--prompt", "a cat", "--output", output)
    assert "'erasekit-tests/no-such-model'" in line and "hub id" in line
    assert_nothing_left(output)


# --------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("concept", ["", "   "])
def test_empty_concept(concept, tiny_flux_path, runs, capsys):
    output = runs / "out"
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", concept, *QUICK_ERASE, "--output", output)
    assert "concept is empty" in line
    assert_nothing_left(output)


def test_no_concept_at_all(tiny_flux_path, runs, capsys):
    output = runs / "out"
    line = fail(capsys, "erase", "--model", tiny_flux_path, *QUICK_ERASE, "--output", output)
    assert "concept is empty" in line and "--concept" in line
    assert_nothing_left(output)


def test_empty_prompt_file(tiny_flux_path, tmp_path, runs, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n\t\n")
    output = runs / "out"
    line = fail(capsys, "generate", "--model", tiny_flux_path, "--prompt-file", prompts, "--output", output)
    assert repr(str(prompts)) in line and "empty" in line
    assert_nothing_left(output)


def test_missing_prompt_file(tiny_flux_path, tmp_path, runs, capsys):
    output = runs / "out"
    line = fail(
        capsys, "generate", "--model", tiny_flux_path, "--prompt-file", tmp_path / "nope.txt", "--output", output
    )
    assert "does not exist" in line
    assert_nothing_left(output)


def test_empty_prompt(tiny_flux_path, runs, capsys):
    output = runs / "out"
    line = fail(capsys, "generate", "--model", tiny_flux_path, "--prompt", "a cat", "--prompt", " ", "--output", output)
    assert "empty" in line
    assert_nothing_left(output)


# --------------------------------------------------------------------------- configuration
def test_unknown_config_key_in_set(tiny_flux_path, runs, capsys):
    output = runs / "out"
    line = fail(
        capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--set", "train.nope=1", "--output", output
    )
    assert "unknown config key 'train.nope'" in line and "iterations" in line  # lists the valid keys
    assert_nothing_left(output)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  nope: 1\n", "train.nope"),
        ("trian:\n  iterations: 3\n", "trian"),
        ("mask:\n  heads:\n    lrr: 1\n", "mask.heads.lrr"),
    ],
)
def test_unknown_config_key_in_yaml(text, key, tiny_flux_path, tmp_path, runs, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    output = runs / "out"
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--config", recipe, "--output", output)
    assert f"unknown config key {key!r}" in line
    assert_nothing_left(output)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.iterations=abc", "train.iterations: expected an integer, got str 'abc'"),
        ("train.iterations=2.5", "train.iterations: expected an integer"),
        ("mask.heads.enabled=maybe", "mask.heads.enabled: expected true or false"),
        ("loss.erase_weight=[1, 2]", "loss.erase_weight: expected a number"),
        ("model.dtype=float64", "model.dtype: 'float64' is not one of"),
        ("train", "must look like key.path=value"),
    ],
)
def test_wrong_config_value(override, expected, tiny_flux_path, runs, capsys):
    output = runs / "out"
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--set", override, "--output", output)
    assert expected in line
    assert_nothing_left(output)


def test_wrong_type_in_yaml_and_missing_recipe(tiny_flux_path, tmp_path, runs, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  iterations: abc\n")
    output = runs / "out"
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--config", recipe, "--output", output)
    assert "train.iterations: expected an integer" in line
    line = fail(
        capsys,
        "erase",
        "--model",
        tiny_flux_path,
        "--concept",
        "cat",
        "--config",
        tmp_path / "no.yaml",
        "--output",
        output,
    )
    assert "does not exist" in line
    recipe.write_text("train: [unclosed\n")
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--config", recipe, "--output", output)
    assert "not valid YAML" in line
    assert_nothing_left(output)


def test_invalid_training_value(tiny_flux_path, runs, capsys):
    output = runs / "out"
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--iterations", "0", "--output", output)
    assert "train.iterations must be at least 1" in line
    for override, message in (
        ("sampling.generation_steps=0", "sampling.generation_steps must be at least 1"),
        ("train.preservation_batch_size=0", "train.preservation_batch_size must be at least 1"),
        ("loss.negative_guidance=-1", "loss.negative_guidance must not be negative"),
        ("mask.final_threshold=.nan", "mask.final_threshold: expected a finite number, got nan"),
        ("loss.intermediate_preservation=-1", "loss.intermediate_preservation must not be negative"),
        ("loss.intermediate_erasure=-1", "loss.intermediate_erasure must not be negative"),
        ("train.adversarial.steps=-1", "train.adversarial.steps must not be negative"),
        ("train.noise_pool=-1", "train.noise_pool must not be negative"),
    ):
        line = fail(
            capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--set", override, "--output", output
        )
        assert message in line, override
    assert_nothing_left(output)


# --------------------------------------------------------------------------- masks
@pytest.mark.parametrize("name", ["generate", "fold"])
@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        ("other-model", "was made for another FluxTransformer2DModel"),
        ("other-class", "was made for a SomeOtherTransformer2DModel"),
        ("corrupt", "masks.safetensors does not match the sha256 recorded in erasure.json"),
        ("other-depth", "'other/shallower-tiny-flux', denoiser config sha256"),
        ("not-object", "is not an erasekit erasure record (a JSON list, not an object)"),
        ("nan-logits", "holds non-finite logits"),
        ("newer-version", "has format_version 2, newer than the version 1 that erasekit"),
    ],
)
def test_unusable_masks(name, mask, expected, tiny_flux_path, masks, runs, capsys):
    output = runs / "out"
    args = command(name, tiny_flux_path, {"good": masks[mask]})
    if name == "generate":
        args += ["--masks", masks[mask]]
    line = fail(capsys, *args, "--output", output)
    assert expected in line and str(masks[mask]) in line
    assert_nothing_left(output)


def test_missing_mask_folder(tiny_flux_path, tmp_path, runs, capsys):
    output = runs / "out"
    line = fail(capsys, "fold", "--model", tiny_flux_path, "--masks", tmp_path / "no-mask", "--output", output)
    assert "does not exist" in line
    assert_nothing_left(output)


def test_a_good_mask_passes_the_checks(tiny_flux_path, masks, tmp_path, capsys):
    """The checks above reject the broken masks, not every mask: the good one folds."""
    output = tmp_path / "folded"
    assert (
        main(
            [
                "fold",
                "--model",
                tiny_flux_path,
                "--masks",
                str(masks["good"]),
                "--mode",
                "zero",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    assert (output / "model_index.json").is_file()
    capsys.readouterr()


# --------------------------------------------------------------------------- training diverged
def test_nan_loss_exits_1_and_leaves_nothing(tiny_flux_path, runs, capsys):
    output = runs / "out"
    # a finite weight beyond float32's range: the first step's gradients overflow, the second step's loss is NaN
    argv = [
        "erase",
        "--model",
        tiny_flux_path,
        "--concept",
        "cat",
        *QUICK_ERASE,
        "--iterations",
        "2",
        "--set",
        "loss.erase_weight=1.0e+39",
        "--output",
        str(output),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    # erase's own progress bar shares stderr; the error message itself is there exactly once
    assert err.count("erasekit erase: error: ") == 1
    assert "erasekit erase: error: loss became nan at iteration 2" in err
    assert "Traceback" not in err
    assert_nothing_left(output)


# --------------------------------------------------------------------------- existing output
@pytest.mark.parametrize("name", ["tiny-model", "erase", "generate", "fold", "import-masks"])
def test_existing_output_is_refused_and_kept(name, tiny_flux_path, masks, tmp_path, capsys):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    if name == "tiny-model":
        args: list[object] = ["tiny-model"]
    elif name == "import-masks":
        ff = tmp_path / "ff.pt"
        torch.save([torch.ones(4)], ff)
        args = ["import-masks", "--format", "minimalist-flux", "--ff", ff]
    else:
        args = command(name, tiny_flux_path, masks)
    line = fail(capsys, *args, "--output", output)
    assert "already exists" in line
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "mine"
    siblings = sorted(p.name for p in tmp_path.iterdir())
    assert siblings == sorted(["existing", *(["ff.pt"] if name == "import-masks" else [])])


def test_interrupted_erase_run_needs_resume(tiny_flux_path, tmp_path, capsys):
    output = tmp_path / "mask"
    staging = tmp_path / "mask.incomplete"
    staging.mkdir()
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--output", output)
    assert "--resume" in line
    assert not output.exists() and staging.is_dir()


# --------------------------------------------------------------------------- checked before any work (issue 25)
def refuse_loading(monkeypatch) -> None:
    """Make every model load fail loudly: an error checked up front must come before any of them."""
    import erasekit.pipeline
    import erasekit.toyworld.world

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(erasekit.pipeline, "load_pipeline", loaded)
    monkeypatch.setattr(erasekit.toyworld.world.World, "load", loaded)


def any_command(name: str, model: str, masks: dict[str, Path]) -> list[object]:
    """A valid invocation of every command that writes an --output (without --output)."""
    if name == "evaluate":
        return [
            "evaluate",
            "--model",
            model,
            "--prompts",
            "concept:cat",
            "--detector",
            "none",
            "--steps",
            "1",
            "--resolution",
            "32",
        ]
    if name == "tiny-model":
        return ["tiny-model"]
    if name == "demo":
        return ["demo", "--images", "1"]
    return command(name, model, masks)


OUTPUT_COMMANDS = ["erase", "generate", "fold", "evaluate", "tiny-model", "demo"]


def test_sampling_settings_the_model_cannot_use_fail_before_training_and_the_rerun_works(tiny_flux_path, runs, capsys):
    output = runs / "out"
    line = fail(
        capsys,
        "erase",
        "--model",
        tiny_flux_path,
        "--concept",
        "cat",
        *QUICK_ERASE,
        "--resolution",
        "7",
        "--output",
        output,
    )
    assert "resolution 7 must be a positive multiple of 16" in line
    assert_nothing_left(output)  # no OUTPUT.incomplete/ that the corrected run would refuse
    assert main(["erase", "--model", tiny_flux_path, "--concept", "cat", *QUICK_ERASE, "--output", str(output)]) == 0
    assert (output / "masks.safetensors").is_file()
    capsys.readouterr()


def test_a_failed_run_without_a_checkpoint_leaves_no_staging_folder(tiny_flux_path, runs, capsys, monkeypatch):
    """Whatever fails mid-training before the first checkpoint leaves nothing that --resume could use,
    so nothing at all."""
    from erasekit.methods.mask import trainer

    def broken(*args, **kwargs):
        raise ValueError("something the up-front checks did not foresee")

    monkeypatch.setattr(trainer, "checkpointed_gradient", broken)
    monkeypatch.setattr(trainer, "naive_gradient", broken)
    output = runs / "out"
    argv = ["erase", "--model", tiny_flux_path, "--concept", "cat", *QUICK_ERASE, "--output", str(output)]
    assert main(argv) == 2
    assert "did not foresee" in capsys.readouterr().err
    assert_nothing_left(output)


@pytest.mark.parametrize(
    "override", ["mask.heads.lr=.nan", "mask.init_lambda=.nan", "mask.heads.lr=.inf", "loss.erase_weight=-.inf"]
)
def test_non_finite_numbers_are_refused_before_loading(override, tiny_flux_path, runs, capsys, monkeypatch):
    refuse_loading(monkeypatch)
    output = runs / "out"
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", "cat", "--set", override, "--output", output)
    assert f"{override.split('=')[0]}: expected a finite number" in line
    assert_nothing_left(output)


@pytest.mark.parametrize("device", ["tpu9", "cuda:99", *([] if torch.cuda.is_available() else ["cuda"])])
def test_devices_this_torch_lacks_are_refused_before_loading(device, tiny_flux_path, runs, capsys, monkeypatch):
    refuse_loading(monkeypatch)
    output = runs / "out"
    line = fail(
        capsys,
        "erase",
        "--model",
        tiny_flux_path,
        "--concept",
        "cat",
        "--set",
        f"model.device={device}",
        "--output",
        output,
    )
    assert (
        line.startswith("erasekit erase: error: model.device: ") and repr(device) in line and "use auto or cpu" in line
    )
    assert_nothing_left(output)
    monkeypatch.undo()
    line = fail(
        capsys, "generate", "--model", tiny_flux_path, "--prompt", "a cat", "--device", device, "--output", output
    )
    assert repr(device) in line and "use auto or cpu" in line
    assert_nothing_left(output)


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_output_under_a_file_is_refused_before_loading(name, tiny_flux_path, masks, runs, capsys, monkeypatch):
    refuse_loading(monkeypatch)
    blocker = runs / "file"
    blocker.write_text("mine")
    line = fail(capsys, *any_command(name, tiny_flux_path, masks), "--output", blocker / "sub")
    assert "is a file, not a folder" in line and str(blocker) in line
    assert sorted(p.name for p in runs.iterdir()) == ["file"] and blocker.read_text() == "mine"


@pytest.mark.parametrize("name", OUTPUT_COMMANDS)
def test_output_in_a_read_only_folder_is_refused_before_loading(name, tiny_flux_path, masks, runs, capsys, monkeypatch):
    import os

    import erasekit.outputs

    refuse_loading(monkeypatch)
    locked = runs / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if (
        os.geteuid() == 0
    ):  # root may write anywhere but on a read-only file system: judge by the mode bits as a user would
        monkeypatch.setattr(erasekit.outputs, "_writable", lambda folder: bool(folder.stat().st_mode & 0o200))
    try:
        line = fail(capsys, *any_command(name, tiny_flux_path, masks), "--output", locked / "deeper" / "out")
        assert "no permission to write in" in line and str(locked) in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_non_bmp_text_in_concept_anchor_and_paths_arrives_unchanged(tiny_flux_path, tmp_path, capsys):
    """An emoji is two UTF-16 surrogates in JSON's escapes: the flags' text must not take that detour through YAML."""
    model = tmp_path / "tiny-🐈"
    shutil.copytree(tiny_flux_path, model)
    output = tmp_path / "mask-🐈"
    argv = [
        "erase",
        "--model",
        str(model),
        "--concept",
        "a 🐈 cat",
        "--anchor",
        "a 🐕 dog",
        *QUICK_ERASE,
        "--output",
        str(output),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((output / "erasure.json").read_text(encoding="utf-8"))
    assert (record["concept"], record["anchor"], record["base_model"]["id"]) == ("a 🐈 cat", "a 🐕 dog", str(model))
    capsys.readouterr()


def test_text_that_is_not_unicode_is_refused(tiny_flux_path, runs, capsys):
    output = runs / "out"
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python passes on argv bytes it could not decode
    line = fail(capsys, "erase", "--model", tiny_flux_path, "--concept", undecodable, "--output", output)
    assert "--concept" in line and "not valid UTF-8" in line
    assert_nothing_left(output)


def test_sigterm_mid_run_leaves_nothing(tiny_flux_path, runs):
    """`kill` (SIGTERM) unwinds like Ctrl-C: the staging folder of a run without a checkpoint is removed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    output = runs / "out"
    argv = [
        "erase",
        "--model",
        tiny_flux_path,
        "--concept",
        "cat",
        *QUICK_ERASE,
        "--iterations",
        "100000",
        "--output",
        str(output),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "erasekit.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    staging = output.with_name(output.name + ".incomplete")
    deadline = time.monotonic() + 240
    while not (staging / "config.yaml").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert "erasekit erase: terminated" in err
    assert_nothing_left(output)
