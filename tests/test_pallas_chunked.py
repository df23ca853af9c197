"""The chunked Pallas kernels (forward and backward) in interpret mode against the reference.

Each numeric test asserts that `pallas_call` is in the traced program. Buffers stay well under a
MiB; grids stay small (interpret mode copies whole buffers at every grid step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import chunked
from gdn_jax.lowering import lower
from gdn_jax.reference import reference_gated_delta_net
from helpers import slow_except

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
# docs/spec.md section 4.2, chunked paths: (outputs, gradients)
TOL = {jnp.dtype(F32): (1e-4, 1e-4), jnp.dtype(BF16): (1e-2, 2e-2), jnp.dtype(F16): (5e-3, 1e-2)}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
# the backward program: prep, state pass, reverse state pass, three gradient kernels
NUM_BWD_KERNELS = 6


def pallas_in_jaxpr(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def make_inputs(B, T, Hk, Hv, K, V, *, dtype, l2, seed=0, gate_dtype=F32, gmin=None):
    """Random inputs; without l2norm the keys are unit vectors (a contractive recurrence).
    gmin: per-token gates uniform in [gmin, gmin + 0.5] (strong decay) instead of -softplus(N)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (B, T, Hk, K), F32)
    k = jax.random.normal(ks[1], (B, T, Hk, K), F32)
    if not l2:
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, Hv, V), F32)
    if gmin is None:
        g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv)))
    else:
        g = gmin + 0.5 * jax.random.uniform(ks[3], (B, T, Hv))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv)))
    h0 = jax.random.normal(ks[5], (B, Hv, K, V), F32)
    return (q.astype(dtype), k.astype(dtype), v.astype(dtype), g.astype(gate_dtype),
            beta.astype(gate_dtype), h0)


# Pairwise-covering forward set over: dtype, group (Hv/Hk), T (ragged and whole chunks),
# K, V, initial state, l2norm, final state, gate dtype.
# (B, T, Hk, Hv, K, V, dtype, h0, l2, ht, gate dtype)
FWD_CASES = [
    (1, 100, 1, 2, 32, 32, F32, True, True, True, F32),      # ragged T, grouped
    (2, 64, 2, 4, 16, 64, F32, False, False, True, F32),     # one whole chunk, K=16
    (1, 130, 1, 2, 64, 32, BF16, True, True, False, BF16),   # three chunks, bf16 gates
    (1, 37, 1, 4, 128, 16, F16, True, False, True, F32),     # K=128, group 4, f16
    (2, 1, 1, 1, 16, 128, BF16, False, True, True, F32),     # T=1, V=128
    (1, 128, 2, 2, 32, 32, F16, False, True, True, F16),     # two whole chunks
    (1, 70, 1, 2, 128, 32, BF16, True, True, True, F32),     # K=128: two 16-column value blocks
]
# Full suite only: the forward kernels run in the everyday tier through the op, ragged and
# carried chunks, grouped heads and h0 (tests/test_weak_decay.py's chunked-pallas row,
# tests/test_op.py), and inside the KDA test below. Case 4 (the forward's V-block grid axis,
# V = 128: four 32-column blocks; a ragged single chunk, T = 1) is the cheapest to add back.
EVERYDAY_FWD = ()


@pytest.mark.parametrize("B,T,Hk,Hv,K,V,dtype,has_h0,l2,ht,gdt",
                         slow_except(FWD_CASES, *EVERYDAY_FWD))
def test_forward_matches_reference(B, T, Hk, Hv, K, V, dtype, has_h0, l2, ht, gdt):
    q, k, v, g, beta, h0 = make_inputs(B, T, Hk, Hv, K, V, dtype=dtype, l2=l2, gate_dtype=gdt)
    scale = K ** -0.5
    o_ref, s_ref = reference_gated_delta_net(q, k, v, g, beta, h0 if has_h0 else jnp.zeros_like(h0),
                                             scale=scale, use_qk_l2norm=l2)
    init = h0 if has_h0 else None
    assert chunked.supports(q, k, v, g, beta, init) is None

    def fn(q, k, v, g, beta, init):
        return chunked.chunked_forward(q, k, v, g, beta, init, scale=scale, use_qk_l2norm=l2,
                                       output_final_state=ht, interpret=True)

    assert pallas_in_jaxpr(fn, q, k, v, g, beta, init)
    o, s = jax.jit(fn)(q, k, v, g, beta, init)
    assert o.dtype == q.dtype and o.shape == (B, T, Hv, V)
    tol = TOL[jnp.dtype(dtype)][0]
    assert rel(o, o_ref) < tol
    if ht:
        assert s.dtype == jnp.float32 and rel(s, s_ref) < tol
    else:
        assert s is None


# (B, T, Hk, Hv, K, V, dtype, h0, l2, dht, gmin)
BWD_CASES = [
    (1, 100, 1, 2, 32, 32, F32, True, True, True, None),     # ragged T, grouped, all six
    (1, 70, 1, 1, 16, 16, F32, True, True, True, -20.0),     # strong decay (g near -20)
    (2, 64, 2, 4, 16, 64, F32, False, False, False, None),   # no h0, no dht, group 2
    (1, 130, 1, 2, 64, 32, BF16, True, True, True, None),    # bf16, three chunks
    (1, 33, 1, 2, 32, 16, F16, True, False, True, -5.0),     # f16, ragged single chunk
]
# Everyday tier: case 2, the backward without h0 and without dht (the None branches, dh0
# None), two q/k heads of two value heads each (dq / dk summed over the group), two V blocks
# in the state passes' grid and the gradient kernels' V loop, one whole chunk, B = 2, raw
# keys. The carried state's gradients (dg's carry term, several chunks, ragged, h0 and dht)
# run in the everyday tier in tests/test_weak_decay.py's chunked-pallas-GDA-H2x1-K32V16-raw-h0
# row (these cases' gates decay the carried state to nothing: tests/mutants.md).
EVERYDAY_BWD = (2,)


@pytest.mark.parametrize("B,T,Hk,Hv,K,V,dtype,has_h0,l2,has_dht,gmin",
                         slow_except(BWD_CASES, *EVERYDAY_BWD))
def test_backward_matches_reference(B, T, Hk, Hv, K, V, dtype, has_h0, l2, has_dht, gmin):
    q, k, v, g, beta, h0 = make_inputs(B, T, Hk, Hv, K, V, dtype=dtype, l2=l2, gmin=gmin, seed=1)
    scale = K ** -0.5

    def ref(q, k, v, g, beta, h0):
        return reference_gated_delta_net(q, k, v, g, beta, h0, scale=scale, use_qk_l2norm=l2)

    h0r = h0 if has_h0 else jnp.zeros_like(h0)
    (o, s), vjp = jax.vjp(ref, q, k, v, g, beta, h0r)
    do = jax.random.normal(jax.random.PRNGKey(9), o.shape).astype(o.dtype)
    dht = jax.random.normal(jax.random.PRNGKey(8), s.shape) if has_dht else None
    grads_ref = vjp((do, dht if has_dht else jnp.zeros_like(s)))
    init = h0 if has_h0 else None

    def fn(q, k, v, g, beta, init, do, dht):
        return chunked.chunked_backward(q, k, v, g, beta, init, do, dht, scale=scale,
                                        use_qk_l2norm=l2, interpret=True)

    args = (q, k, v, g, beta, init, do, dht)
    assert pallas_in_jaxpr(fn, *args)
    grads = jax.jit(fn)(*args)
    tol = TOL[jnp.dtype(dtype)][1]
    for name, x, r, inp in zip(GRAD_NAMES, grads, grads_ref, (q, k, v, g, beta, init)):
        if inp is None:
            assert x is None, name
            continue
        assert x.shape == inp.shape and x.dtype == inp.dtype, name
        assert np.isfinite(np.asarray(x, np.float32)).all(), name
        assert rel(x, r) < tol, (name, rel(x, r))


@pytest.mark.slow  # a minute on a loaded machine, jitted or not; the XLA paths' clamp runs everyday
def test_clamped_gates_have_zero_gradient():
    """g below G_MIN (-104) is clamped like every path; its gradient is zero, all finite."""
    q, k, v, g, beta, h0 = make_inputs(1, 20, 1, 1, 16, 16, dtype=F32, l2=True, seed=2)
    g = g.at[:, 3].set(-1e4).at[:, 5].set(-jnp.inf)
    o_ref, _ = reference_gated_delta_net(q, k, v, g, beta, h0, scale=0.25, use_qk_l2norm=True)
    o, s = chunked.chunked_forward(q, k, v, g, beta, h0, scale=0.25, use_qk_l2norm=True, interpret=True)
    assert rel(o, o_ref) < 1e-4
    do = jnp.ones_like(o)
    grads = chunked.chunked_backward(q, k, v, g, beta, h0, do, None, scale=0.25, use_qk_l2norm=True,
                                     interpret=True)
    for x in grads:
        assert np.isfinite(np.asarray(x)).all()
    assert float(grads[3][0, 3, 0]) == 0.0 and float(grads[3][0, 5, 0]) == 0.0


# ---- KDA (per-key gates g [B, T, Hv, K]) ------------------------------------------------------

def make_kda_inputs(B, T, Hk, Hv, K, V, *, dtype, l2, seed=0, strong=False):
    """KDA inputs: gates -softplus(N) per key channel; strong: on half the (token, channel)
    entries per-token gates uniform in [-30, -19.5] instead (strong decay, down to -30)."""
    q, k, v, _, beta, h0 = make_inputs(B, T, Hk, Hv, K, V, dtype=dtype, l2=l2, seed=seed)
    ks = jax.random.split(jax.random.PRNGKey(seed + 100), 3)
    g = -jax.nn.softplus(jax.random.normal(ks[0], (B, T, Hv, K)))
    if strong:
        gs = -30.0 + 10.5 * jax.random.uniform(ks[1], (B, T, Hv, K))
        g = jnp.where(jax.random.uniform(ks[2], (B, T, Hv, K)) < 0.5, gs, g)
    return q, k, v, g, beta, h0


def _api(scale, l2):
    """The public op on the Pallas chunked kernels (interpret mode); custom_vjp backward."""
    from gdn_jax import gated_delta_net

    def fn(q, k, v, g, beta, init, do, dht):
        def f(*a):
            return gated_delta_net(*a[:5], initial_state=a[5] if init is not None else None,
                                   scale=scale, output_final_state=True,
                                   use_qk_l2norm_in_kernel=l2, impl="chunked", backend="pallas",
                                   interpret=True)
        (o, s), vjp = jax.vjp(f, q, k, v, g, beta, init if init is not None else 0.0)
        grads = vjp((do, dht if dht is not None else jnp.zeros_like(s)))
        return o, s, grads[:5] + ((grads[5],) if init is not None else (None,))
    return fn


# Pairwise over dtype, group, T (ragged / whole chunks / multi-chunk), K, V, h0, l2norm, dht,
# strong decay; the strong-decay case runs through the public API (gated_delta_net).
# (B, T, Hk, Hv, K, V, dtype, h0, l2, dht, strong)
KDA_CASES = [
    (1, 100, 1, 2, 32, 32, F32, True, True, True, False),    # ragged T, grouped, all six
    (1, 70, 1, 1, 32, 16, F32, True, True, True, True),      # strong decay, g in [-30, -19.5]
    (1, 130, 1, 2, 64, 32, BF16, True, True, True, False),   # bf16, three chunks, K = 64
    (1, 64, 2, 4, 16, 64, F16, False, False, False, False),  # f16, group 2, 2 V-blocks, no h0
]
# Everyday tier: case 1, KDA forward and backward kernels in one program through the public op
# (custom_vjp): two chunks, the second ragged (T = 70), several 16-token sub-blocks per chunk
# (the sub-block rule's diagonal and off-diagonal pairs) under strong per-key decay, h0, dht,
# one value head (the smallest grid). KDA bf16 backward in one chunk: tests/test_op.py's
# everyday Pallas recurrent case (its backward is these kernels).
EVERYDAY_KDA = (1,)


@pytest.mark.parametrize("B,T,Hk,Hv,K,V,dtype,has_h0,l2,has_dht,strong",
                         slow_except(KDA_CASES, *EVERYDAY_KDA))
def test_kda_forward_and_gradients_match_reference(B, T, Hk, Hv, K, V, dtype, has_h0, l2, has_dht,
                                                    strong):
    q, k, v, g, beta, h0 = make_kda_inputs(B, T, Hk, Hv, K, V, dtype=dtype, l2=l2, seed=3,
                                           strong=strong)
    scale = K ** -0.5

    def ref(q, k, v, g, beta, h0):
        return reference_gated_delta_net(q, k, v, g, beta, h0, scale=scale, use_qk_l2norm=l2)

    h0r = h0 if has_h0 else jnp.zeros_like(h0)
    (o_r, s_r), vjp = jax.vjp(ref, q, k, v, g, beta, h0r)
    do = jax.random.normal(jax.random.PRNGKey(9), o_r.shape).astype(o_r.dtype)
    dht = jax.random.normal(jax.random.PRNGKey(8), s_r.shape) if has_dht else None
    grads_ref = vjp((do, dht if has_dht else jnp.zeros_like(s_r)))
    init = h0 if has_h0 else None
    assert chunked.supports(q, k, v, g, beta, init) is None
    tol_o, tol_g = TOL[jnp.dtype(dtype)]
    args = (q, k, v, g, beta, init, do, dht)

    if strong:   # forward and backward kernels in one program, through gated_delta_net
        fn = _api(scale, l2)
        assert str(jax.make_jaxpr(fn)(*args)).count("pallas_call") == 2 + NUM_BWD_KERNELS
        o, s, grads = jax.jit(fn)(*args)
    else:
        def fwd(q, k, v, g, beta, init):
            return chunked.chunked_forward(q, k, v, g, beta, init, scale=scale, use_qk_l2norm=l2,
                                           interpret=True)

        def bwd(*a):
            return chunked.chunked_backward(*a, scale=scale, use_qk_l2norm=l2, interpret=True)

        assert pallas_in_jaxpr(fwd, *args[:6]) and pallas_in_jaxpr(bwd, *args)
        o, s = jax.jit(fwd)(*args[:6])
        grads = jax.jit(bwd)(*args)
    assert o.dtype == q.dtype and o.shape == (B, T, Hv, V) and s.dtype == F32
    assert rel(o, o_r) < tol_o and rel(s, s_r) < tol_o, (rel(o, o_r), rel(s, s_r))
    for name, x, r, inp in zip(GRAD_NAMES, grads, grads_ref, (q, k, v, g, beta, init)):
        if inp is None:
            assert x is None, name
            continue
        assert x.shape == inp.shape and x.dtype == inp.dtype, name
        assert np.isfinite(np.asarray(x, np.float32)).all(), name
        assert rel(x, r) < tol_g, (name, rel(x, r))


S = jax.ShapeDtypeStruct


def _sds(B=1, T=100, Hk=1, Hv=2, K=64, V=64, dtype=F32, kda=False, h0=True, h0_shape=None):
    return (S((B, T, Hk, K), dtype), S((B, T, Hk, K), dtype), S((B, T, Hv, V), dtype),
            S((B, T, Hv, K) if kda else (B, T, Hv), F32), S((B, T, Hv), F32),
            S(h0_shape or (B, Hv, K, V), F32) if h0 else None)


@pytest.mark.parametrize("kwargs,layout,needle", [
    (dict(K=96), "kv", "K=96"),
    (dict(V=512), "kv", "V=512"),
    (dict(dtype=jnp.int32), "kv", "dtype"),
    (dict(kda=True, K=256, V=64), "kv", "KDA"),
    (dict(), "vk", "layout"),
    (dict(h0_shape=(1, 2, 32, 64)), "kv", "initial_state"),
])
def test_supports_declines_with_reason(kwargs, layout, needle):
    args = _sds(**kwargs)
    reason = chunked.supports(*args, state_layout=layout)
    assert isinstance(reason, str) and needle in reason
    if layout == "kv":
        arrays = [None if a is None else jnp.zeros(a.shape, a.dtype) for a in args]
        with pytest.raises(ValueError, match="cannot serve"):
            chunked.chunked_forward(*arrays, scale=0.1, interpret=True)


def test_supports_accepts_shape_dtype_structs():
    for K, V in ((16, 16), (128, 128), (256, 64)):
        for dtype in (F32, BF16, F16):
            assert chunked.supports(*_sds(K=K, V=V, dtype=dtype)) is None
    assert chunked.supports(*_sds(h0=False)) is None
    for K, V in ((16, 16), (64, 64), (128, 128), (128, 256), (64, 32)):   # KDA
        for dtype in (F32, BF16, F16):
            assert chunked.supports(*_sds(K=K, V=V, dtype=dtype, kda=True)) is None


def test_cpu_lowering_without_interpret_raises_naming_backend():
    args = _sds(K=32, V=32)
    fn = jax.jit(lambda *a: chunked.chunked_forward(*a, scale=0.1))
    with pytest.raises(ValueError, match=r'backend="pallas".*interpret=True'):
        fn.trace(*args).lower(lowering_platforms=("cpu",))
    bargs = args + (S((1, 100, 2, 32), F32), None)
    fn = jax.jit(lambda *a: chunked.chunked_backward(*a, scale=0.1))
    with pytest.raises(ValueError, match=r'backend="pallas".*interpret=True'):
        fn.trace(*bargs).lower(lowering_platforms=("cpu",))


def test_lowers_for_cuda_without_a_gpu():
    """Forward and backward lower for CUDA on this CPU-only machine (4 Triton kernels + 1)."""
    args = _sds(B=1, T=200, Hk=2, Hv=4, K=64, V=64, dtype=BF16)
    lowered = lower(lambda *a: chunked.chunked_forward(*a, scale=0.1, use_qk_l2norm=True), *args)
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2
    bargs = args + (S((1, 200, 4, 64), BF16), S((1, 4, 64, 64), F32))
    lowered = lower(lambda *a: chunked.chunked_backward(*a, scale=0.1, use_qk_l2norm=True), *bargs)
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == NUM_BWD_KERNELS
    # KDA (per-key gates g [B, T, Hv, K]): the same 2 + 6 kernels
    kargs = args[:3] + (S((1, 200, 4, 64), F32),) + args[4:]
    lowered = lower(lambda *a: chunked.chunked_forward(*a, scale=0.1, use_qk_l2norm=True), *kargs)
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2
    lowered = lower(lambda *a: chunked.chunked_backward(*a, scale=0.1, use_qk_l2norm=True),
                    *(kargs + bargs[6:]))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == NUM_BWD_KERNELS


# ---- weak decay against float64 numpy (the state carried across chunks matters) -------------

# Full suite only: the everyday tier's weak-decay row on these kernels is in
# tests/test_weak_decay.py (GDA, four chunks, the carried state and dg's carry term).
@pytest.mark.slow
@pytest.mark.parametrize("kda,dtype", [(False, "f32"), (True, "f32"), (False, "bf16")])
def test_weak_decay_forward_and_gradients_match_float64(kda, dtype):
    """Weak decay (`helpers.weak_gates`: per-token g in [-0.1, 0], some heads g = 0, some
    beta = 1) over 3 full chunks and a ragged one, grouped heads, 2 value blocks in the
    gradient kernels' V loop: forward and all six gradients through gated_delta_net (the
    Pallas forward and backward) against the float64 numpy VJP."""
    from helpers import Case, assert_close, make_inputs as make_case, numpy_expected, op_vjp

    case = Case(kda=kda, group=2, T=3 * 64 + 37, K=32, V=64, h0=True, dtype=dtype, weak=True)
    args, h0 = make_case(case, seed=5)
    scale = case.K ** -0.5
    from gdn_jax import gated_delta_net

    def f(q, k, v, g, beta, h0):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, scale=scale,
                               output_final_state=True, use_qk_l2norm_in_kernel=True,
                               impl="chunked", backend="pallas", interpret=True)

    def both(*a):
        (o, s), vjp = jax.vjp(f, *a)
        return vjp((o, s))

    assert str(jax.make_jaxpr(both)(*args, h0)).count("pallas_call") == 2 + NUM_BWD_KERNELS
    got, cots = op_vjp(jax.jit(f), args, h0)
    want = numpy_expected(args, h0, cots, scale=scale, l2norm=True)
    tol_o, tol_g = TOL[jnp.dtype({"f32": F32, "bf16": BF16}[dtype])]
    assert_close(got, want, tol_o, tol_g, str(case))


@pytest.mark.slow  # lowering only (47 s on a loaded machine); the kernels lower everyday above
def test_cost_model_matches_the_launched_kernels():
    """kernels/chunk_cost.py's rows are the kernels the programs launch: the same stages, in
    order, with the same grids (read from the lowered CUDA programs), and the float32 buffer the
    gradient kernels add dq / dk into; the targets hold by the model."""
    import re

    from gpu_compile import triton_kernels

    from gdn_jax.kernels import chunk_cost

    for kda in (False, True):
        B, T, Hk, Hv, K, V = 1, 200, 2, 4, 64, 64
        args = _sds(B=B, T=T, Hk=Hk, Hv=Hv, K=K, V=V, dtype=BF16, kda=kda)
        bargs = args + (S((B, T, Hv, V), BF16), S((B, Hv, K, V), F32))
        rows = chunk_cost.cost_model(B, T, Hk, Hv, K, V, kda=kda)
        want = [(n.removeprefix("bwd: "), g) for n, g, *_ in rows if g is not None]
        got, atomics = [], []
        for fn, a in ((chunked.chunked_forward, args), (chunked.chunked_backward, bargs)):
            for kern in triton_kernels(lambda *x, fn=fn: fn(*x, scale=0.1, use_qk_l2norm=True),
                                       *a):
                stage = re.match(r"gdn_chunk_(?:kda_)?([a-z_]+?)_k\d+", kern["name"]).group(1)
                got.append((stage, tuple(kern["grid"])))
                atomics.append("tt.atomic_rmw" in kern["ir"])
        assert [n for n, _ in got] == [n for n, _ in want], (got, want)
        assert [g for _, g in got] == [g for _, g in want], (got, want)
        for name, grid, f16, f32, byts in rows:
            assert f16 >= 0 and f32 >= 0 and byts > 0, name
        # the kernels that add into the dq / dk buffer: atomics in their IR, the buffer of the
        # model's shape passed through them in place (aliased), its zero fill counted
        assert [s for (s, _), a in zip(got, atomics) if a] == list(chunk_cost.ATOMIC_STAGES), got
        shape = chunk_cost.acc_shape(B, T, Hk, K)
        aliased = [e.outvars[o].aval for e in _pallas_eqns(jax.make_jaxpr(
            lambda *x: chunked.chunked_backward(*x, scale=0.1, use_qk_l2norm=True))(*bargs).jaxpr)
            for _, o in e.params["input_output_aliases"]]
        assert [(a.shape, a.dtype) for a in aliased] == [(shape, jnp.dtype(F32))] * 3, aliased
        fill = [b for n, _, _, _, b in rows if n == "bwd: xla zero-fill"]
        assert fill == [int(np.prod(shape)) * 4], fill
    # the targets: backward at T=8192, Hv=32 and forward at T=8192, Hv=64 (bf16, K=V=128)
    fwd, bwd = chunk_cost.totals(chunk_cost.cost_model(1, 8192, 16, 32, 128, 128))
    fwd64, _ = chunk_cost.totals(chunk_cost.cost_model(1, 8192, 16, 64, 128, 128))
    assert fwd < fwd64 < 0.30e-3 and fwd < bwd <= 1.0e-3


def _pallas_eqns(jaxpr):
    """The pallas_call equations of a jaxpr, nested jaxprs included."""
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            yield e
        for v in e.params.values():
            for x in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(x, jax.extend.core.ClosedJaxpr):
                    yield from _pallas_eqns(x.jaxpr)
                elif isinstance(x, jax.extend.core.Jaxpr):
                    yield from _pallas_eqns(x)
