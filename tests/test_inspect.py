"""Tests of ``erasekit.inspect``: meta-device denoisers and unit counts without weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import FluxTransformer2DModel

from erasekit.errors import ModelLoadError
from erasekit.inspect import format_inspection, inspect_model, instantiate_denoiser_on_meta, looks_like_path

SCHNELL = "black-forest-labs/FLUX.1-schnell"

TINY = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=12,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline-like folder whose transformer/ holds a saved tiny FluxTransformer2DModel."""
    root = tmp_path_factory.mktemp("tiny_pipe")
    torch.manual_seed(0)
    FluxTransformer2DModel(**TINY).save_pretrained(root / "transformer")
    return root


def test_full_schnell_counts_on_meta() -> None:
    info = inspect_model(SCHNELL)
    units = info["units"]
    assert info["denoiser_class"] == "FluxTransformer2DModel"
    assert info["family"] == "flux"
    assert info["blocks"] == {"double": 19, "single": 38}
    assert units["per_kind"]["heads"] == 1_824
    assert units["per_kind"]["neurons"] == 933_888
    assert units["per_kind"]["norm"] == 19 * 2 * 18_432 + 38 * 9_216
    assert units["total"] == 1_824 + 933_888 + 19 * 2 * 18_432 + 38 * 9_216
    per_block = units["per_block_type"]
    assert per_block["heads:double/image"] == per_block["heads:double/text"] == 19 * 24
    assert per_block["heads:single"] == 38 * 24
    assert per_block["neurons:double/image"] == per_block["neurons:double/text"] == 19 * 12_288
    assert per_block["neurons:single"] == 38 * 12_288
    assert per_block["norm:double/image"] == per_block["norm:double/text"] == 19 * 18_432
    assert per_block["norm:single"] == 38 * 9_216
    # FLUX.1 has about 11.9 B parameters; counted from meta shapes, no storage allocated.
    assert info["parameters"] == 11_891_178_560
    assert info["config"]["num_layers"] == 19
    json.dumps(info)  # the CLI's --json prints it as is

    text = format_inspection(info)
    assert "FluxTransformer2DModel" in text and "11,891,178,560" in text
    assert "19 double, 38 single" in text
    assert "933,888" in text and "1,824" in text and "double/text" in text


def test_meta_denoiser_has_no_storage() -> None:
    denoiser = instantiate_denoiser_on_meta("black-forest-labs/FLUX.1-dev")
    assert isinstance(denoiser, FluxTransformer2DModel)
    assert denoiser.config.guidance_embeds is True
    assert all(p.device.type == "meta" for p in denoiser.parameters())
    assert all(b.device.type == "meta" for b in denoiser.buffers())


@pytest.mark.parametrize("where", ["pipeline", "transformer", "config"])
def test_tiny_saved_model_from_path(tiny_dir: Path, where: str) -> None:
    model = {
        "pipeline": tiny_dir,
        "transformer": tiny_dir / "transformer",
        "config": tiny_dir / "transformer" / "config.json",
    }[where]
    info = inspect_model(str(model))
    inner = TINY["num_attention_heads"] * TINY["attention_head_dim"]  # 32
    assert info["model"] == str(model)
    assert info["blocks"] == {"double": 2, "single": 1}
    assert info["units"]["per_kind"] == {
        "heads": 2 * 2 * 2 + 1 * 2,
        "neurons": 2 * 2 * 4 * inner + 1 * 4 * inner,
        "norm": 2 * 2 * 6 * inner + 1 * 3 * inner,
    }
    real = FluxTransformer2DModel.from_pretrained(tiny_dir / "transformer")
    assert info["parameters"] == sum(p.numel() for p in real.parameters())


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model path .* does not exist"):
        instantiate_denoiser_on_meta(str(tmp_path / "no_such_model"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        instantiate_denoiser_on_meta("./no_such_model_here")


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no transformer/config.json or config.json"):
        instantiate_denoiser_on_meta(str(tmp_path))


@pytest.mark.parametrize("layout", ["transformer", "unet"])
def test_unsupported_class(tmp_path: Path, layout: str) -> None:
    name = "NotARealTransformer2DModel" if layout == "transformer" else "NotARealUNet2DModel"
    (tmp_path / layout).mkdir()
    (tmp_path / layout / "config.json").write_text(json.dumps({"_class_name": name}))
    with pytest.raises(ModelLoadError, match=f"unsupported model family.*{name}.*supported: .*FluxTransformer2DModel"):
        instantiate_denoiser_on_meta(str(tmp_path))


def test_config_without_class_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_layers": 1}))
    with pytest.raises(ModelLoadError, match="no _class_name"):
        instantiate_denoiser_on_meta(str(tmp_path))


def test_unknown_hub_id_offline() -> None:
    with pytest.raises(
        ModelLoadError, match="cannot load the denoiser config of hub id 'nobody-here/no-such-model'"
    ) as err:
        instantiate_denoiser_on_meta("nobody-here/no-such-model")
    assert "\n" not in str(err.value)


def test_looks_like_path(tmp_path: Path) -> None:
    assert looks_like_path(str(tmp_path))
    assert looks_like_path("./model")
    assert looks_like_path("~/models/flux")
    assert looks_like_path("models/flux/transformer")
    assert not looks_like_path("black-forest-labs/FLUX.1-schnell")
    assert not looks_like_path("owner/name")
