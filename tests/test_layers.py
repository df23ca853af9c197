"""Pure-JAX tests of the model blocks (gdn_jax.layers) and the state-dict loaders (gdn_jax.weights)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from gdn_jax import layers, weights
from helpers import rel_err, slow_except

GDN_CFG = layers.GatedDeltaNetConfig(hidden_size=32, num_k_heads=2, num_v_heads=4, head_k_dim=16,
                                     head_v_dim=8)
KDA_CFG = layers.KimiDeltaAttentionConfig(hidden_size=32, num_heads=2, head_dim=16)


def setup(kind, seed=0):
    key = jax.random.PRNGKey(seed)
    if kind == "gdn":
        params = layers.init_gdn_params(key, GDN_CFG)
        fn = functools.partial(layers.gdn_block, config=GDN_CFG)
        cfg = GDN_CFG
    else:
        params = layers.init_kda_params(key, KDA_CFG)
        fn = functools.partial(layers.kda_block, config=KDA_CFG)
        cfg = KDA_CFG
    return cfg, params, fn


@pytest.mark.parametrize("kind", slow_except(["gdn", "kda"], 0))
def test_shapes_and_jit(kind):
    cfg, params, fn = setup(kind)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, cfg.hidden_size))
    y, cache = jax.jit(fn)(params, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    heads = cfg.num_v_heads if kind == "gdn" else cfg.num_heads
    kdim = cfg.head_k_dim if kind == "gdn" else cfg.head_dim
    vdim = cfg.head_v_dim if kind == "gdn" else cfg.head_dim
    assert cache.conv_state.shape == (2, cfg.conv_dim, cfg.conv_kernel_size)
    assert cache.recurrent_state.shape == (2, heads, kdim, vdim)
    assert cache.recurrent_state.dtype == jnp.float32


@pytest.mark.slow  # the cache semantics run everyday in tests/test_serving_layers.py
@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_prefill_then_decode_equals_one_prefill(kind):
    cfg, params, fn = setup(kind)
    T1, T2, T3 = 6, 3, 5
    x = jax.random.normal(jax.random.PRNGKey(2), (2, T1 + T2 + T3, cfg.hidden_size))
    jfn = jax.jit(fn)
    # the whole sequence from an explicit all-zeros cache; the pieces start from None (the same)
    init = layers.init_gdn_cache(cfg, 2) if kind == "gdn" else layers.init_kda_cache(cfg, 2)
    y_full, cache_full = jfn(params, x, init)
    y1, cache = jfn(params, x[:, :T1], None)
    ys = [y1]
    for t in range(T1, T1 + T2):  # decode steps
        y_t, cache = jfn(params, x[:, t:t + 1], cache)
        ys.append(y_t)
    y3, cache = jfn(params, x[:, T1 + T2:], cache)  # continued prefill
    ys.append(y3)
    assert rel_err(jnp.concatenate(ys, 1), y_full) < 1e-5
    assert rel_err(cache.recurrent_state, cache_full.recurrent_state) < 1e-5
    np.testing.assert_allclose(cache.conv_state, cache_full.conv_state, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_short_prompt_conv_state_is_left_padded():
    cfg, params, fn = setup("gdn")
    x = jax.random.normal(jax.random.PRNGKey(3), (1, 2, cfg.hidden_size))
    _, cache = fn(params, x)
    mixed = x @ params["in_proj_qkv"]
    np.testing.assert_array_equal(cache.conv_state[:, :, :2], 0.0)
    np.testing.assert_allclose(cache.conv_state[:, :, 2:], jnp.swapaxes(mixed, 1, 2), rtol=1e-6)


@pytest.mark.parametrize("kind", slow_except(["gdn", "kda"], 0))
def test_impls_agree(kind):
    cfg, params, fn = setup(kind)
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 20, cfg.hidden_size))
    y_ref, c_ref = jax.jit(functools.partial(fn, impl="reference"))(params, x)
    for impl in ("recurrent", "chunked"):
        y, c = jax.jit(functools.partial(fn, impl=impl, backend="xla"))(params, x)
        assert rel_err(y, y_ref) < 1e-4, impl
        assert rel_err(c.recurrent_state, c_ref.recurrent_state) < 1e-4, impl


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_grads_finite(kind):
    cfg, params, fn = setup(kind)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 12, cfg.hidden_size))

    def loss(p, x):
        y, cache = fn(p, x)
        return jnp.mean(y ** 2) + 1e-3 * jnp.mean(cache.recurrent_state ** 2)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    for name, g in gp.items():
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert float(jnp.max(jnp.abs(g))) > 0, name
    assert bool(jnp.all(jnp.isfinite(gx)))


@pytest.mark.slow
def test_grads_match_reference_autodiff():
    cfg, params, fn = setup("gdn")
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 10, cfg.hidden_size))

    def loss(p, impl):
        return jnp.sum(jnp.sin(fn(p, x, impl=impl)[0]))

    g_ref = jax.jit(jax.grad(loss), static_argnums=1)(params, "reference")
    g_op = jax.jit(jax.grad(loss), static_argnums=1)(params, "auto")
    for k in params:
        assert rel_err(g_op[k], g_ref[k]) < 1e-4, k


@pytest.mark.slow
def test_attention_mask_zeroes_padding():
    cfg, params, fn = setup("gdn")
    x = jax.random.normal(jax.random.PRNGKey(7), (1, 5, cfg.hidden_size))
    mask = jnp.array([[0, 0, 1, 1, 1]], jnp.float32)
    y_m, _ = fn(params, x, attention_mask=mask)
    y_z, _ = fn(params, x * mask[:, :, None])
    np.testing.assert_allclose(y_m, y_z, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_bf16_params_run():
    params = layers.init_gdn_params(jax.random.PRNGKey(0), GDN_CFG, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, GDN_CFG.hidden_size), jnp.bfloat16)
    y, cache = jax.jit(functools.partial(layers.gdn_block, config=GDN_CFG))(params, x)
    assert y.dtype == jnp.bfloat16 and cache.recurrent_state.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))


def test_config_from_hf_dicts():
    qwen35 = {"model_type": "qwen3_5", "text_config": {
        "model_type": "qwen3_5_text", "hidden_size": 2048, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6}}
    c = layers.GatedDeltaNetConfig.from_hf_config(qwen35)
    assert (c.conv_dim, c.layout) == (2 * 16 * 128 + 32 * 128, "qwen3_5")
    nxt = dict(qwen35["text_config"], model_type="qwen3_next")
    assert layers.GatedDeltaNetConfig.from_hf_config(nxt).layout == "qwen3_next"
    kimi = {"hidden_size": 2304, "rms_norm_eps": 1e-5,
            "linear_attn_config": {"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4}}
    k = layers.KimiDeltaAttentionConfig.from_hf_config(kimi)
    assert (k.num_heads, k.head_dim, k.conv_kernel_size) == (32, 128, 4)


@pytest.mark.parametrize("layout", slow_except(["qwen3_5", "qwen3_next"], 1))
def test_gdn_state_dict_round_trip(layout, tmp_path):
    params = layers.init_gdn_params(jax.random.PRNGKey(0), GDN_CFG)
    prefix = "model.layers.3.linear_attn."
    sd = weights.gdn_params_to_state_dict(params, GDN_CFG, prefix=prefix, layout=layout)
    key = "in_proj_qkvz.weight" if layout == "qwen3_next" else "in_proj_qkv.weight"
    assert prefix + key in sd
    assert weights.find_layer_prefixes(sd) == [prefix]
    path = str(tmp_path / "model.safetensors")
    weights.save_safetensors(path, sd)
    back = weights.gdn_params_from_state_dict(weights.load_state_dict(path), GDN_CFG, prefix=prefix)
    for k in params:
        np.testing.assert_array_equal(back[k], params[k], err_msg=k)


def test_qwen3_next_grouping():
    """in_proj_qkvz rows are grouped per key head: [q, k, v (g heads), z (g heads)]."""
    c = GDN_CFG
    D, Hk, K, V, g = c.hidden_size, c.num_k_heads, c.head_k_dim, c.head_v_dim, c.num_v_heads // c.num_k_heads
    rows = Hk * (2 * K + 2 * g * V)
    qkvz = np.arange(rows, dtype=np.float32)[:, None] * np.ones((1, D), np.float32)
    ba = np.arange(2 * c.num_v_heads, dtype=np.float32)[:, None] * np.ones((1, D), np.float32)
    sd = {"in_proj_qkvz.weight": qkvz, "in_proj_ba.weight": ba,
          "conv1d.weight": np.zeros((c.conv_dim, 1, 4), np.float32),
          "dt_bias": np.zeros(c.num_v_heads, np.float32), "A_log": np.zeros(c.num_v_heads, np.float32),
          "norm.weight": np.ones(V, np.float32), "out_proj.weight": np.zeros((D, c.value_dim), np.float32)}
    p = weights.gdn_params_from_state_dict(sd, c)
    per = 2 * K + 2 * g * V
    qkv = np.asarray(p["in_proj_qkv"][0])
    # q of key head 1 starts at row `per` of the grouped matrix
    assert qkv[K] == per
    # k of key head 0 follows all q heads
    assert qkv[Hk * K] == K
    # value head 1 (key head 0, second in its group) is rows 2K + V .. 2K + 2V
    assert qkv[2 * Hk * K + V] == 2 * K + V
    # z of value head 2 (key head 1, first of its group)
    assert np.asarray(p["in_proj_z"][0])[2 * V] == per + 2 * K + g * V
    # b of value head 3 = key head 1, second of its group; a follows b in each group
    assert np.asarray(p["in_proj_b"][0])[3] == 2 * g + 1
    assert np.asarray(p["in_proj_a"][0])[3] == 2 * g + g + 1


def test_kda_state_dict_names(tmp_path):
    params = layers.init_kda_params(jax.random.PRNGKey(0), KDA_CFG)
    for naming in ("transformers", "checkpoint"):
        sd = weights.kda_params_to_state_dict(params, KDA_CFG, prefix="model.layers.0.self_attn.", naming=naming)
        path = str(tmp_path / f"{naming}.npz")
        np.savez(path, **sd)
        assert weights.find_layer_prefixes(sd, "kda") == ["model.layers.0.self_attn."]
        back = weights.kda_params_from_state_dict(weights.load_state_dict(path), KDA_CFG,
                                                  prefix="model.layers.0.self_attn.")
        for k in params:
            np.testing.assert_array_equal(back[k], params[k], err_msg=(naming, k))


def test_safetensors_bf16_and_directory(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    b = np.ones((4,), np.float16)
    weights.save_safetensors(str(tmp_path / "a.safetensors"), {"x.a": a})
    weights.save_safetensors(str(tmp_path / "b.safetensors"), {"x.b": b}, metadata={"format": "pt"})
    sd = weights.load_state_dict(str(tmp_path))
    assert sd["x.a"].dtype == a.dtype and sd["x.a"].shape == (2, 3)
    np.testing.assert_array_equal(sd["x.a"].astype(np.float32), a.astype(np.float32))
    np.testing.assert_array_equal(sd["x.b"], b)
    only = weights.load_state_dict(str(tmp_path / "a.safetensors"), keys=["x.a"])
    assert list(only) == ["x.a"]


def test_safetensors_reader_matches_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors not installed")
    sd = {"w": np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32),
          "h": np.arange(7, dtype=np.float16)}
    st.save_file(sd, str(tmp_path / "lib.safetensors"))
    got = weights.load_safetensors(str(tmp_path / "lib.safetensors"))
    for k in sd:
        np.testing.assert_array_equal(got[k], sd[k])
    weights.save_safetensors(str(tmp_path / "ours.safetensors"), sd)
    lib = st.load_file(str(tmp_path / "ours.safetensors"))
    for k in sd:
        np.testing.assert_array_equal(lib[k], sd[k])


def test_bad_shapes_raise():
    params = layers.init_gdn_params(jax.random.PRNGKey(0), GDN_CFG)
    sd = weights.gdn_params_to_state_dict(params, GDN_CFG)
    other = layers.GatedDeltaNetConfig(hidden_size=32, num_k_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8)
    with pytest.raises(ValueError, match="in_proj_qkv"):
        weights.gdn_params_from_state_dict(sd, other)
    with pytest.raises(KeyError, match="in_proj_qkv"):
        weights.gdn_params_from_state_dict(sd, GDN_CFG, prefix="model.")
    with pytest.raises(ValueError, match="multiple"):
        layers.GatedDeltaNetConfig(hidden_size=8, num_k_heads=3, num_v_heads=4, head_k_dim=8, head_v_dim=8)


def _hybrid():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import hybrid_model
    return hybrid_model


@pytest.mark.slow
def test_hybrid_model_decode_matches_full_forward_and_trains():
    hm = _hybrid()
    cfg = hm.HybridConfig(vocab_size=16, hidden_size=32, mlp_size=32,
                          layer_types=("gdn", "attention"), gdn_heads_k=1, gdn_heads_v=2,
                          head_k_dim=16, head_v_dim=16, attn_heads=2, attn_head_dim=16)
    params = hm.init_params(jax.random.PRNGKey(0), cfg)
    prompt = jnp.asarray(hm.toy_batch(np.random.default_rng(0), 2, 6, cfg.vocab_size))
    new = 4
    got = hm.generate(params, prompt, config=cfg, max_new_tokens=new)
    # Greedy decoding through the caches picks the argmax of a full uncached forward over the
    # sequence it produced, at every position.
    seq = jnp.concatenate([prompt, got], axis=1)
    full = jax.jit(lambda p, t: hm.forward(p, t, None, config=cfg)[0])(params, seq)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(full[:, prompt.shape[1] - 1:-1], -1)), np.asarray(got))
    # cached logits (prefill of 7, then one decode step) equal the uncached ones
    step = jax.jit(lambda p, t, c: hm.forward(p, t, c, config=cfg))
    l1, cache = step(params, seq[:, :7], hm.init_cache(cfg, 2, 10))
    l2, cache = step(params, seq[:, 7:8], cache)
    assert int(cache.pos) == 8
    assert rel_err(jnp.concatenate([l1, l2], 1), full[:, :8]) < 1e-5
    # one training step: finite loss and gradients through the op, loss goes down on a batch
    opt = hm.adam_init(params)
    tokens = jnp.asarray(hm.toy_batch(np.random.default_rng(1), 4, 12, cfg.vocab_size))
    losses = []
    for _ in range(2):
        params, opt, loss, gnorm = hm.train_step(params, opt, tokens, config=cfg)
        assert np.isfinite(float(loss)) and np.isfinite(float(gnorm)) and float(gnorm) > 0
        losses.append(float(loss))
    assert losses[-1] < losses[0]
