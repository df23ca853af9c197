"""The gradient kernels, grid (B, Hv, NC, V / BV), all parallel: per chunk and value block,
from the inputs, the chunk's entering state S_c and state gradient dH_c: dv and partial sums
(per value block) of dq, dk, dbeta, dg."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from ._chunk_ops import (CHUNK, F32, _causal_decay, _chunk_A, _dot, _gates, _inv_unit_lower,
                         _iota, _is_kda, _num_chunks, _qk_chunk, _rows, _store_rows)
from ._chunk_varlen import _span, _table_args
from .chunk_kda import _kda_gates, _kda_pairs_bwd


def _grad_kernel(*refs, T, C, scale, l2, lp, varlen=False, kda=False):
    """Gradients of one chunk and V-block. varlen: refs start with the chunk table; the chunk's
    rows come from it and unused trailing chunks do nothing (their outputs are all masked)."""
    ctab_ref = refs[0] if varlen else None
    t0, end = _span(ctab_ref, pl.program_id(2), C, T)
    kern = functools.partial(_grad_chunk_kda if kda else _grad_chunk,
                             *(refs[1:] if varlen else refs), t0=t0, T=end, C=C,
                             scale=scale, l2=l2, lp=lp)
    if varlen:
        pl.when(end > t0)(kern)
    else:
        kern()


def _grad_chunk(q_ref, k_ref, v_ref, g_ref, b_ref, do_ref, hs_ref, dhs_ref,
                dq_ref, dk_ref, dv_ref, db_ref, dg_ref, *, t0, T, C, scale, l2, lp):
    """The chunk's backward; T is the exclusive end of its real rows (a packed-token index)."""
    last = jnp.minimum(C, T - t0) - 1          # the chunk's last real row
    q, k = _qk_chunk(q_ref, k_ref, t0, C, T, l2, scale)
    v = _rows(v_ref, t0, C, T).astype(F32)
    dO = _rows(do_ref, t0, C, T).astype(F32)
    _, beta, G, Gl = _gates(g_ref, b_ref, t0, C, T)
    S = hs_ref[...]
    dH = dhs_ref[...]
    ii, jj = _iota(C, C, 0), _iota(C, C, 1)
    strict = ii > jj
    row = jnp.arange(C)
    eG = jnp.exp(G)
    # --- recompute the chunk's forward
    A, KK, D = _chunk_A(k, beta, G, lp)
    Tm = _inv_unit_lower(A)
    bK = (beta * eG)[:, None] * k
    bV = beta[:, None] * v
    W = _dot(Tm, bK, lp=lp)
    U = _dot(Tm, bV, lp=lp)
    Vn = U - _dot(W, S, lp=lp)
    Dc = _causal_decay(G)
    P = _dot(q, k, tb=True, lp=lp) * Dc
    dec = jnp.exp(Gl - G)                      # exp(0) = 1 exactly for the last real row
    Kd = k * dec[:, None]
    # --- output and state update
    dVn = _dot(P, dO, ta=True, lp=lp) + _dot(Kd, dH, lp=lp)
    dP = jnp.where(ii >= jj, _dot(dO, Vn, tb=True, lp=lp), 0.0)
    dQK = dP * Dc
    dOS = _dot(dO, S, tb=True, lp=lp)          # [C, K]
    dq = _dot(dQK, k, lp=lp) + eG[:, None] * dOS
    dk = _dot(dQK, q, ta=True, lp=lp)
    MP = jnp.where(strict, dP * P, 0.0)        # the diagonal (factor 1) stays out of dG
    dG = jnp.sum(MP, axis=1) - jnp.sum(MP, axis=0) + eG * jnp.sum(q * dOS, axis=1)
    dKd = _dot(Vn, dH, tb=True, lp=lp)         # [C, K]
    dk = dk + dec[:, None] * dKd
    t = jnp.where(row == last, 0.0, dec * jnp.sum(k * dKd, axis=1))
    dG = dG - t + jnp.where(row == C - 1, jnp.sum(t) + jnp.exp(Gl) * jnp.sum(S * dH), 0.0)
    # --- Vn = U - W S, W = Tm bK, U = Tm bV, Tm = (I + A)^-1
    dW = -_dot(dVn, S, tb=True, lp=lp)         # [C, K]
    dT = _dot(dW, bK, tb=True) + _dot(dVn, bV, tb=True)
    dbK = _dot(Tm, dW, ta=True)
    dbV = _dot(Tm, dVn, ta=True)
    dA = jnp.where(strict, -_dot(Tm, _dot(dT, Tm, tb=True), ta=True), 0.0)
    dv = beta[:, None] * dbV
    kdbK = jnp.sum(k * dbK, axis=1)
    dbeta = jnp.sum(v * dbV, axis=1) + eG * kdbK
    dk = dk + (beta * eG)[:, None] * dbK
    dG = dG + beta * eG * kdbK
    # --- A = strict(beta_i KK_ij D_ij)
    dbeta = dbeta + jnp.sum(dA * KK * D, axis=1)
    dKK = dA * beta[:, None] * D
    dk = dk + _dot(dKK, k) + _dot(dKK, k, ta=True)
    MA = dA * A
    dG = dG + jnp.sum(MA, axis=1) - jnp.sum(MA, axis=0)
    # --- G = cumsum(g): dg_j = sum_{i >= j} dG_i
    dg = jnp.sum(jnp.where(ii >= jj, dG[:, None], 0.0), axis=0)
    _store_rows(dq_ref, t0, dq * scale, T)
    _store_rows(dk_ref, t0, dk, T)
    _store_rows(dv_ref, t0, dv, T)
    idx = t0 + row
    plt.store(db_ref.at[pl.ds(t0, C)], dbeta.astype(db_ref.dtype), mask=idx < T)
    plt.store(dg_ref.at[pl.ds(t0, C)], dg.astype(dg_ref.dtype), mask=idx < T)


def _grad_chunk_kda(q_ref, k_ref, v_ref, g_ref, b_ref, do_ref, hs_ref, dhs_ref, p_ref, a_ref,
                    dq_ref, dk_ref, dv_ref, db_ref, dg_ref, *, t0, T, C, scale, l2, lp):
    """The chunk's backward with per-key gates (G [C, K]); T is the exclusive end of its real rows.

    The same chain as `_grad_chunk` with the pairwise terms read from the prep kernel (P and
    A / beta, computed there by `_kda_pairs`) and their cotangents from `_kda_pairs_bwd`. Exactly-one factors stay constants: P's diagonal
    (q_i . k_i, no gate in it) and the last real row's Kd factor (1, its dG terms masked)."""
    K = q_ref.shape[-1]
    last = jnp.minimum(C, T - t0) - 1          # the chunk's last real row
    q, k = _qk_chunk(q_ref, k_ref, t0, C, T, l2, scale)
    v = _rows(v_ref, t0, C, T).astype(F32)
    dO = _rows(do_ref, t0, C, T).astype(F32)
    beta, G, Gl = _kda_gates(g_ref, b_ref, t0, C, T)
    S = hs_ref[...]
    dH = dhs_ref[...]
    ii, cc = _iota(C, C, 0), _iota(C, C, 1)
    strict = ii > cc
    row = _iota(C, K, 0)
    eG = jnp.exp(G)
    # --- recompute the chunk's forward
    Akk = _rows(a_ref, t0, C, T)               # pairs(k, k), float32
    A = beta[:, None] * Akk
    Tm = _inv_unit_lower(A)
    bK = beta[:, None] * eG * k
    bV = beta[:, None] * v
    W = _dot(Tm, bK, lp=lp)
    U = _dot(Tm, bV, lp=lp)
    Vn = U - _dot(W, S, lp=lp)
    P = _rows(p_ref, t0, C, T)                 # pairs(q, k) + diag(q . k), W's dtype
    islast = row == last
    dec = jnp.where(islast, 1.0, jnp.exp(jnp.where(islast, 0.0, Gl[None, :] - G)))
    Kd = k * dec
    # --- output and state update
    dVn = _dot(P, dO, ta=True, lp=lp) + _dot(Kd, dH, lp=lp)
    dP = jnp.where(ii >= cc, _dot(dO, Vn, tb=True, lp=lp), 0.0)
    dq = eG * _dot(dO, S, tb=True, lp=lp)      # O = (e^G q) S + P Vn
    dG = q * dq
    dKd = _dot(Vn, dH, tb=True, lp=lp)         # [C, K]
    dk = dec * dKd
    t = jnp.where(islast, 0.0, Kd * dKd)       # d/dG_j of k_j e^(Gl - G_j); + the same for Gl
    dGl = jnp.sum(t, axis=0) + jnp.exp(Gl) * jnp.sum(S * dH, axis=1)
    dG = dG - t + jnp.where(row == C - 1, dGl[None, :], 0.0)
    # --- Vn = U - W S, W = Tm bK, U = Tm bV, Tm = (I + A)^-1
    dW = -_dot(dVn, S, tb=True, lp=lp)         # [C, K]
    dT = _dot(dW, bK, tb=True) + _dot(dVn, bV, tb=True)
    dbK = _dot(Tm, dW, ta=True)
    dbV = _dot(Tm, dVn, ta=True)
    dA = jnp.where(strict, -_dot(Tm, _dot(dT, Tm, tb=True), ta=True), 0.0)
    dv = beta[:, None] * dbV
    ekdbK = eG * k * dbK
    dbeta = jnp.sum(v * dbV, axis=1) + jnp.sum(ekdbK, axis=1) + jnp.sum(dA * Akk, axis=1)
    dk = dk + (beta[:, None] * eG) * dbK
    dG = dG + beta[:, None] * ekdbK
    # --- the pairwise terms: A = beta (.) pairs(k, k), P = pairs(q, k) + diag(q . k)
    (dxk, dxq), dy = _kda_pairs_bwd([dA * beta[:, None], dP], [k, q], k, G, [None, lp])
    dPd = jnp.sum(jnp.where(ii == cc, dP, 0.0), axis=1)[:, None]
    dq = dq + dxq + dPd * k
    dk = dk + dxk + dy + dPd * q
    dG = dG + k * dxk + q * dxq - k * dy
    # --- G = cumsum(g): dg_j = sum_{i >= j} dG_i (a masked dot: a sum, no cancellation)
    dg = _dot(jnp.where(ii >= cc, 1.0, 0.0), dG, ta=True)
    _store_rows(dq_ref, t0, dq * scale, T)
    _store_rows(dk_ref, t0, dk, T)
    _store_rows(dv_ref, t0, dv, T)
    _store_rows(dg_ref, t0, dg, T)
    idx = t0 + jnp.arange(C)
    plt.store(db_ref.at[pl.ds(t0, C)], dbeta.astype(db_ref.dtype), mask=idx < T)


def choose_grad_block_v(V: int, K: int) -> int:
    """Value columns per program of the gradient kernel: the [K, BV] state and state-gradient
    tiles plus the [C, BV] value-side operands must fit the register file next to the
    [C, K] key-side ones."""
    return min(V, 32 if K <= 128 else 16)


def _grad_call(q, k, v, g, beta, do, hs, dhs, *, scale, l2, lp, interpret, tabs=None, num_warps=8,
               P=None, Akk=None):
    """dq, dk, dbeta, dg as partial sums over the value blocks [NVB, ...]; dv whole.
    KDA: P and A / beta from the prep kernel."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    NC = _num_chunks(T, tabs)
    bv = choose_grad_block_v(V, K)
    nvb = V // bv
    group = Hv // Hk
    qk = pl.BlockSpec((None, T, None, K), lambda n, h, c, x: (n, 0, h // group, 0))
    vb = pl.BlockSpec((None, T, None, bv), lambda n, h, c, x: (n, 0, h, x))
    gb = pl.BlockSpec((None, T, None), lambda n, h, c, x: (n, 0, h))
    kda = _is_kda(g)
    gk = pl.BlockSpec((None, T, None, K), lambda n, h, c, x: (n, 0, h, 0)) if kda else gb
    hs_spec = pl.BlockSpec((None, None, None, K, bv), lambda n, h, c, x: (n, h, c, 0, x))
    pk = pl.BlockSpec((None, None, T, None, K), lambda n, h, c, x: (x, n, 0, h, 0))
    pg = pl.BlockSpec((None, None, T, None), lambda n, h, c, x: (x, n, 0, h))
    kern = functools.partial(_grad_kernel, T=T, C=CHUNK, scale=float(scale), l2=l2, lp=lp,
                             varlen=tabs is not None, kda=kda)
    t_specs, t_args = _table_args(tabs, chunk_only=True)
    pa_specs, pa_args = [], []
    if kda:
        pa_specs = [pl.BlockSpec((None, T, None, CHUNK), lambda n, h, c, x: (n, 0, h, 0))] * 2
        pa_args = [P, Akk]
    return pl.pallas_call(
        kern, grid=(B, Hv, NC, nvb),
        in_specs=[*t_specs, qk, qk, vb, gk, gb, vb, hs_spec, hs_spec, *pa_specs],
        out_specs=[pk, pk, vb, pg, pk if kda else pg],
        out_shape=[jax.ShapeDtypeStruct((nvb, B, T, Hv, K), F32),
                   jax.ShapeDtypeStruct((nvb, B, T, Hv, K), F32),
                   jax.ShapeDtypeStruct((B, T, Hv, V), v.dtype),
                   jax.ShapeDtypeStruct((nvb, B, T, Hv), F32),
                   jax.ShapeDtypeStruct((nvb, B, T, Hv, K) if kda else (nvb, B, T, Hv), F32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"gdn_chunk_{'kda_' if kda else ''}bwd_grad_k{K}_v{V}_bv{bv}")(
            *t_args, q, k, v, g, beta, do, hs, dhs, *pa_args)
