"""Plain-XLA chunk-parallel gated delta net (SPEC section 5): one lax.scan over 64-token chunks
whose body does all the work of a chunk for all heads, so XLA's dots stay small and cache-resident."""
from __future__ import annotations
import math
import jax
import jax.numpy as jnp
from ._common import HIGHEST, prepare

SUB = 16

def _dot(spec, a, b):
    return jnp.einsum(spec, a, b, precision=HIGHEST)

def _solve_unit_lower(a, x, bs=SUB):
    """Solves (I + a) y = x for strictly lower a [..., C, C], x [..., C, V]: blockwise forward
    substitution, 16x16 diagonal blocks inverted by a row recurrence."""
    C = a.shape[-1]
    bs = min(bs, C)
    nb = C // bs
    ab = jnp.stack([a[..., i * bs:(i + 1) * bs, i * bs:(i + 1) * bs] for i in range(nb)], -3)
    eye = jnp.eye(bs, dtype=a.dtype)
    rows = [jnp.broadcast_to(eye[0], ab.shape[:-2] + (bs,))]
    for i in range(1, bs):
        rows.append(eye[i] - _dot("...j,...jk->...k", ab[..., i, :i], jnp.stack(rows, -2)))
    Ti = jnp.stack(rows, -2)
    ys = []
    for i in range(nb):
        rhs = x[..., i * bs:(i + 1) * bs, :]
        if i:
            rhs = rhs - _dot("...ij,...jv->...iv", a[..., i * bs:(i + 1) * bs, :i * bs],
                             jnp.concatenate(ys, -2))
        ys.append(_dot("...ij,...jv->...iv", Ti[..., i, :, :], rhs))
    return jnp.concatenate(ys, -2)


# KDA pairwise terms: 16-token sub-blocks (SPEC section 5); the diagonal 16-blocks are split
# again by the same boundary rule into 4-token blocks, whose pairs are computed exactly.
KDA_BLOCKS = (16,)


def _pairs(xs, k, G, sizes):
    """Strictly-lower pairwise terms sum_d xs_xid k_jd exp(G_id - G_jd), i > j.

    xs: [..., 2, n, K] (rows: k and q), k, G: [..., n, K]. Returns [..., 2, n, n]. Blocks
    a > b of size sizes[0] are one dot through the boundary token r = a*m - 1 (both factors
    exp(G_i - G_r), exp(G_r - G_j) <= 1); diagonal blocks recurse; the last level is exact,
    one column j at a time (exp(G_i - G_j) for i > j only).
    """
    n, K = k.shape[-2:]
    lead = k.shape[:-2]
    nl = len(lead)
    if not sizes or sizes[0] >= n:
        cols = []
        for j in range(n - 1):
            kE = k[..., j:j + 1, :] * jnp.exp(G[..., j + 1:, :] - G[..., j:j + 1, :])   # [..., n-1-j, K]
            # the sum over d as a dot with ones: XLA CPU runs this much faster than a reduce
            col = _dot("...xid,d->...xi", xs[..., j + 1:, :] * kE[..., None, :, :],
                       jnp.ones((K,), k.dtype))                                       # [..., 2, n-1-j]
            cols.append(jnp.pad(col, [(0, 0)] * (nl + 1) + [(j + 1, 0)]))
        cols.append(jnp.zeros(lead + (2, n), k.dtype))
        return jnp.stack(cols, axis=-1)
    m = sizes[0]
    nb = n // m
    xb = jnp.moveaxis(xs.reshape(lead + (2, nb, m, K)), -3, -4)                       # [..., nb, 2, m, K]
    diag = _pairs(xb, k.reshape(lead + (nb, m, K)), G.reshape(lead + (nb, m, K)), sizes[1:])
    rows = []
    for a in range(nb):
        row = jnp.pad(diag[..., a, :, :, :], [(0, 0)] * (nl + 2) + [(a * m, n - (a + 1) * m)])
        if a > 0:
            r = a * m - 1
            Gr = G[..., r:r + 1, :]
            left = xs[..., a * m:(a + 1) * m, :] * jnp.exp(G[..., a * m:(a + 1) * m, :] - Gr)[..., None, :, :]
            right = k[..., :r + 1, :] * jnp.exp(Gr - G[..., :r + 1, :])
            nbat = math.prod(lead)
            off = _dot("bik,bjk->bij", left.reshape(nbat, 2 * m, K), right.reshape(nbat, r + 1, K))
            off = off.reshape(lead + (2, m, r + 1))
            row = row + jnp.pad(off, [(0, 0)] * (nl + 2) + [(0, n - r - 1)])
        rows.append(row)
    return jnp.concatenate(rows, axis=-2)


def _kda_pair_terms(k, q, b, Gc):
    """KDA's A = beta_i sum_d k_id k_jd exp(G_id - G_jd) (i > j) and the causal
    P = sum_d q_id k_jd exp(G_id - G_jd) (i >= j; the diagonal factor is the constant 1)."""
    C = k.shape[-2]
    out = _pairs(jnp.stack([k, q], axis=-3), k, Gc, tuple(s for s in KDA_BLOCKS if s < C))
    A = b[..., None] * out[..., 0, :, :]
    P = out[..., 1, :, :] + jnp.sum(q * k, axis=-1)[..., :, None] * jnp.eye(C, dtype=k.dtype)
    return A, P


def chunked_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                            use_qk_l2norm: bool = False, chunk_size: int = 64):
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
    def padt(x):
        return jnp.pad(x, [(0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 2)) if pad else x
    q, k, v, g, beta = (padt(x) for x in (q, k, v, g, beta))
    # scan over chunks in token-major layout ([NC, B, C, H, D] is a free view for B == 1);
    # the head-major transposes happen inside the body, on cache-resident chunk data.
    def chunks(x):
        return jnp.moveaxis(x.reshape((B, NC, C) + x.shape[2:]), 1, 0)
    i = jnp.arange(C)
    strict = i[:, None] > i[None, :]
    strictf = strict.astype(jnp.float32)
    tril1 = (i[:, None] >= i[None, :]).astype(jnp.float32)
    eye = (i[:, None] == i[None, :]).astype(jnp.float32)
    last = i == C - 1

    def step(S, n):
        # closed-over inputs sliced in the body: passing them as scan xs makes XLA copy them
        q_c, k_c, v_c, b_c, g_c = (jax.lax.dynamic_slice_in_dim(x, n * C, C, axis=1)
                                   for x in (q, k, v, beta, g))
        q_c = q_c.transpose(0, 2, 1, 3) * scale                      # [B, Hk, C, K]
        k_c = k_c.transpose(0, 2, 1, 3)
        v_c = v_c.reshape(B, C, Hk, G, V).transpose(0, 2, 3, 1, 4)    # [B, Hk, G, C, V]
        b_c = b_c.reshape(B, C, Hk, G).transpose(0, 2, 3, 1)         # [B, Hk, G, C]
        if kda:
            G_c = _dot("ij,bjhgk->bhgik", tril1, g_c.reshape(B, C, Hk, G, K))
        else:
            G_c = _dot("ij,bjhg->bhgi", tril1, g_c.reshape(B, C, Hk, G))
        if kda:
            kg = jnp.broadcast_to(k_c[:, :, None], G_c.shape)
            qg = jnp.broadcast_to(q_c[:, :, None], G_c.shape)
            A, P = _kda_pair_terms(kg, qg, b_c, G_c)
            eG = jnp.exp(G_c)
            Gl = G_c[..., -1:, :]
            kd = kg * jnp.where(last[:, None], 1.0, jnp.exp(jnp.where(last[:, None], 0.0, Gl - G_c)))
            eQ = qg * eG
            bK = b_c[..., None] * kg * eG
            dec = jnp.exp(Gl[..., 0, :])[..., :, None]
        else:
            KK = _dot("bhik,bhjk->bhij", k_c, k_c)[:, :, None]
            QK = _dot("bhik,bhjk->bhij", q_c, k_c)[:, :, None]
            Ds = jnp.exp(jnp.minimum(G_c[..., :, None] - G_c[..., None, :], 0.0)) * strictf
            A = b_c[..., None] * KK * Ds
            P = QK * (Ds + eye)
            eG = jnp.exp(G_c)[..., None]
            Gl = G_c[..., -1:]
            kd = k_c[:, :, None] * jnp.where(last, 1.0, jnp.exp(jnp.where(last, 0.0, Gl - G_c)))[..., None]
            eQ = q_c[:, :, None] * eG
            bK = (b_c[..., None] * eG) * k_c[:, :, None]
            dec = jnp.exp(Gl)[..., None]
        Y = _dot("...ck,...kv->...cv", jnp.concatenate([bK, eQ], axis=-2), S)
        X = b_c[..., None] * v_c - Y[..., :C, :]
        Vn = _solve_unit_lower(A, X)
        o_c = Y[..., C:, :] + _dot("...ij,...jv->...iv", P, Vn)
        S = dec * S + _dot("...ck,...cv->...kv", kd, Vn)
        return S, o_c.transpose(0, 3, 1, 2, 4).reshape(B, C, Hv, V)

    S0 = initial_state.astype(jnp.float32).reshape(B, Hk, G, K, V)
    S, o = jax.lax.scan(step, S0, jnp.arange(NC))  # o: [NC,B,C,Hv,V]
    o = jnp.moveaxis(o, 0, 1).reshape(B, Tp, Hv, V)[:, pad:]
    return o.astype(out_dtype), S.reshape(B, Hv, K, V)
