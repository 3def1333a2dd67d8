"""Mask hooks, parameterisations and artefacts on a tiny FLUX transformer."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel

from erasekit.arch import FLUX, architecture_for, count_units, select_sites
from erasekit.errors import MaskFileError, MaskMismatchError
from erasekit.methods.base import denoiser_config_hash
from erasekit.methods.mask import (
    MaskedModel,
    MaskSettings,
    base_model_record,
    check_artifact,
    combine_logits,
    load_mask_artifact,
    mask_values,
    save_mask_artifact,
)


def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    config.update(overrides)
    return FluxTransformer2DModel(**config).to(dtype)


def forward(model: FluxTransformer2DModel, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = model.dtype
    return model(
        hidden_states=torch.randn(1, 16, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(1, 32, generator=g).to(dtype),
        timestep=torch.tensor([0.5]).to(dtype),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(5, 3),
        return_dict=False,
    )[0]


def test_sites_cover_every_unit_kind_and_select_by_regex():
    model = tiny_transformer()
    sites = FLUX.sites(model)
    counts = count_units(sites)["per_kind"]
    # 2 heads per stream in 2 double blocks (x2 streams) + 2 heads in 2 single blocks
    assert counts["heads"] == 2 * 2 * 2 + 2 * 2
    assert counts["neurons"] == 2 * 2 * 128 + 2 * 128
    assert counts["norm"] == 2 * 2 * 6 * 32 + 2 * 3 * 32
    single_only = select_sites(sites, {"neurons": (True, r"^single_", None)})
    assert {s.module for s in single_only} == {
        "single_transformer_blocks.0.proj_out",
        "single_transformer_blocks.1.proj_out",
    }
    no_context = select_sites(sites, {"neurons": (True, ".*", "context"), "norm": (False, ".*", None)})
    assert all("context" not in s.module and s.kind == "neurons" for s in no_context)


def test_all_ones_mask_and_removed_hooks_are_exact():
    model = tiny_transformer()
    reference = forward(model)
    masked = MaskedModel(model, FLUX.sites(model), init_lambda=3.0)
    with masked:
        assert torch.equal(forward(model), reference)  # binary mask of all-positive logits multiplies by exactly 1
        with torch.no_grad():
            for p in masked.logits:
                p[0] = -1.0
        changed = forward(model)
        assert not torch.allclose(changed, reference)
        with masked.disabled():
            assert torch.equal(forward(model), reference)
        assert torch.equal(forward(model), changed)
    assert torch.equal(forward(model), reference)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_masking_a_head_equals_zeroing_its_channels():
    model = tiny_transformer()
    site = next(s for s in FLUX.sites(model) if s.module == "transformer_blocks.0.attn.to_out.0")
    masked = MaskedModel(model, [site])
    with torch.no_grad():
        masked.logits[0].copy_(torch.tensor([-1.0, 1.0]))
    with masked:
        hooked = forward(model)
    with torch.no_grad():
        model.get_submodule(site.module).weight[:, :16] = 0  # head 0 = the first head_dim input channels
    assert torch.allclose(forward(model), hooked, atol=1e-6)


def test_logits_stay_float32_for_a_bfloat16_model_and_receive_gradients():
    model = tiny_transformer(dtype=torch.bfloat16)
    model.requires_grad_(False)
    masked = MaskedModel(model, FLUX.sites(model), MaskSettings("sigmoid"))
    assert all(p.dtype == torch.float32 for p in masked.logits)
    masked.set_mode("train")
    with masked:
        forward(model).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in masked.logits)
    assert any(p.grad.abs().sum() > 0 for p in masked.logits)


def test_parameterizations():
    logits = torch.tensor([-4.0, -0.5, 0.5, 4.0], requires_grad=True)
    sig = mask_values(logits, MaskSettings("sigmoid"))
    assert torch.allclose(sig, torch.sigmoid(logits))
    hard = mask_values(logits, MaskSettings("binary", straight_through=True))
    assert hard.tolist() == [0.0, 0.0, 1.0, 1.0]
    hard.sum().backward()
    assert torch.allclose(logits.grad, torch.sigmoid(logits) * (1 - torch.sigmoid(logits)))  # straight-through
    with pytest.raises(ValueError):
        mask_values(logits, MaskSettings("hard_concrete"))
    u = torch.full((4,), 0.5)
    hc = mask_values(logits.detach(), MaskSettings("hard_concrete"), u)
    assert hc[0] == 0.0 and hc[-1] == 1.0 and ((hc >= 0) & (hc <= 1)).all()
    with pytest.raises(ValueError):
        MaskSettings("gumbel")


def test_hard_concrete_noise_is_reused_until_resampled():
    model = tiny_transformer()
    masked = MaskedModel(model, FLUX.sites(model)[:2], MaskSettings("hard_concrete"), init_lambda=0.0)
    masked.set_mode("train")
    masked.resample_noise(torch.Generator().manual_seed(0))
    first = masked.mask(0).clone()
    assert torch.equal(masked.mask(0), first)  # the recomputation sees the same gates
    masked.resample_noise(torch.Generator().manual_seed(1))
    assert not torch.equal(masked.mask(0), first)
    masked.resample_noise(torch.Generator().manual_seed(0))
    assert torch.equal(masked.mask(0), first)


def test_sparsity_penalty_counts_closed_gates_per_kind():
    model = tiny_transformer()
    masked = MaskedModel(model, FLUX.sites(model), MaskSettings("sigmoid"), init_lambda=0.0)
    # sigmoid(0) = 0.5 closed on average, for each of the 3 kinds
    assert torch.isclose(masked.sparsity_penalty(), torch.tensor(1.5))
    with torch.no_grad():
        for p in masked.logits:
            p.fill_(20.0)
    assert masked.sparsity_penalty() < 1e-6


def _artifact(model, tmp_path, name, fill):
    sites = FLUX.sites(model)
    logits = {s.key: torch.full((s.num_units,), 1.0) for s in sites}
    for key, index in fill:
        logits[key][index] = -1.0
    record = {"method": "mask", "base_model": base_model_record(model, "tiny")}
    return save_mask_artifact(tmp_path / name, logits, record)


def test_artifact_roundtrip_and_combination(tmp_path):
    model = tiny_transformer()
    key = "neurons/transformer_blocks.0.ff.net.2"
    a = load_mask_artifact(_artifact(model, tmp_path, "a", [(key, 0)]))
    b = load_mask_artifact(_artifact(model, tmp_path, "b", [(key, 1)]))
    assert a.config["format"] == "erasekit-erasure" and a.config["erasekit_version"]
    assert len(check_artifact(a, FLUX, model)) == len(FLUX.sites(model))
    combined = combine_logits([a, b])
    keep = combined[key] > 0
    assert not keep[0] and not keep[1] and keep[2:].all()  # a unit survives only if every mask keeps it
    assert not list(tmp_path.glob(".*partial"))


def test_generation_steps_override_the_training_trajectory(tmp_path):
    model = tiny_transformer()
    sites = FLUX.sites(model)
    logits = {s.key: torch.ones(s.num_units) for s in sites}
    sampling = {"steps": 8, "resolution": 32, "guidance_scale": 6.0, "generation_steps": None}
    record = {"method": "mask", "base_model": base_model_record(model, "tiny"), "settings": {"sampling": sampling}}
    trained = load_mask_artifact(save_mask_artifact(tmp_path / "a", logits, record))
    assert trained.sampling_defaults == {"steps": 8, "resolution": 32, "guidance_scale": 6.0}
    record["settings"]["sampling"] = {**sampling, "generation_steps": 12}
    artifact = load_mask_artifact(save_mask_artifact(tmp_path / "b", logits, record))
    assert artifact.sampling_defaults == {"steps": 12, "resolution": 32, "guidance_scale": 6.0}
    assert artifact.config["settings"]["sampling"]["steps"] == 8  # what it was trained on stays on record


def test_artifact_for_another_model_is_refused_by_name(tmp_path):
    small = tiny_transformer()
    wider = tiny_transformer(num_attention_heads=3, attention_head_dim=16)
    artifact = load_mask_artifact(_artifact(small, tmp_path, "a", []))
    with pytest.raises(MaskMismatchError, match="denoiser config sha256"):
        check_artifact(artifact, FLUX, wider)
    recorded = artifact.config["base_model"].pop(
        "denoiser_config_sha256"
    )  # an artefact without the hash: its keys are checked
    with pytest.raises(MaskMismatchError, match="transformer_blocks.0"):
        check_artifact(artifact, FLUX, wider)
    artifact.config["base_model"]["denoiser_config_sha256"] = recorded
    artifact.config["base_model"]["denoiser_class"] = "UNet2DConditionModel"
    with pytest.raises(MaskMismatchError, match="UNet2DConditionModel"):
        check_artifact(artifact, FLUX, small)


def test_mask_of_a_shallower_model_of_the_same_width_is_refused(tmp_path):
    """Every key and shape of a 2+2-block mask fits a 3+3-block model: only the config hash tells them apart."""
    shallow, deep = tiny_transformer(), tiny_transformer(num_layers=3, num_single_layers=3)
    artifact = load_mask_artifact(_artifact(shallow, tmp_path, "a", []))
    with pytest.raises(MaskMismatchError) as info:
        check_artifact(artifact, FLUX, deep)
    message = str(info.value)
    assert denoiser_config_hash(shallow)[:12] in message and denoiser_config_hash(deep)[:12] in message
    assert "'tiny'" in message  # the model the mask was trained on
    assert check_artifact(artifact, FLUX, tiny_transformer(seed=1))  # same config, other weights: accepted


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_are_refused_on_write_and_load(value, tmp_path):
    model = tiny_transformer()
    sites = FLUX.sites(model)
    logits = {s.key: torch.ones(s.num_units) for s in sites}
    logits[sites[1].key][2] = value
    record = {"method": "mask", "base_model": base_model_record(model, "tiny")}
    with pytest.raises(MaskFileError, match="non-finite logits"):
        save_mask_artifact(tmp_path / "written", logits, record)
    assert not (tmp_path / "written").exists() and not list(tmp_path.glob(".*partial"))
    # a file written by something else (or damaged) is refused on load, before any generate or fold uses it
    path = _artifact(model, tmp_path, "loaded", [])
    from safetensors.torch import save_file

    save_file(logits, str(path / "masks.safetensors"))
    with pytest.raises(MaskFileError, match="does not match the sha256 recorded in erasure.json"):
        load_mask_artifact(path)  # the payload changed behind the record's back
    from erasekit.outputs import file_sha256

    record = json.loads((path / "erasure.json").read_text())
    record["payload"]["masks.safetensors"] = file_sha256(path / "masks.safetensors")
    (path / "erasure.json").write_text(json.dumps(record))
    with pytest.raises(MaskFileError, match=f"non-finite logits .*{sites[1].key}"):
        load_mask_artifact(path)


def test_mask_config_that_is_not_a_json_object(tmp_path):
    path = _artifact(tiny_transformer(), tmp_path, "a", [])
    for text in ("[1, 2]", '"mask"', "3", "null"):
        (path / "erasure.json").write_text(text)
        with pytest.raises(MaskFileError, match="not an erasekit erasure record .*not an object"):
            load_mask_artifact(path)


def test_corrupt_or_incomplete_artifacts(tmp_path):
    model = tiny_transformer()
    path = _artifact(model, tmp_path, "a", [])
    weights = path / "masks.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MaskFileError, match="corrupt"):
        load_mask_artifact(path)
    weights.unlink()
    with pytest.raises(MaskFileError, match="masks.safetensors"):
        load_mask_artifact(path)
    with pytest.raises(MaskFileError, match="does not exist"):
        load_mask_artifact(tmp_path / "missing")
    (path / "masks.safetensors").write_bytes(b"")
    (path / "erasure.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(MaskFileError, match="not an erasekit erasure record"):
        load_mask_artifact(path)


def test_format_versions_newer_than_the_reader_are_refused_and_older_ones_read(tmp_path):
    from erasekit import __version__
    from erasekit.methods.mask.artifact import FORMAT_VERSION

    path = _artifact(tiny_transformer(), tmp_path, "a", [])
    config_file = path / "erasure.json"
    record = json.loads(config_file.read_text())
    assert record["format_version"] == FORMAT_VERSION == 1
    record["format_version"] = 7
    config_file.write_text(json.dumps(record))
    with pytest.raises(MaskFileError) as info:
        load_mask_artifact(path)
    assert str(info.value) == (
        f"{config_file} has format_version 7, newer than the version 1 that erasekit {__version__} reads; "
        "upgrade erasekit to load it"
    )
    for bad in ("2", 0, True, 1.5):
        config_file.write_text(json.dumps({**record, "format_version": bad}))
        with pytest.raises(MaskFileError, match=f"has format_version {bad!r}; expected a positive integer$"):
            load_mask_artifact(path)
    # the current version, and a config from before the field was written, load
    config_file.write_text(json.dumps({**record, "format_version": 1}))
    assert load_mask_artifact(path).config["format_version"] == 1
    del record["format_version"]
    config_file.write_text(json.dumps(record))
    assert "format_version" not in load_mask_artifact(path).config


def test_architecture_registry_refuses_unknown_models():
    from erasekit.errors import ModelLoadError

    assert architecture_for(tiny_transformer()) is FLUX
    with pytest.raises(ModelLoadError, match="unsupported model family: denoiser class Linear"):
        architecture_for(torch.nn.Linear(2, 2))
