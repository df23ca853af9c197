"""The fused small-batch (recurrent) path in plain XLA: decode and short runs of tokens.

Each token reads the state once: one dot of the old state against `[a*k ; a*q*scale]`
stacked (a = exp(g)), then one fused elementwise pass writes the new state. The output
uses the old state plus a rank-1 correction: `S_new^T q = S_d^T q + (k . q) u`.

A large state (over `BLOCK_BYTES`) is run in blocks of value heads: a loop over blocks, each
block taken through every token before the next. The block stays in the CPU's cache between
the matvecs and the update and across tokens, so the state crosses memory once per call (one
read, one in-place write) rather than three times per token.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._common import HIGHEST, prepare
from ._varlen import run_tokens


# Bytes of float32 state per head block. Measured on the 2-core CPU (B=32, Hv=32, K=V=128
# decode step, 64 MiB state): 4 MiB blocks beat 2 MiB and 8 MiB ones and the unblocked step
# (README, "Decode").
BLOCK_BYTES = 4 << 20


def _matvec(S, x, vk: bool, precision=HIGHEST, cached: bool = False):
    """`[.., K, V]` states (`[.., V, K]` when vk) against `[.., 2, K]` vectors, in one read of
    S where it lies (never transposed): `(S^T x_0, S^T x_1)`, each `[.., V]`.

    x is broadcast to S's batch axes (a few KiB) so the product is a batched dot whose
    batch axes lead on both sides: XLA then reads S in place with no transpose. Measured on
    the 2-core CPU this beat both a dot that shares x over the head group (it transposes S)
    and a multiply-and-reduce (README, "Decode").
    """
    x = jnp.broadcast_to(x, S.shape[:-2] + x.shape[-2:])
    if vk and cached:
        # a cache-resident block (`_run_head_blocks`): two matrix-vector products (the second
        # read of S hits the cache) beat the N=2 product below, slow on XLA CPU in this layout
        return tuple(jnp.einsum("...vk,...k->...v", S, x[..., j, :], precision=precision)
                     for j in (0, 1))
    if vk:
        # S [.., V, K] times x^T [.., K, 2], result kept [.., V, 2]: XLA CPU runs this dot at
        # the "kv" speed. Any form with a [.., 2, V] result (einsum over x's last axis, or
        # this product transposed, which XLA folds into the dot) ran about 8x slower.
        p = jnp.matmul(S, jnp.swapaxes(x, -1, -2), precision=precision)
        return p[..., 0], p[..., 1]
    p = jnp.einsum("...jk,...kv->...jv", x, S, precision=precision)
    return p[..., 0, :], p[..., 1, :]


def _step(S, q_t, k_t, v_t, g_t, b_t, *, scale: float, kda: bool, vk: bool = False,
          precision=HIGHEST, cached: bool = False):
    """One token for every sequence and head.

    S: [B, Hv, K, V] ([B, Hv, V, K] when vk: the same maths in the caller's layout); q_t, k_t:
    [B, Hk, K]; v_t: [B, Hv, V]; g_t: [B, Hv] or [B, Hv, K]; b_t: [B, Hv]. The matvecs read S grouped as [B, Hk, G, K, V] (a free reshape), so q and k
    are used per q/k head. The state keeps its [B, Hv, K, V] shape: XLA updates a donated
    buffer in place only when the update's input and output shapes agree. cached: S is a
    cache-sized block of `_run_head_blocks` (picks the matvec form that is fastest there).
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
        sk, sq = _matvec(S5, x, vk, precision, cached)
    else:
        x = jnp.stack([k_t, qs], axis=2)[:, :, None]  # [B, Hk, 1, 2, K], shared by the G value heads
        a4 = a.reshape(B, Hk, G, 1)
        sk, sq = (p * a4 for p in _matvec(S5, x, vk, precision, cached))
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


def _bf16_bits(x):
    """float32 -> the uint16 bits of bfloat16, round to nearest even (`x.astype(bfloat16)`
    bit for bit, NaN stays NaN) in integer ops: XLA CPU's own convert calls a library routine
    per element on CPUs without bfloat16 instructions, which made a bf16 decode step slower
    than a float32 one."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    r = (u + jnp.uint32(0x7FFF) + ((u >> 16) & jnp.uint32(1))) >> 16
    r = jnp.where(jnp.isnan(x), (u >> 16) | jnp.uint32(0x0040), r)  # quiet NaN, sign kept
    return r.astype(jnp.uint16)


def _bf16_widen(b):
    """The uint16 bits of bfloat16 -> float32 (exact)."""
    return jax.lax.bitcast_convert_type(b.astype(jnp.uint32) << 16, jnp.float32)


def _head_block(num_heads: int, head_bytes: int) -> int:
    """The largest divisor of num_heads whose heads fit in BLOCK_BYTES (at least 1)."""
    fit = max(1, BLOCK_BYTES // head_bytes)
    return max(c for c in range(1, min(fit, num_heads) + 1) if num_heads % c == 0)


def _run_head_blocks(step, S, xs, num_snapshots: int = 0, slots=None,
                     checkpoint_every: int = 0):
    """`run_tokens` for B sequences (not packed), one block of value heads at a time.

    The state `[B, Hv, ..]` is viewed as B*Hv single-head sequences (a free reshape); q and k
    are repeated to the value heads (tokens-sized, small next to the state). A `fori_loop`
    slices one block of heads, runs all its tokens (`run_tokens`, snapshots included), and
    writes it back in place (`dynamic_update_slice` on the loop carry, so a donated state is
    updated in place). The carry keeps S's dtype (a 16-bit state is widened to float32 one
    block at a time). Returns (o, final state, snapshots or None[, checkpoints]) as
    run_tokens does, the states in S's dtype.

    slots = (read, write, has): S is then a pool `[P, Hv, ..]` and sequence n's blocks are read
    from slot read[n] (zeros for -1 or has[n] False) and written to slot write[n] (read[n] when
    write is None; nothing for -1 or a padding sequence: the slot's own bits are written back).
    Blocks stay inside one sequence (the block size divides Hv) and sequences run in order,
    so no gather or scatter of whole states is built (XLA CPU runs those serially).
    """
    q, k, v, g, beta = xs
    B, T, Hk = q.shape[:3]
    Hv = v.shape[2]
    N = B * Hv
    G = Hv // Hk
    ns = int(num_snapshots)
    tail = S.shape[2:]
    ce = int(checkpoint_every)
    J = T // ce if ce else 0

    def per_head(x, repeat=False):  # [B, T, H, ..] -> [N, T, ..]
        if repeat:
            x = jnp.repeat(x, G, axis=2)
        x = jnp.moveaxis(x, 2, 1)
        return x.reshape((N, T) + x.shape[3:])

    # no unit head axis on the loop carries: XLA gives such an axis its own layout and then
    # copies the whole state into and out of the loop
    flat = (per_head(q, True), per_head(k, True), per_head(v), per_head(g), per_head(beta))
    head_bytes = math.prod(tail) * 4
    # A bfloat16 state rides the loop as its bits (uint16): XLA CPU widens bfloat16 selects and
    # dynamic-update-slices to float32 over the whole operand (a full convert of the state per
    # block; float16 ones it runs natively); on integers they stay in place.
    sd = S.dtype
    bf16 = jnp.dtype(sd) == jnp.dtype(jnp.bfloat16)
    if bf16:
        S = jax.lax.bitcast_convert_type(S, jnp.uint16)

    def widen(x):  # stored block -> float32
        return _bf16_widen(x) if bf16 else x.astype(jnp.float32)

    def narrow(x):  # float32 block -> stored (round to nearest)
        return _bf16_bits(x) if bf16 else x.astype(sd)

    if slots is None:
        Sf = S.reshape((N,) + tail)
        c = _head_block(N, head_bytes)
    else:
        Sf = S
        c = _head_block(Hv, head_bytes)
        read, write, has = slots
        P = S.shape[0]
        use = read >= 0 if has is None else (read >= 0) & has
        dst = read if write is None else write
        wvalid = (read >= 0) & (dst >= 0) & (dst < P)
        read, dst = jnp.clip(read, 0, P - 1), jnp.clip(dst, 0, P - 1)
    per_seq = Hv // c

    def load(Sf, i):
        if slots is None:
            return jax.lax.dynamic_slice_in_dim(Sf, i * c, c, 0)
        n, h = i // per_seq, (i % per_seq) * c
        blk = jax.lax.dynamic_slice(Sf, (read[n], h) + (0,) * len(tail), (1, c) + tail)[0]
        return jnp.where(use[n], blk, jnp.zeros((), blk.dtype))

    def store(Sf, i, new):
        if slots is None:
            return jax.lax.dynamic_update_slice_in_dim(Sf, new, i * c, 0)
        n, h = i // per_seq, (i % per_seq) * c
        at = (dst[n], h) + (0,) * len(tail)
        old = jax.lax.dynamic_slice(Sf, at, (1, c) + tail)[0]
        return jax.lax.dynamic_update_slice(Sf, jnp.where(wvalid[n], new, old)[None], at)

    def block(i, carry):
        Sf, o, snaps, ckpts = carry
        xb = tuple(jax.lax.dynamic_slice_in_dim(x, i * c, c, 0)[:, :, None] for x in flat)
        Sb = widen(load(Sf, i)[:, None])
        ob, Sb, sb, *cb = run_tokens(lambda S_, x_t: step(S_, x_t, cached=True), Sb, xb,
                                     num_snapshots=ns, checkpoint_every=ce)
        Sf = store(Sf, i, narrow(Sb[:, 0]))
        o = jax.lax.dynamic_update_slice_in_dim(o, ob[:, :, 0], i * c, 0)
        if ns:
            snaps = jax.lax.dynamic_update_slice_in_dim(snaps, narrow(sb[:, :, 0]), i * c, 0)
        if ce:
            ckpts = jax.lax.dynamic_update_slice_in_dim(ckpts, narrow(cb[0][:, :, 0]), i * c, 0)
        return Sf, o, snaps, ckpts

    o0 = jnp.zeros((N, T, v.shape[-1]), jnp.float32)
    snaps0 = jnp.zeros((N, ns) + tail, S.dtype) if ns else None
    ckpts0 = jnp.zeros((N, J) + tail, S.dtype) if ce else None
    Sf, o, snaps, ckpts = jax.lax.fori_loop(0, N // c, block, (Sf, o0, snaps0, ckpts0))
    o = jnp.moveaxis(o.reshape(B, Hv, T, -1), 1, 2)
    Sf = Sf.reshape(S.shape)
    if ns:
        snaps = jnp.moveaxis(snaps.reshape((B, Hv, ns) + tail), 2, 1)
    if ce:
        ckpts = jnp.moveaxis(ckpts.reshape((B, Hv, J) + tail), 2, 1)
    if bf16:
        Sf = jax.lax.bitcast_convert_type(Sf, sd)
        snaps = None if snaps is None else jax.lax.bitcast_convert_type(snaps, sd)
        ckpts = None if ckpts is None else jax.lax.bitcast_convert_type(ckpts, sd)
    return (o, Sf, snaps) if not ce else (o, Sf, snaps, ckpts)


def recurrent_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                              use_qk_l2norm: bool = False, cu_seqlens=None,
                              num_snapshots: int = 0, state_layout: str = "kv",
                              dot_precision=HIGHEST, slots=None, checkpoint_every: int = 0):
    """Token-by-token recurrence with one read and one write of the state per token.

    Same arguments and results as `reference_gated_delta_net` (packed sequences and
    snapshots included); with `state_layout="vk"` the initial state, final state and
    snapshots are `[.., Hv, V, K]` and the state is used in that layout, never transposed.
    The state may be float32, bfloat16 or float16: the maths is float32, the final state,
    snapshots and checkpoints are stored in the initial state's dtype (round to nearest).
    slots = (read, write, has) (B sequences, not packed): initial_state is a pool `[P, ..]`,
    read and written in place per sequence (`_run_head_blocks`); returns the pool.
    checkpoint_every=n > 0: also returns the states after every n tokens (as the reference).
    A donated state (`jax.jit(..., donate_argnums=...)`) is updated in place: a small state by
    one step per token (no loop for T = 1), a state over `BLOCK_BYTES` (not packed) one
    cache-sized block of heads at a time.
    """
    out_dtype = q.dtype
    kda = g.ndim == 4
    q, k, v, g, beta = prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)

    def step(S, xs, cached=False):
        return _step(S, *xs, scale=scale, kda=kda, vk=state_layout == "vk",
                     precision=dot_precision, cached=cached)

    xs = (q, k, v, g, beta)
    sd = initial_state.dtype
    num_heads = initial_state.shape[0] * initial_state.shape[1]
    head_bytes = math.prod(initial_state.shape[2:]) * 4
    if slots is not None:
        if cu_seqlens is not None:
            raise ValueError("slots: a state pool here takes B sequences, not cu_seqlens")
        o, S, snaps, *ckpts = _run_head_blocks(step, initial_state, xs, num_snapshots,
                                               slots=slots, checkpoint_every=checkpoint_every)
    elif (cu_seqlens is None and q.shape[1] > 0
            and _head_block(num_heads, head_bytes) < num_heads):
        o, S, snaps, *ckpts = _run_head_blocks(step, initial_state, xs, num_snapshots,
                                               checkpoint_every=checkpoint_every)
    else:
        o, S, snaps, *ckpts = run_tokens(step, initial_state.astype(jnp.float32), xs,
                                         cu_seqlens=cu_seqlens, num_snapshots=num_snapshots,
                                         checkpoint_every=checkpoint_every)
        S = S.astype(sd)
        snaps = None if snaps is None else snaps.astype(sd)
        ckpts = [c.astype(sd) for c in ckpts]
    o = o.astype(out_dtype)
    return (o, S, *([snaps] if num_snapshots else []), *ckpts)
