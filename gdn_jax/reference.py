"""The oracle: the gated delta rule as a token-by-token `jax.lax.scan`, float32.

Written for clarity, not speed. Every other path is tested against it; it is also
differentiable by plain autodiff (it stores one state per token for the backward).
"""
from __future__ import annotations

import jax.numpy as jnp

from ._common import HIGHEST, prepare
from ._varlen import run_tokens


def reference_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                              use_qk_l2norm: bool = False, cu_seqlens=None,
                              num_snapshots: int = 0, checkpoint_every: int = 0):
    """Runs the recurrence of docs/spec.md section 1 literally, one token at a time.

    Args: canonical arrays (see `gdn_jax._common`); `initial_state` is `[N, Hv, K, V]`
    float32, bfloat16 or float16 (N = B, or the number of packed sequences with `cu_seqlens`,
    B == 1). Returns `(o [B, T, Hv, V] in q.dtype, final_state [N, Hv, K, V])`, plus
    snapshots `[N, num_snapshots, Hv, K, V]` when `num_snapshots > 0` (docs/spec.md section
    2.5), or checkpoints `[N, T // n, Hv, K, V]` when `checkpoint_every=n > 0` (section 2.5b);
    the maths is float32, states are stored in initial_state's dtype.
    """
    out_dtype = q.dtype
    q, k, v, g, beta = prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)
    group = v.shape[2] // q.shape[2]
    # Clarity over speed: materialise the q/k head of every value head.
    q = jnp.repeat(q, group, axis=2)
    k = jnp.repeat(k, group, axis=2)
    kda = g.ndim == 4

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t = xs  # [B, Hv, K], [B, Hv, K], [B, Hv, V], [B, Hv(, K)], [B, Hv]
        decay = jnp.exp(g_t)
        S = S * (decay[..., :, None] if kda else decay[..., None, None])
        u = b_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", S, k_t, precision=HIGHEST))
        S = S + k_t[..., :, None] * u[..., None, :]
        o_t = jnp.einsum("bhkv,bhk->bhv", S, q_t * scale, precision=HIGHEST)
        return S, o_t

    o, S, snaps, *ckpts = run_tokens(step, initial_state.astype(jnp.float32),
                                     (q, k, v, g, beta), cu_seqlens=cu_seqlens,
                                     num_snapshots=num_snapshots, checkpoint_every=checkpoint_every)
    sd = initial_state.dtype
    o, S = o.astype(out_dtype), S.astype(sd)
    return (o, S, *([snaps.astype(sd)] if num_snapshots else []), *(c.astype(sd) for c in ckpts))
