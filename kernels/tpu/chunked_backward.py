"""Chunked backward (GDA and KDA, all six gradients) as Mosaic TPU kernels.

Two kernels:

1. the state pass of the forward (`chunked_forward.chunk_states`): the float32 state entering
   every chunk, `[rows, Hv, NC, K, V]`; the only saved activations (chunk granularity);
2. the reverse pass, grid `(B, Hv, NC)` with the chunk axis "arbitrary" and walked backwards
   through the index maps: the state cotangent dS (float32 `[K, V]`) stays in VMEM scratch;
   per chunk the kernel recomputes the chunk from its entering state and takes `jax.vjp` of
   `chunk_math.chunk_step` on chip, cotangents (dO of the chunk, dS), which gives dq, dk, dv,
   dg, dbeta of the chunk and dS for the chunk before. dS restarts from dht[seq] at a
   sequence's last chunk; dh0[seq] is written at its first.

The strong-decay rule lives in `chunk_step` (exactly-one factors are constants), so the
autodiff never forms their cancelling gradient terms. dq and dk come out per value head
(float32) and are summed over the head group in XLA; the gate clamp's mask (`g >= G_MIN`) is
applied on chip. Packed sequences use the chunk-aligned layout of the forward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..._common import G_MIN
from ..._varlen import from_aligned, to_aligned
from . import _common as tc
from .chunk_math import CHUNK, chunk_step
from .chunked_forward import (Chunks, _empty_fix, chunk_call, chunk_info, chunk_states,
                              chunk_table, flops_per_chunk, load_chunk, lp_dtype, state_spec,
                              supports, token_args, token_specs, vmem_estimate)

__all__ = ["chunked_backward"]

F32 = tc.F32


def _backward_kernel(tab_ref, *refs, M, NC, kda, scale, l2, lp, has_dht, store_dh0):
    it = iter(refs)
    q_ref, k_ref, v_ref, g_ref, b_ref, hs_ref, do_ref = (next(it) for _ in range(7))
    dht_ref = next(it) if has_dht else None
    dq_ref, dk_ref, dv_ref, dg_ref, db_ref = (next(it) for _ in range(5))
    dh0_ref = next(it) if store_dh0 else None
    dS_ref = next(it)
    b, c = pl.program_id(0), NC - 1 - pl.program_id(2)
    _, first, last, nval = chunk_info(tab_ref, b, c, M, NC)

    @pl.when(last)
    def _():
        dS_ref[...] = dht_ref[...] if has_dht else jnp.zeros(dS_ref.shape, F32)

    q, k, v, g, beta, g_raw = load_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, nval, kda=kda)
    rows = jax.lax.broadcasted_iota(jnp.int32, (CHUNK, 1), 0) < nval
    do = jnp.where(rows, do_ref[...].astype(F32), 0.0)
    step = functools.partial(chunk_step, last=nval - 1, kda=kda, scale=scale, l2=l2, lp=lp)
    _, vjp = jax.vjp(step, q, k, v, g, beta, hs_ref[...])
    dq, dk, dv, dg, db, dS = vjp((do, dS_ref[...]))
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dg_ref[...] = jnp.where(g_raw >= G_MIN, dg, 0.0)
    db_ref[...] = db
    dS_ref[...] = dS
    if store_dh0:
        @pl.when(first)
        def _():
            dh0_ref[...] = dS


def _run_backward(q, k, v, g, beta, hs, do, dht, chunks: Chunks, *, scale, l2, store_dh0,
                  interpret):
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    kda = g.ndim == 4
    N = B if chunks.layout is None else chunks.layout.lens.shape[0]
    rows, NC = chunks.rows, chunks.NC
    M = rows * NC
    args = list(token_args(q, k, v, g, beta, chunks))
    if chunks.layout is not None:
        do = to_aligned(do, chunks.layout)
    Tg = args[0].shape[1]
    args += [hs, do.reshape(rows, Tg, Hv * V)]
    qk, per_v, per_k, g_spec, row = token_specs(Hk, Hv, K, V, kda=kda, reverse_nc=NC)
    hs_spec = pl.BlockSpec((None, None, None, K, V), lambda b, h, c, tab: (b, h, NC - 1 - c, 0, 0))
    in_specs = [qk, qk, per_v, g_spec, row, hs_spec, per_v]
    has_dht = dht is not None
    if has_dht:
        in_specs.append(state_spec(K, V, M, NC, reverse_nc=NC))
        args.append(dht)
    out_specs = [per_k, per_k, per_v, g_spec, row]
    out_shape = [jax.ShapeDtypeStruct((rows, Tg, Hv * K), F32)] * 2 + [
        jax.ShapeDtypeStruct((rows, Tg, Hv * V), v.dtype),
        jax.ShapeDtypeStruct((rows, Tg, Hv * K) if kda else (rows, Hv, 1, Tg), F32),
        jax.ShapeDtypeStruct((rows, Hv, 1, Tg), F32)]
    if store_dh0:
        out_specs.append(state_spec(K, V, M, NC, reverse_nc=NC))
        out_shape.append(jax.ShapeDtypeStruct((N, Hv, K, V), F32))
    isz = jnp.dtype(q.dtype).itemsize
    chunks_run = rows * Hv * NC
    cost = pl.CostEstimate(
        flops=int(chunks_run * flops_per_chunk(K, V, kda, backward=True)),
        transcendentals=int(chunks_run * 2 * CHUNK * (CHUNK + (17 * K if kda else 2))),
        bytes_accessed=int(rows * Tg * (2 * Hk * K + 3 * Hv * V) * isz
                           + rows * Tg * Hv * (2 * K + (2 * K if kda else 4)) * 4
                           + chunks_run * K * V * 4 + N * Hv * K * V * 4 * (
                               int(has_dht) + int(store_dh0))))
    kernel = functools.partial(
        _backward_kernel, M=M, NC=NC, kda=kda, scale=float(scale), l2=bool(l2),
        lp=lp_dtype(q.dtype), has_dht=has_dht, store_dh0=store_dh0)
    name = (f"gdn_tpu_chunk_{'kda_' if kda else ''}bwd_k{K}_v{V}"
            f"{'_varlen' if chunks.layout is not None else ''}")
    return chunk_call(kernel, chunks, args, in_specs, out_specs, out_shape, (K, V),
                      vmem_estimate(K, V, isz, kda, backward=True), cost, interpret, name, Hv)


def chunked_backward(q, k, v, g, beta, initial_state, do, dht, *, scale: float,
                     use_qk_l2norm: bool = False, interpret: bool = False, cu_seqlens=None):
    """Gradients of `chunked_forward` (o, final_state) for cotangents do [B, T, Hv, V] and dht
    [N, Hv, K, V] (None: zeros); the calling convention of
    `gdn_jax.kernels.chunked.chunked_backward`. Returns (dq, dk, dv, dg, dbeta, dh0) in the
    inputs' dtypes and shapes; dh0 is None when initial_state is None."""
    reason = supports(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Mosaic TPU chunked kernels cannot serve this call: {reason}")
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if tuple(do.shape) != (B, T, Hv, V):
        raise ValueError(f"do shape {tuple(do.shape)} is not the shape of o {(B, T, Hv, V)}")
    if dht is not None and tuple(dht.shape) != (N, Hv, K, V):
        raise ValueError(f"dht shape {tuple(dht.shape)} is not the shape of the final state "
                         f"{(N, Hv, K, V)}")
    kda = g.ndim == 4
    chunks = chunk_table(B, T, cu_seqlens)
    hs = chunk_states(q, k, v, g, beta, initial_state, chunks, scale=scale, l2=use_qk_l2norm,
                      interpret=interpret)
    store_dh0 = initial_state is not None
    outs = _run_backward(q, k, v, g, beta, hs, do, dht, chunks, scale=scale, l2=use_qk_l2norm,
                         store_dh0=store_dh0, interpret=interpret)
    dq, dk, dv, dg, db = outs[:5]
    rows, Tg = dq.shape[:2]
    dq = dq.reshape(rows, Tg, Hv, K)
    dk = dk.reshape(rows, Tg, Hv, K)
    dv = dv.reshape(rows, Tg, Hv, V)
    dg = dg.reshape(rows, Tg, Hv, K) if kda else jnp.swapaxes(dg[:, :, 0], 1, 2)
    db = jnp.swapaxes(db[:, :, 0], 1, 2)
    if chunks.layout is not None:
        dq, dk, dv, dg, db = (from_aligned(x, chunks.layout) for x in (dq, dk, dv, dg, db))
    grp = Hv // Hk
    dq = dq.reshape(B, T, Hk, grp, K).sum(3)
    dk = dk.reshape(B, T, Hk, grp, K).sum(3)
    dh0 = _empty_fix(outs[5], dht, chunks) if store_dh0 else None
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg.astype(g.dtype),
            db.astype(beta.dtype), dh0)
