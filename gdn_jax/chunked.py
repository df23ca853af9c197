"""Plain-XLA chunk-parallel gated delta net (SPEC section 5): C x C intra-chunk products, a
WY/UT transform, then a lean sequential pass over chunks; every exp() argument is <= 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._common import HIGHEST, prepare

SUB = 16  # KDA sub-block size (SPEC section 5)


def _dot(spec, a, b):
    return jnp.einsum(spec, a, b, precision=HIGHEST)


def _masks(C):
    i = jnp.arange(C)
    strict = i[:, None] > i[None, :]
    eye = i[:, None] == i[None, :]
    return strict, eye


def _unit_lower_inverse(A):
    """(I + A)^-1 for strictly lower A [..., C, C]."""
    C = A.shape[-1]
    eye = jnp.eye(C, dtype=A.dtype)
    return jax.scipy.linalg.solve_triangular(
        eye + A, jnp.broadcast_to(eye, A.shape), lower=True, unit_diagonal=True)


def _kda_pairwise(x, k, Gc, *, include_diag):
    """sum_d x_id k_jd exp(Gc_id - Gc_jd) for i > j (and i == j with factor 1 if include_diag).

    x, k, Gc: [..., C, K]. Pairs between 16-token sub-blocks a > b go through the boundary
    token r = 16a - 1 (both factors <= 1); diagonal sub-blocks are computed exactly.
    """
    C, K = x.shape[-2:]
    S = min(SUB, C)
    ns = C // S
    lead = x.shape[:-2]
    out_rows = []
    tok = jnp.arange(C)
    # diagonal sub-blocks, exactly, for all sub-blocks at once: [..., ns, S, S]
    xs = x.reshape(lead + (ns, S, K))
    ks = k.reshape(lead + (ns, S, K))
    Gs = Gc.reshape(lead + (ns, S, K))
    ii = jnp.arange(S)
    cols = []
    for j in range(S):
        m = (ii >= j) if include_diag else (ii > j)
        d = Gs - Gs[..., j:j + 1, :]                       # [..., ns, S, K]
        e = jnp.exp(jnp.where(m[:, None], d, -jnp.inf))
        if include_diag:
            e = jnp.where((ii == j)[:, None], 1.0, e)       # exactly-one factor as a constant
        cols.append(jnp.sum(xs * e * ks[..., j:j + 1, :], axis=-1))  # [..., ns, S]
    diag = jnp.stack(cols, axis=-1)                         # [..., ns, S(i), S(j)]
    for a in range(ns):
        row = jnp.zeros(lead + (S, C), x.dtype)
        if a > 0:
            r = a * S - 1
            Gr = Gc[..., r:r + 1, :]
            left = xs[..., a, :, :] * jnp.exp(Gs[..., a, :, :] - Gr)      # i > r
            right = k * jnp.exp(jnp.where((tok <= r)[:, None], Gr - Gc, -jnp.inf))  # j <= r
            row = _dot("...ik,...jk->...ij", left, right)
        row = row.at[..., a * S:(a + 1) * S].add(diag[..., a, :, :])
        out_rows.append(row)
    return jnp.concatenate(out_rows, axis=-2)


def chunked_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                            use_qk_l2norm: bool = False, chunk_size: int = 64):
    """Chunk-parallel gated delta rule (GDA or KDA by the shape of g).

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V]; g: [B, T, Hv] or [B, T, Hv, K]; beta: [B, T, Hv];
    initial_state: [B, Hv, K, V] float32. Returns (o [B, T, Hv, V] in q.dtype,
    final_state [B, Hv, K, V] float32).
    """
    out_dtype = q.dtype
    q, k, v, g, beta = prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm)
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    G = Hv // Hk
    kda = g.ndim == 4
    C = min(chunk_size, -(-T // SUB) * SUB)
    NC = -(-T // C)
    Tp = NC * C
    pad = Tp - T

    # Pad at the FRONT: padding tokens (g = beta = 0, q = k = v = 0) then leave the state
    # unchanged and only ever receive exactly-zero cotangents, and the last real token stays
    # the last token of its chunk (its decay to itself is the constant 1).
    def padt(x):
        return jnp.pad(x, [(0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 2)) if pad else x

    q, k, v, g, beta = (padt(x) for x in (q, k, v, g, beta))
    # chunked layouts: key heads [B, Hk, NC, C, K]; value heads [B, Hk, G, NC, C, ...]
    qc = q.reshape(B, NC, C, Hk, K).transpose(0, 3, 1, 2, 4) * scale
    kc = k.reshape(B, NC, C, Hk, K).transpose(0, 3, 1, 2, 4)
    vc = v.reshape(B, NC, C, Hk, G, V).transpose(0, 3, 4, 1, 2, 5)
    bc = beta.reshape(B, NC, C, Hk, G).transpose(0, 3, 4, 1, 2)
    strict, eye = _masks(C)
    last = jnp.arange(C) == C - 1
    if kda:
        gc = g.reshape(B, NC, C, Hk, G, K).transpose(0, 3, 4, 1, 2, 5)
        Gc = jnp.cumsum(gc, axis=-2)                                    # [B,Hk,G,NC,C,K]
        kg = jnp.broadcast_to(kc[:, :, None], Gc.shape)
        qg = jnp.broadcast_to(qc[:, :, None], Gc.shape)
        A = bc[..., None] * _kda_pairwise(kg, kg, Gc, include_diag=False)
        P = _kda_pairwise(qg, kg, Gc, include_diag=True)
        eG = jnp.exp(Gc)
        Gl = Gc[..., -1:, :]                                            # [B,Hk,G,NC,1,K]
        kd = kg * jnp.where(last[:, None], 1.0, jnp.exp(jnp.where(last[:, None], 0.0, Gl - Gc)))
        eQ = qg * eG
        bK = bc[..., None] * kg * eG
        decay = jnp.exp(Gl[..., 0, :])[..., :, None]                    # [B,Hk,G,NC,K,1]
    else:
        gc = g.reshape(B, NC, C, Hk, G).transpose(0, 3, 4, 1, 2)
        Gc = jnp.cumsum(gc, axis=-1)                                    # [B,Hk,G,NC,C]
        KK = _dot("bhnik,bhnjk->bhnij", kc, kc)[:, :, None]            # shared by the group
        QK = _dot("bhnik,bhnjk->bhnij", qc, kc)[:, :, None]
        diff = Gc[..., :, None] - Gc[..., None, :]
        Ds = jnp.exp(jnp.where(strict, diff, -jnp.inf))
        A = bc[..., None] * KK * Ds
        P = QK * (Ds + eye)
        eG = jnp.exp(Gc)[..., None]
        Gl = Gc[..., -1:]
        kd = kc[:, :, None] * jnp.where(last, 1.0, jnp.exp(jnp.where(last, 0.0, Gl - Gc)))[..., None]
        eQ = qc[:, :, None] * eG
        bK = (bc[..., None] * eG) * kc[:, :, None]
        decay = jnp.exp(Gl)[..., None]                                  # [B,Hk,G,NC,1,1]
    Tm = _unit_lower_inverse(A)
    W = _dot("...ij,...jk->...ik", Tm, bK)
    U = _dot("...ij,...jv->...iv", Tm, bc[..., None] * vc)

    def step(S, xs):
        W_c, U_c, eQ_c, P_c, kd_c, dec_c = xs
        Vn = U_c - _dot("...ck,...kv->...cv", W_c, S)
        o_c = _dot("...ck,...kv->...cv", eQ_c, S) + _dot("...ij,...jv->...iv", P_c, Vn)
        S = dec_c * S + _dot("...ck,...cv->...kv", kd_c, Vn)
        return S, o_c

    xs = tuple(jnp.moveaxis(x, 3, 0) for x in (W, U, eQ, P, kd, decay))
    S0 = initial_state.astype(jnp.float32).reshape(B, Hk, G, K, V)
    S, o = jax.lax.scan(step, S0, xs)                                   # o: [NC,B,Hk,G,C,V]
    o = o.transpose(1, 0, 4, 2, 3, 5).reshape(B, Tp, Hv, V)[:, pad:]
    return o.astype(out_dtype), S.reshape(B, Hv, K, V)
