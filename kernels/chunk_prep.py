"""The WY stage (prep kernel), grid (B, Hv, NC), all parallel: per chunk G = cumsum(g),
A = strict(beta_i k_i.k_j exp(G_i - G_j)), Tm = (I + A)^-1, W = Tm (beta exp(G) k),
U = Tm (beta v); KDA also the causal pairwise block P; for the backward also Tm."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ._chunk_ops import (CHUNK, F32, _chunk_A, _dot, _gates, _gate_spec, _inv_unit_lower, _iota,
                         _is_kda, _l2n, _num_chunks, _p_spec, _raw_rows, _rows, _specs,
                         _store_rows)
from ._chunk_varlen import _span, _table_args
from .chunk_kda import _kda_gates, _kda_pairs


def _prep_kernel(*refs, T, C, l2, lp, varlen, kda=False, scale=1.0, backward=False):
    """GDA: W, U of one chunk. KDA: also P [C, C], the causal intra-chunk q k^T with per-key
    decay (diagonal q_i . k_i: its decay factor is the constant 1), read by the state passes.
    backward: also Tm = (I + A)^-1 [C, C] float32, read by the gradient kernels (nothing of the
    WY stage is recomputed there)."""
    ctab_ref = refs[0] if varlen else None
    refs = refs[1:] if varlen else refs
    tm_ref = refs[-1] if backward else None
    refs = refs[:len(refs) - backward]
    if kda:
        q_ref, k_ref, v_ref, g_ref, b_ref, w_ref, u_ref, p_ref = refs
    else:
        k_ref, v_ref, g_ref, b_ref, w_ref, u_ref = refs
    t0, end = _span(ctab_ref, pl.program_id(2), C, T)

    def kda_pairs():
        """(A, beta, beta exp(G) k in the dots' operand dtype). q and k enter the pairwise
        terms as loaded, their l2 norms (and the scale) as row / column factors of the [C, C]
        results, so no normalised float32 [C, K] tile is held; the W operand is formed (and
        rounded to its 16-bit dot dtype) while G is live, so G dies before the pairs' loops.
        ptxas (sm_90a, bf16, K = V = 128): 984 -> 0 B spills with `_kda_pairs`."""
        k, rk = _raw_rows(k_ref, t0, C, end, l2)
        q, rq = _raw_rows(q_ref, t0, C, end, l2, scale)
        beta, G, _ = _kda_gates(g_ref, b_ref, t0, C, end)
        bK = (k.astype(F32) * ((beta * rk)[:, None] * jnp.exp(G))).astype(F32 if lp is None else lp)
        # P's diagonal q . k: with the packed tables before the pairs' loops, else from q, k
        # loaded again after them (either way the loops' q, k tiles die with the loops; ptxas
        # sm_90a, bf16 K = 128: each placement is spill-free only in its own case, the other
        # spills 8-16 B)
        if varlen:
            qk = jnp.sum(q.astype(F32) * k.astype(F32), axis=1)
        Kk, Pq = _kda_pairs([k_ref, q_ref], [k, q], k, G, g_ref, t0, end, lp)
        if not varlen:
            qk = jnp.sum(_rows(q_ref, t0, C, end).astype(F32)
                         * _rows(k_ref, t0, C, end).astype(F32), axis=1)
        ii, cc = _iota(C, C, 0), _iota(C, C, 1)
        rkc = rk[None, :]
        P = rq[:, None] * (Pq * rkc + jnp.where(ii == cc, (qk * rk)[:, None], 0.0))
        _store_rows(p_ref, t0, P, end)
        return beta[:, None] * (rk[:, None] * Kk * rkc), beta, bK

    def run():
        if kda:
            A, beta, bK = kda_pairs()
            Tm = _inv_unit_lower(A)
            v = _rows(v_ref, t0, C, end)
        else:
            k = _rows(k_ref, t0, C, end).astype(F32)
            if l2:
                k = _l2n(k)
            v = _rows(v_ref, t0, C, end)
            _, beta, G, _ = _gates(g_ref, b_ref, t0, C, end)
            A, _, _ = _chunk_A(k, beta, G, lp)
            bK = (beta * jnp.exp(G))[:, None] * k
            Tm = _inv_unit_lower(A)
        if backward:
            _store_rows(tm_ref, t0, Tm, end)
        bV = beta[:, None] * v.astype(F32)
        _store_rows(w_ref, t0, _dot(Tm, bK, lp=lp), end)
        _store_rows(u_ref, t0, _dot(Tm, bV, lp=lp), end)

    if varlen:
        pl.when(end > t0)(run)   # unused trailing chunks: nothing to do
    else:
        run()


def _prep_call(k, v, g, beta, *, Hv, l2, lp, interpret, tabs=None, num_warps=8, q=None,
               scale=1.0, backward=False):
    """(W, U) for GDA; (W, U, P) for KDA (q needed then; P [B, T, Hv, C]). backward: then
    Tm [B, T, Hv, C] float32 appended."""
    B, T, Hk, K = k.shape
    V = v.shape[-1]
    NC = _num_chunks(T, tabs)
    kda = _is_kda(g)
    qk, vh, kh, _, gb = _specs(B, T, Hk, Hv, K, V, Hv // Hk)
    wdt = lp if lp is not None else F32
    t_specs, t_args = _table_args(tabs, chunk_only=True)
    kern = functools.partial(_prep_kernel, T=T, C=CHUNK, l2=l2, lp=lp, varlen=tabs is not None,
                             kda=kda, scale=float(scale), backward=backward)
    in_specs = [*t_specs, qk, vh, _gate_spec(g, T, K), gb]
    args = [*t_args, k, v, g, beta]
    out_specs = [kh, vh]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hv, K), wdt), jax.ShapeDtypeStruct((B, T, Hv, V), wdt)]
    if kda:
        in_specs.insert(len(t_specs), qk)
        args.insert(len(t_args), q)
        out_specs.append(pl.BlockSpec((None, T, None, CHUNK), lambda n, h, x: (n, 0, h, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, CHUNK), wdt))
    if backward:   # Tm
        out_specs.append(_p_spec(T))
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, CHUNK), F32))
    return pl.pallas_call(
        kern, grid=(B, Hv, NC), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"gdn_chunk_{'kda_' if kda else ''}prep_k{K}_v{V}")(*args)
