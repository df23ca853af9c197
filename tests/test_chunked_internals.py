"""Focused tests of what only the XLA chunked path knows: the exp-argument rule under strong
KDA decay, the exactly-one decay factors (dg at g = -20), ragged-chunk padding and the YNN
crash work-around. Small shapes; the broad accuracy suite lives elsewhere."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax.chunked import chunked_gated_delta_net
from gdn_jax.reference import reference_gated_delta_net


def _rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _inputs(seed, T, Hk, Hv, K, V, kda, g_value=None, g_min=-30.0):
    """Raw q/k ~ N(0, 1): the tests run with l2norm on (contractive) unless they say otherwise."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(ks[0], (1, T, Hk, K))
    k = jax.random.normal(ks[1], (1, T, Hk, K))
    v = jax.random.normal(ks[2], (1, T, Hv, V))
    gshape = (1, T, Hv, K) if kda else (1, T, Hv)
    if g_value is None:
        g = jax.random.uniform(ks[3], gshape, minval=g_min, maxval=0.0)
    else:
        g = jnp.full(gshape, g_value)
    beta = jax.random.uniform(ks[4], (1, T, Hv))
    S0 = 0.5 * jax.random.normal(ks[5], (1, Hv, K, V))
    return q, k, v, g, beta, S0


_JITTED = {}


def _vjp_fn(which, l2):
    # One jitted function per (impl, l2) so tests with equal shapes share the compilation.
    key = (which, l2)
    if key not in _JITTED:
        f = chunked_gated_delta_net if which == "chunked" else reference_gated_delta_net

        def run(q, k, v, g, beta, S0, ct_o, ct_s):
            out, vjp = jax.vjp(lambda *a: f(*a, scale=0.25, use_qk_l2norm=l2), q, k, v, g, beta, S0)
            return out, vjp((ct_o, ct_s))
        _JITTED[key] = jax.jit(run)
    return _JITTED[key]


def _vjp_both(args, l2=True):
    """Outputs and all six gradients (random cotangents on o and S) for chunked and reference."""
    v, S0 = args[2], args[5]
    c1, c2 = jax.random.split(jax.random.PRNGKey(7))
    cts = (jax.random.normal(c1, v.shape), jax.random.normal(c2, S0.shape))
    return [_vjp_fn(w, l2)(*args, *cts) for w in ("chunked", "reference")]


def _assert_all_close(res, tol):
    (o, s), grads = res[0]
    (o_ref, s_ref), grads_ref = res[1]
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dS0"]
    vals = [o, s, *grads]
    refs = [o_ref, s_ref, *grads_ref]
    for name, x, r in zip(names, vals, refs):
        assert np.isfinite(np.asarray(x)).all(), name
        assert _rel(x, r) <= tol, (name, _rel(x, r))


# Shared shapes (one compilation each): two chunks, ragged (front-padded), grouped heads
# Hv = 2 Hk (with KDA this shape crashes XLA's YNN fusion in jaxlib 0.10.2 when a factor is broadcast
# over the row-kind axis: docs/xla_chunked_notes.md, item 4).
KDA_SHAPE = dict(T=80, Hk=2, Hv=4, K=16, V=16, kda=True)
GDA_SHAPE = dict(T=80, Hk=2, Hv=4, K=16, V=8, kda=False)


@pytest.mark.parametrize("g_value", [-30.0, -1000.0])
def test_kda_strong_decay_finite_and_accurate(g_value):
    # Per-token KDA gates of -30 (and far below: clamped): one reference token per sub-block
    # or per chunk would overflow exp(); the sub-block rule must stay finite and accurate.
    # None: random gates in [-30, 0] per token and channel.
    args = _inputs(0, g_value=g_value, **KDA_SHAPE)
    _assert_all_close(_vjp_both(args), 1e-4)


@pytest.mark.parametrize("n", [16, 64])
def test_kda_pairs_match_float64_pairwise_sums(n):
    # _pairs' three levels (16-token sub-blocks and 4-token blocks through boundary tokens, exact
    # pairs inside 4-token blocks) against the direct float64 sums, gates in [-30, 0] per token
    # and channel (G falls to about -1000 in a chunk: no exp argument may be positive).
    from gdn_jax.chunked import _pairs
    rng = np.random.default_rng(5)
    K = 8
    xs = rng.standard_normal((3, 2, n, K)).astype(np.float32)
    k = xs[:, 0]
    G = np.cumsum(rng.uniform(-30.0, 0.0, (3, n, K)), axis=1).astype(np.float32)
    got = np.asarray(jax.jit(_pairs)(jnp.asarray(xs), jnp.asarray(k), jnp.asarray(G)))
    assert np.isfinite(got).all()
    x64, k64, G64 = (a.astype(np.float64) for a in (xs, k, G))
    decay = np.exp(np.minimum(G64[:, :, None, :] - G64[:, None, :, :], 0.0))        # [3, i, j, K]
    want = np.einsum("bxid,bjd,bijd->bxij", x64, k64, decay) * np.tril(np.ones((n, n)), -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_gda_mixed_gates():
    args = _inputs(1, **GDA_SHAPE)
    _assert_all_close(_vjp_both(args), 1e-4)


@pytest.mark.parametrize("kda", [False, True])
def test_exactly_one_factors_dg_at_minus_20(kda):
    # At g = -20 the true dg is tiny; exp(G_i - G_i) inside the differentiated path would give
    # float32 noise. With the constants the chunked dg matches the reference's autodiff closely.
    args = _inputs(2, g_value=-20.0, **(KDA_SHAPE if kda else GDA_SHAPE))
    (_, g_chunk), (_, g_ref) = _vjp_both(args)
    assert _rel(g_chunk[3], g_ref[3]) < 3e-6


def test_gate_exactly_zero_gradient():
    # g == 0 exactly makes every in-chunk difference G_i - G_j zero; no tie-splitting (min/max)
    # may halve the gate gradient there.
    args = _inputs(3, g_value=0.0, **GDA_SHAPE)
    (_, g_chunk), (_, g_ref) = _vjp_both(args)
    assert _rel(g_chunk[3], g_ref[3]) < 1e-5


@pytest.mark.slow
def test_front_padding_is_invisible():
    # A ragged T is padded at the front with g = beta = q = k = v = 0. Doing that by hand (to
    # the next multiple of 64) must give the same outputs and, on the real tokens, the same
    # gradients (KDA: the path with the most structure).
    args = _inputs(4, **KDA_SHAPE)
    pad = 128 - KDA_SHAPE["T"]
    padded = [jnp.pad(x, [(0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 2)) for x in args[:5]]
    c1, c2 = jax.random.split(jax.random.PRNGKey(7))
    ct_o, ct_s = jax.random.normal(c1, args[2].shape), jax.random.normal(c2, args[5].shape)
    (o1, s1), d1 = _vjp_fn("chunked", True)(*args, ct_o, ct_s)
    ct_o = jnp.pad(ct_o, [(0, 0), (pad, 0), (0, 0), (0, 0)])
    (o2, s2), d2 = _vjp_fn("chunked", True)(*padded, args[5], ct_o, ct_s)
    np.testing.assert_allclose(o1, o2[:, pad:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)
    for a, b in zip(d1[:5], d2[:5]):
        np.testing.assert_allclose(a, b[:, pad:], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d1[5], d2[5], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_sequence_small_chunk():
    # T < 64 uses one chunk of T rounded up to 16 (here 32, front-padded by 15).
    args = _inputs(6, T=17, Hk=2, Hv=4, K=16, V=8, kda=False)
    _assert_all_close(_vjp_both(args, l2=False), 1e-4)


def test_chunk_size_must_be_multiple_of_16():
    args = _inputs(9, T=8, Hk=1, Hv=1, K=16, V=16, kda=False)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_gated_delta_net(*args, scale=0.25, chunk_size=40)
