"""Chunked gated delta rule (SPEC section 5) as Pallas Triton kernels: forward and backward.

GDA (scalar gate per head) only for now; KDA is declined by `supports` (see kernels/README.md).

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
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN, INPUT_DTYPES, L2NORM_EPS, l2norm
from . import _platform

__all__ = ["supports", "chunked_forward", "chunked_backward", "CHUNK", "choose_block_v"]

CHUNK = 64
SUB = 16
HEAD_SIZES = (16, 32, 64, 128, 256)
HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(q, k, v, g, beta, initial_state=None, *, state_layout: str = "kv"):
    """None if the chunked Pallas kernels can serve these shapes/dtypes, else the reason."""
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
        return "KDA (per-key gates g [B, T, Hv, K]) is not implemented in the Pallas chunked kernels yet"
    if tuple(g.shape) != (B, T, Hv):
        return f"g shape {tuple(g.shape)} is not [B, T, Hv]"
    if tuple(beta.shape) != (B, T, Hv):
        return f"beta shape {tuple(beta.shape)} is not [B, T, Hv]"
    if initial_state is not None:
        if tuple(initial_state.shape) != (B, Hv, K, V):
            return f"initial_state shape {tuple(initial_state.shape)} is not [B, Hv, K, V]"
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
# Forward kernels
# ----------------------------------------------------------------------------------------

def _prep_kernel(k_ref, v_ref, g_ref, b_ref, w_ref, u_ref, *, T, C, l2, lp):
    t0 = pl.program_id(2) * C
    k = _rows(k_ref, t0, C, T).astype(F32)
    if l2:
        k = _l2n(k)
    v = _rows(v_ref, t0, C, T)
    _, beta, G, _ = _gates(g_ref, b_ref, t0, C, T)
    A, _, _ = _chunk_A(k, beta, G, lp)
    Tm = _inv_unit_lower(A)
    bK = (beta * jnp.exp(G))[:, None] * k
    bV = beta[:, None] * v.astype(F32)
    _store_rows(w_ref, t0, _dot(Tm, bK, lp=lp), T)
    _store_rows(u_ref, t0, _dot(Tm, bV, lp=lp), T)


def _state_kernel(*refs, T, C, NC, scale, l2, lp, has_h0, store_o, store_ht, store_states):
    it = iter(refs)
    q_ref, k_ref, g_ref, w_ref, u_ref = (next(it) for _ in range(5))
    h0_ref = next(it) if has_h0 else None
    o_ref = next(it) if store_o else None
    ht_ref = next(it) if store_ht else None
    hs_ref = next(it) if store_states else None
    K = q_ref.shape[-1]
    BV = u_ref.shape[-1]
    S = h0_ref[...].astype(F32) if has_h0 else jnp.zeros((K, BV), F32)
    i, j = _iota(C, C, 0), _iota(C, C, 1)
    causal = i >= j

    cast = (lambda x: x.astype(lp)) if lp is not None else (lambda x: x)

    def body(c, S):
        t0 = c * C
        if store_states:
            hs_ref[c] = S
        g = jnp.maximum(_rows(g_ref, t0, C, T).astype(F32), G_MIN)
        G = jnp.cumsum(g)
        Gl = _last(G)
        k = _rows(k_ref, t0, C, T).astype(F32)
        if l2:
            k = _l2n(k)
        # 16-bit operands as soon as the float32 elementwise work is done (fewer live registers)
        Kd = cast(k * jnp.exp(Gl - G)[:, None])
        k = cast(k)
        W = _rows(w_ref, t0, C, T)
        U = _rows(u_ref, t0, C, T).astype(F32)
        Vn = U - _dot(W, S, lp=lp)
        if store_o:
            q = _rows(q_ref, t0, C, T).astype(F32)
            if l2:
                q = _l2n(q)
            q = q * scale
            qe = cast(q * jnp.exp(G)[:, None])
            P = jnp.where(causal, _dot(cast(q), k, tb=True, lp=lp) *
                          jnp.exp(jnp.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)
            o = _dot(qe, S, lp=lp) + _dot(P, Vn, lp=lp)
            _store_rows(o_ref, t0, o, T)
        return jnp.exp(Gl) * S + _dot(Kd, Vn, ta=True, lp=lp)

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


def _prep_call(k, v, g, beta, *, Hv, l2, lp, interpret, num_warps=8):
    B, T, Hk, K = k.shape
    V = v.shape[-1]
    NC = pl.cdiv(T, CHUNK)
    qk, vh, kh, _, gb = _specs(B, T, Hk, Hv, K, V, Hv // Hk)
    wdt = lp if lp is not None else F32
    kern = functools.partial(_prep_kernel, T=T, C=CHUNK, l2=l2, lp=lp)
    return pl.pallas_call(
        kern, grid=(B, Hv, NC), in_specs=[qk, vh, gb, gb], out_specs=[kh, vh],
        out_shape=[jax.ShapeDtypeStruct((B, T, Hv, K), wdt), jax.ShapeDtypeStruct((B, T, Hv, V), wdt)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"gdn_chunk_prep_k{K}_v{V}")(k, v, g, beta)


def _state_call(q, k, g, W, U, h0, *, Hv, scale, l2, lp, store_o, store_ht, store_states,
                interpret, num_warps=8):
    B, T, Hk, K = q.shape
    V = U.shape[-1]
    NC = pl.cdiv(T, CHUNK)
    bv = choose_block_v(B, Hv, V, K)
    qk, _, kh, vb, gb = _specs(B, T, Hk, Hv, K, V, Hv // Hk, bv)
    s_spec = pl.BlockSpec((None, None, K, bv), lambda n, h, x: (n, h, 0, x))
    in_specs = [qk, qk, gb, kh, vb]
    args = [q, k, g, W, U]
    if h0 is not None:
        in_specs.append(s_spec)
        args.append(h0)
    out_specs, out_shape = [], []
    if store_o:
        out_specs.append(vb)
        out_shape.append(jax.ShapeDtypeStruct((B, T, Hv, V), q.dtype))
    if store_ht:
        out_specs.append(s_spec)
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, K, V), F32))
    if store_states:
        out_specs.append(pl.BlockSpec((None, None, NC, K, bv), lambda n, h, x: (n, h, 0, 0, x)))
        out_shape.append(jax.ShapeDtypeStruct((B, Hv, NC, K, V), F32))
    kern = functools.partial(_state_kernel, T=T, C=CHUNK, NC=NC, scale=float(scale), l2=l2, lp=lp,
                             has_h0=h0 is not None, store_o=store_o, store_ht=store_ht,
                             store_states=store_states)
    name = f"gdn_chunk_{'fwd' if store_o else 'states'}_k{K}_v{V}_bv{bv}"
    return pl.pallas_call(
        kern, grid=(B, Hv, V // bv), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=name)(*args)


def chunked_forward(q, k, v, g, beta, initial_state=None, *, scale: float,
                    use_qk_l2norm: bool = False, output_final_state: bool = True,
                    interpret: bool = False):
    """Chunked forward. Returns (o [B, T, Hv, V] in q.dtype, final_state [B, Hv, K, V] float32
    or None)."""
    reason = supports(q, k, v, g, beta, initial_state)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Pallas chunked kernels cannot serve this call: {reason}")
    Hv = v.shape[2]
    lp = _lp_dtype(q.dtype)
    q, k, v, g, beta, initial_state = _platform.guard(
        q, k, v, g, beta, initial_state, what="chunked kernels", interpret=interpret)
    W, U = _prep_call(k, v, g, beta, Hv=Hv, l2=use_qk_l2norm, lp=lp, interpret=interpret)
    outs = _state_call(q, k, g, W, U, initial_state, Hv=Hv, scale=scale, l2=use_qk_l2norm, lp=lp,
                       store_o=True, store_ht=output_final_state, store_states=False,
                       interpret=interpret)
    return outs[0], (outs[1] if output_final_state else None)


# ----------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------

def _qk_chunk(q_ref, k_ref, t0, C, T, l2, scale):
    q = _rows(q_ref, t0, C, T).astype(F32)
    k = _rows(k_ref, t0, C, T).astype(F32)
    if l2:
        q, k = _l2n(q), _l2n(k)
    return q * scale, k


def _causal_decay(G):
    """exp(G_i - G_j) for i >= j (the diagonal is exp(0) = 1 exactly), 0 above."""
    C = G.shape[0]
    causal = _iota(C, C, 0) >= _iota(C, C, 1)
    return jnp.where(causal, jnp.exp(jnp.where(causal, G[:, None] - G[None, :], 0.0)), 0.0)


def _rev_kernel(*refs, T, C, NC, scale, l2, lp, has_dht):
    it = iter(refs)
    q_ref, k_ref, g_ref, w_ref, do_ref = (next(it) for _ in range(5))
    dht_ref = next(it) if has_dht else None
    dhs_ref, dh0_ref = next(it), next(it)
    K = q_ref.shape[-1]
    BV = do_ref.shape[-1]
    dH = dht_ref[...].astype(F32) if has_dht else jnp.zeros((K, BV), F32)

    def body(cc, dH):
        c = NC - 1 - cc
        t0 = c * C
        dhs_ref[c] = dH
        q, k = _qk_chunk(q_ref, k_ref, t0, C, T, l2, scale)
        g = jnp.maximum(_rows(g_ref, t0, C, T).astype(F32), G_MIN)
        G = jnp.cumsum(g)
        Gl = _last(G)
        W = _rows(w_ref, t0, C, T)
        dO = _rows(do_ref, t0, C, T).astype(F32)
        P = _dot(q, k, tb=True, lp=lp) * _causal_decay(G)
        Kd = k * jnp.exp(Gl - G)[:, None]
        dVn = _dot(P, dO, ta=True, lp=lp) + _dot(Kd, dH, lp=lp)
        return (jnp.exp(Gl) * dH + _dot(q * jnp.exp(G)[:, None], dO, ta=True, lp=lp)
                - _dot(W, dVn, ta=True, lp=lp))

    dH = jax.lax.fori_loop(0, NC, body, dH)
    dh0_ref[...] = dH


def _grad_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, do_ref, hs_ref, dhs_ref,
                 dq_ref, dk_ref, dv_ref, db_ref, dg_ref, *, T, C, scale, l2, lp):
    c = pl.program_id(2)
    t0 = c * C
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


def _rev_call(q, k, g, W, do, dht, *, Hv, scale, l2, lp, interpret, num_warps=8):
    B, T, Hk, K = q.shape
    V = do.shape[-1]
    NC = pl.cdiv(T, CHUNK)
    bv = choose_block_v(B, Hv, V, K)
    qk, _, kh, vb, gb = _specs(B, T, Hk, Hv, K, V, Hv // Hk, bv)
    s_spec = pl.BlockSpec((None, None, K, bv), lambda n, h, x: (n, h, 0, x))
    in_specs = [qk, qk, gb, kh, vb]
    args = [q, k, g, W, do]
    if dht is not None:
        in_specs.append(s_spec)
        args.append(dht)
    kern = functools.partial(_rev_kernel, T=T, C=CHUNK, NC=NC, scale=float(scale), l2=l2, lp=lp,
                             has_dht=dht is not None)
    return pl.pallas_call(
        kern, grid=(B, Hv, V // bv), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, NC, K, bv), lambda n, h, x: (n, h, 0, 0, x)), s_spec],
        out_shape=[jax.ShapeDtypeStruct((B, Hv, NC, K, V), F32), jax.ShapeDtypeStruct((B, Hv, K, V), F32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"gdn_chunk_bwd_state_k{K}_v{V}_bv{bv}")(*args)


def choose_grad_block_v(V: int, K: int) -> int:
    """Value columns per program of the gradient kernel: the [K, BV] state and state-gradient
    tiles plus the [C, BV] value-side operands must fit the register file next to the
    [C, K] key-side ones."""
    return min(V, 32 if K <= 128 else 16)


def _grad_call(q, k, v, g, beta, do, hs, dhs, *, scale, l2, lp, interpret, num_warps=8):
    """dq, dk, dbeta, dg as partial sums over the value blocks [NVB, ...]; dv whole."""
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    NC = pl.cdiv(T, CHUNK)
    bv = choose_grad_block_v(V, K)
    nvb = V // bv
    group = Hv // Hk
    qk = pl.BlockSpec((None, T, None, K), lambda n, h, c, x: (n, 0, h // group, 0))
    vb = pl.BlockSpec((None, T, None, bv), lambda n, h, c, x: (n, 0, h, x))
    gb = pl.BlockSpec((None, T, None), lambda n, h, c, x: (n, 0, h))
    hs_spec = pl.BlockSpec((None, None, None, K, bv), lambda n, h, c, x: (n, h, c, 0, x))
    pk = pl.BlockSpec((None, None, T, None, K), lambda n, h, c, x: (x, n, 0, h, 0))
    pg = pl.BlockSpec((None, None, T, None), lambda n, h, c, x: (x, n, 0, h))
    kern = functools.partial(_grad_kernel, T=T, C=CHUNK, scale=float(scale), l2=l2, lp=lp)
    return pl.pallas_call(
        kern, grid=(B, Hv, NC, nvb), in_specs=[qk, qk, vb, gb, gb, vb, hs_spec, hs_spec],
        out_specs=[pk, pk, vb, pg, pg],
        out_shape=[jax.ShapeDtypeStruct((nvb, B, T, Hv, K), F32),
                   jax.ShapeDtypeStruct((nvb, B, T, Hv, K), F32),
                   jax.ShapeDtypeStruct((B, T, Hv, V), v.dtype),
                   jax.ShapeDtypeStruct((nvb, B, T, Hv), F32),
                   jax.ShapeDtypeStruct((nvb, B, T, Hv), F32)],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"gdn_chunk_bwd_grad_k{K}_v{V}_bv{bv}")(
            q, k, v, g, beta, do, hs, dhs)


def chunked_backward(q, k, v, g, beta, initial_state, do, dht, *, scale: float,
                     use_qk_l2norm: bool = False, interpret: bool = False):
    """Gradients of `chunked_forward` (o, final_state) for cotangents do [B, T, Hv, V] and dht
    [B, Hv, K, V] (None: zeros). Recomputes W, U and the per-chunk states from the inputs.

    Returns (dq, dk, dv, dg, dbeta, dh0) in the dtypes and shapes of the inputs; dh0 is None
    when initial_state is None.
    """
    reason = supports(q, k, v, g, beta, initial_state)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Pallas chunked kernels cannot serve this call: {reason}")
    B, T, Hk, K = q.shape
    Hv = v.shape[2]
    lp = _lp_dtype(q.dtype)
    l2 = bool(use_qk_l2norm)
    q_in, k_in, g_in = q, k, g
    q, k, v, g, beta, initial_state, do, dht = _platform.guard(
        q, k, v, g, beta, initial_state, do, dht, what="chunked kernels (backward)",
        interpret=interpret)
    do = do.astype(q.dtype)
    W, U = _prep_call(k, v, g, beta, Hv=Hv, l2=l2, lp=lp, interpret=interpret)
    (hs,) = _state_call(q, k, g, W, U, initial_state, Hv=Hv, scale=scale, l2=l2, lp=lp,
                        store_o=False, store_ht=False, store_states=True, interpret=interpret)
    dhs, dh0 = _rev_call(q, k, g, W, do, dht, Hv=Hv, scale=scale, l2=l2, lp=lp, interpret=interpret)
    dq, dk, dv, dbeta, dg = _grad_call(q, k, v, g, beta, do, hs, dhs, scale=scale, l2=l2, lp=lp,
                                       interpret=interpret)
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


def cost_model(B, T, Hk, Hv, K, V, *, in_bytes=2, backward=True):
    """[(kernel, programs, tensor-core FLOPs, float32 CUDA-core FLOPs, HBM bytes)] for one call.

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
    add("prep", B * Hv * NC, d(C, C, K) + d(C, C, K) + d(C, C, V), _inv_flops(C),
        qk_b + v_b + gb_b + wu_b)
    add("fwd (state + output)", B * Hv * nvb,
        NC * (d(C, K, bv) + d(C, C, K) + d(C, K, bv) + d(C, C, bv) + d(K, C, bv)), 0,
        2 * qk_b + gb_b // 2 + wu_b + v_b + 2 * st_b)
    if backward:
        add("bwd: prep (recompute W, U)", *out[0][1:2], d(C, C, K) * 2 + d(C, C, V), _inv_flops(C),
            qk_b + v_b + gb_b + wu_b)
        add("bwd: states (per chunk)", B * Hv * nvb, NC * (d(C, K, bv) + d(K, C, bv)), 0,
            qk_b + gb_b // 2 + wu_b + st_b + hs_b)
        add("bwd: reverse state pass", B * Hv * nvb,
            NC * (d(C, C, K) + d(C, C, bv) + d(C, K, bv) + 2 * d(K, C, bv)), 0,
            2 * qk_b + gb_b // 2 + B * T * Hv * K * w + v_b + 2 * st_b + hs_b)
        g16 = (3 * d(C, C, K) + d(C, C, bv) + d(C, K, bv) + d(C, C, bv) + d(C, K, bv)
               + d(C, C, bv) + d(C, K, bv) + 2 * d(C, C, K) + d(C, K, bv) + d(C, K, bv))
        g32 = (_inv_flops(C) + d(C, C, K) + d(C, C, bv) + d(C, C, K) + d(C, C, bv)
               + 2 * d(C, C, C) + 2 * d(C, C, K))
        part = nvb * (2 * B * T * Hv * K * f + 2 * B * T * Hv * f)
        add("bwd: gradients (per chunk, V-block)", B * Hv * NC * nvb, g16, g32,
            2 * qk_b + 2 * v_b + gb_b + 2 * hs_b + part + v_b)
        # XLA epilogue: sum the V-block partials, the head group, the l2norm Jacobian
        out.append(("bwd: XLA epilogue (partials, group, l2norm)", 0, 0, 0,
                    part + 2 * qk_b * 2 + 2 * B * T * Hk * K * f))
    del Tp
    return out


def predicted_times(rows, *, tc_flops=990e12, f32_flops=67e12, bw=3.35e12):
    """Per kernel: max(bytes / bandwidth, tensor-core time + CUDA-core time), in seconds."""
    return [(name, max(b / bw, f16 / tc_flops + f32 / f32_flops)) for name, _, f16, f32, b in rows]


if __name__ == "__main__":  # python -m gdn_jax.kernels.chunked
    for label, shape in (("prefill B=1 T=2048 Hk=16 Hv=32 K=V=128 bf16", (1, 2048, 16, 32, 128, 128)),
                         ("long B=1 T=8192 Hk=16 Hv=64 K=V=128 bf16", (1, 8192, 16, 64, 128, 128)),
                         ("long B=1 T=8192 Hk=16 Hv=32 K=V=128 bf16", (1, 8192, 16, 32, 128, 128))):
        rows = cost_model(*shape)
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
