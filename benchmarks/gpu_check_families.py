#!/usr/bin/env python
"""GPU check: mask-training iterations on the full-size SDXL and SD3.5-medium denoisers.

For each family the published denoiser config (bundled with erasekit, so no download) is built
with random weights on the GPU in half precision, every mask site of erasekit's architecture file
(heads, neurons, and norm channels where the family has them) gets a hard-concrete mask, and
``--iterations`` mask-training iterations run through a ``--steps``-step trajectory at
``--resolution`` px with classifier-free guidance (uncond + cond in one batch), using erasekit's
checkpointed gradient. Text-encoder outputs are random tensors of the right shapes: the trainer
computes them once per prompt under no_grad, so they are not part of an iteration's cost.

Prints, per family, the peak GPU memory and seconds per iteration (after one warm-up iteration),
and a JSON line.

    python benchmarks/gpu_check_families.py                       # on a GPU: SDXL and SD3.5 medium, 512 px
    python benchmarks/gpu_check_families.py --device cpu --tiny   # smoke run of the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from erasekit.arch import architecture_by_class_name
from erasekit.arch.base import known_config
from erasekit.methods.mask import MaskedModel, MaskSettings
from erasekit.training.gradient import checkpointed_gradient

MODELS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
}
# Small configs of the same classes, for a CPU smoke run of this script.
TINY = {
    "sdxl": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=8,
        sample_size=8,
        use_linear_projection=True,
    ),
    "sd3.5-medium": dict(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=16,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
}


def build(family: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = known_config(MODELS[family])
    if config is None:
        raise SystemExit(f"no bundled config for {MODELS[family]}")
    if tiny:
        config = {"_class_name": config["_class_name"], **TINY[family]}
    arch = architecture_by_class_name(config["_class_name"])
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    torch.manual_seed(0)
    with torch.device(device):
        model = cls.from_config(config)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.requires_grad_(False)
    return model, {"arch": arch, "config": dict(model.config)}


def conditioning(
    family: str, model: torch.nn.Module, batch: int, resolution: int, device: torch.device, dtype: torch.dtype
) -> tuple[tuple[int, ...], Callable]:
    g = torch.Generator(device="cpu").manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cfg = model.config
    side = resolution // 8
    if family == "sdxl":
        text = rand(batch, 77, cfg.cross_attention_dim)
        pooled = rand(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
        time_ids = torch.tensor(
            [resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=dtype
        ).repeat(batch, 1)

        def call(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(
                z,
                t,
                encoder_hidden_states=text,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                return_dict=False,
            )[0]

        return (batch, cfg.in_channels, side, side), call
    text = rand(batch, 77 + 256, cfg.joint_attention_dim)
    pooled = rand(batch, cfg.pooled_projection_dim)

    def call(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(
            hidden_states=z, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, return_dict=False
        )[0]

    return (batch, cfg.in_channels, side, side), call


def check(family: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("float16" if family == "sdxl" else "bfloat16")
    ]
    if device.type == "cpu":
        dtype = torch.float32
    model, info = build(family, args.tiny, device, dtype)
    sites = info["arch"].sites(model)
    masked = MaskedModel(model, sites, MaskSettings("hard_concrete"), init_lambda=1.0)
    masked.set_mode("train")
    masked.install()
    guidance = 5.0
    shape, call = conditioning(family, model, 2, args.resolution, device, dtype)
    sigmas = torch.linspace(1.0, 0.0, args.steps + 1)

    def step(z: torch.Tensor, i: int) -> torch.Tensor:
        # CFG over an (uncond, cond) batch and an Euler / flow-matching update: the shape of each
        # family's real step, with a fixed schedule.
        t = torch.full((z.shape[0] * 2,), float(1000 * sigmas[i]), device=device, dtype=dtype)
        out = call(torch.cat([z, z]), t)
        uncond, cond = out.chunk(2)
        velocity = uncond + guidance * (cond - uncond)
        return (z.float() + float(sigmas[i + 1] - sigmas[i]) * velocity.float()).to(z.dtype)

    noise = torch.randn(1, *shape[1:], generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    target = torch.randn(noise.shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=torch.float32)
    params = list(masked.logits)
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)

    def iteration(k: int) -> float:
        masked.resample_noise(torch.Generator().manual_seed(k))
        loss, grads = checkpointed_gradient(
            step, noise, args.steps, lambda z: (z.float() - target).pow(2).mean(), params
        )
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    iteration(0)  # warm-up
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k in range(1, args.iterations + 1):
        start = time.perf_counter()
        loss = iteration(k)
        sync()
        times.append(time.perf_counter() - start)
    units = sum(s.num_units for s in sites)
    return {
        "family": family,
        "model": MODELS[family] + (" (tiny config)" if args.tiny else ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": args.resolution,
        "steps": args.steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mask_units": units,
        "seconds_per_iteration": sum(times) / len(times),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "final_loss": loss,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="default: fp16 for SDXL, bf16 for SD3.5",
    )
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the trained trajectory")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="small configs of the same classes (CPU smoke run)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check_families: no CUDA device; run on a GPU, or use --device cpu --tiny for a smoke run",
            file=sys.stderr,
        )
        return 2
    for family in args.families:
        result = check(family, args)
        memory = (
            f"{result['peak_gpu_memory_gib']:.2f} GiB" if result["peak_gpu_memory_gib"] is not None else "n/a (cpu)"
        )
        print(
            f"{family:13s} {result['parameters'] / 1e9:6.3f} B params  {result['mask_units']:>9,} mask units  "
            f"{result['seconds_per_iteration']:7.3f} s/iter  peak {memory}"
        )
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
