"""The fused small-batch (recurrent) path in plain XLA: decode and short runs of tokens.

Each token reads the state once: one dot of the old state against `[a*k ; a*q*scale]`
stacked (a = exp(g)), then one fused elementwise pass writes the new state. The output
uses the old state plus a rank-1 correction: `S_new^T q = S_d^T q + (k . q) u`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ._common import HIGHEST, prepare
from ._varlen import run_tokens


def _matvec(S, x):
    """`[.., K, V]` states against `[.., 2, K]` vectors -> `[.., 2, V]`, in one read of S.

    x is broadcast to S's batch axes (a few KiB) so the product is a batched dot whose
    batch axes lead on both sides: XLA then reads S in place with no transpose. Measured on
    the 2-core CPU this beat both a dot that shares x over the head group (it transposes S)
    and a multiply-and-reduce (README, "Decode").
    """
    x = jnp.broadcast_to(x, S.shape[:-2] + x.shape[-2:])
    return jnp.einsum("...jk,...kv->...jv", x, S, precision=HIGHEST)


def _step(S, q_t, k_t, v_t, g_t, b_t, *, scale: float, kda: bool):
    """One token for every sequence and head.

    S: [B, Hv, K, V]; q_t, k_t: [B, Hk, K]; v_t: [B, Hv, V]; g_t: [B, Hv] or [B, Hv, K];
    b_t: [B, Hv]. The matvecs read S grouped as [B, Hk, G, K, V] (a free reshape), so q and k
    are used per q/k head. The state keeps its [B, Hv, K, V] shape: XLA updates a donated
    buffer in place only when the update's input and output shapes agree.
    """
    B, Hv, K, V = S.shape
    Hk = k_t.shape[1]
    G = Hv // Hk
    a = jnp.exp(g_t)
    qs = q_t * scale
    S5 = S.reshape(B, Hk, G, K, V)
    if kda:
        # decay on the key rows: S_d^T x = S^T (a * x), per value head
        a5 = a.reshape(B, Hk, G, K)
        x = jnp.stack([a5 * k_t[:, :, None], a5 * qs[:, :, None]], axis=3)  # [B, Hk, G, 2, K]
        p = _matvec(S5, x)
    else:
        x = jnp.stack([k_t, qs], axis=2)[:, :, None]  # [B, Hk, 1, 2, K], shared by the G value heads
        p = _matvec(S5, x) * a.reshape(B, Hk, G, 1, 1)
    p = p.reshape(B, Hv, 2, V)
    sk, sq = p[:, :, 0], p[:, :, 1]  # S_d^T k, S_d^T (scale q): [B, Hv, V]
    u = b_t[..., None] * (v_t - sk)
    kq = jnp.sum(k_t * qs, axis=-1)  # [B, Hk]
    o_t = sq + jnp.repeat(kq, G, axis=1)[..., None] * u
    # one token's k per value head ([B, Hv, K], tiny) for the fused in-place update of S
    k_v = jnp.broadcast_to(k_t[:, :, None], (B, Hk, G, K)).reshape(B, Hv, K)
    decay = a[..., :, None] if kda else a[..., None, None]
    S = S * decay + k_v[..., :, None] * u[..., None, :]
    return S, o_t


def recurrent_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                              use_qk_l2norm: bool = False, cu_seqlens=None,
                              num_snapshots: int = 0):
    """Token-by-token recurrence with one read and one write of the state per token.

    Same arguments and results as `reference_gated_delta_net` (packed sequences and
    snapshots included). For T = 1 no loop is built, so `jax.jit(..., donate_argnums=...)`
    updates a donated state in place.
    """
    out_dtype = q.dtype
    kda = g.ndim == 4
    q, k, v, g, beta = prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)

    def step(S, xs):
        return _step(S, *xs, scale=scale, kda=kda)

    o, S, snaps = run_tokens(step, initial_state.astype(jnp.float32), (q, k, v, g, beta),
                             cu_seqlens=cu_seqlens, num_snapshots=num_snapshots)
    o = o.astype(out_dtype)
    return (o, S) if not num_snapshots else (o, S, snaps)
