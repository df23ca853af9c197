"""The fused recurrent Pallas kernel with packed sequences, state pools and snapshots.

Interpret mode on the CPU, against the float64 numpy recurrence (`helpers.numpy_reference`)
run separately on each sequence's slice of tokens; snapshots against separate calls truncated
after each token. Semantics: docs/spec.md sections 2.3-2.5. Every numeric test asserts that
`pallas_call` is in the traced program. Shapes stay tiny (interpret mode copies whole blocks,
including the whole pool, at every grid step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels import recurrent
from helpers import assert_pallas, numpy_reference, pairwise, rel_err, slow_except, tolerance

F32, BF16 = jnp.float32, jnp.bfloat16
POOL = 6  # slots in every pool test

# Packings: ("varlen", lengths) packs the sequences along T (B = 1); ("batch", B, T) is the
# classic layout with B sequences of T tokens. Lengths cover 0 (also first and last), 1, short,
# and longer than every num_snapshots used.
PACKINGS = {
    "varlen_a": ("varlen", (0, 1, 4, 11)),
    "varlen_b": ("varlen", (5, 0, 2, 9, 0)),
    "batch": ("batch", 3, 4),
}
# Pool indices per packing (N entries, -1 = padding); unindexed slots are poisoned. In
# varlen_b the padding entry comes after the user of slot 0 (a padding program that wrote its
# clamped slot would show up there).
POOL_INDICES = {"varlen_a": (3, -1, 0, 5), "varlen_b": (0, 4, -1, 1, 2), "batch": (4, -1, 1)}

AXES = {
    "kda": [False, True],
    "layout": ["kv", "vk"],
    "state": ["none", "per_seq", "pool"],
    "ns": [0, 2, 6],
    "packing": list(PACKINGS),
    "dtype": ["f32", "bf16"],
    "l2": [False, True],
}
CASES = pairwise(AXES)
# Everyday tier: row 1 (GDA, "kv", pool, varlen_b, bf16, l2norm): packed boundaries (each
# sequence from its own slot), empty sequences in the middle and last, padding slot -1 after
# the user of slot 0 (its clamped slot must not be written), poisoned untouched slots. The
# other everyday tests below add traced cu_seqlens / indices (one program, an out-of-range
# index, snapshots with more slots than tokens), the aliased donated pool, and
# output_final_state=False with the unpipelined loop; grouped heads and the "vk" layout run in
# tests/test_pallas_recurrent.py. The other rows: full suite only.
EVERYDAY_ROWS = (1,)


def to_kv(s, layout):
    s = np.asarray(s)
    return s if layout == "kv" else np.swapaxes(s, -1, -2)


def from_kv(s, layout):
    return s if layout == "kv" else jnp.swapaxes(s, -1, -2)


def make(B, T, Hk, Hv, K, V, *, kda, dtype, l2, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hk, K))
    k = rng.standard_normal((B, T, Hk, K))
    if not l2:  # unit keys: contractive without l2norm
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
        q /= np.sqrt(K)
    v = rng.standard_normal((B, T, Hv, V))
    g = rng.uniform(-2.0, 0.0, (B, T, Hv, K) if kda else (B, T, Hv))
    beta = rng.uniform(0.0, 1.0, (B, T, Hv))
    dt = {"f32": F32, "bf16": BF16}[dtype]
    return (jnp.asarray(q, dt), jnp.asarray(k, dt), jnp.asarray(v, dt),
            jnp.asarray(g, F32), jnp.asarray(beta, F32))


def poisoned_pool(Hv, K, V, used, seed=1):
    """A float32 kv pool: random states in the used slots, NaN / 1e30 / -0.0 / tiny patterns elsewhere."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((POOL, Hv, K, V)).astype(np.float32)
    patterns = [np.nan, 1e30, -0.0, 1e-40, -np.inf, 7.0]
    for i, s in enumerate(sorted(set(range(POOL)) - set(used))):
        pool[s] = patterns[i % len(patterns)]
        pool[s, 0, 0, :2] = (np.pi, -np.nan)  # not a constant slot
    return pool


def expected(args, bounds, h0s, ns, scale, l2):
    """Per sequence: (o rows [L, Hv, V], final [Hv, K, V], snapshots [ns, Hv, K, V]) in float64.

    `bounds[n]` = (b, a, e): batch row b, tokens a..e-1; `h0s[n]` float kv state or None for
    padding. Snapshots come from separate calls truncated after each token.
    """
    out = []
    for (b, a, e), h0 in zip(bounds, h0s):
        if h0 is None:
            out.append(None)
            continue
        sl = [x[b:b + 1, a:e] for x in args]
        if e > a:
            o, s = numpy_reference(*sl, h0[None], scale=scale, l2norm=l2)
            o, s = o[0], s[0]
        else:
            o, s = np.zeros((0,) + args[2].shape[2:]), np.asarray(h0, np.float64)
        snaps = []
        for j in range(ns):
            p = (e - a) - ns + j  # snapshot j = state after this token of the sequence
            if p < 0:
                snaps.append(np.asarray(h0, np.float64))
            else:
                trunc = [x[b:b + 1, a:a + p + 1] for x in args]
                snaps.append(numpy_reference(*trunc, h0[None], scale=scale, l2norm=l2)[1][0])
        out.append((o, s, np.stack(snaps) if ns else None))
    return out


def run_case(kda, layout, state, ns, packing, dtype, l2, *, Hk=1, Hv=2, K=16, V=32):
    spec = PACKINGS[packing]
    if spec[0] == "varlen":
        lens = spec[1]
        N, B, T = len(lens), 1, sum(lens)
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        bounds = [(0, cu[n], cu[n + 1]) for n in range(N)]
    else:
        _, B, T = spec
        N, cu = B, None
        bounds = [(n, 0, T) for n in range(N)]
    args = make(B, T, Hk, Hv, K, V, kda=kda, dtype=dtype, l2=l2)
    scale = K ** -0.5
    rng = np.random.default_rng(2)
    idx = None
    if state == "pool":
        idx = np.asarray(POOL_INDICES[packing], np.int32)
        pool = poisoned_pool(Hv, K, V, [i for i in idx if i >= 0])
        h0s = [pool[i] if i >= 0 else None for i in idx]
        init = from_kv(jnp.asarray(pool), layout)
    elif state == "per_seq":
        h0_all = rng.standard_normal((N, Hv, K, V)).astype(np.float32)
        h0s = list(h0_all)
        init = from_kv(jnp.asarray(h0_all), layout)
    else:
        h0s = [np.zeros((Hv, K, V), np.float32)] * N
        init = None

    def fn(q, k, v, g, beta, init, cu, idx):
        return recurrent.fused_recurrent(
            q, k, v, g, beta, init, scale=scale, use_qk_l2norm=l2, interpret=True,
            state_layout=layout, cu_seqlens=cu, state_indices=idx, num_snapshots=ns)

    cu_j = None if cu is None else jnp.asarray(cu)
    idx_j = None if idx is None else jnp.asarray(idx)
    assert recurrent.supports(*args, init, state_layout=layout, cu_seqlens=cu_j,
                              state_indices=idx_j, num_snapshots=ns) is None
    assert_pallas(fn, *args, init, cu_j, idx_j)
    outs = jax.jit(fn)(*args, init, cu_j, idx_j)
    if ns:
        o, ht, snaps = outs
        shape = (N, ns, Hv, K, V) if layout == "kv" else (N, ns, Hv, V, K)
        assert snaps.dtype == F32 and snaps.shape == shape
        snaps = to_kv(snaps, layout)
    else:
        o, ht = outs
    assert o.dtype == args[0].dtype and o.shape == (B, T, Hv, V)
    assert ht.dtype == F32
    ht = to_kv(ht, layout)
    tol = tolerance("recurrent", dtype)[0]
    o = np.asarray(o.astype(F32))
    for n, (ref, (b, a, e)) in enumerate(zip(expected(args, bounds, h0s, ns, scale, l2), bounds)):
        if ref is None:  # padding: zeros out, nothing in the pool touched (checked below)
            assert (o[b, a:e] == 0).all()
            if ns:
                assert (snaps[n] == 0).all()
            continue
        o_ref, s_ref, snap_ref = ref
        if e > a:
            assert rel_err(o[b, a:e], o_ref) < tol, (n, rel_err(o[b, a:e], o_ref))
        s_out = ht[idx[n]] if state == "pool" else ht[n]
        assert rel_err(s_out, s_ref) < tol, (n, rel_err(s_out, s_ref))
        if e == a:  # an empty sequence returns its initial state unchanged
            np.testing.assert_array_equal(s_out, h0s[n])
        if ns:
            assert rel_err(snaps[n], snap_ref) < tol, (n, rel_err(snaps[n], snap_ref))
            np.testing.assert_allclose(snaps[n, -1], s_out, rtol=0, atol=0)  # last = final
    if state == "pool":
        assert ht.shape == (POOL, Hv, K, V)
        untouched = sorted(set(range(POOL)) - {int(i) for i in idx if i >= 0})
        assert untouched
        # bit for bit, NaN payloads and -0.0 included
        np.testing.assert_array_equal(ht[untouched].view(np.uint32),
                                      np.asarray(pool)[untouched].view(np.uint32))
    else:
        assert ht.shape == (N, Hv, K, V)


@pytest.mark.parametrize("row", slow_except(CASES, *EVERYDAY_ROWS),
                         ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
def test_matches_per_sequence_reference(row):
    run_case(**row)


@pytest.mark.slow  # grouped heads: tests/test_pallas_recurrent.py's everyday case 0
def test_grouped_heads_and_wider_state():
    """Hv / Hk = 2 with two q/k heads, K = V = 32, packed + pool + snapshots at once."""
    run_case(True, "vk", "pool", 3, "varlen_b", "f32", True, Hk=2, Hv=4, K=32, V=32)


def test_traced_cu_seqlens_and_indices_share_one_program():
    """cu_seqlens and state_indices are traced: compositions with the same (T, N) run the same
    compiled program and match the reference. The kernel treats an out-of-range index (here 6,
    P = 6) like -1: nothing in the pool is touched (the op only promises no crash)."""
    B, T, Hk, Hv, K, V = 1, 12, 1, 2, 16, 16
    args = make(B, T, Hk, Hv, K, V, kda=False, dtype="f32", l2=True, seed=4)
    pool = poisoned_pool(Hv, K, V, [0, 2, 5], seed=5)

    @jax.jit
    def fn(q, k, v, g, beta, pool, cu, idx):
        return recurrent.fused_recurrent(q, k, v, g, beta, pool, scale=0.25, use_qk_l2norm=True,
                                         interpret=True, cu_seqlens=cu, state_indices=idx,
                                         num_snapshots=2)

    for cu, idx in (((0, 0, 7, 12), (5, 0, 2)), ((0, 5, 6, 12), (2, 5, -1)),
                    ((0, 12, 12, 12), (6, 0, 2))):
        cu, idx = np.asarray(cu, np.int32), np.asarray(idx, np.int32)
        o, ht, snaps = fn(*args, jnp.asarray(pool), jnp.asarray(cu), jnp.asarray(idx))
        h0s = [pool[i] if 0 <= i < POOL else None for i in idx]
        refs = expected(args, [(0, cu[n], cu[n + 1]) for n in range(3)], h0s, 2, 0.25, True)
        for n, ref in enumerate(refs):
            a, e = cu[n], cu[n + 1]
            if ref is None:
                assert (np.asarray(o)[0, a:e] == 0).all() and (np.asarray(snaps[n]) == 0).all()
                continue
            if e > a:
                assert rel_err(o[0, a:e], ref[0]) < 1e-5
            assert rel_err(ht[idx[n]], ref[1]) < 1e-5
            assert rel_err(snaps[n], ref[2]) < 1e-5
        untouched = sorted(set(range(POOL)) - {int(i) for i in idx})
        np.testing.assert_array_equal(np.asarray(ht)[untouched].view(np.uint32),
                                      pool[untouched].view(np.uint32))
    assert fn._cache_size() == 1


def test_pool_is_aliased_and_donated_in_place():
    """The pool input is the final-state output (input_output_aliases), also with
    alias_state=False; a jit that donates the pool compiles with the pool parameter aliased to
    the output (the GPU compile check also asserts there is no copy of it)."""
    T, Hk, Hv, K, V = 3, 1, 2, 16, 16
    args = make(2, T, Hk, Hv, K, V, kda=False, dtype="f32", l2=True)
    pool = jnp.asarray(poisoned_pool(Hv, K, V, [1, 3]))
    idx = jnp.asarray([3, 1], jnp.int32)

    def fn(q, k, v, g, beta, pool, idx, alias=True):
        return recurrent.fused_recurrent(q, k, v, g, beta, pool, scale=0.25, use_qk_l2norm=True,
                                         interpret=True, state_indices=idx, alias_state=alias)

    for alias in (True, False):
        jaxpr = str(jax.make_jaxpr(lambda *a, alias=alias: fn(*a, alias=alias))(*args, pool, idx))
        assert "pallas_call" in jaxpr and "input_output_aliases=((5, 1),)" in jaxpr
    compiled = jax.jit(fn, donate_argnums=(5,)).lower(*args, pool, idx).compile()
    text = compiled.as_text()
    assert "input_output_alias={ {1}: (5, {}, may-alias) }" in text, text[:3000]
    expect_untouched = np.asarray(pool)[[0, 2, 4, 5]].view(np.uint32)
    o, ht = compiled(*args, jnp.array(pool), idx)
    np.testing.assert_array_equal(np.asarray(ht)[[0, 2, 4, 5]].view(np.uint32), expect_untouched)
    refs = expected(args, [(0, 0, T), (1, 0, T)], [np.asarray(pool)[3], np.asarray(pool)[1]], 0,
                    0.25, True)
    assert rel_err(ht[3], refs[0][1]) < 1e-5 and rel_err(ht[1], refs[1][1]) < 1e-5
    assert rel_err(o[0], refs[0][0]) < 1e-5 and rel_err(o[1], refs[1][0]) < 1e-5


def test_snapshots_without_final_state_and_prefetch_off():
    """num_snapshots with output_final_state=False returns (o, None, snapshots); the unpipelined
    loop gives the same numbers as the prefetching one."""
    lens = (3, 0, 6)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    args = make(1, 9, 1, 2, 16, 16, kda=True, dtype="f32", l2=True, seed=6)
    h0 = jnp.asarray(np.random.default_rng(7).standard_normal((3, 2, 16, 16)), F32)
    outs = [jax.jit(lambda *a, p=p: recurrent.fused_recurrent(
        *a, scale=0.25, use_qk_l2norm=True, interpret=True, cu_seqlens=cu, num_snapshots=4,
        output_final_state=False, prefetch=p))(*args, h0) for p in (True, False)]
    (o1, s1, n1), (o2, s2, n2) = outs
    assert s1 is None and s2 is None and n1.shape == (3, 4, 2, 16, 16)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(n1, n2)
    np.testing.assert_array_equal(n1[1], np.broadcast_to(h0[1], (4, 2, 16, 16)))  # empty: all h0


# ---- supports / errors --------------------------------------------------------------------

S = jax.ShapeDtypeStruct


def _sds(B=1, T=8, Hk=1, Hv=2, K=32, V=32, layout="kv", lead=3):
    st = (lead, Hv, K, V) if layout == "kv" else (lead, Hv, V, K)
    return [S((B, T, Hk, K), F32), S((B, T, Hk, K), F32), S((B, T, Hv, V), F32),
            S((B, T, Hv), F32), S((B, T, Hv), F32), S(st, F32)]


def test_supports_accepts_every_combination():
    i32 = jnp.int32
    for layout in ("kv", "vk"):
        for ns in (0, 1, 7):
            # packed, per-sequence states / pool / no state
            assert recurrent.supports(*_sds(layout=layout), state_layout=layout,
                                      cu_seqlens=S((4,), i32), num_snapshots=ns) is None
            assert recurrent.supports(*_sds(layout=layout, lead=9), state_layout=layout,
                                      cu_seqlens=S((4,), i32), state_indices=S((3,), i32),
                                      num_snapshots=ns) is None
            assert recurrent.supports(*_sds()[:5], None, cu_seqlens=S((4,), i32),
                                      num_snapshots=ns) is None
            # batched, pool of one slot
            assert recurrent.supports(*_sds(B=3, layout=layout, lead=1), state_layout=layout,
                                      state_indices=S((3,), i32), num_snapshots=ns) is None


@pytest.mark.parametrize("kwargs,sds,needle", [
    (dict(cu_seqlens=S((3,), jnp.int32)), dict(B=2, lead=2), "B == 1"),
    (dict(cu_seqlens=S((4,), jnp.float32)), dict(), "cu_seqlens dtype"),
    (dict(cu_seqlens=S((1,), jnp.int32)), dict(lead=0), "N >= 1"),
    (dict(cu_seqlens=S((3,), jnp.int32)), dict(lead=3), "[2, 2, 32, 32]"),  # h0 not [N, ...]
    (dict(cu_seqlens=S((4,), jnp.int32), state_indices=S((2,), jnp.int32)), dict(), "[N] = [3]"),
    (dict(state_indices=S((1,), jnp.float32)), dict(lead=4), "state_indices dtype"),
    (dict(state_indices=S((1,), jnp.int32)), dict(K=16, lead=4), "state pool shape"),
    (dict(num_snapshots=-1), dict(lead=1), "num_snapshots"),
    (dict(num_snapshots=True), dict(lead=1), "num_snapshots"),
    (dict(num_snapshots=2.0), dict(lead=1), "num_snapshots"),
])
def test_supports_declines_with_reason(kwargs, sds, needle):
    args = _sds(**sds)
    if "K" in sds:  # a pool whose K (32) does not match q's (16)
        args[5] = S((4, 2, 32, 32), F32)
    reason = recurrent.supports(*args, **kwargs)
    assert isinstance(reason, str) and needle in reason, reason
    arrays = [jnp.zeros(a.shape, a.dtype) for a in args]
    arr_kw = {k: (jnp.zeros(v.shape, v.dtype) if isinstance(v, S) else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match="cannot serve"):
        recurrent.fused_recurrent(*arrays, scale=0.1, interpret=True, **arr_kw)


def test_pool_needs_initial_state_and_final_state():
    args = _sds(lead=4)
    reason = recurrent.supports(*args[:5], None, state_indices=S((1,), jnp.int32))
    assert "needs initial_state" in reason
    arrays = [jnp.zeros(a.shape, a.dtype) for a in args]
    with pytest.raises(ValueError, match="output_final_state=True"):
        recurrent.fused_recurrent(*arrays, scale=0.1, interpret=True, output_final_state=False,
                                  state_indices=jnp.zeros((1,), jnp.int32))
