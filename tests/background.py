"""Long subprocess checks, started as soon as collection ends so that they run on the second
core while the in-process tests run; a test that needs one waits for its result.

A test module declares `BACKGROUND = {key: Job(...)}`; conftest starts the jobs whose
consumers were selected and moves those consumers to the end of the run.
"""
from __future__ import annotations

import subprocess
from typing import Callable, NamedTuple


class Job(NamedTuple):
    args: list
    env: dict
    cwd: str
    wanted_by: Callable  # pytest item -> bool: does this test need the job?


# XLA flags of the test processes (set by conftest): no LLVM optimisation passes.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def env_with_default_xla_opt(env: dict) -> dict:
    """`env` without TEST_XLA_FLAGS: for a subprocess whose compiled code is what it reports
    (the GPU compile report's registers and spills)."""
    flags = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    out = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
    return {**out, "XLA_FLAGS": flags} if flags else out


_RUNNING: dict = {}
_DONE: dict = {}


def start(key: str, job: Job) -> None:
    if key not in _RUNNING and key not in _DONE:
        _RUNNING[key] = subprocess.Popen(job.args, env=job.env, cwd=job.cwd, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(key: str, job: Job, timeout: float) -> subprocess.CompletedProcess:
    """The finished job (started now if collection did not start it)."""
    if key not in _DONE:
        start(key, job)
        p = _RUNNING.pop(key)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n[timed out after {timeout} s]"
        _DONE[key] = subprocess.CompletedProcess(job.args, p.returncode, out, err)
    return _DONE[key]


def stop_all() -> None:
    """Kills the jobs still running (their results were not asked for)."""
    while _RUNNING:
        _, p = _RUNNING.popitem()
        if p.poll() is None:
            p.kill()
        p.communicate()
