"""Packed sequences (`cu_seqlens`) through the chunked Pallas kernels, interpret mode on the CPU.

The oracle is one `reference_gated_delta_net` call per sequence (length 0: o has no rows and the
final state is the initial state), so nothing of the packed path is shared with the kernels.
Forward and all six gradients (chunked_backward with random cotangents on o and on the final
states) are compared, under `jax.jit` with cu_seqlens traced: each configuration compiles once
and serves every length set of the same (T, N) (checked with the jit cache). Every numeric test
asserts that `pallas_call` is in the traced program.

Interpret-mode cost is compilation, not execution: two configurations, ~1 compile each of the
forward and the backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax._varlen import FIRST, LAST, chunk_layout, chunk_tables
from gdn_jax.kernels import chunked
from gdn_jax.lowering import lower
from gdn_jax.reference import reference_gated_delta_net
from helpers import slow_except

F32, BF16 = jnp.float32, jnp.bfloat16
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
S = jax.ShapeDtypeStruct


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def cu_of(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def make_inputs(lens, Hk, Hv, K, V, *, dtype, l2, seed=0, gmin=None, kda=False):
    """Packed inputs [1, T, ...]; unit keys without l2norm (a contractive recurrence).
    gmin: per-token gates uniform in [gmin, gmin + 0.5] (strong decay). kda: per-key gates
    g [1, T, Hv, K]."""
    T, N = int(sum(lens)), len(lens)
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (1, T, Hk, K), F32)
    k = jax.random.normal(ks[1], (1, T, Hk, K), F32)
    if not l2:
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (1, T, Hv, V), F32)
    gs = (1, T, Hv) + ((K,) if kda else ())
    if gmin is None:
        g = -jax.nn.softplus(jax.random.normal(ks[3], gs))
    else:
        g = gmin + 0.5 * jax.random.uniform(ks[3], gs)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (1, T, Hv)))
    h0 = jax.random.normal(ks[5], (N, Hv, K, V), F32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g, beta, h0


@functools.lru_cache(maxsize=None)
def oracle(lens, *, scale, l2):
    """jit((q, k, v, g, beta, h0), do, dht) -> (o, final states, six gradients) of
    `per_sequence_reference` (compiled once per length set: eager scans are slow)."""
    ref = per_sequence_reference(lens, scale=scale, l2=l2)

    @jax.jit
    def run(args, do, dht):
        (o, s), vjp = jax.vjp(ref, *args)
        return o, s, vjp((do, dht))
    return run


def per_sequence_reference(lens, *, scale, l2):
    """(q, k, v, g, beta, h0) -> (o [1, T, Hv, V], final states [N, Hv, K, V]), one reference
    call per sequence; differentiable (jax.vjp gives the oracle's six gradients)."""
    cu = cu_of(lens)

    def ref(q, k, v, g, beta, h0):
        os, ss = [], []
        for n in range(len(lens)):
            a, b = int(cu[n]), int(cu[n + 1])
            if a == b:
                ss.append(h0[n])
                continue
            o, s = reference_gated_delta_net(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b],
                                             beta[:, a:b], h0[n:n + 1], scale=scale,
                                             use_qk_l2norm=l2)
            os.append(o)
            ss.append(s[0])
        return jnp.concatenate(os, axis=1), jnp.stack(ss)
    return ref


def pallas_in_jaxpr(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


# ---- configuration A: float32, Hv = 2 (Hk = 1), K = V = 32, l2norm, h0 and dht ------------
# Both length sets have T = 237, N = 7 (one compiled program): lengths 0 (first, middle and
# last), 1, shorter than a chunk, 63 / 64 / 65 around the chunk size, longer than two chunks;
# packed boundaries fall inside chunks (37 + 1 tokens before a 64-token sequence, ...).
A = dict(Hk=1, Hv=2, K=32, V=32)
A_SCALE = 32 ** -0.5
LENS_A = [(0, 1, 37, 64, 130, 0, 5), (100, 0, 63, 65, 2, 7, 0)]


@jax.jit
def _fwd_a(cu, q, k, v, g, beta, h0):
    return chunked.chunked_forward(q, k, v, g, beta, h0, scale=A_SCALE, use_qk_l2norm=True,
                                   interpret=True, cu_seqlens=cu)


@jax.jit
def _bwd_a(cu, q, k, v, g, beta, h0, do, dht):
    return chunked.chunked_backward(q, k, v, g, beta, h0, do, dht, scale=A_SCALE,
                                    use_qk_l2norm=True, interpret=True, cu_seqlens=cu)


# Everyday tier: lens0, the forward and backward kernels on packed sequences: empty sequences
# first, in the middle and last (the state / dht passed through), a one-token one, boundaries
# off the 64-row grid of the packed row (the 64-token sequence's chunk starts at row 38), a
# ragged sequence within one chunk, a three-chunk sequence (the carry inside a sequence), h0
# and dht, grouped value heads; test_one_program_serves_every_length_set reuses its compile.
# The other rows: full suite only.
@pytest.mark.parametrize("lens,gmin", slow_except(
    [(LENS_A[0], None), (LENS_A[1], None), (LENS_A[1], -20.0)], 0),
    ids=["lens0", "lens1", "lens1-strong-decay"])
def test_f32_forward_and_gradients_match_per_sequence_reference(lens, gmin):
    q, k, v, g, beta, h0 = make_inputs(lens, **A, dtype=F32, l2=True, seed=len(lens) + 3,
                                       gmin=gmin)
    cu = jnp.asarray(cu_of(lens))
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape[:2] + v.shape[2:], F32)
    dht = jax.random.normal(jax.random.PRNGKey(8), h0.shape, F32)
    o_r, s_r, grads_r = oracle(lens, scale=A_SCALE, l2=True)((q, k, v, g, beta, h0), do, dht)

    assert pallas_in_jaxpr(_fwd_a, cu, q, k, v, g, beta, h0)
    o, s = _fwd_a(cu, q, k, v, g, beta, h0)
    assert o.shape == q.shape[:2] + v.shape[2:] and s.shape == h0.shape and s.dtype == F32
    assert rel(o, o_r) < 1e-4 and rel(s, s_r) < 1e-4, (rel(o, o_r), rel(s, s_r))
    for n, L in enumerate(lens):   # a length-0 sequence returns its initial state exactly
        if L == 0:
            np.testing.assert_array_equal(np.asarray(s[n]), np.asarray(h0[n]))

    assert pallas_in_jaxpr(_bwd_a, cu, q, k, v, g, beta, h0, do, dht)
    grads = _bwd_a(cu, q, k, v, g, beta, h0, do, dht)
    for name, x, r, inp in zip(GRAD_NAMES, grads, grads_r, (q, k, v, g, beta, h0)):
        assert x.shape == inp.shape and x.dtype == inp.dtype, name
        assert np.isfinite(np.asarray(x)).all(), name
        assert rel(x, r) < 1e-4, (name, rel(x, r))
    for n, L in enumerate(lens):   # ... and passes dht through to dh0
        if L == 0:
            np.testing.assert_array_equal(np.asarray(grads[5][n]), np.asarray(dht[n]))


# ---- KDA (per-key gates): configuration A's shapes, float32, one length set -------------
# Lengths 0 (first and last), 37, 64, 70: boundaries inside packed chunks, a whole chunk,
# a two-chunk sequence; half the gates strong (per-token g near -20).

@jax.jit
def _fwd_kda(cu, q, k, v, g, beta, h0):
    return chunked.chunked_forward(q, k, v, g, beta, h0, scale=A_SCALE, use_qk_l2norm=True,
                                   interpret=True, cu_seqlens=cu)


@jax.jit
def _bwd_kda(cu, q, k, v, g, beta, h0, do, dht):
    return chunked.chunked_backward(q, k, v, g, beta, h0, do, dht, scale=A_SCALE,
                                    use_qk_l2norm=True, interpret=True, cu_seqlens=cu)


# Full suite only: KDA on these kernels runs in the everyday tier unpacked
# (tests/test_pallas_chunked.py), and the packed tables are the same for GDA and KDA.
@pytest.mark.slow
def test_kda_f32_forward_and_gradients_match_per_sequence_reference():
    lens = (0, 37, 64, 70, 0)
    q, k, v, g, beta, h0 = make_inputs(lens, **A, dtype=F32, l2=True, seed=11, kda=True)
    strong = -20.0 + 0.5 * jax.random.uniform(jax.random.PRNGKey(12), g.shape)
    g = jnp.where(jax.random.uniform(jax.random.PRNGKey(13), g.shape) < 0.5, strong, g)
    cu = jnp.asarray(cu_of(lens))
    do = jax.random.normal(jax.random.PRNGKey(7), q.shape[:2] + v.shape[2:], F32)
    dht = jax.random.normal(jax.random.PRNGKey(8), h0.shape, F32)
    o_r, s_r, grads_r = oracle(lens, scale=A_SCALE, l2=True)((q, k, v, g, beta, h0), do, dht)
    assert chunked.supports(q, k, v, g, beta, h0, cu_seqlens=cu) is None

    assert pallas_in_jaxpr(_fwd_kda, cu, q, k, v, g, beta, h0)
    o, s = _fwd_kda(cu, q, k, v, g, beta, h0)
    assert rel(o, o_r) < 1e-4 and rel(s, s_r) < 1e-4, (rel(o, o_r), rel(s, s_r))
    for n, L in enumerate(lens):
        if L == 0:
            np.testing.assert_array_equal(np.asarray(s[n]), np.asarray(h0[n]))

    assert pallas_in_jaxpr(_bwd_kda, cu, q, k, v, g, beta, h0, do, dht)
    grads = _bwd_kda(cu, q, k, v, g, beta, h0, do, dht)
    for name, x, r, inp in zip(GRAD_NAMES, grads, grads_r, (q, k, v, g, beta, h0)):
        assert x.shape == inp.shape and x.dtype == inp.dtype, name
        assert np.isfinite(np.asarray(x)).all(), name
        assert rel(x, r) < 1e-4, (name, rel(x, r))
    for n, L in enumerate(lens):
        if L == 0:
            np.testing.assert_array_equal(np.asarray(grads[5][n]), np.asarray(dht[n]))


def test_one_program_serves_every_length_set():
    """cu_seqlens is traced: both length sets (and the strong-decay data) share one compile."""
    for lens in LENS_A:
        args = make_inputs(lens, **A, dtype=F32, l2=True)
        o, s = _fwd_a(jnp.asarray(cu_of(lens)), *args)
        grads = _bwd_a(jnp.asarray(cu_of(lens)), *args, jnp.ones_like(o), jnp.ones_like(s))
        assert all(np.isfinite(np.asarray(x)).all() for x in (o, s, *grads))
    assert _fwd_a._cache_size() == 1 and _bwd_a._cache_size() == 1


# ---- configuration B: bf16, group 2 (Hk = 2, Hv = 4), K = 32, V = 64 (two V-blocks), ------
# no l2norm (unit keys), no initial state, no dht; o with and without the final state.
B_ = dict(Hk=2, Hv=4, K=32, V=64)
B_SCALE = 32 ** -0.5


@jax.jit
def _fwd_b(cu, q, k, v, g, beta):
    o, s = chunked.chunked_forward(q, k, v, g, beta, None, scale=B_SCALE, interpret=True,
                                   cu_seqlens=cu)
    o2, s2 = chunked.chunked_forward(q, k, v, g, beta, None, scale=B_SCALE, interpret=True,
                                     output_final_state=False, cu_seqlens=cu)
    assert s2 is None
    return o, s, o2


@jax.jit
def _bwd_b(cu, q, k, v, g, beta, do):
    return chunked.chunked_backward(q, k, v, g, beta, None, do, None, scale=B_SCALE,
                                    interpret=True, cu_seqlens=cu)


# Full suite only: no state / no dht, two V blocks and two q/k heads run in the everyday tier
# unpacked (tests/test_pallas_chunked.py's everyday backward case).
@pytest.mark.slow
@pytest.mark.parametrize("lens", [(64, 64, 10), (3, 0, 135)])
def test_bf16_grouped_no_state_matches_per_sequence_reference(lens):
    q, k, v, g, beta, h0 = make_inputs(lens, **B_, dtype=BF16, l2=False, seed=5)
    zeros = jnp.zeros_like(h0)
    cu = jnp.asarray(cu_of(lens))
    do = jax.random.normal(jax.random.PRNGKey(9), q.shape[:2] + v.shape[2:], F32).astype(BF16)
    o_r, s_r, grads_r = oracle(lens, scale=B_SCALE, l2=False)((q, k, v, g, beta, zeros), do,
                                                               zeros)

    assert pallas_in_jaxpr(_fwd_b, cu, q, k, v, g, beta)
    o, s, o2 = _fwd_b(cu, q, k, v, g, beta)
    assert o.dtype == BF16 and s.shape == h0.shape
    assert rel(o, o_r) < 1e-2 and rel(s, s_r) < 1e-2, (rel(o, o_r), rel(s, s_r))
    np.testing.assert_array_equal(np.asarray(o2, np.float32), np.asarray(o, np.float32))

    assert pallas_in_jaxpr(_bwd_b, cu, q, k, v, g, beta, do)
    grads = _bwd_b(cu, q, k, v, g, beta, do)
    assert grads[5] is None
    for name, x, r, inp in zip(GRAD_NAMES, grads, grads_r, (q, k, v, g, beta)):
        assert x.shape == inp.shape and x.dtype == inp.dtype, name
        assert rel(x, r) < 2e-2, (name, rel(x, r))


# ---- tables, declines, errors, lowering (no interpret-mode run) --------------------------

def test_chunk_tables_describe_the_shared_layout():
    """`chunk_tables` (the kernels' form, compiled once per (T, N)) describes
    `_varlen.chunk_layout`'s aligned layout: each chunk's packed rows, sequence and flags."""
    C = chunked.CHUNK
    for lens in [(0, 1, 37, 64, 130, 0, 5), (65, 63, 128, 1, 0, 0, 0)]:   # T = 237, N = 7
        T = int(sum(lens))
        cu = jnp.asarray(cu_of(lens))
        tabs = jax.jit(chunk_tables, static_argnums=(1, 2))(cu, T, C)
        lay = jax.jit(chunk_layout, static_argnums=(1, 2))(cu, T, C)
        assert tabs.num_chunks == lay.num_chunks and tabs.num_seqs == len(lens)
        ctab = np.asarray(tabs.ctab)
        nused = int(tabs.nused[0])
        assert nused == sum(-(-L // C) for L in lens)
        used = np.asarray(lay.chunk_seq) < len(lens)
        assert used.sum() == nused and used[:nused].all()
        src = np.asarray(lay.src).reshape(-1, C)
        for c in range(tabs.num_chunks):
            t0, end, seq, flags = ctab[c]
            if c >= nused:
                assert t0 == end == 0 and flags == 0
                continue
            real = src[c][src[c] >= 0]
            assert t0 == real[0] and end == real[-1] + 1 and len(real) == end - t0
            assert seq == int(lay.chunk_seq[c])
            assert bool(flags & FIRST) == bool(lay.first[c])
            assert bool(flags & LAST) == (c == int(lay.last_chunk[seq]))
        np.testing.assert_array_equal(np.asarray(tabs.empty), np.asarray(lens) == 0)


def _sds(B=1, T=100, Hk=1, Hv=2, K=32, V=32, N=3, h0_n=None, kda=False):
    args = (S((B, T, Hk, K), F32), S((B, T, Hk, K), F32), S((B, T, Hv, V), F32),
            S((B, T, Hv, K) if kda else (B, T, Hv), F32), S((B, T, Hv), F32),
            S((h0_n or N, Hv, K, V), F32))
    return args


@pytest.mark.parametrize("kwargs,cu,needle", [
    (dict(B=2), S((4,), jnp.int32), "B == 1"),
    (dict(h0_n=1), S((4,), jnp.int32), "initial_state"),
    (dict(), S((4,), jnp.int16), "int32"),
    (dict(), S((4, 1), jnp.int32), "N + 1"),
    (dict(), S((1,), jnp.int32), "N + 1"),
    (dict(kda=True, K=256), S((4,), jnp.int32), "KDA"),   # KDA at K = 256: declined
])
def test_supports_declines_varlen_with_reason(kwargs, cu, needle):
    reason = chunked.supports(*_sds(**kwargs), cu_seqlens=cu)
    assert isinstance(reason, str) and needle in reason, reason


def test_supports_accepts_varlen():
    assert chunked.supports(*_sds(N=3), cu_seqlens=S((4,), jnp.int32)) is None
    assert chunked.supports(*_sds()[:5], None, cu_seqlens=S((4,), jnp.int32)) is None


@pytest.mark.parametrize("cu,needle", [([0, 50, 40, 100], "non-decreasing"),
                                       ([1, 50, 60, 100], "start at 0"),
                                       ([0, 50, 60, 90], "end at T")])
def test_concrete_bad_cu_seqlens_raise(cu, needle):
    arrays = [jnp.zeros(a.shape, a.dtype) for a in _sds()]
    cu = jnp.asarray(cu, jnp.int32)
    with pytest.raises(ValueError, match=needle):
        chunked.chunked_forward(*arrays, scale=0.1, interpret=True, cu_seqlens=cu)
    with pytest.raises(ValueError, match=needle):
        chunked.chunked_backward(*arrays, jnp.zeros((1, 100, 2, 32)), None, scale=0.1,
                                 interpret=True, cu_seqlens=cu)


def test_varlen_lowers_for_cuda_without_a_gpu():
    """Forward (2 Triton kernels) and backward (4) with a traced cu_seqlens lower for CUDA."""
    args = [S((1, 300, 2, 64), BF16), S((1, 300, 2, 64), BF16), S((1, 300, 4, 64), BF16),
            S((1, 300, 4), F32), S((1, 300, 4), F32), S((5, 4, 64, 64), F32)]
    cu = S((6,), jnp.int32)
    fwd = jax.jit(lambda cu, *a: chunked.chunked_forward(*a, scale=0.1, use_qk_l2norm=True,
                                                         cu_seqlens=cu))
    lowered = lower(fwd, cu, *args, platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2
    bwd = jax.jit(lambda cu, *a: chunked.chunked_backward(*a, scale=0.1, use_qk_l2norm=True,
                                                          cu_seqlens=cu))
    lowered = lower(bwd, cu, *args, S((1, 300, 4, 64), BF16), S((5, 4, 64, 64), F32),
                    platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 6   # prep, 2 passes, 3 gradient
