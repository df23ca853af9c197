"""The Flax NNX modules (`gdn_jax.nnx`) against the functional blocks and transformers.

* Same parameters -> the same outputs and caches as `layers.gdn_block` / `layers.kda_block`,
  bit for bit, through a prefill shorter than the conv kernel, a decode step and a continued
  prefill (both jitted: `nnx.jit` against `jax.jit`).
* `from_state_dict` on the transformers Qwen3.5, Qwen3-Next and Kimi Linear layers that
  tests/test_transformers_equivalence.py builds: prefill, decode, continued prefill within 1e-4.
* `nnx.grad` gives the gradients of `jax.grad` over the functional block (finite, equal within
  float32 rounding), and an optax step under `nnx.jit` lowers the loss.
* `import gdn_jax` works without Flax, and `import gdn_jax.nnx` then says which extra to install.

Everything but the last skips when Flax is not installed (the `flax` extra).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import layers

GDN_CFG = layers.GatedDeltaNetConfig(hidden_size=16, num_k_heads=1, num_v_heads=2, head_k_dim=8,
                                     head_v_dim=8)
KDA_CFG = layers.KimiDeltaAttentionConfig(hidden_size=16, num_heads=2, head_dim=8)
TOL_HF = 1e-4


@pytest.fixture(scope="module")
def nnx():
    return pytest.importorskip("flax.nnx", reason="Flax is not installed (pip install 'gdn_jax[flax]')")


@pytest.fixture(scope="module")
def gnnx(nnx):
    import gdn_jax.nnx as m  # noqa: PLC0415
    return m


def _kind(gnnx, kind):
    if kind == "gdn":
        return gnnx.GatedDeltaNet, GDN_CFG, layers.init_gdn_params, layers.gdn_block
    return gnnx.KimiDeltaAttention, KDA_CFG, layers.init_kda_params, layers.kda_block


def _inputs(seed, B, Ts, hidden, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), len(Ts))
    return [jax.random.normal(k, (B, t, hidden), jnp.float32).astype(dtype) for k, t in zip(ks, Ts)]


def test_import_without_flax():
    code = ("import sys; sys.modules['flax'] = None\n"
            "import gdn_jax, gdn_jax.layers, gdn_jax.weights\n"
            "assert 'flax' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "try:\n    import gdn_jax.nnx\nexcept ImportError as e:\n    print('ERR', e)\n"
            "else:\n    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "gdn_jax[flax]" in out.stdout, out.stdout


@pytest.mark.parametrize("kind", [
    "gdn", pytest.param("kda", marks=pytest.mark.slow)])
def test_module_matches_functional_block(nnx, gnnx, kind):
    cls, cfg, init, block = _kind(gnnx, kind)
    # rngs= draws what the functional init draws from rngs.params()
    m = cls(cfg, rngs=nnx.Rngs(params=3))
    params = init(nnx.Rngs(params=3).params(), cfg)
    for k, v in m.functional_params().items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(params[k]), err_msg=k)
    assert set(nnx.to_pure_dict(nnx.state(m, nnx.Param))) == set(params)

    f_mod = nnx.jit(lambda mod, x, c, mask: mod(x, c, attention_mask=mask))
    f_fun = jax.jit(lambda p, x, c, mask: block(p, x, c, config=cfg, attention_mask=mask))
    # prefill shorter than the conv kernel (with a padding mask), decode, continued prefill
    xs = _inputs(0, 2, (3, 1, 6), cfg.hidden_size)
    masks = [jnp.array([[0, 1, 1], [1, 1, 1]], jnp.float32), None, None]
    c_mod = c_fun = None
    for x, mask in zip(xs, masks):
        y_mod, c_mod = f_mod(m, x, c_mod, mask)
        y_fun, c_fun = f_fun(params, x, c_fun, mask)
        np.testing.assert_array_equal(np.asarray(y_mod), np.asarray(y_fun))
        for a, b in zip(c_mod, c_fun):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(c_mod.recurrent_state)).max() > 0
    # an explicit zero cache is a fresh prefill
    y0, _ = f_mod(m, xs[0], m.init_cache(2), masks[0])
    y1, _ = f_mod(m, xs[0], None, masks[0])
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_param_dtype_and_dtype(nnx, gnnx, kind):
    cls, cfg, init, block = _kind(gnnx, kind)
    params = init(jax.random.key(1), cfg)
    (x,) = _inputs(1, 1, (5,), cfg.hidden_size)
    # bf16 parameters, bf16 input
    m = cls(cfg, params=params, param_dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in m.functional_params().values())
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    pb = {k: v.astype(jnp.bfloat16) for k, v in params.items()}
    xb = x.astype(jnp.bfloat16)
    y, _ = nnx.jit(lambda mod, x: mod(x))(m, xb)
    y_ref, _ = jax.jit(lambda p, x: block(p, x, config=cfg))(pb, xb)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    # float32 parameters computing in bf16 (dtype=): the same numbers
    m32 = cls(cfg, params=params, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in m32.functional_params().values())
    y2, _ = nnx.jit(lambda mod, x: mod(x))(m32, x)
    np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y_ref, np.float32))
    # random init in bf16
    mr = cls(cfg, rngs=nnx.Rngs(0), param_dtype="bfloat16")
    assert all(v.dtype == jnp.bfloat16 for v in mr.functional_params().values())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_nnx_grad_matches_jax_grad(nnx, gnnx, kind):
    cls, cfg, init, block = _kind(gnnx, kind)
    params = init(jax.random.key(2), cfg)
    m = cls(cfg, params=params)
    x0, x = _inputs(2, 2, (4, 7), cfg.hidden_size)
    _, cache = jax.jit(lambda p, x: block(p, x, config=cfg))(params, x0)  # a non-zero start

    def loss(y, c):
        return jnp.mean(y ** 2) + jnp.mean(c.recurrent_state ** 2)

    g_mod = nnx.jit(nnx.grad(lambda mod, x, c: loss(*mod(x, c))))(m, x, cache)
    g_fun = jax.jit(jax.grad(lambda p, x, c: loss(*block(p, x, c, config=cfg))))(params, x, cache)
    g_mod = nnx.to_pure_dict(g_mod)
    assert set(g_mod) == set(g_fun)
    for k in g_fun:
        a, b = np.asarray(g_mod[k]), np.asarray(g_fun[k])
        assert np.isfinite(a).all(), k
        assert np.abs(a).max() > 0, k
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=k)


@pytest.mark.slow
def test_optax_step_under_nnx_jit(nnx, gnnx):
    optax = pytest.importorskip("optax")
    m = gnnx.GatedDeltaNet(GDN_CFG, rngs=nnx.Rngs(0))
    before = m.functional_params()
    opt = nnx.Optimizer(m, optax.adam(1e-2), wrt=nnx.Param)
    x, target = _inputs(3, 2, (8, 8), GDN_CFG.hidden_size)

    @nnx.jit
    def step(mod, opt, x, target):
        def loss_fn(mod):
            return jnp.mean((mod(x)[0] - target) ** 2)
        loss, grads = nnx.value_and_grad(loss_fn)(mod)
        opt.update(mod, grads)
        return loss

    losses = [float(step(m, opt, x, target)) for _ in range(5)]
    assert losses[-1] < losses[0], losses
    after = m.functional_params()
    assert all(not np.array_equal(np.asarray(before[k]), np.asarray(after[k])) for k in before)


def test_errors(nnx, gnnx):
    G = gnnx.GatedDeltaNet
    with pytest.raises(TypeError, match="exactly one of rngs= .* got neither"):
        G(GDN_CFG)
    params = layers.init_gdn_params(jax.random.key(0), GDN_CFG)
    with pytest.raises(TypeError, match="got both"):
        G(GDN_CFG, rngs=nnx.Rngs(0), params=params)
    with pytest.raises(TypeError, match="rngs: expected a flax.nnx.Rngs"):
        G(GDN_CFG, rngs=0)
    with pytest.raises(ValueError, match=r"params\['norm'\] has shape \(3,\), expected \(8,\)"):
        G(GDN_CFG, params={**params, "norm": jnp.ones(3)})
    with pytest.raises(ValueError, match="params: keys"):
        G(GDN_CFG, params={k: v for k, v in params.items() if k != "A_log"})
    with pytest.raises(TypeError, match="param_dtype=int32 is not a floating dtype"):
        G(GDN_CFG, rngs=nnx.Rngs(0), param_dtype=jnp.int32)
    with pytest.raises(TypeError, match="config: expected a GatedDeltaNetConfig"):
        G({"hidden_size": 16}, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="config: expected a KimiDeltaAttentionConfig"):
        gnnx.KimiDeltaAttention(object(), rngs=nnx.Rngs(0))
    m = G(GDN_CFG, params=params)
    with pytest.raises(ValueError, match=r"x: expected shape \[B, T, hidden_size=16\], got \(2, 5, 8\)"):
        m(jnp.zeros((2, 5, 8)))
    # a transformers-style config dict is accepted
    hf = {"model_type": "qwen3_next", "hidden_size": 16, "linear_num_key_heads": 1,
          "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8}
    assert G(hf, params=params).config == dataclasses.replace(GDN_CFG, layout="qwen3_next")


# --------------------------------------------------------------------------------------
# transformers (the layers tests/test_transformers_equivalence.py builds)
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (the `equivalence` extra): the NNX modules are "
                        "compared with transformers only when it is")
    import test_transformers_equivalence as te  # noqa: PLC0415 (blocks fla before transformers loads)
    return te


@pytest.mark.slow  # torch and transformers modules; the functional equivalence has an everyday case
@pytest.mark.parametrize("model", ["qwen3_5", "qwen3_next", "kimi_linear"])
def test_from_state_dict_matches_transformers(nnx, gnnx, hf, model):
    from helpers import rel_err  # noqa: PLC0415
    cfg, mod, _, _ = hf.build(model)
    sd = {k: v.detach().numpy().copy() for k, v in mod.state_dict().items()}
    prefix = "model.layers.0.linear_attn." if model != "kimi_linear" else "model.layers.0.self_attn."
    sd = {prefix + k: v for k, v in sd.items()}
    if model == "kimi_linear":
        m = gnnx.KimiDeltaAttention.from_state_dict(sd, cfg, prefix=prefix)
        again = m.to_state_dict(prefix=prefix)
    else:
        m = gnnx.GatedDeltaNet.from_state_dict(sd, cfg, prefix=prefix)
        assert m.config.layout == model
        again = m.to_state_dict(prefix=prefix)  # the layout the weights came in
    assert set(again) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)

    f = nnx.jit(lambda mod, x, c: mod(x, c))
    rng = np.random.default_rng(1)
    cache_hf = hf.DynamicCache(config=cfg)
    cache = None
    errors = {}
    for phase, t in (("prefill", 70), ("decode", 1), ("continue", 37)):
        x = rng.standard_normal((2, t, cfg.hidden_size)).astype(np.float32)
        y_hf, conv_hf, rec_hf = hf.hf_run(mod, x, cache_hf)
        y, cache = f(m, jnp.asarray(x), cache)
        errors[phase] = (rel_err(y, y_hf), rel_err(cache.conv_state, conv_hf),
                         rel_err(cache.recurrent_state, rec_hf))
    print(f"\n{model} (out, conv_state, recurrent_state): {errors}")
    assert all(e <= TOL_HF for errs in errors.values() for e in errs), errors
