"""Shared pytest configuration."""

import os
import tempfile
from pathlib import Path

# Never touch the Hugging Face Hub from tests (a hub lookup without network hangs).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The demo's image cache (erasekit.toyworld.image_cache) writes into a folder of this session, not the user's.
os.environ["ERASEKIT_CACHE"] = tempfile.mkdtemp(prefix="erasekit-test-cache-")
# So does the code that diffusers copies out of pruned pipelines (trust_remote_code): parallel workers
# loading them at once would otherwise write the same files of the user's modules cache.
os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="erasekit-test-modules-")
# The CPU numerics `erasekit demo` pins (AVX2 kernels, ...), set before torch starts: in-process tests draw
# the same images as the demo and its shipped image cache, and train the same masks, on any x86 machine.
from erasekit.reproducibility import pin_cpu_numerics  # noqa: E402  (imports no torch)

# `make test` runs the suite in parallel (pytest-xdist, one worker per core): each worker then takes its
# share of the cores for torch, or the workers' threads would fight over them. The bits do not depend on
# the thread count (pinned numerics), so the results are those of a serial run.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
pin_cpu_numerics(max(1, (os.cpu_count() or 1) // _WORKERS) if _WORKERS > 1 else None)

# The reference data (prompt sets, published masks) is not part of the repository: tests find it through
# ERASEKIT_DATA, which defaults to the developers' data folder beside the checkout when there is one.
# Tests that need it skip otherwise (see reference_data.py).
_DEVELOPERS_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "ERASEKIT_DATA" not in os.environ and _DEVELOPERS_DATA.is_dir():
    os.environ["ERASEKIT_DATA"] = str(_DEVELOPERS_DATA)


# --------------------------------------------------------------------------- tiny FLUX training
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of small networks: they gain nothing from more, and a busy 2-core
    machine runs two threads far slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_accelerator_state():
    """A test that makes accelerators starts and ends without accelerate's process-wide state (another
    test's accelerator would otherwise be reused, with its logging folder)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _tiny_train_overrides(model: str, **extra: object) -> list[str]:
    """``--set`` overrides for a CPU training run of the tiny FLUX pipeline at ``model``.

    Large mask learning rates and a low ``init_lambda`` make some units switch off within a few
    iterations. ``extra`` adds or replaces overrides: ``train__iterations=6`` means
    ``train.iterations=6`` (values are written as YAML scalars).
    """
    settings: dict[str, object] = {
        "model.id": model,
        "model.device": "cpu",
        "model.dtype": "float32",
        "sampling.steps": 2,
        "sampling.resolution": 32,
        "sampling.max_sequence_length": 16,
        "train.iterations": 4,
        "train.checkpoint_every": 0,
        "concept.concept": "cat",
        "concept.anchor": "dog",
        "concept.preservation_prompts": "[a red car on a road, a house by a lake, a bowl of fruit]",
        "mask.neurons.lr": 2.0,
        "mask.norm.lr": 2.0,
        "mask.init_lambda": 0.5,
    }
    for key, value in extra.items():
        settings[key.replace("__", ".")] = value
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny FLUX pipeline saved once per session (a diffusers folder, float32)."""
    from erasekit.tiny.flux import save_tiny_flux_pipeline

    return str(save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipeline"))


@pytest.fixture(scope="module")
def tiny_flux_pipe(tiny_flux_path: str):
    """That pipeline loaded with stock diffusers (float32, no progress bars), one per test module: a module
    may change it (its config, its scheduler) without reaching the others."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_train_overrides(tiny_flux_path: str):
    """Factory: ``tiny_train_overrides(train__iterations=6)`` -> the override list of a short CPU run."""

    def make(**extra: object) -> list[str]:
        return _tiny_train_overrides(tiny_flux_path, **extra)

    return make


@pytest.fixture(scope="session")
def tiny_train_config(tiny_train_overrides):
    """Factory: the resolved :class:`EraseConfig` of a short CPU run on the tiny pipeline."""
    from erasekit.config import load_config

    def make(**extra: object):
        return load_config(None, tiny_train_overrides(**extra))

    return make
