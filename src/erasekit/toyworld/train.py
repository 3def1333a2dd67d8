"""Train the ShapesCanvas world from scratch on a CPU: text encoders, VAE, FLUX transformer.

Three stages, each a pure function of its seed (:func:`train_world` runs them all):

1. **Text encoders** (CLIP and T5): trained to tell, from a training prompt, which object, colour,
   style and background it names ("unspecified" where it names none), CLIP from its pooled output and
   T5 from its mean token. Synonyms thus land on the same conditioning, which the transformer then
   only has to read. They stay frozen afterwards.
2. **VAE** (``AutoencoderKL``, 2x downsampling, 4 latent channels): reconstruction on renders; the
   latent statistics give ``shift_factor`` and ``scaling_factor``.
3. **Transformer** (``FluxTransformer2DModel``): rectified-flow velocity prediction exactly as
   ``FluxPipeline`` samples it (packed 2x2 latent patches, sigma in [0, 1] as the timestep), 10 % of
   prompts dropped to ``""`` so that true classifier-free guidance works, an exponential moving
   average of the weights is what gets saved.

Held-out object-colour-style combinations (:data:`~erasekit.toyworld.prompts.HELD_OUT`) never appear.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from tqdm.auto import tqdm

from .model import WorldSpec, build_world_pipeline
from .prompts import EMPTY_TEMPLATE, fill, find_value, is_held_out, training_prompt
from .render import ATTRIBUTES, BACKGROUNDS, render, sample_scene

UNSPECIFIED = "unspecified"


@dataclass
class TrainSettings:
    """Budgets and optimiser settings of the three stages (defaults: the shipped world)."""

    seed: int = 0
    pool_size: int = 40_000
    empty_fraction: float = 0.03
    text_steps: int = 600
    text_batch: int = 128
    vae_steps: int = 1_000
    vae_batch: int = 64
    transformer_steps: int = 5_000
    transformer_batch: int = 64
    transformer_lr: float = 8e-4
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    detector_steps: int = 1_000
    threads: int = 0
    spec: WorldSpec = field(default_factory=WorldSpec)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "spec"}
        data["spec"] = self.spec.to_dict()
        return data


# ----------------------------------------------------------------------------- data
@dataclass
class Pool:
    """Pre-rendered training images with their scenes (``None`` for an empty background)."""

    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    scenes: list[Any]
    backgrounds: list[str]


def render_pool(settings: TrainSettings, progress: bool = True) -> Pool:
    """Render the training pool (held-out combinations excluded)."""
    rng = np.random.default_rng(settings.seed)
    size = settings.spec.resolution
    images, scenes, backgrounds = [], [], []
    for _ in tqdm(range(settings.pool_size), desc="rendering", disable=not progress, leave=False):
        if rng.random() < settings.empty_fraction:
            background = str(rng.choice(BACKGROUNDS))
            from .render import RGB

            pixels = np.broadcast_to(np.array(RGB[background], dtype=np.uint8), (size, size, 3))
            scenes.append(None)
            backgrounds.append(background)
        else:
            scene = sample_scene(rng, size)
            while is_held_out(scene):
                scene = sample_scene(rng, size)
            pixels = render(scene, size)
            scenes.append(scene)
            backgrounds.append(scene.background)
        images.append(torch.from_numpy(np.ascontiguousarray(pixels)))
    stacked = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return Pool(images=stacked, scenes=scenes, backgrounds=backgrounds)


def describe(pool: Pool, index: int, rng: np.random.Generator) -> str:
    """A random training prompt for pool item ``index``."""
    scene = pool.scenes[index]
    if scene is None:
        return fill(EMPTY_TEMPLATE, {"background": pool.backgrounds[index]})
    return training_prompt(scene, rng)


def prompt_labels(prompt: str) -> dict[str, str]:
    """What a prompt names per attribute (``none`` for an empty scene's object)."""
    labels = {a: find_value(a, prompt) or UNSPECIFIED for a in ATTRIBUTES}
    if "empty" in prompt.split():
        labels["object"] = "none"
    return labels


def _label_classes() -> dict[str, list[str]]:
    classes = {a: [*values, UNSPECIFIED] for a, values in ATTRIBUTES.items()}
    classes["object"].append("none")
    return classes


# ----------------------------------------------------------------------------- stage 1: text
def _tokenize(pipe: FluxPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    spec_length = pipe.tokenizer.model_max_length
    clip_ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=spec_length, truncation=True, return_tensors="pt"
    ).input_ids
    t5 = pipe.tokenizer_2(prompts, padding="max_length", max_length=spec_length, truncation=True, return_tensors="pt")
    return clip_ids, t5.input_ids


def train_text_encoders(
    pipe: FluxPipeline, pool: Pool, settings: TrainSettings, progress: bool = True
) -> dict[str, float]:
    """Stage 1: attribute classification from prompts; returns the final training accuracy."""
    torch.manual_seed(settings.seed + 1)
    rng = np.random.default_rng(settings.seed + 1)
    classes = _label_classes()
    width = settings.spec.text_width
    heads = torch.nn.ModuleDict(
        {f"{enc}_{a}": torch.nn.Linear(width, len(v)) for enc in ("clip", "t5") for a, v in classes.items()}
    )
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    for encoder in encoders:
        encoder.train()
    params = [p for e in encoders for p in e.parameters()] + list(heads.parameters())
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    correct = total = 0
    for step in tqdm(range(settings.text_steps), desc="text encoders", disable=not progress):
        indices = rng.integers(len(pool.scenes), size=settings.text_batch)
        prompts = [describe(pool, int(i), rng) if rng.random() > 0.05 else "" for i in indices]
        labels = [prompt_labels(p) for p in prompts]
        clip_ids, t5_ids = _tokenize(pipe, prompts)
        pooled = pipe.text_encoder(clip_ids).pooler_output
        t5_states = pipe.text_encoder_2(t5_ids).last_hidden_state
        t5_mask = (t5_ids != 0).float().unsqueeze(-1)
        t5_mean = (t5_states * t5_mask).sum(1) / t5_mask.sum(1).clamp(min=1)
        loss = torch.zeros(())
        for attribute, names in classes.items():
            target = torch.tensor([names.index(lab[attribute]) for lab in labels])
            for enc, features in (("clip", pooled), ("t5", t5_mean)):
                logits = heads[f"{enc}_{attribute}"](features)
                loss = loss + F.cross_entropy(logits, target)
                if step >= settings.text_steps - 50:
                    correct += int((logits.argmax(-1) == target).sum())
                    total += len(target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for encoder in encoders:
        encoder.eval().requires_grad_(False)
    return {"text_label_accuracy": correct / max(total, 1)}


# ----------------------------------------------------------------------------- stage 2: VAE
def train_vae(pipe: FluxPipeline, pool: Pool, settings: TrainSettings, progress: bool = True) -> dict[str, float]:
    """Stage 2: reconstruction (MSE + a small KL); sets shift/scaling factors from the latents."""
    torch.manual_seed(settings.seed + 2)
    vae = pipe.vae.train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=1e-3, total_steps=settings.vae_steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(settings.seed + 2)
    for _ in tqdm(range(settings.vae_steps), desc="vae", disable=not progress):
        index = torch.randint(len(pool.scenes), (settings.vae_batch,), generator=generator)
        x = pool.images[index]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held = pool.images[:512]
        latents = vae.encode(held).latent_dist.mean
        recon = vae.decode(latents).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (held + 1) / 2).item()
        shift, std = latents.mean().item(), latents.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(1 / std, 4))
    return {"vae_psnr": 10 * math.log10(1 / mse), "latent_shift": shift, "latent_std": std}


# ----------------------------------------------------------------------------- stage 3: transformer
@torch.no_grad()
def encode_pool(pipe: FluxPipeline, pool: Pool, batch: int = 512) -> torch.Tensor:
    """Packed, normalised transformer inputs (N, tokens, 4 * latent channels) of every pool image."""
    vae = pipe.vae
    packed = []
    for start in range(0, len(pool.scenes), batch):
        latents = vae.encode(pool.images[start : start + batch]).latent_dist.mean
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        packed.append(FluxPipeline._pack_latents(latents, b, c, h, w))
    return torch.cat(packed)


@torch.no_grad()
def encode_text(pipe: FluxPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 token embeddings, CLIP pooled embedding) as ``FluxPipeline.encode_prompt`` gives them."""
    clip_ids, t5_ids = _tokenize(pipe, prompts)
    return pipe.text_encoder_2(t5_ids).last_hidden_state, pipe.text_encoder(clip_ids).pooler_output


def train_transformer(
    pipe: FluxPipeline,
    pool: Pool,
    settings: TrainSettings,
    progress: bool = True,
    snapshot: Any = None,
    snapshot_every: int = 600,
) -> dict[str, float]:
    """Stage 3: flow matching; the EMA weights replace the transformer's at the end.

    ``snapshot(step, ema_model)``, if given, is called every ``snapshot_every`` steps (to watch
    quality while a long run goes on).
    """
    torch.manual_seed(settings.seed + 3)
    rng = np.random.default_rng(settings.seed + 3)
    data = encode_pool(pipe, pool)
    side = settings.spec.resolution // settings.spec.vae_scale_factor // 2
    image_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    text_ids = torch.zeros(settings.spec.max_length, 3)
    transformer = pipe.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimiser = torch.optim.AdamW(
        transformer.parameters(), lr=settings.transformer_lr, weight_decay=0.0, betas=(0.9, 0.99)
    )
    warmup = 200

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, settings.transformer_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    generator = torch.Generator().manual_seed(settings.seed + 3)
    losses: list[float] = []
    bar = tqdm(range(settings.transformer_steps), desc="transformer", disable=not progress)
    for step in bar:
        index = torch.randint(len(pool.scenes), (settings.transformer_batch,), generator=generator)
        prompts = [describe(pool, int(i), rng) if rng.random() >= settings.prompt_dropout else "" for i in index]
        text, pooled = encode_text(pipe, prompts)
        x0 = data[index]
        noise = torch.randn(x0.shape, generator=generator)
        # Logit-normal sigmas (SD3 / FLUX training), a quarter of them uniform for the ends.
        sigma = torch.sigmoid(torch.randn(len(index), generator=generator))
        uniform = torch.rand(len(index), generator=generator)
        sigma = torch.where(torch.rand(len(index), generator=generator) < 0.25, uniform, sigma)
        s = sigma.view(-1, 1, 1)
        z = (1 - s) * x0 + s * noise
        velocity = transformer(
            hidden_states=z,
            timestep=sigma,
            pooled_projections=pooled,
            encoder_hidden_states=text,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        loss = F.mse_loss(velocity, noise - x0)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if snapshot is not None and (step + 1) % snapshot_every == 0:
            snapshot(step + 1, ema)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    transformer.load_state_dict(ema.state_dict())
    transformer.eval().requires_grad_(False)
    return {"final_loss": float(np.mean(losses[-200:]))}


# ----------------------------------------------------------------------------- all stages
def train_world_pipeline(
    settings: TrainSettings | None = None, progress: bool = True, snapshot_dir: str | Path | None = None
) -> tuple[FluxPipeline, dict[str, Any]]:
    """Run the three stages; returns the trained pipeline and a record (metrics, seconds per stage).

    With ``snapshot_dir``, the pipeline is saved there before the transformer stage and the
    transformer's EMA weights every 600 steps (``transformer-STEP.safetensors``).
    """
    settings = settings or TrainSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    record: dict[str, Any] = {"settings": settings.to_dict(), "seconds": {}}
    start = time.perf_counter()
    pool = render_pool(settings, progress)
    record["seconds"]["render"] = time.perf_counter() - start
    pipe = build_world_pipeline(settings.spec, seed=settings.seed)
    snapshot = None
    if snapshot_dir is not None:
        from safetensors.torch import save_file

        def snapshot(step: int, ema: torch.nn.Module) -> None:
            save_file(ema.state_dict(), str(Path(snapshot_dir) / f"transformer-{step}.safetensors"))

    for name, stage in (("text", train_text_encoders), ("vae", train_vae), ("transformer", train_transformer)):
        t0 = time.perf_counter()
        if name == "transformer":
            if snapshot_dir is not None:
                pipe.save_pretrained(snapshot_dir)
            record.update(train_transformer(pipe, pool, settings, progress, snapshot=snapshot))
        else:
            record.update(stage(pipe, pool, settings, progress))
        record["seconds"][name] = time.perf_counter() - t0
        print(json.dumps({k: v for k, v in record.items() if k != "settings"}), flush=True)
    record["seconds"]["total"] = time.perf_counter() - start
    return pipe, record


if __name__ == "__main__":  # a manual run: python -m erasekit.toyworld.train OUT
    import sys

    out = Path(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    pipe, record = train_world_pipeline(TrainSettings(threads=threads), snapshot_dir=out / "snapshots")
    pipe.save_pretrained(out / "pipeline")
    (out / "training.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "settings"}, indent=2))
