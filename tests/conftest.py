"""Test configuration: CPU unless a GPU exists, and hypothesis profiles."""
import os

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    # The optional CUDA plugin (installed for the compile tests) would otherwise try to
    # initialise a GPU and print a traceback on machines without one.
    os.environ["JAX_PLATFORMS"] = "cpu"

# The suite compiles thousands of small XLA programs and runs each once on tiny shapes: LLVM's
# optimisation passes are most of the compile time there (docs/testing.md, "Compile flags"), so
# the tests compile without them. XLA CPU emits no fast-math, so the results do not change.
# GDN_TEST_XLA_OPT=1 keeps XLA's default optimisation. Read when the first backend starts, so
# it is set here, before any test imports jax; subprocesses inherit it.
from background import TEST_XLA_FLAGS  # noqa: E402

if os.environ.get("GDN_TEST_XLA_OPT") != "1" and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# GDN_TEST_TIMINGS=FILE: per-test wall and compile seconds to FILE (tests/timing_plugin.py).
pytest_plugins = ["timing_plugin"] if os.environ.get("GDN_TEST_TIMINGS") else []

# Every new shape compiles, so no deadline; CI caps the examples to stay in budget.
settings.register_profile("ci", deadline=None, max_examples=4, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """The tier's `-m` expression passes to the suite's pytest subprocesses
    (tests/sharding_cases.py) through GDN_TEST_MARKEXPR, so they run the same tier.
    GDN_TEST_COMPILE_CACHE=DIR turns on JAX's persistent compilation cache in DIR for every
    program (measured not to pay here: docs/testing.md, "Compile once, use many")."""
    cache = os.environ.get("GDN_TEST_COMPILE_CACHE")
    if cache:
        import jax  # noqa: PLC0415

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        import background  # noqa: PLC0415

        background.make_session_dir()
    if config.option.markexpr:
        os.environ["GDN_TEST_MARKEXPR"] = config.option.markexpr
    elif os.environ.get("GDN_TEST_MARKEXPR"):
        config.option.markexpr = os.environ["GDN_TEST_MARKEXPR"]


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test module. Every XLA CPU executable keeps
    ~18 memory mappings (measured); the whole suite in one process compiles thousands of
    programs, and past the kernel's vm.max_map_count (65530) LLVM's next code mapping fails
    and the process segfaults inside a compile. Modules share no compiled programs worth
    keeping."""
    yield
    import gc  # noqa: PLC0415

    import jax  # noqa: PLC0415

    jax.clear_caches()
    gc.collect()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start only the jobs of selected tests
def pytest_collection_modifyitems(session, config, items):
    """Starts the background subprocess jobs of the selected tests (tests/background.py) and
    runs their consumers last, so the jobs overlap the rest of the suite. Under pytest-xdist
    every worker collects every test (and reorders them alike); the first to ask starts each
    job, once for the session."""
    import background  # noqa: PLC0415

    late = []
    for item in items:
        jobs = getattr(item.module, "BACKGROUND", {})
        wanted = [key for key, job in jobs.items() if job.wanted_by(item)]
        for key in wanted:
            background.start(key, jobs[key])
        if wanted:
            late.append(item)
    if late:
        items[:] = [it for it in items if it not in late] + late


def pytest_unconfigure(config):
    """A job nobody waited for (an interrupted or failed run) must not outlive pytest (the main
    process ends them, after every xdist worker is done)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import background  # noqa: PLC0415

    background.stop_all()
