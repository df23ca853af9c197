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


def chunk_layout(cu_seqlens: jax.Array, T: int, C: int) -> ChunkLayout:
    cu = cu_seqlens.astype(jnp.int32)
    N = cu.shape[0] - 1
    NC = num_aligned_chunks(T, N, C)
    tok = token_table(cu, T)
    lens = tok.lens
    nch = (lens + C - 1) // C
    end = jnp.cumsum(nch).astype(jnp.int32)        # exclusive end chunk of each sequence
    start = end - nch
    dst = start[tok.seq] * C + tok.pos
    src = jnp.full((NC * C,), -1, jnp.int32).at[dst].set(jnp.arange(T, dtype=jnp.int32))
    c = jnp.arange(NC, dtype=jnp.int32)
    chunk_seq = jnp.searchsorted(end, c, side="right").astype(jnp.int32)  # N past the last
    first = c == jnp.concatenate([start, jnp.full((1,), -1, jnp.int32)])[chunk_seq]
    last_chunk = jnp.where(nch > 0, end - 1, -1)
    return ChunkLayout(NC, C, src, dst, chunk_seq, first, last_chunk, lens)


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


def run_tokens(step, S0, xs, *, cu_seqlens=None, num_snapshots: int = 0):
    """Drives a token-by-token `step` over B sequences or over packed sequences.

    step(S [B, ...], x_t) -> (S, o_t): one token for a batch of states (x_t: the xs sliced at
    one token, each `[B, ...]`). S0: the initial states `[N, ...]` (N = B without cu_seqlens).
    xs: tuple of `[B, T, ...]` arrays. Returns (o [B, T, ...], final [N, ...], snapshots
    `[N, ns, ...]` or None), snapshots as in docs/spec.md section 2.5.
    """
    T = xs[0].shape[1]
    ns = int(num_snapshots)

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
    N = S0.shape[0]
    snaps0 = jnp.broadcast_to(S0[:, None], (N, max(ns, 1)) + S0.shape[1:]) if ns else None

    def body(carry, inp):
        S, finals, snaps = carry
        x_t, seq, first, last, pos = inp
        S = jax.lax.cond(first, lambda: S0[seq][None], lambda: S)
        S, o_t = step(S, x_t)
        finals = jax.lax.cond(last, lambda: finals.at[seq].set(S[0]), lambda: finals)
        if ns:
            j = pos - (tab.lens[seq] - ns)
            snaps = jax.lax.cond(j >= 0, lambda: snaps.at[seq, j].set(S[0]), lambda: snaps)
        return (S, finals, snaps), o_t

    inputs = (tuple(jnp.moveaxis(x, 1, 0) for x in xs), tab.seq, tab.first, tab.last, tab.pos)
    S_init = jnp.zeros((1,) + S0.shape[1:], S0.dtype)
    (_, finals, snaps), o = jax.lax.scan(body, (S_init, S0, snaps0), inputs)
    return jnp.moveaxis(o, 0, 1), finals, snaps
