#!/usr/bin/env python
"""Benchmark: gradient of a final-latent loss w.r.t. mask logits through a whole FLUX trajectory.

Three ways of getting the same gradient (``erasekit.training.gradient``) are compared on one
``FluxTransformer2DModel`` with random weights and a :class:`~erasekit.methods.mask.model.MaskedModel`
(hard-concrete masks on every FLUX site: neurons, norm channels, heads) installed in train mode:

* ``naive``    -- one autograd graph over all T steps (memory grows with T);
* ``ours``     -- :func:`checkpointed_gradient`: a no-grad pass keeping the T latents, then each
                  step recomputed with gradients on and ONE autograd call per step;
* ``two_call`` -- the same recomputation with two autograd calls per step (logits, then latent),
                  as the reference implementation does.

Every measurement runs in fresh processes (this file with ``--worker``):

* peak memory above the model, one process per (method, T), so that no earlier run pollutes it:
  on CPU the peak resident set size (``VmHWM``, reset after the warm-up) minus the RSS after
  building the model and running one warm-up forward, over one gradient iteration (after a
  one-step warm-up iteration), in a process started with ``MALLOC_MMAP_THRESHOLD_`` (below); on
  CUDA ``torch.cuda.max_memory_allocated`` minus the memory allocated at the same point;
* seconds per iteration, one process per T: the median of ``--repeats`` (on CPU at least 48 / T)
  full gradient computations of each method after one warm-up iteration (of one step), the methods
  interleaved in a rotating order. On the shared 2-core VM this was written on, the same method
  differed by up to ~30% from one process to the next (and drifted within a process), as much as
  the differences being measured; interleaving in one process keeps the ratios steady. The timing
  process uses glibc's default allocator: the fixed mmap threshold makes every activation a fresh
  ``mmap`` (page faults, TLB shoot-downs between threads), which multiplied system time and slowed
  the recomputing methods, which free and reallocate more, more than naive.

Why ``MALLOC_MMAP_THRESHOLD_``: PyTorch's CPU tensors come from glibc ``malloc``. glibc serves large
blocks with ``mmap`` and returns them to the OS on ``free``, but each such free raises its *dynamic*
mmap threshold (up to 32 MiB), after which activations of that size come from the heap arenas and
stay mapped after they are freed. RSS then follows the allocation history rather than the live
tensors, and a checkpointed method looks as hungry as a naive one. Setting the variable fixes the
threshold (and disables the dynamic adjustment), so every block of 64 KiB or more is unmapped as
soon as it is freed and peak RSS measures peak live memory. It is set in the memory processes
only (``--mmap-threshold 0``: not at all; the peak RSS is then not a measure of live memory). The
``--quick`` model's activations are mostly smaller than 64 KiB, so it uses 8 KiB.

Targets (printed as PASS/FAIL; the exit status is 0 either way, this is a measurement):

* ours: peak memory at the largest T within 15% of the smallest T (flat in T);
* ours: time per iteration <= 1.4 x naive, for every T;
* ours: faster than two_call, for every T.

The timing process of the smallest T also computes the ours and the naive gradient once more after
its measurement and prints their max relative difference (max |g_ours - g_naive| / max |g_naive|
over all logits; tolerance 1e-4 in float32, 5e-2 in bfloat16).

The mask logits start at 1.0 (``--init-lambda``), not at the trainer's 3.0: at 3.0 most hard-concrete
gates are clamped at 1 and their gradient is exactly zero, which would make the gradient check
trivial. The work done per step is the same.

Examples::

    python benchmarks/trajectory_gradient.py                      # CPU, T = 4 8 16 32 (~5-6 min on 2 cores)
    python benchmarks/trajectory_gradient.py --quick              # small model, T = 2 4 (~1 min)
    python benchmarks/trajectory_gradient.py --device cuda --full-flux   # FLUX.1 size, bf16, 512x512, T = 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

METHODS = ("naive", "ours", "two_call")
RESULT_TAG = "@@TRAJECTORY_GRADIENT_RESULT@@"

TARGET_MEMORY_RATIO = 1.15
TARGET_TIME_VS_NAIVE = 1.40
TARGET_TIME_VS_TWO_CALL = 1.00  # strictly below


@dataclass(frozen=True)
class ModelSpec:
    """Size of the FluxTransformer2DModel and of its inputs."""

    name: str
    num_layers: int  # double-stream blocks
    num_single_layers: int
    num_attention_heads: int
    attention_head_dim: int
    axes_dims_rope: tuple[int, int, int]
    joint_attention_dim: int
    pooled_projection_dim: int
    latent_size: int  # latent height = width (image size / 8); packed 2x2 -> (latent_size / 2) ** 2 tokens
    text_len: int
    in_channels: int = 64

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    def config(self) -> dict[str, Any]:
        return {
            "patch_size": 1,
            "in_channels": self.in_channels,
            "num_layers": self.num_layers,
            "num_single_layers": self.num_single_layers,
            "attention_head_dim": self.attention_head_dim,
            "num_attention_heads": self.num_attention_heads,
            "joint_attention_dim": self.joint_attention_dim,
            "pooled_projection_dim": self.pooled_projection_dim,
            "guidance_embeds": False,
            "axes_dims_rope": list(self.axes_dims_rope),
        }

    def describe(self) -> str:
        return (
            f"{self.num_layers} double + {self.num_single_layers} single blocks, width {self.width} "
            f"({self.num_attention_heads} heads x {self.attention_head_dim}), "
            f"{self.image_tokens} image tokens ({self.latent_size}x{self.latent_size} latent) "
            f"+ {self.text_len} text tokens"
        )


SPECS = {
    # CPU default: small weights, activations dominate memory (~ one step's graph is tens of MB).
    "default": ModelSpec("default", 2, 4, 4, 64, (8, 28, 28), 512, 128, 32, 64),
    # Smoke run.
    "quick": ModelSpec("quick", 1, 2, 2, 64, (8, 28, 28), 256, 64, 16, 16),
    # FLUX.1 [schnell] denoiser, 512x512 images (64x64 latent -> 1024 tokens), T5 length 512.
    "full": ModelSpec("full", 19, 38, 24, 128, (16, 56, 56), 4096, 768, 64, 512),
}


# ====================================================================== worker (one measurement)
def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _rss_bytes() -> int:
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_kb("VmHWM") is not None
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) * (1 if sys.platform == "darwin" else 1024)


def _cpu_busy_seconds() -> float | None:
    """CPU seconds spent non-idle by the whole machine so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _build(spec: ModelSpec, device: str, dtype_name: str, init_lambda: float) -> dict[str, Any]:
    """Model + masks + inputs + stateless step function (everything a gradient method needs)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from erasekit.arch.flux import FLUX
    from erasekit.methods.mask.model import MaskedModel

    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    torch.manual_seed(0)
    previous_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype (full FLUX: 24 GB in bf16, not 48 in fp32)
    try:
        with dev:
            model = FluxTransformer2DModel(**spec.config())
    finally:
        torch.set_default_dtype(previous_default)
    model.eval().requires_grad_(False)  # frozen weights: only the mask logits get gradients

    masked = MaskedModel(model, FLUX.sites(model), init_lambda=init_lambda)
    masked.set_mode("train")
    masked.resample_noise(torch.Generator().manual_seed(1))  # hard-concrete noise, fixed for the trajectory
    masked.install()
    params = list(masked.logits)

    # Stand-ins for the cached text-encoder outputs (the trainer computes them once, under no_grad).
    gen = torch.Generator().manual_seed(2)
    encoder_hidden_states = torch.randn(1, spec.text_len, spec.joint_attention_dim, generator=gen).to(dev, dtype)
    pooled = torch.randn(1, spec.pooled_projection_dim, generator=gen).to(dev, dtype)
    z_start = torch.randn(1, spec.image_tokens, spec.in_channels, generator=gen).to(dev, dtype)
    target = torch.randn(1, spec.image_tokens, spec.in_channels, generator=gen).to(dev, torch.float32)
    side = spec.latent_size // 2
    img_ids = torch.zeros(spec.image_tokens, 3)
    img_ids[:, 1] = torch.arange(spec.image_tokens) // side
    img_ids[:, 2] = torch.arange(spec.image_tokens) % side
    img_ids = img_ids.to(dev)
    txt_ids = torch.zeros(spec.text_len, 3, device=dev)

    def make(num_steps: int) -> tuple[Any, Any]:
        sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=dev)

        def step(z: torch.Tensor, i: int) -> torch.Tensor:
            # Stateless flow-matching Euler step (as in erasekit.arch.flux): recomputing step i is exact.
            velocity = model(
                hidden_states=z,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled,
                timestep=sigmas[i].expand(z.shape[0]).to(z.dtype),  # the pipeline passes t / 1000 = sigma
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
            out = z.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * velocity.to(torch.float32)
            return out.to(velocity.dtype)

        return step, sigmas

    def loss_fn(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(z.to(torch.float32), target)

    return {"model": model, "masked": masked, "params": params, "z_start": z_start, "make": make, "loss_fn": loss_fn}


def _run_method(method: str, built: dict[str, Any], num_steps: int) -> tuple[Any, list[Any]]:
    from erasekit.training.gradient import checkpointed_gradient, naive_gradient, two_call_gradient

    fn = {"naive": naive_gradient, "ours": checkpointed_gradient, "two_call": two_call_gradient}[method]
    step, _ = built["make"](num_steps)
    return fn(step, built["z_start"], num_steps, built["loss_fn"], built["params"])


def _timed_repeats(args: argparse.Namespace, steps: int) -> int:
    """At least --repeats iterations and --min-timed-steps steps per method (short iterations are noisier)."""
    return max(args.repeats, -(-args.min_timed_steps // steps))


def _finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def worker(args: argparse.Namespace) -> int:
    """One measurement process: ``--phase memory`` (one method) or ``--phase time`` (all methods, one T)."""
    import torch

    oom_error = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    torch.set_num_threads(args.threads or _available_cpus())
    cuda = args.device == "cuda"
    methods = [args.method] if args.phase == "memory" else list(args.methods)
    result: dict[str, Any] = {"phase": args.phase, "steps": args.steps, "methods": {m: {} for m in methods}}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def release() -> None:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    built = _build(SPECS[args.model], args.device, args.dtype, args.init_lambda)
    step1, _ = built["make"](1)
    with torch.no_grad():  # warm-up forward (kernels, thread pool, RoPE caches)
        step1(built["z_start"], 0)
    sync()
    release()

    if args.phase == "memory":
        out = result["methods"][args.method]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out["peak_source"] = "torch.cuda.max_memory_allocated"
        else:
            base = _rss_bytes()  # the whole process: interpreter, libraries, model, inputs
            out["peak_source"] = (
                "VmHWM (reset after warm-up)" if _reset_peak_rss() else "ru_maxrss (NOT reset: includes build)"
            )
        out["model_mb"] = base / 2**20
        try:
            _run_method(args.method, built, 1)  # warm-up iteration (one-time allocations of a backward)
            loss, _ = _run_method(args.method, built, args.steps)  # peak live memory is the same every iteration
            sync()
            peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
            out.update(peak_mb=(peak - base) / 2**20, peak_abs_mb=peak / 2**20, loss=_finite_or_none(float(loss)))
        except oom_error:
            out["error"] = "OOM"
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0

    # time: every method in this process, interleaved, so that drifts of a shared machine and
    # process-to-process differences (memory layout, caches) hit them alike.
    active = []
    for m in methods:
        try:
            _run_method(m, built, 1)  # warm-up iteration (one step: forward and backward kernels)
            sync()
            active.append(m)
        except oom_error:
            result["methods"][m]["error"] = "OOM"
            release()
    times: dict[str, list[float]] = {m: [] for m in methods}
    busy0, own0, wall0 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    repeats = _timed_repeats(args, args.steps)
    for r in range(repeats):
        for k in range(len(active)):
            m = active[(k + r) % len(active)]  # rotate the order: no method always runs first
            if "error" in result["methods"][m]:
                continue
            try:
                sync()
                t0 = time.perf_counter()
                loss, grads = _run_method(m, built, args.steps)
                sync()
                times[m].append(time.perf_counter() - t0)
                result["methods"][m]["loss"] = _finite_or_none(float(loss))  # None: random full-size weights overflowed
                del grads
            except oom_error:
                result["methods"][m]["error"] = "OOM"
                release()
    busy1, own1, wall1 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    for m in methods:
        if times[m] and "error" not in result["methods"][m]:
            ts = times[m]
            result["methods"][m].update(s_per_iter=statistics.median(ts), s_per_iter_min=min(ts), times=ts)
    if busy0 is not None and busy1 is not None and wall1 > wall0:
        # Share of the machine's CPUs used by OTHER processes while this one was timed.
        others = max(0.0, (busy1 - busy0) - (own1 - own0))
        result["others_cpu_share"] = others / ((wall1 - wall0) * _available_cpus())

    if args.check_grad:
        try:
            _, g_ours = _run_method("ours", built, args.steps)
            release()
            _, g_naive = _run_method("naive", built, args.steps)
            a = torch.cat([g.flatten().float() for g in g_ours])
            b = torch.cat([g.flatten().float() for g in g_naive])
            finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
            scale = float(b.abs().max()) if finite else 0.0
            result["grad_check"] = {
                "steps": args.steps,
                "max_rel_error": float((a - b).abs().max()) / scale if scale > 0 else None,
                "max_abs_naive": scale,
                "nonzero_fraction": float((b != 0).float().mean()),
                "finite": finite,
            }
        except oom_error:
            result["grad_check"] = {"steps": args.steps, "error": "OOM"}

    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ====================================================================== driver
def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _spawn(
    args: argparse.Namespace, phase: str, steps: int, method: str | None = None, check_grad: bool = False
) -> dict[str, Any]:
    """Run one worker process; returns its result (``{"error": ...}`` if it produced none)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--phase", phase,
        "--steps-one", str(steps),
        "--methods", *args.methods,
        "--model", args.model,
        "--device", args.device,
        "--dtype", args.dtype,
        "--repeats", str(args.repeats),
        "--min-timed-steps", str(args.min_timed_steps),
        "--threads", str(args.threads),
        "--init-lambda", str(args.init_lambda),
    ]  # fmt: skip
    if method is not None:
        cmd += ["--method", method]
    if check_grad:
        cmd.append("--check-grad")
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # timings: glibc's default allocator
    if phase == "memory" and args.device == "cpu" and args.mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
            result["process_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    if "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr.lower():
        tail = "OOM"
    return {"error": f"worker exited {proc.returncode}: {tail}"}


def _gpu_note(r: dict[str, Any]) -> str:
    if not str(r.get("peak_source", "")).startswith("torch.cuda") or "peak_abs_mb" not in r:
        return ""
    return f" (GPU peak {r['peak_abs_mb'] / 1024:.1f} GiB with the model's {r['model_mb'] / 1024:.1f} GiB)"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(results: dict[tuple[str, int], dict[str, Any]], methods: list[str], steps: list[int]) -> str:
    col = 22
    header = "    T |" + "|".join(f"{m:>{col - 1}} " for m in methods)
    sub = "      |" + "|".join(f"{'peak MB':>11} {'s/iter':>9} " for _ in methods)
    lines = [header, sub, "-" * len(sub)]
    for t in steps:
        cells = []
        for m in methods:
            r = results.get((m, t), {})
            if "error" in r:
                cells.append(f"{r['error'][: col - 2]:>{col - 1}} ")
            else:
                cells.append(f"{_fmt(r.get('peak_mb'), '11.1f')} {_fmt(r.get('s_per_iter'), '9.3f')} ")
        lines.append(f"{t:>5} |" + "|".join(cells))
    return "\n".join(lines)


def _checks(
    results: dict[tuple[str, int], dict[str, Any]], methods: list[str], steps: list[int]
) -> list[dict[str, Any]]:
    def get(m: str, t: int, key: str) -> float | None:
        return results.get((m, t), {}).get(key)

    checks: list[dict[str, Any]] = []
    lo, hi = min(steps), max(steps)
    if "ours" in methods and hi > lo:
        a, b = get("ours", hi, "peak_mb"), get("ours", lo, "peak_mb")
        ratio = a / b if a is not None and b else None
        checks.append({
            "name": f"memory ours T={hi} / T={lo}", "value": ratio, "target": f"<= {TARGET_MEMORY_RATIO:.2f}",
            "pass": None if ratio is None else ratio <= TARGET_MEMORY_RATIO,
        })  # fmt: skip
    if "naive" in methods and hi > lo:
        a, b = get("naive", hi, "peak_mb"), get("naive", lo, "peak_mb")
        ratio = a / b if a is not None and b else None
        checks.append(
            {"name": f"memory naive T={hi} / T={lo}", "value": ratio, "target": "(for reference)", "pass": None}
        )
    for other, target, strict in (("naive", TARGET_TIME_VS_NAIVE, False), ("two_call", TARGET_TIME_VS_TWO_CALL, True)):
        if "ours" not in methods or other not in methods:
            continue
        for t in steps:
            a, b = get("ours", t, "s_per_iter"), get(other, t, "s_per_iter")
            ratio = a / b if a is not None and b else None
            ok = None if ratio is None else (ratio < target if strict else ratio <= target)
            checks.append({
                "name": f"time ours / {other} T={t}", "value": ratio,
                "target": f"{'<' if strict else '<='} {target:.2f}", "pass": ok,
            })  # fmt: skip
    return checks


def _verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def driver(args: argparse.Namespace) -> int:
    spec = SPECS[args.model]
    methods = list(args.methods)
    steps = sorted(set(args.steps))
    started = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env_note = (
        "memory: one process per method and T, "
        f"started with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}, one iteration"
        if args.device == "cpu" and args.mmap_threshold > 0
        else "memory: one process per method and T, one iteration"
        + (" (glibc's default malloc: peak RSS is NOT live memory)" if args.device == "cpu" else "")
    )
    print(f"trajectory gradient benchmark: {spec.name} model ({spec.describe()})")
    print(
        f"device {args.device}, {args.dtype}, {args.threads} thread(s), T = {' '.join(map(str, steps))}\n{env_note}\n"
        "time: one process per T running the methods interleaved, median of "
        f"{', '.join(f'{_timed_repeats(args, t)} (T={t})' for t in steps)} iterations after a warm-up"
        + (" (glibc's default malloc)" if args.device == "cpu" else ""),
        flush=True,
    )
    results: dict[tuple[str, int], dict[str, Any]] = {}
    timing_runs: dict[int, dict[str, Any]] = {}
    lo = min(steps)
    grad = None
    for t in steps:
        for m in methods:
            mem = _spawn(args, "memory", t, method=m)
            r = {"method": m, "steps": t, **mem.get("methods", {}).get(m, {})}
            if "error" in mem:
                r["error"] = mem["error"]
            r["memory_process_s"] = mem.get("process_s")
            results[(m, t)] = r
            what = f"ERROR {r['error']}" if "error" in r else f"peak {r['peak_mb']:9.1f} MB above the model"
            extra = _gpu_note(r)
            print(f"  memory {m:>8} T={t:<3} {what}{extra}  (process {mem.get('process_s', 0):.0f} s)", flush=True)
        run = _spawn(args, "time", t, check_grad=t == lo and not args.no_grad_check)
        timing_runs[t] = {k: v for k, v in run.items() if k != "methods"}
        if t == lo:
            grad = run.get("grad_check")
        cells = []
        for m in methods:
            tr = run.get("methods", {}).get(m, {})
            r = results[(m, t)]
            if "error" in run or "error" in tr:
                r.setdefault("error", f"time run: {run.get('error') or tr.get('error')}")
            for key in ("s_per_iter", "s_per_iter_min", "times"):
                if key in tr:
                    r[key] = tr[key]
            if r.get("loss") is None and tr.get("loss") is not None:
                r["loss"] = tr["loss"]
            cells.append(f"{m} {_fmt(r.get('s_per_iter'), '.3f')}")
        share = run.get("others_cpu_share")
        busy = "" if share is None or args.device != "cpu" else f", others used {100 * share:.0f}% CPU"
        err = f" ERROR {run['error']}" if "error" in run else ""
        print(
            f"  time   T={t:<3} s/iter: {', '.join(cells)}{err}  (process {run.get('process_s', 0):.0f} s{busy})",
            flush=True,
        )

    print()
    unit = "GPU memory allocated" if args.device == "cuda" else "RSS"
    print(f"peak {unit} above model + warm-up (MB) and seconds per iteration")
    print(_table(results, methods, steps))
    print()
    checks = _checks(results, methods, steps)
    for c in checks:
        value = _fmt(c["value"], ".3f")
        print(f"{_verdict(c['pass']):>4}  {c['name']:<28} {value:>7}  (target {c['target']})")
    grad_tol = 1e-4 if args.dtype == "float32" else 5e-2
    if grad is not None:
        if "error" in grad or grad.get("max_rel_error") is None:
            why = grad.get("error") or (
                "non-finite gradients" if not grad.get("finite", True) else "all-zero gradients"
            )
            print(f" n/a  gradient ours vs naive T={grad['steps']}: {why}")
        else:
            ok = grad["max_rel_error"] <= grad_tol
            grad["pass"] = ok
            grad["tolerance"] = grad_tol
            print(
                f"{_verdict(ok):>4}  gradient ours vs naive T={grad['steps']}: "
                f"max rel error {grad['max_rel_error']:.2e} "
                f"(tol {grad_tol:.0e}; {100 * grad['nonzero_fraction']:.0f}% of logit grads nonzero)"
            )
    shares = [r["others_cpu_share"] for r in timing_runs.values() if "others_cpu_share" in r]
    if args.device == "cpu" and shares and max(shares) > 0.1:
        print(
            f"NOTE: other processes used up to {100 * max(shares):.0f}% of the {_available_cpus()} CPUs during a timed "
            f"measurement: timings are noisy (with {args.threads} torch thread(s) a stolen core stalls every op; "
            "--threads 1 is steadier on a shared machine)"
        )
    elapsed = time.perf_counter() - started
    print(f"\ntotal run time {elapsed:.0f} s")

    blob = {
        "benchmark": "trajectory_gradient",
        "model": asdict(spec) | {"width": spec.width, "image_tokens": spec.image_tokens},
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "steps": steps,
            "methods": methods,
            "repeats": {str(t): _timed_repeats(args, t) for t in steps},
            "init_lambda": args.init_lambda,
            "malloc": env_note,
        },
        "platform": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus_available": _available_cpus(),
            "loadavg_start": load_start,
            "others_cpu_share_max": max(shares) if shares else None,
        },
        "results": [results[(m, t)] for t in steps for m in methods],
        "timing_processes": {str(t): r for t, r in timing_runs.items()},
        "checks": checks,
        "grad_check": grad,
        "run_time_s": elapsed,
    }
    try:
        import torch

        blob["platform"]["torch"] = torch.__version__
        if args.device == "cuda":
            blob["platform"]["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - informational only
        pass
    text = json.dumps(blob, indent=2)
    print("\nJSON:")
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(text + "\n")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, nargs="+", default=None, help="numbers of steps T (default 4 8 16 32)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32 on cpu, bfloat16 on cuda"
    )
    p.add_argument(
        "--full-flux", action="store_true", help="full-size FLUX.1 (19+38 blocks, 3072 wide), 512x512, T=4 (GPU only)"
    )
    p.add_argument("--quick", action="store_true", help="small model, T = 2 4, 2 repeats (smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations per measurement (default 3; --quick 2)")
    p.add_argument(
        "--min-timed-steps",
        type=int,
        default=None,
        help="time at least this many steps per method and T (default 48 on cpu, 0 on cuda)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (default: CPUs available)")
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="MALLOC_MMAP_THRESHOLD_ of the CPU memory processes (default 65536; --quick 8192; 0: unset)",
    )
    p.add_argument(
        "--init-lambda", type=float, default=1.0, help="initial mask logit (1.0: most hard-concrete gates unclamped)"
    )
    p.add_argument("--no-grad-check", action="store_true", help="skip the ours-vs-naive gradient comparison")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--json-out", default=None, help="also write the JSON result here")
    # internal (worker processes)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--steps-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", choices=tuple(SPECS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--check-grad", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("memory", "time"), default="time", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.model is None:
        args.model = "full" if args.full_flux else ("quick" if args.quick else "default")
    if args.steps is None:
        args.steps = [4] if args.full_flux else ([2, 4] if args.quick else [4, 8, 16, 32])
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.mmap_threshold is None:
        # --quick's activations are mostly below 64 KiB: they would stay in the heap arenas.
        args.mmap_threshold = 8192 if args.model == "quick" else 65536
    if args.min_timed_steps is None:
        args.min_timed_steps = 48 if args.device == "cpu" else 0
    if args.threads <= 0:
        args.threads = _available_cpus()
    if args.worker:
        args.steps = args.steps_one
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.full_flux and args.quick:
        print("error: --full-flux and --quick are exclusive", file=sys.stderr)
        return 2
    if args.full_flux and args.device != "cuda":
        print(
            "error: --full-flux (~12B parameters) needs --device cuda; on a CPU one step takes minutes", file=sys.stderr
        )
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
            return 2
    if min(args.steps) < 1 or args.repeats < 1:
        print("error: --steps and --repeats must be positive", file=sys.stderr)
        return 2
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
