"""The pinned CPU numerics' choice of how OpenMP threads wait (erasekit.reproducibility)."""

import multiprocessing
import os
import time

import pytest
import torch

from erasekit import reproducibility
from erasekit.reproducibility import (
    IDLE_SPINCOUNT,
    PINNED_ENVIRONMENT,
    WAIT_VARIABLES,
    numerics_record,
    other_cpu_load,
    pin_cpu_numerics,
    wait_environment,
)


def test_wait_environment_spins_only_on_a_machine_seen_idle():
    assert wait_environment(0.0) == {"GOMP_SPINCOUNT": IDLE_SPINCOUNT}
    assert wait_environment(0.4) == {"GOMP_SPINCOUNT": IDLE_SPINCOUNT}
    assert wait_environment(0.6) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_environment(None) == {"OMP_WAIT_POLICY": "PASSIVE"}  # load unknown: the safe choice


def _spin(seconds: float) -> None:
    stop = time.time() + seconds
    while time.time() < stop:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_other_cpu_load_sees_a_spinning_process():
    spinner = multiprocessing.get_context("fork").Process(target=_spin, args=(2.0,))
    spinner.start()
    try:
        time.sleep(0.2)  # the child is spinning
        load = other_cpu_load(0.5)
    finally:
        spinner.terminate()
        spinner.join()
    assert load is not None and 0.5 <= load <= os.cpu_count() + 0.01


@pytest.fixture
def clean_environment(monkeypatch):
    """No pinned or wait variables set; everything restored afterwards, the torch threads too."""
    for name in (*PINNED_ENVIRONMENT, *WAIT_VARIABLES, "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(reproducibility, "_wait_decision", {})
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_user_wait_settings_are_kept(clean_environment, monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    monkeypatch.setattr(reproducibility, "other_cpu_load", lambda: pytest.fail("the load must not be sampled"))
    pin_cpu_numerics()
    assert os.environ["GOMP_SPINCOUNT"] == "123" and "OMP_WAIT_POLICY" not in os.environ
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "wait" not in numerics_record()


def test_one_thread_sleeps_without_sampling(clean_environment, monkeypatch):
    monkeypatch.setattr(reproducibility, "other_cpu_load", lambda: pytest.fail("the load must not be sampled"))
    pin_cpu_numerics(1)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize(
    ("load", "expected"), [(0.1, ("GOMP_SPINCOUNT", IDLE_SPINCOUNT)), (1.7, ("OMP_WAIT_POLICY", "PASSIVE"))]
)
def test_the_load_decides_and_is_recorded(clean_environment, monkeypatch, load, expected):
    monkeypatch.setattr(reproducibility, "other_cpu_load", lambda: load)
    late = pin_cpu_numerics()
    name, value = expected
    assert os.environ[name] == value
    assert name in late  # torch is loaded in the test process: the caller is told it may not take effect
    record = numerics_record()
    assert record["environment"][name] == value
    assert record["wait"] == {"other_cores_busy_at_start": load}
