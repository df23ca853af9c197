"""Packed sequences (`cu_seqlens`) inside the chunked kernels: chunk-table reads, the
sequential passes' chunk loop, predicated state loads / stores.

The kernels read and write the packed [1, T, ...] arrays in place; no aligned copy is made.
Chunk c of the chunk-aligned layout (`gdn_jax._varlen.chunk_tables`, derived from
`chunk_layout`: every sequence starts a chunk) is the packed rows t0 .. t0 + C - 1, of which rows
< end are real: rows at or past `end` are masked on load (q = k = v = g = beta = 0, identity
tokens) and on store, exactly like the rows past T of the last chunk without cu_seqlens. So a
chunk never mixes two sequences, and the chunk-local math (prep, gradients) is unchanged; only
the sequential state passes reset at sequence boundaries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import check_varlen
from .._varlen import FIRST, LAST, TAB_END, TAB_FLAGS, TAB_SEQ, TAB_T0, chunk_tables
from ._chunk_ops import CHUNK, F32


def _span(ctab_ref, c, C, T):
    """(t0, end) of chunk c: its first packed row and the exclusive end of its real rows.
    Without cu_seqlens (ctab_ref None) c * C and T, exactly the expressions of the dense path."""
    if ctab_ref is None:
        return c * C, T
    return ctab_ref[c, TAB_T0], ctab_ref[c, TAB_END]


def _table_row(ctab_ref, c):
    """Chunk c's table row (t0, end, sequence, flags), c clipped into the table."""
    c = jnp.clip(c, 0, ctab_ref.shape[0] - 1)
    return tuple(ctab_ref[c, i] for i in range(4))


def _seq_flags(row):
    """(sequence, first, last) from a table row."""
    return row[TAB_SEQ], (row[TAB_FLAGS] & FIRST) != 0, (row[TAB_FLAGS] & LAST) != 0


def _varlen_loop(ctab_ref, n, body, carry, reverse=False):
    """fori_loop over chunks 0 .. n-1 (n - 1 .. 0 when reverse) calling body(c, row, carry).

    The next chunk's table row is loaded one iteration ahead (carried), so the chunk's
    operand addresses do not wait on a dependent scalar load at every step of the sequential
    pass."""
    def step(i, carry_row):
        carry, row = carry_row
        c = n - 1 - i if reverse else i
        nxt = _table_row(ctab_ref, c - 1 if reverse else c + 1)
        return body(c, row, carry), nxt
    row0 = _table_row(ctab_ref, n - 1 if reverse else 0)
    return jax.lax.fori_loop(0, n, step, (carry, row0))[0]


def _load_state_if(ref, n, pred, other):
    """State tile of sequence n from a [N, K, BV] block where pred, else `other` (a tile or 0).
    Predicated: nothing is read when pred is false, so the per-chunk check costs no memory
    traffic, and the loaded tile replaces `other` in place (no second live tile)."""
    shape = (ref.shape[-2], ref.shape[-1])
    return plt.load(ref.at[n], mask=jnp.full(shape, pred), other=other).astype(F32)


def _store_state_if(ref, n, val, pred):
    plt.store(ref.at[n], val.astype(ref.dtype), mask=jnp.full(val.shape, pred))


def _fill_empty(empty_ref, src_ref, dst_ref, N, shape):
    """dst[n] = src[n] (zeros when src_ref is None) for every length-0 sequence n: it owns no
    chunk, so the chunk loop never writes its final state (or its dh0)."""
    def body(n, carry):
        e = empty_ref[n] != 0
        val = (_load_state_if(src_ref, n, e, 0.0) if src_ref is not None
               else jnp.zeros(shape, F32))
        _store_state_if(dst_ref, n, val, e)
        return carry
    jax.lax.fori_loop(0, N, body, 0)


def _whole(x):
    """BlockSpec of a small array read whole by every program (the chunk tables)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _table_args(tabs, chunk_only=False):
    """(in_specs, args) of the chunk tables (none without cu_seqlens)."""
    if tabs is None:
        return [], []
    xs = [tabs.ctab] if chunk_only else [tabs.ctab, tabs.nused, tabs.empty]
    return [_whole(x) for x in xs], xs


def _state_spec(tabs, K, bv):
    """Initial / final state (or their gradients): [B, Hv, K, V], or [N, Hv, K, V] read whole
    over N with cu_seqlens (a program picks its sequences' tiles by dynamic index)."""
    if tabs is None:
        return pl.BlockSpec((None, None, K, bv), lambda n, h, x: (n, h, 0, x))
    return pl.BlockSpec((tabs.num_seqs, None, K, bv), lambda n, h, x: (0, h, 0, x))


def _varlen_tables(q, cu_seqlens):
    """None without cu_seqlens; else the chunk tables, after the value checks of a concrete
    cu_seqlens (starts at 0, non-decreasing, ends at T: ValueError naming cu_seqlens). A traced
    cu_seqlens is not checked; with bad values the results are undefined, but every load and
    store stays inside the arrays (see `chunk_tables`)."""
    if cu_seqlens is None:
        return None
    B, T = q.shape[:2]
    check_varlen(B, T, cu_seqlens, None, 0, True)
    return chunk_tables(cu_seqlens, T, CHUNK)
