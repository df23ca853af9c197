"""Per-test wall time and JAX compile time, for docs/testing.md.

Enabled by `GDN_TEST_TIMINGS=FILE` (tests/conftest.py loads this plugin then): every test's
setup + call + teardown wall time, and the seconds JAX spent tracing, lowering and compiling
inside it (from `jax.monitoring`'s duration events), go to FILE as JSON when the run ends
(and FILE + "l" gets one JSON line per test as it finishes).
`python tests/timing_report.py FILE` renders the table.
"""
from __future__ import annotations

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

# Taken out of the environment, so that the suite's pytest subprocesses do not write here too.
_PATH = os.environ.pop("GDN_TEST_TIMINGS", None)
_rows: dict = defaultdict(lambda: defaultdict(float))
_current: list = [None]


def _listener(event: str, duration: float, **_) -> None:
    col = _EVENTS.get(event)
    if col is not None and _current[0] is not None:
        row = _rows[_current[0]]
        row[col] += duration
        if col == "compile_s":
            row["compiles"] += 1


def pytest_configure(config):
    import jax  # noqa: PLC0415

    if _PATH and os.path.exists(_PATH + "l"):
        os.remove(_PATH + "l")  # a fresh per-test log for this run

    jax.monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    t0 = time.perf_counter()
    yield
    _rows[item.nodeid]["wall_s"] += time.perf_counter() - t0
    _current[0] = None
    if _PATH:  # one JSON line per finished test, so a partial run can be read too
        with open(_PATH + "l", "a") as f:
            f.write(json.dumps({"nodeid": item.nodeid, **_rows[item.nodeid]}) + "\n")


def pytest_sessionfinish(session, exitstatus):
    if _PATH:
        with open(_PATH, "w") as f:
            json.dump({k: dict(v) for k, v in _rows.items()}, f, indent=1, sort_keys=True)
