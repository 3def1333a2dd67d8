"""ShapesCanvas detectors: a small CNN that reads object, colour, style and background off an image.

Generated images are judged by these detectors, so they are trained for robustness rather than for
the clean renders alone: every training batch is blurred, noised, jittered and sometimes resampled
(:func:`augment_images`), the way a small generative model degrades its samples. The object head
has an extra last class ``"none"`` (:data:`NONE`), trained on :func:`~.render.render_none` images,
so an image that shows no recognisable object is not forced into an object class.

Typical use::

    path = train_detectors("detectors")          # a few minutes on one CPU core
    detectors = ShapesDetectors.from_pretrained(path)
    detectors.predict(images)                     # {"object": ["circle", ...], "colour": [...], ...}

A saved detector is a folder with ``config.json`` (class names per head, architecture, training
settings, measured accuracies) and ``model.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import ModelLoadError
from ..outputs import atomic_directory, commit_directory
from .render import ATTRIBUTES, OBJECTS, render, render_morph, render_none, sample_scene

__all__ = [
    "HEADS",
    "NONE",
    "IMAGE_SIZE",
    "ShapesDetectorNet",
    "ShapesDetectors",
    "augment_images",
    "evaluate_detectors",
    "train_detectors",
]

#: The label of the object head's last class: the image shows no object.
NONE = "none"
#: Class names per detector head, in head order (the object head ends with :data:`NONE`).
HEADS: dict[str, tuple[str, ...]] = {
    name: (*values, NONE) if name == "object" else tuple(values) for name, values in ATTRIBUTES.items()
}
#: Side of the square images the network reads; other sizes are resized to it.
IMAGE_SIZE = 32

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "erasekit-shapes-detectors"
FORMAT_VERSION = 1

# Training defaults, chosen to finish in 2-4 minutes on one (shared) CPU core.
DEFAULT_WIDTH = 24
DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 64
DEFAULT_POOL_SIZE = 6000
DEFAULT_REFRESH = 8
NONE_FRACTION = 0.12
# Training data is drawn from this stream of the seed, evaluation from the plain seed, so a
# training run and an evaluation never see the same images even when given the same number.
_TRAIN_STREAM = 0x5EED_D37


# ----------------------------------------------------------------------------- network
def _conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
    )


class ShapesDetectorNet(nn.Module):
    """A shared convolutional trunk and one linear head per attribute.

    One full-resolution block keeps the 2-pixel outlines and 4-pixel checker cells visible, two
    blocks each at 16 and 8 pixels see the whole shape, and global average pooling makes the heads
    independent of where the object sits.

    Args:
        num_classes: head name -> number of classes (normally the lengths of :data:`HEADS`).
        width: channels of the first block (the others use 2x and 4x).
    """

    def __init__(self, num_classes: dict[str, int], width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        self.width = width
        self.trunk = nn.Sequential(
            _conv_block(3, width),
            nn.MaxPool2d(2),
            _conv_block(width, 2 * width),
            _conv_block(2 * width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            _conv_block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, count) for name, count in num_classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for float images ``(N, 3, 32, 32)`` in [0, 1]."""
        features = self.trunk(images * 2 - 1)  # centred inputs: the first conv has no bias
        return {name: head(features) for name, head in self.heads.items()}


# ----------------------------------------------------------------------------- augmentation
def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` (pixels) per image; sigma ~0 leaves it unchanged."""
    n, c, h, w = images.shape
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma.clamp_min(1e-2)[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, taps)
    # One group per (image, channel) pair applies each image's own kernel in a single conv call.
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment_images(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Degrade float images ``(N, 3, H, W)`` in [0, 1] the way generated samples are degraded.

    Each image independently gets, each with some probability: a horizontal flip (no label
    changes with it), a 2x down-up bilinear resample, a Gaussian blur (sigma 0-1 px), a small
    brightness/contrast jitter, and additive Gaussian noise (std 0-0.05, for a few images up to
    0.1). Returns a new tensor.
    """
    n = images.shape[0]
    device = images.device

    def chance(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p).to(device)

    def uniform(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(n, generator=generator)).to(device)

    out = torch.where(chance(0.5)[:, None, None, None], images.flip(-1), images)
    resample = chance(0.15)
    if resample.any():
        size = out.shape[-2:]
        small = F.interpolate(out[resample], scale_factor=0.5, mode="bilinear", align_corners=False)
        out = out.clone()
        out[resample] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    out = _gaussian_blur(out, uniform(0.0, 1.0) * chance(0.6))
    jitter = chance(0.6)
    contrast = torch.where(jitter, uniform(0.9, 1.1), torch.ones(n, device=device))[:, None, None, None]
    brightness = torch.where(jitter, uniform(-0.05, 0.05), torch.zeros(n, device=device))[:, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    noise_std = uniform(0.0, 0.05) * chance(0.6)
    # A heavier tail (std 0.05-0.1, 10 % of images): without it the net learns "visible noise means
    # no object" from the noise-kind "none" images (pixel std ~0.08) and calls noisy shapes "none".
    noise_std = torch.where(chance(0.1), uniform(0.05, 0.1), noise_std)[:, None, None, None]
    out = out + noise_std * torch.randn(out.shape, generator=generator).to(device)
    return out.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- data
def _render_examples(
    rng: np.random.Generator, count: int, none_fraction: float, morph_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` images (uint8, N x 32 x 32 x 3), labels (int64, N x heads; -1: no label) and object
    targets (float32, N x object classes: a probability per class).

    A "none" image only labels the object head: its colour, style and background are meaningless. A
    share ``morph_fraction`` of the object images are shapes between two objects
    (:func:`~.render.render_morph`, ``t`` uniform in [0, 1]) whose object target splits ``1 - t`` and
    ``t`` between them (soft labels: the network learns to hesitate where the shape does); their
    object label is the nearer end.
    """
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.full((count, len(HEADS)), -1, dtype=np.int64)
    targets = np.zeros((count, len(HEADS["object"])), dtype=np.float32)
    object_none = HEADS["object"].index(NONE)
    for i in range(count):
        if rng.random() < none_fraction:
            images[i] = render_none(rng, IMAGE_SIZE)
            labels[i, 0] = object_none
            targets[i, object_none] = 1.0
            continue
        scene = sample_scene(rng, IMAGE_SIZE)
        labels[i] = [HEADS[name].index(value) for name, value in scene.attributes().items()]
        if morph_fraction and rng.random() < morph_fraction:  # no draw at 0: the plain stream stays as it was
            other = str(rng.choice([o for o in OBJECTS if o != scene.object]))
            t = float(rng.uniform(0.0, 1.0))
            images[i] = render_morph(scene, other, t, IMAGE_SIZE)
            targets[i, labels[i, 0]] = 1.0 - t
            targets[i, HEADS["object"].index(other)] = t
            if t > 0.5:
                labels[i, 0] = HEADS["object"].index(other)
        else:
            images[i] = render(scene, IMAGE_SIZE)
            targets[i, labels[i, 0]] = 1.0
    return images, labels, targets


def _to_float(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> float ``(N, 3, H, W)`` in [0, 1]."""
    tensor = torch.as_tensor(images_uint8)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


# ----------------------------------------------------------------------------- inference
class ShapesDetectors:
    """Trained ShapesCanvas detectors: predicts object (or ``"none"``), colour, style and background.

    Load with :meth:`from_pretrained`. For an image whose object is ``"none"`` the other heads still
    answer, but their answers mean nothing (those heads never trained on such images).

    Attributes:
        classes: head name -> class names, in logit order.
        config: the saved ``config.json`` contents (training settings, measured accuracies).
        model: the :class:`ShapesDetectorNet`, in eval mode.
    """

    def __init__(self, model: ShapesDetectorNet, classes: dict[str, list[str]], config: dict[str, Any] | None = None):
        self.model = model.eval()
        self.classes = {name: list(values) for name, values in classes.items()}
        self.config = config or {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ShapesDetectors:
        """Load detectors saved by :func:`train_detectors` from the folder ``path``.

        Raises:
            ModelLoadError: the folder, its config or its weights are missing, corrupt or do not fit.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ModelLoadError(f"detectors folder {folder} does not exist; create it with train_detectors()")
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for required in (config_path, weights_path):
            if not required.is_file():
                raise ModelLoadError(f"detectors folder {folder} has no {required.name}; train it again")
        try:
            config = json.loads(config_path.read_text())
            classes = {str(name): [str(v) for v in values] for name, values in config["classes"].items()}
            width = int(config["architecture"]["width"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelLoadError(f"detectors config {config_path} is unreadable: {_one_line(error)}") from error
        try:
            state = load_file(str(weights_path))
        except Exception as error:  # safetensors raises its own error types for truncated/garbled files
            raise ModelLoadError(f"detectors weights {weights_path} are corrupt: {_one_line(error)}") from error
        model = ShapesDetectorNet({name: len(values) for name, values in classes.items()}, width=width)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # missing/unexpected keys or wrong shapes: message is multi-line
            raise ModelLoadError(
                f"detectors weights {weights_path} do not match {config_path.name} (width {width}, "
                f"{ {n: len(v) for n, v in classes.items()} })"
            ) from error
        return cls(model.to(device), classes, config)

    @torch.no_grad()
    def predict_proba(self, images: Any, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Class probabilities per head, each ``(N, classes)`` float32 on the CPU.

        ``images``: a uint8 numpy array ``(N, H, W, 3)`` (or one ``(H, W, 3)`` image), a list of PIL
        images, or a float tensor ``(N, 3, H, W)`` in [0, 1]. Sizes other than 32 are resized.
        """
        batch = _as_batch(images)
        self.model.eval()
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in self.classes}
        for start in range(0, batch.shape[0], batch_size):
            part = _resize(batch[start : start + batch_size].to(self.device, torch.float32))
            for name, logits in self.model(part).items():
                chunks[name].append(logits.softmax(dim=-1).cpu())
        return {
            name: torch.cat(parts) if parts else torch.empty(0, len(self.classes[name]))
            for name, parts in chunks.items()
        }

    def predict(self, images: Any, batch_size: int = 256) -> dict[str, list[str]]:
        """The most probable class name per head and image (inputs as :meth:`predict_proba`)."""
        probabilities = self.predict_proba(images, batch_size=batch_size)
        return {
            name: [self.classes[name][i] for i in probs.argmax(dim=-1).tolist()]
            for name, probs in probabilities.items()
        }


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _as_batch(images: Any) -> torch.Tensor:
    """Any supported input -> float tensor ``(N, 3, H, W)`` in [0, 1] (sizes not yet fixed)."""
    if isinstance(images, torch.Tensor):
        tensor = images if images.dim() == 4 else images[None]
        if tensor.dim() != 4 or tensor.shape[1] != 3:
            raise ValueError(f"expected a tensor of shape (N, 3, H, W), got {tuple(images.shape)}")
        return tensor.float().div(255.0) if tensor.dtype == torch.uint8 else tensor.float()
    if isinstance(images, np.ndarray):
        array = images if images.ndim == 4 else images[None]
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"expected an array of shape (N, H, W, 3), got {images.shape}")
        if array.dtype == np.uint8:
            return _to_float(np.ascontiguousarray(array))
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32).permute(0, 3, 1, 2)
    if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        # PIL images may differ in size: resize each before stacking.
        tensors = []
        for image in images:
            if not hasattr(image, "convert"):
                raise TypeError(f"expected PIL images in the list, got {type(image).__name__}")
            tensors.append(_resize(_to_float(np.array(image.convert("RGB"))[None])))
        return torch.cat(tensors) if tensors else torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE)
    raise TypeError(
        f"unsupported images type {type(images).__name__}; pass a uint8 numpy array (N, H, W, 3), "
        "a list of PIL images, or a float tensor (N, 3, H, W) in [0, 1]"
    )


def _resize(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return images
    # Antialiasing matters when shrinking (e.g. 512 -> 32): plain bilinear would alias the checker.
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)


# ----------------------------------------------------------------------------- evaluation
def evaluate_detectors(
    detectors: ShapesDetectors, n: int = 1000, seed: int = 12345, *, augment: bool = False
) -> dict[str, float]:
    """Accuracy per head on ``n`` fresh renders, and ``none`` recall on ``n`` fresh no-object images.

    The images come from ``numpy.random.default_rng(seed)``; training draws from a different stream,
    so they are never training images. A real object predicted as ``"none"`` counts as an object
    error. With ``augment``, every image first goes through :func:`augment_images` (seeded too).

    Returns:
        ``{"object": ..., "colour": ..., "style": ..., "background": ..., "none": ...}`` in [0, 1].
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, IMAGE_SIZE) for _ in range(n)]
    images = _to_float(np.stack([render(scene, IMAGE_SIZE) for scene in scenes]))
    empties = _to_float(np.stack([render_none(rng, IMAGE_SIZE) for _ in range(n)]))
    if augment:
        generator = torch.Generator().manual_seed(seed)
        images, empties = augment_images(images, generator), augment_images(empties, generator)
    predicted = detectors.predict(images)
    scores = {
        name: float(np.mean([p == getattr(s, name) for p, s in zip(predicted[name], scenes)])) for name in ATTRIBUTES
    }
    scores[NONE] = float(np.mean([p == NONE for p in detectors.predict(empties)["object"]]))
    return scores


# ----------------------------------------------------------------------------- training
def train_detectors(
    output_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    width: int = DEFAULT_WIDTH,
    pool_size: int = DEFAULT_POOL_SIZE,
    refresh_per_step: int = DEFAULT_REFRESH,
    lr: float = 3e-3,
    eval_n: int = 1000,
    num_threads: int | None = None,
    morph_fraction: float = 0.0,
) -> Path:
    """Train detectors on fresh ShapesCanvas renders and save them into ``output_dir``.

    Data: a pool of ``pool_size`` rendered images (about 12 % "none" images) of which
    ``refresh_per_step`` random entries are replaced by new renders every step, so the run sees
    ``pool_size + steps * refresh_per_step`` distinct images while rendering stays a small share of
    the time. Every batch goes through :func:`augment_images`. AdamW with a short warm-up and a
    cosine decay; the loss is the sum of the heads' cross-entropies, where "none" images only count
    for the object head. Afterwards the accuracies of :func:`evaluate_detectors` on ``eval_n`` clean
    and ``eval_n`` augmented images are measured and stored in ``config.json``.

    The folder is written atomically: into a temporary sibling that is renamed onto ``output_dir``.
    ``num_threads``, if given, sets torch's intra-op threads for the run (restored afterwards).
    ``morph_fraction``: the share of object images that are shapes between two objects with soft
    object targets (:func:`_render_examples`): a judge of in-between shapes rather than of renders.

    Returns:
        ``output_dir`` as a :class:`Path`.

    Raises:
        ValueError: ``output_dir`` exists and is not an empty folder, or a setting is out of range.
    """
    output = Path(output_dir)
    _check_free(output)
    if steps < 1 or batch_size < 1 or pool_size < 1 or refresh_per_step < 0 or eval_n < 1 or width < 1:
        raise ValueError("steps, batch_size, pool_size, eval_n and width must be >= 1 (refresh_per_step >= 0)")
    if not 0.0 <= morph_fraction <= 1.0:
        raise ValueError(f"morph_fraction must lie in [0, 1], got {morph_fraction}")

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        started = time.monotonic()
        model, _ = _train(seed, steps, batch_size, progress, width, pool_size, refresh_per_step, lr, morph_fraction)
        seconds = time.monotonic() - started
        detectors = ShapesDetectors(model, {name: list(values) for name, values in HEADS.items()})
        accuracy = evaluate_detectors(detectors, n=eval_n)
        accuracy_augmented = evaluate_detectors(detectors, n=eval_n, augment=True)
    finally:
        torch.set_num_threads(previous_threads)

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "classes": detectors.classes,
        "architecture": {"name": type(model).__name__, "width": width, "image_size": IMAGE_SIZE},
        "training": {
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "pool_size": pool_size,
            "refresh_per_step": refresh_per_step,
            "none_fraction": NONE_FRACTION,
            "morph_fraction": morph_fraction,
            "lr": lr,
            "seconds": round(seconds, 1),
        },
        "evaluation": {"n": eval_n, "seed": 12345},
        "accuracy": accuracy,
        "accuracy_augmented": accuracy_augmented,
    }
    _save_atomically(output, model, config)
    return output


def _check_free(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(f"output folder {output} exists and is not empty; choose a new path or remove it")


def _train(
    seed: int,
    steps: int,
    batch_size: int,
    progress: bool,
    width: int,
    pool_size: int,
    refresh_per_step: int,
    lr: float,
    morph_fraction: float = 0.0,
) -> tuple[ShapesDetectorNet, float]:
    """The training loop; returns the model (eval mode, CPU) and its last smoothed loss."""
    rng = np.random.default_rng((seed, _TRAIN_STREAM))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # initial weights
    model = ShapesDetectorNet({name: len(values) for name, values in HEADS.items()}, width=width)
    model.train()

    pool_images, pool_labels, pool_targets = _render_examples(rng, pool_size, NONE_FRACTION, morph_fraction)
    pool_images_t, pool_labels_t = torch.from_numpy(pool_images), torch.from_numpy(pool_labels)
    pool_targets_t = torch.from_numpy(pool_targets)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    smoothed = float("nan")
    bar = tqdm(range(steps), desc="training detectors", disable=not progress, leave=False)
    for _step in bar:
        if refresh_per_step:
            fresh_images, fresh_labels, fresh_targets = _render_examples(
                rng, refresh_per_step, NONE_FRACTION, morph_fraction
            )
            slots = torch.from_numpy(rng.choice(pool_size, size=min(refresh_per_step, pool_size), replace=False))
            pool_images_t[slots] = torch.from_numpy(fresh_images[: len(slots)])
            pool_labels_t[slots] = torch.from_numpy(fresh_labels[: len(slots)])
            pool_targets_t[slots] = torch.from_numpy(fresh_targets[: len(slots)])
        index = torch.randint(pool_size, (batch_size,), generator=generator)
        images = augment_images(_to_float(pool_images_t[index]), generator)
        labels = pool_labels_t[index]

        logits = model(images)
        # ignore_index=-1 drops the colour/style/background terms of "none" images; a batch made
        # only of "none" images would give NaN for those heads, so they are skipped then.
        loss = sum(
            # with morphs the object head learns the soft targets (every image has one)
            F.cross_entropy(logits[name], pool_targets_t[index])
            if name == "object" and morph_fraction
            else F.cross_entropy(logits[name], labels[:, k], ignore_index=-1)
            for k, name in enumerate(HEADS)
            if bool((labels[:, k] >= 0).any())
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"detector training diverged (loss {value}); lower lr (now {lr})")
        smoothed = value if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * value
        bar.set_postfix(loss=f"{smoothed:.3f}", refresh=False)
    bar.close()
    return model.eval(), smoothed


def _save_atomically(output: Path, model: ShapesDetectorNet, config: dict[str, Any]) -> None:
    """Write into a hidden sibling folder, then rename it onto ``output`` (no half-written folder)."""
    staging = atomic_directory(output)
    try:
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _check_free(output)  # someone may have filled it while we trained
        # overwrite: _check_free found no folder or an empty one, which a rename cannot replace
        commit_directory(staging, output, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
