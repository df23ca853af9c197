"""Fused recurrent gated delta rule (GDA and KDA) as one Pallas Triton kernel.

The small-T path (decode, speculative verification, short chunks): every program owns the
state tile of one (sequence n, value head h, block of BV value columns), loads it once,
loops over the T tokens with the tile held in registers, and stores it once. Reads and
writes of the state are therefore `2 * N * Hv * K * V * 4` bytes per call (SPEC 6.2).

Grid: `(N, Hv, V // BV)`, all parallel. Value head h reads q/k head `h // (Hv // Hk)`
through the BlockSpec index map (no repeated q/k). The value axis is split over programs
(BV columns each) so that K = V = 128 fits in registers without spills (SPEC 6.4).

State layout (SPEC 6.3). The kernel computes on a `[BV, K]` tile: K is the fastest axis, so
the two matvecs per token (`S^T k`, `S^T q`, sums over K) reduce inside a warp (butterfly
shuffles) and the rank-1 update broadcasts along it.

- `state_layout="vk"` (`[N, Hv, V, K]`) is the kernel's native layout: a program's tile is
  one contiguous `BV * K * 4`-byte span of memory, loaded and stored with 16-byte accesses.
- `state_layout="kv"` (`[N, Hv, K, V]`, the public layout) is converted inside the kernel, not
  by XLA: the program reads its `[K, BV]` tile (K rows of BV contiguous floats, 64 bytes at
  BV = 16: whole sectors, still 16-byte vector loads) and transposes it on chip; the final state
  is written back the same way. HBM traffic equals "vk" (no XLA transpose, no extra pass). The
  cost is on chip: Triton keeps the load's V-fastest layout through the token loop, so the
  reductions over K cross warps (more shared-memory round trips per token) and it needs ~8 more
  registers. Decode loops that own their state keep it in "vk" and skip all of that.

No `dot` is used: at one token per step the matvecs are multiply-and-reduce in float32,
exact on the GPU as in interpret mode (there is no TF32 path to guard against).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from .._common import G_MIN, INPUT_DTYPES, L2NORM_EPS
from . import _platform

__all__ = ["supports", "fused_recurrent", "choose_config", "STATE_LAYOUTS", "NATIVE_STATE_LAYOUT"]

STATE_LAYOUTS = ("kv", "vk")
NATIVE_STATE_LAYOUT = "vk"
MIN_HEAD, MAX_HEAD = 16, 256
# State elements per program (float32): 16 per thread at 4 warps. 4096 (BV = 32 at K = 128)
# compiles without spills at T = 1 but spills a few bytes at T = 8 with prefetching (96 registers);
# 2048 (BV = 16) needs 56-64 registers at any T and fits 8-9 blocks per SM.
_MAX_TILE = 2048
# Programs wanted at least, for latency hiding on 132 SMs; BV shrinks (down to 8) to reach it.
_MIN_PROGRAMS = 264


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(q, k, v, g, beta, initial_state=None, *, state_layout: str = "kv"):
    """None if `fused_recurrent` can serve these shapes/dtypes, else the reason (a str).

    Looks at shapes and dtypes only (ShapeDtypeStructs work); never at the default device.
    The platform is decided at lowering (see `_platform`): off-GPU the call needs interpret=True.
    """
    if state_layout not in STATE_LAYOUTS:
        return f"state_layout={state_layout!r} is not one of {STATE_LAYOUTS}"
    if getattr(q, "ndim", None) != 4 or getattr(v, "ndim", None) != 4:
        return "q, k and v must have rank 4"
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    for name, d in (("K", K), ("V", V)):
        if not (MIN_HEAD <= d <= MAX_HEAD and _pow2(d)):
            return (f"head size {name}={d} is not supported by the Pallas recurrent kernel "
                    f"(needs a power of two in [{MIN_HEAD}, {MAX_HEAD}])")
    if T < 1:
        return f"T={T}: the kernel needs at least one token"
    if Hk < 1 or Hv % Hk:
        return f"Hv={Hv} is not a multiple of Hk={Hk}"
    dt = jnp.dtype(q.dtype)
    if dt not in INPUT_DTYPES:
        return f"input dtype {dt} is not one of {', '.join(map(str, INPUT_DTYPES))}"
    if jnp.dtype(k.dtype) != dt or jnp.dtype(v.dtype) != dt:
        return "q, k and v must share one dtype"
    for name, x in (("g", g), ("beta", beta)):
        if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), dt):
            return f"{name} dtype {x.dtype} is neither float32 nor q's dtype {dt}"
    if tuple(g.shape) not in ((B, T, Hv), (B, T, Hv, K)):
        return f"g shape {tuple(g.shape)} is neither [B, T, Hv] nor [B, T, Hv, K]"
    if initial_state is not None:
        want = (B, Hv, K, V) if state_layout == "kv" else (B, Hv, V, K)
        if tuple(initial_state.shape) != want:
            return (f"initial_state shape {tuple(initial_state.shape)} does not match the "
                    f"{state_layout!r} layout {list(want)}")
        if jnp.dtype(initial_state.dtype) != jnp.dtype(jnp.float32):
            return f"initial_state must be float32, got {initial_state.dtype}"
    return None


def choose_config(B: int, Hv: int, K: int, V: int, block_v: int | None = None):
    """(BV, num_warps) for one call.

    BV: at most `_MAX_TILE` = 2048 state elements (8 KiB float32) per program -- 16 per thread
    at 4 warps, which keeps K = V = 128 free of spills at any T -- then halved (down to 8) while the grid has fewer
    than `_MIN_PROGRAMS` programs (2 per H100 SM), so B = 1 decode still fills the GPU.
    num_warps: 4 for tiles of >= 2048 elements, fewer for small tiles (>= 16 elements a thread).
    """
    if block_v is None:
        bv = min(V, max(8, _MAX_TILE // K))
        while bv > 8 and B * Hv * (V // bv) < _MIN_PROGRAMS:
            bv //= 2
    else:
        bv = int(block_v)
        if not (_pow2(bv) and bv <= V):
            raise ValueError(f"block_v={block_v} must be a power of two <= V={V}")
    tile = bv * K
    num_warps = 4 if tile >= 2048 else 2 if tile >= 1024 else 1
    return bv, num_warps


def _kernel(*refs, T, scale, use_qk_l2norm, kda, has_h0, store_ht, layout, prefetch):
    it = iter(refs)
    q_ref, k_ref, v_ref, g_ref, b_ref = (next(it) for _ in range(5))
    h0_ref = next(it) if has_h0 else None
    o_ref = next(it)
    ht_ref = next(it) if store_ht else None
    BV = o_ref.shape[-1]
    K = q_ref.shape[-1]

    if has_h0:
        S = h0_ref[...].astype(jnp.float32)
        if layout == "kv":
            S = S.T  # [K, BV] -> [BV, K] on chip
    else:
        S = jnp.zeros((BV, K), jnp.float32)

    def load(t):
        """Token t's small inputs, raw (casts happen at use)."""
        g = g_ref[t, :] if kda else g_ref[t]
        return q_ref[t, :], k_ref[t, :], v_ref[t, :], g, b_ref[t]

    def step(t, carry):
        S, cur = carry
        # Software pipelining: issue token t+1's loads before token t's math, so their
        # latency overlaps the reductions (the index is clamped; the last prefetch is unused).
        nxt = load(jnp.minimum(t + 1, T - 1)) if prefetch else None
        if not prefetch:
            cur = load(t)
        q, k, v, g, beta = (x.astype(jnp.float32) for x in cur)
        if use_qk_l2norm:
            q = q * jax.lax.rsqrt(jnp.sum(q * q) + L2NORM_EPS)
            k = k * jax.lax.rsqrt(jnp.sum(k * k) + L2NORM_EPS)
        q = q * scale
        g = jnp.maximum(g, G_MIN)
        S = S * (jnp.exp(g)[None, :] if kda else jnp.exp(g))
        u = beta * (v - jnp.sum(S * k[None, :], axis=1))  # [BV]
        S = S + u[:, None] * k[None, :]
        o_ref[t, :] = jnp.sum(S * q[None, :], axis=1).astype(o_ref.dtype)
        return S, nxt

    init = load(0) if prefetch else None
    S, _ = jax.lax.fori_loop(0, T, step, (S, init))
    if store_ht:
        ht_ref[...] = S.T if layout == "kv" else S


def fused_recurrent(q, k, v, g, beta, initial_state=None, *, scale: float,
                    use_qk_l2norm: bool = False, output_final_state: bool = True,
                    interpret: bool = False, state_layout: str = "kv",
                    alias_state: bool = True, block_v: int | None = None,
                    num_warps: int | None = None, prefetch: bool = True):
    """Runs T >= 1 tokens of the gated delta rule through the fused Pallas kernel.

    q, k `[B, T, Hk, K]`; v `[B, T, Hv, V]`; g `[B, T, Hv]` (GDA) or `[B, T, Hv, K]` (KDA);
    beta `[B, T, Hv]`; initial_state float32 `[B, Hv, K, V]` ("kv") or `[B, Hv, V, K]` ("vk"),
    or None (zeros; no state is read). Returns `(o [B, T, Hv, V] in q.dtype, final_state)`,
    final_state float32 in `state_layout`, or None when `output_final_state` is False.

    alias_state: with an initial state and a final state, the state buffer is aliased to the
    final state (`input_output_aliases`): a caller that donates it (jit donate_argnums) gets an
    in-place update and no new state buffer; a caller that does not donate gets one XLA copy
    (read + write of the state) before the kernel. Pass False when the initial state must stay
    alive (e.g. as a residual for the backward pass) to avoid that copy.
    block_v / num_warps override `choose_config` (tuning, tests).
    """
    reason = supports(q, k, v, g, beta, initial_state, state_layout=state_layout)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Pallas recurrent kernel cannot serve this call: {reason}")
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    group = Hv // Hk
    kda = g.ndim == 4
    has_h0 = initial_state is not None
    bv, nw = choose_config(B, Hv, K, V, block_v)
    if num_warps is not None:
        nw = int(num_warps)
    nv = V // bv

    q, k, v, g, beta, initial_state = _platform.guard(
        q, k, v, g, beta, initial_state, what="fused recurrent kernel", interpret=interpret)

    qk_spec = pl.BlockSpec((None, T, None, K), lambda n, h, j: (n, 0, h // group, 0))
    v_spec = pl.BlockSpec((None, T, None, bv), lambda n, h, j: (n, 0, h, j))
    if kda:
        g_spec = pl.BlockSpec((None, T, None, K), lambda n, h, j: (n, 0, h, 0))
    else:
        g_spec = pl.BlockSpec((None, T, None), lambda n, h, j: (n, 0, h))
    b_spec = pl.BlockSpec((None, T, None), lambda n, h, j: (n, 0, h))
    if state_layout == "vk":
        s_spec = pl.BlockSpec((None, None, bv, K), lambda n, h, j: (n, h, j, 0))
        s_shape = (B, Hv, V, K)
    else:
        s_spec = pl.BlockSpec((None, None, K, bv), lambda n, h, j: (n, h, 0, j))
        s_shape = (B, Hv, K, V)

    in_specs = [qk_spec, qk_spec, v_spec, g_spec, b_spec]
    args = [q, k, v, g, beta]
    if has_h0:
        in_specs.append(s_spec)
        args.append(initial_state)
    out_specs = [v_spec]
    out_shape = [jax.ShapeDtypeStruct((B, T, Hv, V), q.dtype)]
    if output_final_state:
        out_specs.append(s_spec)
        out_shape.append(jax.ShapeDtypeStruct(s_shape, jnp.float32))
    aliases = {5: 1} if (has_h0 and output_final_state and alias_state) else {}

    kernel = functools.partial(
        _kernel, T=T, scale=float(scale), use_qk_l2norm=bool(use_qk_l2norm), kda=kda,
        has_h0=has_h0, store_ht=bool(output_final_state), layout=state_layout,
        prefetch=bool(prefetch) and T > 1)
    name = (f"gdn_recurrent_{'kda' if kda else 'gda'}_k{K}_v{V}_bv{bv}_{state_layout}"
            f"{'_h0' if has_h0 else ''}{'_ht' if output_final_state else ''}")
    outs = pl.pallas_call(
        kernel,
        grid=(B, Hv, nv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=nw, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args)
    o = outs[0]
    ht = outs[1] if output_final_state else None
    return o, ht
