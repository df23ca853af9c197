"""Per-token state slots for speculative decoding (vLLM's form, docs/spec.md section 2.5a): a
2-D `state_indices` read table `[N, W]`, `num_accepted_tokens` `[N]` picking the read column,
and a per-token write table (`output_state_indices` `[N, W]`, default the read table).

Each written slot holds the state after its token (float64 oracle), every other slot is
bit-identical, -1 skips, padding and has_initial_state behave as in section 2.4, a two-step
verification-then-rollback equals a plain sequential decode of the accepted tokens, and bad
input raises naming the argument."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net
from helpers import (assert_no_pallas, assert_pallas, numpy_reference, rel_err, slow_except,
                     tolerance)

P, H, K, V = 14, 2, 16, 16
T = 3
# sequence 0 accepts 1 (reads column 0), 1 accepts T (reads its last column), 2 is padding
# (its read column holds -1), 3 has has_initial_state False (its read slot 13 holds NaN).
READ = [[0, 1, 2], [3, 4, 5], [6, -1, 7], [8, 9, 13]]
ACC = [1, 3, 2, 3]
HAS = [True, True, True, False]
# separate write table: -1 skips a token; slot 12 is written by nobody
WRITE = [[10, -1, 11], [5, 4, 3], [0, 1, 2], [6, 7, -1]]
TOL = tolerance("recurrent")[0]


def _inputs(N, Tn, seed=0, kda=False, B=None):
    """q, k, v, g, beta with B rows (N by default) of Tn tokens, keys unit norm (bounded)."""
    B = N if B is None else B
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Tn, H, K)) / np.sqrt(K)
    k = rng.standard_normal((B, Tn, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, Tn, H, V))
    g = rng.uniform(-0.3, 0.0, (B, Tn, H, K) if kda else (B, Tn, H))
    beta = rng.uniform(0.0, 1.0, (B, Tn, H))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta))


def _pool(seed=1, nan_slot=13):
    pool = np.random.default_rng(seed).standard_normal((P, H, K, V)).astype(np.float32)
    if nan_slot is not None:
        pool[nan_slot] = np.nan  # read by no one (has_initial_state False)
    return jnp.asarray(pool)


def _vk(x):
    return jnp.swapaxes(x, -1, -2)


def _token_states64(args, h0, starts, lens):
    """float64 (o, [state after token p of sequence n]) from per-sequence runs of the packed
    or batched tokens: sequence n is tokens starts[n] .. starts[n] + lens[n] - 1 of its row."""
    q, k, v, g, beta = args
    o = np.zeros(v.shape)
    states = []
    for n, (b, s, L) in enumerate(_rows(starts, lens, q.shape[0])):
        per = []
        for p in range(L):
            sl = (slice(b, b + 1), slice(s, s + p + 1))
            on, hn = numpy_reference(*(x[sl] for x in (q, k, v, g, beta)), h0[n:n + 1])
            per.append(hn[0])
            o[b, s + p] = on[0, p]
        states.append(per)
    return o, states


def _rows(starts, lens, B):
    """(row, first token, length) of each sequence: one packed row, or one row each."""
    packed = B == 1 and len(starts) > 1
    return [(0 if packed else n, s, L) for n, (s, L) in enumerate(zip(starts, lens))]


def _expected(args, pool, read, acc, write, has, starts, lens):
    """(o, pool) the op must return, from float64 per-sequence runs."""
    pool64 = np.asarray(pool, np.float64)
    N = len(read)
    rslot = [read[n][acc[n] - 1] for n in range(N)]
    h0 = np.stack([pool64[r] if (r >= 0 and has[n]) else np.zeros(pool64.shape[1:])
                   for n, r in enumerate(rslot)])
    o, states = _token_states64(args, h0, starts, lens)
    want = pool64.copy()
    written = set()
    for n, (b, s, L) in enumerate(_rows(starts, lens, args[0].shape[0])):
        if rslot[n] < 0:  # padding: zero outputs, no writes
            o[b, s:s + L] = 0.0
            continue
        for p in range(L):
            if write[n][p] >= 0:
                want[write[n][p]] = states[n][p]
                written.add(write[n][p])
    return o, want, written


def _check_pool(got, want, written, before, vk=False):
    got = np.asarray(_vk(got) if vk else got)
    for slot in range(P):
        if slot in written:
            assert rel_err(got[slot], want[slot]) <= TOL, slot
        else:  # bit-identical: NaN slot, read-only slots and unused slots alike
            np.testing.assert_array_equal(got[slot], np.asarray(before[slot]), err_msg=str(slot))


def _call(impl, backend, layout="kv", **kw):
    def f(q, k, v, g, beta, pool):
        return gated_delta_net(q, k, v, g, beta, initial_state=pool, output_final_state=True,
                               impl=impl, backend=backend, interpret=backend == "pallas",
                               state_layout=layout, **kw)
    return f


CASES = [("reference", "xla", "kv", False), ("recurrent", "xla", "kv", False),
         ("recurrent", "xla", "vk", True), ("recurrent", "pallas", "kv", False),
         ("recurrent", "pallas", "vk", True)]


def _ids(cases):
    return ["-".join([i, b, lay, "kda" if kda else "gda"]) for i, b, lay, kda in cases]


# Every case with the read table as the write table ("in-place") and with a separate one.
# Everyday tier: reference-xla-kv-gda-write-table (the op's semantics: per-token writes, -1
# skips, padding, has_initial_state False), recurrent-xla-vk-kda-in-place (the XLA recurrent
# path's per-token stores, "vk", KDA) and recurrent-pallas-kv-gda-write-table (the Pallas
# kernel's per-token guarded stores into the pool from the write table); the rest: full suite.
TOKEN_CASES = [(*c, sw) for c in CASES for sw in (False, True)]
TOKEN_IDS = [f"{i}-{'write-table' if sw else 'in-place'}"
             for i in _ids(CASES) for sw in (False, True)]
EVERYDAY_TOKEN = ("reference-xla-kv-gda-write-table", "recurrent-xla-vk-kda-in-place",
                  "recurrent-pallas-kv-gda-write-table")


@pytest.mark.parametrize("impl,backend,layout,kda,separate_write",
                         slow_except(TOKEN_CASES, *(TOKEN_IDS.index(i) for i in EVERYDAY_TOKEN)),
                         ids=TOKEN_IDS)
def test_token_states_land_in_their_slots(impl, backend, layout, kda, separate_write):
    args = _inputs(len(READ), T, kda=kda)
    pool = _pool()
    write = WRITE if separate_write else READ
    kw = dict(state_indices=jnp.asarray(READ, jnp.int32),
              num_accepted_tokens=jnp.asarray(ACC, jnp.int32),
              has_initial_state=jnp.asarray(HAS))
    if separate_write:
        kw["output_state_indices"] = jnp.asarray(WRITE, jnp.int32)
    fn = _call(impl, backend, layout, **kw)
    p_in = _vk(pool) if layout == "vk" else pool
    (assert_pallas if backend == "pallas" else assert_no_pallas)(fn, *args, p_in)
    o, new = jax.jit(fn)(*args, p_in)
    o_want, want, written = _expected(args, pool, READ, ACC, write, HAS, [0] * 4, [T] * 4)
    _check_pool(new, want, written, pool, vk=layout == "vk")
    assert rel_err(o, o_want) <= TOL
    assert not np.any(np.asarray(o[2]))  # padding rows are exact zeros


PACKED = [("reference", "xla"), ("recurrent", "xla"), ("recurrent", "pallas")]


# Everyday tier: recurrent-pallas, the kernel's packed sequences (3, 1, 0, 2 tokens) with
# per-token write columns; the XLA paths' per-token writes run in the everyday tier unpacked
# (above). The other paths: full suite only.
@pytest.mark.parametrize("impl,backend", slow_except(PACKED, 2),
                         ids=[f"{i}-{b}" for i, b in PACKED])
def test_packed_drafts_with_cu_seqlens(impl, backend):
    """Sequences of 3, 1, 0 and 2 tokens packed along T = 6 with a 3-column table: token p of
    a sequence writes column p; columns past its length are never used."""
    lens = [3, 1, 0, 2]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    read = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    acc = [2, 1, 3, 1]
    write = [[12, 0, 1], [4, 2, 3], [5, 6, 7], [-1, 13, 9]]
    args = _inputs(1, int(cu[-1]), seed=3)
    pool = _pool(nan_slot=None)
    fn = _call(impl, backend, state_indices=jnp.asarray(read, jnp.int32),
               output_state_indices=jnp.asarray(write, jnp.int32),
               num_accepted_tokens=jnp.asarray(acc, jnp.int32), cu_seqlens=jnp.asarray(cu))
    if backend == "pallas":
        assert_pallas(fn, *args, pool)
    o, new = jax.jit(fn)(*args, pool)
    o_want, want, written = _expected(args, pool, read, acc, write, [True] * 4, cu[:-1], lens)
    assert written == {12, 0, 1, 4, 13}
    _check_pool(new, want, written, pool)
    assert rel_err(o, o_want) <= TOL


# Full suite only (24 s on a loaded machine): the per-token writes it rolls back to run in the
# everyday tier above.
@pytest.mark.parametrize("impl,backend", slow_except(PACKED[1:]),
                         ids=[f"{i}-{b}" for i, b in PACKED[1:]])
def test_verify_then_rollback_equals_sequential_decode(impl, backend):
    """Two verification steps of W = 4 drafts with vLLM's slot blocks (request n owns slots
    n*W .. n*W+W-1, read and write table alike): after step 1 request n accepts a[n] drafts,
    after step 2 b[n]. Step 2's outputs and the state in the slot of its last accepted token
    equal a plain decode (one token per call, state carried) of the accepted tokens."""
    N, W = 3, 4
    table = jnp.asarray(np.arange(N * W).reshape(N, W), jnp.int32)
    rng = np.random.default_rng(5)
    init = jnp.asarray(rng.standard_normal((N, H, K, V)), jnp.float32)
    pool = jnp.zeros((N * W + 1, H, K, V)).at[table[:, 0]].set(init).at[N * W].set(7.0)
    a, b = [1, 4, 2], [3, 1, 4]
    step1, step2 = _inputs(N, W, seed=6), _inputs(N, W, seed=7)
    verify = jax.jit(lambda pool, acc, *x: _call(impl, backend, state_indices=table,
                                                 num_accepted_tokens=acc)(*x, pool))
    _, pool1 = verify(pool, jnp.ones((N,), jnp.int32), *step1)
    o2, pool2 = verify(pool1, jnp.asarray(a, jnp.int32), *step2)
    np.testing.assert_array_equal(np.asarray(pool2[N * W]), np.asarray(pool[N * W]))

    decode = jax.jit(lambda S, *x: gated_delta_net(*x, initial_state=S, output_final_state=True,
                                                   impl="recurrent"))
    for n in range(N):
        S = init[n:n + 1]
        for t in range(a[n]):
            _, S = decode(S, *(x[n:n + 1, t:t + 1] for x in step1))
        outs = []
        for t in range(W):
            o_t, S = decode(S, *(x[n:n + 1, t:t + 1] for x in step2))
            outs.append(o_t)
            if t == b[n] - 1:
                accepted = S
        assert rel_err(o2[n:n + 1], jnp.concatenate(outs, axis=1)) <= TOL, n
        assert rel_err(pool2[table[n, b[n] - 1]], accepted[0]) <= TOL, n


@pytest.mark.slow
def test_auto_takes_the_recurrent_path_and_no_accepted_means_column_zero():
    """T = 9 > RECURRENT_MAX_T: "auto" still runs token by token (the chunked paths decline);
    without num_accepted_tokens column 0 is read (vLLM's non-speculative default)."""
    Tn, N = 9, 2
    table = jnp.asarray(np.arange(N * Tn).reshape(N, Tn), jnp.int32)
    args = _inputs(N, Tn, seed=8)
    pool = jnp.concatenate([_pool(nan_slot=None), _pool(seed=2, nan_slot=None)])  # 28 slots
    o, new = gated_delta_net(*args, initial_state=pool, state_indices=table,
                             output_final_state=True)
    o_ref, ref = gated_delta_net(*args, initial_state=pool, state_indices=table,
                                 num_accepted_tokens=jnp.ones((N,), jnp.int32),
                                 output_final_state=True, impl="reference")
    assert rel_err(o, o_ref) <= TOL and rel_err(new, ref) <= TOL
    np.testing.assert_array_equal(np.asarray(new[N * Tn:]), np.asarray(pool[N * Tn:]))


def test_traced_tables_run_under_jit():
    """Traced tables and counts cannot be checked; they run (one program for all values)."""
    args = _inputs(len(READ), T)
    pool = _pool()
    f = jax.jit(lambda r, w, a, *x: gated_delta_net(
        *x, initial_state=pool, state_indices=r, output_state_indices=w, num_accepted_tokens=a,
        has_initial_state=jnp.asarray(HAS), output_final_state=True, impl="recurrent"))
    o, new = f(jnp.asarray(READ, jnp.int32), jnp.asarray(WRITE, jnp.int32),
               jnp.asarray(ACC, jnp.int32), *args)
    o_want, want, written = _expected(args, pool, READ, ACC, WRITE, HAS, [0] * 4, [T] * 4)
    _check_pool(new, want, written, pool)
    assert rel_err(o, o_want) <= TOL


def test_gradients_are_refused_by_name():
    args = _inputs(len(READ), T)
    pool = _pool(nan_slot=None)
    f = _call("recurrent", "xla", state_indices=jnp.asarray(READ, jnp.int32),
              num_accepted_tokens=jnp.asarray(ACC, jnp.int32))
    with pytest.raises(NotImplementedError, match=r"per-token slots"):
        jax.grad(lambda q: jnp.sum(f(q, *args[1:], pool)[0]))(args[0])


_TABLE = jnp.asarray(READ, jnp.int32)
_ACC = jnp.asarray(ACC, jnp.int32)


@pytest.mark.parametrize("kw,err,match", [
    (dict(state_indices=_TABLE.astype(jnp.float32)), TypeError,
     "state_indices must have dtype int32"),
    (dict(state_indices=_TABLE[:3]), ValueError, r"N=4 rows"),
    (dict(state_indices=_TABLE[:, :2]), ValueError, r"W == T=3"),
    (dict(state_indices=_TABLE[:, 0], num_accepted_tokens=_ACC), ValueError,
     "num_accepted_tokens needs per-token slots"),
    (dict(num_accepted_tokens=_ACC.astype(jnp.float32)), TypeError,
     "num_accepted_tokens must have dtype int32"),
    (dict(num_accepted_tokens=_ACC[:3]), ValueError, r"num_accepted_tokens must have shape \[4\]"),
    (dict(num_accepted_tokens=_ACC.at[1].set(0)), ValueError, r"\[1, W\] with W=3"),
    (dict(num_accepted_tokens=_ACC.at[1].set(4)), ValueError, r"num_accepted_tokens\[1\]=4"),
    (dict(state_indices=_TABLE.at[0, 2].set(P)), ValueError, r"state_indices\[0, 2\]=14"),
    (dict(output_state_indices=_TABLE.at[3, 0].set(-2)), ValueError,
     r"output_state_indices\[3, 0\]=-2"),
    (dict(output_state_indices=_TABLE[:, 0]), ValueError,
     r"output_state_indices must have shape \[4, 3\]"),
    (dict(output_state_indices=_TABLE.at[0, 0].set(1)), ValueError, "must not repeat a slot"),
    (dict(state_indices=_TABLE.at[0, 0].set(1)), ValueError, "state_indices .* must not repeat"),
    (dict(num_snapshots=2), ValueError, "num_snapshots=2 with per-token slots"),
    (dict(impl="chunked"), ValueError, 'not impl="chunked"'),
    (dict(backend="pallas_mosaic_tpu"), ValueError, r"do not take per-token slots"),
    (dict(output_final_state=False), ValueError, "output_final_state=True"),
], ids=["table-dtype", "table-rows", "table-width", "acc-without-table", "acc-dtype",
        "acc-shape", "acc-zero", "acc-over-W", "read-range", "write-range", "write-shape",
        "write-repeat", "inplace-repeat", "snapshots", "chunked", "mosaic", "no-final-state"])
def test_bad_arguments_raise_naming_them(kw, err, match):
    args = _inputs(len(READ), T)
    kw = dict(dict(state_indices=_TABLE, num_accepted_tokens=_ACC, output_final_state=True), **kw)
    with pytest.raises(err, match=match):
        gated_delta_net(*args, initial_state=_pool(), **kw)


def test_packed_sequence_longer_than_the_table_raises():
    args = _inputs(1, 5)
    with pytest.raises(ValueError, match=r"sequence 1 has 4 tokens .* W=3"):
        gated_delta_net(*args, initial_state=_pool(), state_indices=_TABLE[:2],
                        cu_seqlens=jnp.asarray([0, 1, 5], jnp.int32), output_final_state=True)


def test_no_tokens():
    """Packed with no tokens: nothing is written, the pool passes through bit-identical;
    without cu_seqlens the table would have no column to read (W = T = 0): raises."""
    pool = _pool()
    args = _inputs(1, 0)
    _, new = gated_delta_net(*args, initial_state=pool, state_indices=_TABLE[:2],
                             cu_seqlens=jnp.zeros((3,), jnp.int32), output_final_state=True)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(pool))
    with pytest.raises(ValueError, match="W >= 1"):
        gated_delta_net(*_inputs(2, 0), initial_state=pool,
                        state_indices=jnp.zeros((2, 0), jnp.int32), output_final_state=True)


def test_repeated_read_slots_raise():
    table = jnp.asarray([[0, 1, 2], [3, 1, 5], [6, 7, 8], [9, 10, 11]], jnp.int32)
    write = jnp.asarray(np.arange(12).reshape(4, 3), jnp.int32)
    with pytest.raises(ValueError, match="must not repeat a slot"):  # both read slot 1
        gated_delta_net(*_inputs(4, T), initial_state=_pool(), state_indices=table,
                        output_state_indices=write, output_final_state=True,
                        num_accepted_tokens=jnp.asarray([2, 2, 1, 1], jnp.int32))
