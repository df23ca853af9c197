"""Chunked gated delta rule (SPEC section 5) as Pallas Triton kernels: forward and backward.

GDA (scalar gate per head) and KDA (per-key-channel gates g [B, T, Hv, K], K <= 128): the same
kernels with a static `kda` flag. KDA's cumulative gates are [C, K] per chunk; its pairwise terms
(A and the causal P) follow the 16-token sub-block rule of SPEC section 5 (`_kda_pairs`, section
below), the prep kernel also writes P, which the state passes read instead of computing q k^T,
and in the backward also A / beta, which the gradient kernel reads (it computes only the
pairwise cotangents); its gate gradient dg is [.., K] (`_grad_chunk_kda`). See kernels/README.md.

Chunk size C = 64, 16-token sub-blocks for the unit lower triangular inverse. Every kernel
reads whole-T blocks of its (sequence, head) and loads one chunk at a time with masked loads
(`plt.load(ref.at[pl.ds(t0, C)], mask=rows < T, other=0)`), so any T works without padding
copies: padding rows read as q = k = v = g = beta = 0, which leave the state unchanged.

Forward (two kernels):

1. `_prep_kernel`, grid (B, Hv, NC), all parallel: per chunk, G = cumsum(g),
   A = strict(beta_i k_i.k_j exp(G_i - G_j)), Tm = (I + A)^-1 by recursive block inversion
   (32 -> 16 blocks, 16 x 16 diagonal blocks by doubling), W = Tm (beta exp(G) k),
   U = Tm (beta v). Writes W [B, T, Hv, K] and U [B, T, Hv, V] (input dtype for 16-bit inputs,
   float32 for float32 inputs).
2. `_state_kernel`, grid (B, Hv, V / BV), sequential over chunks with the [K, BV] state tile on
   chip: Vn = U - W S, O = (exp(G) q) S + (q k^T (.) causal decay) Vn, S <- exp(G_C) S + Kd^T Vn.
   Writes o, the final state, and (backward only) the state entering each chunk.

Backward (three kernels plus the prep kernel):

1. `_prep_kernel` again (W, U recomputed from the inputs).
2. `_state_kernel` with `store_states=True`, `store_o=False`: the per-chunk states
   [B, Hv, NC, K, V] float32 (chunk granularity; nothing per token).
3. `_rev_kernel`, grid (B, Hv, V / BV), reverse over chunks: the state gradient entering each
   chunk's end, dH_c [B, Hv, NC, K, V] float32, and dh0.
   dS_prev = exp(G_C) dH + (exp(G) q)^T dO - W^T dVn with dVn = P^T dO + Kd dH.
4. `_grad_kernel`, grid (B, Hv, NC, V / BV), all parallel: recomputes A, Tm, W, U, Vn, P for
   the chunk from the inputs, S_c and dH_c (a [K, BV] block each), and writes dv and partial
   sums (per value block, per value head; summed over blocks and the head group in XLA) of dq,
   dk, dbeta and dg (the in-chunk reverse cumulative sum of dG). The l2norm Jacobian and
   the G_MIN clamp mask are applied in XLA afterwards (elementwise).

Strong decay: exactly-one decay factors (P's diagonal, Kd of the chunk's last real token) are
constants, and their dG terms are masked out instead of cancelling (SPEC section 4).

Packed sequences (`cu_seqlens`, B == 1): the same kernels on the packed arrays, no copies. A
chunk table (`chunk_tables`) gives each chunk of the chunk-aligned layout its packed rows
[t0, end), its sequence and whether it starts / ends it; rows past `end` are masked exactly like
rows past T, so no chunk mixes two sequences. Only the sequential passes change: the forward
resets the state to h0[n] at a sequence's first chunk and stores ht[n] after its last; the
reverse pass restarts from dht[n] at the last chunk and stores dh0[n] after the first. Without
cu_seqlens every kernel is traced exactly as before (a static flag).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN, INPUT_DTYPES, L2NORM_EPS, check_varlen, l2norm
from .._varlen import num_aligned_chunks
from . import _platform

__all__ = ["supports", "chunked_forward", "chunked_backward", "CHUNK", "choose_block_v"]

CHUNK = 64
SUB = 16
HEAD_SIZES = (16, 32, 64, 128, 256)
KDA_HEAD_SIZES = (16, 32, 64, 128)   # K with per-key gates (see kernels/README.md)
HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(q, k, v, g, beta, initial_state=None, *, state_layout: str = "kv", cu_seqlens=None):
    """None if the chunked Pallas kernels can serve these shapes/dtypes, else the reason.

    Looks at shapes and dtypes only (ShapeDtypeStructs work). With `cu_seqlens` (int32
    [N + 1]) B must be 1 and initial_state, when given, is [N, Hv, K, V].
    """
    if state_layout != "kv":
        return f'state_layout={state_layout!r}: the chunked kernels take the "kv" layout only'
    if getattr(q, "ndim", None) != 4 or getattr(v, "ndim", None) != 4:
        return "q, k and v must have rank 4"
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    for name, d in (("K", K), ("V", V)):
        if d not in HEAD_SIZES:
            return (f"head size {name}={d} is not supported by the Pallas chunked kernels "
                    f"(needs one of {HEAD_SIZES})")
    if T < 1:
        return f"T={T}: the kernels need at least one token"
    if Hk < 1 or Hv % Hk:
        return f"Hv={Hv} is not a multiple of Hk={Hk}"
    dt = jnp.dtype(q.dtype)
    if dt not in INPUT_DTYPES:
        return f"input dtype {dt} is not one of {', '.join(map(str, INPUT_DTYPES))}"
    if jnp.dtype(k.dtype) != dt or jnp.dtype(v.dtype) != dt:
        return "q, k and v must share one dtype"
    for name, x in (("g", g), ("beta", beta)):
        if jnp.dtype(x.dtype) not in (jnp.dtype(F32), dt):
            return f"{name} dtype {x.dtype} is neither float32 nor q's dtype {dt}"
    if tuple(g.shape) == (B, T, Hv, K):
        if K not in KDA_HEAD_SIZES:
            return (f"KDA (per-key gates) with head size K={K} is not supported by the Pallas "
                    f"chunked kernels (needs one of {KDA_HEAD_SIZES})")
    elif tuple(g.shape) != (B, T, Hv):
        return f"g shape {tuple(g.shape)} is neither [B, T, Hv] (GDA) nor [B, T, Hv, K] (KDA)"
    if tuple(beta.shape) != (B, T, Hv):
        return f"beta shape {tuple(beta.shape)} is not [B, T, Hv]"
    N, n_name = B, "B"
    if cu_seqlens is not None:
        if getattr(cu_seqlens, "ndim", None) != 1 or cu_seqlens.shape[0] < 2:
            return (f"cu_seqlens shape {tuple(getattr(cu_seqlens, 'shape', ()))} is not [N + 1] "
                    "with N >= 1")
        if jnp.dtype(cu_seqlens.dtype) != jnp.dtype(jnp.int32):
            return f"cu_seqlens dtype {cu_seqlens.dtype} is not int32"
        if B != 1:
            return f"cu_seqlens packs the sequences along T and needs B == 1, got B={B}"
        N, n_name = cu_seqlens.shape[0] - 1, "N"
    if initial_state is not None:
        if tuple(initial_state.shape) != (N, Hv, K, V):
            return (f"initial_state shape {tuple(initial_state.shape)} is not [{n_name}, Hv, K, V] "
                    f"= {(N, Hv, K, V)}")
        if jnp.dtype(initial_state.dtype) != jnp.dtype(F32):
            return f"initial_state must be float32, got {initial_state.dtype}"
    return None


def choose_block_v(B: int, Hv: int, V: int, K: int) -> int:
    """Value columns per program of the sequential kernels: 32 at K <= 128 (state tile
    [K, 32] float32 = 16 KiB; smaller tiles leave registers for the chunk's operands), 16 at
    K = 256; never more than V."""
    return min(V, 32 if K <= 128 else 16)


# ----------------------------------------------------------------------------------------
# In-kernel helpers (Triton-lowerable: 2-D dots, elementwise, reductions, power-of-2 splits)
# ----------------------------------------------------------------------------------------

def _dot(a, b, *, ta=False, tb=False, lp=None):
    """a @ b (a^T if ta, b^T if tb) with float32 accumulation.

    lp: None -> float32 operands at full precision (HIGHEST, IEEE in Triton); a 16-bit dtype ->
    both operands cast to it (tensor cores), float32 accumulation.
    """
    if lp is None:
        a, b, prec = a.astype(F32), b.astype(F32), HIGHEST
    else:
        a, b, prec = a.astype(lp), b.astype(lp), None
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def _iota(n, m, axis):
    return jax.lax.broadcasted_iota(jnp.int32, (n, m), axis)


def _split2(x, axis):
    return jnp.split(x, 2, axis=axis)


def _cat2(x, y, axis):
    """Concatenation of two equal blocks along axis 0 or 1 (stack on a new last axis, move it)."""
    s = jnp.stack([x, y], axis=-1)  # [m, n, 2]
    if axis == 0:
        s = jnp.transpose(s, (2, 0, 1))
        return s.reshape(2 * x.shape[0], x.shape[1])
    s = jnp.transpose(s, (0, 2, 1))
    return s.reshape(x.shape[0], 2 * x.shape[1])


def _inv_unit_lower(A):
    """(I + A)^-1 for strictly lower A [n, n] (n a power of two >= 16), float32.

    n <= 16: doubling over the block diagonal, T_2s = T_s - T_s E_s T_s (E_s: the
    s-blocks just below the diagonal inside 2s-blocks; exact because (T_s E_s)^2 = 0).
    n > 16: recursive 2 x 2 block inversion [[T11, 0], [-T22 A21 T11, T22]].
    Both are block forward substitution: no large intermediate powers of A.
    """
    n = A.shape[0]
    if n <= SUB:
        i, j = _iota(n, n, 0), _iota(n, n, 1)
        Tm = jnp.where(i == j, 1.0, jnp.where(i // 2 == j // 2, -A, 0.0))
        s = 2
        while s < n:
            E = jnp.where((i // (2 * s) == j // (2 * s)) & (i // s != j // s), A, 0.0)
            Tm = Tm - _dot(Tm, _dot(E, Tm))
            s *= 2
        return Tm
    top, bot = _split2(A, 0)
    A11, _ = _split2(top, 1)
    A21, A22 = _split2(bot, 1)
    T11 = _inv_unit_lower(A11)
    T22 = _inv_unit_lower(A22)
    T21 = -_dot(T22, _dot(A21, T11))
    return _cat2(_cat2(T11, jnp.zeros_like(T11), 1), _cat2(T21, T22, 1), 0)


def _rows(ref, t0, n, T, other=0.0):
    """Rows t0 .. t0+n-1 of a [T, ...] ref, zeros beyond T."""
    if len(ref.shape) == 1:
        idx = t0 + jnp.arange(n)
        return plt.load(ref.at[pl.ds(t0, n)], mask=idx < T, other=other)
    idx = t0 + _iota(n, ref.shape[1], 0)
    return plt.load(ref.at[pl.ds(t0, n), :], mask=idx < T, other=other)


def _store_rows(ref, t0, val, T):
    n = val.shape[0]
    idx = t0 + _iota(n, val.shape[1], 0)
    plt.store(ref.at[pl.ds(t0, n), :], val.astype(ref.dtype), mask=idx < T)


def _l2n(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS)


def _gates(g_ref, b_ref, t0, C, T):
    """g (clamped), beta as float32 [C]; G = in-chunk cumsum; Gl = G of the last row."""
    g = jnp.maximum(_rows(g_ref, t0, C, T).astype(F32), G_MIN)
    beta = _rows(b_ref, t0, C, T).astype(F32)
    G = jnp.cumsum(g)
    return g, beta, G, _last(G)


def _last(G):
    """G of the chunk's last row, extracted exactly (rows beyond T have g = 0, so this is also
    the last real row's G, bit for bit)."""
    n = G.shape[0]
    return jnp.sum(jnp.where(jnp.arange(n) == n - 1, G, 0.0))


def _chunk_A(k, beta, G, lp):
    """A = strict(beta_i (k_i.k_j) exp(G_i - G_j)) [C, C], and KK = k k^T."""
    C = k.shape[0]
    i, j = _iota(C, C, 0), _iota(C, C, 1)
    KK = _dot(k, k, tb=True, lp=lp)
    low = i > j
    D = jnp.where(low, jnp.exp(jnp.where(low, G[:, None] - G[None, :], 0.0)), 0.0)
    return beta[:, None] * KK * D, KK, D


# ----------------------------------------------------------------------------------------
# KDA (per-key-channel gates, G [C, K]): pairwise terms by the sub-block rule (SPEC section 5)
# ----------------------------------------------------------------------------------------
#
# T_ij = sum_d x_id k_jd exp(G_id - G_jd) for i > j (x = k: A / beta; x = q: the causal P).
# Sub-blocks of SUB = 16 rows. Off-diagonal sub-blocks (row block a > column block b): one dot
# per row block a of (x * exp(G - G_r)) restricted to block a with (k * exp(G_r - G)) restricted
# to rows <= r, r = a * SUB - 1 the boundary row; both factors <= 1 for g <= 0. Diagonal
# sub-blocks exactly: one column offset jj at a time (all four sub-blocks at once), the factor
# exp(G_i - G_j) computed only where i > j (the argument is masked before exp). The backward
# uses the same split; its gate gradient is dG = x * dx - k * dk (G_r cancels exactly, so it is
# held constant: nothing is differentiated through the boundary row).

def _kda_gates(g_ref, b_ref, t0, C, T):
    """beta [C]; G = in-chunk cumsum of the clamped gates [C, K]; Gl = G's last row [K]."""
    g = jnp.maximum(_rows(g_ref, t0, C, T).astype(F32), G_MIN)
    beta = _rows(b_ref, t0, C, T).astype(F32)
    G = jnp.cumsum(g, axis=0)
    return beta, G, _row(G, C - 1)


def _row(x, r):
    """Row r (static or traced) of x [n, m] as [m], exactly (a masked sum of one row)."""
    return jnp.sum(jnp.where(_iota(*x.shape, 0) == r, x, 0.0), axis=0)


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


def _kda_pairs(xs, k, G, lp):
    """[T_x for x in xs]: T_x,ij = sum_d x_id k_jd exp(G_id - G_jd) for i > j, else 0 ([C, C])."""
    C = k.shape[0]
    ii, cc = _iota(C, C, 0), _iota(C, C, 1)
    outs = [jnp.zeros((C, C), F32) for _ in xs]
    for a in range(1, C // SUB):
        L, R = _boundary(G, a)
        kR = k * R
        outs = [o + _dot(x * L, kR, tb=True, lp=lp) for o, x in zip(outs, xs)]
    src = (ii // SUB) * SUB

    def body(jj, outs):
        E = _diag_decay(G, _src_rows(G, jj), jj) * _src_rows(k, jj)
        sel = (cc == src + jj) & (ii % SUB > jj)
        return tuple(jnp.where(sel, jnp.sum(x * E, axis=1)[:, None], o) for o, x in zip(outs, xs))

    return list(jax.lax.fori_loop(0, SUB, body, tuple(outs)))


def _kda_pairs_bwd(Ms, xs, k, G, lps):
    """Cotangents of `_kda_pairs`: for T_n = pairs(x_n, k) and dT_n = M_n (only the strictly
    lower part is read), returns ([dx_n], dk) with dx_n,id = sum_j M_n,ij k_jd E_ijd and
    dk_jd = sum_n sum_i M_n,ij x_n,id E_ijd. lps: the dot operand dtype per n."""
    C, K = k.shape
    ii, cc = _iota(C, C, 0), _iota(C, C, 1)
    dxs = [jnp.zeros((C, K), F32) for _ in xs]
    dk = jnp.zeros((C, K), F32)
    for a in range(1, C // SUB):
        L, R = _boundary(G, a)
        kR = k * R
        blk = (ii // SUB == a) & (cc <= a * SUB - 1)
        for n, (M, x, lp) in enumerate(zip(Ms, xs, lps)):
            Ma = jnp.where(blk, M, 0.0)
            dxs[n] = dxs[n] + _dot(Ma, kR, lp=lp) * L
            dk = dk + _dot(Ma, x * L, ta=True, lp=lp) * R
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


# ----------------------------------------------------------------------------------------
# Packed sequences (cu_seqlens): per-chunk tables
# ----------------------------------------------------------------------------------------
#
# The kernels read and write the packed [1, T, ...] arrays in place; no aligned copy is made.
# Chunk c of the chunk-aligned layout (`gdn_jax._varlen.chunk_layout`: every sequence starts a
# chunk) is the packed rows t0 .. t0 + C - 1, of which rows < end are real: rows at or past `end`
# are masked on load (q = k = v = g = beta = 0, identity tokens) and on store, exactly like the
# rows past T of the last chunk without cu_seqlens. So a chunk never mixes two sequences, and
# the chunk-local math (prep, gradients) is unchanged; only the sequential state passes reset
# at sequence boundaries.

TAB_T0, TAB_END, TAB_SEQ, TAB_FLAGS = range(4)   # columns of the chunk table
FIRST, LAST = 1, 2                                # flag bits: chunk starts / ends its sequence


class ChunkTables(NamedTuple):
    ctab: jax.Array     # [NC, 4] int32: (t0, end, sequence, flags) per aligned chunk
    nused: jax.Array    # [1] int32: chunks in use (sum of ceil(L_n / C)); the rest are empty
    empty: jax.Array    # [N] int32: 1 for a length-0 sequence (it owns no chunk)
    num_chunks: int     # NC, static: `num_aligned_chunks(T, N, C)`
    num_seqs: int       # N


def chunk_tables(cu_seqlens, T: int) -> ChunkTables:
    """The per-chunk tables of the packed layout, computed with jnp (cu_seqlens may be traced).

    The same layout as `gdn_jax._varlen.chunk_layout` (sequence n owns aligned chunks
    start_n .. end_n - 1, ceil(L_n / C) of them, in order; tests check the two agree), written
    as broadcast compares and row reductions over [NC, N] instead of searchsorted, so XLA
    builds it in a few small fusions and no loop.

    Unused trailing chunks (c >= nused) get t0 = end = 0, sequence 0 and no flags: every row
    is masked and the parallel kernels skip them; the sequential kernels stop at nused.
    Rows are clipped to [0, T] and nused to NC, so a traced cu_seqlens with bad values gives
    undefined results but never an out-of-bounds access.
    """
    cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
    N = cu.shape[0] - 1
    NC = num_aligned_chunks(T, N, CHUNK)
    lens = cu[1:] - cu[:-1]
    nch = jnp.maximum(lens + CHUNK - 1, 0) // CHUNK
    endc = jnp.cumsum(nch).astype(jnp.int32)        # exclusive end chunk of each sequence
    startc = endc - nch
    c = jnp.arange(NC, dtype=jnp.int32)[:, None]
    own = (startc[None, :] <= c) & (c < endc[None, :])   # [NC, N]: at most one owner per chunk

    def pick(x):
        return jnp.sum(jnp.where(own, x, 0), axis=1)

    used = jnp.any(own, axis=1)
    seq = pick(jnp.arange(N, dtype=jnp.int32)[None, :])
    t0 = jnp.clip(pick(cu[None, :-1] + (c - startc[None, :]) * CHUNK), 0, T)
    end = jnp.clip(jnp.minimum(t0 + CHUNK, pick(cu[None, 1:])), t0, T)
    flags = pick(jnp.where(c == startc[None, :], FIRST, 0)
                 + jnp.where(c == endc[None, :] - 1, LAST, 0))
    ctab = jnp.stack([jnp.where(used, t0, 0), jnp.where(used, end, 0), seq, flags], axis=1)
    nused = jnp.clip(jnp.sum(nch), 0, NC).astype(jnp.int32).reshape(1)
    return ChunkTables(ctab.astype(jnp.int32), nused, (lens == 0).astype(jnp.int32), NC, N)


def _span(ctab_ref, c, C, T):
    """(t0, end) of chunk c: its first packed row and the exclusive end of its real rows.
    Without cu_seqlens (ctab_ref None) c * C and T, exactly the expressions of the dense path."""
    if ctab_ref is None:
        return c * C, T
    return ctab_ref[c, TAB_T0], ctab_ref[c, TAB_END]


def _table_row(ctab_ref, c):
    """Chunk c's table row (t0, end, sequence, flags), c clipped into the table."""
    c = jnp.clip(c, 0, ctab_ref.shape[0] - 1)
    return tuple(ctab_ref[c, i] for i in range(4))


def _seq_flags(row):
    """(sequence, first, last) from a table row."""
    return row[TAB_SEQ], (row[TAB_FLAGS] & FIRST) != 0, (row[TAB_FLAGS] & LAST) != 0


def _varlen_loop(ctab_ref, n, body, carry, reverse=False):
    """fori_loop over chunks 0 .. n-1 (n - 1 .. 0 when reverse) calling body(c, row, carry).

    The next chunk's table row is loaded one iteration ahead (carried), so the chunk's
    operand addresses do not wait on a dependent scalar load at every step of the sequential
    pass."""
    def step(i, carry_row):
        carry, row = carry_row
        c = n - 1 - i if reverse else i
        nxt = _table_row(ctab_ref, c - 1 if reverse else c + 1)
        return body(c, row, carry), nxt
    row0 = _table_row(ctab_ref, n - 1 if reverse else 0)
    return jax.lax.fori_loop(0, n, step, (carry, row0))[0]


def _load_state_if(ref, n, pred, other):
    """State tile of sequence n from a [N, K, BV] block where pred, else `other` (a tile or 0).
    Predicated: nothing is read when pred is false, so the per-chunk check costs no memory
    traffic, and the loaded tile replaces `other` in place (no second live tile)."""
    shape = (ref.shape[-2], ref.shape[-1])
    return plt.load(ref.at[n], mask=jnp.full(shape, pred), other=other).astype(F32)


def _store_state_if(ref, n, val, pred):
    plt.store(ref.at[n], val.astype(ref.dtype), mask=jnp.full(val.shape, pred))


def _fill_empty(empty_ref, src_ref, dst_ref, N, shape):
    """dst[n] = src[n] (zeros when src_ref is None) for every length-0 sequence n: it owns no
    chunk, so the chunk loop never writes its final state (or its dh0)."""
    def body(n, carry):
        e = empty_ref[n] != 0
        val = (_load_state_if(src_ref, n, e, 0.0) if src_ref is not None
               else jnp.zeros(shape, F32))
        _store_state_if(dst_ref, n, val, e)
        return carry
    jax.lax.fori_loop(0, N, body, 0)


# ----------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------

def _prep_kernel(*refs, T, C, l2, lp, varlen, kda=False, scale=1.0, store_a=False):
    """GDA: W, U of one chunk. KDA: also P [C, C], the causal intra-chunk q k^T with per-key
    decay (diagonal q_i . k_i: its decay factor is the constant 1), read by the state passes,
    and with store_a (backward) A / beta = pairs(k, k) [C, C] float32, read by the gradient
    kernel."""
    ctab_ref = refs[0] if varlen else None
    refs = refs[1:] if varlen else refs
    a_ref = refs[-1] if store_a else None
    refs = refs[:-1] if store_a else refs
    if kda:
        q_ref, k_ref, v_ref, g_ref, b_ref, w_ref, u_ref, p_ref = refs
    else:
        k_ref, v_ref, g_ref, b_ref, w_ref, u_ref = refs
    t0, end = _span(ctab_ref, pl.program_id(2), C, T)

    def run():
        k = _rows(k_ref, t0, C, end).astype(F32)
        if l2:
            k = _l2n(k)
        v = _rows(v_ref, t0, C, end)
        if kda:
            q, _ = _qk_chunk(q_ref, None, t0, C, end, l2, scale)
            beta, G, _ = _kda_gates(g_ref, b_ref, t0, C, end)
            Akk, Pqk = _kda_pairs([k, q], k, G, lp)
            A = beta[:, None] * Akk
            bK = beta[:, None] * jnp.exp(G) * k
            ii, cc = _iota(C, C, 0), _iota(C, C, 1)
            P = Pqk + jnp.where(ii == cc, jnp.sum(q * k, axis=1)[:, None], 0.0)
            _store_rows(p_ref, t0, P, end)
            if store_a:
                _store_rows(a_ref, t0, Akk, end)
        else:
            _, beta, G, _ = _gates(g_ref, b_ref, t0, C, end)
            A, _, _ = _chunk_A(k, beta, G, lp)
            bK = (beta * jnp.exp(G))[:, None] * k
        Tm = _inv_unit_lower(A)
        bV = beta[:, None] * v.astype(F32)
        _store_rows(w_ref, t0, _dot(Tm, bK, lp=lp), end)
        _store_rows(u_ref, t0, _dot(Tm, bV, lp=lp), end)

    if varlen:
        pl.when(end > t0)(run)   # unused trailing chunks: nothing to do
    else:
        run()


def _state_kernel(*refs, T, C, NC, scale, l2, lp, has_h0, store_o, store_ht, store_states,
                  varlen=False, N=1, kda=False):
    """The sequential forward pass of one (sequence, value head, V-block).

    varlen: refs start with the chunk tables; the loop runs over the nused aligned chunks, the
    state becomes the sequence's initial state (h0[n] or zeros) at each sequence's first chunk
    and is stored as its final state after its last chunk (h0 / ht are [N, K, BV] blocks).
    """
    it = iter(refs)
    ctab_ref, nused_ref, empty_ref = (next(it) for _ in range(3)) if varlen else (None,) * 3
    q_ref, k_ref, g_ref, w_ref, u_ref = (next(it) for _ in range(5))
    p_ref = next(it) if kda and store_o else None
    h0_ref = next(it) if has_h0 else None
    o_ref = next(it) if store_o else None
    ht_ref = next(it) if store_ht else None
    hs_ref = next(it) if store_states else None
    K = q_ref.shape[-1]
    BV = u_ref.shape[-1]
    if varlen:   # the first chunk is always a sequence's first chunk: it loads the state
        S = jnp.zeros((K, BV), F32)
        if store_ht:
            _fill_empty(empty_ref, h0_ref, ht_ref, N, (K, BV))
    else:
        S = h0_ref[...].astype(F32) if has_h0 else jnp.zeros((K, BV), F32)
    i, j = _iota(C, C, 0), _iota(C, C, 1)
    causal = i >= j

    cast = (lambda x: x.astype(lp)) if lp is not None else (lambda x: x)

    def body(c, S, row=None):
        if varlen:
            t0, T_ = row[TAB_T0], row[TAB_END]
            seq, first, last = _seq_flags(row)
            if not has_h0:
                S = jnp.where(first, 0.0, S)
            elif store_o:
                S = _load_state_if(h0_ref, seq, first, S)
            else:
                # ptxas (sm_90a, K = V = 128, bf16): the in-place load costs the state-only
                # pass 31 registers and 12 KiB of layout-conversion smem (157 vs 126, 1 vs 2
                # blocks/SM); a zero-filled load and a select do not. The output pass is the
                # other way round (80 vs 92 B spills).
                S = jnp.where(first, _load_state_if(h0_ref, seq, first, 0.0), S)
        else:
            t0, T_ = c * C, T
        if store_states:
            hs_ref[c] = S
        g = jnp.maximum(_rows(g_ref, t0, C, T_).astype(F32), G_MIN)
        if kda:   # G [C, K], Gl [K]: per-key decays
            G = jnp.cumsum(g, axis=0)
            Gl = _row(G, C - 1)
            dGl, eG, eGl = Gl[None, :] - G, jnp.exp(G), jnp.exp(Gl)[:, None]
        else:
            G = jnp.cumsum(g)
            Gl = _last(G)
            dGl, eG, eGl = (Gl - G)[:, None], jnp.exp(G)[:, None], jnp.exp(Gl)
        k = _rows(k_ref, t0, C, T_).astype(F32)
        if l2:
            k = _l2n(k)
        # 16-bit operands as soon as the float32 elementwise work is done (fewer live registers)
        Kd = cast(k * jnp.exp(dGl))
        k = cast(k)
        W = _rows(w_ref, t0, C, T_)
        U = _rows(u_ref, t0, C, T_).astype(F32)
        Vn = U - _dot(W, S, lp=lp)
        if store_o:
            q = _rows(q_ref, t0, C, T_).astype(F32)
            if l2:
                q = _l2n(q)
            q = q * scale
            qe = cast(q * eG)
            if kda:   # the causal pairwise block from the prep kernel
                P = _rows(p_ref, t0, C, T_)
            else:
                P = jnp.where(causal, _dot(cast(q), k, tb=True, lp=lp) *
                              jnp.exp(jnp.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
            o = _dot(qe, S, lp=lp) + _dot(P, Vn, lp=lp)
            _store_rows(o_ref, t0, o, T_)
        S = eGl * S + _dot(Kd, Vn, ta=True, lp=lp)
        if varlen and store_ht:
            _store_state_if(ht_ref, seq, S, last)
        return S

    if varlen:
        _varlen_loop(ctab_ref, nused_ref[0], lambda c, row, S: body(c, S, row), S)
    else:
        S = jax.lax.fori_loop(0, NC, body, S)
        if store_ht:
            ht_ref[...] = S


def _lp_dtype(dtype):
    dt = jnp.dtype(dtype)
    return None if dt == jnp.dtype(F32) else dt


def _specs(B, T, Hk, Hv, K, V, group, bv=None):
    """BlockSpecs over whole-T slabs for grids (n, h, x)."""
    qk = pl.BlockSpec((None, T, None, K), lambda n, h, x: (n, 0, h // group, 0))
    vh = pl.BlockSpec((None, T, None, V), lambda n, h, x: (n, 0, h, 0))
    kh = pl.BlockSpec((None, T, None, K), lambda n, h, x: (n, 0, h, 0))
    vb = pl.BlockSpec((None, T, None, bv), lambda n, h, x: (n, 0, h, x)) if bv else None
    gb = pl.BlockSpec((None, T, None), lambda n, h, x: (n, 0, h))
    return qk, vh, kh, vb, gb


def _whole(x):
    """BlockSpec of a small array read whole by every program (the chunk tables)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _table_args(tabs, chunk_only=False):
    """(in_specs, args) of the chunk tables (none without cu_seqlens)."""
    if tabs is None:
        return [], []
    xs = [tabs.ctab] if chunk_only else [tabs.ctab, tabs.nused, tabs.empty]
    return [_whole(x) for x in xs], xs


def _num_chunks(T, tabs):
    return pl.cdiv(T, CHUNK) if tabs is None else tabs.num_chunks


def _state_spec(tabs, K, bv):
    """Initial / final state (or their gradients): [B, Hv, K, V], or [N, Hv, K, V] read whole
    over N with cu_seqlens (a program picks its sequences' tiles by dynamic index)."""
    if tabs is None:
        return pl.BlockSpec((None, None, K, bv), lambda n, h, x: (n, h, 0, x))
    return pl.BlockSpec((tabs.num_seqs, None, K, bv), lambda n, h, x: (0, h, 0, x))


def _is_kda(g):
    return g.ndim == 4


def _gate_spec(g, T, K):
    """g's BlockSpec for grids (n, h, x): [T] (GDA) or [T, K] (KDA) of value head h."""
    if _is_kda(g):
        return pl.BlockSpec((None, T, None, K), lambda n, h, *_: (n, 0, h, 0))
    return pl.BlockSpec((None, T, None), lambda n, h, *_: (n, 0, h))


def _prep_call(k, v, g, beta, *, Hv, l2, lp, interpret, tabs=None, num_warps=8, q=None,
               scale=1.0, store_a=False):
    """(W, U) for GDA; (W, U, P) for KDA (q needed then; P [B, T, Hv, C]), and with store_a
    (W, U, P, A / beta) (A / beta [B, T, Hv, C] float32)."""
    B, T, Hk, K = k.shape
    V = v.shape[-1]
    NC = _num_chunks(T, tabs)
    kda = _is_kda(g)
    qk, vh, kh, _, gb = _specs(B, T, Hk, Hv, K, V, Hv // Hk)
    wdt = lp if lp is not None else F32
    t_specs, t_args = _table_args(tabs, chunk_only=True)
    store_a = store_a and kda
    kern = functools.partial(_prep_kernel, T=T, C=CHUNK, l2=l2, lp=lp, varlen=tabs is not None,
                             kda=kda, scale=float(scale), store_a=store_a)
    in_specs = [*t_specs, qk, vh, _gate_spec(g, T, K), gb]
    args = [*t_args, k, v, g, beta]
    out_specs = [kh, vh]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hv, K), wdt), jax.ShapeDtypeStruct((B, T, Hv, V), wdt)]
    if kda:
        in_specs.insert(len(t_specs), qk)
        args.insert(len(t_args), q)
        out_specs.append(pl.BlockSpec((None, T, None, CHUNK), lambda n, h, x: (n, 0, h, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, CHUNK), wdt))
    if store_a:
        out_specs.append(_p_spec(T))
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, CHUNK), F32))
    return pl.pallas_call(
        kern, grid=(B, Hv, NC), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"gdn_chunk_{'kda_' if kda else ''}prep_k{K}_v{V}")(*args)


def _p_spec(T):
    return pl.BlockSpec((None, T, None, CHUNK), lambda n, h, x: (n, 0, h, 0))


def _state_call(q, k, g, W, U, h0, *, Hv, scale, l2, lp, store_o, store_ht, store_states,
                interpret, tabs=None, num_warps=8, P=None):
    B, T, Hk, K = q.shape
    V = U.shape[-1]
    NC = _num_chunks(T, tabs)
    NS = B if tabs is None else tabs.num_seqs
    bv = choose_block_v(B, Hv, V, K)
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
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, NC, K, V), F32))
    kern = functools.partial(_state_kernel, T=T, C=CHUNK, NC=NC, scale=float(scale), l2=l2, lp=lp,
                             has_h0=h0 is not None, store_o=store_o, store_ht=store_ht,
                             store_states=store_states, varlen=tabs is not None, N=NS, kda=kda)
    name = f"gdn_chunk_{'kda_' if kda else ''}{'fwd' if store_o else 'states'}_k{K}_v{V}_bv{bv}"
    return pl.pallas_call(
        kern, grid=(B, Hv, V // bv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=name)(*args)


def _varlen_tables(q, cu_seqlens):
    """None without cu_seqlens; else the chunk tables, after the value checks of a concrete
    cu_seqlens (starts at 0, non-decreasing, ends at T: ValueError naming cu_seqlens). A traced
    cu_seqlens is not checked; with bad values the results are undefined, but every load and
    store stays inside the arrays (see `chunk_tables`)."""
    if cu_seqlens is None:
        return None
    B, T = q.shape[:2]
    check_varlen(B, T, cu_seqlens, None, 0, True)
    return chunk_tables(cu_seqlens, T)


def chunked_forward(q, k, v, g, beta, initial_state=None, *, scale: float,
                    use_qk_l2norm: bool = False, output_final_state: bool = True,
                    interpret: bool = False, cu_seqlens=None):
    """Chunked forward. Returns (o [B, T, Hv, V] in q.dtype, final_state [N, Hv, K, V] float32
    or None), N = B.

    cu_seqlens (int32 [N + 1], may be traced; B == 1): N packed sequences, each from its own
    initial state (initial_state [N, Hv, K, V] or None: zeros); final_state [N, Hv, K, V], a
    length-0 sequence's being its initial state. One compiled program per (T, N).
    """
    reason = supports(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Pallas chunked kernels cannot serve this call: {reason}")
    tabs = _varlen_tables(q, cu_seqlens)
    Hv = v.shape[2]
    lp = _lp_dtype(q.dtype)
    q, k, v, g, beta, initial_state = _platform.guard(
        q, k, v, g, beta, initial_state, what="chunked kernels", interpret=interpret)
    W, U, *P = _prep_call(k, v, g, beta, Hv=Hv, l2=use_qk_l2norm, lp=lp, interpret=interpret,
                          tabs=tabs, q=q, scale=scale)
    outs = _state_call(q, k, g, W, U, initial_state, Hv=Hv, scale=scale, l2=use_qk_l2norm, lp=lp,
                       store_o=True, store_ht=output_final_state, store_states=False,
                       interpret=interpret, tabs=tabs, P=P[0] if P else None)
    return outs[0], (outs[1] if output_final_state else None)


# ----------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------

def _qk_chunk(q_ref, k_ref, t0, C, T, l2, scale):
    """(scale * q, k) of one chunk, l2-normalised first when l2; k is None when k_ref is."""
    q = _rows(q_ref, t0, C, T).astype(F32)
    k = None if k_ref is None else _rows(k_ref, t0, C, T).astype(F32)
    if l2:
        q = _l2n(q)
        k = None if k is None else _l2n(k)
    return q * scale, k


def _causal_decay(G):
    """exp(G_i - G_j) for i >= j (the diagonal is exp(0) = 1 exactly), 0 above."""
    C = G.shape[0]
    causal = _iota(C, C, 0) >= _iota(C, C, 1)
    return jnp.where(causal, jnp.exp(jnp.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)


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
    dhs_ref, dh0_ref = next(it), next(it)
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
        dhs_ref[c] = dH
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
        dH = eGl * dH + _dot(qe, dO, ta=True, lp=lp) - _dot(W, dVn, ta=True, lp=lp)
        if varlen:
            _store_state_if(dh0_ref, seq, dH, first)
        return dH

    if varlen:
        _varlen_loop(ctab_ref, nused_ref[0], lambda c, row, dH: body(c, dH, row), dH, reverse=True)
    else:
        dh0_ref[...] = jax.lax.fori_loop(0, NC, lambda cc, dH: body(NC - 1 - cc, dH), dH)


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


def _rev_call(q, k, g, W, do, dht, *, Hv, scale, l2, lp, interpret, tabs=None, num_warps=8,
              P=None):
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
        out_specs=[pl.BlockSpec((None, None, NC, K, bv), lambda n, h, x: (n, h, 0, 0, x)), s_spec],
        out_shape=[jax.ShapeDtypeStruct((B, Hv, NC, K, V), F32),
                   jax.ShapeDtypeStruct((NS, Hv, K, V), F32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"gdn_chunk_{'kda_' if kda else ''}bwd_state_k{K}_v{V}_bv{bv}")(*args)


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


def chunked_backward(q, k, v, g, beta, initial_state, do, dht, *, scale: float,
                     use_qk_l2norm: bool = False, interpret: bool = False, cu_seqlens=None):
    """Gradients of `chunked_forward` (o, final_state) for cotangents do [B, T, Hv, V] and dht
    [N, Hv, K, V] (None: zeros). Recomputes W, U and the per-chunk states from the inputs.

    Returns (dq, dk, dv, dg, dbeta, dh0) in the dtypes and shapes of the inputs; dh0 is None
    when initial_state is None. cu_seqlens as in `chunked_forward` (N packed sequences;
    dht and dh0 [N, Hv, K, V]; a length-0 sequence passes dht[n] through to dh0[n]).
    """
    reason = supports(q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Pallas chunked kernels cannot serve this call: {reason}")
    B, T, Hk, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    Hv, V = v.shape[2], v.shape[3]
    if tuple(do.shape) != (B, T, Hv, V):
        raise ValueError(f"do shape {tuple(do.shape)} is not the shape of o {(B, T, Hv, V)}")
    if dht is not None and tuple(dht.shape) != (N, Hv, K, V):
        raise ValueError(f"dht shape {tuple(dht.shape)} is not the shape of the final state "
                         f"{(N, Hv, K, V)}")
    tabs = _varlen_tables(q, cu_seqlens)
    lp = _lp_dtype(q.dtype)
    l2 = bool(use_qk_l2norm)
    q_in, k_in, g_in = q, k, g
    q, k, v, g, beta, initial_state, do, dht = _platform.guard(
        q, k, v, g, beta, initial_state, do, dht, what="chunked kernels (backward)",
        interpret=interpret)
    do = do.astype(q.dtype)
    W, U, *PA = _prep_call(k, v, g, beta, Hv=Hv, l2=l2, lp=lp, interpret=interpret, tabs=tabs,
                           q=q, scale=scale, store_a=True)
    P, Akk = PA if PA else (None, None)
    (hs,) = _state_call(q, k, g, W, U, initial_state, Hv=Hv, scale=scale, l2=l2, lp=lp,
                        store_o=False, store_ht=False, store_states=True, interpret=interpret,
                        tabs=tabs)
    dhs, dh0 = _rev_call(q, k, g, W, do, dht, Hv=Hv, scale=scale, l2=l2, lp=lp, interpret=interpret,
                         tabs=tabs, P=P)
    dq, dk, dv, dbeta, dg = _grad_call(q, k, v, g, beta, do, hs, dhs, scale=scale, l2=l2, lp=lp,
                                       interpret=interpret, tabs=tabs, P=P, Akk=Akk)
    grp = Hv // Hk
    dq = dq.sum(0).reshape(B, T, Hk, grp, K).sum(3)  # value blocks, then the head group
    dk = dk.sum(0).reshape(B, T, Hk, grp, K).sum(3)
    dbeta, dg = dbeta.sum(0), dg.sum(0)
    if l2:  # the l2norm Jacobian, elementwise in XLA
        dq = jax.vjp(l2norm, q_in)[1](dq)[0]
        dk = jax.vjp(l2norm, k_in)[1](dk)[0]
    dg = jnp.where(g_in.astype(F32) >= G_MIN, dg, 0.0)
    return (dq.astype(q_in.dtype), dk.astype(k_in.dtype), dv, dg.astype(g_in.dtype),
            dbeta.astype(beta.dtype), dh0 if initial_state is not None else None)


# ----------------------------------------------------------------------------------------
# Static cost model (kernels/README.md): FLOPs and bytes per kernel from the grids and blocks
# ----------------------------------------------------------------------------------------

def _inv_flops(n):
    """FLOPs of `_inv_unit_lower` on an n x n block (float32 IEEE dots)."""
    if n <= SUB:
        levels = 0
        s = 2
        while s < n:
            levels += 1
            s *= 2
        return levels * 2 * (2 * n ** 3)
    h = n // 2
    return 2 * _inv_flops(h) + 2 * (2 * h ** 3)


def cost_model(B, T, Hk, Hv, K, V, *, in_bytes=2, backward=True, kda=False):
    """[(kernel, programs, tensor-core FLOPs, float32 CUDA-core FLOPs, HBM bytes)] for one call.

    kda: per-key gates (g [B, T, Hv, K] float32). Differences from GDA: the gates are K times
    larger; the prep kernel also reads q and writes P [B, T, Hv, C] (the state passes read it
    instead of computing q k^T); the pairwise terms are 3 masked [C, K] x [K, C] dots per row
    operand (k, q) for the off-diagonal sub-blocks plus the exact diagonal sub-blocks, counted
    as float32 CUDA-core work (~22 C K operations per column offset, 16 of them; the
    backward's ~30 C K); in the backward the prep kernel also writes A / beta [B, T, Hv, C]
    float32 and the gradient kernel reads it and P instead of recomputing the pairwise terms,
    adds the pairwise cotangent dots and writes dg partials [NVB, B, T, Hv, K]. Elementwise
    exps and masks of GDA are not counted.

    FLOPs: 2 m n k per dot, summed over every program of the grid (recomputation included).
    Bytes: each distinct array read once and written once (re-reads of a q/k head by the value
    heads of its group, and of W / the chunk inputs by the V-blocks of a head, are L2 hits).
    16-bit inputs: W, U in the input dtype; tensor-core dots are the 16-bit ones, the
    float32 ones (inverse, and in the backward dT, dA, dKK) run as IEEE FMAs.
    """
    C = CHUNK
    NC = -(-T // C)
    Tp = NC * C
    f = 4
    w = in_bytes if in_bytes < 4 else 4
    bv = choose_block_v(B, Hv, V, K)
    nvb = V // bv
    d = lambda m, n, k: 2 * m * n * k  # noqa: E731
    tc16 = in_bytes < 4
    out = []

    def add(name, progs, flops16, flops32, byts):
        if not tc16:  # float32 inputs: every dot is an IEEE float32 dot
            flops32, flops16 = flops32 + flops16, 0
        out.append((name, progs, flops16 * progs, flops32 * progs, byts))

    qk_b = B * T * Hk * K * in_bytes
    v_b = B * T * Hv * V * in_bytes
    gb_b = 2 * B * T * Hv * 4
    wu_b = B * T * Hv * (K + V) * w
    st_b = B * Hv * K * V * f
    hs_b = B * Hv * NC * K * V * f
    g_b = B * T * Hv * 4 * (K if kda else 1)      # the gates (float32)
    gb_b = g_b + B * T * Hv * 4                   # gates + beta
    p_b = B * T * Hv * C * w if kda else 0        # KDA: P written by prep, read by the state passes
    pair16 = 6 * d(C, C, K) if kda else d(C, C, K)           # A (and P) pairwise dots
    diag32 = SUB * 22 * C * K if kda else 0                  # exact diagonal sub-blocks
    qk_fwd = 0 if kda else d(C, C, K)                        # q k^T inside the state passes
    add("prep", B * Hv * NC, pair16 + d(C, C, K) + d(C, C, V), _inv_flops(C) + diag32,
        qk_b * (2 if kda else 1) + v_b + gb_b + wu_b + p_b)
    add("fwd (state + output)", B * Hv * nvb,
        NC * (d(C, K, bv) + qk_fwd + d(C, K, bv) + d(C, C, bv) + d(K, C, bv)), 0,
        2 * qk_b + g_b + wu_b + v_b + 2 * st_b + p_b)
    a_b = B * T * Hv * C * 4 if kda else 0        # KDA backward: A / beta from prep, float32
    if backward:
        add("bwd: prep (recompute W, U)", *out[0][1:2], out[0][2] // out[0][1] if tc16 else 0,
            out[0][3] // out[0][1], qk_b * (2 if kda else 1) + v_b + gb_b + wu_b + p_b + a_b)
        add("bwd: states (per chunk)", B * Hv * nvb, NC * (d(C, K, bv) + d(K, C, bv)), 0,
            qk_b + g_b + wu_b + st_b + hs_b)
        add("bwd: reverse state pass", B * Hv * nvb,
            NC * (qk_fwd + d(C, C, bv) + d(C, K, bv) + 2 * d(K, C, bv)), 0,
            2 * qk_b + g_b + B * T * Hv * K * w + v_b + 2 * st_b + hs_b + p_b)
        g16 = (3 * d(C, C, K) + d(C, C, bv) + d(C, K, bv) + d(C, C, bv) + d(C, K, bv)
               + d(C, C, bv) + d(C, K, bv) + 2 * d(C, C, K) + d(C, K, bv) + d(C, K, bv))
        g32 = (_inv_flops(C) + d(C, C, K) + d(C, C, bv) + d(C, C, K) + d(C, C, bv)
               + 2 * d(C, C, C) + 2 * d(C, C, K))
        if kda:   # P, A / beta read (no k k^T, q k^T); cotangent dots; dg = tri^T dG; diagonal
            g16 += 2 * d(C, C, K)
            g32 += 5 * d(C, C, K) + SUB * 30 * C * K
        part = nvb * (2 * B * T * Hv * K * f + B * T * Hv * f + g_b)
        add("bwd: gradients (per chunk, V-block)", B * Hv * NC * nvb, g16, g32,
            2 * qk_b + 2 * v_b + gb_b + 2 * hs_b + part + v_b + p_b + a_b)
        # XLA epilogue: sum the V-block partials, the head group, the l2norm Jacobian
        out.append(("bwd: XLA epilogue (partials, group, l2norm)", 0, 0, 0,
                    part + 2 * qk_b * 2 + 2 * B * T * Hk * K * f))
    del Tp
    return out


def predicted_times(rows, *, tc_flops=990e12, f32_flops=67e12, bw=3.35e12):
    """Per kernel: max(bytes / bandwidth, tensor-core time + CUDA-core time), in seconds."""
    return [(name, max(b / bw, f16 / tc_flops + f32 / f32_flops)) for name, _, f16, f32, b in rows]


if __name__ == "__main__":  # python -m gdn_jax.kernels.chunked
    for label, shape, kda in (
            ("prefill B=1 T=2048 Hk=16 Hv=32 K=V=128 bf16", (1, 2048, 16, 32, 128, 128), False),
            ("long B=1 T=8192 Hk=16 Hv=64 K=V=128 bf16", (1, 8192, 16, 64, 128, 128), False),
            ("long B=1 T=8192 Hk=16 Hv=32 K=V=128 bf16", (1, 8192, 16, 32, 128, 128), False),
            ("KDA prefill B=1 T=2048 Hk=16 Hv=32 K=V=128 bf16", (1, 2048, 16, 32, 128, 128), True),
            ("KDA long B=1 T=8192 Hk=16 Hv=32 K=V=128 bf16", (1, 8192, 16, 32, 128, 128), True)):
        rows = cost_model(*shape, kda=kda)
        times = dict(predicted_times(rows))
        print(f"\n{label}\n| kernel | programs | TC GFLOP | f32 GFLOP | MB | predicted us |")
        print("|---|---|---|---|---|---|")
        tot = {"fwd": [0, 0, 0, 0], "bwd": [0, 0, 0, 0]}
        for name, progs, f16, f32, b in rows:
            t = times[name]
            print(f"| {name} | {progs} | {f16 / 1e9:.1f} | {f32 / 1e9:.2f} | {b / 1e6:.0f} | {t * 1e6:.0f} |")
            key = "bwd" if name.startswith("bwd") else "fwd"
            for i, x in enumerate((f16, f32, b, t)):
                tot[key][i] += x
        for key, (f16, f32, b, t) in tot.items():
            print(f"| **{key} total** | | {f16 / 1e9:.1f} | {f32 / 1e9:.2f} | {b / 1e6:.0f} | **{t * 1e6:.0f}** |")
