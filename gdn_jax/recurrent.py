"""The fused small-batch (recurrent) path in plain XLA: decode and short runs of tokens.

Each token reads the state once: one dot of the old state against `[a*k ; a*q*scale]`
stacked (a = exp(g)), then one fused elementwise pass writes the new state. The output
uses the old state plus a rank-1 correction: `S_new^T q = S_d^T q + (k . q) u`.
"""
from __future__ import annotations

import jax.numpy as jnp

from ._common import HIGHEST, prepare
from ._varlen import run_tokens


def _matvec(S, x, vk: bool, precision=HIGHEST):
    """`[.., K, V]` states (`[.., V, K]` when vk) against `[.., 2, K]` vectors, in one read of
    S where it lies (never transposed): `(S^T x_0, S^T x_1)`, each `[.., V]`.

    x is broadcast to S's batch axes (a few KiB) so the product is a batched dot whose
    batch axes lead on both sides: XLA then reads S in place with no transpose. Measured on
    the 2-core CPU this beat both a dot that shares x over the head group (it transposes S)
    and a multiply-and-reduce (README, "Decode").
    """
    x = jnp.broadcast_to(x, S.shape[:-2] + x.shape[-2:])
    if vk:
        # S [.., V, K] times x^T [.., K, 2], result kept [.., V, 2]: XLA CPU runs this dot at
        # the "kv" speed. Any form with a [.., 2, V] result (einsum over x's last axis, or
        # this product transposed, which XLA folds into the dot) ran about 8x slower.
        p = jnp.matmul(S, jnp.swapaxes(x, -1, -2), precision=precision)
        return p[..., 0], p[..., 1]
    p = jnp.einsum("...jk,...kv->...jv", x, S, precision=precision)
    return p[..., 0, :], p[..., 1, :]


def _step(S, q_t, k_t, v_t, g_t, b_t, *, scale: float, kda: bool, vk: bool = False,
          precision=HIGHEST):
    """One token for every sequence and head.

    S: [B, Hv, K, V] ([B, Hv, V, K] when vk: the same maths in the caller's layout); q_t, k_t:
    [B, Hk, K]; v_t: [B, Hv, V]; g_t: [B, Hv] or [B, Hv, K]; b_t: [B, Hv]. The matvecs read S grouped as [B, Hk, G, K, V] (a free reshape), so q and k
    are used per q/k head. The state keeps its [B, Hv, K, V] shape: XLA updates a donated
    buffer in place only when the update's input and output shapes agree.
    """
    B, Hv = S.shape[:2]
    K = k_t.shape[-1]
    V = v_t.shape[-1]
    Hk = k_t.shape[1]
    G = Hv // Hk
    a = jnp.exp(g_t)
    qs = q_t * scale
    S5 = S.reshape((B, Hk, G) + S.shape[2:])
    if kda:
        # decay on the key rows: S_d^T x = S^T (a * x), per value head
        a5 = a.reshape(B, Hk, G, K)
        x = jnp.stack([a5 * k_t[:, :, None], a5 * qs[:, :, None]], axis=3)  # [B, Hk, G, 2, K]
        sk, sq = _matvec(S5, x, vk, precision)
    else:
        x = jnp.stack([k_t, qs], axis=2)[:, :, None]  # [B, Hk, 1, 2, K], shared by the G value heads
        a4 = a.reshape(B, Hk, G, 1)
        sk, sq = (p * a4 for p in _matvec(S5, x, vk, precision))
    sk, sq = sk.reshape(B, Hv, V), sq.reshape(B, Hv, V)  # S_d^T k, S_d^T (scale q)
    u = b_t[..., None] * (v_t - sk)
    kq = jnp.sum(k_t * qs, axis=-1)  # [B, Hk]
    o_t = sq + jnp.repeat(kq, G, axis=1)[..., None] * u
    # one token's k per value head ([B, Hv, K], tiny) for the fused in-place update of S
    k_v = jnp.broadcast_to(k_t[:, :, None], (B, Hk, G, K)).reshape(B, Hv, K)
    if vk:
        decay = a[..., None, :] if kda else a[..., None, None]
        S = S * decay + u[..., :, None] * k_v[..., None, :]
    else:
        decay = a[..., :, None] if kda else a[..., None, None]
        S = S * decay + k_v[..., :, None] * u[..., None, :]
    return S, o_t


def recurrent_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                              use_qk_l2norm: bool = False, cu_seqlens=None,
                              num_snapshots: int = 0, state_layout: str = "kv",
                              dot_precision=HIGHEST):
    """Token-by-token recurrence with one read and one write of the state per token.

    Same arguments and results as `reference_gated_delta_net` (packed sequences and
    snapshots included); with `state_layout="vk"` the initial state, final state and
    snapshots are `[.., Hv, V, K]` and the state is used in that layout, never transposed. For T = 1 no loop is built, so `jax.jit(..., donate_argnums=...)`
    updates a donated state in place.
    """
    out_dtype = q.dtype
    kda = g.ndim == 4
    q, k, v, g, beta = prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)

    def step(S, xs):
        return _step(S, *xs, scale=scale, kda=kda, vk=state_layout == "vk",
                     precision=dot_precision)

    o, S, snaps = run_tokens(step, initial_state.astype(jnp.float32), (q, k, v, g, beta),
                             cu_seqlens=cu_seqlens, num_snapshots=num_snapshots)
    o = o.astype(out_dtype)
    return (o, S) if not num_snapshots else (o, S, snaps)
