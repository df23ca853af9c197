"""Linear-attention blocks of real models, in plain JAX, around the gated delta net op.

* `GatedDeltaNet` blocks of Qwen3-Next and Qwen3.5 (GDA: one scalar gate per value head):
  input projections, depthwise causal conv1d + SiLU over q|k|v, `beta = sigmoid(b)`,
  `g = -exp(A_log) * softplus(a + dt_bias)`, the op with l2norm in the kernel, gated RMSNorm
  `weight * rmsnorm(o) * silu(z)` and the output projection.
* The Kimi Delta Attention block of Kimi Linear (KDA: one gate per key channel): separate
  q/k/v projections, the same conv, a low-rank forget gate, and a sigmoid-gated output norm.

Parameters are plain dicts of arrays (pytrees), linear weights stored `[in, out]`
(`y = x @ W`). No framework: every function is pure and jit-friendly, and the static
configuration is a frozen dataclass (hashable, so it can be a `static_argnames` argument).

One forward function serves prefill, decode and continued prefill: it takes a cache
(conv state and recurrent state) and returns the new one. `cache=None` means "start from
zeros", which is exactly a fresh prefill. See docs/layers.md for the API and the
transformers quirks that are reproduced here.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .api import gated_delta_net

__all__ = [
    "GatedDeltaNetConfig",
    "KimiDeltaAttentionConfig",
    "LinearAttentionCache",
    "init_gdn_params",
    "init_kda_params",
    "init_gdn_cache",
    "init_kda_cache",
    "gdn_block",
    "kda_block",
    "gated_rms_norm",
    "rms_norm",
    "causal_conv1d",
    "softplus",
]


# --------------------------------------------------------------------------------------
# Configuration and cache
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Static sizes of a Qwen3-Next / Qwen3.5 GatedDeltaNet block.

    Field names follow the transformers configs (`linear_num_key_heads` -> `num_k_heads`, ...).
    `layout` only records where the weights came from ("qwen3_5" or "qwen3_next"); both
    layouts are converted to the same parameter pytree, so the forward pass is shared.
    """

    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel_size: int = 4
    rms_norm_eps: float = 1e-6
    layout: str = "qwen3_5"

    def __post_init__(self):
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"num_v_heads={self.num_v_heads} must be a multiple of "
                             f"num_k_heads={self.num_k_heads}")
        if self.layout not in ("qwen3_5", "qwen3_next"):
            raise ValueError(f"layout={self.layout!r} is not one of ('qwen3_5', 'qwen3_next')")

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    @classmethod
    def from_hf_config(cls, config, layout: str | None = None) -> "GatedDeltaNetConfig":
        """From a transformers `Qwen3NextConfig` / `Qwen3_5TextConfig` (or any object or dict
        with the same `linear_*` fields)."""
        if isinstance(config, dict) and "text_config" in config:
            config = config["text_config"]  # Qwen3.5's multimodal config.json
        elif hasattr(config, "get_text_config"):
            config = config.get_text_config()
        get = (lambda n, d=None: config.get(n, d)) if isinstance(config, dict) else (
            lambda n, d=None: getattr(config, n, d))
        if layout is None:
            mt = str(get("model_type", "") or "")
            layout = "qwen3_next" if "next" in mt else "qwen3_5"
        return cls(hidden_size=int(get("hidden_size")),
                   num_k_heads=int(get("linear_num_key_heads")),
                   num_v_heads=int(get("linear_num_value_heads")),
                   head_k_dim=int(get("linear_key_head_dim")),
                   head_v_dim=int(get("linear_value_head_dim")),
                   conv_kernel_size=int(get("linear_conv_kernel_dim", 4)),
                   rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                   layout=layout)


@dataclasses.dataclass(frozen=True)
class KimiDeltaAttentionConfig:
    """Static sizes of a Kimi Linear KDA block (q, k and v share `num_heads` and `head_dim`)."""

    hidden_size: int
    num_heads: int
    head_dim: int
    conv_kernel_size: int = 4
    rms_norm_eps: float = 1e-5

    @property
    def qkv_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return 3 * self.qkv_dim

    @classmethod
    def from_hf_config(cls, config) -> "KimiDeltaAttentionConfig":
        """From a transformers `KimiLinearConfig`, or the checkpoint's config dict (which keeps
        the sizes in a `linear_attn_config` sub-dict)."""
        if isinstance(config, dict):
            lac = config.get("linear_attn_config", {}) or {}
            return cls(hidden_size=int(config["hidden_size"]),
                       num_heads=int(config.get("linear_num_heads", lac.get("num_heads", 32))),
                       head_dim=int(config.get("linear_head_dim", lac.get("head_dim", 128))),
                       conv_kernel_size=int(config.get("linear_conv_kernel_dim",
                                                       lac.get("short_conv_kernel_size", 4))),
                       rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)))
        return cls(hidden_size=int(config.hidden_size), num_heads=int(config.linear_num_heads),
                   head_dim=int(config.linear_head_dim),
                   conv_kernel_size=int(config.linear_conv_kernel_dim),
                   rms_norm_eps=float(config.rms_norm_eps))


class LinearAttentionCache(NamedTuple):
    """The per-layer decode cache, laid out as transformers 5.x keeps it.

    conv_state: `[B, conv_dim, conv_kernel_size]`, the last `conv_kernel_size` *pre-conv*
        inputs (q|k|v channels), oldest first, zero-padded on the left for short prompts.
        (Only the last `conv_kernel_size - 1` are read; transformers keeps all of them.)
    recurrent_state: `[B, Hv, K, V]` float32, the gated delta net state.
    """

    conv_state: jax.Array
    recurrent_state: jax.Array


def _zeros_cache(batch: int, conv_dim: int, width: int, heads: int, k: int, v: int,
                 dtype) -> LinearAttentionCache:
    return LinearAttentionCache(jnp.zeros((batch, conv_dim, width), dtype),
                                jnp.zeros((batch, heads, k, v), jnp.float32))


def init_gdn_cache(config: GatedDeltaNetConfig, batch: int, dtype=jnp.float32) -> LinearAttentionCache:
    """An empty cache: using it is the same as a fresh prefill."""
    c = config
    return _zeros_cache(batch, c.conv_dim, c.conv_kernel_size, c.num_v_heads, c.head_k_dim,
                        c.head_v_dim, dtype)


def init_kda_cache(config: KimiDeltaAttentionConfig, batch: int, dtype=jnp.float32) -> LinearAttentionCache:
    c = config
    return _zeros_cache(batch, c.conv_dim, c.conv_kernel_size, c.num_heads, c.head_dim,
                        c.head_dim, dtype)


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------

def _dense(key, fan_in, fan_out, dtype):
    return (jax.random.normal(key, (fan_in, fan_out), jnp.float32) * fan_in ** -0.5).astype(dtype)


def init_gdn_params(key, config: GatedDeltaNetConfig, dtype=jnp.float32) -> dict:
    """Random parameters (the shapes `load_gdn_params` produces).

    Keys: in_proj_qkv [hidden, conv_dim], in_proj_z [hidden, value_dim], in_proj_b and
    in_proj_a [hidden, Hv], conv1d [conv_dim, kernel], dt_bias [Hv], A_log [Hv],
    norm [head_v_dim], out_proj [value_dim, hidden]. Channel order of q|k|v and z is the
    Qwen3.5 one (all q heads, all k heads, all v heads; value head h uses q/k head
    h // (Hv // Hk)).
    """
    c = config
    ks = jax.random.split(key, 8)
    return {
        "in_proj_qkv": _dense(ks[0], c.hidden_size, c.conv_dim, dtype),
        "in_proj_z": _dense(ks[1], c.hidden_size, c.value_dim, dtype),
        "in_proj_b": _dense(ks[2], c.hidden_size, c.num_v_heads, dtype),
        "in_proj_a": _dense(ks[3], c.hidden_size, c.num_v_heads, dtype),
        "conv1d": (jax.random.normal(ks[4], (c.conv_dim, c.conv_kernel_size), jnp.float32)
                   * c.conv_kernel_size ** -0.5).astype(dtype),
        "dt_bias": jnp.ones((c.num_v_heads,), dtype),
        "A_log": jnp.log(jax.random.uniform(ks[5], (c.num_v_heads,), jnp.float32, 1.0, 16.0)).astype(dtype),
        "norm": jnp.ones((c.head_v_dim,), dtype),
        "out_proj": _dense(ks[6], c.value_dim, c.hidden_size, dtype),
    }


def init_kda_params(key, config: KimiDeltaAttentionConfig, dtype=jnp.float32) -> dict:
    """Random parameters for a KDA block.

    Keys: q_proj, k_proj, v_proj [hidden, H*K]; conv1d [3*H*K, kernel] (q|k|v channels);
    f_a_proj [hidden, K], f_b_proj [K, H*K], dt_bias [H*K], A_log [H] (forget gate);
    b_proj [hidden, H]; g_a_proj [hidden, K], g_b_proj [K, H*K] (output gate);
    o_norm [K]; o_proj [H*K, hidden].
    """
    c = config
    ks = jax.random.split(key, 12)
    return {
        "q_proj": _dense(ks[0], c.hidden_size, c.qkv_dim, dtype),
        "k_proj": _dense(ks[1], c.hidden_size, c.qkv_dim, dtype),
        "v_proj": _dense(ks[2], c.hidden_size, c.qkv_dim, dtype),
        "conv1d": (jax.random.normal(ks[3], (c.conv_dim, c.conv_kernel_size), jnp.float32)
                   * c.conv_kernel_size ** -0.5).astype(dtype),
        "f_a_proj": _dense(ks[4], c.hidden_size, c.head_dim, dtype),
        "f_b_proj": _dense(ks[5], c.head_dim, c.qkv_dim, dtype),
        "dt_bias": (jax.random.normal(ks[6], (c.qkv_dim,), jnp.float32) * 0.5).astype(dtype),
        "A_log": jnp.log(jax.random.uniform(ks[7], (c.num_heads,), jnp.float32, 1.0, 16.0)).astype(dtype),
        "b_proj": _dense(ks[8], c.hidden_size, c.num_heads, dtype),
        "g_a_proj": _dense(ks[9], c.hidden_size, c.head_dim, dtype),
        "g_b_proj": _dense(ks[10], c.head_dim, c.qkv_dim, dtype),
        "o_norm": jnp.ones((c.head_dim,), dtype),
        "o_proj": _dense(ks[11], c.qkv_dim, c.hidden_size, dtype),
    }


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------

def softplus(x: jax.Array) -> jax.Array:
    """torch's `F.softplus` (beta=1, threshold=20): `x` above 20, `log1p(exp(x))` below."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`weight * x / rms(x)` in float32, cast back to x.dtype (Qwen3.5/Kimi RMSNorm)."""
    dt = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (weight * xf.astype(dt)).astype(dt)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float,
                   activation: str = "silu") -> jax.Array:
    """`weight * rmsnorm(x) * act(gate)` over the last axis (norm before gate).

    activation="silu" is Qwen3-Next/Qwen3.5's `RMSNormGated` (the normalised x is cast back
    to x.dtype before the weight multiplies it); activation="sigmoid" is Kimi Linear's
    `o_norm` (everything in float32, weight included). Result in x.dtype.
    """
    dt = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    gf = gate.astype(jnp.float32)
    if activation == "silu":
        y = (weight * xf.astype(dt)) * jax.nn.silu(gf)
    elif activation == "sigmoid":
        y = (weight.astype(jnp.float32) * xf) * jax.nn.sigmoid(gf)
    else:
        raise ValueError(f"activation={activation!r} is not 'silu' or 'sigmoid'")
    return y.astype(dt)


def causal_conv1d(x: jax.Array, weight: jax.Array, conv_state: jax.Array | None = None,
                  activation: str | None = "silu"):
    """Depthwise causal conv over time, continuing from a conv state.

    x: `[B, T, C]`; weight: `[C, W]` (torch's `conv1d.weight[:, 0, :]`); conv_state:
    `[B, C, W]`, the last W inputs before x (zeros: a fresh sequence). Returns
    `(y [B, T, C] in x.dtype, new_conv_state [B, C, W])`. Computed in weight.dtype, as the
    transformers torch fallback does.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    if conv_state is None:
        conv_state = jnp.zeros((B, C, W), x.dtype)
    full = jnp.concatenate([jnp.swapaxes(conv_state, 1, 2).astype(x.dtype), x], axis=1)  # [B, W+T, C]
    new_state = jnp.swapaxes(full[:, -W:, :], 1, 2).astype(conv_state.dtype)
    fw = full.astype(weight.dtype)
    # output for new token j reads full[j+1 .. j+W]: tap i of the kernel meets full[j+1+i]
    y = sum(fw[:, 1 + i:1 + i + T, :] * weight[:, i] for i in range(W))
    if activation == "silu":
        y = jax.nn.silu(y)
    elif activation is not None:
        raise ValueError(f"activation={activation!r} is not 'silu' or None")
    return y.astype(x.dtype), new_state


def _op(q, k, v, a, b, initial_state, A_log, dt_bias, impl, backend):
    """The gated delta net with l2norm, the gate `-exp(A_log) * softplus(a + dt_bias)` and
    `beta = sigmoid(b)` computed in the op, and the default scale; returns (o, final_state)."""
    return gated_delta_net(q, k, v, a, b, initial_state=initial_state, output_final_state=True,
                           use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                           dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, impl=impl,
                           backend=backend)


def _mask_padding(x, attention_mask):
    if attention_mask is None:
        return x
    return (x * attention_mask[:, :, None]).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------

def gdn_block(params: dict, x: jax.Array, cache: LinearAttentionCache | None = None, *,
              config: GatedDeltaNetConfig, attention_mask: jax.Array | None = None,
              impl: str = "auto", backend: str = "auto"):
    """The Qwen3-Next / Qwen3.5 GatedDeltaNet block.

    x: `[B, T, hidden]`; cache: a `LinearAttentionCache` or None (fresh sequence).
    Prefill (cache None), decode (T = 1) and continued prefill (T > 1 with a cache) are one
    code path. attention_mask `[B, T]` (1 keep, 0 pad) zeroes padded inputs, as transformers
    does. Returns `(y [B, T, hidden], new_cache)`.
    """
    c = config
    B, T, _ = x.shape
    x = _mask_padding(x, attention_mask)
    if cache is None:
        cache = init_gdn_cache(c, B, x.dtype)
    mixed = x @ params["in_proj_qkv"]                               # [B, T, conv_dim]
    z = (x @ params["in_proj_z"]).reshape(B, T, c.num_v_heads, c.head_v_dim)
    b = x @ params["in_proj_b"]
    a = x @ params["in_proj_a"]
    mixed, conv_state = causal_conv1d(mixed, params["conv1d"], cache.conv_state)
    q, k, v = jnp.split(mixed, [c.key_dim, 2 * c.key_dim], axis=-1)
    q = q.reshape(B, T, c.num_k_heads, c.head_k_dim)
    k = k.reshape(B, T, c.num_k_heads, c.head_k_dim)
    v = v.reshape(B, T, c.num_v_heads, c.head_v_dim)
    o, state = _op(q, k, v, a, b, cache.recurrent_state.astype(jnp.float32), params["A_log"],
                   params["dt_bias"], impl, backend)
    o = gated_rms_norm(o, z, params["norm"], c.rms_norm_eps, "silu")
    y = o.reshape(B, T, c.value_dim) @ params["out_proj"]
    return y, LinearAttentionCache(conv_state, state)


def kda_block(params: dict, x: jax.Array, cache: LinearAttentionCache | None = None, *,
              config: KimiDeltaAttentionConfig, attention_mask: jax.Array | None = None,
              impl: str = "auto", backend: str = "auto"):
    """The Kimi Linear Kimi-Delta-Attention block (`KimiLinearDeltaAttention`).

    Same calling convention as `gdn_block`. The gate is per key channel:
    `g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)` of shape `[B, T, H, K]`; the
    output norm is gated by `sigmoid(g_b(g_a(x)))` (not SiLU).
    """
    c = config
    B, T, _ = x.shape
    H, K = c.num_heads, c.head_dim
    x = _mask_padding(x, attention_mask)
    if cache is None:
        cache = init_kda_cache(c, B, x.dtype)
    mixed = jnp.concatenate([x @ params["q_proj"], x @ params["k_proj"], x @ params["v_proj"]], -1)
    mixed, conv_state = causal_conv1d(mixed, params["conv1d"], cache.conv_state)
    q, k, v = (t.reshape(B, T, H, K) for t in jnp.split(mixed, 3, axis=-1))
    f = ((x @ params["f_a_proj"]) @ params["f_b_proj"]).reshape(B, T, H, K)  # the raw gate a
    o, state = _op(q, k, v, f, x @ params["b_proj"], cache.recurrent_state.astype(jnp.float32),
                   params["A_log"], params["dt_bias"], impl, backend)
    gate = ((x @ params["g_a_proj"]) @ params["g_b_proj"]).reshape(B, T, H, K)
    o = gated_rms_norm(o, gate, params["o_norm"], c.rms_norm_eps, "sigmoid")
    y = o.reshape(B, T, c.qkv_dim) @ params["o_proj"]
    return y, LinearAttentionCache(conv_state, state)


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
