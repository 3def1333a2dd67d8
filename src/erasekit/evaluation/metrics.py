"""Metrics over the generated images: detection rate, CLIP score, FID/KID, SSIM/PSNR/LPIPS, ShapesCanvas, cost.

Image metrics come from ``torchmetrics``; this module only feeds them the images in a fixed order
and turns the results into plain floats for ``summary.json``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ErasekitError

#: Every metric ``--metrics`` accepts.
METRICS: tuple[str, ...] = ("detection", "clip-score", "fid", "kid", "ssim", "psnr", "lpips", "shapes", "cost")
#: Extractor name that selects torchmetrics' own InceptionV3 (its weights are downloaded by torch-fidelity).
INCEPTION = "inception"
#: KID subsets are this many images at most (fewer when there are fewer images).
KID_SUBSET_SIZE = 50
KID_SUBSETS = 100


def parse_metrics(text: str | None, defaults: Sequence[str]) -> list[str]:
    """``"detection,ssim"`` -> ``["detection", "ssim"]``; ``None`` -> ``defaults``.

    Raises:
        ErasekitError: an unknown metric name.
    """
    if text is None:
        return list(defaults)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ErasekitError(
            f"unknown metric {', '.join(unknown) or repr(text)}; choose from {', '.join(METRICS)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def load_tensor(path: Path, size: int | None = None) -> torch.Tensor:
    """An image file as a (3, H, W) float tensor in [0, 1] (resized to ``size`` when given)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        if size is not None and rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def detection_rate(records: Sequence[dict[str, Any]]) -> dict[str, float | int]:
    """Share of images where the detector found the concept, and its complement UA."""
    detected = sum(bool(r["detected"]) for r in records)
    rate = detected / len(records) if records else float("nan")
    return {"images": len(records), "detected": detected, "detection_rate": rate, "ua": 1.0 - rate}


def nudenet_class_counts(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Images per counted NudeNet class (the usual per-body-part table)."""
    counts: dict[str, int] = {}
    for record in records:
        for name in record.get("classes", []):
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def pairwise_similarity(
    originals: Sequence[Path], erased: Sequence[Path], names: Sequence[str]
) -> dict[str, float | None]:
    """Mean SSIM / PSNR (and LPIPS, when asked) between each erased image and the original of the same job."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    out: dict[str, float | None] = {}
    ssim, psnr = [], []
    lpips_metric = _lpips() if "lpips" in names else None
    lpips_values = []
    for a_path, b_path in zip(originals, erased, strict=True):
        a, b = load_tensor(a_path)[None], load_tensor(b_path)[None]
        if "ssim" in names:
            ssim.append(float(structural_similarity_index_measure(b, a, data_range=1.0)))
        if "psnr" in names:
            psnr.append(float(peak_signal_noise_ratio(b, a, data_range=1.0)))
        if lpips_metric is not None:
            lpips_values.append(float(lpips_metric(b * 2 - 1, a * 2 - 1)))
    if "ssim" in names:
        out["ssim"] = float(np.mean(ssim))
    if "psnr" in names:
        # identical images have infinite PSNR: JSON has no infinity, so it is recorded as null
        out["psnr"] = _finite(float(np.mean(psnr)))
    if lpips_metric is not None:
        out["lpips"] = float(np.mean(lpips_values))
    return out


def _lpips() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex")
    except (ImportError, ModuleNotFoundError, OSError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ErasekitError(
            f"LPIPS is not available here ({first}): it needs torchvision and its pretrained weights (downloaded); "
            "leave lpips out of --metrics"
        ) from None


def clip_scores(paths: Sequence[Path], prompts: Sequence[str], model: str) -> float:
    """torchmetrics' CLIP score (100 x cosine, floored at 0) of images against their prompts, averaged."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from .detectors import load_clip

    clip, processor = load_clip(model)
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(clip), processor))
    for start in range(0, len(paths), 16):
        images = [(load_tensor(p) * 255).to(torch.uint8) for p in paths[start : start + 16]]
        metric.update(images, list(prompts[start : start + 16]))
    return float(metric.compute())


def _as_tensor(features: Any) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features (the projected embeddings are its
    # pooler_output); transformers 4 returns the tensor itself
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class _TensorFeatures:
    """A CLIPModel whose ``get_*_features`` return tensors, as torchmetrics' CLIP score expects."""

    def __init__(self, clip: Any) -> None:
        self.clip = clip
        self.config = clip.config

    def to(self, device: Any) -> _TensorFeatures:
        self.clip.to(device)
        return self

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _as_tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _as_tensor(self.clip.get_text_features(*args, **kwargs))


class ClipImageFeatures(torch.nn.Module):
    """A CLIP image tower as a torchmetrics feature extractor: uint8 (N, 3, H, W) -> (N, D) embeddings."""

    def __init__(self, model: str) -> None:
        super().__init__()
        from .detectors import load_clip

        self.clip, self.processor = load_clip(model)
        self.num_features = int(self.clip.config.projection_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=[i for i in images.cpu()], return_tensors="pt")["pixel_values"]
        return _as_tensor(self.clip.get_image_features(pixel_values=pixels)).to(torch.float64)


def reference_images(folder: str | Path) -> list[Path]:
    """Image files of a FID/KID reference folder, sorted by name.

    Raises:
        ErasekitError: missing folder or fewer than 2 images.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ErasekitError(
            f"reference folder {str(root)!r} does not exist; pass --reference DIR with real images for FID/KID"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and p.is_file())
    if len(files) < 2:
        raise ErasekitError(f"reference folder {str(root)!r} has {len(files)} images; FID/KID need at least 2")
    return files


def feature_extractor(name: str) -> Any:
    """``inception`` (torchmetrics' InceptionV3: 2048 features) or a CLIP model id/folder."""
    if name == INCEPTION:
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ErasekitError(
                "FID/KID with InceptionV3 need torch-fidelity and its downloaded weights; "
                "pip install torch-fidelity while online, or pass --fid-features with a local CLIP folder"
            )
        return 2048
    return ClipImageFeatures(name)


def fid_kid(
    real: Sequence[Path], fake: Sequence[Path], names: Sequence[str], extractor: Any, size: int = 299
) -> dict[str, float | None]:
    """FID and/or KID between a reference folder's images and generated images (torchmetrics).

    ``extractor`` comes from :func:`feature_extractor`; images are resized to ``size`` pixels first.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    out: dict[str, float | None] = {}
    try:
        metrics: dict[str, Any] = {}
        if "fid" in names:
            metrics["fid"] = FrechetInceptionDistance(feature=extractor, normalize=False)
        if "kid" in names:
            subset = min(KID_SUBSET_SIZE, len(real), len(fake))
            metrics["kid"] = KernelInceptionDistance(
                feature=extractor, subset_size=subset, subsets=KID_SUBSETS, normalize=False
            )
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ErasekitError(
            f"could not build the FID/KID feature extractor ({first}); "
            "offline, pass --fid-features with a local CLIP folder"
        ) from None
    # KID subsets are drawn with torch's global generator: seed it so that reruns give the same number
    torch.manual_seed(0)
    for real_flag, paths in ((True, real), (False, fake)):
        for start in range(0, len(paths), 32):
            batch = torch.stack(
                [(load_tensor(p, size) * 255).round().to(torch.uint8) for p in paths[start : start + 32]]
            )
            for metric in metrics.values():
                metric.update(batch, real=real_flag)
    if "fid" in metrics:
        out["fid"] = _finite(float(metrics["fid"].compute()))
    if "kid" in metrics:
        mean, std = metrics["kid"].compute()
        out["kid"] = float(mean)
        out["kid_std"] = float(std)
    return out


def mask_cost(mask_dirs: Sequence[str]) -> dict[str, Any]:
    """Artefact size on disk and the cost of each erasure folder (for a mask: its masked fraction)."""
    from ..methods import load_erasure

    out: dict[str, Any] = {"artifact_bytes": 0, "masks": []}
    for folder in mask_dirs:
        size = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
        erasure = load_erasure(folder)
        cost = erasure.cost
        out["artifact_bytes"] += size
        out["masks"].append(
            {
                "bytes": size,
                "method": erasure.method,
                "changes": cost.changes,
                "masked_fraction": cost.units_changed / cost.units_total if cost.units_total else None,
                "masked_units": cost.units_changed if cost.units_total else None,
                "total_units": cost.units_total or None,
                "parameters_changed": cost.parameters_changed,
                "seconds": cost.seconds,
                "peak_memory_bytes": cost.peak_memory_bytes,
            }
        )
    return out
