"""Packed sequences (cu_seqlens), state pools (state_indices) and snapshots through the public op.

The anchor is "separate calls": every packed sequence run on its own, by the float64 numpy
recurrence and its VJP (helpers.numpy_vjp with cu_seqlens): outputs, final states and all
six gradients. Pallas kernels run in interpret mode; those tests assert that `pallas_call` is
in the traced program.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gdn_jax import gated_delta_net
from helpers import (GRAD_NAMES, assert_close, assert_pallas, examples_per_case, numpy_expected,
                     numpy_reference, op_tolerance, rel_err, slow_except, tolerance)

F32 = jnp.float32
# (impl, backend) pairs; Pallas in interpret mode
PATHS = [("reference", "xla"), ("recurrent", "xla"), ("chunked", "xla"),
         ("recurrent", "pallas"), ("chunked", "pallas")]
TOL = {impl: tolerance(impl)[0] for impl in ("reference", "recurrent", "chunked")}


def _inputs(T, N, *, kda, Hk=1, G=2, K=16, V=16, seed=0, gmin=-2.0):
    rng = np.random.default_rng(seed)
    Hv = Hk * G
    q = rng.standard_normal((1, T, Hk, K))
    k = rng.standard_normal((1, T, Hk, K))
    v = rng.standard_normal((1, T, Hv, V))
    g = rng.uniform(gmin, 0.0, (1, T, Hv, K) if kda else (1, T, Hv))
    beta = rng.uniform(0.0, 1.0, (1, T, Hv))
    h0 = rng.standard_normal((N, Hv, K, V))
    return tuple(jnp.asarray(x, F32) for x in (q, k, v, g, beta)), jnp.asarray(h0, F32)


def _cu(lens):
    return jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)


def _op(impl, backend, **kw):
    interp = backend == "pallas"

    def f(q, k, v, g, beta, h0, cu):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                               output_final_state=True, use_qk_l2norm_in_kernel=True,
                               impl=impl, backend=backend, interpret=interp, **kw)
    return f


@functools.lru_cache(maxsize=None)
def _packed_vjp(impl, backend):
    """One jitted program per path: outputs and all gradients of the packed call."""
    f = _op(impl, backend)

    def run(args, h0, cu, do, dht):
        out, vjp = jax.vjp(lambda *a: f(*a, cu), *args, h0)
        return out, vjp((do, dht))
    return jax.jit(run)


def _check_against_separate(impl, backend, lens, *, kda, seed=0, gmin=-2.0):
    T, N = sum(lens), len(lens)
    args, h0 = _inputs(T, N, kda=kda, seed=seed, gmin=gmin)
    cu = _cu(lens)
    if backend == "pallas":
        assert_pallas(_op(impl, backend), *args, h0, cu)
    rng = np.random.default_rng(seed + 7)
    do = jnp.asarray(rng.standard_normal((1, T) + args[2].shape[2:]), F32)
    dht = jnp.asarray(rng.standard_normal(h0.shape), F32)
    (o, ht), grads = _packed_vjp(impl, backend)(args, h0, cu, do, dht)
    got = {"o": o, "state": ht, **dict(zip(GRAD_NAMES, grads))}
    want = numpy_expected(args, h0, (do, dht), l2norm=True, cu_seqlens=np.asarray(cu))
    tol_out, tol_grad = op_tolerance(impl, backend=backend, T=T)
    assert_close(got, want, tol_out, tol_grad, f"{impl}/{backend} lens={lens} kda={kda}")


# Full suite only (an XLA chunked KDA backward and a Pallas KDA backward compile): packed
# sequences against separate calls run in the everyday tier in the random packings on the
# reference path below, tests/test_weak_decay.py and the kernel modules.
@pytest.mark.slow
@pytest.mark.parametrize("impl,backend,kda", [("chunked", "xla", True), ("recurrent", "pallas", True)])
def test_packed_equals_separate_calls(impl, backend, kda):
    # lengths 0, 1, short, longer than a chunk; a boundary falls inside chunks (the random
    # packings below cover every path; these two fix a composition with every kind of length)
    _check_against_separate(impl, backend, [3, 0, 70, 1, 0, 9], kda=kda)


@pytest.mark.slow  # the XLA chunked backward compile
def test_strong_decay_packed_chunked():
    _check_against_separate("chunked", "xla", [40, 30], kda=False, gmin=-20.0, seed=5)


PACK_T = 200  # one T (and N = 4) for every example: cu_seqlens is traced, so one program per path
_length = st.one_of(st.just(0), st.just(1), st.integers(2, 20), st.integers(65, 150))


# Everyday tier: GDA-reference-xla (random packings with lengths 0, 1, short and over two
# chunks, outputs, states and all gradients); the other paths (each a T = 200 backward
# compile): full suite only.
@pytest.mark.parametrize("impl,backend", slow_except(PATHS, 0))
@pytest.mark.parametrize("kda", slow_except([False, True], 0), ids=["GDA", "KDA"])
@examples_per_case(2)
@given(drawn=st.lists(_length, min_size=3, max_size=3), seed=st.integers(0, 2**16))
def test_random_packings_equal_separate_calls(impl, backend, kda, drawn, seed):
    """Random packings of T = 200 tokens into 4 sequences: lengths 0, 1, short, and longer
    than two chunks (the last sequence takes the rest); outputs, final states, all gradients."""
    lens = []
    for n in drawn:
        lens.append(min(n, PACK_T - sum(lens)))
    lens.append(PACK_T - sum(lens))
    _check_against_separate(impl, backend, lens, kda=kda, seed=seed)


def test_one_program_for_all_packings():
    f = jax.jit(_op("chunked", "xla"))
    args, h0 = _inputs(20, 3, kda=False)
    for lens in ([5, 5, 10], [0, 20, 0], [1, 1, 18]):
        f(*args, h0, _cu(lens))
    assert f._cache_size() == 1


# ----------------------------------------------------------------------------- state pool


def _pool_call(impl, backend, layout="kv", donate=False):
    interp = backend == "pallas"

    def f(q, k, v, g, beta, pool, idx):
        return gated_delta_net(q, k, v, g, beta, initial_state=pool, state_indices=idx,
                               output_final_state=True, impl=impl, backend=backend,
                               interpret=interp, state_layout=layout)
    return jax.jit(f, donate_argnums=(5,) if donate else ())


# Everyday tier: recurrent-xla-kv (the XLA recurrent path's in-place pool) and
# reference-xla-vk (the gathered pool, "vk"), a padding entry -1 and poisoned slots; pools on
# the Pallas recurrent kernel run in the everyday tier of tests/test_pallas_recurrent_varlen.py.
# The chunked and Pallas cases: full suite only.
@pytest.mark.parametrize("impl,backend,layout,kda", slow_except([
    ("recurrent", "xla", "kv", False), ("chunked", "xla", "vk", True),
    ("recurrent", "pallas", "vk", False), ("recurrent", "pallas", "kv", True),
    ("chunked", "pallas", "kv", False), ("reference", "xla", "vk", False)], 5))
def test_pool_touches_only_indexed_slots(impl, backend, layout, kda):
    B, T, P = 3, 2, 6
    rng = np.random.default_rng(0)
    (q, k, v, g, beta), _ = _inputs(T, 1, kda=kda)
    q, k, v, g, beta = (jnp.concatenate([x] * B) for x in (q, k, v, g, beta))
    q = q + jnp.asarray(rng.standard_normal(q.shape), F32)  # sequences differ
    pool = rng.standard_normal((P, 2, 16, 16)).astype(np.float32)
    pool[0] = np.nan  # poison: an unindexed slot must come back bit-identical
    pool[5] = 1e30
    idx = jnp.asarray([4, -1, 1], jnp.int32)
    f = _pool_call(impl, backend, layout)
    if backend == "pallas":
        assert "pallas_call" in str(jax.make_jaxpr(f)(q, k, v, g, beta, jnp.asarray(pool), idx))
    o, new = f(q, k, v, g, beta, jnp.asarray(pool), idx)
    new = np.asarray(new)
    for s in (0, 2, 3, 5):
        np.testing.assert_array_equal(new[s].view(np.uint32), pool[s].view(np.uint32))
    assert np.all(np.asarray(o[1]) == 0)  # padding entry: zero outputs
    kv = (lambda s: s) if layout == "kv" else (lambda s: np.swapaxes(s, -1, -2))
    for b, slot in ((0, 4), (2, 1)):
        o_np, ht_np = numpy_reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], g[b:b + 1],
                                      beta[b:b + 1], kv(pool[slot])[None])
        assert rel_err(o[b:b + 1], o_np) < TOL[impl]
        assert rel_err(kv(new[slot])[None], ht_np) < TOL[impl]


@pytest.mark.slow  # the XLA chunked backward compile
def test_pool_with_packed_sequences_and_gradients():
    lens, P = [4, 0, 7], 5
    args, _ = _inputs(sum(lens), 3, kda=False)
    pool = jnp.asarray(np.random.default_rng(1).standard_normal((P, 2, 16, 16)), F32)
    idx = jnp.asarray([3, 0, -1], jnp.int32)
    cu = _cu(lens)

    def f(*a):
        *x, pool = a
        o, new = gated_delta_net(*x, initial_state=pool, state_indices=idx, cu_seqlens=cu,
                                 output_final_state=True, impl="chunked")
        return jnp.sum(o * o) + jnp.sum(jnp.sin(new))

    def separate(*a):  # the same thing with the gather/scatter written out
        *x, pool = a
        h0 = jnp.stack([pool[3], pool[0], jnp.zeros_like(pool[0])])
        o, ht = gated_delta_net(*x, initial_state=h0, cu_seqlens=cu, output_final_state=True,
                                impl="reference")
        o = o.at[:, 4:].set(0.0)  # sequence 2 (tokens 4..10) is padding: zero outputs
        new = pool.at[3].set(ht[0]).at[0].set(ht[1])
        return jnp.sum(o * o) + jnp.sum(jnp.sin(new))

    got = jax.grad(f, argnums=tuple(range(6)))(*args, pool)
    want = jax.grad(separate, argnums=tuple(range(6)))(*args, pool)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4


def test_pool_update_is_in_place_when_donated():
    B, P = 4, 16
    (q, k, v, g, beta), _ = _inputs(1, 1, kda=False, K=32, V=32)
    q, k, v, g, beta = (jnp.concatenate([x] * B) for x in (q, k, v, g, beta))
    pool = jnp.zeros((P, 2, 32, 32), F32)
    idx = jnp.asarray([1, 7, -1, 3], jnp.int32)
    f = _pool_call("recurrent", "xla", donate=True)
    hlo = f.lower(q, k, v, g, beta, pool, idx).compile().as_text()
    assert "input_output_alias" in hlo  # the pool parameter is aliased to the output
    # no full-size copy of the pool in the program: the only pool-sized buffer is the parameter
    pool_ty = "f32[16,2,32,32]"
    copies = [ln for ln in hlo.splitlines() if pool_ty in ln and " copy(" in ln]
    assert not copies, copies


@pytest.mark.parametrize("bad,msg", [
    (np.asarray([0, 2, 2], np.int32), "repeat"), (np.asarray([0, 9, 5], np.int32), "[-1, P)"),
    (np.asarray([0, -2, 5], np.int32), "[-1, P)")])
def test_pool_index_errors(bad, msg):
    (q, k, v, g, beta), _ = _inputs(1, 1, kda=False)
    q, k, v, g, beta = (jnp.concatenate([x] * 3) for x in (q, k, v, g, beta))
    pool = jnp.zeros((9, 2, 16, 16), F32)
    with pytest.raises(ValueError, match="state_indices") as e:
        gated_delta_net(q, k, v, g, beta, initial_state=pool, state_indices=jnp.asarray(bad),
                        output_final_state=True)
    assert msg in str(e.value)


# ----------------------------------------------------------------------------- snapshots


# Everyday tier: the XLA recurrent path, batched ("kv") and packed ("vk", an empty sequence,
# sequences shorter than num_snapshots); Pallas snapshots run in the everyday tier of
# tests/test_pallas_recurrent_varlen.py. The other cases: full suite only.
@pytest.mark.parametrize("impl,backend,packed,layout", slow_except([
    ("recurrent", "xla", False, "kv"), ("recurrent", "xla", True, "vk"),
    ("reference", "xla", True, "kv"), ("recurrent", "pallas", True, "kv"),
    ("recurrent", "pallas", False, "vk")], 1))
def test_snapshots_equal_truncated_calls(impl, backend, packed, layout):
    ns = 4
    lens = [6, 2, 0, 5] if packed else [6, 6]
    T = sum(lens) if packed else 6
    args, h0 = _inputs(T, len(lens), kda=True)
    if not packed:
        args = tuple(jnp.concatenate([x, x[..., ::-1, :] if x.ndim == 4 else x]) for x in args)
    tr = (lambda s: s) if layout == "kv" else (lambda s: jnp.swapaxes(s, -1, -2))
    cu = _cu(lens) if packed else None

    def f(*a):
        return gated_delta_net(*a, initial_state=tr(h0), cu_seqlens=cu, output_final_state=True,
                               num_snapshots=ns, impl=impl, backend=backend,
                               interpret=backend == "pallas", state_layout=layout)
    if backend == "pallas":
        assert "pallas_call" in str(jax.make_jaxpr(f)(*args))
    o, ht, snaps = jax.jit(f)(*args)
    assert snaps.shape == (len(lens), ns) + tr(h0).shape[1:]
    np.testing.assert_array_equal(np.asarray(snaps[:, -1]), np.asarray(ht))
    starts = np.concatenate([[0], np.cumsum(lens)])
    for n, ln in enumerate(lens):
        for j in range(ns):
            p = ln - ns + j  # snapshot j holds the state after token p of sequence n
            if p < 0:
                want = h0[n]
            elif packed:
                seg = tuple(x[:, starts[n]:starts[n] + p + 1] for x in args)
                want = numpy_reference(*seg, np.asarray(h0[n:n + 1]))[1][0]
            else:
                seg = tuple(x[n:n + 1, :p + 1] for x in args)
                want = numpy_reference(*seg, np.asarray(h0[n:n + 1]))[1][0]
            assert rel_err(tr(snaps[n, j]), want) < 1e-5, (n, j)


@pytest.mark.slow  # 69 s on a loaded machine; snapshots' forward runs in the everyday tier
def test_snapshot_gradients_match_reference():
    args, h0 = _inputs(6, 1, kda=False)

    def loss(impl):
        def f(*a):
            o, ht, snaps = gated_delta_net(*a[:5], initial_state=a[5], output_final_state=True,
                                           num_snapshots=3, impl=impl)
            return jnp.sum(o) + jnp.sum(jnp.cos(snaps))
        return jax.grad(f, argnums=tuple(range(6)))(*args, h0)

    for a, b in zip(loss("recurrent"), loss("reference")):
        assert rel_err(a, b) < 1e-5


def test_snapshots_with_chunked_raise():
    args, _ = _inputs(4, 1, kda=False)
    with pytest.raises(ValueError, match="num_snapshots"):
        gated_delta_net(*args, num_snapshots=2, impl="chunked")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw,exc,words", [
    (dict(cu_seqlens=np.asarray([0, 3, 8], np.int32), B=2), ValueError, ["B == 1", "B=2"]),
    (dict(cu_seqlens=np.asarray([1, 3, 8], np.int32)), ValueError, ["start at 0"]),
    (dict(cu_seqlens=np.asarray([0, 5, 3, 8], np.int32)), ValueError, ["non-decreasing"]),
    (dict(cu_seqlens=np.asarray([0, 3, 7], np.int32)), ValueError, ["end at T=8"]),
    (dict(cu_seqlens=np.asarray([0, 3, 8], np.int16)), TypeError, ["cu_seqlens", "int32"]),
    (dict(cu_seqlens=np.asarray([0, 3, 8], np.float32)), TypeError, ["cu_seqlens", "int32"]),
    (dict(cu_seqlens=np.asarray([[0, 3, 8]], np.int32)), ValueError, ["cu_seqlens", "rank 1"]),
    (dict(cu_seqlens=np.asarray([0, 3, 8], np.int32), h0_n=3), ValueError,
     ["initial_state", "[N, Hv, K, V]=[2,"]),
    (dict(state_indices=np.asarray([0, 1], np.int32), h0_n=4), ValueError, ["state_indices", "[N]=[1]"]),
    (dict(state_indices=np.asarray([0], np.int32), h0_n=None, B=1), ValueError, ["pool", "None"]),
    (dict(state_indices=np.asarray([4], np.int32), h0_n=4, B=1), ValueError, ["state_indices", "P=4"]),
    (dict(state_indices=np.asarray([0], np.int32), h0_n=4, B=1, final=False), ValueError,
     ["output_final_state=True"]),
    (dict(num_snapshots=-1), ValueError, ["num_snapshots"]),
    (dict(num_snapshots=2.0), TypeError, ["num_snapshots"]),
])
def test_varlen_errors(kw, exc, words):
    B = kw.pop("B", 1)
    h0_n = kw.pop("h0_n", None)
    final = kw.pop("final", True)
    args, _ = _inputs(8, 1, kda=False)
    args = tuple(jnp.concatenate([x] * B) for x in args)
    h0 = None if h0_n is None else jnp.zeros((h0_n, 2, 16, 16), F32)
    kw = {n: (jnp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    with pytest.raises(exc) as e:
        gated_delta_net(*args, initial_state=h0, output_final_state=final, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_traced_values_are_not_checked_but_shapes_are():
    """Under jit the values of cu_seqlens are unknown: shapes are still checked at trace time."""
    args, h0 = _inputs(8, 2, kda=False)
    f = jax.jit(lambda cu: gated_delta_net(*args, initial_state=h0, cu_seqlens=cu))
    f(jnp.asarray([0, 3, 8], jnp.int32))  # fine
    with pytest.raises(ValueError, match="initial_state"):
        f(jnp.asarray([0, 3, 5, 8], jnp.int32))


def test_empty_call_passes_states_through():
    args, h0 = _inputs(0, 2, kda=False)
    o, ht, snaps = gated_delta_net(*args, initial_state=h0, cu_seqlens=jnp.zeros(3, jnp.int32),
                                   output_final_state=True, num_snapshots=2)
    assert o.shape == (1, 0, 2, 16)
    np.testing.assert_array_equal(np.asarray(ht), np.asarray(h0))
    np.testing.assert_array_equal(np.asarray(snaps[:, 1]), np.asarray(h0))


# Full suite only: pool gradients through the Pallas backward run in the everyday tier in
# tests/test_serving.py (recurrent-pallas, with write slots and has_initial_state).
@pytest.mark.slow
@pytest.mark.parametrize("impl,packed", [("recurrent", False), ("chunked", True)])
def test_pool_gradients_through_pallas_backward(impl, packed):
    """Forward on a Pallas kernel with a pool: the backward runs the Pallas chunked kernels on
    the gathered slots and scatters the state gradient back into the pool's cotangent."""
    lens = [5, 0, 6] if packed else None
    B = 1 if packed else 3
    T = 11 if packed else 4
    (q, k, v, g, beta), _ = _inputs(T, 1, kda=False)
    args = tuple(jnp.concatenate([x + 0.1 * i for i in range(B)]) for x in (q, k, v, g, beta))
    args = args[:3] + (jnp.minimum(args[3], 0.0), jnp.clip(args[4], 0.0, 1.0))
    pool = jnp.asarray(np.random.default_rng(2).standard_normal((6, 2, 16, 16)), F32)
    idx = jnp.asarray([4, -1, 1], jnp.int32)
    cu = _cu(lens) if packed else None

    def loss(backend):
        def f(*a):
            o, new = gated_delta_net(*a[:5], initial_state=a[5], state_indices=idx, cu_seqlens=cu,
                                     output_final_state=True, impl=impl, backend=backend,
                                     interpret=backend == "pallas", use_qk_l2norm_in_kernel=True)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(jnp.sin(new))
        return f

    assert "pallas_call" in str(jax.make_jaxpr(jax.grad(loss("pallas"), argnums=5))(*args, pool))
    got = jax.jit(jax.grad(loss("pallas"), argnums=tuple(range(6))))(*args, pool)
    want = jax.jit(jax.grad(loss("xla"), argnums=tuple(range(6))))(*args, pool)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "pool"), got, want):
        assert rel_err(a, b) < 1e-4, name
