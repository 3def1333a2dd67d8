"""The command-line journey on a tiny FLUX pipeline.

tiny-model -> erase -> generate (with and without the mask) -> fold (prune and zero) -> a fresh
Python process loads the folded pipelines with stock diffusers only and reproduces the masked
model's latents. The commands run in-process through ``erasekit.cli.main`` (fast); one test runs
the real console script in a subprocess for its exit codes and stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.cli import main
from reference_data import data_file, needs_data

REPO = Path(__file__).resolve().parents[1]
REFERENCE_MASKS = data_file("reference_masks/flux")

PROMPT = "a photo of a cat"
# The erase run of the journey: large learning rates and a low init_lambda switch units off in 3 steps.
ERASE_FLAGS = [
    "--concept", "cat",
    "--anchor", "dog",
    "--steps", "2",
    "--resolution", "32",
    "--iterations", "3",
    "--set", "model.device=cpu",
    "--set", "model.dtype=float32",
    "--set", "sampling.max_sequence_length=16",
    "--set", "mask.init_lambda=0.3",
    "--set", "mask.neurons.lr=2",
    "--set", "mask.norm.lr=2",
    "--set", "mask.heads.enabled=true",
    "--set", "mask.heads.lr=2",
]  # fmt: skip
# Generation settings equal to the mask's training trajectory, given explicitly so that a run without
# --masks uses the same ones.
SAMPLE_FLAGS = [
    "--steps",
    "2",
    "--resolution",
    "32",
    "--max-sequence-length",
    "16",
    "--device",
    "cpu",
    "--dtype",
    "float32",
]


def run_cli(*args: str) -> tuple[int, str, str]:
    """``erasekit ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-journey")


@pytest.fixture(scope="module")
def tiny_model(work: Path) -> Path:
    """``erasekit tiny-model --output T``."""
    target = work / "tiny-flux"
    code, out, err = run_cli("tiny-model", "--output", target)
    assert code == 0, err
    assert str(target) in out
    return target


@pytest.fixture(scope="module")
def erased(work: Path, tiny_model: Path) -> tuple[Path, str]:
    """``erasekit erase ... --output M``: the mask folder and what the command printed."""
    target = work / "mask-cat"
    code, out, err = run_cli("erase", "--model", tiny_model, *ERASE_FLAGS, "--output", target)
    assert code == 0, err
    return target, out


@pytest.fixture(scope="module")
def mask_dir(erased: tuple[Path, str]) -> Path:
    return erased[0]


# --------------------------------------------------------------------------- tiny-model
def test_tiny_model_writes_a_flux_pipeline_folder(tiny_model: Path) -> None:
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert (tiny_model / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tiny_model.parent.glob(f".{tiny_model.name}.*"))  # no temporary sibling left


# --------------------------------------------------------------------------- erase
@pytest.mark.slow
def test_erase_writes_a_mask_with_units_switched_off(erased: tuple[Path, str], tiny_model: Path) -> None:
    mask, printed = erased
    match = re.search(r"mask written to (.+) \(([\d.]+)% of masked units off, [\d.]+ s\)", printed)
    assert match, printed
    assert Path(match.group(1)) == mask
    assert float(match.group(2)) > 0

    config = json.loads((mask / "erasure.json").read_text())
    assert config["format"] == "erasekit-erasure" and config["method"] == "mask"
    assert config["concept"] == "cat" and config["anchor"] == "dog"
    assert config["unit_kinds"] == ["heads", "neurons", "norm"]
    assert config["base_model"]["id"] == str(tiny_model)
    assert config["base_model"]["denoiser_class"] == "FluxTransformer2DModel"
    assert config["training"]["iterations"] == 3
    sampling = config["settings"]["sampling"]
    assert (sampling["steps"], sampling["resolution"], sampling["max_sequence_length"]) == (2, 32, 16)
    assert config["settings"]["mask"]["heads"]["enabled"] is True
    stats = config["stats"]
    assert 0 < stats["masked_units"] < stats["total_units"]
    assert sum(kind["masked"] for kind in config["masked"].values()) == stats["masked_units"]
    assert stats["masked_fraction"] == pytest.approx(float(match.group(2)) / 100, abs=6e-5)

    from safetensors.torch import load_file

    logits = load_file(str(mask / "masks.safetensors"))
    assert sum(int((v <= 0).sum()) for v in logits.values()) == stats["masked_units"]
    assert any(key.startswith("heads/") for key in logits)
    # the run's staging folder became the artefact
    assert not mask.with_name(mask.name + ".incomplete").exists()
    assert not list(mask.parent.glob(f".{mask.name}.*"))


# --------------------------------------------------------------------------- generate
IMAGE_NAMES = ["0000-a-photo-of-a-cat-seed0.png", "0000-a-photo-of-a-cat-seed5.png"]


@pytest.fixture(scope="module")
def plain_images(work: Path, tiny_model: Path) -> Path:
    """``erasekit generate`` without masks: one prompt, seeds 0 and 5."""
    target = work / "images-plain"
    code, out, err = run_cli(
        "generate",
        "--model",
        tiny_model,
        "--prompt",
        PROMPT,
        "--seed",
        "0",
        "--seed",
        "5",
        *SAMPLE_FLAGS,
        "--output",
        target,
    )
    assert code == 0, err
    assert f"2 images written to {target}" in out
    return target


def test_generate_writes_deterministically_named_images(plain_images: Path) -> None:
    assert sorted(p.name for p in plain_images.glob("*.png")) == IMAGE_NAMES
    rows = (plain_images / "images.tsv").read_text().splitlines()
    assert rows == ["file\tseed\tprompt", f"{IMAGE_NAMES[0]}\t0\t{PROMPT}", f"{IMAGE_NAMES[1]}\t5\t{PROMPT}"]
    first, second = (pixels(plain_images / name) for name in IMAGE_NAMES)
    assert first.shape == (32, 32, 3)
    assert not np.array_equal(first, second)  # the seed picks the noise
    assert not list(plain_images.parent.glob(f".{plain_images.name}.*"))


@pytest.mark.slow
def test_generate_with_masks_changes_the_images(
    work: Path, tiny_model: Path, mask_dir: Path, plain_images: Path, capsys
) -> None:
    masked = work / "images-masked"
    args = [
        "generate",
        "--model",
        tiny_model,
        "--masks",
        mask_dir,
        "--prompt",
        PROMPT,
        "--seed",
        "0",
        "--seed",
        "5",
        *SAMPLE_FLAGS,
    ]
    assert main([str(a) for a in [*args, "--output", masked]]) == 0
    assert f"2 images written to {masked}" in capsys.readouterr().out
    assert sorted(p.name for p in masked.glob("*.png")) == IMAGE_NAMES
    for name in IMAGE_NAMES:
        image = pixels(masked / name)
        assert image.shape == (32, 32, 3)
        assert not np.array_equal(image, pixels(plain_images / name))  # same prompt, seed and settings


@pytest.mark.slow
def test_generate_defaults_come_from_the_mask(mask_dir: Path) -> None:
    """Without --steps/--resolution/--max-sequence-length, generate samples the mask's training trajectory."""
    from erasekit.cli import _generation_defaults

    defaults = _generation_defaults([str(mask_dir)])
    assert (defaults["steps"], defaults["resolution"], defaults["max_sequence_length"]) == (2, 32, 16)
    assert _generation_defaults([]) == {}


def test_generate_from_a_prompt_file(work: Path, tiny_model: Path, plain_images: Path, capsys) -> None:
    prompts = work / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\n   \nA Red Car, on a road!  \n", encoding="utf-8")
    target = work / "images-from-file"
    code = main(
        [
            str(a)
            for a in ["generate", "--model", tiny_model, "--prompt-file", prompts, *SAMPLE_FLAGS, "--output", target]
        ]
    )
    assert code == 0
    assert f"2 images written to {target}" in capsys.readouterr().out
    expected = [IMAGE_NAMES[0], "0001-a-red-car-on-a-road-seed0.png"]
    assert sorted(p.name for p in target.glob("*.png")) == expected
    rows = (target / "images.tsv").read_text().splitlines()[1:]
    assert rows == [f"{expected[0]}\t0\t{PROMPT}", f"{expected[1]}\t0\tA Red Car, on a road!"]
    # the same (prompt, seed) gives the same image in another run
    assert np.array_equal(pixels(target / expected[0]), pixels(plain_images / expected[0]))
    assert not np.array_equal(pixels(target / expected[0]), pixels(target / expected[1]))


# --------------------------------------------------------------------------- fold -> stock diffusers
CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffusers import DiffusionPipeline

    pruned, zeroed, reference_file, prompt = sys.argv[1:5]
    reference = torch.load(reference_file)
    result = {}
    for mode, path, kwargs in (("prune", pruned, {"trust_remote_code": True}), ("zero", zeroed, {})):
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(
            prompt,
            num_inference_steps=2,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            max_sequence_length=16,
        ).images
        result[mode] = {
            "pipeline": type(pipe).__name__,
            "transformer": type(pipe.transformer).__name__,
            "parameters": sum(p.numel() for p in pipe.transformer.parameters()),
            "dtype": str(latents.dtype),
            "shape": list(latents.shape),
            "max_diff_masked": float((latents - reference["masked"]).abs().max()),
            "max_diff_plain": float((latents - reference["plain"]).abs().max()),
        }
    result["erasekit_modules"] = sorted(m for m in sys.modules if m == "erasekit" or m.startswith("erasekit."))
    print(json.dumps(result))
    """
)


def masked_reference_latents(model: Path, mask: Path) -> dict[str, torch.Tensor]:
    """Final latents of the stock pipeline call, unmasked and with the mask's hooks installed."""
    from erasekit.methods.mask import apply_masks
    from erasekit.pipeline import load_pipeline

    pipe = load_pipeline(str(model), "float32", "cpu")

    def latents() -> torch.Tensor:
        return pipe(
            PROMPT,
            num_inference_steps=2,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            max_sequence_length=16,
        ).images

    plain = latents()
    hooks = apply_masks(pipe, [mask])
    try:
        masked = latents()
    finally:
        hooks.remove()
    return {"plain": plain, "masked": masked}


@pytest.mark.slow
def test_fold_prune_and_zero_load_with_stock_diffusers(work: Path, tiny_model: Path, mask_dir: Path, capsys) -> None:
    pruned, zeroed = work / "tiny-flux-pruned", work / "tiny-flux-zeroed"
    for mode, target in (("prune", pruned), ("zero", zeroed)):
        code = main(
            ["fold", "--model", str(tiny_model), "--masks", str(mask_dir), "--mode", mode, "--output", str(target)]
        )
        assert code == 0
    out = capsys.readouterr().out
    counts = [
        (int(a.replace(",", "")), int(b.replace(",", "")))
        for a, b in re.findall(r"parameters ([\d,]+) -> ([\d,]+)", out)
    ]
    assert len(counts) == 2
    (before, after_prune), (before_zero, after_zero) = counts
    assert after_prune < before == before_zero == after_zero
    assert "trust_remote_code=True" in out

    index = json.loads((pruned / "model_index.json").read_text())
    assert index["transformer"] == ["flux_pruned", "PrunedFluxTransformer2DModel"]
    assert (pruned / "transformer" / "flux_pruned.py").is_file()
    assert json.loads((zeroed / "model_index.json").read_text())["transformer"] == [
        "diffusers",
        "FluxTransformer2DModel",
    ]
    provenance = json.loads((pruned / "erasekit_fold.json").read_text())
    assert provenance["mode"] == "prune" and provenance["masks"] == [str(mask_dir.resolve())]

    reference = masked_reference_latents(tiny_model, mask_dir)
    assert (reference["masked"] - reference["plain"]).abs().max() > 1e-3  # the comparison below is not vacuous
    reference_file = work / "reference-latents.pt"
    torch.save(reference, reference_file)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "hf-modules"), TQDM_DISABLE="1")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(pruned), str(zeroed), str(reference_file), PROMPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,  # not the repository: nothing of erasekit is on the path but the installed package
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["erasekit_modules"] == []
    assert result["prune"]["transformer"] == "PrunedFluxTransformer2DModel"
    assert result["zero"]["transformer"] == "FluxTransformer2DModel"
    assert result["prune"]["parameters"] == after_prune < result["zero"]["parameters"] == before
    for mode in ("prune", "zero"):
        assert result[mode]["pipeline"] == "FluxPipeline"
        assert result[mode]["dtype"] == "torch.float32"
        assert result[mode]["shape"] == list(reference["masked"].shape)
        assert result[mode]["max_diff_masked"] <= 1e-4, result
        assert result[mode]["max_diff_plain"] > 1e-3, result


# --------------------------------------------------------------------------- inspect
def test_inspect_tiny_model_text_and_json(tiny_model: Path, capsys) -> None:
    from erasekit.tiny import TinyFluxSpec

    assert main(["inspect", str(tiny_model)]) == 0
    text = capsys.readouterr().out
    assert "FluxTransformer2DModel (family flux)" in text
    assert re.search(r"^total\s+[\d,]+$", text, re.MULTILINE)

    assert main(["inspect", str(tiny_model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    spec = TinyFluxSpec()
    per_kind = info["units"]["per_kind"]
    assert per_kind["heads"] == spec.num_attention_heads * (2 * spec.num_layers + spec.num_single_layers)
    assert per_kind["neurons"] == 4 * spec.inner_dim * (2 * spec.num_layers + spec.num_single_layers)
    assert per_kind["norm"] == spec.inner_dim * (12 * spec.num_layers + 3 * spec.num_single_layers)
    assert info["units"]["total"] == sum(per_kind.values())
    assert info["blocks"] == {"double": spec.num_layers, "single": spec.num_single_layers}
    assert info["denoiser_class"] == "FluxTransformer2DModel"


def test_inspect_flux_schnell_offline(capsys) -> None:
    assert main(["inspect", "black-forest-labs/FLUX.1-schnell", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["units"]["per_kind"]["heads"] == 1824
    assert info["units"]["per_kind"]["neurons"] == 933888
    assert info["blocks"] == {"double": 19, "single": 38}


# --------------------------------------------------------------------------- import-masks
@needs_data(*(f"reference_masks/flux/{name}.pt" for name in ("attn", "ff", "norm")))
def test_import_minimalist_flux_masks(tmp_path: Path, capsys) -> None:
    target = tmp_path / "imported"
    files = {name: REFERENCE_MASKS / f"{name}.pt" for name in ("attn", "ff", "norm")}
    code = main(
        [
            "import-masks",
            "--format",
            "minimalist-flux",
            *[f"--{k}={v}" for k, v in files.items()],
            "--output",
            str(target),
        ]
    )
    assert code == 0
    assert f"imported masks written to {target}" in capsys.readouterr().out

    config = json.loads((target / "erasure.json").read_text())
    assert config["format"] == "erasekit-erasure" and config["method"] == "mask"
    assert config["base_model"]["id"] == "black-forest-labs/FLUX.1-schnell"
    assert config["base_model"]["denoiser_class"] == "FluxTransformer2DModel"
    assert config["masked_units_per_kind"] == {"heads": 0, "neurons": 293859, "norm": 62143}
    assert config["stats"]["masked_units"] == 293859 + 62143
    assert set(config["files"]) == {"attn", "ff", "norm"}

    from safetensors import safe_open

    with safe_open(str(target / "masks.safetensors"), "pt") as f:
        keys = list(f.keys())
    # 19 double blocks x 2 streams + 38 single blocks of heads, 19 x 2 feed-forwards, 19 norm1_context
    assert sum(k.startswith("heads/") for k in keys) == 19 * 2 + 38
    assert sum(k.startswith("neurons/") for k in keys) == 19 * 2
    assert sum(k.startswith("norm/") for k in keys) == 19


# --------------------------------------------------------------------------- the real console script
def test_console_script_exit_codes_and_one_line_errors(tmp_path: Path, tiny_model: Path) -> None:
    script = Path(sys.executable).with_name("erasekit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "erasekit.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("erasekit ")

    usage = run("fold", "--model", str(tiny_model), "--masks", "m", "--mode", "squash", "--output", str(tmp_path / "x"))
    assert usage.returncode == 2 and "invalid choice" in usage.stderr

    # fails after the pipeline was loaded (a mask made for another denoiser): no library output around the message
    from erasekit.methods.mask.artifact import save_mask_artifact

    mask = save_mask_artifact(
        tmp_path / "foreign-mask", {}, {"base_model": {"id": "elsewhere", "denoiser_class": "OtherTransformer"}}
    )
    output = tmp_path / "images"
    failed = run("generate", "--model", str(tiny_model), "--masks", str(mask), "--prompt", "a cat", "--device", "cpu",
                 "--output", str(output))  # fmt: skip
    assert failed.returncode == 2
    assert failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("erasekit generate: error: mask ") and "OtherTransformer" in lines[0]
    assert not output.exists() and not list(tmp_path.glob(".images.*"))
