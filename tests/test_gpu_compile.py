"""CUDA lowering and compile-only H100 checks of the Pallas recurrent kernel (no GPU needed).

- In process (jax alone): the kernel lowers for CUDA, and the Triton IR of a float32 kernel
  has no TF32 dot (the checker itself is tested on a control kernel).
- In one subprocess (needs jax-cuda12-plugin + jax-cuda12-pjrt and a ptxas; skipped otherwise):
  XLA compiles every kernel of `tests/gpu_compile.py` for sm_90a; no register spills, shared
  memory within the per-block limit, a donated state is aliased in place.
"""
from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import background  # noqa: E402
import gpu_compile  # noqa: E402

from gdn_jax.kernels import recurrent  # noqa: E402
from gdn_jax.lowering import abstract_gpu, lower  # noqa: E402

S = jax.ShapeDtypeStruct
HERE = os.path.dirname(os.path.abspath(__file__))


def tf32_dots(tt_ir: str) -> list[str]:
    """tt.dot ops with float32 operands that do not run at full (IEEE) float32 precision."""
    return [line.strip() for line in tt_ir.splitlines()
            if "tt.dot" in line and "xf32>" in line.split(":")[-1].split("->")[0]
            and re.search(r"inputPrecision = tf32", line)]


def _control_dot(precision):
    def kernel(a_ref, b_ref, o_ref):
        o_ref[...] = jnp.dot(a_ref[...], b_ref[...], precision=precision)
    return lambda a, b: pl.pallas_call(kernel, out_shape=S((16, 16), jnp.float32),
                                       compiler_params=plt.CompilerParams(num_warps=1))(a, b)


def test_precision_checker_flags_tf32():
    x = S((16, 16), jnp.float32)
    (default,) = gpu_compile.triton_kernels(_control_dot(None), x, x)
    (highest,) = gpu_compile.triton_kernels(_control_dot(jax.lax.Precision.HIGHEST), x, x)
    assert tf32_dots(default["ir"]) and not tf32_dots(highest["ir"])


def test_lowering_helper_names_an_abstract_gpu_only_while_lowering():
    """gdn_jax.lowering.lower: a Pallas Triton kernel lowers for CUDA here on every supported
    jax (0.11+ needs the abstract device), for one platform or several; the context ends with
    the call; bad platforms raise naming the argument."""
    x = S((16, 16), jnp.float32)
    assert "__gpu$xla.gpu.triton" in lower(_control_dot(None), x, x, platforms=("cuda",)).as_text()
    for platforms in [("cpu", "cuda"), ("cuda", "cpu"), ("cpu", "tpu")]:
        text = lower(lambda a: a + a, x, platforms=platforms).as_text()
        assert "stablehlo.add" in text and "__gpu$xla.gpu.triton" not in text
    with abstract_gpu():
        assert jax.sharding.get_abstract_mesh().abstract_device.platform == "cuda"
    assert jax.sharding.get_abstract_mesh().empty
    for bad in [(), ("cuda", 3), None]:
        with pytest.raises(ValueError, match="platforms"):
            lower(lambda a: a, x, platforms=bad)
    with pytest.raises(ValueError, match="device_kind"):
        lower(lambda a: a, x, device_kind="")


@pytest.mark.parametrize("kda", [False, True])
def test_float32_kernel_is_full_precision(kda):
    B, T, Hk, Hv, K, V = 2, 4, 2, 4, 128, 128
    args = (S((B, T, Hk, K), jnp.float32), S((B, T, Hk, K), jnp.float32), S((B, T, Hv, V), jnp.float32),
            S((B, T, Hv, K) if kda else (B, T, Hv), jnp.float32), S((B, T, Hv), jnp.float32),
            S((B, Hv, K, V), jnp.float32))
    (k,) = gpu_compile.triton_kernels(
        lambda *a: recurrent.fused_recurrent(*a, scale=0.1, use_qk_l2norm=True), *args)
    ir = k["ir"]
    assert k["name"].startswith("gdn_recurrent_")
    assert not tf32_dots(ir) and "tf32" not in ir
    # The matvecs S^T k and S^T q are float32 multiply + tt.reduce (no dot at one token a step).
    assert re.search(r"tt\.reduce", ir) and re.search(r"arith\.addf .*: f32", ir)
    assert "scf.for" in ir  # tokens are looped inside the kernel
    bv, nw = recurrent.choose_config(B, Hv, K, V)
    assert k["grid"] == [B, Hv, V // bv] and k["num_warps"] == nw


# The compile subprocess starts when collection ends and runs beside the other tests
# (tests/background.py); the tests that read its report run last.
BACKGROUND = {"gpu_compile": background.Job(
    [sys.executable, os.path.join(HERE, "gpu_compile.py")], background.env_with_default_xla_opt(dict(os.environ, JAX_PLATFORMS="cpu")),
    os.path.dirname(HERE), lambda item: "compile_report" in getattr(item, "fixturenames", ()))}


@pytest.fixture(scope="module")
def compile_report():
    reason = gpu_compile.unavailable_reason()
    if reason:
        pytest.skip(f"CUDA compile checks need jax-cuda12-plugin, jax-cuda12-pjrt and ptxas: {reason}")
    p = background.result("gpu_compile", BACKGROUND["gpu_compile"], timeout=900)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("GPU_COMPILE_JSON ")), None)
    assert p.returncode == 0 and line, (
        f"compile subprocess failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("GPU_COMPILE_JSON "):])


def _recurrent(report):
    return [c for c in report if not c["case"].startswith("chunked ")]


def test_every_kernel_compiles_for_sm90a(compile_report):
    compile_report = _recurrent(compile_report)
    assert len(compile_report) >= 13
    for case in compile_report:
        assert "error" not in case, f"{case['case']}: {case.get('error')}"
        assert len(case["kernels"]) == 1, case  # one pallas kernel per call
        (k,) = case["kernels"]
        assert k["arch"] == "sm_90a" and k["registers"] > 0, (case["case"], k)
        assert k["num_warps"] in (1, 2, 4, 8)


def test_no_spills_and_smem_within_limit(compile_report):
    for case in _recurrent(compile_report):
        for k in case["kernels"]:
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, (case["case"], k)
            assert k.get("stack_frame", 0) == 0, (case["case"], k)
            assert k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, (case["case"], k)


def test_k128_f32_bf16_no_spills(compile_report):
    """K=V=128: decode (T=1) and short chunks (T=8, 64), float32 and bfloat16 inputs."""
    seen = set()
    bv, _ = recurrent.choose_config(32, 32, 128, 128)
    for case in compile_report:
        m = re.match(r"(gda|kda) (float32|bfloat16) (kv|vk) B=32 T=(\d+) Hv=32 K=128 V=128 h0 ht",
                     case["case"])
        if m:
            (k,) = case["kernels"]
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, (case["case"], k)
            assert k["grid"] == [32, 32, 128 // bv]
            seen.add(m.groups())
    # {gda, kda} x {f32, bf16} x {kv, vk} at T=1, plus four T>1 cases
    assert len({s for s in seen if s[3] == "1"}) == 8 and len(seen) == 12


def test_donated_state_is_updated_in_place(compile_report):
    """A donated decode state: the kernel's output aliases it, no copy, no other kernel."""
    for case in _recurrent(compile_report):
        if " h0 ht" in case["case"]:
            assert case["state_aliased"], case["case"]
            assert case["copies"] == 0 and len(case["all_kernels"]) == 1, case


def test_varlen_pool_and_snapshot_kernels(compile_report):
    """Packed sequences + state pool, snapshots, and both, at K = V = 128, bf16.
    One kernel, sm_90a, no spills; a donated pool is the kernel's output (aliased, no copy)."""
    cases = [c for c in _recurrent(compile_report) if " varlen" in c["case"] or " snap" in c["case"]]
    assert len(cases) == 3, [c["case"] for c in cases]
    for case in cases:
        assert "error" not in case, f"{case['case']}: {case.get('error')}"
        (k,) = case["kernels"]
        assert k["arch"] == "sm_90a" and k["spill_stores"] == 0 and k["spill_loads"] == 0, (case, k)
        assert k.get("stack_frame", 0) == 0 and k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, k
        assert k["grid"][:2] == [32, 32], k  # (N, Hv, V // BV): one program row per sequence
        assert case["state_aliased"] and case["copies"] == 0, case
        assert len(case["all_kernels"]) == 1, case


def test_token_slot_kernel_updates_the_donated_pool_in_place(compile_report):
    """Per-token write slots (speculative decoding, 4 drafts): one kernel, sm_90a, no spills,
    the donated pool is its output (aliased, no copy)."""
    cases = [c for c in _recurrent(compile_report) if " token-slots" in c["case"]]
    assert len(cases) == 1, [c["case"] for c in cases]
    (case,) = cases
    assert "error" not in case, f"{case['case']}: {case.get('error')}"
    (k,) = case["kernels"]
    assert "_tokslots" in k["name"] and k["arch"] == "sm_90a", k
    assert k["spill_stores"] == 0 and k["spill_loads"] == 0 and k.get("stack_frame", 0) == 0, k
    assert case["state_aliased"] and case["copies"] == 0 and len(case["all_kernels"]) == 1, case


def test_varlen_token_loop_is_a_for_loop():
    """With traced cu_seqlens / state_indices the token loops have traced bounds; the Triton
    lowering pattern-matches them to scf.for (no scf.while), and the pool load is masked."""
    B, T, N, P, Hk, Hv, K, V = 1, 16, 4, 8, 1, 2, 128, 128
    bf = jnp.bfloat16
    args = (S((B, T, Hk, K), bf), S((B, T, Hk, K), bf), S((B, T, Hv, V), bf),
            S((B, T, Hv, K), jnp.float32), S((B, T, Hv), jnp.float32), S((P, Hv, K, V), jnp.float32),
            S((N + 1,), jnp.int32), S((N,), jnp.int32))
    (k,) = gpu_compile.triton_kernels(
        lambda *a: recurrent.fused_recurrent(*a[:6], scale=0.1, cu_seqlens=a[6], state_indices=a[7],
                                             num_snapshots=2), *args)
    ir = k["ir"]
    assert "scf.while" not in ir
    assert ir.count("scf.for") == 3  # snapshot init, tokens, padding rows
    assert re.search(r"tt\.load %\w+, %\w+, %\w+ : tensor<128x\d+x!tt\.ptr<f32>>", ir)  # masked


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


@pytest.mark.parametrize("which,n", [("fwd", 2), ("bwd", 6), ("kda-fwd", 2), ("kda-bwd", 6)])
def test_chunked_compiles_for_sm90a(compile_report, which, n):
    """Forward (2 kernels) and backward (6 kernels) at B=1, T=2048, Hk=16, Hv=32, K=V=128, bf16,
    GDA and KDA (per-key gates: the kda_ kernels)."""
    case = _chunked(compile_report, which)
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


@pytest.mark.parametrize("which,n", [("fwd", 2), ("bwd", 6), ("k64-fwd", 2), ("k64-bwd", 6)])
def test_chunked_gda_spill_free(compile_report, which, n):
    """GDA, bf16, K = V = 128 and 64: every kernel of the forward and the backward program
    compiles with 0 spill bytes and no stack frame, shared memory within the per-block limit."""
    case = _chunked(compile_report, which)
    assert len(case["kernels"]) == n, case
    for k in case["kernels"]:
        assert k.get("spill_stores", 0) == 0 and k.get("spill_loads", 0) == 0, (case["case"], k)
        assert k.get("stack_frame", 0) == 0, (case["case"], k)
        assert k["smem"] <= gpu_compile.H100_SMEM_PER_BLOCK, k


@pytest.mark.parametrize("which,n", [("varlen-fwd", 2), ("varlen-bwd", 6)])
def test_chunked_varlen_compiles_for_sm90a(compile_report, which, n):
    """Packed sequences (N = 8, cu_seqlens traced) at the prefill shape: the same kernels with
    the chunk tables; the same spill bounds as without cu_seqlens, and the state-only pass
    (gdn_chunk_states) still spill-free. The tables are a few small XLA fusions, no loop."""
    case = _chunked(compile_report, which)
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


@pytest.mark.slow  # lowering every float32 chunked kernel: 87 s on a loaded machine
def test_chunked_float32_kernels_are_full_precision():
    """Every float32 dot of the float32 chunked kernels (forward and backward) is IEEE, no TF32."""
    from gdn_jax.kernels import chunked

    f32 = jnp.float32
    B, T, Hk, Hv, K, V = 1, 100, 1, 2, 64, 64
    args = [S((B, T, Hk, K), f32), S((B, T, Hk, K), f32), S((B, T, Hv, V), f32), S((B, T, Hv), f32),
            S((B, T, Hv), f32), S((B, Hv, K, V), f32)]
    fwd = gpu_compile.triton_kernels(lambda *a: chunked.chunked_forward(*a, scale=0.1), *args)
    bwd = gpu_compile.triton_kernels(lambda *a: chunked.chunked_backward(*a, scale=0.1),
                                     *args, S((B, T, Hv, V), f32), S((B, Hv, K, V), f32))
    assert len(fwd) == 2 and len(bwd) == 6
    # packed sequences (cu_seqlens, 3 sequences): the same dots plus the chunk tables
    cu = S((4,), jnp.int32)
    vargs = args[:5] + [S((3, Hv, K, V), f32)]
    vfwd = gpu_compile.triton_kernels(
        lambda cu, *a: chunked.chunked_forward(*a, scale=0.1, cu_seqlens=cu), cu, *vargs)
    vbwd = gpu_compile.triton_kernels(
        lambda cu, *a: chunked.chunked_backward(*a, scale=0.1, cu_seqlens=cu), cu, *vargs,
        S((B, T, Hv, V), f32), S((3, Hv, K, V), f32))
    assert len(vfwd) == 2 and len(vbwd) == 6
    # KDA (per-key gates): the pairwise sub-block dots, the P-reading state passes
    kargs = args[:3] + [S((B, T, Hv, K), f32)] + args[4:]
    kfwd = gpu_compile.triton_kernels(lambda *a: chunked.chunked_forward(*a, scale=0.1), *kargs)
    kbwd = gpu_compile.triton_kernels(lambda *a: chunked.chunked_backward(*a, scale=0.1),
                                      *kargs, S((B, T, Hv, V), f32), S((B, Hv, K, V), f32))
    assert len(kfwd) == 2 and len(kbwd) == 6
    assert all(k["name"].startswith("gdn_chunk_kda_") for k in kfwd + kbwd)
    for k in fwd + bwd + vfwd + vbwd + kfwd + kbwd:
        assert "tt.dot" in k["ir"] and not tf32_dots(k["ir"]) and "tf32" not in k["ir"], k["name"]
