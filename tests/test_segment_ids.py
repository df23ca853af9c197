"""Packed rows with segment ids (MaxText / Levanter): the same outputs, final states and
gradients as separate calls per segment (float64 numpy over the segments' tokens)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net
from helpers import (GRAD_NAMES, assert_pallas, cotangents, numpy_vjp, op_tolerance, rel_err,
                     slow_except)

T, Hk, G, K, V = 150, 1, 2, 16, 32
Hv = Hk * G
# row 0: three documents and a padding gap (a boundary inside the second 64-token chunk);
# row 1: left padding, then one document that continues the row's initial state
ROWS = [[1] * 40 + [2] * 70 + [0] * 10 + [3] * 30, [0] * 5 + [7] * 145]


def _segments(row):
    """[(start, end)] of the maximal runs of equal nonzero ids, padding skipped."""
    out, t = [], 0
    while t < len(row):
        if row[t] == 0:
            t += 1
            continue
        e = t
        while e < len(row) and row[e] == row[t]:
            e += 1
        out.append((t, e))
        t = e
    return out


def _expected(q, k, v, g, beta, h0, do, ds):
    """float64 numpy: every segment a sequence of its own (the row's first from the row's
    initial state, the others from zeros), packed into one B = 1 row with cu_seqlens."""
    segs = [(b, a, e) for b, row in enumerate(ROWS) for a, e in _segments(row)]
    take = lambda x: np.concatenate([np.asarray(x, np.float64)[b, a:e] for b, a, e in segs])[None]  # noqa: E731
    cu = np.cumsum([0] + [e - a for _, a, e in segs])
    firsts = [i for i, s in enumerate(segs) if i == 0 or segs[i - 1][0] != s[0]]
    lasts = [i for i, s in enumerate(segs) if i == len(segs) - 1 or segs[i + 1][0] != s[0]]
    S0 = np.zeros((len(segs), Hv, K, V))
    dS = np.zeros_like(S0)
    for b, (i, j) in enumerate(zip(firsts, lasts)):
        S0[i], dS[j] = h0[b], ds[b]
    (o, S), grads = numpy_vjp(*(take(x) for x in (q, k, v, g, beta)), S0, take(do), dS,
                              l2norm=True, cu_seqlens=cu)

    def scatter(x):  # packed [1, sum L, ...] back to [B, T, ...], zeros at padding
        out = np.zeros((len(ROWS), T) + x.shape[2:])
        for (b, a, e), c0 in zip(segs, cu[:-1]):
            out[b, a:e] = x[0, c0:c0 + e - a]
        return out
    want = {"o": scatter(o), "state": np.stack([S[j] for j in lasts])}
    want.update({n: scatter(x) for n, x in zip(GRAD_NAMES[:5], grads[:5])})
    want["dh0"] = np.stack([grads[5][i] for i in firsts])
    return want


def _inputs(kda, seed=0):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, T, Hk, K))
    v = rng.standard_normal((2, T, Hv, V))
    g = rng.uniform(-0.1, 0.0, (2, T, Hv, K) if kda else (2, T, Hv))  # weak decay
    beta = rng.uniform(0.0, 1.0, (2, T, Hv))
    h0 = rng.standard_normal((2, Hv, K, V))
    return [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, h0)]


PATHS = [("reference", "xla", False), ("recurrent", "xla", True), ("chunked", "xla", False),
         ("chunked", "xla", True), ("chunked", "pallas", False), ("recurrent", "pallas", True)]


# Everyday tier: reference-xla-GDA, the op's segment ids to packed sequences and back (three
# documents and a padding gap in one row, left padding then a document continuing the row's
# initial state in the other), outputs, final states and all six gradients. The same packed
# call runs on the other paths in the everyday tier of tests/test_weak_decay.py and the
# kernel modules; the other paths here (chunked and Pallas backward compiles): full suite only.
@pytest.mark.parametrize("impl,backend,kda", slow_except(PATHS, 0),
                         ids=[f"{i}-{b}-{'KDA' if k else 'GDA'}" for i, b, k in PATHS])
def test_segment_ids_equal_separate_calls(impl, backend, kda):
    q, k, v, g, beta, h0 = _inputs(kda)
    seg = jnp.asarray(ROWS, jnp.int32)

    def fn(q, k, v, g, beta, h0, seg):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, segment_ids=seg, impl=impl,
                               backend=backend, interpret=backend == "pallas")

    if backend == "pallas":
        assert_pallas(fn, q, k, v, g, beta, h0, seg)
    f = jax.jit(fn)  # the ids are a traced argument
    (o, st), vjp = jax.vjp(lambda *a: f(*a, seg), q, k, v, g, beta, h0)
    do, ds = cotangents(o.shape, st.shape)
    grads = vjp((jnp.asarray(do, jnp.float32), jnp.asarray(ds, jnp.float32)))
    got = {"o": o, "state": st, **dict(zip(GRAD_NAMES, grads))}
    want = _expected(q, k, v, g, beta, h0, do, ds)
    tol_out, tol_grad = op_tolerance(impl, "f32", backend=backend, T=T)
    for name, ref in want.items():
        err = rel_err(got[name], ref)
        assert err <= (tol_out if name in ("o", "state") else tol_grad), (name, err)
    assert not np.any(np.asarray(o)[np.asarray(ROWS) == 0]), "padding tokens must output zeros"


@pytest.mark.parametrize("kw,err,match", [
    (dict(segment_ids=jnp.zeros((2, 4), jnp.float32)), TypeError, "segment_ids must be an integer"),
    (dict(segment_ids=jnp.zeros((1, 4), jnp.int32)), ValueError, r"shape \[B, T\] = \[2, 4\]"),
    (dict(segment_ids=jnp.zeros((2, 4), jnp.int32), num_snapshots=1), ValueError,
     "num_snapshots"),
], ids=["dtype", "shape", "snapshots"])
def test_segment_id_errors_name_the_argument(kw, err, match):
    args = [jnp.ones((2, 4, 1, 16))] * 3 + [jnp.zeros((2, 4, 1)), jnp.ones((2, 4, 1)) * 0.5]
    with pytest.raises(err, match=match):
        gated_delta_net(*args, **kw)
