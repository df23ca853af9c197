"""Fused recurrent gated delta rule (GDA and KDA) as one Pallas Triton kernel.

The small-T path (decode, speculative verification, short chunks): every program owns the
state tile of one (sequence n, value head h, block of BV value columns), loads it once,
loops over the T tokens with the tile held in registers, and stores it once. Reads and
writes of the state are therefore `2 * N * Hv * K * V * 4` bytes per call (docs/spec.md 6.2).

Grid: `(N, Hv, V // BV)`, all parallel. Value head h reads q/k head `h // (Hv // Hk)`
through the BlockSpec index map (no repeated q/k). The value axis is split over programs
(BV columns each) so that K = V = 128 fits in registers without spills (docs/spec.md 6.4).

State layout (docs/spec.md 6.3). The kernel computes on a `[BV, K]` tile: K is the fastest axis, so
the two matvecs per token (`S^T k`, `S^T q`, sums over K) reduce inside a warp (butterfly
shuffles) and the rank-1 update broadcasts along it.

- `state_layout="vk"` (`[N, Hv, V, K]`) is the kernel's native layout: a program's tile is
  one contiguous `BV * K * 4`-byte span of memory, loaded and stored with 16-byte accesses.
- `state_layout="kv"` (`[N, Hv, K, V]`, the public layout) is converted inside the kernel, not
  by XLA: the program reads its `[K, BV]` tile (K rows of BV contiguous floats, 64 bytes at
  BV = 16: whole sectors, still 16-byte vector loads) and transposes it on chip; the final state
  is written back the same way. HBM traffic equals "vk" (no XLA transpose, no extra pass). The
  cost is on chip: Triton keeps the load's V-fastest layout through the token loop, so the
  reductions over K cross warps (more shared-memory round trips per token) and it needs ~8 more
  registers. Decode loops that own their state keep it in "vk" and skip all of that.

No `dot` is used: at one token per step the matvecs are multiply-and-reduce in float32,
exact on the GPU as in interpret mode (there is no TF32 path to guard against).

Packed sequences, state pools, snapshots (semantics: docs/spec.md sections 2.3-2.5).
The Triton backend has no scalar prefetch, so data-dependent addressing happens inside the
kernel, not in index maps:

- `cu_seqlens`: the grid stays `(N, Hv, V // BV)`; program n reads `cu[n]`, `cu[n+1]` from a
  whole-array int32 input and loops over its own tokens of the single packed row (a
  `fori_loop` with traced bounds, which the Triton lowering turns into an `scf.for`). One
  compiled program serves every split of T tokens into N sequences.
- `state_indices`: the pool `[P, ...]` is passed whole along P and aliased to the final state;
  program n loads and stores slot `state_indices[n]` only (masked load, guarded store), so every
  other slot keeps its bytes and a donated pool is updated in place.
- `num_snapshots`: the state tile is also stored after each of the last ns tokens of the
  sequence (a uniform branch per token) into `[N, ns, ...]`; slots before the first token get
  the initial state.
- per-token write slots (`output_state_indices` `[N, W]`, speculative decoding): the tile is
  stored into pool slot `output_state_indices[n, t - bos]` after each token t (a uniform
  guarded store), and not at the end; the pool stays aliased to the final state.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN, L2NORM_EPS
from . import _platform
from ._checks import (check_cu_seqlens, check_inputs, check_state_dtype, is_int_dtype,
                      pow2)

__all__ = ["supports", "fused_recurrent", "choose_config", "STATE_LAYOUTS", "NATIVE_STATE_LAYOUT"]

STATE_LAYOUTS = ("kv", "vk")
NATIVE_STATE_LAYOUT = "vk"
MIN_HEAD, MAX_HEAD = 16, 256
# State elements per program (float32): 16 per thread at 4 warps. 4096 (BV = 32 at K = 128)
# compiles without spills at T = 1 but spills a few bytes at T = 8 with prefetching (96 registers);
# 2048 (BV = 16) needs 56-64 registers at any T and fits 8-9 blocks per SM.
_MAX_TILE = 2048
# Programs wanted at least, for latency hiding on 132 SMs; BV shrinks (down to 8) to reach it.
_MIN_PROGRAMS = 264


def supports(q, k, v, g, beta, initial_state=None, *, state_layout: str = "kv",
             cu_seqlens=None, state_indices=None, num_snapshots: int = 0,
             output_state_indices=None, has_initial_state=None):
    """None if `fused_recurrent` can serve these shapes/dtypes, else the reason (a str).

    Looks at shapes and dtypes only (ShapeDtypeStructs work); never at the default device and
    never at the values of `cu_seqlens` / `state_indices` (they may be traced).
    The platform is decided at lowering (see `_platform`): off-GPU the call needs interpret=True.

    With `cu_seqlens` (integer `[N + 1]`, N >= 1) B must be 1; with `state_indices` (integer
    `[N]`, N = B or the number of packed sequences) `initial_state` is the pool `[P, Hv, K, V]`
    ("kv") / `[P, Hv, V, K]` ("vk"), P >= 1, and is required. `num_snapshots` is a Python int >= 0.
    """
    if state_layout not in STATE_LAYOUTS:
        return f"state_layout={state_layout!r} is not one of {STATE_LAYOUTS}"
    reason = check_inputs(q, k, v, g, beta,
                          head_ok=lambda d: MIN_HEAD <= d <= MAX_HEAD and pow2(d),
                          head_need=f"a power of two in [{MIN_HEAD}, {MAX_HEAD}]",
                          what="Pallas recurrent kernel")
    if reason is not None:
        return reason
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    if tuple(g.shape) not in ((B, T, Hv), (B, T, Hv, K)):
        return f"g shape {tuple(g.shape)} is neither [B, T, Hv] nor [B, T, Hv, K]"
    if (isinstance(num_snapshots, bool) or not isinstance(num_snapshots, numbers.Integral)
            or num_snapshots < 0):
        return f"num_snapshots={num_snapshots!r} is not a Python int >= 0"
    N = B
    if cu_seqlens is not None:
        reason = check_cu_seqlens(cu_seqlens, B, int32_only=False)
        if reason is not None:
            return reason
        N = cu_seqlens.shape[0] - 1
    if state_indices is not None:
        if getattr(state_indices, "ndim", None) != 1 or state_indices.shape[0] != N:
            return (f"state_indices shape {tuple(getattr(state_indices, 'shape', ()))} is not "
                    f"[N] = [{N}]")
        if not is_int_dtype(state_indices):
            return f"state_indices dtype {state_indices.dtype} is not an integer dtype"
        if initial_state is None:
            return "state_indices needs initial_state (the state pool [P, Hv, ...])"
    for name, x, dtype_ok in (("output_state_indices", output_state_indices, is_int_dtype),
                              ("has_initial_state", has_initial_state,
                               lambda a: jnp.dtype(a.dtype) == jnp.bool_)):
        if x is None:
            continue
        if state_indices is None:
            return f"{name} is taken with state_indices (a pool) only"
        if name == "output_state_indices" and getattr(x, "ndim", None) == 2:
            # a per-token write table [N, W]: W == T, or any W >= 1 with cu_seqlens
            W = x.shape[1]
            if x.shape[0] != N or W < 1 or (cu_seqlens is None and W != T) or not dtype_ok(x):
                return (f"output_state_indices as a per-token table must be [N, W] = [{N}, "
                        f"{T if cu_seqlens is None else 'W >= 1'}] of an integer dtype, got "
                        f"{tuple(x.shape)} {x.dtype}")
            if num_snapshots:
                return "per-token write slots and num_snapshots are exclusive"
            continue
        if getattr(x, "ndim", None) != 1 or x.shape[0] != N or not dtype_ok(x):
            return f"{name} must be [N] = [{N}] of the right dtype, got {getattr(x, 'shape', x)}"
    if initial_state is not None:
        pool = state_indices is not None
        lead = initial_state.shape[0] if (pool and getattr(initial_state, "ndim", 0) == 4) else N
        want = (lead, Hv, K, V) if state_layout == "kv" else (lead, Hv, V, K)
        if tuple(initial_state.shape) != want:
            what, shown = ("state pool", ["P", *want[1:]]) if pool else ("initial_state", list(want))
            return (f"{what} shape {tuple(initial_state.shape)} does not match the "
                    f"{state_layout!r} layout {shown}")
        if lead < 1:
            return "the state pool has no slots (P = 0)"
        return check_state_dtype(initial_state)
    return None


def choose_config(B: int, Hv: int, K: int, V: int, block_v: int | None = None):
    """(BV, num_warps) for one call.

    BV: at most `_MAX_TILE` = 2048 state elements (8 KiB float32) per program -- 16 per thread
    at 4 warps, which keeps K = V = 128 free of spills at any T -- then halved (down to 8) while the grid has fewer
    than `_MIN_PROGRAMS` programs (2 per H100 SM), so B = 1 decode still fills the GPU.
    num_warps: 4 for tiles of >= 2048 elements, fewer for small tiles (>= 16 elements a thread).
    """
    if block_v is None:
        bv = min(V, max(8, _MAX_TILE // K))
        while bv > 8 and B * Hv * (V // bv) < _MIN_PROGRAMS:
            bv //= 2
    else:
        bv = int(block_v)
        if not (pow2(bv) and bv <= V):
            raise ValueError(f"block_v={block_v} must be a power of two <= V={V}")
    tile = bv * K
    num_warps = 4 if tile >= 2048 else 2 if tile >= 1024 else 1
    return bv, num_warps


def _kernel(*refs, T, scale, use_qk_l2norm, kda, has_h0, store_ht, layout, prefetch,
            varlen, pool, ns, write_slots=False, has_flags=False, token_writes=False):
    it = iter(refs)
    q_ref, k_ref, v_ref, g_ref, b_ref = (next(it) for _ in range(5))
    h0_ref = next(it) if has_h0 else None
    cu_ref = next(it) if varlen else None
    idx_ref = next(it) if pool else None
    wr_ref = next(it) if write_slots else None
    has_ref = next(it) if has_flags else None
    o_ref = next(it)
    ht_ref = next(it) if store_ht else None
    snap_ref = next(it) if ns else None
    BV = o_ref.shape[-1]
    K = q_ref.shape[-1]

    def to_chip(x):    # stored tile ([BV, K] "vk", [K, BV] "kv") -> [BV, K] float32
        x = x.astype(jnp.float32)
        return x.T if layout == "kv" else x

    def to_memory(S, ref):  # [BV, K] float32 -> stored tile in ref's dtype (round to nearest)
        return (S.T if layout == "kv" else S).astype(ref.dtype)

    # This program's tokens [bos, eos). Without cu_seqlens they are the static [0, T) and every
    # loop below has static bounds (scf.for with constants).
    # Traced bounds are clamped into [0, T] so bad traced cu_seqlens can never address
    # memory outside q/k/v/o (docs/spec.md 4.5: undefined results, no crash).
    n = pl.program_id(0)
    if varlen:
        bos = jnp.clip(cu_ref[n], 0, T)
        eos = jnp.clip(cu_ref[n + 1], bos, T)
    else:
        bos, eos = 0, T
    if pool:
        # Slot of this sequence in the pool. -1 (padding) and, likewise, any out-of-range
        # index touch nothing in the pool: no read, no write, o rows zero.
        raw = idx_ref[n]
        P = h0_ref.shape[0]
        valid = (raw >= 0) & (raw < P)
        slot = jnp.where(valid, raw, 0)
        bos = jnp.asarray(bos, jnp.int32)
        hi = jnp.where(valid, eos, bos)  # end of the tokens actually run (bos for padding)
        # has_initial_state False: start from zeros, the slot is not read
        read = valid & (has_ref[n] != 0) if has_flags else valid
        # write slot: output_state_indices[n] when given (-1 or out of range: no write); a
        # per-token table is read per token in the loop below
        if write_slots and not token_writes:
            wraw = wr_ref[n]
            wvalid = valid & (wraw >= 0) & (wraw < P)
            wslot = jnp.where(wvalid, wraw, 0)
        else:
            wvalid, wslot = valid, slot
        # Masked load: the GPU issues no memory transaction for padding (other=0).
        tile = h0_ref.shape[1:]
        S = to_chip(plt.load(h0_ref.at[slot], mask=jnp.broadcast_to(read, tile), other=0.0))
    else:
        hi = eos
        S = to_chip(h0_ref[...]) if has_h0 else jnp.zeros((BV, K), jnp.float32)

    if ns:
        # Slots before the sequence's first token hold the initial state: slots j < ns - L.
        # (The others are written by the token loop, so nothing is stored twice.)
        L = hi - bos
        n_init = max(ns - L, 0) if isinstance(L, int) else jnp.clip(ns - L, 0, ns)
        S0 = to_memory(S, snap_ref)

        def init_snap(j, c):
            snap_ref[j] = S0
            return c

        if not (isinstance(n_init, int) and n_init == 0):
            jax.lax.fori_loop(0, n_init, init_snap, 0)
        first_snap = hi - ns  # token t goes to slot t - first_snap when that is >= 0

    def load(t):
        """Token t's small inputs, raw (casts happen at use)."""
        g = g_ref[t, :] if kda else g_ref[t]
        return q_ref[t, :], k_ref[t, :], v_ref[t, :], g, b_ref[t]

    def step(t, carry):
        S, cur = carry
        # Software pipelining: issue token t+1's loads before token t's math, so their
        # latency overlaps the reductions (the index is clamped to this sequence's last
        # token; the last prefetch is unused).
        nxt = load(jnp.minimum(t + 1, hi - 1)) if prefetch else None
        if not prefetch:
            cur = load(t)
        q, k, v, g, beta = (x.astype(jnp.float32) for x in cur)
        if use_qk_l2norm:
            q = q * jax.lax.rsqrt(jnp.sum(q * q) + L2NORM_EPS)
            k = k * jax.lax.rsqrt(jnp.sum(k * k) + L2NORM_EPS)
        q = q * scale
        g = jnp.maximum(g, G_MIN)
        S = S * (jnp.exp(g)[None, :] if kda else jnp.exp(g))
        u = beta * (v - jnp.sum(S * k[None, :], axis=1))  # [BV]
        S = S + u[:, None] * k[None, :]
        o_ref[t, :] = jnp.sum(S * q[None, :], axis=1).astype(o_ref.dtype)
        if ns:
            j = t - first_snap

            @pl.when(j >= 0)
            def _():
                snap_ref[j] = to_memory(S, snap_ref)
        if token_writes:
            # the state after token p = t - bos goes to slot output_state_indices[n, p]
            W = wr_ref.shape[1]
            p = t - bos
            w = wr_ref[n, jnp.minimum(p, W - 1)]
            ok = (p < W) & (w >= 0) & (w < P)

            @pl.when(ok)
            def _():
                ht_ref[jnp.where(ok, w, 0)] = to_memory(S, ht_ref)
        return S, nxt

    # The first prefetch is clamped too: an empty last sequence has bos == T.
    init = load(jnp.minimum(bos, T - 1) if varlen else bos) if prefetch else None
    S, _ = jax.lax.fori_loop(bos, hi, step, (S, init))

    if pool:
        # Padding: its o rows [hi, eos) = [bos, eos) are zeros (empty range otherwise).
        zero = jnp.zeros((BV,), o_ref.dtype)

        def zero_row(t, c):
            o_ref[t, :] = zero
            return c

        jax.lax.fori_loop(hi, eos, zero_row, 0)

        if not token_writes:
            @pl.when(wvalid)
            def _():
                ht_ref[wslot] = to_memory(S, ht_ref)
    elif store_ht:
        ht_ref[...] = to_memory(S, ht_ref)


def fused_recurrent(q, k, v, g, beta, initial_state=None, *, scale: float,
                    use_qk_l2norm: bool = False, output_final_state: bool = True,
                    interpret: bool = False, state_layout: str = "kv",
                    alias_state: bool = True, block_v: int | None = None,
                    num_warps: int | None = None, prefetch: bool = True,
                    cu_seqlens=None, state_indices=None, num_snapshots: int = 0,
                    output_state_indices=None, has_initial_state=None):
    """Runs the gated delta rule through the fused Pallas kernel (T >= 1 packed tokens).

    q, k `[B, T, Hk, K]`; v `[B, T, Hv, V]`; g `[B, T, Hv]` (GDA) or `[B, T, Hv, K]` (KDA);
    beta `[B, T, Hv]`; initial_state `[N, Hv, K, V]` ("kv") or `[N, Hv, V, K]` ("vk"), float32,
    bfloat16 or float16 (read and written in that dtype, widened to float32 on chip), or None
    (zeros; no state is read). N = B, or the number of sequences with `cu_seqlens`.
    Returns `(o [B, T, Hv, V] in q.dtype, final_state)`, final_state `[N, ...]` (initial_state's
    dtype, float32 without one) in
    `state_layout`, or None when `output_final_state` is False; with `num_snapshots` > 0,
    `(o, final_state, snapshots)`. Semantics: docs/spec.md sections 2.3-2.5.

    cu_seqlens: int `[N + 1]` (B == 1; may be traced: one program per (T, N)). Program n runs
    tokens `cu[n] .. cu[n+1]-1` from sequence n's own initial state. Bounds are clamped into
    [0, T], so bad traced values give undefined results but never out-of-bounds accesses.
    state_indices: int `[N]` (may be traced). initial_state is then the pool `[P, Hv, K, V]`
    ("kv") / `[P, Hv, V, K]` ("vk"); sequence n starts from slot `state_indices[n]` and its
    final state is written back there; final_state is the whole pool, every other slot untouched.
    The pool is always aliased to final_state, even with alias_state=False: the kernel writes
    only the indexed slots, so the output buffer must start as the pool. A caller that donates
    the pool gets an in-place update; one that does not gets one XLA copy of the pool.
    Index -1 (padding) and any other index outside [0, P) read and write nothing, and their o
    rows (and snapshots) are zeros. Duplicate indices: which sequence's state lands in the slot
    is unspecified. Needs output_final_state=True (the pool is the output).
    output_state_indices: int `[N]` with state_indices: sequence n writes its final state to
    slot `output_state_indices[n]` instead (-1 / out of range: no write); has_initial_state:
    bool `[N]` with state_indices: False starts sequence n from zeros (its slot is not read).
    A write slot that another sequence of the call reads is unspecified (programs run at once).
    output_state_indices may instead be a per-token table `[N, W]` (speculative decoding;
    W == T, or W >= 1 with cu_seqlens): the state after token p of sequence n is stored in slot
    `output_state_indices[n, p]` (-1, out of range or p >= W: no store) and no final state is
    stored; the read slot is `state_indices[n]` (the op picks it from its read table).
    num_snapshots = ns (Python int): also returns snapshots (the state's dtype) `[N, ns, Hv, K, V]` ("kv") /
    `[N, ns, Hv, V, K]` ("vk"): `snapshots[n, j]` = state after token `L_n - ns + j` of sequence
    n; slots before its first token hold its initial state.

    alias_state: with an initial state and a final state, the state buffer is aliased to the
    final state (`input_output_aliases`): a caller that donates it (jit donate_argnums) gets an
    in-place update and no new state buffer; a caller that does not donate gets one XLA copy
    (read + write of the state) before the kernel. Pass False when the initial state must stay
    alive (e.g. as a residual for the backward pass) to avoid that copy. Ignored for a pool.
    block_v / num_warps override `choose_config` (tuning, tests).
    """
    reason = supports(q, k, v, g, beta, initial_state, state_layout=state_layout,
                      cu_seqlens=cu_seqlens, state_indices=state_indices,
                      num_snapshots=num_snapshots, output_state_indices=output_state_indices,
                      has_initial_state=has_initial_state)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Pallas recurrent kernel cannot serve this call: {reason}")
    pool = state_indices is not None
    if pool and not output_final_state:
        raise ValueError("gdn_jax: the Pallas recurrent kernel with state_indices needs "
                         "output_final_state=True: the updated pool is its final state")
    varlen = cu_seqlens is not None
    ns = int(num_snapshots)
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    N = cu_seqlens.shape[0] - 1 if varlen else B
    group = Hv // Hk
    kda = g.ndim == 4
    has_h0 = initial_state is not None
    bv, nw = choose_config(N, Hv, K, V, block_v)
    if num_warps is not None:
        nw = int(num_warps)
    nv = V // bv

    q, k, v, g, beta, initial_state = _platform.guard(
        q, k, v, g, beta, initial_state, what="fused recurrent kernel", interpret=interpret)

    # Token inputs and o: with cu_seqlens every program sees the one packed row (b = 0) and
    # addresses its own tokens inside it; whole-T blocks cost nothing on the Triton backend,
    # which loads row by row through the ref.
    b_of = (lambda n: 0) if varlen else (lambda n: n)
    qk_spec = pl.BlockSpec((None, T, None, K), lambda n, h, j: (b_of(n), 0, h // group, 0))
    v_spec = pl.BlockSpec((None, T, None, bv), lambda n, h, j: (b_of(n), 0, h, j))
    if kda:
        g_spec = pl.BlockSpec((None, T, None, K), lambda n, h, j: (b_of(n), 0, h, 0))
    else:
        g_spec = pl.BlockSpec((None, T, None), lambda n, h, j: (b_of(n), 0, h))
    b_spec = pl.BlockSpec((None, T, None), lambda n, h, j: (b_of(n), 0, h))
    # State tiles. A pool is passed whole along P (the Triton backend has no scalar prefetch to
    # pick the slot in the index map); the kernel indexes slot state_indices[n] itself.
    lead = initial_state.shape[0] if pool else N
    if state_layout == "vk":
        s_spec = pl.BlockSpec((lead if pool else None, None, bv, K),
                              lambda n, h, j: (0 if pool else n, h, j, 0))
        s_shape = (lead, Hv, V, K)
        snap_spec = pl.BlockSpec((None, ns, None, bv, K), lambda n, h, j: (n, 0, h, j, 0))
        snap_shape = (N, ns, Hv, V, K)
    else:
        s_spec = pl.BlockSpec((lead if pool else None, None, K, bv),
                              lambda n, h, j: (0 if pool else n, h, 0, j))
        s_shape = (lead, Hv, K, V)
        snap_spec = pl.BlockSpec((None, ns, None, K, bv), lambda n, h, j: (n, 0, h, 0, j))
        snap_shape = (N, ns, Hv, K, V)

    in_specs = [qk_spec, qk_spec, v_spec, g_spec, b_spec]
    args = [q, k, v, g, beta]
    if has_h0:
        in_specs.append(s_spec)
        args.append(initial_state)
    if varlen:
        in_specs.append(pl.BlockSpec((N + 1,), lambda n, h, j: (0,)))
        args.append(jnp.asarray(cu_seqlens).astype(jnp.int32))
    if pool:
        in_specs.append(pl.BlockSpec((N,), lambda n, h, j: (0,)))
        args.append(jnp.asarray(state_indices).astype(jnp.int32))
    write_slots = pool and output_state_indices is not None
    has_flags = pool and has_initial_state is not None
    token_writes = write_slots and output_state_indices.ndim == 2
    if token_writes:
        in_specs.append(pl.BlockSpec(tuple(output_state_indices.shape), lambda n, h, j: (0, 0)))
        args.append(jnp.asarray(output_state_indices).astype(jnp.int32))
    elif write_slots:
        in_specs.append(pl.BlockSpec((N,), lambda n, h, j: (0,)))
        args.append(jnp.asarray(output_state_indices).astype(jnp.int32))
    if has_flags:
        in_specs.append(pl.BlockSpec((N,), lambda n, h, j: (0,)))
        args.append(jnp.asarray(has_initial_state).astype(jnp.int32))
    out_specs = [v_spec]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hv, V), q.dtype)]
    # states are stored in the initial state's dtype (float32 without one); maths in float32
    state_dtype = initial_state.dtype if has_h0 else jnp.float32
    if output_final_state:
        out_specs.append(s_spec)
        out_shape.append(jax.ShapeDtypeStruct(s_shape, state_dtype))
    if ns:
        out_specs.append(snap_spec)
        out_shape.append(jax.ShapeDtypeStruct(snap_shape, state_dtype))
    aliases = {5: 1} if (has_h0 and output_final_state and (alias_state or pool)) else {}

    kernel = functools.partial(
        _kernel, T=T, scale=float(scale), use_qk_l2norm=bool(use_qk_l2norm), kda=kda,
        has_h0=has_h0, store_ht=bool(output_final_state), layout=state_layout,
        prefetch=bool(prefetch) and T > 1, varlen=varlen, pool=pool, ns=ns,
        write_slots=write_slots, has_flags=has_flags, token_writes=token_writes)
    name = (f"gdn_recurrent_{'kda' if kda else 'gda'}_k{K}_v{V}_bv{bv}_{state_layout}"
            f"{'_varlen' if varlen else ''}{'_pool' if pool else ''}"
            f"{'_tokslots' if token_writes else '_wslots' if write_slots else ''}"
            f"{'_hasinit' if has_flags else ''}"
            f"{'_h0' if has_h0 and not pool else ''}{'_ht' if output_final_state else ''}"
            f"{f'_snap{ns}' if ns else ''}")
    outs = pl.pallas_call(
        kernel,
        grid=(N, Hv, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=nw, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args)
    o = outs[0]
    ht = outs[1] if output_final_state else None
    if ns:
        return o, ht, outs[-1]
    return o, ht
