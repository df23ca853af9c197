"""Per-test wall time and JAX compile time, for docs/testing.md.

Enabled by `GDN_TEST_TIMINGS=FILE` (tests/conftest.py loads this plugin then): every test's
setup + call + teardown wall time, the seconds JAX spent tracing, lowering and compiling
inside it (from `jax.monitoring`'s duration events), and the compiles served by the persistent
compilation cache (with GDN_TEST_COMPILE_CACHE, tests/conftest.py) go to FILE as JSON when the
run ends. Each process (the main one, or each pytest-xdist worker) appends a JSON line per
finished test to `FILE.<worker>.jsonl`, so a partial run can be read too; the main process
merges them into FILE. `python tests/timing_report.py FILE` renders the tables.
"""
from __future__ import annotations

import glob
import json
import os
import time
from collections import defaultdict

import pytest

# jax.monitoring duration events -> the column they add to.
_EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile_s",
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
}

_PATH = os.environ.get("GDN_TEST_TIMINGS")
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
_rows: dict = defaultdict(lambda: defaultdict(float))
_current: list = [None]


def _listener(event: str, duration: float, **_) -> None:
    col = _EVENTS.get(event)
    if col is not None and _current[0] is not None:
        row = _rows[_current[0]]
        row[col] += duration
        if col == "compile_s":
            row["compiles"] += 1


def _event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits" and _current[0] is not None:
        _rows[_current[0]]["cache_hits"] += 1


def pytest_configure(config):
    import jax  # noqa: PLC0415

    if _WORKER == "main":  # before any worker starts: a fresh set of per-process logs
        for old in glob.glob(f"{_PATH}.*.jsonl"):
            os.remove(old)
    jax.monitoring.register_event_duration_secs_listener(_listener)
    jax.monitoring.register_event_listener(_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    t0 = time.perf_counter()
    yield
    _rows[item.nodeid]["wall_s"] += time.perf_counter() - t0
    _current[0] = None
    with open(f"{_PATH}.{_WORKER}.jsonl", "a") as f:
        f.write(json.dumps({"nodeid": item.nodeid, "worker": _WORKER, **_rows[item.nodeid]}) + "\n")


def pytest_sessionfinish(session, exitstatus):
    if _WORKER != "main":
        return
    rows = {}
    for log in sorted(glob.glob(f"{_PATH}.*.jsonl")):
        with open(log) as f:
            for line in f:
                row = json.loads(line)
                rows[row.pop("nodeid")] = row
    with open(_PATH, "w") as f:
        json.dump(rows, f, indent=1, sort_keys=True)
