"""The erasure of weight-editing methods (methods/weights.py): apply/remove bit identity, save/load,
originals pinned by sha256, combining, the merge fold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from erasekit.config import load_config
from erasekit.errors import ErasureFileError, ErasureMismatchError, UnsupportedError
from erasekit.generate import generate_latents
from erasekit.methods import RECORD_NAME, save_folded_pipeline
from erasekit.methods.base import read_record
from erasekit.methods.weights import (
    WEIGHTS_NAME,
    WeightEditErasure,
    erasure_record,
    original_hashes,
    tensor_sha256,
)
from erasekit.tiny import build_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
V = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"


class _Edit(WeightEditErasure):
    method = "test-edit"


def _latents(pipe: Any) -> torch.Tensor:
    latents, _ = generate_latents(pipe, ["a photo of a cat"], [3], steps=2, resolution=32, guidance_scale=3.0)
    return latents


def _edit(pipe: Any, names: tuple[str, ...] = (K,), scale: float = 3.0) -> _Edit:
    config = load_config(None, ["model.id=tiny", "concept.concept=cat", "concept.anchor=dog"])
    record = erasure_record("test-edit", config, pipe.unet, "unet", changes="test", seconds=0.1)
    edits = {n: pipe.unet.get_parameter(n).detach() * scale for n in names}
    erasure = _Edit.from_edits(pipe.unet, edits, record)
    assert isinstance(erasure, _Edit)
    return erasure


def test_apply_then_remove_restores_the_weights_and_outputs_bit_for_bit() -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    original = _latents(pipe)
    erasure = _edit(pipe, (K, V))
    assert erasure.cost.parameters_changed == 2 * pipe.unet.get_parameter(K).numel()
    assert erasure.cost.changes == "test" and erasure.cost.units_changed == 0

    handle = erasure.apply(pipe)
    torch.testing.assert_close(pipe.unet.get_parameter(K), before[K] * 3.0)
    erased = _latents(pipe)
    assert not torch.equal(erased, original)
    handle.remove()
    for name, param in pipe.unet.named_parameters():
        assert torch.equal(param, before[name]), name
    assert torch.equal(_latents(pipe), original)
    handle.remove()  # a second remove changes nothing
    assert torch.equal(_latents(pipe), original)


def test_unchanged_tensors_are_not_stored() -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    config = load_config(None, ["model.id=tiny", "concept.concept=cat"])
    record = erasure_record("test-edit", config, pipe.unet, "unet")
    edits = {K: pipe.unet.get_parameter(K) * 2.0, V: pipe.unet.get_parameter(V).clone()}
    erasure = _Edit.from_edits(pipe.unet, edits, record)
    assert set(erasure.weights) == {K} and set(erasure.record["weights"]) == {K}
    assert erasure.record["weights"][K]["shape"] == list(pipe.unet.get_parameter(K).shape)
    with pytest.raises(ValueError, match="has no parameter"):
        _Edit.from_edits(pipe.unet, {"nope.weight": torch.zeros(1)}, record)
    with pytest.raises(ValueError, match="has shape"):
        _Edit.from_edits(pipe.unet, {K: torch.zeros(3)}, record)


def test_save_load_round_trip(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    erasure = _edit(pipe)
    folder = erasure.save(tmp_path / "e")
    record = read_record(folder)
    assert record["method"] == "test-edit" and set(record["payload"]) == {WEIGHTS_NAME}
    assert record["cost"]["artifact_bytes"] == (folder / WEIGHTS_NAME).stat().st_size
    assert record["concept"] == "cat" and record["anchor"] == "dog" and record["generation"]["steps"] > 0
    loaded = _Edit.from_folder(folder, record)
    assert set(loaded.weights) == {K} and torch.equal(loaded.weights[K], erasure.weights[K])
    assert loaded.weights[K].dtype == pipe.unet.get_parameter(K).dtype
    erased = _latents_with(pipe, erasure)
    assert torch.equal(_latents_with(pipe, loaded), erased)


def _latents_with(pipe: Any, erasure: WeightEditErasure) -> torch.Tensor:
    handle = erasure.apply(pipe)
    try:
        return _latents(pipe)
    finally:
        handle.remove()


def test_other_weights_are_refused_in_one_line() -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    erasure = _edit(pipe)
    other = build_tiny_sd_pipeline(seed=1)  # same class and config, other weights
    with pytest.raises(ErasureMismatchError, match="made for other weights: .*to_k.weight differs"):
        erasure.apply(other)
    with pytest.raises(ErasureMismatchError, match="made for other weights"):
        erasure.fold(other, "merge")
    assert tensor_sha256(other.unet.get_parameter(K)) != erasure.record["weights"][K]["original_sha256"]["float32"]


def test_a_half_precision_copy_of_the_same_weights_is_accepted() -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    erasure = _edit(pipe)
    half = build_tiny_sd_pipeline(seed=0).to(torch.bfloat16)
    before = half.unet.get_parameter(K).detach().clone()
    handle = erasure.apply(half)
    assert half.unet.get_parameter(K).dtype == torch.bfloat16
    assert torch.equal(half.unet.get_parameter(K), erasure.weights[K].to(torch.bfloat16))
    handle.remove()
    assert torch.equal(half.unet.get_parameter(K), before)
    hashes = original_hashes(pipe.unet.get_parameter(K).detach())
    assert set(hashes) == {"float32", "float16", "bfloat16"}
    # an edit fitted in bfloat16 cannot vouch for float32 weights
    bf_erasure = _edit(build_tiny_sd_pipeline(seed=0).to(torch.bfloat16))
    with pytest.raises(ErasureMismatchError, match="made on bfloat16 weights"):
        bf_erasure.apply(pipe)


def test_combining_disjoint_edits_and_refusing_overlaps() -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    k_edit, v_edit, kv_edit = _edit(pipe, (K,)), _edit(pipe, (V,)), _edit(pipe, (K, V), scale=-1.0)
    both = _Edit.combine([k_edit, v_edit])
    assert isinstance(both, _Edit) and set(both.weights) == {K, V}
    assert both.cost.parameters_changed == k_edit.cost.parameters_changed + v_edit.cost.parameters_changed
    with pytest.raises(UnsupportedError, match="both change .*to_k.weight; weight edits on the same parameters"):
        _Edit.combine([k_edit, kv_edit])
    # two edits applied one after the other (as erasures of different methods are): overlaps refused too
    handle = k_edit.apply(pipe)
    with pytest.raises(UnsupportedError, match="another applied weight edit changes already"):
        kv_edit.apply(pipe)
    second = v_edit.apply(pipe)
    second.remove()
    handle.remove()
    kv_edit.apply(pipe).remove()  # once removed, the parameters are free again


def test_merge_fold_writes_a_stock_pipeline_and_other_modes_are_refused(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    erasure = _edit(pipe)
    erased = _latents_with(pipe, erasure)
    for mode in ("prune", "zero"):
        with pytest.raises(UnsupportedError, match="folds with --mode merge"):
            erasure.fold(pipe, mode)
    folded = erasure.fold(build_tiny_sd_pipeline(seed=0), "merge")
    assert torch.equal(_latents(folded), erased)
    target = save_folded_pipeline(folded, tmp_path / "folded", "merge")
    from diffusers import DiffusionPipeline

    stock = DiffusionPipeline.from_pretrained(target)
    assert torch.equal(stock.unet.get_parameter(K), erasure.weights[K])


def test_a_corrupt_or_mismatched_payload_is_refused(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    folder = _edit(pipe).save(tmp_path / "e")
    record = read_record(folder)
    save_file({V: torch.zeros(pipe.unet.get_parameter(V).shape)}, str(folder / WEIGHTS_NAME))
    with pytest.raises(ErasureFileError, match="does not hold the parameters"):
        _Edit.from_folder(folder, record)
    (folder / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ErasureFileError, match="cannot be read as safetensors"):
        _Edit.from_folder(folder, record)
    with pytest.raises(ErasureFileError, match="does not match the sha256"):
        read_record(folder)
    assert json.loads((folder / RECORD_NAME).read_text())["method"] == "test-edit"
