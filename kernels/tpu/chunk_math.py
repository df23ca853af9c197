"""The maths of one chunk of C = 128 tokens of one value head (docs/spec.md section 5), written
once for the forward kernel and differentiated by `jax.vjp` inside the backward kernel.

`chunk_step(q, k, v, g, beta, S, last)` -> (o, S_next), all float32 on chip. Only operations
whose transposes Mosaic lowers are used: dots (NN, NT and TN), elementwise maths, `where`,
broadcasts, full reductions with keepdims and 2-D transposes. Rows and columns are picked by
a masked reduce (`_pick_row`, `_pick_col`) rather than static slices, whose transposes would
be pads.

Layout: tokens on sublanes, K or V on lanes; GDA gates and beta come as lane-dense rows
`[1, C]` and become per-token columns through a `[C, C]` broadcast + transpose (`_as_rows`).

Strong decay: the exactly-one factors (the diagonal of the causal decay and the decay of the
chunk's last real token to itself in the state update) are constants, not `exp(G_i - G_i)`,
so their gradients are not a difference of two large terms. Every `exp` argument is a later
cumulative gate minus an earlier one (<= 0 for g <= 0); masked entries take `exp(0)`.

KDA pairwise terms use 16-token sub-blocks: sub-block pairs a > b factor through the boundary
token r = 16 a - 1 (`x_i exp(G_i - G_r)` times `k_j exp(G_r - G_j)`, both <= 1, one dot);
inside a diagonal sub-block each column offset j is exact (`exp(G_i - G_j)` for i > j), the
source rows gathered for all 8 sub-blocks at once by a 0/1 selection dot.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..._common import L2NORM_EPS

F32 = jnp.float32
BF16 = jnp.bfloat16
HIGHEST = jax.lax.Precision.HIGHEST
CHUNK = 128
SUB = 16


def _dot(a, b, lp, *, ta=False, tb=False):
    """a @ b (a^T with ta, b^T with tb) with operands in `lp` and float32 accumulation;
    float32 operands at HIGHEST precision (exact float32 on the MXU)."""
    ca = 0 if ta else 1
    cb = 1 if tb else 0
    prec = HIGHEST if jnp.dtype(lp) == jnp.dtype(F32) else None
    return jax.lax.dot_general(a.astype(lp), b.astype(lp), (((ca,), (cb,)), ((), ())),
                               precision=prec, preferred_element_type=F32)


def _split(x, n):
    """n bf16 parts of float32 x, largest first, summing to x (n = 3: all 24 bits)."""
    parts, r = [], x
    for _ in range(n - 1):
        p = r.astype(BF16)
        parts.append(p)
        r = r - p.astype(F32)
    return parts + [r.astype(BF16)]


def _mxu(a, b, ta=False, tb=False):
    return jax.lax.dot_general(a, b, (((0 if ta else 1,), (1 if tb else 0,)), ((), ())),
                               preferred_element_type=F32)


def _mask_dot_impl(m, x, tm=False):
    mb = m.astype(BF16)
    return sum(_mxu(mb, p, ta=tm) for p in _split(x, 3))


@jax.custom_vjp
def mask_dot(m, x):
    """m @ x for a 0/1 matrix m (a selection or a triangle of ones) and float32 x: three bf16
    passes of x's exact split, so every product is exact (HIGHEST would take six passes).
    m is a constant: its cotangent is zero."""
    return _mask_dot_impl(m, x)


def _mask_dot_fwd(m, x):
    return _mask_dot_impl(m, x), m


def _mask_dot_bwd(m, ct):
    return jnp.zeros_like(m), _mask_dot_impl(m, ct, tm=True)


mask_dot.defvjp(_mask_dot_fwd, _mask_dot_bwd)


def _x3_impl(a, b, ta=False, tb=False):
    ah, al = _split(a, 2)
    bh, bl = _split(b, 2)
    return _mxu(ah, bh, ta, tb) + (_mxu(ah, bl, ta, tb) + _mxu(al, bh, ta, tb))


@jax.custom_vjp
def x3_dot(a, b):
    """a @ b of float32 operands by the bf16x3 split (hi hi + hi lo + lo hi): about 16 bits
    of each operand, half the MXU passes of HIGHEST. Used for 16-bit inputs only."""
    return _x3_impl(a, b)


def _x3_fwd(a, b):
    return _x3_impl(a, b), (a, b)


def _x3_bwd(res, ct):
    a, b = res
    return _x3_impl(ct, b, tb=True), _x3_impl(a, ct, ta=True)


x3_dot.defvjp(_x3_fwd, _x3_bwd)


def _fdot(a, b, lp):
    """A float32 product: HIGHEST for float32 inputs, bf16x3 for 16-bit inputs."""
    return _dot(a, b, F32) if jnp.dtype(lp) == jnp.dtype(F32) else x3_dot(a, b)


def _iotas(n, m):
    return (jax.lax.broadcasted_iota(jnp.int32, (n, m), 0),
            jax.lax.broadcasted_iota(jnp.int32, (n, m), 1))


def _pick_col(x, j):
    """Column j of x [n, m] as [n, 1] (a masked lane reduce)."""
    _, c = _iotas(*x.shape)
    return jnp.sum(jnp.where(c == j, x, 0.0), axis=1, keepdims=True)


def _pick_row(x, i):
    """Row i of x [n, m] as [1, m] (a masked sublane reduce)."""
    r, _ = _iotas(*x.shape)
    return jnp.sum(jnp.where(r == i, x, 0.0), axis=0, keepdims=True)


def _as_rows(x_row, C):
    """A lane-dense row [1, C] -> the [C, C] matrix whose row i is filled with x_i."""
    return jnp.broadcast_to(x_row, (C, C)).T


def _l2norm(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS)


def _inv_unit_lower(A, lp):
    C = A.shape[0]
    r, c = _iotas(C, C)
    T = (r == c).astype(F32)
    b = 1
    while b < C:
        s = b.bit_length() - 1
        off = (jax.lax.shift_right_logical(r, s + 1) == jax.lax.shift_right_logical(c, s + 1)) \
            & (jax.lax.shift_right_logical(r, s) != jax.lax.shift_right_logical(c, s))
        Ao = jnp.where(off, A, 0.0)
        T = T - _fdot(_fdot(T, Ao, lp), T, lp)
        b *= 2
    return T


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def inv_unit_lower(A, lp=F32):
    """(I + A)^-1 for strictly lower A [C, C] by recursive block inversion: from 1 x 1 blocks,
    each level doubles the block size, T <- T - T A_off T with A_off the lower-left sub-blocks
    of the doubled blocks (exact block forward substitution; no powers of A). float32 values;
    products at HIGHEST (lp float32) or bf16x3 (16-bit inputs). Its VJP is the closed form
    dA = -(T^T dT T^T) on the strictly lower part: two products instead of differentiating the
    fourteen."""
    return _inv_unit_lower(A, lp)


def _inv_fwd(A, lp):
    T = _inv_unit_lower(A, lp)
    return T, T


def _inv_bwd(lp, T, dT):
    C = T.shape[0]
    r, c = _iotas(C, C)
    if jnp.dtype(lp) == jnp.dtype(F32):
        dA = _dot(_dot(T, dT, F32, ta=True), T, F32, tb=True)
    else:
        dA = _x3_impl(_x3_impl(T, dT, ta=True), T, tb=True)
    return (jnp.where(r > c, -dA, 0.0),)


inv_unit_lower.defvjp(_inv_fwd, _inv_bwd)


def _kda_pairs(xs, k, G, lp):
    """sum_d x_id k_jd exp(G_id - G_jd) for i > j (strictly lower), for each x in xs; [C, C]
    each. All [C, K] float32 (G the in-chunk cumulative gates)."""
    C = k.shape[0]
    ri, ci = _iotas(C, C)
    rc = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    blk = jax.lax.shift_right_logical(rc, 4)          # sub-block of each row [C, 1]
    outs = [jnp.zeros((C, C), F32) for _ in xs]
    # off-diagonal sub-blocks, through the boundary token r of each row sub-block a
    for a in range(1, C // SUB):
        r = a * SUB - 1
        Gr = _pick_row(G, r)                                            # [1, K]
        rows_a = blk == a
        before = rc <= r
        right = jnp.where(before, k * jnp.exp(jnp.where(before, Gr - G, 0.0)), 0.0)
        e_left = jnp.exp(jnp.where(rows_a, G - Gr, 0.0))
        for n, x in enumerate(xs):
            left = jnp.where(rows_a, x * e_left, 0.0)
            outs[n] = outs[n] + _dot(left, right, lp, tb=True)
    # diagonal sub-blocks, one column offset j at a time, exactly
    within = rc - blk * SUB                                              # row in its sub-block
    rblk = jax.lax.shift_right_logical(ri, 4)
    for j in range(SUB - 1):
        sel = (ci == rblk * SUB + j).astype(F32)                         # row i -> its source row
        k_src = mask_dot(sel, k)
        G_src = mask_dot(sel, G)
        below = within > j
        e = jnp.exp(jnp.where(below, G - G_src, 0.0))
        place = (ci == rblk * SUB + j) & (ri > ci)
        for n, x in enumerate(xs):
            col = jnp.sum(jnp.where(below, x * k_src * e, 0.0), axis=1, keepdims=True)
            outs[n] = outs[n] + jnp.where(place, col, 0.0)
    return outs


def chunk_step(q, k, v, g, beta, S, last, *, kda: bool, scale: float, l2: bool, lp):
    """One chunk: returns (o [C, V], S_next [K, V]), float32.

    q, k [C, K]; v [C, V]; g: GDA [1, C] (clamped log gates), KDA [C, K]; beta [1, C]; S the
    [K, V] state entering the chunk; `last` (int32 scalar): index of the chunk's last real
    token (rows after it are zeros). lp: operand dtype of the input-sized dots (bf16 for
    16-bit inputs, float32 otherwise); the triangular inverse, W and U are float32 values
    (products by `_fdot`), cumulative gates and KDA source rows exact (`mask_dot`).
    """
    C = q.shape[0]
    ri, ci = _iotas(C, C)
    strict = ri > ci
    eye = ri == ci
    q = q.astype(F32)
    k = k.astype(F32)
    v = v.astype(F32)
    if l2:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    b_col = _pick_col(_as_rows(beta, C), 0)                              # [C, 1]
    rc = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    is_last = rc == last
    tril = (ri >= ci).astype(F32)
    if kda:
        G = mask_dot(tril, g)                                            # [C, K]
        A, Pl = _kda_pairs((k, q), k, G, lp)
        A = b_col * A
        P = Pl + jnp.where(eye, jnp.sum(q * k, axis=1, keepdims=True), 0.0)
        eG = jnp.exp(G)
        G_C = _pick_row(G, C - 1)                                        # [1, K]
        w_in = b_col * eG * k
        q_in = eG * q
        kd = k * jnp.where(is_last, 1.0, jnp.exp(jnp.where(is_last, 0.0, G_C - G)))
        decay = _pick_col(jnp.broadcast_to(jnp.exp(G_C), (k.shape[1], k.shape[1])).T, 0)  # [K, 1]
    else:
        G_row = _dot(g, tril, F32, tb=True)                              # [1, C]: G_j
        Gc = _as_rows(G_row, C)                                          # [i, j] = G_i
        Gr = jnp.broadcast_to(G_row, (C, C))                             # [i, j] = G_j
        D = jnp.where(strict, jnp.exp(jnp.where(strict, Gc - Gr, 0.0)), 0.0)
        A = b_col * _dot(k, k, lp, tb=True) * D
        P = _dot(q, k, lp, tb=True) * jnp.where(eye, 1.0, D)
        G_col = _pick_col(Gc, 0)                                         # [C, 1]
        eG = jnp.exp(G_col)
        G_C = _pick_col(G_row, C - 1)                                    # [1, 1]
        w_in = (b_col * eG) * k
        q_in = eG * q
        kd = k * jnp.where(is_last, 1.0, jnp.exp(jnp.where(is_last, 0.0, G_C - G_col)))
        decay = jnp.exp(G_C)
    Tm = inv_unit_lower(A, lp)
    W = _fdot(Tm, w_in, lp)
    U = _fdot(Tm, b_col * v, lp)
    Vn = U - _dot(W, S, lp)
    o = _dot(q_in, S, lp) + _dot(P, Vn, lp)
    S_next = decay * S + _dot(kd, Vn, lp, ta=True)
    return o, S_next
