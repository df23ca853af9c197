"""Gates and beta computed in the op (`use_gate_in_kernel`, `use_beta_sigmoid_in_kernel`):
outputs and gradients for q, k, v, a, b, the initial state, A_log and dt_bias against the
formulas and the recurrence in float64 (the chain rule through the gate written out here)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net
from helpers import assert_pallas, cotangents, numpy_vjp, op_tolerance, rel_err, slow_except

B, Hk, G, K, V = 1, 1, 2, 16, 32
Hv = Hk * G


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(x, 0.0)


def _raw_inputs(T, kda, flat_bias, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, Hk, K))
    k = rng.standard_normal((B, T, Hk, K))
    v = rng.standard_normal((B, T, Hv, V))
    a = rng.standard_normal((B, T, Hv, K) if kda else (B, T, Hv)) * 3.0 - 2.0  # large |a| too
    b = rng.standard_normal((B, T, Hv)) * 2.0
    A_log = np.log(rng.uniform(0.02, 0.2, (Hv,)))  # weak decay: the state carries over chunks
    dt_bias = rng.standard_normal((Hv * K,) if flat_bias else ((Hv, K) if kda else (Hv,))) * 0.5
    h0 = rng.standard_normal((B, Hv, K, V))
    return q, k, v, a, b, A_log, dt_bias, h0


def _expected(q, k, v, a, b, A_log, dt_bias, h0, lower_bound, do, ds):
    """float64 (o, state) and the gradients of all eight differentiable inputs."""
    kda = a.ndim == 4
    A = np.exp(A_log)[:, None] if kda else np.exp(A_log)
    bias = dt_bias.reshape(Hv, K) if kda else dt_bias
    x = a + bias
    if lower_bound is None:
        g = -A * _softplus(x)
        dg_dx, dg_dAlog = -A * _sigmoid(x), g
    else:
        s = _sigmoid(A * x)
        g = lower_bound * s
        dg_dx = lower_bound * s * (1 - s) * A
        dg_dAlog = dg_dx * x
    beta = _sigmoid(b)
    (o, st), (dq, dk, dv, dg, dbeta, dh0) = numpy_vjp(q, k, v, g, beta, h0, do, ds, l2norm=True)
    da = dg * dg_dx
    dA_log = (dg * dg_dAlog).reshape(-1, Hv, K).sum((0, 2)) if kda else (dg * dg_dAlog).reshape(-1, Hv).sum(0)
    ddt = da.reshape(-1, Hv, K).sum(0) if kda else da.reshape(-1, Hv).sum(0)
    db = dbeta * beta * (1 - beta)
    return {"o": o, "state": st, "dq": dq, "dk": dk, "dv": dv, "da": da, "db": db, "dh0": dh0,
            "dA_log": dA_log, "ddt_bias": ddt.reshape(dt_bias.shape)}


# (impl, backend, T, kda, flat dt_bias, lower_bound): every path meets GDA, KDA, both dt_bias
# layouts and the safe gate
CASES = [("recurrent", "xla", 6, False, False, None), ("chunked", "xla", 150, True, True, None),
         ("recurrent", "pallas", 6, True, False, -5.0), ("chunked", "pallas", 150, False, False, None),
         ("chunked", "xla", 150, True, False, -5.0), ("recurrent", "xla", 6, True, True, None)]


# Everyday tier: the XLA recurrent path, GDA and KDA (flat dt_bias): the chunked cases compile
# the chunked backward (KDA: over 100 s of compile on a loaded 2-core machine).
@pytest.mark.parametrize("impl,backend,T,kda,flat,lb", slow_except(CASES, 0, 5),
                         ids=[f"{c[0]}-{c[1]}-T{c[2]}-{'KDA' if c[3] else 'GDA'}"
                              f"{'-flat' if c[4] else ''}{'-lb' if c[5] else ''}" for c in CASES])
def test_gates_in_the_op_match_float64(impl, backend, T, kda, flat, lb):
    raw = _raw_inputs(T, kda, flat)
    q, k, v, a, b, A_log, dt_bias, h0 = (jnp.asarray(x, jnp.float32) for x in raw)

    def fn(q, k, v, a, b, h0, A_log, dt_bias):
        return gated_delta_net(q, k, v, a, b, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                               A_log=A_log, dt_bias=dt_bias, lower_bound=lb,
                               use_beta_sigmoid_in_kernel=True, impl=impl, backend=backend,
                               interpret=backend == "pallas")

    args = (q, k, v, a, b, h0, A_log, dt_bias)
    if backend == "pallas":
        assert_pallas(fn, *args)
    (o, st), vjp = jax.vjp(jax.jit(fn), *args)
    do, ds = cotangents(o.shape, st.shape)
    grads = vjp((jnp.asarray(do, jnp.float32), jnp.asarray(ds, jnp.float32)))
    got = {"o": o, "state": st, **dict(zip(["dq", "dk", "dv", "da", "db", "dh0", "dA_log",
                                           "ddt_bias"], grads))}
    want = _expected(*raw, lb, do, ds)
    tol_out, tol_grad = op_tolerance(impl, "f32", backend=backend, T=T)
    for name, ref in want.items():
        tol = tol_out if name in ("o", "state") else tol_grad
        assert got[name].shape == ref.shape, name
        err = rel_err(got[name], ref)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def test_gate_formulas_are_stable_for_large_inputs():
    a = jnp.asarray([[[-1e4, -50.0, 0.0, 50.0, 1e4]]], jnp.float32).reshape(1, 5, 1)
    fn = lambda a: gated_delta_net(  # noqa: E731
        jnp.ones((1, 5, 1, 16)), jnp.ones((1, 5, 1, 16)), jnp.ones((1, 5, 1, 16)), a,
        jnp.asarray([[[-1e4], [0.0], [1e4], [3.0], [-3.0]]]), use_gate_in_kernel=True,
        A_log=jnp.zeros((1,)), dt_bias=jnp.zeros((1,)), use_beta_sigmoid_in_kernel=True,
        impl="recurrent")[0].sum()
    val, grad = jax.value_and_grad(fn)(a)
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))


def _call(**kw):
    args = [jnp.ones((1, 4, 1, 16))] * 3 + [jnp.zeros((1, 4, 1)), jnp.ones((1, 4, 1)) * 0.5]
    kda = kw.pop("kda", False)
    if kda:
        args[3] = jnp.zeros((1, 4, 1, 16))
    return gated_delta_net(*args, **kw)


@pytest.mark.parametrize("kw,err,match", [
    (dict(use_gate_in_kernel=True, dt_bias=jnp.zeros((1,))), ValueError, "missing: A_log"),
    (dict(A_log=jnp.zeros((1,))), ValueError, "A_log is given but use_gate_in_kernel=False"),
    (dict(use_gate_in_kernel=True, A_log=jnp.zeros((2,)), dt_bias=jnp.zeros((1,))), ValueError,
     r"A_log must have shape \[1\]"),
    (dict(use_gate_in_kernel=True, A_log=jnp.zeros((1,)), dt_bias=jnp.zeros((1, 16))),
     ValueError, r"dt_bias must have shape \[1\] \(GDA"),
    (dict(use_gate_in_kernel=True, A_log=jnp.zeros((1,), jnp.int32), dt_bias=jnp.zeros((1,))),
     TypeError, "A_log must be a floating-point array"),
    (dict(use_gate_in_kernel=True, A_log=jnp.zeros((1,)), dt_bias=jnp.zeros((1,)),
          lower_bound=-5.0), ValueError, "lower_bound is KDA's safe gate"),
    (dict(kda=True, use_gate_in_kernel=True, A_log=jnp.zeros((1,)), dt_bias=jnp.zeros((16,)),
          lower_bound=5.0), ValueError, "lower_bound must be a finite negative float"),
    (dict(kda=True, lower_bound=-5.0), ValueError, "lower_bound is given but use_gate_in_kernel"),
    (dict(use_gate_in_kernel=1, A_log=jnp.zeros((1,)), dt_bias=jnp.zeros((1,))), TypeError,
     "use_gate_in_kernel must be a bool"),
], ids=["no-A_log", "A_log-without-flag", "A_log-shape", "dt_bias-shape", "A_log-dtype",
        "lower_bound-GDA", "lower_bound-positive", "lower_bound-without-flag", "flag-not-bool"])
def test_gate_argument_errors_name_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        _call(**kw)
