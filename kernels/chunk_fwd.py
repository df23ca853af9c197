"""The forward state pass and output, grid (B, Hv, V / BV), sequential over chunks with the
[K, BV] state tile on chip: Vn = U - W S, O = (exp(G) q) S + (q k^T (.) causal decay) Vn,
S <- exp(G_C) S + Kd^T Vn. Also the backward's state-only pass (the state entering each chunk)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN
from .._varlen import TAB_END, TAB_T0
from ._chunk_ops import (CHUNK, F32, _dot, _gate_spec, _iota, _is_kda, _l2n, _last, _num_chunks,
                         _raw_rows,
                         _p_spec, _row, _rows, _specs, _store_rows, choose_block_v)
from ._chunk_varlen import (_fill_empty, _load_state_if, _seq_flags, _state_spec,
                            _store_state_if, _table_args, _varlen_loop)


def _state_kernel(*refs, T, C, NC, scale, l2, lp, has_h0, store_o, store_ht, store_states,
                  varlen=False, N=1, kda=False, store_vn=True):
    """The sequential forward pass of one (sequence, value head, V-block).

    varlen: refs start with the chunk tables; the loop runs over the nused aligned chunks, the
    state becomes the sequence's initial state (h0[n] or zeros) at each sequence's first chunk
    and is stored as its final state after its last chunk (h0 / ht are [N, K, BV] blocks).
    store_vn: with store_states, also store Vn (the backward reads it; checkpoints do not).
    """
    store_vn = store_states and store_vn
    it = iter(refs)
    ctab_ref, nused_ref, empty_ref = (next(it) for _ in range(3)) if varlen else (None,) * 3
    q_ref, k_ref, g_ref, w_ref, u_ref = (next(it) for _ in range(5))
    p_ref = next(it) if kda and store_o else None
    h0_ref = next(it) if has_h0 else None
    o_ref = next(it) if store_o else None
    ht_ref = next(it) if store_ht else None
    hs_ref = next(it) if store_states else None
    vn_ref = next(it) if store_vn else None
    K = q_ref.shape[-1]
    BV = u_ref.shape[-1]
    # KDA carries the state transposed, S^T [BV, K]: its update is then Vn^T Kd (Kd as the
    # dot's second operand, as loaded) and the per-key decay a row broadcast; ptxas (sm_90a,
    # K = V = 128, bf16): the output pass 80 -> 0 B spills. Loads and stores transpose it.
    tr = kda
    ld = (lambda x: x.T) if tr else (lambda x: x)   # [K, BV] <-> the carried layout
    if varlen:   # the first chunk is always a sequence's first chunk: it loads the state
        S = ld(jnp.zeros((K, BV), F32))
        if store_ht:
            _fill_empty(empty_ref, h0_ref, ht_ref, N, (K, BV))
    else:
        S = ld(h0_ref[...].astype(F32)) if has_h0 else ld(jnp.zeros((K, BV), F32))
    i, j = _iota(C, C, 0), _iota(C, C, 1)
    causal = i >= j

    cast = (lambda x: x.astype(lp)) if lp is not None else (lambda x: x)

    def body(c, S, row=None):
        if varlen:
            t0, T_ = row[TAB_T0], row[TAB_END]
            seq, first, last = _seq_flags(row)
            if not has_h0:
                S = jnp.where(first, 0.0, S)
            elif store_o and not tr:
                S = _load_state_if(h0_ref, seq, first, S)
            else:
                # ptxas (sm_90a, K = V = 128, bf16): the in-place load costs the state-only
                # pass 31 registers and 12 KiB of layout-conversion smem (157 vs 126, 1 vs 2
                # blocks/SM); a zero-filled load and a select do not. The output pass is the
                # other way round (80 vs 92 B spills).
                S = jnp.where(first, ld(_load_state_if(h0_ref, seq, first, 0.0)), S)
        else:
            t0, T_ = c * C, T
        if store_states:
            hs_ref[c] = ld(S).astype(hs_ref.dtype)
        g = jnp.maximum(_rows(g_ref, t0, C, T_).astype(F32), G_MIN)
        if kda:   # G [C, K], Gl [K]: per-key decays
            G = jnp.cumsum(g, axis=0)
            Gl = _row(G, C - 1)
            dGl = None if store_o else Gl[None, :] - G
        else:
            G = jnp.cumsum(g)
            Gl = _last(G)
            dGl, eG, eGl = (Gl - G)[:, None], jnp.exp(G)[:, None], jnp.exp(Gl)
        if not store_o:
            # the backward's state-only pass: Kd = k e^(Gl - G) as one 16-bit [C, K] operand
            # (no q side: spill-free with it)
            k = _rows(k_ref, t0, C, T_).astype(F32)
            if l2:
                k = _l2n(k)
            Kd = cast(k * jnp.exp(dGl))
        elif kda:
            # per-key decays on the [C, K] tiles: both 16-bit operands (e^G q, Kd) formed
            # before W and U are loaded, one float32 [C, K] exp at a time beside G
            q, rq = _raw_rows(q_ref, t0, C, T_, l2, scale)
            qe = cast(q.astype(F32) * (rq[:, None] * jnp.exp(G)))
            k, rk = _raw_rows(k_ref, t0, C, T_, l2)
            Kd = cast(k.astype(F32) * (rk[:, None] * jnp.exp(Gl[None, :] - G)))
        else:
            # GDA: the decays and the l2 norms are per row, so they scale the [C, BV] and
            # [C, C] operands and results instead of the [C, K] tiles: q and k enter the dots
            # as loaded (`_raw_rows`), no float32 [C, K] tile is formed
            k, rk = _raw_rows(k_ref, t0, C, T_, l2)
        W = _rows(w_ref, t0, C, T_)
        U = _rows(u_ref, t0, C, T_).astype(F32)
        Vn = U - _dot(W, S, tb=tr, lp=lp)
        if store_vn:   # the backward's gradient kernel reads Vn instead of recomputing it
            _store_rows(vn_ref, t0, Vn, T_)
        if store_o:
            if kda:   # the causal pairwise block from the prep kernel
                o = _dot(qe, S, tb=tr, lp=lp) + _dot(_rows(p_ref, t0, C, T_), Vn, lp=lp)
            else:
                q, rq = _raw_rows(q_ref, t0, C, T_, l2, scale)
                P = jnp.where(causal, (rq[:, None] * rk[None, :]) * _dot(q, k, tb=True, lp=lp) *
                              jnp.exp(jnp.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
                o = (eG * rq[:, None]) * _dot(q, S, lp=lp) + _dot(P, Vn, lp=lp)
            _store_rows(o_ref, t0, o, T_)
        if tr:
            S = jnp.exp(Gl)[None, :] * S + _dot(Vn, Kd, ta=True, lp=lp)
        elif not store_o:
            S = eGl * S + _dot(Kd, Vn, ta=True, lp=lp)
        else:
            S = eGl * S + _dot(k, (rk[:, None] * jnp.exp(dGl)) * Vn, ta=True, lp=lp)
        if varlen and store_ht:
            _store_state_if(ht_ref, seq, ld(S), last)
        return S

    if varlen:
        _varlen_loop(ctab_ref, nused_ref[0], lambda c, row, S: body(c, S, row), S)
    else:
        S = jax.lax.fori_loop(0, NC, body, S)
        if store_ht:
            ht_ref[...] = ld(S)


def _state_call(q, k, g, W, U, h0, *, Hv, scale, l2, lp, store_o, store_ht, store_states,
                interpret, tabs=None, num_warps=8, P=None, state_dtype=F32, store_vn=True):
    """(o, ht) as asked; store_states (backward): (hs [B, Hv, NC, K, V] in state_dtype, the state
    entering each chunk, and, with store_vn, Vn [B, T, Hv, V] in W's dtype)."""
    B, T, Hk, K = q.shape
    V = U.shape[-1]
    NC = _num_chunks(T, tabs)
    NS = B if tabs is None else tabs.num_seqs
    bv = choose_block_v(B, Hv, V, K, output=store_o)
    qk, _, kh, vb, gb = _specs(B, T, Hk, Hv, K, V, Hv // Hk, bv)
    s_spec = _state_spec(tabs, K, bv)
    t_specs, t_args = _table_args(tabs)
    kda = _is_kda(g)
    in_specs = [*t_specs, qk, qk, _gate_spec(g, T, K), kh, vb]
    args = [*t_args, q, k, g, W, U]
    if kda and store_o:
        in_specs.append(_p_spec(T))
        args.append(P)
    if h0 is not None:
        in_specs.append(s_spec)
        args.append(h0)
    out_specs, out_shape = [], []
    if store_o:
        out_specs.append(vb)
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, V), q.dtype))
    if store_ht:
        out_specs.append(s_spec)
        out_shape.append(jax.ShapeDtypeStruct((NS, Hv, K, V), F32))
    if store_states:
        out_specs.append(pl.BlockSpec((None, None, NC, K, bv), lambda n, h, x: (n, h, 0, 0, x)))
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, NC, K, V), state_dtype))
        if store_vn:
            out_specs.append(vb)
            out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, V), W.dtype))
    kern = functools.partial(_state_kernel, T=T, C=CHUNK, NC=NC, scale=float(scale), l2=l2, lp=lp,
                             has_h0=h0 is not None, store_o=store_o, store_ht=store_ht,
                             store_states=store_states, varlen=tabs is not None, N=NS, kda=kda,
                             store_vn=store_vn)
    name = f"gdn_chunk_{'kda_' if kda else ''}{'fwd' if store_o else 'states'}_k{K}_v{V}_bv{bv}"
    return pl.pallas_call(
        kern, grid=(B, Hv, V // bv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=name)(*args)
