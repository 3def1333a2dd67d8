"""Where one iteration of the demo's mask training spends its time, and what ``torch.compile`` would save.

Three measurements, each side by side in one process:

* **By phase** (``--phases``): the demo recipe trained for ``--iterations`` iterations without a noise
  pool (``train.noise_pool=0``: every reference trajectory computed) and with ``--noise-pool N`` seeds
  per prompt, one after the other; for each, the seconds per iteration and their split into the original model's
  reference trajectories and the masked model's forward and backward passes.

* **By operation**: a few iterations of the ShapesCanvas demo recipe (after a warm-up run) under
  ``torch.profiler``, their self CPU time summed into the kinds of work it is (the linear layers'
  matrix products, attention, element-wise arithmetic, copies and reshapes, the rest).
* **Compiled** (``--compile``): the world's denoiser, forward and backward at the training batch with
  guidance (the trainer's 4 + 4 rows, doubled), eager and under ``torch.compile``, alternated; prints
  the first compiled call's seconds (the compilation, from an empty compile cache) and the ratio of
  the medians.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/iteration_cost.py [--iterations 3] [--compile] [--threads 1] \\
        [--set KEY=VALUE]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/iteration_cost.py --phases [--noise-pool 8] --iterations 96 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from unittest import mock

from erasekit.reproducibility import pin_cpu_numerics

ATTENTION = "aten::_scaled_dot_product"  # the fused attention kernels' names start so
# aten operator -> the kind of work (self time; a backward kernel counts with its forward; the rest is "other")
KINDS = {
    "linear layers (matrix products)": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul"),
    "element-wise arithmetic": (
        "aten::mul",
        "aten::add",
        "aten::sub",
        "aten::div",
        "aten::neg",
        "aten::pow",
        "aten::gelu",
        "aten::silu",
        "aten::sigmoid",
        "aten::tanh",
        "aten::sum",
        "aten::mean",
        "aten::native_layer_norm",
        "aten::_fused_rms_norm",
        "aten::fill_",
        "aten::add_",
        "aten::mul_",
        "aten::div_",
        "aten::addcmul_",
        "aten::addcdiv_",
        "aten::lerp_",
        "aten::sqrt",
        "aten::where",
    ),
    "copies and reshapes": (
        "aten::cat",
        "aten::copy_",
        "aten::stack",
        "aten::view",
        "aten::as_strided",
        "aten::_to_copy",
        "aten::to",
        "aten::empty",
        "aten::transpose",
        "aten::permute",
        "aten::slice",
        "aten::select",
        "aten::narrow",
        "aten::expand",
        "aten::unsqueeze",
        "aten::t",
        "aten::reshape",
        "aten::clone",
        "aten::contiguous",
    ),
}


def kind_of(name: str) -> str:
    """The kind of work of profiler event ``name`` (backward kernels count with their forward's kind)."""
    if name.startswith(ATTENTION):
        return "attention (fused kernels)"
    forward = name.removesuffix("_backward")
    return next((kind for kind, names in KINDS.items() if forward in names), "other")


def by_operation(iterations: int, overrides: list[str]) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from erasekit.methods import erase
    from erasekit.toyworld.demo import erasure_config
    from erasekit.toyworld.world import World

    config = erasure_config(World.load(), "circle", [*overrides, f"train.iterations={iterations}"], anchor="square")
    with tempfile.TemporaryDirectory() as folder:
        erase(config, os.path.join(folder, "warm-up"))  # first calls allocate and pick kernels
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds = erase(config, os.path.join(folder, "mask")).result.seconds
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        kind = kind_of(event.key)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    return {
        "threads": torch.get_num_threads(),
        "seconds_per_iteration": round(seconds / iterations, 2),
        "share": {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
    }


def by_phase(iterations: int, pool: int, overrides: list[str]) -> dict:
    """Seconds per iteration without and with a noise pool of ``pool`` seeds per prompt, split into the reference
    trajectories (the original model, no gradients) and the masked model's forward and backward."""
    import erasekit.methods.mask.trainer as trainer
    from erasekit.methods import erase
    from erasekit.toyworld.demo import erasure_config
    from erasekit.toyworld.world import World

    world = World.load()
    spent = {"reference": 0.0, "masked": 0.0}

    def timed(function, phase):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - started

        return run

    result: dict = {}
    with (
        tempfile.TemporaryDirectory() as folder,
        mock.patch.multiple(
            trainer,
            run_trajectory=timed(trainer.run_trajectory, "reference"),
            naive_gradient=timed(trainer.naive_gradient, "masked"),
            checkpointed_gradient=timed(trainer.checkpointed_gradient, "masked"),
        ),
    ):
        warm_up = erasure_config(world, "circle", [*overrides, "train.iterations=1"], anchor="square")
        erase(warm_up, os.path.join(folder, "warm-up"))  # first calls allocate and pick kernels
        for size in (0, pool):
            config = erasure_config(
                world,
                "circle",
                [*overrides, f"train.iterations={iterations}", f"train.noise_pool={size}"],
                anchor="square",
            )
            spent.update(reference=0.0, masked=0.0)
            seconds = erase(config, os.path.join(folder, f"pool-{size}")).result.seconds
            result[f"noise_pool={size}"] = {
                "seconds_per_iteration": round(seconds / iterations, 3),
                "reference_per_iteration": round(spent["reference"] / iterations, 3),
                "masked_forward_backward_per_iteration": round(spent["masked"] / iterations, 3),
            }
    without, pooled = result["noise_pool=0"], result[f"noise_pool={pool}"]
    result["without_over_with_pool"] = round(without["seconds_per_iteration"] / pooled["seconds_per_iteration"], 2)
    return result


def compiled_ratio(repeats: int) -> dict:
    import torch

    from erasekit.pipeline import load_pipeline
    from erasekit.toyworld.world import World

    world = World.load()
    pipe = load_pipeline(str(world.pipeline_path), "float32", "cpu")
    denoiser = pipe.transformer.requires_grad_(False)
    with torch.no_grad():  # the text encoders are not what is timed
        encoded = pipe.encode_prompt(["a red circle on white"] * 16, prompt_2=None, max_sequence_length=16)
    context, pooled, text_ids = encoded[0], encoded[1], encoded[2]
    side = world.sampling["resolution"] // pipe.vae_scale_factor // 2
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(16, side * side, denoiser.config.in_channels, generator=generator)
    image_ids = pipe._prepare_latent_image_ids(16, side, side, "cpu", torch.float32)
    inputs = dict(
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=torch.full((16,), 0.5),
        img_ids=image_ids,
        txt_ids=text_ids,
        return_dict=False,
    )

    def step(model: torch.nn.Module) -> float:
        z = latents.clone().requires_grad_(True)
        started = time.perf_counter()
        model(hidden_states=z, **inputs)[0].square().mean().backward()
        return time.perf_counter() - started

    compiled = torch.compile(denoiser)
    first = step(compiled)  # compiles the forward and the backward graph
    eager, fast = [], []
    for _ in range(repeats):  # alternated, so that a change of load hits both
        eager.append(step(denoiser))
        fast.append(step(compiled))
    return {
        "compile_seconds": round(first, 1),
        "eager_median_s": round(statistics.median(eager), 3),
        "compiled_median_s": round(statistics.median(fast), 3),
        "eager_over_compiled": round(statistics.median(eager) / statistics.median(fast), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="profiled training iterations")
    parser.add_argument("--compile", action="store_true", help="also time the denoiser eager against compiled")
    parser.add_argument(
        "--phases", action="store_true", help="instead: the iterations' split by phase, without and with a noise pool"
    )
    parser.add_argument(
        "--noise-pool", type=int, default=8, help="noise seeds per prompt of the pooled run, with --phases"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each, with --compile")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    pin_cpu_numerics(args.threads)  # before torch: the demo's kernels
    import torch

    torch.set_num_threads(args.threads)
    if args.phases:
        result = {
            "threads": args.threads,
            "iterations": args.iterations,
            **by_phase(args.iterations, args.noise_pool, args.overrides),
        }
        print(json.dumps(result, indent=1))
        return result
    result = {"by_operation": by_operation(args.iterations, args.overrides)}
    if args.compile:
        # an empty compile cache: the compilation a first run pays (inductor reuses what earlier runs compiled)
        with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache):
            result["compiled"] = compiled_ratio(args.repeats)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
