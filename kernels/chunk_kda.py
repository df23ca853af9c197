"""KDA (per-key-channel gates, G [C, K]): the pairwise terms of one chunk by the sub-block rule
(SPEC section 5) and their cotangents, used by the prep and gradient kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plt

from .._common import G_MIN
from ._chunk_ops import F32, SUB, _dot, _iota, _row, _rows

# T_ij = sum_d x_id k_jd exp(G_id - G_jd) for i > j (x = k: A / beta; x = q: the causal P).
# Sub-blocks of SUB = 16 rows. Off-diagonal sub-blocks (row block a > column block b): one dot
# per row block a of (x * exp(G - G_r)) restricted to block a with (k * exp(G_r - G)) restricted
# to rows <= r, r = a * SUB - 1 the boundary row; both factors <= 1 for g <= 0. Diagonal
# sub-blocks exactly, every pair its own exp(G_i - G_j), computed only where i > j (the
# argument is masked before exp), one row offset d = i - j at a time from rows loaded shifted
# by d (the prep kernel `_kda_pairs`; the backward `_pairs_dx` and `_pairs_dk`). The backward
# uses the same off-diagonal split; its gate gradient is dG = x * dx - k * dk (G_r cancels
# exactly, so it is held constant: nothing is differentiated through the boundary row).


def _kda_gates(g_ref, b_ref, t0, C, T):
    """beta [C]; G = in-chunk cumsum of the clamped gates [C, K]; Gl = G's last row [K]."""
    G = _gate_cumsum(g_ref, t0, C, T)
    return _rows(b_ref, t0, C, T).astype(F32), G, _row(G, C - 1)


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


def _boundary_tile(G, a):
    """Both factors of `_boundary` in one tile: exp(G - G_r) on block a's rows, exp(G_r - G)
    on rows <= r, exp(0) = 1 on the rows after block a (every entry finite and <= 1). A dot
    whose other operand is zero outside the pairs (block a's rows, rows <= r) takes this tile
    unmasked on both sides."""
    C, K = G.shape
    row = _iota(C, K, 0)
    Gr = _row(G, a * SUB - 1)[None, :]
    return jnp.exp(jnp.where(row // SUB == a, G - Gr, jnp.where(row < a * SUB, Gr - G, 0.0)))


def _back_rows(ref, t0, d, C, T, ok, col, w):
    """[C, w]: row t0 + i - d, columns col .. col+w-1 of ref on each row i where ok [C, w]
    holds, zeros elsewhere (a gather with the row index clamped at 0, so the same rows are read
    in interpret mode, where a contiguous slice starting before row 0 is clamped as a whole)."""
    row = _iota(C, w, 0)
    rows = jnp.maximum(t0 + row - d, 0)
    return plt.load(ref.at[rows, col + _iota(C, w, 1)], mask=ok & (t0 + row < T), other=0.0)


def _gate_cumsum(g_ref, t0, C, T, col=0, width=None):
    """G: the chunk's cumulative clamped gates [C, width] (recomputed where a kernel needs it
    briefly, instead of holding it live)."""
    g = _rows(g_ref, t0, C, T, col=col, width=width).astype(F32)
    return jnp.cumsum(jnp.maximum(g, G_MIN), axis=0)


def _offdiag_mask(a, C):
    ii, cc = _iota(C, C, 0), _iota(C, C, 1)
    return (ii // SUB == a) & (cc <= a * SUB - 1)


# The cotangents are elementwise in the key channel d, so `_pairs_dx` and `_pairs_dk` work on
# one window of w key columns (col .. col+w-1): the gradient kernels run them window by window,
# every tile [C, w] (the reduction over d is only in the forward terms).

def _pairs_dx(Mx, k_ref, g_ref, t0, T, lp, dx0, col):
    """dx0 + the x-cotangent of `_kda_pairs` on key columns col .. col+w-1 (w = dx0's width):
    for T_ij = sum_d x_id kn_jd E_ijd (i > j, E_ijd = exp(G_id - G_jd), kn = rk k the
    normalised rows) and dT = M (its strictly lower part is read), dx_id = sum_j M_ij kn_jd
    E_ijd, [C, w] float32. Mx = M rk[None, :] (k's row factors on M's columns, so k's tiles
    enter as loaded); k's tile is loaded where it is used, not held.

    Off-diagonal sub-blocks: one dot per row block through its boundary row (`_boundary_tile`).
    Diagonal sub-blocks one row offset d at a time, on row i: Mx_i,i-d (a diagonal of Mx), k's rows shifted back by d (`_back_rows`) and exp(the gates of rows i-d+1 .. i, their
    sum carried over d; arguments <= 0)."""
    C, w = dx0.shape
    wdt = F32 if lp is None else lp

    def off(a, dx):
        E = _boundary_tile(_gate_cumsum(g_ref, t0, C, T, col, w), a)
        Ma = jnp.where(_offdiag_mask(a, C), Mx, 0.0)
        kE = (_rows(k_ref, t0, C, T, col=col, width=w).astype(F32) * E).astype(wdt)
        return dx + _dot(Ma, kE, lp=lp) * E

    dx = jax.lax.fori_loop(1, C // SUB, off, dx0)
    ij = _iota(C, C, 0) - _iota(C, C, 1)
    jrow = _iota(C, w, 0) % SUB

    def body(d, carry):
        D, dx = carry
        ok = jrow >= d   # row i - d in i's sub-block
        D = D + jnp.maximum(_back_rows(g_ref, t0, d - 1, C, T, ok, col, w).astype(F32), G_MIN)
        m = jnp.sum(jnp.where(ij == d, Mx, 0.0), axis=1)[:, None]
        kE = _back_rows(k_ref, t0, d, C, T, ok, col, w).astype(F32) * jnp.exp(jnp.where(ok, D, 0.0))
        return D, dx + jnp.where(ok, m * kE, 0.0)

    _, dx = jax.lax.fori_loop(1, SUB, body, (jnp.zeros((C, w), F32), dx))
    return dx


def _pairs_dk(Mk, x_ref, g_ref, t0, T, lp, col, w):
    """The k-cotangent of `_kda_pairs` on key columns col .. col+w-1 (notation of `_pairs_dx`,
    xn = rx x): dk_jd = sum_i M_ij xn_id E_ijd, [C, w] float32. Mk = rx[:, None] M (x's row
    factors on M's rows); x's tile is loaded where it is used.

    Off-diagonal sub-blocks as in `_pairs_dx`; diagonal sub-blocks one row offset d at a time,
    on row j: Mk_j+d,j, x's rows shifted forward by d (loaded from row t0 + d) and
    exp(the gates of rows j+1 .. j+d, carried over d)."""
    C = Mk.shape[0]
    wdt = F32 if lp is None else lp

    def off(a, dk):
        E = _boundary_tile(_gate_cumsum(g_ref, t0, C, T, col, w), a)
        Ma = jnp.where(_offdiag_mask(a, C), Mk, 0.0)
        xE = (_rows(x_ref, t0, C, T, col=col, width=w).astype(F32) * E).astype(wdt)
        return dk + _dot(Ma, xE, ta=True, lp=lp) * E

    dk = jax.lax.fori_loop(1, C // SUB, off, jnp.zeros((C, w), F32))
    ij = _iota(C, C, 0) - _iota(C, C, 1)
    jrow = _iota(C, w, 0) % SUB

    def body(d, carry):
        D, dk = carry
        ok = jrow + d < SUB   # row j + d in j's sub-block
        D = D + jnp.maximum(_rows(g_ref, t0 + d, C, T, col=col, width=w).astype(F32), G_MIN)
        m = jnp.sum(jnp.where(ij == d, Mk, 0.0), axis=0)[:, None]
        xE = (_rows(x_ref, t0 + d, C, T, col=col, width=w).astype(F32)
              * jnp.exp(jnp.where(ok, D, 0.0)))
        return D, dk + jnp.where(ok, m * xE, 0.0)

    _, dk = jax.lax.fori_loop(1, SUB, body, (jnp.zeros((C, w), F32), dk))
    return dk


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
