"""Properties against the reference (hypothesis), extreme values, determinism, composition."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gdn_jax import gated_delta_net, reference_gated_delta_net
from helpers import (Case, assert_close, examples_per_case, make_inputs, numpy_expected, op_tolerance,
                     op_vjp, rel_err, slow_except, tolerance, vjp_all)

IMPLS = ["recurrent", "chunked"]


def _run(case, args, h0, impl, **kw):
    return gated_delta_net(*args, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=case.l2norm, scale=case.scale, impl=impl, **kw)


@st.composite
def cases(draw, max_T=150):
    """Shapes, state and gates; the path and the mode (GDA/KDA) are parametrized outside."""
    return Case(
        group=draw(st.sampled_from([1, 2])), Hk=draw(st.sampled_from([1, 2])),
        T=draw(st.integers(1, max_T)), B=draw(st.integers(1, 2)),
        K=draw(st.sampled_from([16, 32])), V=draw(st.sampled_from([16, 48])),
        h0=draw(st.booleans()), l2norm=draw(st.booleans()),
        gmin=-draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 30.0])))




def paths_and_modes(impls, *everyday):
    """impl x mode params (ids "impl-GDA" / "impl-KDA"); the (impl, kda) pairs in `everyday` run
    in the everyday tier, the others are slow."""
    return pytest.mark.parametrize("impl,kda", [
        pytest.param(impl, kda, id=f"{impl}-{'KDA' if kda else 'GDA'}",
                     marks=() if (impl, kda) in everyday else pytest.mark.slow)
        for impl in impls for kda in (False, True)])

# The strongest draw, run on every path and mode in every profile: three chunks (the last
# ragged), grouped heads, an initial state, gates down to -30.
WIDE = Case(group=2, Hk=1, T=150, B=1, K=32, V=16, h0=True, l2norm=True, gmin=-30.0)


@paths_and_modes(IMPLS, ("recurrent", False), ("chunked", False))
@examples_per_case(4)
@given(case=cases(), seed=st.integers(0, 2**16))
@example(case=WIDE, seed=0)
def test_random_shapes_and_gates_match_reference(impl, kda, case, seed):
    case = case._replace(kda=kda)
    args, h0 = make_inputs(case, seed)
    o, s = _run(case, args, h0, impl)
    o_ref, s_ref = _run(case, args, h0, "reference")
    tol = tolerance(impl)[0]
    assert rel_err(o, o_ref) < tol and rel_err(s, s_ref) < tol


@paths_and_modes(IMPLS, ("chunked", False))
@examples_per_case(4)
@given(case=cases(max_T=140), split=st.integers(1, 139))
@example(case=WIDE._replace(T=140, gmin=-0.1), split=70)  # weak gates: the state matters
def test_chaining_two_calls_equals_one(impl, kda, case, split):
    """Tokens [0, t) then [t, T) from the returned state equal one call on [0, T)."""
    case = case._replace(kda=kda)
    if case.T < 2:
        case = case._replace(T=2)
    t = min(split, case.T - 1)
    args, h0 = make_inputs(case)
    o, s = _run(case, args, h0, impl)
    first = tuple(x[:, :t] for x in args)
    second = tuple(x[:, t:] for x in args)
    o1, s1 = _run(case, first, h0, impl)
    o2, s2 = _run(case, second, s1, impl)
    tol = tolerance(impl)[0]
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < tol
    assert rel_err(s2, s) < tol


EXTREMES = [("g=0", 0.0, None), ("g=-1e4", -1e4, None), ("beta=0", None, 0.0), ("beta=1", None, 1.0)]


@paths_and_modes(["reference", *IMPLS], ("recurrent", True))
def test_extreme_gates_match_float64(kda, impl):
    """g = 0, g = -1e4, beta = 0, beta = 1 with l2norm: outputs and all six gradients finite and
    equal to float64 numpy, at the tolerance of the path whose backward serves the call."""
    # recurrent at T = 8, where its backward is its own (above, it is the chunked backward)
    case = Case(kda=kda, T=8 if impl == "recurrent" else 70, K=16, V=16, h0=True, l2norm=True,
                group=2)
    args, h0 = make_inputs(case)
    fn = jax.jit(lambda *a: gated_delta_net(*a[:5], initial_state=a[5], output_final_state=True,
                                            use_qk_l2norm_in_kernel=True, impl=impl))
    tol_out, tol_grad = op_tolerance(impl, T=case.T)
    for name, gval, bval in EXTREMES:  # one compiled function serves all four
        q, k, v, g, beta = args
        if gval is not None:
            g = jnp.full_like(g, gval)
        if bval is not None:
            beta = jnp.full_like(beta, bval)
        got, cots = op_vjp(fn, (q, k, v, g, beta), h0)
        for n, x in got.items():
            assert bool(jnp.all(jnp.isfinite(x))), (name, n)
        want = numpy_expected((q, k, v, g, beta), h0, cots, l2norm=True)
        assert_close(got, want, tol_out, tol_grad, f"{impl} {case} {name}")


@pytest.mark.slow  # the chunked backward at -20 / -30 runs everyday in test_chunked_internals.py
@pytest.mark.parametrize("kda", [False, True])
def test_strong_decay_gradients_are_accurate(kda):
    """g = -20 per token: dg is tiny and must not drown in cancellation (docs/spec.md section 4.4)."""
    case = Case(kda=kda, T=100, K=16, V=16, h0=True, l2norm=True)
    args, h0 = make_inputs(case)
    args = args[:3] + (jnp.full_like(args[3], -20.0),) + args[4:]

    def fn(impl):
        return jax.jit(lambda *a: gated_delta_net(*a[:5], initial_state=a[5], output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True, impl=impl))

    _, ref = vjp_all(fn("reference"), args, h0)
    # at T = 100 the recurrent impl's backward is the chunked one: one check covers both
    for impl in ("chunked",):
        _, got = vjp_all(fn(impl), args, h0)
        for name, a, b in zip("q k v g beta h0".split(), got, ref):
            assert rel_err(a, b) < 1e-4, (impl, name, rel_err(a, b))


@pytest.mark.parametrize("impl,T", slow_except([("recurrent", 8), ("chunked", 80)], 0))
def test_two_runs_are_bitwise_equal(impl, T):
    case = Case(kda=True, T=T, K=32, V=16, h0=True, group=2)
    args, h0 = make_inputs(case)
    fn = jax.jit(lambda *a: gated_delta_net(*a[:5], initial_state=a[5], output_final_state=True,
                                            impl=impl))
    r1 = vjp_all(fn, args, h0)
    r2 = vjp_all(fn, args, h0)
    for a, b in zip(jax.tree.leaves(r1), jax.tree.leaves(r2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("impl,kda", slow_except([("recurrent", True), ("chunked", False)], 0))
def test_vmap_over_an_extra_leading_axis(impl, kda):
    cases = [Case(T=20, K=16, V=16, h0=True, kda=kda)]
    args, h0 = make_inputs(cases[0], 0)
    args2, h02 = make_inputs(cases[0], 1)
    stacked = [jnp.stack([a, b]) for a, b in zip(args + (h0,), args2 + (h02,))]

    def one(q, k, v, g, b, s):
        return gated_delta_net(q, k, v, g, b, initial_state=s, output_final_state=True, impl=impl)

    o, s = jax.jit(jax.vmap(one))(*stacked)
    for i, (a, h) in enumerate([(args, h0), (args2, h02)]):
        o_i, s_i = one(*a, h)
        assert rel_err(o[i], o_i) < 1e-6 and rel_err(s[i], s_i) < 1e-6
    # and gradients through vmap
    gv = jax.jit(jax.grad(lambda *x: jnp.sum(jax.vmap(one)(*x)[0] ** 2), argnums=(0, 3, 5)))(*stacked)
    g0 = jax.jit(jax.grad(lambda *x: jnp.sum(one(*x)[0] ** 2), argnums=(0, 3, 5)))(*args, h0)
    for a, b in zip(gv, g0):
        assert rel_err(a[0], b) < 1e-5


@pytest.mark.slow
def test_checkpointed_layer_gradients():
    """jax.checkpoint around a layer that calls the op, under jit and grad."""
    case = Case(T=70, K=16, V=16, group=2, l2norm=True)
    (q, k, v, g, beta), _ = make_inputs(case)
    w = jnp.eye(16) * 0.9

    def layer(w, x):
        o, _ = gated_delta_net(x @ w, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        return o

    def loss(w, remat):
        f = jax.checkpoint(layer) if remat else layer
        return jnp.sum(f(w, q) ** 2)

    g_remat = jax.jit(jax.grad(lambda w: loss(w, True)))(w)
    g_plain = jax.grad(lambda w: loss(w, False))(w)

    def ref_loss(w):
        o, _ = reference_gated_delta_net(q @ w, k, v, g, beta, jnp.zeros((1, 2, 16, 16)),
                                         scale=0.25, use_qk_l2norm=True)
        return jnp.sum(o ** 2)

    g_ref = jax.grad(ref_loss)(w)
    assert rel_err(g_remat, g_ref) < 1e-4 and rel_err(g_plain, g_ref) < 1e-4


def test_decode_step_updates_a_donated_state_in_place():
    """One jitted decode step of the recurrent path aliases the donated state buffer."""
    case = Case(T=1, B=4, K=32, V=32, group=2, Hk=2, h0=True, l2norm=True)
    args, h0 = make_inputs(case)

    def step(state, q, k, v, g, b):
        return gated_delta_net(q, k, v, g, b, initial_state=state, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, impl="recurrent", backend="xla")

    compiled = jax.jit(step, donate_argnums=0).lower(h0, *args).compile()
    text = compiled.as_text()
    # the state parameter (0) is aliased to the state output (tuple index 1)
    assert "input_output_alias={ {1}: (0, {}, may-alias) }" in text, text[:2000]
    o, s = compiled(h0.copy(), *args)
    o_ref, s_ref = reference_gated_delta_net(*args, h0, scale=32 ** -0.5, use_qk_l2norm=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_no_initial_state_and_no_final_state():
    case = Case(T=9, K=16, V=16)
    args, _ = make_inputs(case)
    o, s = gated_delta_net(*args, use_qk_l2norm_in_kernel=True)
    assert s is None
    o_ref, _ = reference_gated_delta_net(*args, jnp.zeros((1, 1, 16, 16)), scale=0.25, use_qk_l2norm=True)
    assert rel_err(o, o_ref) < 1e-5
    # gradients without any state at all
    gq = jax.grad(lambda q: jnp.sum(gated_delta_net(q, *args[1:], impl="chunked")[0]))(args[0])
    assert bool(jnp.all(jnp.isfinite(gq)))


def test_state_layout_vk_is_the_transpose():
    case = Case(T=5, K=16, V=32, h0=True)
    args, h0 = make_inputs(case)
    o, s = gated_delta_net(*args, initial_state=h0, output_final_state=True)
    o2, s2 = gated_delta_net(*args, initial_state=jnp.swapaxes(h0, -1, -2), output_final_state=True,
                             state_layout="vk")
    # The XLA paths contract each layout where it lies (no transpose), so the summation order
    # differs: equal within float32 rounding, not bit for bit.
    np.testing.assert_allclose(np.asarray(o2), np.asarray(o), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s2), np.asarray(jnp.swapaxes(s, -1, -2)), rtol=1e-5,
                               atol=1e-6)


def test_zero_length_sequence_passes_the_state_through():
    case = Case(T=0, K=16, V=16, h0=True)
    args, h0 = make_inputs(case)
    o, s = gated_delta_net(*args, initial_state=h0, output_final_state=True)
    assert o.shape == (1, 0, 1, 16)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(h0))
