"""The reverse state pass, grid (B, Hv, V / BV), backward over chunks: the state gradient at
each chunk's end dH_c and dh0, dS_prev = exp(G_C) dH + (exp(G) q)^T dO - W^T dVn with
dVn = P^T dO + Kd dH."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN
from .._varlen import TAB_END, TAB_T0
from ._chunk_ops import (CHUNK, F32, _causal_decay, _dot, _gate_spec, _is_kda, _last,
                         _num_chunks, _p_spec, _qk_chunk, _row, _rows, _specs, _store_rows,
                         choose_block_v)
from ._chunk_varlen import (_fill_empty, _load_state_if, _seq_flags, _state_spec,
                            _store_state_if, _table_args, _varlen_loop)


def _rev_kernel(*refs, T, C, NC, scale, l2, lp, has_dht, varlen=False, N=1, kda=False):
    """The reverse state pass of one (sequence, value head, V-block).

    varlen: refs start with the chunk tables; walking the nused chunks backward, the state
    gradient restarts from dht[n] (or zeros) at each sequence's last chunk, and after its first
    chunk the gradient entering the sequence is stored as dh0[n] ([N, K, BV] blocks).
    """
    it = iter(refs)
    ctab_ref, nused_ref, empty_ref = (next(it) for _ in range(3)) if varlen else (None,) * 3
    q_ref, k_ref, g_ref, w_ref, do_ref = (next(it) for _ in range(5))
    p_ref = next(it) if kda else None
    dht_ref = next(it) if has_dht else None
    dhs_ref, dh0_ref, dvn_ref = next(it), next(it), next(it)
    K = q_ref.shape[-1]
    BV = do_ref.shape[-1]
    if varlen:   # the first chunk visited is always a sequence's last chunk: it loads dht
        dH = jnp.zeros((K, BV), F32)
        _fill_empty(empty_ref, dht_ref, dh0_ref, N, (K, BV))
    else:
        dH = dht_ref[...].astype(F32) if has_dht else jnp.zeros((K, BV), F32)

    def body(c, dH, row=None):
        if varlen:
            t0, T_ = row[TAB_T0], row[TAB_END]
            seq, first, last = _seq_flags(row)
            dH = (_load_state_if(dht_ref, seq, last, dH) if has_dht
                  else jnp.where(last, 0.0, dH))
        else:
            t0, T_ = c * C, T
        dhs_ref[c] = dH.astype(dhs_ref.dtype)
        q, k = _qk_chunk(q_ref, k_ref, t0, C, T_, l2, scale)
        g = jnp.maximum(_rows(g_ref, t0, C, T_).astype(F32), G_MIN)
        W = _rows(w_ref, t0, C, T_)
        dO = _rows(do_ref, t0, C, T_).astype(F32)
        if kda:   # per-key decays; P from the prep kernel
            G = jnp.cumsum(g, axis=0)
            Gl = _row(G, C - 1)
            P = _rows(p_ref, t0, C, T_)
            Kd = k * jnp.exp(Gl[None, :] - G)
            qe, eGl = q * jnp.exp(G), jnp.exp(Gl)[:, None]
        else:
            G = jnp.cumsum(g)
            Gl = _last(G)
            P = _dot(q, k, tb=True, lp=lp) * _causal_decay(G)
            Kd = k * jnp.exp(Gl - G)[:, None]
            qe, eGl = q * jnp.exp(G)[:, None], jnp.exp(Gl)
        dVn = _dot(P, dO, ta=True, lp=lp) + _dot(Kd, dH, lp=lp)
        _store_rows(dvn_ref, t0, dVn, T_)   # read by the gradient kernel
        dH = eGl * dH + _dot(qe, dO, ta=True, lp=lp) - _dot(W, dVn, ta=True, lp=lp)
        if varlen:
            _store_state_if(dh0_ref, seq, dH, first)
        return dH

    if varlen:
        _varlen_loop(ctab_ref, nused_ref[0], lambda c, row, dH: body(c, dH, row), dH, reverse=True)
    else:
        dh0_ref[...] = jax.lax.fori_loop(0, NC, lambda cc, dH: body(NC - 1 - cc, dH), dH)


def _rev_call(q, k, g, W, do, dht, *, Hv, scale, l2, lp, interpret, tabs=None, num_warps=8,
              P=None, state_dtype=F32):
    """(dhs [B, Hv, NC, K, V] in state_dtype: the state gradient at each chunk's end, dh0
    [N, Hv, K, V] float32, dVn [B, T, Hv, V] in W's dtype)."""
    B, T, Hk, K = q.shape
    V = do.shape[-1]
    NC = _num_chunks(T, tabs)
    NS = B if tabs is None else tabs.num_seqs
    bv = choose_block_v(B, Hv, V, K)
    qk, _, kh, vb, gb = _specs(B, T, Hk, Hv, K, V, Hv // Hk, bv)
    s_spec = _state_spec(tabs, K, bv)
    t_specs, t_args = _table_args(tabs)
    kda = _is_kda(g)
    in_specs = [*t_specs, qk, qk, _gate_spec(g, T, K), kh, vb]
    args = [*t_args, q, k, g, W, do]
    if kda:
        in_specs.append(_p_spec(T))
        args.append(P)
    if dht is not None:
        in_specs.append(s_spec)
        args.append(dht)
    kern = functools.partial(_rev_kernel, T=T, C=CHUNK, NC=NC, scale=float(scale), l2=l2, lp=lp,
                             has_dht=dht is not None, varlen=tabs is not None, N=NS, kda=kda)
    return pl.pallas_call(
        kern, grid=(B, Hv, V // bv), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, NC, K, bv), lambda n, h, x: (n, h, 0, 0, x)), s_spec,
                   vb],
        out_shape=[jax.ShapeDtypeStruct((B, Hv, NC, K, V), state_dtype),
                   jax.ShapeDtypeStruct((NS, Hv, K, V), F32),
                   jax.ShapeDtypeStruct((B, T, Hv, V), W.dtype)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"gdn_chunk_{'kda_' if kda else ''}bwd_state_k{K}_v{V}_bv{bv}")(*args)
