"""Chunked forward (GDA and KDA) as one Mosaic TPU kernel, and the per-chunk state pass the
backward reads.

Grid `(B, Hv, NC)` with the chunk axis "arbitrary": the float32 state `[K, V]` of one
(sequence row, value head) stays in a VMEM scratch across the chunks; the per-chunk maths is
`chunk_math.chunk_step` (C = 128 tokens). Blocks, all lane-dense:

- q, k as `[B, T, Hk * K]` (a free reshape), block `[C, K]` of key head `lax.div(h, Hv // Hk)`
  (grouped heads through the index map, nothing repeated); v, o as `[B, T, Hv * V]`;
- GDA gates and beta as `[B, Hv, 1, T]` float32 rows (one small XLA transpose), block `[1, C]`,
  not `[T, 1]` columns that would pad to (8, 128) tiles; KDA gates `[B, T, Hv * K]`, block
  `[C, K]`, in their own dtype (cast and clamped on chip);
- states `[N, Hv, K, V]`, block `[K, V]` of the chunk's sequence.

A ragged last chunk is read as a partial block: rows past the chunk's real tokens are
replaced by zeros on chip (identity tokens), and their output rows are dropped on write.
A scalar-prefetched chunk table gives each chunk its sequence, whether it starts / ends it,
and its number of real tokens. Packed sequences (`cu_seqlens`) are first laid out
chunk-aligned in XLA (`gdn_jax._varlen.to_aligned`, one gather copy of the inputs), so every
chunk belongs to one sequence; the state resets to h0[seq] at a sequence's first chunk and
ht[seq] is written at its last.

Why C = 128: the MXU is 128 x 128 on v5e (4 per core) and 256 x 256 on v6e; 64-token chunks
would use a quarter of v5e's array per pass. A lane-dense gate block must be a multiple of 128
lanes. The `[C, C]` matrices are 64 KiB float32, so even the backward's residuals (about 40
of them) stay far below v7x's 64 MiB of VMEM (docs/tpu.md has the per-kernel figures).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..._common import G_MIN
from ..._varlen import chunk_layout, from_aligned, to_aligned
from . import _common as tc
from .chunk_math import CHUNK, chunk_step

__all__ = ["supports", "chunked_forward", "chunk_states", "CHUNK", "HEAD_SIZES"]

HEAD_SIZES = (128, 256)   # lane-dense [C, K] blocks of one head inside [B, T, H * K]
F32 = tc.F32


def supports(q, k, v, g, beta, initial_state=None, *, state_layout: str = "kv", cu_seqlens=None):
    """None if the chunked TPU kernels can serve these shapes and dtypes, else the reason.

    Shapes and dtypes only (ShapeDtypeStructs work). K and V must be 128 or 256 (each head's
    block is a lane-dense slice of `[.., H * K]`).
    """
    if state_layout != "kv":
        return f'state_layout={state_layout!r}: the chunked TPU kernels take the "kv" layout only'
    reason = tc.check_common(q, k, v, g, beta, HEAD_SIZES)
    if reason is not None:
        return reason
    B = q.shape[0]
    Hv, K, V = v.shape[2], q.shape[3], v.shape[3]
    N, reason = tc.check_cu_seqlens(cu_seqlens, B)
    if reason is not None:
        return reason
    if cu_seqlens is not None and jnp.dtype(cu_seqlens.dtype) != jnp.dtype(jnp.int32):
        return f"cu_seqlens dtype {cu_seqlens.dtype} is not int32"
    if initial_state is not None:
        if tuple(initial_state.shape) != (N, Hv, K, V):
            return (f"initial_state shape {tuple(initial_state.shape)} is not [N, Hv, K, V] = "
                    f"{(N, Hv, K, V)}")
        if jnp.dtype(initial_state.dtype) != jnp.dtype(F32):
            return f"initial_state must be float32, got {initial_state.dtype}"
    return None


def lp_dtype(dtype):
    """Operand dtype of the input-sized dots: bf16 for 16-bit inputs, float32 otherwise."""
    return F32 if jnp.dtype(dtype) == jnp.dtype(F32) else jnp.bfloat16


class Chunks(NamedTuple):
    """The chunk grid of one call: `(rows, NC)` chunks and their table."""

    rows: int          # B, or 1 for packed sequences
    NC: int            # chunks per row
    table: jax.Array   # int32 [4 * rows * NC]: sequence, first, last, real tokens per chunk
    layout: object     # the chunk-aligned layout (packed sequences) or None


def chunk_table(B, T, cu_seqlens=None) -> Chunks:
    C = CHUNK
    if cu_seqlens is None:
        NC = -(-T // C)
        c = jnp.arange(NC, dtype=jnp.int32)
        seq = jnp.repeat(jnp.arange(B, dtype=jnp.int32), NC)
        first = jnp.tile(c == 0, B)
        last = jnp.tile(c == NC - 1, B)
        nval = jnp.tile(jnp.clip(T - c * C, 0, C), B)
        return Chunks(B, NC, jnp.concatenate([seq, first, last, nval]).astype(jnp.int32), None)
    lay = chunk_layout(cu_seqlens, T, C)
    N = cu_seqlens.shape[0] - 1
    NC = lay.num_chunks
    c = jnp.arange(NC, dtype=jnp.int32)
    seq = jnp.minimum(lay.chunk_seq, N - 1)
    used = lay.chunk_seq < N
    start = jnp.cumsum((lay.lens + C - 1) // C) - (lay.lens + C - 1) // C
    nval = jnp.where(used, jnp.clip(lay.lens[seq] - (c - start[seq]) * C, 0, C), 0)
    last = used & (c == lay.last_chunk[seq])
    table = jnp.concatenate([seq, lay.first & used, last, nval]).astype(jnp.int32)
    return Chunks(1, NC, table, lay)


def chunk_info(tab_ref, b, c, M, NC):
    """(sequence, first, last, real tokens) of chunk c of row b from the scalar table."""
    m = b * NC + c
    return tab_ref[m], tab_ref[M + m] != 0, tab_ref[2 * M + m] != 0, tab_ref[3 * M + m]


def load_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, nval, *, kda):
    """The chunk's inputs with rows past its real tokens set to zero; g clamped (and raw g)."""
    C = q_ref.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0) < nval
    lanes = jax.lax.broadcasted_iota(jnp.int32, (1, C), 1) < nval
    q = jnp.where(rows, q_ref[...].astype(F32), 0.0)
    k = jnp.where(rows, k_ref[...].astype(F32), 0.0)
    v = jnp.where(rows, v_ref[...].astype(F32), 0.0)
    g_raw = jnp.where(rows if kda else lanes, g_ref[...].astype(F32), 0.0)
    beta = jnp.where(lanes, b_ref[...].astype(F32), 0.0)
    return q, k, v, jnp.maximum(g_raw, G_MIN), beta, g_raw


def token_specs(Hk, Hv, K, V, *, kda, reverse_nc=None):
    """BlockSpecs of q, k, v, g, beta (and o / do, dv, ...) on the (row, head, chunk) grid."""
    group = Hv // Hk
    cidx = (lambda c: c) if reverse_nc is None else (lambda c: reverse_nc - 1 - c)
    C = CHUNK
    qk = pl.BlockSpec((None, C, K), lambda b, h, c, tab: (b, cidx(c), jax.lax.div(h, group)))
    per_v = pl.BlockSpec((None, C, V), lambda b, h, c, tab: (b, cidx(c), h))
    per_k = pl.BlockSpec((None, C, K), lambda b, h, c, tab: (b, cidx(c), h))
    row = pl.BlockSpec((None, None, 1, C), lambda b, h, c, tab: (b, h, 0, cidx(c)))
    return qk, per_v, per_k, (per_k if kda else row), row


def state_spec(K, V, M, NC, reverse_nc=None):
    """The [K, V] block of the chunk's sequence in `[N, Hv, K, V]`."""
    cidx = (lambda c: c) if reverse_nc is None else (lambda c: reverse_nc - 1 - c)
    return pl.BlockSpec((None, None, K, V), lambda b, h, c, tab: (tab[b * NC + cidx(c)], h, 0, 0))


def token_args(q, k, v, g, beta, chunks: Chunks):
    """The kernels' views of the inputs: lane-dense reshapes, GDA gates and beta as rows."""
    if chunks.layout is not None:
        q, k, v, g, beta = (to_aligned(x, chunks.layout) for x in (q, k, v, g, beta))
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    kda = g.ndim == 4
    rows = lambda x: jnp.swapaxes(x.astype(F32), 1, 2)[:, :, None, :]  # noqa: E731
    gk = g.reshape(B, T, Hv * K) if kda else rows(g)
    return (q.reshape(B, T, Hk * K), k.reshape(B, T, Hk * K), v.reshape(B, T, Hv * V), gk,
            rows(beta))


def _forward_kernel(tab_ref, *refs, M, NC, kda, scale, l2, lp, has_h0, store_o, store_ht,
                    store_states):
    it = iter(refs)
    q_ref, k_ref, v_ref, g_ref, b_ref = (next(it) for _ in range(5))
    h0_ref = next(it) if has_h0 else None
    o_ref = next(it) if store_o else None
    ht_ref = next(it) if store_ht else None
    hs_ref = next(it) if store_states else None
    S_ref = next(it)
    b, c = pl.program_id(0), pl.program_id(2)
    _, first, last, nval = chunk_info(tab_ref, b, c, M, NC)

    @pl.when(first)
    def _():
        S_ref[...] = h0_ref[...] if has_h0 else jnp.zeros(S_ref.shape, F32)

    S = S_ref[...]
    if store_states:
        hs_ref[...] = S
    q, k, v, g, beta, _ = load_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, nval, kda=kda)
    o, S = chunk_step(q, k, v, g, beta, S, nval - 1, kda=kda, scale=scale, l2=l2, lp=lp)
    if store_o:
        o_ref[...] = o.astype(o_ref.dtype)
    S_ref[...] = S
    if store_ht:
        @pl.when(last)
        def _():
            ht_ref[...] = S


def flops_per_chunk(K, V, kda, backward=False):
    """Matrix-unit FLOPs of one chunk of one head (the cost estimate and docs/tpu.md)."""
    C = CHUNK
    inv = 2 * 7 * 2 * C ** 3
    dots = 2 * C * C * K * 2 + inv + 2 * C * C * (K + V) + 2 * C * K * V * 3 + 2 * C * C * V
    if kda:
        dots += (C // 16 - 1) * 2 * 2 * C * C * K + 15 * 2 * 2 * C * C * K + 2 * C * C * K
    return dots * (3 if backward else 1)


def vmem_estimate(K, V, itemsize, kda, backward=False):
    """VMEM bytes of one grid step: double-buffered blocks, the state scratch and the [C, C] /
    [C, K] float32 temporaries of chunk_step (counted generously; the backward keeps the
    forward's residuals)."""
    C = CHUNK
    blocks = 2 * (2 * C * K * itemsize + 2 * C * V * itemsize + C * K * (4 if kda else 0)
                  + 2 * 8 * C * 4 + 2 * K * V * 4)
    if backward:
        blocks += 2 * (2 * C * K * 4 + C * V * 4 + C * (K if kda else 8) * 4 + K * V * 4)
    temps = (24 + (24 if kda else 0)) * C * C * 4
    return blocks + K * V * 4 + temps * (3 if backward else 1)


def chunk_call(kernel, chunks: Chunks, args, in_specs, out_specs, out_shape, state, vmem,
               cost, interpret, name, Hv):
    """A `pallas_call` on the (row, value head, chunk) grid: the chunk table scalar-prefetched,
    the chunk axis "arbitrary" with one float32 `state`-shaped VMEM scratch carried along it."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(chunks.rows, Hv, chunks.NC), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=[pltpu.VMEM(state, F32)]),
        out_shape=out_shape,
        compiler_params=tc.compiler_params(("parallel", "parallel", "arbitrary"), vmem),
        cost_estimate=cost,
        interpret=tc.interpret_arg(interpret),
        name=name,
    )(chunks.table, *args)


def _run_forward(q, k, v, g, beta, initial_state, chunks: Chunks, *, scale, l2, store_o,
                 store_ht, store_states, interpret):
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    kda = g.ndim == 4
    N = B if chunks.layout is None else chunks.layout.lens.shape[0]
    rows, NC = chunks.rows, chunks.NC
    M = rows * NC
    args = list(token_args(q, k, v, g, beta, chunks))
    Tg = args[0].shape[1]
    qk, per_v, _, g_spec, row = token_specs(Hk, Hv, K, V, kda=kda)
    in_specs = [qk, qk, per_v, g_spec, row]
    has_h0 = initial_state is not None
    if has_h0:
        in_specs.append(state_spec(K, V, M, NC))
        args.append(initial_state)
    out_specs, out_shape = [], []
    if store_o:
        out_specs.append(per_v)
        out_shape.append(jax.ShapeDtypeStruct((rows, Tg, Hv * V), q.dtype))
    if store_ht:
        out_specs.append(state_spec(K, V, M, NC))
        out_shape.append(jax.ShapeDtypeStruct((N, Hv, K, V), F32))
    if store_states:
        out_specs.append(pl.BlockSpec((None, None, None, K, V), lambda b, h, c, tab: (b, h, c, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((rows, Hv, NC, K, V), F32))
    isz = jnp.dtype(q.dtype).itemsize
    chunks_run = rows * Hv * NC
    cost = pl.CostEstimate(
        flops=int(chunks_run * flops_per_chunk(K, V, kda)),
        transcendentals=int(chunks_run * CHUNK * (CHUNK + (17 * K if kda else 2))),
        bytes_accessed=int(rows * Tg * (2 * Hk * K + 2 * Hv * V) * isz
                           + rows * Tg * Hv * (K if kda else 2) * 4
                           + N * Hv * K * V * 4 * (int(has_h0) + int(store_ht))
                           + (chunks_run * K * V * 4 if store_states else 0)))
    kernel = functools.partial(
        _forward_kernel, M=M, NC=NC, kda=kda, scale=float(scale), l2=bool(l2),
        lp=lp_dtype(q.dtype), has_h0=has_h0, store_o=store_o, store_ht=store_ht,
        store_states=store_states)
    name = (f"gdn_tpu_chunk_{'kda_' if kda else ''}{'fwd' if store_o else 'states'}_k{K}_v{V}"
            f"{'_varlen' if chunks.layout is not None else ''}")
    return chunk_call(kernel, chunks, args, in_specs, out_specs, out_shape, (K, V),
                      vmem_estimate(K, V, isz, kda), cost, interpret, name, Hv)


def _empty_fix(states, fallback, chunks: Chunks):
    """A length-0 packed sequence runs no chunk: its state is `fallback` (h0 / dht or zeros)."""
    if chunks.layout is None:
        return states
    empty = (chunks.layout.lens == 0)[:, None, None, None]
    return jnp.where(empty, 0.0 if fallback is None else fallback, states)


def chunked_forward(q, k, v, g, beta, initial_state=None, *, scale: float,
                    use_qk_l2norm: bool = False, output_final_state: bool = True,
                    interpret: bool = False, cu_seqlens=None):
    """Chunked forward through the Mosaic TPU kernel; the calling convention of
    `gdn_jax.kernels.chunked.chunked_forward`: returns (o [B, T, Hv, V] in q.dtype,
    final_state [N, Hv, K, V] float32 or None). cu_seqlens int32 [N + 1] (B == 1, may be
    traced): N packed sequences, each from its own initial state. interpret: the TPU
    interpreter on the CPU."""
    reason = supports(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Mosaic TPU chunked kernels cannot serve this call: {reason}")
    B, T = q.shape[:2]
    Hv, V = v.shape[2:]
    chunks = chunk_table(B, T, cu_seqlens)
    outs = _run_forward(q, k, v, g, beta, initial_state, chunks, scale=scale, l2=use_qk_l2norm,
                        store_o=True, store_ht=bool(output_final_state), store_states=False,
                        interpret=interpret)
    o = outs[0].reshape(chunks.rows, -1, Hv, V)
    if chunks.layout is not None:
        o = from_aligned(o, chunks.layout)
    ht = _empty_fix(outs[1], initial_state, chunks) if output_final_state else None
    return o, ht


def chunk_states(q, k, v, g, beta, initial_state, chunks: Chunks, *, scale, l2, interpret):
    """The state entering every chunk, `[rows, Hv, NC, K, V]` float32 (the backward's only
    saved activations: chunk granularity)."""
    (hs,) = _run_forward(q, k, v, g, beta, initial_state, chunks, scale=scale, l2=l2,
                         store_o=False, store_ht=False, store_states=True, interpret=interpret)
    return hs
