"""Every path of the public op against the scan reference, and the reference against float64 numpy."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import RECURRENT_MAX_T, gated_delta_net, reference_gated_delta_net
from gdn_jax.api import RECURRENT_BWD_MAX_T
from helpers import (Case, assert_close, assert_no_pallas, assert_pallas, make_inputs, numpy_expected,
                     numpy_reference, op_tolerance, op_vjp, pairwise, rel_err, slow_except, tolerance,
                     vjp_all)

# Every value of every axis below, combined pairwise (not as a full product).
AXES = {
    "kda": [False, True],
    "group": [1, 2, 4],
    "Hk": [1, 2],
    "T": [1, 7, 64, 65, 200],  # 65: a ragged last chunk (front padding of 63)
    "B": [1, 3],
    "K": [16, 64, 128],
    "V": [16, 64, 128],
    "h0": [False, True],
    "l2norm": [False, True],
    "scale": [None, 0.3],
    "dtype": ["f32", "bf16", "f16"],
}


CASES = [Case(**row) for row in pairwise(AXES)]


@functools.lru_cache(maxsize=None)
def _reference_run(case: Case):
    """float32 reference on the same (possibly low-precision-rounded) inputs: o, state, grads."""
    args, h0 = make_inputs(case)
    args32 = tuple(x.astype(jnp.float32) for x in args)
    fn = jax.jit(lambda q, k, v, g, b, s: reference_gated_delta_net(
        q, k, v, g, b, s, scale=case.scale or case.K ** -0.5, use_qk_l2norm=case.l2norm))
    return vjp_all(fn, args32, h0)


def _op(case: Case, **kw):
    def fn(q, k, v, g, b, s):
        return gated_delta_net(q, k, v, g, b, scale=case.scale, initial_state=s,
                               output_final_state=True, use_qk_l2norm_in_kernel=case.l2norm, **kw)
    return jax.jit(fn)


def check_against_reference(case: Case, impl: str, tol_impl: str | None = None, *,
                            grads: bool = True, **kw):
    args, h0 = make_inputs(case)
    (o_ref, s_ref), grads_ref = _reference_run(case)
    if not grads:
        o, s = _op(case, impl=impl, **kw)(*args, h0)
        tol_out, _ = tolerance(tol_impl or impl, case.dtype)
        errs = {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref)}
        assert max(errs.values()) <= tol_out, f"{case} impl={impl}: {errs}"
        return
    (o, s), grads = vjp_all(_op(case, impl=impl, **kw), args, h0)
    assert o.dtype == args[0].dtype and o.shape == o_ref.shape
    assert s.dtype == jnp.float32
    # gradients at the tolerance of the path whose backward serves the call
    tol_out, tol_grad = op_tolerance(tol_impl or impl, case.dtype, backend=kw.get("backend", "xla"),
                                     T=case.T)
    errs = {"o": rel_err(o, o_ref), "state": rel_err(s, s_ref)}
    for name, gx, gr, x in zip("q k v g beta h0".split(), grads, grads_ref, args + (None,)):
        if x is not None:
            assert gx.dtype == x.dtype, (name, gx.dtype, x.dtype)
        errs["d" + name] = rel_err(gx, gr)
    bad = {n: e for n, e in errs.items() if not e <= (tol_out if n in ("o", "state") else tol_grad)}
    assert not bad, f"{case} impl={impl}: errors over tolerance {bad} (all: {errs})"


# Everyday tier: the recurrent path on KDA (T = 7, grouped, f16, h0, scale; gradients through its
# own backward) and the chunked path on GDA (T = 65: a ragged chunk, grouped, bf16, h0, l2norm).
EVERYDAY_OP = {("recurrent", 4), ("chunked", 16)}


@pytest.mark.parametrize("case,impl", [
    pytest.param(case, impl, id=f"{case}-{impl}",
                 marks=() if (impl, i) in EVERYDAY_OP else pytest.mark.slow)
    for impl in ("recurrent", "chunked") for i, case in enumerate(CASES)])
def test_impl_matches_reference(case, impl):
    # Above RECURRENT_BWD_MAX_T the recurrent impl's backward IS the chunked backward (the same
    # function on the same saved inputs), checked by the chunked row of this case: compiling it
    # twice would only spend CI time, so those recurrent rows check the forward.
    grads = impl == "chunked" or case.T <= RECURRENT_BWD_MAX_T
    check_against_reference(case, impl, backend="xla", grads=grads)


@pytest.mark.parametrize("T", [2, RECURRENT_MAX_T, RECURRENT_MAX_T + 1])
def test_auto_picks_recurrent_for_short_and_chunked_for_long_T(T):
    case = Case(T=T, K=16, V=16, h0=True, group=2)
    args, h0 = make_inputs(case)
    run = functools.partial(gated_delta_net, *args, initial_state=h0, output_final_state=True)
    auto = run(impl="auto")
    want, other = ("recurrent", "chunked") if T <= RECURRENT_MAX_T else ("chunked", "recurrent")
    for a, b in zip(auto, run(impl=want)):  # bitwise: the same path ran
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(auto[0]), np.asarray(run(impl=other)[0]))


REF_CASES = [Case(), Case(kda=True, group=2, T=9, B=2, K=16, V=8, h0=True, l2norm=False, scale=0.5),
             Case(group=4, T=20, K=32, V=16, h0=True, gmin=-30.0),
             Case(kda=True, T=12, K=8, V=24, gmin=-30.0)]


@pytest.mark.parametrize("case", slow_except(REF_CASES, 0, 1), ids=str)
def test_reference_matches_float64_numpy(case):
    args, h0 = make_inputs(case)
    o, s = reference_gated_delta_net(*args, jnp.zeros((case.B, case.Hv, case.K, case.V)) if h0 is None else h0,
                                     scale=case.scale or case.K ** -0.5, use_qk_l2norm=case.l2norm)
    o64, s64 = numpy_reference(*args, h0, scale=case.scale, l2norm=case.l2norm)
    tol = tolerance("reference")[0]
    assert rel_err(o, o64) < tol
    assert rel_err(s, s64) < tol


@pytest.mark.parametrize("impl", slow_except(["reference", "recurrent", "chunked"], 0, 1))
def test_public_op_matches_float64_numpy(impl):
    case = Case(kda=True, group=2, T=70, B=2, K=16, V=32, h0=True, Hk=2, gmin=-5.0)
    args, h0 = make_inputs(case)
    o, s = gated_delta_net(*args, initial_state=h0, output_final_state=True, impl=impl,
                           use_qk_l2norm_in_kernel=True)
    o64, s64 = numpy_reference(*args, h0, l2norm=True)
    tol = tolerance(impl)[0]
    assert rel_err(o, o64) < tol and rel_err(s, s64) < tol


PALLAS_CASES = [
    ("recurrent", Case(kda=True, group=2, T=9, K=16, V=32, h0=True, dtype="bf16")),
    ("recurrent", Case(T=70, K=32, V=16, B=2, l2norm=False, scale=0.3)),  # backward on the Pallas chunked kernels
    ("chunked", Case(group=2, T=70, K=16, V=32, h0=True)),
    ("chunked", Case(T=33, K=32, V=32, B=2, dtype="f16", l2norm=False)),
]


# Everyday tier: the chunked kernels (GDA, grouped, two chunks: the carried state). The
# recurrent kernel and the KDA chunked kernels run everyday in their own modules.
@pytest.mark.parametrize("impl,case", slow_except(PALLAS_CASES, 2),
                         ids=[f"{i}-{c}" for i, c in PALLAS_CASES])
def test_public_op_on_pallas_kernels_in_interpret_mode(impl, case):
    """The op's custom_vjp around the Pallas kernels: forward and all six gradients."""
    args, h0 = make_inputs(case)
    h = h0 if h0 is not None else jnp.zeros((case.B, case.Hv, case.K, case.V))
    assert_pallas(jax.grad(lambda *a: jnp.sum(_op(case, impl=impl, backend="pallas", interpret=True)(*a)[0]),
                           argnums=(0, 5)), *args, h)
    check_against_reference(case, impl, backend="pallas", interpret=True)


def test_auto_backend_falls_back_where_a_kernel_declines():
    """KDA at K = 256 has no Pallas chunked kernel: backend="auto" runs XLA, "pallas" raises.
    The fallback's program has no pallas_call, and its numbers are those of the XLA path."""
    case = Case(kda=True, T=70, K=256, V=16)
    args, _ = make_inputs(case)
    fn = lambda *a, **kw: gated_delta_net(*a, impl="chunked", interpret=True, **kw)  # noqa: E731
    assert_no_pallas(fn, *args)
    with pytest.raises(ValueError, match='backend="pallas" cannot serve impl="chunked"'):
        jax.make_jaxpr(lambda *a: fn(*a, backend="pallas"))(*args)
    o, _ = jax.jit(fn)(*args)
    o64, _ = numpy_reference(*args, l2norm=False)
    assert rel_err(o, o64) < tolerance("chunked")[0]
    # and a head size no kernel supports falls back too, forward and gradients
    case = Case(T=5, K=24, V=16, h0=True)
    args, h0 = make_inputs(case)
    rec = lambda *a: gated_delta_net(*a[:5], initial_state=a[5], output_final_state=True,  # noqa: E731
                                     impl="recurrent", interpret=True, use_qk_l2norm_in_kernel=True)
    assert_no_pallas(rec, *args, h0)
    got, cots = op_vjp(jax.jit(rec), args, h0)
    assert_close(got, numpy_expected(args, h0, cots, l2norm=True),
                 *op_tolerance("recurrent", T=case.T), "recurrent fallback at K=24")
