"""Weak decay and eps-scale l2norm rows on every path of the public op, against float64 numpy.

With gates from U[-2, 0] a 64-token chunk decays the carried state by e^-64, so the state
handed from chunk to chunk, and every gradient that flows through it, is invisible to a
float32 comparison. Here g lies in [-0.1, 0] with some heads at g = 0 exactly and some tokens
at beta = 1 (or 0) (helpers.weak_gates), over T = 200 tokens: three full 64-token chunks and a
ragged one. Rows of q and k with norm ~sqrt(eps) and exactly zero (helpers.l2edge_rows) make
the l2norm's eps matter: `x / (||x|| + eps)` instead of `x * rsqrt(||x||^2 + eps)` is off by
tens of percent there. Outputs, final states and all six gradients are compared with the
float64 numpy recurrence and its hand-written VJP (helpers.numpy_vjp), itself checked against
finite differences below.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net
from gdn_jax.api import RECURRENT_BWD_MAX_T
from helpers import (GRAD_NAMES, Case, assert_close, assert_pallas, make_inputs, numpy_expected,
                     numpy_reference, numpy_vjp, op_tolerance, op_vjp, pairwise, slow_except)

T = 200  # 3 full chunks of 64 and a ragged one of 8
# packed: a short sequence, an empty one, and 3 full chunks + 1 token
LENS = {T: (7, 0, 193), RECURRENT_BWD_MAX_T: (3, 0, 5)}

PATHS = [("reference", "xla"), ("recurrent", "xla"), ("chunked", "xla"),
         ("recurrent", "pallas"), ("chunked", "pallas")]

AXES = {
    "path": PATHS,
    "kda": [False, True],
    "heads": [(2, 1), (1, 2)],  # (Hk, Hv // Hk)
    "packed": [False, True],
    "h0": [False, True],
    "qk": ["l2edge", "raw"],  # l2norm on (normal, eps-scale and zero rows) or off (unit keys)
    "KV": [(16, 32), (32, 16)],
}
ROWS = pairwise(AXES, seed=5)  # seed 5: 11 rows, two on the (slowest to compile) XLA chunked path
# Everyday tier (tests/mutants.md names each as the selection of a planted bug):
# - 1 reference-xla-GDA-H1x2-K32V16-raw-packed: packed sequences, each from its own state
#   (the segment-start reset), an empty one, 3 full chunks + 1 token (packed-reset);
# - 3 chunked-pallas-GDA-H2x1-K32V16-raw-h0: the Pallas chunked forward and backward over
#   three full chunks and a ragged one, the carried state's gradients, dg's carry term
#   exp(G_last) sum(S * dH) (pallas-dg-carry), h0, two q/k heads, B = 2;
# - 4 recurrent-xla-GDA-H1x2-K16V32-l2edge: rows of norm ~sqrt(eps) and zero through the
#   l2norm (l2norm-eps), the XLA recurrent forward over T = 200, its own backward.
# The other rows (the XLA chunked ones, the dearest, and the Pallas KDA ones): full suite only.
EVERYDAY_ROWS = (1, 3, 4)


def _row_id(row) -> str:
    impl, backend = row["path"]
    Hk, G = row["heads"]
    return (f"{impl}-{backend}-{'KDA' if row['kda'] else 'GDA'}-H{Hk}x{G}-K{row['KV'][0]}"
            f"V{row['KV'][1]}-{row['qk']}{'-packed' if row['packed'] else ''}"
            f"{'-h0' if row['h0'] else ''}")


def _op(impl, backend, *, l2norm, cu=None, scale=None):
    def f(q, k, v, g, beta, h0):
        return gated_delta_net(q, k, v, g, beta, scale=scale, initial_state=h0,
                               output_final_state=True, use_qk_l2norm_in_kernel=l2norm,
                               cu_seqlens=cu, impl=impl, backend=backend,
                               interpret=backend == "pallas")
    return f


def _check(impl, backend, case: Case, *, packed: bool, grads: bool = True, seed: int = 0):
    args, h0 = make_inputs(case, seed)
    lens = LENS[case.T]
    cu = jnp.asarray(np.cumsum((0,) + lens), jnp.int32) if packed else None
    N = len(lens) if packed else case.B
    if packed and case.h0:
        h0 = jnp.asarray(np.random.default_rng(seed + 3).standard_normal(
            (N, case.Hv, case.K, case.V)), jnp.float32)
    fn = _op(impl, backend, l2norm=case.l2norm, cu=cu)
    h = jnp.zeros((N, case.Hv, case.K, case.V), jnp.float32) if h0 is None else h0
    if backend == "pallas":
        assert_pallas(fn, *args, h)  # the forward, and the backward below
        fwd_calls = str(jax.make_jaxpr(fn)(*args, h)).count("pallas_call")
        loss = lambda *a: jnp.sum(fn(*a)[0]) + jnp.sum(fn(*a)[1])  # noqa: E731
        bwd = str(jax.make_jaxpr(jax.grad(loss, argnums=tuple(range(6))))(*args, h))
        assert bwd.count("pallas_call") > fwd_calls, "the backward fell back to XLA"
    cu_np = None if cu is None else np.asarray(cu)
    tol_out, tol_grad = op_tolerance(impl, case.dtype, backend=backend, T=case.T)
    what = f"{impl}/{backend} {case}"
    if not grads:
        o, s = jax.jit(fn)(*args, h)
        o64, s64 = numpy_reference(*args, h0, l2norm=case.l2norm, cu_seqlens=cu_np)
        return assert_close({"o": o, "state": s}, {"o": o64, "state": s64}, tol_out, tol_grad, what)
    got, cots = op_vjp(jax.jit(fn), args, h0, N=N)
    want = numpy_expected(args, h0, cots, l2norm=case.l2norm, cu_seqlens=cu_np)
    return assert_close(got, want, tol_out, tol_grad, what)


@pytest.mark.parametrize("row", slow_except(ROWS, *EVERYDAY_ROWS), ids=_row_id)
def test_weak_decay_matches_float64(row):
    impl, backend = row["path"]
    Hk, G = row["heads"]
    K, V = row["KV"]
    case = Case(kda=row["kda"], Hk=Hk, group=G, T=T, B=1 if row["packed"] else 2, K=K, V=V,
                h0=row["h0"], l2norm=row["qk"] != "raw", l2edge=row["qk"] == "l2edge", weak=True)
    if (impl, backend) != ("recurrent", "xla"):
        _check(impl, backend, case, packed=row["packed"])
        return
    # Above RECURRENT_BWD_MAX_T tokens the XLA recurrent call's backward is the XLA chunked
    # backward on the same saved inputs (the chunked rows check it): here the forward over
    # T tokens, and the recurrent path's own backward (at its tolerance) where it serves.
    _check(impl, backend, case, packed=row["packed"], grads=False)
    _check(impl, backend, case._replace(T=RECURRENT_BWD_MAX_T), packed=row["packed"])


def test_every_path_meets_every_axis_value():
    """The pairwise rows put each path with KDA and GDA, packing, eps-scale rows and groups."""
    for path in PATHS:
        mine = [r for r in ROWS if r["path"] == path]
        for axis in ("kda", "packed", "qk", "heads"):
            assert {repr(r[axis]) for r in mine} == {repr(x) for x in AXES[axis]}, (path, axis)


def test_weak_decay_inputs_carry_the_state_across_chunks():
    """The inputs do what they are for: the state at the end of a 64-token chunk still carries
    the initial state (no chunk decays it below 1e-3), g = 0 heads and beta = 1 tokens exist."""
    case = Case(kda=True, Hk=1, group=4, T=T, K=16, V=16, h0=True, weak=True)
    args, h0 = make_inputs(case)
    g, beta = np.asarray(args[3]), np.asarray(args[4])
    assert np.all(g[:, :, 0] == 0) and np.all(g >= -0.1)
    assert np.any(beta == 1.0) and np.any(beta == 0.0)
    assert np.exp(g[:, :64].sum(1)).min() > 1e-3
    # the final state depends on h0 (it would not with strong decay)
    _, s = numpy_reference(*args, h0, l2norm=True)
    _, s0 = numpy_reference(*args, None, l2norm=True)
    assert np.linalg.norm(s - s0) > 1e-2 * np.linalg.norm(s)


@pytest.mark.parametrize("case", [
    Case(kda=True, Hk=2, group=2, T=11, B=2, K=8, V=4, h0=True, weak=True, l2edge=True),
    Case(kda=False, Hk=1, group=3, T=9, K=8, V=8, h0=True, l2norm=False, scale=0.4, gmin=-110.0),
], ids=str)
def test_numpy_vjp_matches_finite_differences(case):
    """The oracle's hand-written backward against central differences of its forward, in
    float64 along a random direction per input (also through clamped gates, g < -104)."""
    args, h0 = make_inputs(case)
    x64 = [np.asarray(a, np.float64) for a in args] + [np.asarray(h0, np.float64)]
    rng = np.random.default_rng(5)
    do = rng.standard_normal(args[2].shape)
    ds = rng.standard_normal(h0.shape)
    _, grads = numpy_vjp(*x64, do, ds, scale=case.scale, l2norm=case.l2norm)

    def loss(xs):
        o, s = numpy_reference(*xs, scale=case.scale, l2norm=case.l2norm)
        return (o * do).sum() + (s * ds).sum()

    for i, name in enumerate(GRAD_NAMES):
        d = rng.standard_normal(x64[i].shape)
        eps = 1e-7 if case.l2edge else 1e-5  # rows of norm 1e-3 curve on a 1e-3 scale
        hi = list(x64)
        lo = list(x64)
        hi[i], lo[i] = x64[i] + eps * d, x64[i] - eps * d
        fd = (loss(hi) - loss(lo)) / (2 * eps)
        analytic = float((grads[i] * d).sum())
        assert abs(fd - analytic) <= 1e-6 * max(abs(analytic), 1.0), (name, fd, analytic)
