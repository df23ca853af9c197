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
zeros", which is exactly a fresh prefill. With a `ServingBatch` the same blocks run one
serving step: prefill and decode requests packed along the token axis, each reading and
writing its own slot of a conv-state pool and a recurrent-state pool. See docs/layers.md for
the API and the transformers quirks that are reproduced here.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._common import _concrete
from ._varlen import token_table
from .api import gated_delta_net

__all__ = [
    "GatedDeltaNetConfig",
    "KimiDeltaAttentionConfig",
    "LinearAttentionCache",
    "ServingBatch",
    "init_gdn_params",
    "init_kda_params",
    "init_gdn_cache",
    "init_kda_cache",
    "gdn_block",
    "kda_block",
    "gated_rms_norm",
    "rms_norm",
    "causal_conv1d",
    "packed_causal_conv1d",
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


class ServingBatch(NamedTuple):
    """Where the requests of one serving step lie in the packed tokens and in the pools.

    cu_seqlens: int32 `[N + 1]`, non-decreasing from 0 to at most T: request n is packed
        tokens `cu_seqlens[n] .. cu_seqlens[n+1] - 1` (a decode request has one token, a
        prefill or a prefill chunk several, an unused entry none). Tokens from
        `cu_seqlens[N]` to T are padding.
    state_indices: int32 `[N]`, the pool slot request n reads and writes (conv state and
        recurrent state alike); -1 marks a padding request (reads and writes nothing, zero
        outputs).
    has_initial_state: bool `[N]` or None (all True): False starts request n from zeros
        (conv and recurrent state) without reading its slot: a new request in a recycled slot.
    output_state_indices: int32 `[N]` or None (= state_indices): the slot request n writes
        its new conv and recurrent state to (prefix caching: continue from one slot, keep it,
        write another); -1 writes nothing. The slots read are left unchanged unless written.
        Two requests writing one slot: which one lands is unspecified.
    """

    cu_seqlens: jax.Array
    state_indices: jax.Array
    has_initial_state: jax.Array | None = None
    output_state_indices: jax.Array | None = None


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


def _check_serving_batch(batch, T: int) -> None:
    """Shapes and dtypes of a ServingBatch at trace time; cu_seqlens' values when concrete."""
    if not isinstance(batch, ServingBatch):
        raise TypeError(f"batch must be a layers.ServingBatch, got {type(batch).__name__}")
    cu, idx, has, out = batch
    for name, arr, dtype in (("cu_seqlens", cu, jnp.int32), ("state_indices", idx, jnp.int32),
                             ("has_initial_state", has, jnp.bool_),
                             ("output_state_indices", out, jnp.int32)):
        if arr is None and name in ("has_initial_state", "output_state_indices"):
            continue
        if not hasattr(arr, "dtype") or jnp.dtype(arr.dtype) != jnp.dtype(dtype) or arr.ndim != 1:
            raise TypeError(f"batch.{name} must be a 1-D {jnp.dtype(dtype)} array, got "
                            f"{getattr(arr, 'dtype', type(arr).__name__)} of shape "
                            f"{getattr(arr, 'shape', None)}")
    N = cu.shape[0] - 1
    if N < 1:
        raise ValueError(f"batch.cu_seqlens must have shape [N + 1] with N >= 1, got {cu.shape}")
    if idx.shape != (N,):
        raise ValueError(f"batch.state_indices must have shape [N]=[{N}] (cu_seqlens has N + 1 "
                         f"entries), got {idx.shape}")
    for name, arr in (("has_initial_state", has), ("output_state_indices", out)):
        if arr is not None and arr.shape != (N,):
            raise ValueError(f"batch.{name} must have shape [N]=[{N}], got {arr.shape}")
    vals = _concrete(cu)
    if vals is not None and (vals[0] != 0 or (np.diff(vals) < 0).any() or vals[-1] > T):
        raise ValueError(f"batch.cu_seqlens must start at 0, not decrease, and end at most at "
                         f"T={T}, got {vals.tolist()}")


def _with_trailing_padding(batch: ServingBatch, T: int) -> ServingBatch:
    """The batch with one more request, slot -1, holding the padding tokens after
    cu_seqlens[N] (possibly none): the op's packed sequences then cover all T tokens."""
    cu, idx, has, out = batch
    has = jnp.ones(idx.shape, jnp.bool_) if has is None else has
    pad = jnp.full((1,), -1, jnp.int32)
    return ServingBatch(jnp.concatenate([cu, jnp.full((1,), T, jnp.int32)]),
                        jnp.concatenate([idx, pad]),
                        jnp.concatenate([has, jnp.zeros((1,), jnp.bool_)]),
                        None if out is None else jnp.concatenate([out, pad]))


def _check_pools(cache, conv_dim: int, width: int, state_shape: tuple) -> None:
    if not isinstance(cache, LinearAttentionCache):
        raise TypeError("with batch=, cache must be a LinearAttentionCache of pools (conv_state "
                        f"[P, conv_dim, kernel], recurrent_state [P, Hv, K, V]), got "
                        f"{type(cache).__name__}")
    P = cache.conv_state.shape[0]
    if tuple(cache.conv_state.shape) != (P, conv_dim, width):
        raise ValueError(f"cache.conv_state must be a pool [P, conv_dim, kernel]=[P, {conv_dim}, "
                         f"{width}], got {tuple(cache.conv_state.shape)}")
    if tuple(cache.recurrent_state.shape) != (P,) + state_shape:
        raise ValueError(f"cache.recurrent_state must be a pool [P, Hv, K, V]={[P, *state_shape]} "
                         f"(P={P} from conv_state), got {tuple(cache.recurrent_state.shape)}")


def packed_causal_conv1d(x: jax.Array, weight: jax.Array, conv_state: jax.Array,
                         batch: ServingBatch, activation: str | None = "silu"):
    """`causal_conv1d` over requests packed along the token axis, each continuing from its
    own slot of a conv-state pool.

    x: `[1, T, C]` packed tokens; weight: `[C, W]`; conv_state: the pool `[P, C, W]`; batch:
    a `ServingBatch` whose cu_seqlens end at T (see `_with_trailing_padding`). A token reads
    only earlier inputs of its own request, then the request's conv state (zeros when
    `has_initial_state` is False): nothing crosses a request boundary. Each request's new conv
    state (its last W pre-conv inputs, the old state's columns in front when the request has
    fewer than W tokens) is written to its slot (`batch.output_state_indices[n]` when given;
    -1 writes nothing); padding requests (slot -1) write nothing, and every other slot is left
    bit-identical. Returns `(y [1, T, C], new pool)`; per request,
    equal to `causal_conv1d` on that request alone.
    """
    _, T, C = x.shape
    W = weight.shape[-1]
    P = conv_state.shape[0]
    cu, idx, has, out = batch
    tok = token_table(cu, T)
    reads = (idx >= 0) if has is None else (idx >= 0) & has
    slot = jnp.clip(idx, 0, P - 1)
    prev = jnp.where(reads[:, None, None], jnp.take(conv_state, slot, axis=0),
                     0).astype(x.dtype)                              # [N, C, W]
    xs = x[0]
    taps = []
    for i in range(W):  # tap i meets the input W-1-i tokens back, as in causal_conv1d
        back = W - 1 - i
        d = tok.pos - back                                         # offset inside the request
        shifted = jnp.concatenate([jnp.zeros((back, C), xs.dtype), xs[:T - back]], axis=0)
        from_state = prev[tok.seq, :, jnp.clip(W + d, 0, W - 1)]     # [T, C]
        taps.append(jnp.where((d >= 0)[:, None], shifted, from_state))
    fw = [t.astype(weight.dtype) for t in taps]
    y = sum(fw[i] * weight[:, i] for i in range(W))
    if activation == "silu":
        y = jax.nn.silu(y)
    elif activation is not None:
        raise ValueError(f"activation={activation!r} is not 'silu' or None")
    # new state column j holds the request's input at offset len - W + j
    d = (tok.lens[:, None] - W + jnp.arange(W)[None, :])            # [N, W]
    from_x = xs[jnp.clip(cu[:-1, None] + d, 0, T - 1)]               # [N, W, C]
    from_prev = jnp.take_along_axis(prev, jnp.clip(W + d, 0, W - 1)[:, None, :], axis=2)
    new = jnp.where((d >= 0)[:, None, :], jnp.swapaxes(from_x, 1, 2), from_prev)
    dst = idx if out is None else out
    write = jnp.where((idx >= 0) & (dst >= 0), dst, P)
    pool = conv_state.at[write].set(new.astype(conv_state.dtype), mode="drop")
    return y.astype(x.dtype)[None], pool


def _packed_op(q, k, v, a, b, pool, batch: ServingBatch, A_log, dt_bias, impl, backend):
    """`_op` over packed requests reading and writing their slots of the state pool."""
    return gated_delta_net(q, k, v, a, b, initial_state=pool, output_final_state=True,
                           cu_seqlens=batch.cu_seqlens, state_indices=batch.state_indices,
                           has_initial_state=batch.has_initial_state,
                           output_state_indices=batch.output_state_indices,
                           use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log,
                           dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, impl=impl,
                           backend=backend)


def _state_in(state):
    """The recurrent state (or pool) as the op takes it: float32, or kept in its 16-bit dtype
    (the op computes in float32 and stores in that dtype: docs/spec.md 2.7)."""
    if jnp.dtype(state.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return state
    return state.astype(jnp.float32)


def _conv(x, weight, conv_state, batch):
    if batch is None:
        return causal_conv1d(x, weight, conv_state)
    return packed_causal_conv1d(x, weight, conv_state, batch)


def _run_op(q, k, v, a, b, state, batch, A_log, dt_bias, impl, backend):
    if batch is None:
        return _op(q, k, v, a, b, state, A_log, dt_bias, impl, backend)
    return _packed_op(q, k, v, a, b, state, batch, A_log, dt_bias, impl, backend)


def _zero_padding(y, batch: ServingBatch | None):
    """y `[1, T, D]` with the tokens of padding requests set to zero (whatever their inputs)."""
    if batch is None:
        return y
    seq = token_table(batch.cu_seqlens, y.shape[1]).seq
    return jnp.where((batch.state_indices[seq] >= 0)[None, :, None], y, jnp.zeros((), y.dtype))


def _serving_inputs(x, cache, batch, attention_mask, conv_dim, width, state_shape):
    """Checks a serving call and returns its batch with the trailing padding request."""
    if attention_mask is not None:
        raise ValueError("attention_mask is not used with batch=: padding tokens are those "
                         "after batch.cu_seqlens[N] or in requests with slot -1")
    if x.ndim != 3 or x.shape[0] != 1:
        raise ValueError(f"with batch=, x must be packed tokens [1, T, hidden], got {x.shape}")
    _check_serving_batch(batch, x.shape[1])
    _check_pools(cache, conv_dim, width, state_shape)
    return _with_trailing_padding(batch, x.shape[1])


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
              impl: str = "auto", backend: str = "auto", batch: ServingBatch | None = None):
    """The Qwen3-Next / Qwen3.5 GatedDeltaNet block.

    x: `[B, T, hidden]`; cache: a `LinearAttentionCache` or None (fresh sequence).
    Prefill (cache None), decode (T = 1) and continued prefill (T > 1 with a cache) are one
    code path. attention_mask `[B, T]` (1 keep, 0 pad) zeroes padded inputs, as transformers
    does. Returns `(y [B, T, hidden], new_cache)`.

    Serving step: with `batch` (a `ServingBatch`), x is `[1, T, hidden]` holding the packed
    tokens of N requests and cache holds pools (`init_gdn_cache(config, P)`); each request
    reads and writes its own slot, padding tokens get zero outputs, and the updated pools are
    returned. Per request, the result equals a call on that request alone with its slots as
    the cache.
    """
    c = config
    B, T, _ = x.shape
    if batch is not None:
        batch = _serving_inputs(x, cache, batch, attention_mask, c.conv_dim, c.conv_kernel_size,
                                (c.num_v_heads, c.head_k_dim, c.head_v_dim))
    x = _mask_padding(x, attention_mask)
    if cache is None:
        cache = init_gdn_cache(c, B, x.dtype)
    mixed = x @ params["in_proj_qkv"]                               # [B, T, conv_dim]
    z = (x @ params["in_proj_z"]).reshape(B, T, c.num_v_heads, c.head_v_dim)
    b = x @ params["in_proj_b"]
    a = x @ params["in_proj_a"]
    mixed, conv_state = _conv(mixed, params["conv1d"], cache.conv_state, batch)
    q, k, v = jnp.split(mixed, [c.key_dim, 2 * c.key_dim], axis=-1)
    q = q.reshape(B, T, c.num_k_heads, c.head_k_dim)
    k = k.reshape(B, T, c.num_k_heads, c.head_k_dim)
    v = v.reshape(B, T, c.num_v_heads, c.head_v_dim)
    o, state = _run_op(q, k, v, a, b, _state_in(cache.recurrent_state), batch,
                       params["A_log"], params["dt_bias"], impl, backend)
    o = gated_rms_norm(o, z, params["norm"], c.rms_norm_eps, "silu")
    y = o.reshape(B, T, c.value_dim) @ params["out_proj"]
    return _zero_padding(y, batch), LinearAttentionCache(conv_state, state)


def kda_block(params: dict, x: jax.Array, cache: LinearAttentionCache | None = None, *,
              config: KimiDeltaAttentionConfig, attention_mask: jax.Array | None = None,
              impl: str = "auto", backend: str = "auto", batch: ServingBatch | None = None):
    """The Kimi Linear Kimi-Delta-Attention block (`KimiLinearDeltaAttention`).

    Same calling convention as `gdn_block`, the serving step (`batch`) included. The gate is
    per key channel: `g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)` of shape
    `[B, T, H, K]`; the output norm is gated by `sigmoid(g_b(g_a(x)))` (not SiLU).
    """
    c = config
    B, T, _ = x.shape
    H, K = c.num_heads, c.head_dim
    if batch is not None:
        batch = _serving_inputs(x, cache, batch, attention_mask, c.conv_dim, c.conv_kernel_size,
                                (H, K, K))
    x = _mask_padding(x, attention_mask)
    if cache is None:
        cache = init_kda_cache(c, B, x.dtype)
    mixed = jnp.concatenate([x @ params["q_proj"], x @ params["k_proj"], x @ params["v_proj"]], -1)
    mixed, conv_state = _conv(mixed, params["conv1d"], cache.conv_state, batch)
    q, k, v = (t.reshape(B, T, H, K) for t in jnp.split(mixed, 3, axis=-1))
    f = ((x @ params["f_a_proj"]) @ params["f_b_proj"]).reshape(B, T, H, K)  # the raw gate a
    o, state = _run_op(q, k, v, f, x @ params["b_proj"], _state_in(cache.recurrent_state),
                       batch, params["A_log"], params["dt_bias"], impl, backend)
    gate = ((x @ params["g_a_proj"]) @ params["g_b_proj"]).reshape(B, T, H, K)
    o = gated_rms_norm(o, gate, params["o_norm"], c.rms_norm_eps, "sigmoid")
    y = o.reshape(B, T, c.qkv_dim) @ params["o_proj"]
    return _zero_padding(y, batch), LinearAttentionCache(conv_state, state)


def param_count(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
