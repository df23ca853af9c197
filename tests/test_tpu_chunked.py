"""The Mosaic TPU chunked kernels (forward and backward) in the TPU interpreter on the CPU,
against the float64 recurrence and its hand-written VJP: outputs, final state and all six
gradients through `jax.vjp`-style cotangents on o and the final state.

Cases: weak decay over three full chunks plus a ragged one (the carried state and its
gradient matter) in packed sequences with an empty one, strong decay (g down to -30) in the
dense layout, grouped heads, bf16. Every case asserts that `pallas_call` is in the traced program. K = V = 128 (the
kernels' lane-dense head blocks); one program per case keeps the interpreter's compile time,
which dominates, in budget.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.kernels.tpu import chunked as tpu_chunked
from helpers import (GRAD_NAMES, Case, assert_close, assert_pallas, cotangents, make_inputs,
                     numpy_vjp, slow_except, tolerance)

F32 = jnp.float32
SCALE = 0.125


def fwd_bwd(q, k, v, g, beta, h0, do, dht, *, cu=None, l2=True):
    """Forward and backward kernels in one program: (o, ht, dq, dk, dv, dg, dbeta, dh0)."""
    o, ht = tpu_chunked.chunked_forward(q, k, v, g, beta, h0, scale=SCALE, use_qk_l2norm=l2,
                                        interpret=True, cu_seqlens=cu)
    grads = tpu_chunked.chunked_backward(q, k, v, g, beta, h0, do, dht, scale=SCALE,
                                         use_qk_l2norm=l2, interpret=True, cu_seqlens=cu)
    return (o, ht, *grads)


def check(case: Case, *, lengths=None, seed=0):
    (q, k, v, g, beta), h0 = make_inputs(case, seed)
    cu = None
    N = case.B
    if lengths is not None:
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(lengths)]), jnp.int32)
        N = len(lengths)
        h0 = jnp.asarray(np.random.default_rng(seed + 5).standard_normal(
            (N, case.Hv, case.K, case.V)), F32)
    do, dht = cotangents((case.B, case.T, case.Hv, case.V), (N, case.Hv, case.K, case.V))
    args = (q, k, v, g, beta, h0, jnp.asarray(do, q.dtype), jnp.asarray(dht, F32))
    fn = jax.jit(lambda *a: fwd_bwd(*a, cu=cu, l2=case.l2norm))
    assert_pallas(fn, *args)
    got = dict(zip(("o", "state") + GRAD_NAMES, fn(*args)))
    (o, s), grads = numpy_vjp(q, k, v, g, beta, h0, do, dht, scale=SCALE, l2norm=case.l2norm,
                              cu_seqlens=None if cu is None else np.asarray(cu))
    want = {"o": o, "state": s, **dict(zip(GRAD_NAMES, grads))}
    for name, x in (("dq", q), ("dk", k), ("dv", v), ("dg", g), ("dbeta", beta)):
        assert got[name].shape == x.shape and got[name].dtype == x.dtype, name
    tol_out, tol_grad = tolerance("chunked", case.dtype)
    errs = assert_close(got, want, tol_out, tol_grad, str(case))
    print(f"{case}: " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))  # shown with -s / -rP
    return errs


RAGGED = 3 * 128 + 37   # three full chunks and a ragged one


# Full suite only (the TPU interpreter's compiles are the suite's dearest): packed sequences,
# weak decay over three chunk boundaries, grouped heads, bf16.
@pytest.mark.slow
@pytest.mark.parametrize("kda", [False, True], ids=["GDA", "KDA"])
def test_weak_decay_packed_grouped_ragged(kda):
    """Weak decay (g in [-0.1, 0], some heads g = 0, some beta = 1): the state carried over
    three chunk boundaries and its gradient dominate. Packed sequences: an empty one first,
    one of three full chunks and a ragged one, a one-token one, a short one, each from its own
    initial state; Hv = 2 Hk."""
    lengths = (0, RAGGED, 1, 40)
    check(Case(kda=kda, T=sum(lengths), Hk=1, group=2, K=128, V=128, weak=True), lengths=lengths)


# Everyday tier: GDA, the forward and the reverse pass over two chunks of 128, the second
# ragged (2 valid rows: the row mask), dS carried from the last chunk back to the first and dh0
# stored at the first (tests/mutants.md tpu-dh0), dht entering at the last, h0. KDA on these
# kernels: tests/test_tpu_op.py's everyday row.
@pytest.mark.parametrize("kda", slow_except([False, True], 0), ids=["GDA", "KDA"])
def test_strong_decay(kda):
    """g down to -30 per token: the exactly-one factors stay constants, so dg keeps float32
    accuracy where the true gradients are tiny. Dense layout (no cu_seqlens), ragged T."""
    check(Case(kda=kda, T=130, K=128, V=128, h0=True, gmin=-30.0))


@pytest.mark.slow
def test_bf16_grouped_raw_keys():
    """bf16 inputs (bf16 MXU dots, float32 accumulation, bf16x3 inverse) at the spec's bf16
    tolerances; two q/k heads of two value heads each, B = 2, raw unit keys (no l2norm)."""
    check(Case(T=140, B=2, Hk=2, group=2, K=128, V=128, h0=True, dtype="bf16", weak=True,
               l2norm=False))


S = jax.ShapeDtypeStruct


def test_supports_declines_with_reason():
    ok = [S((1, 8, 1, 128), F32)] * 2 + [S((1, 8, 2, 128), F32), S((1, 8, 2), F32),
                                         S((1, 8, 2), F32)]
    assert tpu_chunked.supports(*ok) is None
    assert "layout" in tpu_chunked.supports(*ok, state_layout="vk")
    small = [S((1, 8, 1, 64), F32)] * 2 + ok[2:]
    assert "head size K=64" in tpu_chunked.supports(*small)
    assert "B == 1" in tpu_chunked.supports(*[S((2,) + x.shape[1:], F32) for x in ok],
                                            cu_seqlens=S((3,), jnp.int32))
    assert "initial_state shape" in tpu_chunked.supports(*ok, S((2, 2, 128, 128), F32))
    with pytest.raises(ValueError, match="cannot serve"):
        tpu_chunked.chunked_forward(*(jnp.zeros(x.shape, x.dtype) for x in small), scale=1.0,
                                    interpret=True)
