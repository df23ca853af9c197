"""The Mosaic TPU recurrent/decode kernel in the TPU interpreter on the CPU: packed sequences,
state pools (poisoned unused slots, padding -1), snapshots, GDA and KDA, both state layouts,
grouped heads, against the float64 recurrence.

The cases and their checks are those of the Triton kernel's tests
(`test_pallas_recurrent_varlen.run_case`), run with the TPU kernel in its place; every case
asserts that `pallas_call` is in the traced program.
"""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_pallas_recurrent_varlen as base
from gdn_jax.kernels.tpu import recurrent as tpu_recurrent
from helpers import assert_pallas, rel_err, slow_except

F32 = jnp.float32
TPU = types.SimpleNamespace(fused_recurrent=tpu_recurrent.fused_recurrent,
                            supports=tpu_recurrent.supports)


@pytest.fixture
def tpu_kernel(monkeypatch):
    monkeypatch.setattr(base, "recurrent", TPU)


# Everyday tier: row 7 (KDA, "vk", pool, 6 snapshots, varlen_b, bf16): N = 5 sequences on the
# (2, ceil(N / 2)) grid (an odd N: the idle tail step), the next sequence's state loading
# while one runs, empty sequences in the middle and last, the padding slot -1 (no read, no
# write, zero outputs and snapshots), poisoned untouched slots, more snapshots than tokens
# (slots holding the initial state), the vk head step with KDA's per-lane gates, value head h
# on q/k head lax.div(h, 2). The other rows and tests: full suite only (the TPU interpreter's
# compiles are the suite's dearest); the op's everyday TPU row is in tests/test_tpu_op.py.
EVERYDAY_ROWS = (7,)


@pytest.mark.parametrize("row", slow_except(base.CASES, *EVERYDAY_ROWS),
                         ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items()))
def test_matches_per_sequence_reference(row, tpu_kernel):
    base.run_case(**row)


@pytest.mark.slow
def test_grouped_heads(tpu_kernel):
    """Hv / Hk = 2 with two q/k heads (lax.div in the head loop), packed + pool + snapshots."""
    base.run_case(True, "kv", "pool", 3, "varlen_b", "f32", True, Hk=2, Hv=4, K=32, V=32)


@pytest.mark.slow
def test_pool_is_aliased_and_donated_in_place():
    """The pool operand (after the two scalar-prefetch operands) is the final-state output, also
    with alias_state=False; a jit donating the pool aliases it; unindexed slots keep their bits."""
    T, Hk, Hv, K, V = 2, 1, 2, 16, 16
    args = base.make(2, T, Hk, Hv, K, V, kda=False, dtype="f32", l2=True)
    pool = jnp.asarray(base.poisoned_pool(Hv, K, V, [1, 3]))
    idx = jnp.asarray([3, 1], jnp.int32)

    def fn(q, k, v, g, beta, pool, idx, alias=True):
        return tpu_recurrent.fused_recurrent(q, k, v, g, beta, pool, scale=0.25,
                                             use_qk_l2norm=True, interpret=True,
                                             state_indices=idx, alias_state=alias)

    for alias in (True, False):
        jaxpr = str(jax.make_jaxpr(lambda *a, alias=alias: fn(*a, alias=alias))(*args, pool, idx))
        assert "pallas_call" in jaxpr and "input_output_aliases=((7, 1),)" in jaxpr
    compiled = jax.jit(fn, donate_argnums=(5,)).lower(*args, pool, idx).compile()
    assert "input_output_alias" in compiled.as_text()
    keep = np.asarray(pool)[[0, 2, 4, 5]].view(np.uint32)
    o, ht = compiled(*args, jnp.array(pool), idx)
    np.testing.assert_array_equal(np.asarray(ht)[[0, 2, 4, 5]].view(np.uint32), keep)
    refs = base.expected(args, [(0, 0, T), (1, 0, T)],
                         [np.asarray(pool)[3], np.asarray(pool)[1]], 0, 0.25, True)
    assert rel_err(ht[3], refs[0][1]) < 1e-5 and rel_err(ht[1], refs[1][1]) < 1e-5
    assert rel_err(o[0], refs[0][0]) < 1e-5 and rel_err(o[1], refs[1][0]) < 1e-5


@pytest.mark.slow
def test_snapshots_without_final_state():
    """num_snapshots with output_final_state=False returns (o, None, snapshots); an empty
    sequence's snapshots are all its initial state."""
    lens = (3, 0, 4)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    args = base.make(1, 7, 1, 2, 16, 16, kda=True, dtype="f32", l2=True, seed=6)
    h0 = jnp.asarray(np.random.default_rng(7).standard_normal((3, 2, 16, 16)), F32)
    def fn(*a):
        return tpu_recurrent.fused_recurrent(*a, scale=0.25, use_qk_l2norm=True, interpret=True,
                                             cu_seqlens=cu, num_snapshots=4,
                                             output_final_state=False)

    assert_pallas(fn, *args, h0)
    o, s, snaps = jax.jit(fn)(*args, h0)
    assert s is None and snaps.shape == (3, 4, 2, 16, 16)
    np.testing.assert_array_equal(snaps[1], np.broadcast_to(h0[1], (4, 2, 16, 16)))
    ref = base.expected(args, [(0, 0, 3), (0, 3, 3), (0, 3, 7)], list(np.asarray(h0)), 4,
                        0.25, True)
    for n in (0, 2):
        assert rel_err(snaps[n], ref[n][2]) < 1e-5


S = jax.ShapeDtypeStruct


def test_supports_declines_with_reason():
    ok = [S((1, 8, 1, 128), F32)] * 2 + [S((1, 8, 2, 128), F32), S((1, 8, 2), F32),
                                         S((1, 8, 2), F32)]
    assert tpu_recurrent.supports(*ok) is None
    assert "state_layout" in tpu_recurrent.supports(*ok, state_layout="xy")
    odd = [S((1, 8, 1, 96), F32)] * 2 + ok[2:]
    assert "head size K=96" in tpu_recurrent.supports(*odd)
    big = [S((1, 8, 1, 256), F32)] * 2 + [S((1, 8, 128, 256), F32), S((1, 8, 128), F32),
                                          S((1, 8, 128), F32)]
    assert "exceeds" in tpu_recurrent.supports(*big)
    assert "needs initial_state" in tpu_recurrent.supports(
        *ok, state_indices=S((1,), jnp.int32))
    with pytest.raises(ValueError, match="output_final_state=True"):
        tpu_recurrent.fused_recurrent(*(jnp.zeros(x.shape, x.dtype) for x in ok),
                                      jnp.zeros((3, 2, 128, 128), F32), scale=1.0,
                                      state_indices=jnp.zeros((1,), jnp.int32),
                                      output_final_state=False, interpret=True)
