"""KDA (per-key-channel gates, G [C, K]): the pairwise terms of one chunk by the sub-block rule
(SPEC section 5) and their cotangents, used by the prep and gradient kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._common import G_MIN
from ._chunk_ops import F32, SUB, _dot, _iota, _row, _rows

# T_ij = sum_d x_id k_jd exp(G_id - G_jd) for i > j (x = k: A / beta; x = q: the causal P).
# Sub-blocks of SUB = 16 rows. Off-diagonal sub-blocks (row block a > column block b): one dot
# per row block a of (x * exp(G - G_r)) restricted to block a with (k * exp(G_r - G)) restricted
# to rows <= r, r = a * SUB - 1 the boundary row; both factors <= 1 for g <= 0. Diagonal
# sub-blocks exactly, every pair its own exp(G_i - G_j), computed only where i > j (the
# argument is masked before exp): the prep kernel one row offset i - j at a time from shifted
# loads (`_kda_pairs`), the backward one column offset jj at a time (all four sub-blocks at
# once, `_kda_pairs_bwd`). The backward uses the same off-diagonal split; its gate gradient is dG = x * dx - k * dk (G_r cancels exactly, so it is
# held constant: nothing is differentiated through the boundary row).


def _kda_gates(g_ref, b_ref, t0, C, T):
    """beta [C]; G = in-chunk cumsum of the clamped gates [C, K]; Gl = G's last row [K]."""
    g = jnp.maximum(_rows(g_ref, t0, C, T).astype(F32), G_MIN)
    beta = _rows(b_ref, t0, C, T).astype(F32)
    G = jnp.cumsum(g, axis=0)
    return beta, G, _row(G, C - 1)


def _src_rows(x, jj):
    """[C, K]: row SUB * (i // SUB) + jj of x on every row i (its sub-block's column source)."""
    C, K = x.shape
    row = _iota(C, K, 0)
    out = jnp.zeros_like(x)
    for a in range(C // SUB):
        out = jnp.where(row // SUB == a, _row(x, a * SUB + jj)[None, :], out)
    return out


def _to_src_rows(z, jj):
    """[C, K]: the sum of z's rows of sub-block a on row SUB * a + jj, zeros elsewhere."""
    C, K = z.shape
    row = _iota(C, K, 0)
    out = jnp.zeros_like(z)
    for a in range(C // SUB):
        za = jnp.sum(jnp.where(row // SUB == a, z, 0.0), axis=0)
        out = jnp.where(row == a * SUB + jj, za[None, :], out)
    return out


def _diag_decay(G, GS, jj):
    """exp(G_i - G_src(i)) on the rows below their sub-block's column source jj, else 0."""
    below = (_iota(*G.shape, 0) % SUB) > jj
    return jnp.where(below, jnp.exp(jnp.where(below, G - GS, 0.0)), 0.0)


def _boundary(G, a):
    """(L, R) of row block a (boundary r = a * SUB - 1): L = exp(G - G_r) on block a's rows,
    R = exp(G_r - G) on rows <= r, zeros elsewhere; every exp argument is <= 0 for g <= 0."""
    C, K = G.shape
    row = _iota(C, K, 0)
    r = a * SUB - 1
    Gr = _row(G, r)[None, :]
    ina = row // SUB == a
    bef = row <= r
    L = jnp.where(ina, jnp.exp(jnp.where(ina, G - Gr, 0.0)), 0.0)
    R = jnp.where(bef, jnp.exp(jnp.where(bef, Gr - G, 0.0)), 0.0)
    return L, R


def _kda_pairs_bwd(Ms, xs, k, G, lps):
    """Cotangents of `_kda_pairs`: for T_n = pairs(x_n, k) and dT_n = M_n (only the strictly
    lower part is read), returns ([dx_n], dk) with dx_n,id = sum_j M_n,ij k_jd E_ijd and
    dk_jd = sum_n sum_i M_n,ij x_n,id E_ijd. lps: the dot operand dtype per n."""
    C, K = k.shape
    ii, cc = _iota(C, C, 0), _iota(C, C, 1)
    def off(a, carry):   # row block a against the rows before it (a loop: one step live)
        dxs, dk = carry
        L, R = _boundary(G, a)
        kR = k * R
        blk = (ii // SUB == a) & (cc <= a * SUB - 1)
        dxs = list(dxs)
        for n, (M, x, lp) in enumerate(zip(Ms, xs, lps)):
            Ma = jnp.where(blk, M, 0.0)
            dxs[n] = dxs[n] + _dot(Ma, kR, lp=lp) * L
            dk = dk + _dot(Ma, x * L, ta=True, lp=lp) * R
        return tuple(dxs), dk

    dxs, dk = jax.lax.fori_loop(1, C // SUB, off, (tuple(jnp.zeros((C, K), F32) for _ in xs),
                                                   jnp.zeros((C, K), F32)))
    src = (ii // SUB) * SUB

    def body(jj, carry):
        dxs, dk = carry
        E = _diag_decay(G, _src_rows(G, jj), jj)
        kS = _src_rows(k, jj)
        sel = (cc == src + jj) & (ii % SUB > jj)
        z = jnp.zeros((C, K), F32)
        new = []
        for M, x, dx in zip(Ms, xs, dxs):
            m = jnp.sum(jnp.where(sel, M, 0.0), axis=1)[:, None] * E    # M[i, src(i)] E_i
            new.append(dx + m * kS)
            z = z + m * x
        return tuple(new), dk + _to_src_rows(z, jj)

    dxs, dk = jax.lax.fori_loop(0, SUB, body, (tuple(dxs), dk))
    return list(dxs), dk


def _kda_pairs(x_refs, xs, k, G, g_ref, t0, T, lp):
    """The pairwise terms of one chunk, for the prep kernel: [T_x for x in xs] with
    T_x,ij = sum_d x_id k_jd exp(G_id - G_jd) for i > j, else 0 ([C, C] float32), where xs and
    k are one chunk's rows of x_refs and k in any dtype (the caller applies row factors such as
    the l2 norms to the [C, C] results). G: the chunk's cumulative gates [C, K].

    Off-diagonal sub-blocks: one loop step per row block a, its rows against the rows before
    it through the boundary row r (the factors of `_boundary`; a loop, not unrolled, so one
    step's [C, K] factors are live at a time, the k side rounded to the dot dtype first).
    Diagonal sub-blocks one row offset d = i - j (1 .. SUB - 1) at a time: x's rows shifted by
    d are loaded from x_refs (rows t0 + d .., never before the chunk), so x_(j+d) sits on row
    j beside k_j, and exp(G_(j+d) - G_j) = exp(the sum of the gates of rows j+1 .. j+d), that
    sum carried over d (each exp argument <= 0). No column-source tile is extracted or
    broadcast; the loop's working set is k, the running gate sum and the [C, C] results."""
    C, K = k.shape
    ii, cc = _iota(C, C, 0), _iota(C, C, 1)
    row = _iota(C, K, 0)
    wdt = F32 if lp is None else lp

    def off(a, outs):   # row block a against the rows before it, through r = a * SUB - 1
        L, R = _boundary(G, a)
        kR = (k.astype(F32) * R).astype(wdt)
        return tuple(o + _dot(x.astype(F32) * L, kR, tb=True, lp=lp) for o, x in zip(outs, xs))

    outs = jax.lax.fori_loop(1, C // SUB, off, tuple(jnp.zeros((C, C), F32) for _ in xs))
    jrow = row % SUB

    def body(d, carry):
        D, outs = carry
        D = D + jnp.maximum(_rows(g_ref, t0 + d, C, T).astype(F32), G_MIN)
        ok = jrow + d < SUB   # row j + d in j's sub-block
        kE = jnp.where(ok, k.astype(F32) * jnp.exp(jnp.where(ok, D, 0.0)), 0.0)
        sel = (ii == cc + d) & (cc % SUB + d < SUB)
        outs = tuple(
            jnp.where(sel, jnp.sum(_rows(r, t0 + d, C, T).astype(F32) * kE, axis=1)[None, :], o)
            for o, r in zip(outs, x_refs))
        return D, outs

    _, outs = jax.lax.fori_loop(1, SUB, body, (jnp.zeros((C, K), F32), tuple(outs)))
    return list(outs)
