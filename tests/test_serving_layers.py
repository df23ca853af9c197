"""The serving step of the layers (`gdn_block` / `kda_block` with a `ServingBatch`): prefill and
decode requests packed along the token axis, each reading and writing its own slot of the
conv-state and recurrent-state pools, equal per request to the non-pooled blocks on that
request alone; untouched slots bit-identical; padding zero."""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import layers
from helpers import rel_err, slow_except

GDN_CFG = layers.GatedDeltaNetConfig(hidden_size=32, num_k_heads=2, num_v_heads=4, head_k_dim=16,
                                     head_v_dim=8)
KDA_CFG = layers.KimiDeltaAttentionConfig(hidden_size=32, num_heads=2, head_dim=16)
P = 6
# (length, slot, has_initial_state): a decode, a fresh prefill in a recycled slot (its slot holds
# NaN: it must not be read), a continued prefill, a decode, a request shorter than the conv
# width that continues from its state, and a padding request; 2 padding tokens follow.
REQUESTS = [(1, 4, True), (9, 2, False), (5, 0, True), (1, 1, True), (2, 5, True), (3, -1, True)]
T = sum(n for n, _, _ in REQUESTS) + 2
UNTOUCHED = 3
RTOL = 1e-6


def _setup(kind, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    if kind == "gdn":
        cfg, block = GDN_CFG, layers.gdn_block
        params = layers.init_gdn_params(ks[0], cfg)
        state_shape = (cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim)
    else:
        cfg, block = KDA_CFG, layers.kda_block
        params = layers.init_kda_params(ks[0], cfg)
        state_shape = (cfg.num_heads, cfg.head_dim, cfg.head_dim)
    conv = jax.random.normal(ks[1], (P, cfg.conv_dim, cfg.conv_kernel_size))
    rec = 0.3 * jax.random.normal(ks[2], (P,) + state_shape)
    fresh = jnp.asarray([s for _, s, h in REQUESTS if s >= 0 and not h])
    conv, rec = conv.at[fresh].set(jnp.nan), rec.at[fresh].set(jnp.nan)
    x = jax.random.normal(ks[3], (1, T, cfg.hidden_size))
    return cfg, functools.partial(block, config=cfg), params, layers.LinearAttentionCache(conv, rec), x


def _batch(requests=REQUESTS):
    cu = np.concatenate([[0], np.cumsum([n for n, _, _ in requests])]).astype(np.int32)
    return layers.ServingBatch(jnp.asarray(cu), jnp.asarray([s for _, s, _ in requests], jnp.int32),
                               jnp.asarray([h for _, _, h in requests]))


def _check_against_per_request_calls(block, params, pools, x, y, new, requests):
    start = 0
    written = set()
    for n, slot, has in requests:
        stop = start + n
        if slot < 0:
            np.testing.assert_array_equal(np.asarray(y[0, start:stop]), 0.0)
        else:
            cache = layers.LinearAttentionCache(pools.conv_state[slot][None],
                                                pools.recurrent_state[slot][None]) if has else None
            y_n, c_n = block(params, x[:, start:stop], cache)
            assert rel_err(y[:, start:stop], y_n) <= RTOL, (n, slot)
            assert rel_err(new.conv_state[slot], c_n.conv_state[0]) <= RTOL, (n, slot)
            assert rel_err(new.recurrent_state[slot], c_n.recurrent_state[0]) <= RTOL, (n, slot)
            written.add(slot)
        start = stop
    np.testing.assert_array_equal(np.asarray(y[0, start:]), 0.0)  # trailing padding tokens
    for slot in set(range(P)) - written:
        for a, b in zip(new, pools):
            np.testing.assert_array_equal(np.asarray(a[slot]), np.asarray(b[slot]))
    assert np.isfinite(np.asarray(y)).all()


@pytest.mark.parametrize("kind", slow_except(["gdn", "kda"], 1))
def test_mixed_batch_equals_per_request_calls(kind):
    """The same path (recurrent) on both sides: equal to float32 rounding."""
    _, block, params, pools, x = _setup(kind)
    step = jax.jit(functools.partial(block, impl="recurrent", backend="xla"))
    y, new = step(params, x, pools, batch=_batch())  # traced batch: one program for any split
    assert y.shape == x.shape
    assert new.conv_state.shape == pools.conv_state.shape
    assert new.recurrent_state.dtype == jnp.float32
    _check_against_per_request_calls(step, params, pools, x, y, new, REQUESTS)
    for a, b in zip(new, pools):  # the slot nobody uses
        np.testing.assert_array_equal(np.asarray(a[UNTOUCHED]), np.asarray(b[UNTOUCHED]))


@pytest.mark.slow
def test_auto_impl_and_a_second_step_from_the_updated_pools():
    """impl="auto" on both sides (the packed call and the per-request calls may pick different
    paths, so 1e-5), and decode steps that continue from the pools the first step wrote."""
    _, block, params, pools, x = _setup("gdn", seed=1)
    step = block = jax.jit(block)  # the per-request calls jitted too (one program per length)
    y, new = step(params, x, pools, batch=_batch())
    live = [(1, s, True) for _, s, _ in REQUESTS if s >= 0] + [(0, -1, True)]
    x2 = jax.random.normal(jax.random.key(5), (1, len(live) + 3, GDN_CFG.hidden_size))
    y2, new2 = step(params, x2, new, batch=_batch(live))
    start = 0
    for n, slot, has in REQUESTS:
        if slot >= 0:
            cache = (layers.LinearAttentionCache(pools.conv_state[slot][None],
                                                 pools.recurrent_state[slot][None]) if has else None)
            y_n, c_n = block(params, x[:, start:start + n], cache)
            assert rel_err(y[:, start:start + n], y_n) <= 1e-5
            j = [s for _, s, _ in live].index(slot)
            y_d, c_d = block(params, x2[:, j:j + 1], c_n)
            assert rel_err(y2[:, j:j + 1], y_d) <= 1e-5
            assert rel_err(new2.recurrent_state[slot], c_d.recurrent_state[0]) <= 1e-5
            assert rel_err(new2.conv_state[slot], c_d.conv_state[0]) <= 1e-6
        start += n


def test_packed_conv_equals_causal_conv_per_request():
    """Requests of 0 to 6 tokens (shorter than, equal to and longer than the kernel width 4),
    one starting fresh, packed together: each equals causal_conv1d on it alone."""
    C, W = 8, 4
    ks = jax.random.split(jax.random.key(3), 3)
    weight = jax.random.normal(ks[0], (C, W))
    pool = jax.random.normal(ks[1], (9, C, W))
    reqs = [(3, 2, True), (0, 0, True), (1, 4, True), (2, 3, False), (4, 5, True), (1, -1, True),
            (6, 6, True), (2, 7, True), (5, 8, False)]
    Tn = sum(n for n, _, _ in reqs) + 1
    x = jax.random.normal(ks[2], (1, Tn, C))
    batch = layers._with_trailing_padding(_batch(reqs), Tn)
    y, new = jax.jit(layers.packed_causal_conv1d)(x, weight, pool, batch)
    conv = jax.jit(layers.causal_conv1d)
    start = 0
    for n, slot, has in reqs:
        if slot >= 0:
            state = pool[slot][None] if has else jnp.zeros_like(pool[slot][None])
            y_n, s_n = conv(x[:, start:start + n], weight, state)
            np.testing.assert_allclose(y[:, start:start + n], y_n, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(new[slot]), np.asarray(s_n[0]))
        start += n
    np.testing.assert_array_equal(np.asarray(new[1]), np.asarray(pool[1]))  # nobody's slot


def test_output_state_indices_write_other_slots_and_keep_the_read_ones():
    """Request n reads slot state_indices[n] and writes slot output_state_indices[n]: the read
    slots stay bit-identical unless written, -1 writes nothing, the written slot holds what a
    per-request call returns (conv and recurrent state)."""
    _, block, params, pools, x = _setup("gdn", seed=2)
    step = jax.jit(functools.partial(block, impl="recurrent", backend="xla"))
    reqs = [(1, 4, True), (9, 2, False), (5, 0, True), (1, 1, True), (2, 5, True), (3, -1, True)]
    out = [3, 2, -1, 1, 0, 0]  # 4 -> 3, in place, a read-only request, in place, 5 -> 0, padding
    b = _batch(reqs)._replace(output_state_indices=jnp.asarray(out, jnp.int32))
    y, new = step(params, x, pools, batch=b)
    y_ref, _ = step(params, x, pools, batch=_batch(reqs))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))  # outputs do not depend on it
    start, written = 0, set()
    for (n, slot, has), w in zip(reqs, out):
        if slot >= 0 and w >= 0:
            cache = layers.LinearAttentionCache(pools.conv_state[slot][None],
                                                pools.recurrent_state[slot][None]) if has else None
            _, c_n = step(params, x[:, start:start + n], cache)
            assert rel_err(new.conv_state[w], c_n.conv_state[0]) <= RTOL, (slot, w)
            assert rel_err(new.recurrent_state[w], c_n.recurrent_state[0]) <= RTOL, (slot, w)
            written.add(w)
        start += n
    assert written == {0, 1, 2, 3}
    for slot in set(range(P)) - written:  # 4 and 5 were read only
        for a, b_ in zip(new, pools):
            np.testing.assert_array_equal(np.asarray(a[slot]), np.asarray(b_[slot]))


def test_bfloat16_state_pool_keeps_its_dtype():
    """A bfloat16 recurrent-state pool stays bfloat16 through the serving step; each written
    slot is the float32 computation from the same (rounded) state, within one bf16 rounding."""
    _, block, params, pools, x = _setup("gdn", seed=3)
    reqs = [(1, 4, True), (5, 0, True), (3, 2, False)]
    x = x[:, :12]
    lp = pools._replace(recurrent_state=jnp.nan_to_num(pools.recurrent_state).astype(jnp.bfloat16))
    step = jax.jit(functools.partial(block, impl="recurrent", backend="xla"))
    y, new = step(params, x, lp, batch=_batch(reqs))
    assert new.recurrent_state.dtype == jnp.bfloat16
    f32 = lp._replace(recurrent_state=lp.recurrent_state.astype(jnp.float32))
    y32, new32 = step(params, x, f32, batch=_batch(reqs))
    assert rel_err(y, y32) <= 1e-6
    for _, slot, _ in reqs:
        err = jnp.abs(new.recurrent_state[slot].astype(jnp.float32) - new32.recurrent_state[slot])
        assert bool((err <= 2.0 ** -8 * jnp.abs(new32.recurrent_state[slot]) + 1e-30).all()), slot
    for slot in (1, 3, 5):
        np.testing.assert_array_equal(np.asarray(new.recurrent_state[slot].astype(jnp.float32)),
                                      np.asarray(f32.recurrent_state[slot]))


def test_serving_argument_errors_name_the_argument():
    _, block, params, pools, x = _setup("gdn")
    b = _batch()
    cases = [
        (dict(batch=b._replace(cu_seqlens=b.cu_seqlens.astype(jnp.float32))), TypeError,
         "batch.cu_seqlens"),
        (dict(batch=b._replace(state_indices=b.state_indices[:-1])), ValueError,
         r"batch.state_indices must have shape \[N\]"),
        (dict(batch=b._replace(has_initial_state=b.has_initial_state.astype(jnp.int32))), TypeError,
         "batch.has_initial_state"),
        (dict(batch=b._replace(cu_seqlens=b.cu_seqlens.at[-1].set(T + 1))), ValueError,
         "end at most at T"),
        (dict(batch=b, attention_mask=jnp.ones((1, T))), ValueError, "attention_mask"),
        (dict(batch=b, cache=pools._replace(recurrent_state=pools.recurrent_state[:2])), ValueError,
         "cache.recurrent_state"),
        (dict(batch=b, cache=None), TypeError, "pools"),
        (dict(batch=b, x=jnp.concatenate([x, x])), ValueError, r"\[1, T, hidden\]"),
        (dict(batch=tuple(b)), TypeError, "ServingBatch"),
        (dict(batch=b._replace(output_state_indices=b.state_indices[:-1])), ValueError,
         r"batch.output_state_indices must have shape \[N\]"),
        (dict(batch=b._replace(output_state_indices=b.state_indices.astype(jnp.float32))),
         TypeError, "batch.output_state_indices"),
    ]
    for kw, err, match in cases:
        args = dict(x=x, cache=pools)
        args.update({k: kw.pop(k) for k in ("x", "cache") if k in kw})
        with pytest.raises(err, match=match):
            block(params, args["x"], args["cache"], **kw)


@pytest.mark.slow
def test_serve_example_runs_and_checks_itself():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import serve
    report = serve.main(["--small"])
    assert report["finished"] == report["requests"] >= 4
    assert report["slot_reuses"] >= 1 and report["compiles"] == 1
    assert report["max_rel_err"] <= 1e-3
