"""CUDA lowering and compile-only H100 checks of the Pallas recurrent kernel (no GPU needed).

- In process (jax alone): the kernel lowers for CUDA, and the Triton IR of a float32 kernel
  has no TF32 dot (the checker itself is tested on a control kernel).
- The compile-only H100 reports (XLA compiles every kernel for sm_90a in subprocesses):
  tests/test_gpu_compile_report.py.
"""
from __future__ import annotations

import os
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
