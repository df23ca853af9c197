"""Sharding over 8 host CPU devices (gdn_jax.sharding), and the sharded training example.

The device count must be set before jax is imported, so the cases (tests/sharding_cases.py)
and the example run in their own processes; a failure shows their output.
"""
import os
import subprocess
import sys

import pytest

import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# (without GDN_TEST_TIMINGS: the subprocess's tests are timed as this module's two tests)
ENV = {k: v for k, v in os.environ.items() if k != "GDN_TEST_TIMINGS"}
ENV.update(JAX_PLATFORMS="cpu", XLA_FLAGS=(
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
# Both subprocesses start when collection ends and run beside the other tests (tests/background.py).
BACKGROUND = {
    "sharding_cases": background.Job(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
         "tests/sharding_cases.py"],
        ENV, ROOT, lambda item: item.name == "test_sharding_cases_on_8_host_devices"),
    # impl="reference": the chunked backward would take most of a minute to compile here
    "sharded_example": background.Job(
        [sys.executable, "examples/sharded_training.py", "--steps", "2", "--impl", "reference"],
        ENV, ROOT, lambda item: item.name == "test_sharded_training_example"),
}


def _run(key: str, timeout: int) -> subprocess.CompletedProcess:
    return background.result(key, BACKGROUND[key], timeout)


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout}"
                                  f"\n--- stderr ---\n{proc.stderr[-8000:]}")


def test_sharding_cases_on_8_host_devices():
    proc = _run("sharding_cases", 900)
    _check(proc)
    # no skips presented as passes; deselections only by the tier's -m expression, which the
    # subprocess inherits (tests/conftest.py)
    summary = proc.stdout.strip().splitlines()[-1]
    assert "passed" in summary and not any(w in summary for w in ("skipped", "xfail")), summary
    assert "deselected" not in summary or os.environ.get("GDN_TEST_MARKEXPR"), summary


@pytest.mark.slow
def test_sharded_training_example():
    proc = _run("sharded_example", 600)
    _check(proc)
    assert "loss" in proc.stdout, proc.stdout
