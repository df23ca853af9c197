"""The gradient kernels: three per chunk, grid (B, Hv, NC), all parallel; together they do the
chunk's backward once, nothing of the WY stage or the state pass recomputed.

Inputs besides q, k, v, g, beta, dO: from the forward recompute the state entering the chunk
S_c, Vn and Tm = (I + A)^-1; from the reverse pass the state gradient at
the chunk's end dH_c and dVn. Each kernel reduces its V-dependent products over value blocks
of BV columns in an on-chip loop (no per-block partial sums), then does its V-independent work:

1. `_dqv_chunk` (output side): dP = dO Vn^T, dOS = dO S^T, dv = beta (Tm^T dVn); then dq
   (complete for the value head), P's terms of dk and dG (dG partial, float32 [..] / [.., K]).
2. `_dk_chunk` (state and WY sides): dKd = Vn dH^T, dW = -dVn S^T, sum(S * dH), X = dVn v^T;
   then dbK = Tm^T dW, dT = dW bK^T + X diag(beta), dA = -Tm^T dT Tm^T, its terms of dk,
   dbeta and dG.
3. `_da_chunk`: A's terms (GDA: A = beta KK D; KDA: `chunk_kda._pairs_dx`, `_pairs_dk`) of dk,
   dbeta and dG; dg = the in-chunk reverse cumulative sum of dG.

KDA (`_dqv_kda`, `_dk_kda`, `_da_chunk`): the same algebra in key windows of `key_window`
columns, every tile [C, w] (all but dT = dW bK^T is elementwise in the key channel or a dot
over C or V), the V loops run per window over the window's rows of the states.

dq and dk are summed in the kernels: each kernel atomically adds its float32 terms into one
zero-filled [B, T + C, Hk, 2K] buffer per key head (`_chunk_ops._add_rows`), so the head group
and dk's three parts meet there and only [B, T, Hk, K] reaches XLA (the l2norm Jacobian and the
cast). The order of the float32 adds is the hardware's (not bitwise reproducible on GPU).
16-bit inputs: the products with 16-bit operands on tensor cores; the WY chain's float32
products (Tm, dW, dT, dA) as bf16x3 tensor-core dots (`_chunk_ops.X3`). Strong decay:
exactly-one decay factors (P's diagonal, Kd of the chunk's last real token) are constants and
their dG terms are masked out instead of cancelling (SPEC section 4).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN
from ._chunk_ops import (CHUNK, F32, _add_rows, _causal_decay, _chunk_A, _dot, _gates, _hp, _iota, _row,
                         _is_kda, _num_chunks, _qk_chunk, _raw_rows, _rows, _store_rows,
                         padded_rows)
from ._chunk_varlen import _span, _table_args
from .chunk_kda import _gate_cumsum, _pairs_dk, _pairs_dx


def choose_grad_block_v(V: int, K: int) -> int:
    """Value columns per step of the gradient kernel's V loop: 32 at K <= 128, 16 at K = 256
    (the [K, BV] state and state-gradient blocks next to the [C, K] accumulators)."""
    return min(V, 32 if K <= 128 else 16)


def _cols(ref, t0, n, T, j, bv):
    """Rows t0 .. t0+n-1, columns j*bv .. (j+1)*bv-1 of a [T, V] ref, zeros beyond T."""
    idx = t0 + _iota(n, bv, 0)
    return plt.load(ref.at[pl.ds(t0, n), pl.ds(j * bv, bv)], mask=idx < T, other=0.0)


def _value_loop(do_ref, vn_ref, dvn_ref, hs_ref, dv_ref, Tm, beta, *, t0, T, C, lp, bv, col=0,
                width=None, dp=True):
    """The output side of one chunk, reduced over V: dP = dO Vn^T ([C, C]), dOS = dO S^T
    ([C, K], or of the state's rows col .. col+width-1: [C, width]); and dv = beta (Tm^T dVn),
    stored block by block. dp=False: dOS alone (dP and dv come from another call). A loop, not
    unrolled: one value block's operands are live at a time."""
    K, V = hs_ref.shape
    w = K if width is None else width
    rows = slice(None) if width is None else pl.ds(col, w)

    def body(j, carry):
        dP, dOS = carry
        dO = _cols(do_ref, t0, C, T, j, bv)
        dOS = dOS + _dot(dO, hs_ref[rows, pl.ds(j * bv, bv)], tb=True, lp=lp)
        if not dp:
            return dP, dOS
        Vn = _cols(vn_ref, t0, C, T, j, bv)
        dVn = _cols(dvn_ref, t0, C, T, j, bv)
        dbV = _dot(Tm, dVn, ta=True, lp=_hp(lp))
        idx = t0 + _iota(C, bv, 0)
        plt.store(dv_ref.at[pl.ds(t0, C), pl.ds(j * bv, bv)],
                  (beta[:, None] * dbV).astype(dv_ref.dtype), mask=idx < T)
        return dP + _dot(dO, Vn, tb=True, lp=lp), dOS

    dP0 = jnp.zeros((C, C), F32) if dp else None
    dP, dOS = jax.lax.fori_loop(0, V // bv, body, (dP0, jnp.zeros((C, w), F32)))
    return (dP, dOS) if dp else dOS


def _state_loop(vn_ref, dvn_ref, hs_ref, dhs_ref, v_ref, *, t0, T, C, lp, bv, per_key,
                parts, col=0, width=None):
    """The state side of one chunk, reduced over V: dKd = Vn dH^T, dW = -dVn S^T ([C, K], or
    of the states' rows col .. col+width-1: [C, width]), sum(S * dH) (per key for KDA) and
    X = dVn v^T ([C, C]); parts picks dKd and/or dW (with sum(S * dH)) and/or X, returned in
    that order: two loops keep one [C, K] accumulator live at a time."""
    K, V = hs_ref.shape
    K = K if width is None else width
    rows = slice(None) if width is None else pl.ds(col, K)
    want_dkd, want_dw, want_x = "dKd" in parts, "dW" in parts, "X" in parts

    def body(j, carry):
        dKd, dW, sSdH, X = carry
        Vn = _cols(vn_ref, t0, C, T, j, bv) if want_dkd else None
        dVn = _cols(dvn_ref, t0, C, T, j, bv) if want_dw or want_x else None
        S = hs_ref[rows, pl.ds(j * bv, bv)] if want_dw else None
        dH = dhs_ref[rows, pl.ds(j * bv, bv)] if want_dkd or want_dw else None
        if want_dw:
            SdH = S.astype(F32) * dH.astype(F32)
            sSdH = sSdH + (jnp.sum(SdH, axis=1) if per_key else jnp.sum(SdH))
            dW = dW - _dot(dVn, S, tb=True, lp=lp)
        if want_dkd:
            dKd = dKd + _dot(Vn, dH, tb=True, lp=lp)
        if want_x:
            X = X + _dot(dVn, _cols(v_ref, t0, C, T, j, bv), tb=True, lp=lp)
        return dKd, dW, sSdH, X

    z = jnp.zeros((C, K), F32)
    s0 = jnp.zeros((K,), F32) if per_key else jnp.zeros((), F32)
    dKd, dW, sSdH, X = jax.lax.fori_loop(
        0, V // bv, body, (z if want_dkd else None, z if want_dw else None, s0,
                           jnp.zeros((C, C), F32) if want_x else None))
    return tuple(x for x, w in ((dKd, want_dkd), (dW, want_dw), (sSdH, want_dw), (X, want_x))
                 if w)


def _per_chunk(body, *refs, T, C, varlen, **kw):
    """Runs body(*refs, t0=, T=end, C=, **kw) for this program's chunk. varlen: refs start with
    the chunk table; unused trailing chunks do nothing (their outputs are all masked)."""
    ctab_ref = refs[0] if varlen else None
    t0, end = _span(ctab_ref, pl.program_id(2), C, T)
    kern = functools.partial(body, *(refs[1:] if varlen else refs), t0=t0, T=end, C=C, **kw)
    if varlen:
        pl.when(end > t0)(kern)
    else:
        kern()


def _dqv_chunk(q_ref, k_ref, g_ref, b_ref, do_ref, vn_ref, dvn_ref, hs_ref, tm_ref, _dqk_in,
               dqk_ref, dv_ref, dg_ref, *, t0, T, C, scale, l2, lp, bv, kda):
    """Kernel 1 of a chunk's backward: the output side. dv; dq (complete for this value head)
    and the P terms of dk, added into the key head's float32 sums; dG's P terms (partial,
    completed by kernel 2)."""
    if kda:
        return _dqv_kda(q_ref, k_ref, g_ref, b_ref, do_ref, vn_ref, dvn_ref, hs_ref, tm_ref,
                        dqk_ref, dv_ref, dg_ref, t0=t0, T=T, C=C, scale=scale, l2=l2, lp=lp, bv=bv)
    _, beta, G, _ = _gates(g_ref, b_ref, t0, C, T)
    Tm = _rows(tm_ref, t0, C, T)
    dP, dOS = _value_loop(do_ref, vn_ref, dvn_ref, hs_ref, dv_ref, Tm, beta, t0=t0, T=T, C=C,
                          lp=lp, bv=bv)
    ii, jj = _iota(C, C, 0), _iota(C, C, 1)
    dP = jnp.where(ii >= jj, dP, 0.0)
    # O = (e^G q) S + P Vn with P = (q k^T) (.) Dc
    q, k = _qk_chunk(q_ref, k_ref, t0, C, T, l2, scale)
    eG = jnp.exp(G)
    Dc = _causal_decay(G)
    dQK = dP * Dc
    dq = _dot(dQK, k, lp=lp) + eG[:, None] * dOS
    dG = eG * jnp.sum(q * dOS, axis=1)
    MP = jnp.where(ii > jj, dP * _dot(q, k, tb=True, lp=lp) * Dc, 0.0)  # diagonal: factor 1
    dG = dG + jnp.sum(MP, axis=1) - jnp.sum(MP, axis=0)
    dk = _dot(dQK, q, ta=True, lp=lp)
    _add_rows(dqk_ref, t0, dq * scale, T)
    _add_rows(dqk_ref, t0, dk, T, col=q.shape[1])
    plt.store(dg_ref.at[pl.ds(t0, C)], dG, mask=t0 + jnp.arange(C) < T)


def key_window(K: int, kernel: str) -> int:
    """Key columns per step of the KDA gradient kernels' pairwise cotangents (elementwise in
    the key channel, so a [C, K] tile splits into [C, w] windows): 64 in the dqv and dk kernels, 32 in
    the da kernel (which holds two [C, C] float32 factors of dA; ptxas sm_90a, bf16, K = 128:
    12 B of spills at 64, 0 at 32); K when smaller."""
    return min(K, {"dqv": 64, "dk": 64, "da": 32}[kernel])


def _dqv_kda(q_ref, k_ref, g_ref, b_ref, do_ref, vn_ref, dvn_ref, hs_ref, tm_ref, dqk_ref,
             dv_ref, dg_ref, *, t0, T, C, scale, l2, lp, bv):
    """Kernel 1 for KDA: O = (e^G q) S + P Vn with P = pairs(q, k) + diag(q . k)
    (`chunk_kda`). One key window of w columns at a time (`key_window`): dOS's columns by a
    V loop over the state's rows of the window (the first window's loop also gives dP and
    dv), then dq's and dk's window, added into the sums, and dG's window stored. q and k enter
    as their row factors (qn = rq q, kn = rk k) and their windows' tiles, loaded where used."""
    K = q_ref.shape[1]
    w = key_window(K, "dqv")
    beta = _rows(b_ref, t0, C, T).astype(F32)
    Tm = _rows(tm_ref, t0, C, T)
    _, rq = _raw_rows(q_ref, t0, C, T, l2, scale)
    _, rk = _raw_rows(k_ref, t0, C, T, l2)
    loop = functools.partial(_value_loop, do_ref, vn_ref, dvn_ref, hs_ref, dv_ref, Tm, beta,
                             t0=t0, T=T, C=C, lp=lp, bv=bv, width=w)
    ii, jj = _iota(C, C, 0), _iota(C, C, 1)
    Mx = Mk = dPd = None
    for c in range(0, K, w):
        if Mx is None:
            dP, dOS = loop(col=c)
            dPd = jnp.sum(jnp.where(ii == jj, dP, 0.0), axis=1)[:, None]
            dP = jnp.where(ii > jj, dP, 0.0)
            Mx, Mk = dP * rk[None, :], rq[:, None] * dP
        else:
            dOS = loop(col=c, dp=False)
        eG = jnp.exp(_gate_cumsum(g_ref, t0, C, T, c, w))
        win = functools.partial(_rows, t0=t0, n=C, T=T, col=c, width=w)
        dq = _pairs_dx(Mx, k_ref, g_ref, t0, T, lp, eG * dOS, c)
        dG = (rq[:, None] * dq) * win(q_ref).astype(F32)    # the diagonal's dG terms: 0
        _add_rows(dqk_ref, t0, (dq + (dPd * rk[:, None]) * win(k_ref)) * scale, T, col=c)
        dk = _pairs_dk(Mk, q_ref, g_ref, t0, T, lp, c, w)
        _add_rows(dqk_ref, t0, dk + (dPd * rq[:, None]) * win(q_ref), T, col=K + c)
        _store_rows(dg_ref, t0, dG - (rk[:, None] * dk) * win(k_ref), T, col=c)


def _dk_chunk(k_ref, g_ref, b_ref, v_ref, vn_ref, dvn_ref, hs_ref, dhs_ref, tm_ref, dg1_ref,
              _dk_in, dk_ref, da_ref, db_ref, dg_ref, *, t0, T, C, l2, lp, bv, kda):
    """Kernel 2 of a chunk's backward: the state and WY sides. dA for kernel 3; its part of dk
    (added into the key head's sum); dbeta (but A's terms) and dg with kernel 1's part added
    (A's terms follow in kernel 3)."""
    if kda:
        return _dk_kda(k_ref, g_ref, b_ref, v_ref, vn_ref, dvn_ref, hs_ref, dhs_ref, tm_ref,
                       dg1_ref, dk_ref, da_ref, db_ref, dg_ref, t0=t0, T=T, C=C, l2=l2, lp=lp,
                       bv=bv)
    _, beta, G, Gl = _gates(g_ref, b_ref, t0, C, T)
    loop = functools.partial(_state_loop, vn_ref, dvn_ref, hs_ref, dhs_ref, v_ref, t0=t0, T=T,
                             C=C, lp=lp, bv=bv, per_key=False)
    # the WY side first, dKd after it (one [C, K] accumulator live at a time); k as loaded and
    # its l2 factors (l2norm(k) = rk k): no float32 [C, K] tile of k
    dW, sSdH, X = loop(parts=("dW", "X"))
    k, rk = _raw_rows(k_ref, t0, C, T, l2)
    last = jnp.minimum(C, T - t0) - 1          # the chunk's last real row
    eG = jnp.exp(G)
    hp = _hp(lp)
    Tm = _rows(tm_ref, t0, C, T)
    dbv = jnp.sum(Tm * X, axis=0)   # sum_V v (.) (Tm^T dVn) = column sums of Tm (.) X
    # S' = e^Gl S + Kd^T Vn with Kd = k e^(Gl - G) (exactly 1 on the last real row); then
    # Vn = U - W S, W = Tm bK, U = Tm bV with bK = beta e^G (.) k, Tm = (I + A)^-1
    row = jnp.arange(C)
    bE = (beta * eG)[:, None]
    dT = _dot(dW, k, tb=True, lp=hp) * (bE[:, 0] * rk)[None, :] + X * beta[None, :]
    _store_dA(da_ref, t0, dT, Tm, T, hp)
    dbK = _dot(Tm, dW, ta=True, lp=hp)
    kf = k.astype(F32)
    kdbK = rk * jnp.sum(kf * dbK, axis=1)
    dbeta = eG * kdbK + dbv
    dGl = jnp.exp(Gl) * sSdH
    dG = _rows(dg1_ref, t0, C, T) + bE[:, 0] * kdbK
    dbK = bE * dbK
    (dKd,) = loop(parts=("dKd",))
    dec = jnp.exp(Gl - G)
    t = jnp.where(row == last, 0.0, dec * rk * jnp.sum(kf * dKd, axis=1))
    dG = dG - t + jnp.where(row == C - 1, jnp.sum(t) + dGl, 0.0)
    plt.store(dg_ref.at[pl.ds(t0, C)], _revcumsum(dG, lp), mask=t0 + row < T)
    _add_rows(dk_ref, t0, dec[:, None] * dKd + dbK, T)
    plt.store(db_ref.at[pl.ds(t0, C)], dbeta, mask=t0 + jnp.arange(C) < T)


def _dk_kda(k_ref, g_ref, b_ref, v_ref, vn_ref, dvn_ref, hs_ref, dhs_ref, tm_ref, dg1_ref,
            dk_ref, da_ref, db_ref, dg_ref, *, t0, T, C, l2, lp, bv):
    """Kernel 2 for KDA (per-key gates G [C, K]): GDA's algebra, one key window of w columns
    at a time (`key_window`; every product but dT = dW bK^T is elementwise in the key channel
    or a dot over C or V, and dT sums over the windows): each window's two V loops over its
    rows of the states (dW, then dKd), its gate tiles, dk and dg columns. k enters as its row
    factors rk and loaded window tiles."""
    K = k_ref.shape[1]
    w = key_window(K, "dk")
    beta = _rows(b_ref, t0, C, T).astype(F32)
    _, rk = _raw_rows(k_ref, t0, C, T, l2)
    hp = _hp(lp)
    Tm = functools.partial(_rows, tm_ref, t0, C, T)   # loaded where used, not held
    loop = functools.partial(_state_loop, vn_ref, dvn_ref, hs_ref, dhs_ref, v_ref, t0=t0, T=T,
                             C=C, lp=lp, bv=bv, per_key=True, width=w)
    dT = dbeta = None
    for c in range(0, K, w):
        win = functools.partial(_rows, t0=t0, n=C, T=T, col=c, width=w)
        if dT is None:
            dW, sSdH, X = loop(parts=("dW", "X"), col=c)
            dbeta = jnp.sum(Tm() * X, axis=0)   # sum_V v (.) (Tm^T dVn) = column sums of Tm (.) X
            dT = X * beta[None, :]
        else:
            dW, sSdH = loop(parts=("dW",), col=c)
        kc = win(k_ref)   # the window's tile as loaded (16-bit: 8 registers a thread)
        eG = jnp.exp(_gate_cumsum(g_ref, t0, C, T, c, w))
        # W = Tm bK, bK = beta e^G (.) kn; in 16-bit the products in the input dtype
        bK = ((beta * rk)[:, None] * eG) * kc.astype(F32)
        dT = dT + _dot(dW, bK, tb=True, lp=lp)
        z = eG * _dot(Tm(), dW, ta=True, lp=lp)           # e^G (.) dbK
        _add_rows(dk_ref, t0, beta[:, None] * z, T, col=c)
        ekdbK = z * (rk[:, None] * kc.astype(F32))
        dbeta = dbeta + jnp.sum(ekdbK, axis=1)
        dG = win(dg1_ref) + beta[:, None] * ekdbK
        # S' = e^Gl S + Kd^T Vn with Kd = k e^(Gl - G) (exactly 1 on the last real row)
        (dKd,) = loop(parts=("dKd",), col=c)
        G = _gate_cumsum(g_ref, t0, C, T, c, w)
        Gl = _row(G, C - 1)   # rows past T have g = 0: the last real row's G
        islast = _iota(C, w, 0) == jnp.minimum(C, T - t0) - 1   # the chunk's last real row
        dec = jnp.where(islast, 1.0, jnp.exp(jnp.where(islast, 0.0, Gl[None, :] - G)))
        dKd = dec * dKd
        t = jnp.where(islast, 0.0, (rk[:, None] * dKd) * kc.astype(F32))
        dGl = jnp.sum(t, axis=0) + jnp.exp(Gl) * sSdH      # d/dG_j of e^(Gl - G_j), and for Gl
        dG = dG - t + jnp.where(_iota(C, w, 0) == C - 1, dGl[None, :], 0.0)
        _store_rows(dg_ref, t0, _revcumsum(dG, lp), T, col=c)
        _add_rows(dk_ref, t0, dKd, T, col=c)
    _store_dA(da_ref, t0, dT, Tm(), T, hp)
    plt.store(db_ref.at[pl.ds(t0, C)], dbeta, mask=t0 + jnp.arange(C) < T)


def _store_dA(da_ref, t0, dT, Tm, T, hp):
    """dA = strict(-Tm^T dT Tm^T): Tm = (I + A)^-1, so dA = -Tm^T dTm Tm^T on A's support."""
    C = dT.shape[0]
    dA = -_dot(Tm, _dot(dT, Tm, tb=True, lp=hp), ta=True, lp=hp)
    _store_rows(da_ref, t0, jnp.where(_iota(C, C, 0) > _iota(C, C, 1), dA, 0.0), T)


def _revcumsum(dG, lp):
    """G = cumsum(g) over the chunk: dg_j = sum_{i >= j} dG_i, for dG [C] (a masked row sum) or
    [C, K] (a masked dot: a sum, no cancellation). Rows past the chunk's end carry dG terms (the
    last row's), so this runs before anything is stored."""
    C = dG.shape[0]
    ii, jj = _iota(C, C, 0), _iota(C, C, 1)
    if dG.ndim == 1:
        return jnp.sum(jnp.where(ii >= jj, dG[:, None], 0.0), axis=0)
    if lp is not None:   # 16-bit inputs: total - exclusive prefix (a scan; no [C, K] dot operands)
        return jnp.sum(dG, axis=0)[None, :] - jnp.cumsum(dG, axis=0) + dG
    return _dot(jnp.where(ii >= jj, 1.0, 0.0), dG, ta=True)


def _da_chunk(k_ref, g_ref, b_ref, da_ref, db2_ref, dg2_ref, *rest, t0, T, C, l2, lp, kda):
    """Kernel 3 of a chunk's backward: A's terms (GDA: A = strict(beta KK D); KDA:
    A = beta (.) pairs(k, k), `chunk_kda._pairs_dx`, `_pairs_dk`) added to dk (the key head's sum),
    dbeta and dG; then dg (the reverse cumulative sums of both parts of dG), zero where the
    gate was clamped (g < G_MIN), dg and dbeta stored in the dtypes of g and beta."""
    _dk_in, dk_ref, db_ref, dg_ref = rest
    idx = t0 + jnp.arange(C)
    db = plt.load(db2_ref.at[pl.ds(t0, C)], mask=idx < T, other=0.0)
    hp = _hp(lp)
    if kda:   # one key window at a time (`key_window`); k as its row factors and window tiles
        # A_ij = beta_i Akk_ij with Akk = pairs(kn, kn): A's dbeta_i = sum_j dA_ij Akk_ij =
        # sum_d kn_id dxu_id for dxu the x-cotangent of Akk under dA (unscaled rows), and the
        # x-cotangent under beta dA is beta (.) dxu (row i of M scales dx_i only): A / beta is
        # not stored by the prep kernel nor read here
        # dA is loaded where used (once per cotangent and window): one [C, C] factor live at a
        # time (ptxas sm_90a, bf16 K = 128, jaxlib 0.12: 16 B of spills with both held)
        beta = _rows(b_ref, t0, C, T).astype(F32)
        _, rk = _raw_rows(k_ref, t0, C, T, l2)
        dA = functools.partial(_rows, da_ref, t0, C, T)
        w = key_window(k_ref.shape[1], "da")
        for c in range(0, k_ref.shape[1], w):
            win = functools.partial(_rows, t0=t0, n=C, T=T, col=c, width=w)
            dxu = _pairs_dx(dA() * rk[None, :], k_ref, g_ref, t0, T, lp, jnp.zeros((C, w), F32), c)
            kn = rk[:, None] * win(k_ref).astype(F32)
            db = db + jnp.sum(kn * dxu, axis=1)
            dx = beta[:, None] * dxu
            _add_rows(dk_ref, t0, dx, T, col=c)
            dG = kn * dx
            dy = _pairs_dk((beta * rk)[:, None] * dA(), k_ref, g_ref, t0, T, lp, c, w)
            _add_rows(dk_ref, t0, dy, T, col=c)   # before g's tile loads for the mask
            dg = win(dg2_ref) + _revcumsum(dG - (rk[:, None] * dy) * win(k_ref), lp)
            _store_rows(dg_ref, t0, jnp.where(win(g_ref).astype(F32) >= G_MIN, dg, 0.0), T, col=c)
        plt.store(db_ref.at[pl.ds(t0, C)], db.astype(db_ref.dtype), mask=idx < T)
    else:
        dA = _rows(da_ref, t0, C, T)
        _, beta, G, _ = _gates(g_ref, b_ref, t0, C, T)
        k, _ = _qk_chunk(k_ref, None, t0, C, T, l2, 1.0)
        A, KK, D = _chunk_A(k, beta, G, lp)
        db = db + jnp.sum(dA * KK * D, axis=1)
        dKK = dA * beta[:, None] * D
        dk = _dot(dKK, k, lp=hp) + _dot(dKK, k, ta=True, lp=hp)
        MA = dA * A
        dg = (plt.load(dg2_ref.at[pl.ds(t0, C)], mask=idx < T, other=0.0)
              + _revcumsum(jnp.sum(MA, axis=1) - jnp.sum(MA, axis=0), lp))
        dg = _unclamped(g_ref, t0, C, T, dg)
        plt.store(dg_ref.at[pl.ds(t0, C)], dg.astype(dg_ref.dtype), mask=idx < T)
        _add_rows(dk_ref, t0, dk, T)
        plt.store(db_ref.at[pl.ds(t0, C)], db.astype(db_ref.dtype), mask=idx < T)


def _unclamped(g_ref, t0, C, T, dg):
    """dg where the gate g >= G_MIN, 0 where it was clamped (no gradient through the clamp)."""
    return jnp.where(_rows(g_ref, t0, C, T).astype(F32) >= G_MIN, dg, 0.0)


def _grad_call(q, k, v, g, beta, do, Vn, dVn, hs, dhs, Tm, *, scale, l2, lp, interpret, tabs=None,
               num_warps=8):
    """(dq, dk [B, T, Hk, K] float32 per key head, dv [B, T, Hv, V], dbeta [B, T, Hv] and dg
    [B, T, Hv] or KDA [B, T, Hv, K] in the dtypes of beta and g) by three kernels per chunk (module docstring).
    dq and dk are sums the kernels add into (`_chunk_ops._add_rows`: the value heads of a key
    head, and dk's three parts), one zero-filled [B, padded_rows(T), Hk, 2K] buffer passed
    through the kernels in place (input_output_aliases; kernels 2 and 3 see its dk half)."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    NC = _num_chunks(T, tabs)
    bv = choose_grad_block_v(V, K)
    group = Hv // Hk
    Tp = padded_rows(T)
    qk = pl.BlockSpec((None, T, None, K), lambda n, h, c: (n, 0, h // group, 0))
    acc = pl.BlockSpec((None, Tp, None, K), lambda n, h, c: (n, 0, h // group, 1))   # dk
    vh = pl.BlockSpec((None, T, None, V), lambda n, h, c: (n, 0, h, 0))
    kh = pl.BlockSpec((None, T, None, K), lambda n, h, c: (n, 0, h, 0))
    gb = pl.BlockSpec((None, T, None), lambda n, h, c: (n, 0, h))
    ch = pl.BlockSpec((None, T, None, CHUNK), lambda n, h, c: (n, 0, h, 0))
    kda = _is_kda(g)
    hs_spec = pl.BlockSpec((None, None, None, K, V), lambda n, h, c: (n, h, c, 0, 0))
    t_specs, t_args = _table_args(tabs, chunk_only=True)
    nt = len(t_args)
    params = plt.CompilerParams(num_warps=num_warps, num_stages=1)
    pre = f"gdn_chunk_{'kda_' if kda else ''}bwd"
    varlen = tabs is not None
    gk = kh if kda else gb
    gshape = jax.ShapeDtypeStruct((B, T, Hv, K) if kda else (B, T, Hv), F32)
    # dq and dk side by side: [.., :K] dq, [.., K:] dk (one buffer through the three kernels)
    ashape = jax.ShapeDtypeStruct((B, Tp, Hk, 2 * K), F32)
    both = pl.BlockSpec((None, Tp, None, 2 * K), lambda n, h, c: (n, 0, h // group, 0))
    n_in = nt + 9
    dqk, dv, dg1 = pl.pallas_call(
        functools.partial(_per_chunk, _dqv_chunk, T=T, C=CHUNK, varlen=varlen, scale=float(scale),
                          l2=l2, lp=lp, bv=bv, kda=kda),
        grid=(B, Hv, NC), in_specs=[*t_specs, qk, qk, gk, gb, vh, vh, vh, hs_spec, ch, both],
        out_specs=[both, vh, gk],
        out_shape=[ashape, jax.ShapeDtypeStruct((B, T, Hv, V), v.dtype), gshape],
        input_output_aliases={n_in: 0},
        compiler_params=params, interpret=interpret, name=f"{pre}_dqv_k{K}_v{V}_bv{bv}")(
            *t_args, q, k, g, beta, do, Vn, dVn, hs, Tm, jnp.zeros(ashape.shape, F32))
    cshape = jax.ShapeDtypeStruct((B, T, Hv, CHUNK), F32)
    bshape = jax.ShapeDtypeStruct((B, T, Hv), F32)
    dqk, dA, db2, dg2 = pl.pallas_call(
        functools.partial(_per_chunk, _dk_chunk, T=T, C=CHUNK, varlen=varlen, l2=l2, lp=lp, bv=bv,
                          kda=kda),
        grid=(B, Hv, NC),
        in_specs=[*t_specs, qk, gk, gb, vh, vh, vh, hs_spec, hs_spec, ch, gk, acc],
        out_specs=[acc, ch, gb, gk], out_shape=[ashape, cshape, bshape, gshape],
        input_output_aliases={nt + 10: 0},
        compiler_params=params, interpret=interpret, name=f"{pre}_dk_k{K}_v{V}_bv{bv}")(
            *t_args, k, g, beta, v, Vn, dVn, hs, dhs, Tm, dg1, dqk)
    n_in = nt + 6
    dshape = jax.ShapeDtypeStruct(g.shape, g.dtype)
    dqk, dbeta, dg = pl.pallas_call(
        functools.partial(_per_chunk, _da_chunk, T=T, C=CHUNK, varlen=varlen, l2=l2, lp=lp,
                          kda=kda),
        grid=(B, Hv, NC),
        in_specs=[*t_specs, qk, gk, gb, ch, gb, gk, acc],
        out_specs=[acc, gb, gk],
        out_shape=[ashape, jax.ShapeDtypeStruct(beta.shape, beta.dtype), dshape],
        input_output_aliases={n_in: 0},
        compiler_params=params, interpret=interpret, name=f"{pre}_da_k{K}")(
            *t_args, k, g, beta, dA, db2, dg2, dqk)
    return dqk[:, :T, :, :K], dqk[:, :T, :, K:], dv, dbeta, dg
