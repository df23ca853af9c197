"""In-kernel building blocks of the chunked kernels (Triton-lowerable: 2-D dots, elementwise,
reductions, power-of-two splits), their BlockSpecs and the tile choice, shared by every stage."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN, L2NORM_EPS

CHUNK = 64
SUB = 16
HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32


def choose_block_v(B: int, Hv: int, V: int, K: int, output: bool = False) -> int:
    """Value columns per program of the sequential kernels: 32 at K <= 128 (state tile
    [K, 32] float32 = 16 KiB; smaller tiles leave registers for the chunk's operands), 16 at
    K = 256; never more than V. output (the forward pass with the output): 16 at K = 128 too,
    where the q side's [C, K] operands next to a [K, 32] state spill (ptxas, sm_90a, bf16:
    GDA 64 B at BV = 32, 0 at 16)."""
    return min(V, 32 if K <= (64 if output else 128) else 16)


X3 = "bf16x3"   # `_dot`'s lp for near-float32 dots on tensor cores (16-bit input kernels)


def _dot(a, b, *, ta=False, tb=False, lp=None):
    """a @ b (a^T if ta, b^T if tb) with float32 accumulation.

    lp: None -> float32 operands at full precision (HIGHEST, IEEE FMAs in Triton); a 16-bit
    dtype -> both operands cast to it (tensor cores); X3 -> float32 operands split into bf16
    high and low parts, three tensor-core dots (about 16 mantissa bits: float32-like for the
    WY chain of 16-bit inputs, where IEEE FMA dots of [C, K] tiles would not fit the registers).
    """
    if lp is None:
        a, b, prec = a.astype(F32), b.astype(F32), HIGHEST
    elif lp == X3:
        a, b, prec = a.astype(F32), b.astype(F32), jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3
    else:
        a, b, prec = a.astype(lp), b.astype(lp), None
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def _hp(lp):
    """The `_dot` lp of a kernel's float32-internal dots: HIGHEST for float32 inputs, X3 else."""
    return None if lp is None else X3


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


def _rows(ref, t0, n, T, other=0.0, col=0, width=None):
    """Rows t0 .. t0+n-1 of a [T, ...] ref, zeros beyond T; of a [T, K] ref the columns col ..
    col+width-1 (all when width is None)."""
    if len(ref.shape) == 1:
        idx = t0 + jnp.arange(n)
        return plt.load(ref.at[pl.ds(t0, n)], mask=idx < T, other=other)
    w = ref.shape[1] if width is None else width
    idx = t0 + _iota(n, w, 0)
    cols = slice(None) if width is None else pl.ds(col, w)
    return plt.load(ref.at[pl.ds(t0, n), cols], mask=idx < T, other=other)


def _store_rows(ref, t0, val, T, col=0):
    """Stores val [n, m] into rows t0 .. t0+n-1 (those < T), columns col .. col+m-1."""
    n, m = val.shape
    idx = t0 + _iota(n, m, 0)
    cols = slice(None) if m == ref.shape[1] else pl.ds(col, m)
    plt.store(ref.at[pl.ds(t0, n), cols], val.astype(ref.dtype), mask=idx < T)


def _l2n(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS)


def _raw_rows(ref, t0, n, T, l2, scale=1.0):
    """(x, r): rows t0 .. t0+n-1 of a [T, K] ref as loaded (input dtype) and the row factors
    r [n] float32 with (scale * l2norm(x))_i = r_i x_i. A dot with x as an operand then takes
    r as a row scale of its result (exact in real arithmetic: the norm is linear in x), so no
    normalised float32 [n, K] tile is formed or held (the loaded 16-bit tile is the operand)."""
    x = _rows(ref, t0, n, T)
    if not l2:
        return x, jnp.full((n,), scale, F32)
    xf = x.astype(F32)
    return x, scale * jax.lax.rsqrt(jnp.sum(xf * xf, axis=1) + L2NORM_EPS)


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


def _row(x, r):
    """Row r (static or traced) of x [n, m] as [m], exactly (a masked sum of one row)."""
    return jnp.sum(jnp.where(_iota(*x.shape, 0) == r, x, 0.0), axis=0)


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


def _num_chunks(T, tabs):
    return pl.cdiv(T, CHUNK) if tabs is None else tabs.num_chunks


def _is_kda(g):
    return g.ndim == 4


def _gate_spec(g, T, K):
    """g's BlockSpec for grids (n, h, x): [T] (GDA) or [T, K] (KDA) of value head h."""
    if _is_kda(g):
        return pl.BlockSpec((None, T, None, K), lambda n, h, *_: (n, 0, h, 0))
    return pl.BlockSpec((None, T, None), lambda n, h, *_: (n, 0, h))


def _p_spec(T):
    return pl.BlockSpec((None, T, None, CHUNK), lambda n, h, x: (n, 0, h, 0))


def _add_rows(ref, t0, val, T, col=0):
    """Atomically adds val [n, m] (rows >= T zeroed) into rows t0 .. t0+n-1, columns col ..
    col+m-1 of a [Tp, >= col + m] float32 ref, Tp >= t0 + n (`padded_rows`): several programs
    (the value heads of a key head, the gradient kernels one after another) sum into one
    buffer. No mask on the add itself (the interpret-mode rule takes none): the padding rows
    take the zeros, a packed chunk's rows past its end (the next sequence's) take + 0.0."""
    n, m = val.shape
    val = jnp.where(t0 + _iota(n, m, 0) < T, val.astype(F32), 0.0)
    plt.atomic_add(ref, (pl.ds(t0, n), pl.ds(col, m)), val)


def padded_rows(T: int) -> int:
    """Rows of a buffer that `_add_rows` adds whole chunks into: T + CHUNK (a chunk starts at a
    row < T, packed or not)."""
    return T + CHUNK
