"""The compile-only H100 reports: XLA compiles every kernel of `tests/gpu_compile.py` for
sm_90a (Triton -> LLVM NVPTX -> ptxas) in background subprocesses, one per kernel set; these
tests read the reports: registers, spills, shared memory, launch grids, a donated state
aliased in place. Needs jax-cuda12-plugin + jax-cuda12-pjrt and a ptxas (skipped otherwise).

Every test here is marked `compile_report` (CI leg 2 runs them all on jax 0.12). The chunked
set takes minutes of compile (the chunked programs at the prefill shape), so its tests are
`slow` (the full suite): the everyday tier compiles the recurrent set only. The lowering of
every kernel for CUDA is checked in process in tests/test_gpu_compile.py. The tests sit in
their own module so that under pytest-xdist's `--dist loadfile` this file is scheduled last,
after the subprocesses have had the run to compile.
"""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import background  # noqa: E402
import gpu_compile  # noqa: E402

from gdn_jax.kernels import recurrent  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.compile_report
# Seconds a test waits for its set once it asks (the subprocess started at collection).
WAIT_S = 1500


def _job(kernel_set: str) -> background.Job:
    return background.Job(
        [sys.executable, os.path.join(HERE, "gpu_compile.py"), "--set", kernel_set],
        background.env_with_default_xla_opt(dict(os.environ, JAX_PLATFORMS="cpu")),
        os.path.dirname(HERE),
        lambda item: f"{kernel_set}_report" in getattr(item, "fixturenames", ()))


# Started when collection ends, for the sets that selected tests read (tests/background.py).
BACKGROUND = {"gpu_compile_recurrent": _job("recurrent"), "gpu_compile_chunked": _job("chunked")}


def _report(key: str) -> list[dict]:
    reason = gpu_compile.unavailable_reason()
    if reason:
        pytest.skip(f"CUDA compile checks need jax-cuda12-plugin, jax-cuda12-pjrt and ptxas: {reason}")
    p = background.result(key, BACKGROUND[key], timeout=WAIT_S)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("GPU_COMPILE_JSON ")), None)
    assert p.returncode == 0 and line, (
        f"compile subprocess failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("GPU_COMPILE_JSON "):])


@pytest.fixture(scope="module")
def recurrent_report():
    return _report("gpu_compile_recurrent")


@pytest.fixture(scope="module")
def chunked_report():
    return _report("gpu_compile_chunked")


def test_every_kernel_compiles_for_sm90a(recurrent_report):
    assert len(recurrent_report) >= 13
    for case in recurrent_report:
        assert "error" not in case, f"{case['case']}: {case.get('error')}"
        assert len(case["kernels"]) == 1, case  # one pallas kernel per call
        (k,) = case["kernels"]
        assert k["arch"] == "sm_90a" and k["registers"] > 0, (case["case"], k)
        assert k["num_warps"] in (1, 2, 4, 8)


def test_no_spills_and_smem_within_limit(recurrent_report):
    for case in recurrent_report:
        for k in case["kernels"]:
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, (case["case"], k)
            assert k.get("stack_frame", 0) == 0, (case["case"], k)
            assert k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, (case["case"], k)


def test_k128_f32_bf16_no_spills(recurrent_report):
    """K=V=128: decode (T=1) and short chunks (T=8, 64), float32 and bfloat16 inputs."""
    seen = set()
    bv, _ = recurrent.choose_config(32, 32, 128, 128)
    for case in recurrent_report:
        m = re.match(r"(gda|kda) (float32|bfloat16) (kv|vk) B=32 T=(\d+) Hv=32 K=128 V=128 h0 ht",
                     case["case"])
        if m:
            (k,) = case["kernels"]
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, (case["case"], k)
            assert k["grid"] == [32, 32, 128 // bv]
            seen.add(m.groups())
    # {gda, kda} x {f32, bf16} x {kv, vk} at T=1, plus four T>1 cases
    assert len({s for s in seen if s[3] == "1"}) == 8 and len(seen) == 12


def test_donated_state_is_updated_in_place(recurrent_report):
    """A donated decode state: the kernel's output aliases it, no copy, no other kernel."""
    for case in recurrent_report:
        if " h0 ht" in case["case"]:
            assert case["state_aliased"], case["case"]
            assert case["copies"] == 0 and len(case["all_kernels"]) == 1, case


def test_varlen_pool_and_snapshot_kernels(recurrent_report):
    """Packed sequences + state pool, snapshots, and both, at K = V = 128, bf16.
    One kernel, sm_90a, no spills; a donated pool is the kernel's output (aliased, no copy)."""
    cases = [c for c in recurrent_report if " varlen" in c["case"] or " snap" in c["case"]]
    assert len(cases) == 3, [c["case"] for c in cases]
    for case in cases:
        assert "error" not in case, f"{case['case']}: {case.get('error')}"
        (k,) = case["kernels"]
        assert k["arch"] == "sm_90a" and k["spill_stores"] == 0 and k["spill_loads"] == 0, (case, k)
        assert k.get("stack_frame", 0) == 0 and k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, k
        assert k["grid"][:2] == [32, 32], k  # (N, Hv, V // BV): one program row per sequence
        assert case["state_aliased"] and case["copies"] == 0, case
        assert len(case["all_kernels"]) == 1, case


def test_token_slot_kernel_updates_the_donated_pool_in_place(recurrent_report):
    """Per-token write slots (speculative decoding, 4 drafts): one kernel, sm_90a, no spills,
    the donated pool is its output (aliased, no copy)."""
    cases = [c for c in recurrent_report if " token-slots" in c["case"]]
    assert len(cases) == 1, [c["case"] for c in cases]
    (case,) = cases
    assert "error" not in case, f"{case['case']}: {case.get('error')}"
    (k,) = case["kernels"]
    assert "_tokslots" in k["name"] and k["arch"] == "sm_90a", k
    assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k.get("stack_frame", 0) == 0, k
    assert case["state_aliased"] and case["copies"] == 0 and len(case["all_kernels"]) == 1, case


# ---- chunked kernels (kernels/chunked.py) ----------------------------------------------
# Spill store bytes per thread (ptxas, sm_90a) at the prefill shape, bf16 K = V = 128
# (docs/pallas_chunked_report.md, jaxlib 0.10.2): zero for every GDA and KDA kernel. The bounds
# must hold on both ends of the supported JAX range (the same kernel source can spill
# differently with another jaxlib's Triton and LLVM).
CHUNKED_SPILL_BOUND = {"gdn_chunk_prep": 0, "gdn_chunk_states": 0, "gdn_chunk_fwd": 0,
                       "gdn_chunk_bwd_state": 0, "gdn_chunk_bwd_dqv": 0,
                       "gdn_chunk_bwd_dk": 0, "gdn_chunk_bwd_da": 0,
                       "gdn_chunk_kda_prep": 0, "gdn_chunk_kda_states": 0,
                       "gdn_chunk_kda_fwd": 0, "gdn_chunk_kda_bwd_state": 0,
                       "gdn_chunk_kda_bwd_dqv": 0, "gdn_chunk_kda_bwd_dk": 0,
                       "gdn_chunk_kda_bwd_da": 0}


def _chunked(report, which):
    (case,) = [c for c in report if c["case"].startswith(f"chunked {which} ")]
    assert "error" not in case, f"{case['case']}: {case.get('error')}"
    return case


@pytest.mark.slow
@pytest.mark.parametrize("which,n", [("fwd", 2), ("bwd", 6), ("kda-fwd", 2), ("kda-bwd", 6)])
def test_chunked_compiles_for_sm90a(chunked_report, which, n):
    """Forward (2 kernels) and backward (6 kernels) at B=1, T=2048, Hk=16, Hv=32, K=V=128, bf16,
    GDA and KDA (per-key gates: the kda_ kernels)."""
    case = _chunked(chunked_report, which)
    assert len(case["kernels"]) == n, case
    for k in case["kernels"]:
        assert k["arch"] == "sm_90a" and k["registers"] > 0, k
        assert k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, k
        assert k["name"].startswith("gdn_chunk_kda_") == which.startswith("kda"), k["name"]
        bound = _bound(k["name"])
        assert k.get("spill_stores", 0) <= bound, (k["name"], k.get("spill_stores"), bound)
        if bound == 0:   # spill-free: no spill loads and no stack frame either
            assert k.get("spill_loads", 0) == 0 and k.get("stack_frame", 0) == 0, k


def _bound(name):
    return next(v for p, v in sorted(CHUNKED_SPILL_BOUND.items(), key=lambda x: -len(x[0]))
                if name.startswith(p))


@pytest.mark.slow
@pytest.mark.parametrize("which,n", [("fwd", 2), ("bwd", 6), ("k64-fwd", 2), ("k64-bwd", 6)])
def test_chunked_gda_spill_free(chunked_report, which, n):
    """GDA, bf16, K = V = 128 and 64: every kernel of the forward and the backward program
    compiles with 0 spill bytes and no stack frame, shared memory within the per-block limit."""
    case = _chunked(chunked_report, which)
    assert len(case["kernels"]) == n, case
    for k in case["kernels"]:
        assert k.get("spill_stores", 0) == 0 and k.get("spill_loads", 0) == 0, (case["case"], k)
        assert k.get("stack_frame", 0) == 0, (case["case"], k)
        assert k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, k


@pytest.mark.slow
@pytest.mark.parametrize("which,n", [("varlen-fwd", 2), ("varlen-bwd", 6)])
def test_chunked_varlen_compiles_for_sm90a(chunked_report, which, n):
    """Packed sequences (N = 8, cu_seqlens traced) at the prefill shape: the same kernels with
    the chunk tables; the same spill bounds as without cu_seqlens, and the state-only pass
    (gdn_chunk_states) still spill-free. The tables are a few small XLA fusions, no loop."""
    case = _chunked(chunked_report, which)
    assert len(case["kernels"]) == n, case
    for k in case["kernels"]:
        assert k["arch"] == "sm_90a" and k["registers"] > 0, k
        assert k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, k
        bound = _bound(k["name"])
        assert k.get("spill_stores", 0) <= bound, (k["name"], k.get("spill_stores"), bound)
        if bound == 0:
            assert k.get("spill_loads", 0) == 0 and k.get("stack_frame", 0) == 0, k
    others = [name for name in case["all_kernels"]
              if not any(name.startswith(p) for p in CHUNKED_SPILL_BOUND)]
    assert len(others) <= (3 if which == "varlen-fwd" else 12), others
