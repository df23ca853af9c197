"""The fused small-batch (recurrent) path in plain XLA: decode and short runs of tokens.

Each token reads the state once: one dot of the old state against `[a*k ; a*q*scale]`
stacked (a = exp(g)), then one fused elementwise pass writes the new state. The output
uses the old state plus a rank-1 correction: `S_new^T q = S_d^T q + (k . q) u`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import HIGHEST, prepare


def _step(S, q_t, k_t, v_t, g_t, b_t, *, scale: float, kda: bool):
    """One token for every sequence and head.

    S: [B, Hk, G, K, V] (value heads grouped under their q/k head); q_t, k_t: [B, Hk, K];
    v_t: [B, Hk, G, V]; g_t: [B, Hk, G] or [B, Hk, G, K]; b_t: [B, Hk, G].
    """
    a = jnp.exp(g_t)
    qs = q_t * scale
    if kda:
        # decay on the key rows: S_d^T x = S^T (a * x), per value head
        x = jnp.stack([a * k_t[:, :, None], a * qs[:, :, None]], axis=3)  # [B, Hk, G, 2, K]
        p = jnp.einsum("bhgkv,bhgjk->bhgjv", S, x, precision=HIGHEST)
    else:
        x = jnp.stack([k_t, qs], axis=2)  # [B, Hk, 2, K], shared by the G value heads
        p = jnp.einsum("bhgkv,bhjk->bhgjv", S, x, precision=HIGHEST) * a[..., None, None]
    sk, sq = p[..., 0, :], p[..., 1, :]  # S_d^T k, S_d^T (scale q): [B, Hk, G, V]
    u = b_t[..., None] * (v_t - sk)
    o_t = sq + jnp.sum(k_t * qs, axis=-1)[:, :, None, None] * u
    decay = a[..., :, None] if kda else a[..., None, None]
    S = S * decay + k_t[:, :, None, :, None] * u[..., None, :]
    return S, o_t


def recurrent_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                              use_qk_l2norm: bool = False):
    """Token-by-token recurrence with one read and one write of the state per token.

    Same arguments and results as `reference_gated_delta_net`. For T = 1 no loop is
    built, so `jax.jit(..., donate_argnums=...)` updates a donated state in place.
    """
    out_dtype = q.dtype
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    G = Hv // Hk
    kda = g.ndim == 4
    q, k, v, g, beta = prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)
    v = v.reshape(B, T, Hk, G, V)
    g = g.reshape((B, T, Hk, G, K) if kda else (B, T, Hk, G))
    beta = beta.reshape(B, T, Hk, G)
    S = initial_state.astype(jnp.float32).reshape(B, Hk, G, K, V)

    def step(S, xs):
        return _step(S, *xs, scale=scale, kda=kda)

    if T == 1:
        S, o = step(S, tuple(x[:, 0] for x in (q, k, v, g, beta)))
        o = o[:, None]
    else:
        xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
        S, o = jax.lax.scan(step, S, xs)
        o = jnp.moveaxis(o, 0, 1)
    return o.reshape(B, T, Hv, V).astype(out_dtype), S.reshape(B, Hv, K, V)
