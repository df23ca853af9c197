"""The fused recurrent Pallas kernel in interpret mode against the reference (CPU only).

Each numeric test asserts that `pallas_call` is in the traced program, so a silent fallback
to XLA cannot pass. Buffers are kept to well under a MiB and grids to <= 256 programs:
interpret mode copies whole buffers at every grid step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import recurrent
from gdn_jax.lowering import lower
from gdn_jax.reference import reference_gated_delta_net
from helpers import assert_pallas, rel_err, slow_except, tolerance

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def make_inputs(B, T, Hk, Hv, K, V, *, kda, dtype, seed=0, gate_dtype=F32, g_scale=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hk, K), F32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, Hk, K), F32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, Hv, V), F32).astype(dtype)
    g = -g_scale * jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv, K) if kda else (B, T, Hv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv)))
    h0 = jax.random.normal(ks[5], (B, Hv, K, V), F32)
    return q, k, v, g.astype(gate_dtype), beta.astype(gate_dtype), h0


def to_layout(s, layout):
    return s if layout == "kv" else jnp.swapaxes(s, -1, -2)


# A pairwise-covering set over: mode, group (Hv/Hk), T, K, V, dtype, initial state, l2norm,
# state layout, final state, gate dtype. (B, T, Hk, Hv, K, V, kda, dtype, h0, l2, layout, ht, gdt)
CASES = [
    (2, 1, 2, 4, 128, 128, False, F32, True, True, "kv", True, F32),     # decode, grouped
    (2, 1, 2, 4, 128, 128, True, BF16, True, False, "vk", True, BF16),   # KDA decode
    (1, 64, 1, 2, 64, 64, False, BF16, False, True, "vk", True, F32),    # T=64 from zeros
    (1, 64, 2, 2, 32, 16, True, F32, True, True, "kv", False, F32),      # KDA T=64
    (2, 3, 1, 4, 16, 32, False, F16, True, False, "kv", True, F16),      # K=16, group 4
    (1, 7, 2, 2, 16, 16, True, BF16, False, False, "kv", True, F32),     # K=V=16
    (1, 5, 1, 2, 256, 256, True, F32, True, True, "vk", True, F32),      # K=V=256
    (1, 16, 1, 2, 256, 64, False, BF16, True, True, "kv", True, BF16),   # K=256, V=64
    (1, 16, 2, 4, 64, 256, True, F32, False, True, "kv", True, F32),     # V=256 from zeros
    (2, 33, 1, 2, 32, 128, False, F32, True, False, "vk", False, F32),   # odd T
]
# Everyday tier (the rest: full suite only):
# - 0: grouped heads with two q/k heads (value head h reads q/k head h // group, beta per value
#   head: tests/mutants.md pallas-group-index, pallas-beta-head), sixteen V blocks (BV = 8),
#   decode T = 1, "kv" layout transposed on chip, h0, l2norm;
# - 5: KDA (per-key gates), bf16 inputs, no initial state (the zero tile), no l2norm, two V
#   blocks, T = 7 in one program's token loop.
# The "vk" layout: test_decode_loop_in_vk_layout; clamped gates: test_strong_decay_...;
# output_final_state=False and the unpipelined loop: test_pallas_recurrent_varlen.py's
# test_snapshots_without_final_state_and_prefetch_off.
EVERYDAY_CASES = (0, 5)


@pytest.mark.parametrize("B,T,Hk,Hv,K,V,kda,dtype,has_h0,l2,layout,ht,gdt",
                         slow_except(CASES, *EVERYDAY_CASES))
def test_matches_reference(B, T, Hk, Hv, K, V, kda, dtype, has_h0, l2, layout, ht, gdt):
    q, k, v, g, beta, h0 = make_inputs(B, T, Hk, Hv, K, V, kda=kda, dtype=dtype, gate_dtype=gdt)
    if not has_h0:
        h0 = jnp.zeros_like(h0)
    scale = K ** -0.5
    o_ref, s_ref = reference_gated_delta_net(q, k, v, g, beta, h0, scale=scale, use_qk_l2norm=l2)
    init = to_layout(h0, layout) if has_h0 else None
    assert recurrent.supports(q, k, v, g, beta, init, state_layout=layout) is None

    def fn(q, k, v, g, beta, init):
        return recurrent.fused_recurrent(q, k, v, g, beta, init, scale=scale, use_qk_l2norm=l2,
                                         output_final_state=ht, interpret=True,
                                         state_layout=layout)

    assert_pallas(fn, q, k, v, g, beta, init)
    o, s = jax.jit(fn)(q, k, v, g, beta, init)
    assert o.dtype == q.dtype and o.shape == (B, T, Hv, V)
    tol = tolerance("recurrent", dtype)[0]
    assert rel_err(o, o_ref) < tol
    if ht:
        assert s.dtype == jnp.float32
        assert rel_err(to_layout(s, layout), s_ref) < tol
    else:
        assert s is None


@pytest.mark.slow  # 7 compiles; the everyday tier runs each layout and prefetch=False elsewhere
def test_layouts_and_block_sizes_agree():
    """Both state layouts, every value split and the unpipelined loop give the same result."""
    q, k, v, g, beta, h0 = make_inputs(1, 2, 1, 2, 32, 64, kda=True, dtype=F32, seed=3)
    outs = []
    for layout in ("kv", "vk"):
        for bv in (8, 32, 64):
            o, s = jax.jit(lambda *a, layout=layout, bv=bv: recurrent.fused_recurrent(
                *a, scale=0.2, interpret=True, state_layout=layout, block_v=bv))(
                    q, k, v, g, beta, to_layout(h0, layout))
            outs.append((o, to_layout(s, layout)))
    o, s = jax.jit(lambda *a: recurrent.fused_recurrent(*a, scale=0.2, interpret=True, prefetch=False))(
        q, k, v, g, beta, h0)
    outs.append((o, s))
    for o, s in outs[1:]:
        np.testing.assert_allclose(o, outs[0][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s, outs[0][1], rtol=1e-6, atol=1e-6)


def test_decode_loop_in_vk_layout():
    """A decode loop that keeps its state in the kernel's layout: T=1 steps chained equal one T=4 call."""
    q, k, v, g, beta, h0 = make_inputs(2, 4, 2, 4, 32, 32, kda=False, dtype=F32, seed=5)
    step = jax.jit(lambda *a: recurrent.fused_recurrent(*a, scale=0.3, use_qk_l2norm=True,
                                                        interpret=True, state_layout="vk"),
                   donate_argnums=(5,))
    s = jnp.swapaxes(h0, -1, -2)
    os_ = []
    for t in range(4):
        o, s = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g[:, t:t + 1], beta[:, t:t + 1], s)
        os_.append(o)
    o_ref, s_ref = reference_gated_delta_net(q, k, v, g, beta, h0, scale=0.3, use_qk_l2norm=True)
    assert rel_err(jnp.concatenate(os_, axis=1), o_ref) < 1e-5
    assert rel_err(jnp.swapaxes(s, -1, -2), s_ref) < 1e-5


def test_strong_decay_is_clamped_and_finite():
    """g far below -104 (and -inf) is clamped like every other path: finite, equal to the reference."""
    q, k, v, g, beta, h0 = make_inputs(1, 4, 1, 2, 16, 16, kda=True, dtype=F32, seed=7)
    g = g.at[:, 1].set(-1e4).at[:, 2, 0, 0].set(-jnp.inf)
    o_ref, s_ref = reference_gated_delta_net(q, k, v, g, beta, h0, scale=0.25, use_qk_l2norm=True)
    o, s = jax.jit(lambda *a: recurrent.fused_recurrent(*a, scale=0.25, use_qk_l2norm=True,
                                                        interpret=True))(q, k, v, g, beta, h0)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(s)).all()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_state_is_aliased_to_final_state():
    q, k, v, g, beta, h0 = make_inputs(1, 1, 1, 2, 16, 16, kda=False, dtype=F32)
    jaxpr = str(jax.make_jaxpr(lambda *a: recurrent.fused_recurrent(*a, scale=0.25, interpret=True))(
        q, k, v, g, beta, h0))
    assert "input_output_aliases=((5, 1),)" in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda *a: recurrent.fused_recurrent(
        *a, scale=0.25, interpret=True, alias_state=False))(q, k, v, g, beta, h0))
    assert "input_output_aliases=()" in jaxpr


S = jax.ShapeDtypeStruct


def _sds(B=1, T=1, Hk=1, Hv=2, K=64, V=64, dtype=F32, kda=False, layout="kv", h0=True):
    st = (B, Hv, K, V) if layout == "kv" else (B, Hv, V, K)
    return (S((B, T, Hk, K), dtype), S((B, T, Hk, K), dtype), S((B, T, Hv, V), dtype),
            S((B, T, Hv, K) if kda else (B, T, Hv), F32), S((B, T, Hv), F32),
            S(st, F32) if h0 else None)


@pytest.mark.parametrize("kwargs,layout,needle", [
    (dict(K=96), "kv", "K=96"),
    (dict(V=512), "kv", "V=512"),
    (dict(K=8), "kv", "K=8"),
    (dict(dtype=jnp.int32), "kv", "dtype"),
    (dict(), "vk_on_kv_state", "layout"),
])
def test_supports_declines_with_reason(kwargs, layout, needle):
    args = _sds(**kwargs)
    if layout == "vk_on_kv_state":
        args = _sds(K=32, V=64)
        layout = "vk"
    reason = recurrent.supports(*args, state_layout=layout)
    assert isinstance(reason, str) and needle in reason
    arrays = [None if a is None else jnp.zeros(a.shape, a.dtype) for a in args]
    with pytest.raises(ValueError, match="cannot serve"):
        recurrent.fused_recurrent(*arrays, scale=0.1, interpret=True, state_layout=layout)


def test_supports_accepts_shape_dtype_structs():
    for K, V in ((16, 16), (128, 128), (256, 32)):
        for dtype in (F32, BF16, F16):
            for layout in ("kv", "vk"):
                assert recurrent.supports(*_sds(K=K, V=V, dtype=dtype, layout=layout, kda=True),
                                          state_layout=layout) is None
    assert recurrent.supports(*_sds(h0=False)) is None


def test_cpu_lowering_without_interpret_raises_naming_backend():
    args = _sds(K=32, V=32)
    fn = jax.jit(lambda *a: recurrent.fused_recurrent(*a, scale=0.1))
    with pytest.raises(ValueError, match=r'backend="pallas".*interpret=True'):
        fn.trace(*args).lower(lowering_platforms=("cpu",))
    arrays = [jnp.zeros(a.shape, a.dtype) for a in args]
    with pytest.raises(ValueError, match=r'backend="pallas".*interpret=True'):
        recurrent.fused_recurrent(*arrays, scale=0.1)  # eager, on the CPU


def test_lowers_for_cuda_without_a_gpu():
    """Tracing never looks at the default device: lowering for CUDA works on this CPU machine
    (gdn_jax.lowering names an abstract H100, which jax >= 0.11 needs without a GPU)."""
    args = _sds(B=2, Hv=4, K=128, V=128, kda=True)
    lowered = lower(lambda *a: recurrent.fused_recurrent(*a, scale=0.1), *args, platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()
