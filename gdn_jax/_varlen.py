"""Index tables for packed variable-length sequences (`cu_seqlens`), shared by every path.

All tables are computed with jnp from a possibly traced `cu_seqlens` (int32 `[N + 1]`), so one
compiled program serves every batch composition with the same T and N. Static upper bounds
depend only on T, N and the chunk size.

Two views of the packed tokens:

- token view (recurrent paths): for each packed token t, its sequence `seq[t]` and whether it
  is the first / last token of that sequence;
- chunk-aligned view (chunked paths): every sequence starts at a chunk boundary, so each
  chunk belongs to exactly one sequence and a sequence boundary never falls inside a chunk.
  Aligned positions that hold no token are identity tokens (q = k = v = beta = g = 0: they
  leave the state unchanged and get zero cotangents).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class TokenTable(NamedTuple):
    seq: jax.Array    # [T] int32: the sequence of each packed token
    first: jax.Array  # [T] bool: token starts its sequence (the state resets to its initial state)
    last: jax.Array   # [T] bool: token ends its sequence (its state is that sequence's final state)
    pos: jax.Array    # [T] int32: position of the token inside its sequence
    lens: jax.Array   # [N] int32: sequence lengths


def token_table(cu_seqlens: jax.Array, T: int) -> TokenTable:
    cu = cu_seqlens.astype(jnp.int32)
    t = jnp.arange(T, dtype=jnp.int32)
    # sequence of token t: the last n with cu[n] <= t (zero-length sequences are skipped)
    seq = (jnp.searchsorted(cu, t, side="right") - 1).astype(jnp.int32)
    seq = jnp.clip(seq, 0, cu.shape[0] - 2)
    pos = t - cu[seq]
    lens = cu[1:] - cu[:-1]
    return TokenTable(seq, pos == 0, pos == lens[seq] - 1, pos, lens)


class ChunkLayout(NamedTuple):
    num_chunks: int      # static upper bound NC; the aligned length is NC * C
    chunk: int           # C
    src: jax.Array       # [NC * C] int32: packed token at each aligned position, -1 for identity
    dst: jax.Array       # [T] int32: aligned position of each packed token
    chunk_seq: jax.Array  # [NC] int32: sequence of each chunk; N for unused trailing chunks
    first: jax.Array     # [NC] bool: chunk starts its sequence
    last_chunk: jax.Array  # [N] int32: index of each sequence's last chunk (-1 when empty)
    lens: jax.Array      # [N] int32


def num_aligned_chunks(T: int, N: int, C: int) -> int:
    """Upper bound of sum_n ceil(L_n / C) over all splits of T tokens into N sequences."""
    return max(1, (T + N * (C - 1)) // C)


def _sequence_chunks(cu: jax.Array, C: int):
    """(lens, nch, start, end) per sequence: sequence n owns aligned chunks start_n .. end_n - 1,
    nch_n = ceil(L_n / C) of them, in order (the one definition of the aligned layout)."""
    lens = cu[1:] - cu[:-1]
    nch = jnp.maximum(lens + C - 1, 0) // C
    end = jnp.cumsum(nch).astype(jnp.int32)        # exclusive end chunk of each sequence
    return lens, nch, end - nch, end


def chunk_layout(cu_seqlens: jax.Array, T: int, C: int) -> ChunkLayout:
    cu = cu_seqlens.astype(jnp.int32)
    N = cu.shape[0] - 1
    NC = num_aligned_chunks(T, N, C)
    tok = token_table(cu, T)
    lens, nch, start, end = _sequence_chunks(cu, C)
    dst = start[tok.seq] * C + tok.pos
    src = jnp.full((NC * C,), -1, jnp.int32).at[dst].set(jnp.arange(T, dtype=jnp.int32))
    c = jnp.arange(NC, dtype=jnp.int32)
    chunk_seq = jnp.searchsorted(end, c, side="right").astype(jnp.int32)  # N past the last
    first = c == jnp.concatenate([start, jnp.full((1,), -1, jnp.int32)])[chunk_seq]
    last_chunk = jnp.where(nch > 0, end - 1, -1)
    return ChunkLayout(NC, C, src, dst, chunk_seq, first, last_chunk, lens)


TAB_T0, TAB_END, TAB_SEQ, TAB_FLAGS = range(4)   # columns of `ChunkTables.ctab`
FIRST, LAST = 1, 2                                # flag bits: chunk starts / ends its sequence


class ChunkTables(NamedTuple):
    """The chunk-aligned layout as the chunked kernels read it: per aligned chunk its packed rows,
    with no aligned copy of the tokens."""
    ctab: jax.Array     # [NC, 4] int32: (t0, end, sequence, flags) per aligned chunk
    nused: jax.Array    # [1] int32: chunks in use (sum of ceil(L_n / C)); the rest are empty
    empty: jax.Array    # [N] int32: 1 for a length-0 sequence (it owns no chunk)
    num_chunks: int     # NC, static: `num_aligned_chunks(T, N, C)`
    num_seqs: int       # N


def chunk_tables(cu_seqlens: jax.Array, T: int, C: int) -> ChunkTables:
    """`chunk_layout`'s aligned layout as per-chunk tables: chunk c (owned by sequence n) is the
    packed rows [t0, end) with t0 = cu[n] + (c - start_n) * C and end = min(t0 + C, cu[n + 1]).

    The ownership of each chunk is a broadcast compare over [NC, N] and row reductions (no
    searchsorted, no scatter), so XLA builds it in a few small fusions. Unused trailing chunks
    (c >= nused) get t0 = end = 0, sequence 0 and no flags. Rows are clipped to [0, T] and nused
    to NC, so a traced cu_seqlens with bad values gives undefined results but never an
    out-of-bounds row.
    """
    cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
    N = cu.shape[0] - 1
    NC = num_aligned_chunks(T, N, C)
    lens, nch, startc, endc = _sequence_chunks(cu, C)
    c = jnp.arange(NC, dtype=jnp.int32)[:, None]
    own = (startc[None, :] <= c) & (c < endc[None, :])   # [NC, N]: at most one owner per chunk

    def pick(x):
        return jnp.sum(jnp.where(own, x, 0), axis=1)

    used = jnp.any(own, axis=1)
    seq = pick(jnp.arange(N, dtype=jnp.int32)[None, :])
    t0 = jnp.clip(pick(cu[None, :-1] + (c - startc[None, :]) * C), 0, T)
    end = jnp.clip(jnp.minimum(t0 + C, pick(cu[None, 1:])), t0, T)
    flags = pick(jnp.where(c == startc[None, :], FIRST, 0)
                 + jnp.where(c == endc[None, :] - 1, LAST, 0))
    ctab = jnp.stack([jnp.where(used, t0, 0), jnp.where(used, end, 0), seq, flags], axis=1)
    nused = jnp.clip(jnp.sum(nch), 0, NC).astype(jnp.int32).reshape(1)
    return ChunkTables(ctab.astype(jnp.int32), nused, (lens == 0).astype(jnp.int32), NC, N)


def to_aligned(x: jax.Array, layout: ChunkLayout, axis: int = 1) -> jax.Array:
    """Packed `[.., T, ..]` -> aligned `[.., NC*C, ..]` along `axis`; identity positions are 0."""
    valid = layout.src >= 0
    y = jnp.take(x, jnp.maximum(layout.src, 0), axis=axis)
    shape = [1] * y.ndim
    shape[axis] = valid.shape[0]
    return jnp.where(valid.reshape(shape), y, jnp.zeros((), y.dtype))


def from_aligned(y: jax.Array, layout: ChunkLayout, axis: int = 1) -> jax.Array:
    """Aligned `[.., NC*C, ..]` -> packed `[.., T, ..]`."""
    return jnp.take(y, layout.dst, axis=axis)


def run_tokens(step, S0, xs, *, cu_seqlens=None, num_snapshots: int = 0,
               checkpoint_every: int = 0):
    """Drives a token-by-token `step` over B sequences or over packed sequences.

    step(S [B, ...], x_t) -> (S, o_t): one token for a batch of states (x_t: the xs sliced at
    one token, each `[B, ...]`). S0: the initial states `[N, ...]` (N = B without cu_seqlens).
    xs: tuple of `[B, T, ...]` arrays. Returns (o [B, T, ...], final [N, ...], snapshots
    `[N, ns, ...]` or None), snapshots as in docs/spec.md section 2.5; with
    `checkpoint_every=n > 0` (not with snapshots) also checkpoints `[N, T // n, ...]`, the
    states after tokens n, 2n, ... of each sequence, zeros past a packed sequence's end
    (docs/spec.md section 2.5b).
    """
    T = xs[0].shape[1]
    ns = int(num_snapshots)
    ce = int(checkpoint_every)
    if ce:
        if ns:
            raise ValueError("run_tokens takes num_snapshots or checkpoint_every, not both")
        return _run_tokens_checkpointed(step, S0, xs, ce, cu_seqlens)

    def scan(S, xs_part, keep_states=False):
        def body(S, x_t):
            S, o_t = step(S, x_t)
            return S, ((o_t, S) if keep_states else o_t)
        Tp = xs_part[0].shape[1]
        if Tp == 0:
            return S, None
        if Tp == 1 and not keep_states:  # no loop: a donated state is updated in place
            S, o = step(S, tuple(x[:, 0] for x in xs_part))
            return S, o[:, None]
        S, ys = jax.lax.scan(body, S, tuple(jnp.moveaxis(x, 1, 0) for x in xs_part))
        if keep_states:
            return S, (jnp.moveaxis(ys[0], 0, 1), jnp.moveaxis(ys[1], 0, 1))
        return S, jnp.moveaxis(ys, 0, 1)

    if cu_seqlens is None:
        if ns == 0:
            S, o = scan(S0, xs)
            return o, S, None
        split = max(T - ns, 0)
        S, o1 = scan(S0, tuple(x[:, :split] for x in xs))
        S, (o2, states) = scan(S, tuple(x[:, split:] for x in xs), keep_states=True)
        o = o2 if o1 is None else jnp.concatenate([o1, o2], axis=1)
        if T < ns:  # positions before the first token hold the initial state
            lead = jnp.broadcast_to(S0[:, None], (S0.shape[0], ns - T) + S0.shape[1:])
            states = jnp.concatenate([lead, states], axis=1)
        return o, S, states

    tab = token_table(cu_seqlens, T)
    if not ns:
        return _packed_scan(step, S0, xs, tab)
    snaps0 = jnp.broadcast_to(S0[:, None], (S0.shape[0], ns) + S0.shape[1:])

    def snapshot_slot(seq, pos):  # the last ns tokens of each sequence
        j = pos - (tab.lens[seq] - ns)
        return j >= 0, j

    return _packed_scan(step, S0, xs, tab, snaps0, snapshot_slot)


def _packed_scan(step, S0, xs, tab: TokenTable, keep0=None, keep_slot=None):
    """The token scan over packed sequences: each sequence starts from its S0 row at its first
    token and its final state is taken at its last. keep0 `[N, J, ...]` with keep_slot(seq,
    pos) -> (keep, j): the state after a token is also stored at keep[seq, j] where keep holds
    (snapshots, checkpoints). Returns (o, finals, keep or None)."""

    def body(carry, inp):
        S, finals, kept = carry
        x_t, seq, first, last, pos = inp
        S = jax.lax.cond(first, lambda: S0[seq][None], lambda: S)
        S, o_t = step(S, x_t)
        finals = jax.lax.cond(last, lambda: finals.at[seq].set(S[0]), lambda: finals)
        if keep_slot is not None:
            keep, j = keep_slot(seq, pos)
            kept = jax.lax.cond(keep, lambda: kept.at[seq, j].set(S[0], mode="drop"),
                                lambda: kept)
        return (S, finals, kept), o_t

    inputs = (tuple(jnp.moveaxis(x, 1, 0) for x in xs), tab.seq, tab.first, tab.last, tab.pos)
    S_init = jnp.zeros((1,) + S0.shape[1:], S0.dtype)
    (_, finals, kept), o = jax.lax.scan(body, (S_init, S0, keep0), inputs)
    return jnp.moveaxis(o, 0, 1), finals, kept


def _run_tokens_checkpointed(step, S0, xs, n: int, cu_seqlens):
    """`run_tokens` with checkpoints every n tokens: (o, final, None, checkpoints)."""
    B, T = xs[0].shape[:2]
    J = T // n
    if cu_seqlens is None:
        # the first J*n tokens as J blocks of n: an outer scan over blocks keeps the state
        # after each block, an inner one runs the block's tokens
        def block(S, xb):
            o, S = run_tokens(step, S, xb)[:2]
            return S, (o, S)

        S, o_parts, ckpts = S0, [], jnp.zeros((J, B) + S0.shape[1:], S0.dtype)
        if J:
            xb = tuple(jnp.moveaxis(x[:, :J * n].reshape((B, J, n) + x.shape[2:]), 1, 0)
                       for x in xs)
            S, (ob, ckpts) = jax.lax.scan(block, S, xb)
            o_parts.append(jnp.moveaxis(ob, 0, 1).reshape((B, J * n) + ob.shape[3:]))
        if J * n < T:
            o_rest, S = run_tokens(step, S, tuple(x[:, J * n:] for x in xs))[:2]
            o_parts.append(o_rest)
        o = o_parts[0] if len(o_parts) == 1 else jnp.concatenate(o_parts, axis=1)
        return o, S, None, jnp.moveaxis(ckpts, 0, 1)

    tab = token_table(cu_seqlens, T)
    ckpts0 = jnp.zeros((S0.shape[0], J) + S0.shape[1:], S0.dtype)

    def checkpoint_slot(seq, pos):  # after tokens n, 2n, ... of each sequence
        return (pos + 1) % n == 0, (pos + 1) // n - 1

    o, finals, ckpts = _packed_scan(step, S0, xs, tab, ckpts0, checkpoint_slot)
    return o, finals, None, ckpts
