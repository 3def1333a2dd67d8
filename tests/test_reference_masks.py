"""Tests of importing the reference implementation's FLUX masks (``erasekit.methods.mask.reference``)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import FluxTransformer2DModel

from erasekit.arch import FLUX
from erasekit.errors import MaskFileError, MaskMismatchError
from erasekit.inspect import instantiate_denoiser_on_meta
from erasekit.methods.mask import check_artifact, load_mask_artifact
from erasekit.methods.mask.reference import import_minimalist_flux, import_minimalist_flux_artifact, load_reference_list
from reference_data import data_file, needs_data

SCHNELL = "black-forest-labs/FLUX.1-schnell"
REFERENCE = data_file("reference_masks/flux")
needs_reference = needs_data(*(f"reference_masks/flux/{name}.pt" for name in ("attn", "ff", "norm")))


class NotATensor:
    """A custom class: pickling it puts a global in the file that the safe loader must refuse."""

    def __init__(self) -> None:
        self.value = 1


class Trap:
    """Unpickling this runs code (creates a file): only an unsafe loader would do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def schnell() -> torch.nn.Module:
    return instantiate_denoiser_on_meta(SCHNELL)


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """Two double blocks, one single block, 2 heads of 8, width 16 (ff 64, norm 96 / 48)."""
    with torch.device("meta"):
        return FluxTransformer2DModel(
            in_channels=8,
            num_layers=2,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            axes_dims_rope=(2, 2, 4),
        )


def _save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


@needs_reference
def test_import_reference_masks(schnell: torch.nn.Module, tmp_path: Path) -> None:
    logits = import_minimalist_flux(REFERENCE / "attn.pt", REFERENCE / "ff.pt", REFERENCE / "norm.pt", schnell)
    assert all(v.dtype == torch.float32 for v in logits.values())
    by_kind = {
        kind: {k: v for k, v in logits.items() if k.startswith(f"{kind}/")} for kind in ("heads", "neurons", "norm")
    }
    assert len(by_kind["heads"]) == 19 * 2 + 38
    assert len(by_kind["neurons"]) == 38
    assert len(by_kind["norm"]) == 19
    assert sum(int((v <= 0).sum()) for v in by_kind["neurons"].values()) == 293_859
    assert sum(int((v <= 0).sum()) for v in by_kind["norm"].values()) == 62_143
    assert sum(int((v <= 0).sum()) for v in by_kind["heads"].values()) == 0
    assert all(torch.all(v == 3.0) for v in by_kind["heads"].values())
    # Order: ff.pt alternates ff / ff_context per double block.
    ff = load_reference_list(REFERENCE / "ff.pt")
    assert torch.equal(logits["neurons/transformer_blocks.0.ff.net.2"], ff[0].float())
    assert torch.equal(logits["neurons/transformer_blocks.0.ff_context.net.2"], ff[1].float())
    assert torch.equal(logits["neurons/transformer_blocks.18.ff_context.net.2"], ff[37].float())
    norm = load_reference_list(REFERENCE / "norm.pt")
    assert torch.equal(logits["norm/transformer_blocks.7.norm1_context.linear"], norm[7].float())

    out = import_minimalist_flux_artifact(
        REFERENCE / "attn.pt", REFERENCE / "ff.pt", REFERENCE / "norm.pt", SCHNELL, tmp_path / "mask"
    )
    artifact = load_mask_artifact(out)
    sites = check_artifact(artifact, FLUX, schnell)
    assert len(sites) == len(logits)
    assert artifact.logits.keys() == logits.keys()
    assert all(torch.equal(artifact.logits[k], logits[k]) for k in logits)
    config = artifact.config
    assert config["method"] == "mask"
    assert config["source"] == "minimalist-flux reference import"
    assert config["parameterization"] == "binary"
    assert config["unit_kinds"] == ["heads", "neurons", "norm"]
    assert config["base_model"]["id"] == SCHNELL
    assert config["base_model"]["denoiser_class"] == "FluxTransformer2DModel"
    assert set(config["files"]) == {"attn", "ff", "norm"}
    assert all(len(f["sha256"]) == 64 for f in config["files"].values())
    assert config["masked_units_per_kind"] == {"heads": 0, "neurons": 293_859, "norm": 62_143}


@needs_reference
def test_reference_masks_do_not_fit_a_smaller_model(tiny: torch.nn.Module) -> None:
    with pytest.raises(MaskMismatchError, match=r"ff.pt has 38 tensors, this model has 2 double blocks -> expected 4"):
        import_minimalist_flux(None, REFERENCE / "ff.pt", None, tiny)
    with pytest.raises(
        MaskMismatchError, match=r"attn.pt has 57 tensors, this model has 2 double \+ 1 single blocks -> expected 3"
    ):
        import_minimalist_flux(REFERENCE / "attn.pt", None, None, tiny)


def test_tiny_import_maps_streams(tiny: torch.nn.Module, tmp_path: Path) -> None:
    tmp = tmp_path
    attn = _save(tmp / "attn.pt", [torch.tensor([1.0, -1.0]), torch.tensor([-2.0, 2.0]), torch.tensor([0.0, 5.0])])
    ff = _save(tmp / "ff.pt", [torch.full((64,), float(i)) for i in range(4)])
    logits = import_minimalist_flux(attn, ff, None, tiny)
    assert torch.equal(logits["heads/transformer_blocks.0.attn.to_out.0"], torch.tensor([1.0, -1.0]))
    assert torch.equal(logits["heads/transformer_blocks.0.attn.to_add_out"], torch.tensor([1.0, -1.0]))
    assert torch.equal(logits["heads/transformer_blocks.1.attn.to_add_out"], torch.tensor([-2.0, 2.0]))
    assert torch.equal(logits["heads/single_transformer_blocks.0.proj_out"], torch.tensor([0.0, 5.0]))
    # Each key owns its storage (safetensors refuses shared tensors).
    assert (
        logits["heads/transformer_blocks.0.attn.to_out.0"].data_ptr()
        != logits["heads/transformer_blocks.0.attn.to_add_out"].data_ptr()
    )
    assert [
        float(logits[f"neurons/transformer_blocks.{i}.{m}.net.2"][0]) for i in range(2) for m in ("ff", "ff_context")
    ] == [0, 1, 2, 3]
    assert not any(k.startswith("norm/") for k in logits)
    # Keys come in the model's site order.
    order = [s.key for s in FLUX.sites(tiny) if s.key in logits]
    assert list(logits) == order


def test_wrong_shape_refused(tiny: torch.nn.Module, tmp_path: Path) -> None:
    ff = _save(tmp_path / "ff.pt", [torch.zeros(64), torch.zeros(64), torch.zeros(64), torch.zeros(12288)])
    with pytest.raises(
        MaskMismatchError,
        match=r"ff.pt tensor 3 has shape \(12288,\), "
        r"this model's transformer_blocks.1.ff_context.net.2 has \(64,\) neurons",
    ):
        import_minimalist_flux(None, ff, None, tiny)
    norm = _save(tmp_path / "norm.pt", [torch.zeros(96), torch.zeros(48)])
    with pytest.raises(MaskMismatchError, match=r"norm.pt tensor 1 has shape \(48,\).*has \(96,\) norm"):
        import_minimalist_flux(None, None, norm, tiny)


def test_no_files_given(tiny: torch.nn.Module) -> None:
    with pytest.raises(MaskFileError, match="at least one of --attn, --ff, --norm"):
        import_minimalist_flux(None, None, None, tiny)


def test_custom_class_pickle_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "custom.pt", [NotATensor()])
    with pytest.raises(MaskFileError, match="refused by the safe loader") as err:
        load_reference_list(path)
    assert "NotATensor" in str(err.value)
    assert "\n" not in str(err.value)
    assert "weights_only=False" not in str(err.value)  # never relay torch's advice to load unsafely


def test_code_in_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "was_unpickled"
    path = _save(tmp_path / "trap.pt", [Trap(marker)])
    assert not marker.exists()
    with pytest.raises(MaskFileError):
        load_reference_list(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ({"a": torch.zeros(3)}, "holds a dict, expected a list of 1-D tensors"),
        (torch.zeros(3), "holds a Tensor, expected a list"),
        ([torch.zeros(3), 4], "item 1 is a int"),
        ([torch.zeros(2, 3)], r"tensor 0 has shape \(2, 3\)"),
        ([torch.tensor([0.0, float("nan")])], "NaN"),
    ],
)
def test_not_a_list_of_vectors(tmp_path: Path, content: object, message: str) -> None:
    path = _save(tmp_path / "bad.pt", content)
    with pytest.raises(MaskFileError, match=message):
        load_reference_list(path)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(MaskFileError, match="does not exist"):
        load_reference_list(tmp_path / "absent.pt")
    with pytest.raises(MaskFileError, match="is a folder"):
        load_reference_list(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file at all")
    with pytest.raises(MaskFileError, match="corrupt or not a PyTorch file") as err:
        load_reference_list(garbage)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.pt"
    full = _save(tmp_path / "full.pt", [torch.zeros(1000)])
    truncated.write_bytes(full.read_bytes()[:300])
    with pytest.raises(MaskFileError, match="corrupt or not a PyTorch file"):
        load_reference_list(truncated)


def test_bfloat16_list_loads(tmp_path: Path) -> None:
    path = _save(tmp_path / "ok.pt", [torch.tensor([3.0, -1.0], dtype=torch.bfloat16)])
    [tensor] = load_reference_list(path)
    assert tensor.dtype == torch.bfloat16 and tensor.tolist() == [3.0, -1.0]
