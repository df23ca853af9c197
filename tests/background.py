"""Long subprocess checks, started as soon as collection ends so that they run beside the
in-process tests; a test that needs one waits for its result.

A test module declares `BACKGROUND = {key: Job(...)}`; conftest starts the jobs whose
consumers were selected and moves those consumers to the end of the run.

Under pytest-xdist every worker collects every test, so every worker asks for the jobs: the
first to create a job's lock file in the session's job folder (GDN_BG_DIR, made by the main
process) starts it, and a consumer in any worker reads its result from that folder. A job
runs under `sh`, which writes its exit status when it ends, so the result outlives the worker
that started it.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Callable, NamedTuple

# XLA flags of the test processes (set by conftest): no LLVM optimisation passes.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
_DIR_ENV = "GDN_BG_DIR"


def env_with_default_xla_opt(env: dict) -> dict:
    """`env` without TEST_XLA_FLAGS: for a subprocess whose compiled code is what it reports
    (the GPU compile report's registers and spills)."""
    flags = env.get("XLA_FLAGS", "").replace(TEST_XLA_FLAGS, "").strip()
    out = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
    return {**out, "XLA_FLAGS": flags} if flags else out


class Job(NamedTuple):
    args: list
    env: dict
    cwd: str
    wanted_by: Callable  # pytest item -> bool: does this test need the job?


def make_session_dir() -> None:
    """Called by the main pytest process: the folder every process of the session shares."""
    if _DIR_ENV not in os.environ:
        os.environ[_DIR_ENV] = tempfile.mkdtemp(prefix="gdn_bg_")


def _path(key: str, what: str) -> str:
    return os.path.join(os.environ[_DIR_ENV], f"{key}.{what}")


def start(key: str, job: Job) -> None:
    """Starts the job unless a process of this session already did."""
    try:
        os.close(os.open(_path(key, "lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    rc, out, err = _path(key, "rc"), _path(key, "out"), _path(key, "err")
    script = f'"$@" >"{out}" 2>"{err}"; echo $? >"{rc}.tmp" && mv "{rc}.tmp" "{rc}"'
    p = subprocess.Popen(["sh", "-c", script, "sh", *job.args], env=job.env, cwd=job.cwd,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    with open(_path(key, "pid"), "w") as f:
        f.write(str(p.pid))


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def result(key: str, job: Job, timeout: float) -> subprocess.CompletedProcess:
    """The finished job (started now if collection did not start it)."""
    start(key, job)
    rc_path, deadline = _path(key, "rc"), time.monotonic() + timeout
    while not os.path.exists(rc_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not os.path.exists(rc_path):
        _kill(key)
        return subprocess.CompletedProcess(job.args, -9, _read(_path(key, "out")),
                                           _read(_path(key, "err")) + f"\n[timed out after {timeout} s]")
    return subprocess.CompletedProcess(job.args, int(_read(rc_path).strip()),
                                       _read(_path(key, "out")), _read(_path(key, "err")))


def _kill(key: str) -> None:
    try:
        os.killpg(int(_read(_path(key, "pid"))), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass


def stop_all() -> None:
    """Called by the main process at the end: kills the jobs still running (their results were
    not asked for, say after a failure or an interrupt) and removes the session's folder."""
    folder = os.environ.get(_DIR_ENV)
    if not folder or not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.endswith(".pid") and not os.path.exists(os.path.join(folder, name[:-4] + ".rc")):
            _kill(name[:-4])
    shutil.rmtree(folder, ignore_errors=True)
