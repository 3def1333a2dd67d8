"""The contract every registered erasure method keeps, on the tiny pipeline of every family it supports.

Parametrised over methods x families (as peft's common tester is over tuners): fit -> generate with and
without -> apply then remove restores the original outputs bit-for-bit -> save/load round trip -> fold
(or its one-line refusal) -> stock diffusers loads the fold. Then the registry, the artefact format and
bad input, for any method.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from erasekit.arch import architecture_for
from erasekit.cli import main
from erasekit.config import EraseConfig, load_config
from erasekit.errors import (
    ConfigError,
    ErasureFileError,
    ErasureMismatchError,
    UnknownMethodError,
    UnsupportedError,
)
from erasekit.generate import generate_latents
from erasekit.methods import (
    FORMAT,
    FORMAT_VERSION,
    RECORD_NAME,
    Erasure,
    Method,
    apply_erasures,
    available_methods,
    fold_erasures,
    get_method,
    load_erasure,
    save_folded_pipeline,
)
from erasekit.methods.base import base_model_record
from erasekit.tiny import (
    build_tiny_dit_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_pixart_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd_pipeline,
)
from erasekit.training.run import make_accelerator

pytestmark = pytest.mark.usefixtures("one_thread")

#: Per family: the tiny pipeline builder, a recipe, and the overrides its prompts and sampling need.
FAMILIES: dict[str, tuple[Any, str | None, list[str]]] = {
    "flux": (build_tiny_flux_pipeline, None, ["concept.concept=cat", "concept.anchor=dog"]),
    "unet": (
        build_tiny_sd_pipeline,
        None,
        ["concept.concept=cat", "concept.anchor=dog", "sampling.guidance_scale=3.0"],
    ),
    "sd3": (
        build_tiny_sd3_pipeline,
        None,
        ["concept.concept=cat", "concept.anchor=dog", "sampling.guidance_scale=4.5"],
    ),
    "pixart": (build_tiny_pixart_pipeline, "configs/pixart-sigma.yaml", ["concept.concept=cat", "concept.anchor=dog"]),
    "dit": (
        build_tiny_dit_pipeline,
        "configs/dit-xl-2.yaml",
        [
            "concept.concept=golden retriever",
            "concept.anchor=tabby cat",
            "concept.preservation_prompts=[goldfish, volcano]",
        ],
    ),
}
SHARED = [
    "model.device=cpu",
    "model.dtype=float32",
    "sampling.steps=2",
    "sampling.resolution=32",
    "sampling.max_sequence_length=16",
    "train.checkpoint_every=0",
    "train.trackers=[]",
]
#: Per method: the overrides of a fit that changes the tiny model within seconds.
METHOD_OVERRIDES: dict[str, list[str]] = {
    "mask": [
        "train.iterations=2",
        "mask.heads.enabled=true",
        "mask.init_lambda=0.5",
        "mask.heads.lr=2.0",
        "mask.neurons.lr=2.0",
        "mask.norm.lr=2.0",
    ],
    # a strong edit (little pull to the original weights, no preservation) so the tiny outputs move
    "uce": ["uce.lam=0.01", "uce.preserve_scale=0.0"],
    "concept-prune": ["concept_prune.top_share=0.05"],
    # esd-u and attn: the parameter sets DiT (class-conditioned, no text projections) has too
    "esd": ["train.iterations=2", "esd.variant=esd-u", "esd.lr=1e-3", "esd.start_guidance=2.0"],
    # ESD's run plus the adversary, on a few candidates of the tiny vocabularies (EAP has no DiT: no text)
    "eap": [
        "train.iterations=2",
        "eap.variant=esd-u",
        "eap.lr=1e-3",
        "eap.start_guidance=2.0",
        "eap.nearest=40",
        "eap.centres=4",
    ],
    # ESD's run against a 2-step inner attack, with the retain loss (no DiT: the attack moves text conditioning)
    "advunlearn": [
        "train.iterations=2",
        "advunlearn.variant=esd-u",
        "advunlearn.lr=1e-3",
        "advunlearn.start_guidance=2.0",
        "advunlearn.attack_steps=2",
        "advunlearn.attack_lr=0.05",
    ],
    "ca": ["train.iterations=2", "ca.parameters=attn", "ca.lr=1e-3", "ca.anchor_images=2", "ca.prior_weight=0.5"],
    # inference-time: SLD changes classifier-free guidance, which acts above scale 1
    "sld": ["sampling.guidance_scale=4.0", "sld.preset=max"],
    "flowedit": [],
}
PROMPTS = {"dit": ["golden retriever", "volcano"]}


def _config(method: str, family: str, **extra: str) -> EraseConfig:
    _, recipe, overrides = FAMILIES[family]
    extras = [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(
        recipe, [f"method={method}", "model.id=tiny", *SHARED, *overrides, *METHOD_OVERRIDES.get(method, []), *extras]
    )


CASES = [
    pytest.param(name, family, id=f"{name}-{family}")
    for name in available_methods()
    for family in get_method(name).families
    if family in FAMILIES
]


def _latents(pipe: Any, family: str, config: EraseConfig) -> torch.Tensor:
    s = config.sampling
    prompts = PROMPTS.get(family, ["a photo of a cat", "a red car on a road"])
    latents, _ = generate_latents(
        pipe,
        prompts,
        [3, 4],
        steps=s.steps,
        resolution=s.resolution,
        guidance_scale=s.guidance_scale,
        max_sequence_length=s.max_sequence_length,
    )
    return latents


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(("name", "family"), CASES)
def test_fit_apply_remove_save_load_fold(name: str, family: str, tmp_path: Path) -> None:
    method = get_method(name)
    build = FAMILIES[family][0]
    pipe = build(seed=0)
    config = _config(name, family)
    method.check_family(architecture_for(pipe))
    output = tmp_path / "erasure"
    erasure = method.fit(pipe, config, output, accelerator=make_accelerator(config, tmp_path / "logs"), model_id="tiny")
    assert isinstance(erasure, method.erasure_class) and erasure.method == name

    # the artefact: one format for every method, its payload pinned by sha256
    record = json.loads((output / RECORD_NAME).read_text())
    assert (record["format"], record["format_version"], record["method"]) == (FORMAT, FORMAT_VERSION, name)
    assert record["base_model"]["id"] == "tiny" and len(record["base_model"]["denoiser_config_sha256"]) == 64
    assert record["concept"] == config.concept.concept and record["anchor"] == config.concept.anchor
    assert record["settings"]["method"] == name
    assert record["generation"]["steps"] == 2 and record["generation"]["resolution"] == 32
    assert set(record["payload"]) == set(erasure.payload)
    for file, digest in record["payload"].items():
        assert hashlib.sha256((output / file).read_bytes()).hexdigest() == digest
    cost = erasure.cost
    assert cost.changes == method.changes and cost.seconds > 0 and cost.peak_memory_bytes > 0
    assert cost.artifact_bytes == sum((output / f).stat().st_size for f in erasure.payload)
    assert cost.units_changed > 0 or cost.parameters_changed > 0 or not method.trains

    # generate without, with, and without again: remove() restores the original outputs bit for bit
    original = _latents(pipe, family, config)
    handle = erasure.apply(pipe)
    erased = _latents(pipe, family, config)
    handle.remove()
    assert torch.equal(_latents(pipe, family, config), original)
    assert not torch.equal(erased, original)

    # save/load round trip: the loaded erasure (and a copy saved elsewhere) gives the same outputs
    loaded = load_erasure(output)
    assert type(loaded) is type(erasure) and loaded.record == record
    copy = loaded.save(tmp_path / "copy")
    assert json.loads((copy / RECORD_NAME).read_text())["payload"] == record["payload"]
    handle = apply_erasures(pipe, [copy])
    assert torch.equal(_latents(pipe, family, config), erased)
    handle.remove()
    assert torch.equal(_latents(pipe, family, config), original)

    # fold, or its one-line refusal; stock diffusers loads the fold
    if not erasure.foldable:
        with pytest.raises(UnsupportedError, match="cannot be folded"):
            fold_erasures(pipe, [output], "zero")
        return
    for mode in erasure.fold_modes:
        folded = fold_erasures(build(seed=0), [output], mode)
        torch.testing.assert_close(_latents(folded, family, config), erased, rtol=1e-4, atol=1e-4)
        target = save_folded_pipeline(folded, tmp_path / f"folded-{mode}", mode)
        from diffusers import DiffusionPipeline

        stock = DiffusionPipeline.from_pretrained(target, trust_remote_code=True)
        assert type(stock).__name__ == type(pipe).__name__


@pytest.mark.parametrize(("name", "family"), CASES[:1])
def test_an_erasure_of_another_model_is_refused(name: str, family: str, tmp_path: Path) -> None:
    """Applied to another family, or to a model of the same class with another config: one line."""
    pipe = FAMILIES[family][0](seed=0)
    config = _config(name, family)
    get_method(name).fit(pipe, config, tmp_path / "e", accelerator=make_accelerator(config, tmp_path / "l"))
    other_family = next(f for f in FAMILIES if f != family)
    with pytest.raises(ErasureMismatchError, match="was made for"):
        apply_erasures(FAMILIES[other_family][0](seed=0), [tmp_path / "e"])
    record = json.loads((tmp_path / "e" / RECORD_NAME).read_text())
    record["base_model"]["denoiser_config_sha256"] = "0" * 64
    (tmp_path / "e" / RECORD_NAME).write_text(json.dumps(record))
    with pytest.raises(ErasureMismatchError, match="was made for another"):
        apply_erasures(pipe, [tmp_path / "e"])


# --------------------------------------------------------------------------- the registry
def test_the_registry_lists_and_refuses_by_name() -> None:
    assert "mask" in available_methods() and available_methods() == sorted(available_methods())
    with pytest.raises(UnknownMethodError) as info:
        get_method("nope")
    assert str(info.value) == f"unknown method 'nope'; available methods: {', '.join(available_methods())}"
    assert isinstance(info.value, ConfigError)
    mask = get_method("mask")
    assert mask.describe() == {
        "name": "mask",
        "changes": "mask over heads/neurons/channels",
        "trains": True,
        "needs_cfg": False,
        "families": ["dit", "flux", "pixart", "sd3", "unet"],
        "several_concepts": True,
        "summary": mask.summary,
    }
    assert mask.settings(EraseConfig()) is not None and isinstance(mask.settings(EraseConfig()), mask.config_class)


def test_a_method_refuses_a_family_it_does_not_support() -> None:
    class FluxOnly(Method):
        name = "flux-only"
        families = ("flux",)

        def fit(self, *args: Any, **kwargs: Any) -> Erasure:
            raise AssertionError("not called")

    FluxOnly().check_family(architecture_for(build_tiny_flux_pipeline(seed=0)))
    with pytest.raises(
        UnsupportedError, match="^method 'flux-only' does not support the unet family; it supports: flux$"
    ):
        FluxOnly().check_family(architecture_for(build_tiny_sd_pipeline(seed=0)))


# --------------------------------------------------------------------------- the artefact format
def _legacy_mask_folder(folder: Path, pipe: Any, close: int) -> Path:
    """A mask folder as erasekit wrote it before the erasure format: mask_config.json + masks.safetensors."""
    from erasekit.arch import denoiser_of

    arch, denoiser = denoiser_of(pipe)
    sites = arch.sites(denoiser)
    logits = {s.key: torch.full((s.num_units,), 3.0) for s in sites}
    logits[sites[0].key][:close] = -3.0
    folder.mkdir()
    save_file(logits, str(folder / "masks.safetensors"), metadata={"format": "erasekit-mask"})
    config = {
        "format": "erasekit-mask",
        "format_version": 1,
        "erasekit_version": "0.1.0",
        "method": "mask",
        "base_model": base_model_record(denoiser, "tiny"),
        "concept": "cat",
        "anchor": "dog",
        "settings": {"sampling": {"steps": 3, "resolution": 32, "generation_steps": 5}},
        "training": {"iterations": 1, "seconds": 1.5, "processes": 1},
        "stats": {"masked_units": close, "total_units": sum(s.num_units for s in sites), "masked_fraction": 0.01},
    }
    (folder / "mask_config.json").write_text(json.dumps(config))
    return folder


def test_mask_folders_of_earlier_versions_keep_loading(tmp_path: Path) -> None:
    from erasekit.methods.mask import MaskErasure

    pipe = build_tiny_flux_pipeline(seed=0)
    folder = _legacy_mask_folder(tmp_path / "old", pipe, close=2)
    erasure = load_erasure(folder)
    assert isinstance(erasure, MaskErasure) and erasure.masked_fraction > 0
    assert erasure.generation_defaults == {"steps": 5, "resolution": 32}
    assert erasure.cost.units_changed == 2 and erasure.cost.seconds == 1.5
    assert erasure.cost.artifact_bytes == (folder / "masks.safetensors").stat().st_size
    config = _config("mask", "flux")
    original = _latents(pipe, "flux", config)
    handle = apply_erasures(pipe, [folder])
    erased = _latents(pipe, "flux", config)
    handle.remove()
    assert not torch.equal(erased, original) and torch.equal(_latents(pipe, "flux", config), original)
    # saved again, it is an erasure folder with the same logits
    again = erasure.save(tmp_path / "new")
    assert json.loads((again / RECORD_NAME).read_text())["format"] == FORMAT
    assert (again / "masks.safetensors").read_bytes() == (folder / "masks.safetensors").read_bytes()
    # two masks combine by logical AND, old and new format alike
    other = _legacy_mask_folder(tmp_path / "other", pipe, close=4)
    handle = apply_erasures(pipe, [again, other])
    assert torch.equal(_latents(pipe, "flux", config), _with(pipe, [other], config))
    handle.remove()


def _with(pipe: Any, folders: list[Path], config: EraseConfig) -> torch.Tensor:
    handle = apply_erasures(pipe, folders)
    try:
        return _latents(pipe, "flux", config)
    finally:
        handle.remove()


def test_bad_artefacts_are_refused_in_one_line(tmp_path: Path) -> None:
    pipe = build_tiny_flux_pipeline(seed=0)
    good = load_erasure(_legacy_mask_folder(tmp_path / "old", pipe, close=1)).save(tmp_path / "good")

    def variant(name: str, change: Any) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file in good.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        record = json.loads((folder / RECORD_NAME).read_text())
        change(folder, record)
        if (folder / RECORD_NAME).is_file() and record:
            (folder / RECORD_NAME).write_text(json.dumps(record))
        return folder

    newer = variant("newer", lambda f, r: r.update(format_version=FORMAT_VERSION + 1))
    unknown = variant("unknown", lambda f, r: r.update(method="no-such-method"))
    corrupt = variant("corrupt", lambda f, r: (f / "masks.safetensors").write_bytes(b"\0" * 64))
    missing = variant("missing", lambda f, r: (f / "masks.safetensors").unlink())
    cases = {
        newer: "newer than the version 1 that erasekit",
        unknown: "of method 'no-such-method', which this erasekit does not know",
        corrupt: "does not match the sha256 recorded in erasure.json",
        missing: "has no masks.safetensors",
        tmp_path / "absent": "does not exist",
    }
    for folder, message in cases.items():
        with pytest.raises(ErasureFileError, match=message) as info:
            load_erasure(folder)
        assert "\n" not in str(info.value)


def test_the_cli_refuses_bad_erasures_with_exit_2_and_writes_nothing(
    tiny_flux_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from erasekit.pipeline import load_pipeline

    pipe = load_pipeline(tiny_flux_path, "float32", "cpu")
    good = load_erasure(_legacy_mask_folder(tmp_path / "old", pipe, close=1)).save(tmp_path / "good")
    record = json.loads((good / RECORD_NAME).read_text())
    record["format_version"] = 99
    (good / RECORD_NAME).write_text(json.dumps(record))
    capsys.readouterr()  # loading the pipeline above drew progress bars
    out = tmp_path / "images"
    argv = ["generate", "--model", tiny_flux_path, "--erasure", str(good), "--prompt", "a cat", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("erasekit generate: error: ") and "format_version 99" in err and err.count("\n") == 1
    assert not out.exists()
    folded = tmp_path / "folded"
    assert main(["fold", "--model", tiny_flux_path, "--masks", str(good), "--output", str(folded)]) == 2
    assert not folded.exists()
    assert main(["erase", "--method", "nope", "--model", tiny_flux_path, "--output", str(tmp_path / "e")]) == 2
    assert f"unknown method 'nope'; available methods: {', '.join(available_methods())}" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_methods_command_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == available_methods()
    assert rows[0]["changes"] and isinstance(rows[0]["trains"], bool) and isinstance(rows[0]["needs_cfg"], bool)
    assert main(["methods"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["method", "trains", "CFG", "changes", "families"]
    mask_row = next(line for line in text[1:] if line.startswith("mask "))  # rows are sorted by name
    assert "mask over heads/neurons/channels" in mask_row and "flux" in mask_row


def test_an_inference_time_erasure_is_refused_by_fold_in_one_line(tmp_path: Path) -> None:
    """The base class's refusal, for methods that change sampling rather than weights."""

    class Guidance(Erasure):
        method = "guidance-only"

        def apply(self, pipe: Any) -> Any:
            raise AssertionError("not called")

        def write_payload(self, folder: Path) -> None:
            pass

        @classmethod
        def from_folder(cls, folder: Path, record: dict[str, Any]) -> Erasure:
            return cls(record, folder)

    with pytest.raises(UnsupportedError) as info:
        Guidance({}).check_foldable("zero")
    assert str(info.value) == (
        "a guidance-only erasure changes sampling, not weights, and cannot be folded; "
        "use it with `erasekit generate --erasure` or `erasekit evaluate --erasure`"
    )
    saved = Guidance({"concept": "cat"}).save(tmp_path / "g")
    assert json.loads((saved / RECORD_NAME).read_text())["payload"] == {}


# --------------------------------------------------------------------------- bit-identity with main
#: sha256 of masks.safetensors from a 3-iteration run of the tiny FLUX training config (conftest's), computed
#: with erasekit at main 5ea7938 (before the methods layer) in a separate worktree: the move changed no bit.
MAIN_MASK_SHA256 = "3c623a7b9167c96fcc1c0cf61e9294a5aaed73077f46816fc15266dc78ce4725"


@pytest.mark.slow
def test_the_mask_is_bit_identical_to_the_one_main_trains(tiny_train_config: Any, tmp_path: Path) -> None:
    from erasekit.methods import erase

    erasure = erase(tiny_train_config(train__iterations=3), tmp_path / "mask")
    assert hashlib.sha256((tmp_path / "mask" / "masks.safetensors").read_bytes()).hexdigest() == MAIN_MASK_SHA256
    assert erasure.record["payload"]["masks.safetensors"] == MAIN_MASK_SHA256
