"""Every family through the CLI: tiny-model -> erase -> generate -> fold --mode prune -> generate from
the folded folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from erasekit.cli import main

FAMILIES = ["flux", "sd", "sdxl", "sd3", "pixart", "dit"]


def _concept_flags(family: str, model: str) -> list[str]:
    if family != "dit":
        return ["--concept", "cat", "--anchor", "dog"]
    labels = list(json.loads(open(f"{model}/model_index.json").read())["id2label"].values())
    first, second = labels[0].split(",")[0], labels[1].split(",")[0]
    # DiT prompts are class names: no templates around them
    return [
        "--concept",
        first,
        "--anchor",
        second,
        "--set",
        'concept.templates=["{concept}"]',
        "--set",
        f'concept.preservation_prompts=["{second}"]',
    ]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_journey(family, tmp_path):
    model, mask = str(tmp_path / "tiny"), str(tmp_path / "mask")
    assert main(["tiny-model", "--family", family, "--output", model]) == 0
    flags = _concept_flags(family, model)
    assert (
        main(
            [
                "erase",
                "--model",
                model,
                *flags,
                "--steps",
                "2",
                "--resolution",
                "32",
                "--iterations",
                "2",
                "--set",
                "model.device=cpu",
                "--set",
                "sampling.guidance_scale=2.0",
                "--set",
                "mask.init_lambda=0.2",
                "--set",
                "mask.heads.enabled=true",
                "--set",
                "mask.heads.lr=3",
                "--set",
                "mask.neurons.lr=3",
                "--output",
                mask,
            ]
        )
        == 0
    )
    record = json.loads(open(f"{mask}/erasure.json").read())
    assert record["stats"]["masked_units"] > 0
    prompt = flags[1] if family == "dit" else "a photo of a cat"
    for name, masks in (("masked", ["--masks", mask]), ("plain", [])):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    model,
                    *masks,
                    "--prompt",
                    prompt,
                    "--seed",
                    "3",
                    "--steps",
                    "2",
                    "--resolution",
                    "32",
                    "--guidance",
                    "2.0",
                    "--output",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    assert (
        main(["fold", "--model", model, "--masks", mask, "--mode", "prune", "--output", str(tmp_path / "pruned")]) == 0
    )
    assert (
        main(
            [
                "generate",
                "--model",
                str(tmp_path / "pruned"),
                "--prompt",
                prompt,
                "--seed",
                "3",
                "--steps",
                "2",
                "--resolution",
                "32",
                "--guidance",
                "2.0",
                "--output",
                str(tmp_path / "folded"),
            ]
        )
        == 0
    )

    def image(folder: str) -> np.ndarray:
        (png,) = (tmp_path / folder).glob("*.png")
        return np.asarray(Image.open(png), dtype=np.int16)

    assert np.abs(image("folded") - image("masked")).max() <= 1  # equal up to 8-bit rounding
    assert np.abs(image("plain") - image("masked")).max() > 1  # the mask changed the image


def test_sampling_scheduler_is_applied_and_checked(tmp_path):
    from erasekit.config import load_config
    from erasekit.errors import ConfigError
    from erasekit.methods.mask.trainer import MaskTrainer
    from erasekit.tiny import build_tiny_sd_pipeline
    from erasekit.training import make_accelerator

    pipe = build_tiny_sd_pipeline(seed=0)
    config = load_config(None, ["model.device=cpu", "concept.concept=cat", "sampling.scheduler=euler"])
    MaskTrainer(pipe, config, tmp_path / "mask", make_accelerator(config, tmp_path / "logs"))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ConfigError, match="sampling.scheduler: 'heun' is not one of pipeline, ddim"):
        load_config(None, ["sampling.scheduler=heun"])
