"""Chunked gated delta rule (SPEC section 5) as Pallas Triton kernels: the entry points.

GDA (scalar gate per head) and KDA (per-key-channel gates g [B, T, Hv, K], K <= 128) share the
kernels through a static `kda` flag. Chunk size C = 64; every kernel reads whole-T blocks of its
(sequence, head) and loads one chunk at a time with masked loads, so any T works without padding
copies (padding rows read as q = k = v = g = beta = 0, which leave the state unchanged).
With packed sequences (`cu_seqlens`, B == 1) the same kernels run on the packed arrays, a chunk
table giving each chunk its rows (`_chunk_varlen.py`). See kernels/README.md.

One stage per file:

- `chunk_prep.py`: the WY stage, W = Tm (beta exp(G) k), U = Tm (beta v), Tm = (I + A)^-1
  (KDA: also the causal pairwise block P);
- `chunk_fwd.py`: the sequential state pass with the output (and the backward's state-only pass);
- `chunk_bwd_state.py`: the reverse state pass (state gradients per chunk, dh0);
- `chunk_bwd_grad.py`: the per-chunk gradient kernels (dq, dk, dv, dg, dbeta);
- `chunk_kda.py`: KDA's pairwise terms by the 16-token sub-block rule and their cotangents;
- `_chunk_ops.py`: in-kernel helpers, BlockSpecs, tile choice; `_checks.py`: argument checks
  shared with the recurrent kernel; `chunk_cost.py`: the static cost model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .._common import l2norm
from . import _platform
from ._checks import check_cu_seqlens, check_inputs, check_state_dtype
from ._chunk_ops import CHUNK, F32, _lp_dtype, choose_block_v
from ._chunk_varlen import _varlen_tables
from .._varlen import _sequence_chunks
from .chunk_bwd_grad import _grad_call
from .chunk_bwd_state import _rev_call
from .chunk_fwd import _state_call
from .chunk_prep import _prep_call

__all__ = ["supports", "checkpoint_support", "chunked_forward", "chunked_backward", "CHUNK",
           "choose_block_v"]

HEAD_SIZES = (16, 32, 64, 128, 256)
KDA_HEAD_SIZES = (16, 32, 64, 128)   # K with per-key gates (see kernels/README.md)


def supports(q, k, v, g, beta, initial_state=None, *, state_layout: str = "kv", cu_seqlens=None):
    """None if the chunked Pallas kernels can serve these shapes/dtypes, else the reason.

    Looks at shapes and dtypes only (ShapeDtypeStructs work). With `cu_seqlens` (int32
    [N + 1]) B must be 1 and initial_state, when given, is [N, Hv, K, V].
    """
    if state_layout != "kv":
        return f'state_layout={state_layout!r}: the chunked kernels take the "kv" layout only'
    reason = check_inputs(q, k, v, g, beta, head_ok=lambda d: d in HEAD_SIZES,
                          head_need=f"one of {HEAD_SIZES}", what="Pallas chunked kernels")
    if reason is not None:
        return reason
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
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
        reason = check_cu_seqlens(cu_seqlens, B, int32_only=True)
        if reason is not None:
            return reason
        N, n_name = cu_seqlens.shape[0] - 1, "N"
    if initial_state is not None:
        if tuple(initial_state.shape) != (N, Hv, K, V):
            return (f"initial_state shape {tuple(initial_state.shape)} is not [{n_name}, Hv, K, V] "
                    f"= {(N, Hv, K, V)}")
        return check_state_dtype(initial_state)
    return None


def checkpoint_support(checkpoint_every: int):
    """None if the forward can return checkpoints every `checkpoint_every` tokens, else why."""
    if checkpoint_every % CHUNK:
        return (f"checkpoint_every={checkpoint_every}: the Pallas chunked forward gives "
                f"checkpoints only at multiples of its chunk size {CHUNK}")
    return None


def chunked_forward(q, k, v, g, beta, initial_state=None, *, scale: float,
                    use_qk_l2norm: bool = False, output_final_state: bool = True,
                    interpret: bool = False, cu_seqlens=None, checkpoint_every=None):
    """Chunked forward. Returns (o [B, T, Hv, V] in q.dtype, final_state [N, Hv, K, V] or
    None), N = B. A 16-bit initial state is widened to float32 before the kernels (it is read
    once per call, small next to a prefill's tokens) and the final state stored in its dtype.

    checkpoint_every=n (a multiple of CHUNK, `checkpoint_support`): also returns checkpoints
    `[N, T // n, Hv, K, V]` float32, the states after tokens n, 2n, ... of each sequence (zeros
    past a packed sequence's end): the per-chunk states of the state pass, stored.

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
    state_dtype = F32 if initial_state is None else initial_state.dtype
    if initial_state is not None:
        initial_state = initial_state.astype(F32)
    q, k, v, g, beta, initial_state = _platform.guard(
        q, k, v, g, beta, initial_state, what="chunked kernels", interpret=interpret)
    W, U, *P = _prep_call(k, v, g, beta, Hv=Hv, l2=use_qk_l2norm, lp=lp, interpret=interpret,
                          tabs=tabs, q=q, scale=scale)
    ce = int(checkpoint_every or 0)
    if ce and checkpoint_support(ce) is not None:
        raise ValueError(f"gdn_jax: {checkpoint_support(ce)}")
    outs = _state_call(q, k, g, W, U, initial_state, Hv=Hv, scale=scale, l2=use_qk_l2norm, lp=lp,
                       store_o=True, store_ht=output_final_state or bool(ce),
                       store_states=bool(ce), store_vn=False,
                       interpret=interpret, tabs=tabs, P=P[0] if P else None)
    o, ht = outs[0], (outs[1] if output_final_state or ce else None)
    if not ce:
        return o, (None if ht is None else ht.astype(state_dtype))
    ckpts = _checkpoints(outs[2], ht, ce, T=q.shape[1], cu_seqlens=cu_seqlens)
    return o, (ht.astype(state_dtype) if output_final_state else None), ckpts.astype(state_dtype)


def _checkpoints(hs, ht, n, *, T, cu_seqlens):
    """[N, T // n, Hv, K, V] from the states entering each chunk, hs [B, Hv, NC, K, V], and the
    final states ht [N, Hv, K, V]: the state after chunk (j + 1) r - 1 of a sequence (r = n /
    CHUNK) is the one entering its next chunk, or its final state where that was its last."""
    NC = hs.shape[2]
    r, J = n // CHUNK, T // n
    if cu_seqlens is None:
        ck = jnp.moveaxis(hs[:, :, r::r], 2, 1)   # entering chunks r, 2r, ... (< NC)
        if ck.shape[1] < J:                        # the last checkpoint is the final state
            ck = jnp.concatenate([ck, ht[:, None]], axis=1)
        return ck[:, :J]
    lens, _, start, _ = _sequence_chunks(cu_seqlens.astype(jnp.int32), CHUNK)
    m = (jnp.arange(J, dtype=jnp.int32) + 1) * n       # tokens before checkpoint j
    c = jnp.clip(start[:, None] + m // CHUNK, 0, NC - 1)
    ck = jnp.moveaxis(jnp.take(hs[0], c, axis=1), 0, 2)  # [N, J, Hv, K, V]
    ck = jnp.where((m == lens[:, None])[..., None, None, None], ht[:, None], ck)
    return jnp.where((m <= lens[:, None])[..., None, None, None], ck, 0.0)


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
    q_in, k_in, g_in, h0_in = q, k, g, initial_state
    if initial_state is not None:  # a 16-bit state: float32 in the kernels, dh0 in its dtype
        initial_state = initial_state.astype(F32)
    if dht is not None:
        dht = dht.astype(F32)
    q, k, v, g, beta, initial_state, do, dht = _platform.guard(
        q, k, v, g, beta, initial_state, do, dht, what="chunked kernels (backward)",
        interpret=interpret)
    do = do.astype(q.dtype)
    W, U, *PA = _prep_call(k, v, g, beta, Hv=Hv, l2=l2, lp=lp, interpret=interpret, tabs=tabs,
                           q=q, scale=scale, backward=True)
    P, Tm = PA if len(PA) == 2 else (None, PA[0])
    # the per-chunk states and state gradients [B, Hv, NC, K, V] in the input dtype for 16-bit
    # inputs (the dots read them in that dtype anyway; measured: the same gradient errors as
    # float32 storage, docs/pallas_chunked_report.md), float32 for float32 inputs
    sdt = F32 if lp is None else lp
    hs, Vn = _state_call(q, k, g, W, U, initial_state, Hv=Hv, scale=scale, l2=l2, lp=lp,
                         store_o=False, store_ht=False, store_states=True, interpret=interpret,
                         tabs=tabs, state_dtype=sdt)
    dhs, dh0, dVn = _rev_call(q, k, g, W, do, dht, Hv=Hv, scale=scale, l2=l2, lp=lp,
                              interpret=interpret, tabs=tabs, P=P, state_dtype=sdt)
    dq, dk, dv, dbeta, dg = _grad_call(q, k, v, g, beta, do, Vn, dVn, hs, dhs, Tm, scale=scale,
                                       l2=l2, lp=lp, interpret=interpret, tabs=tabs)
    # dq, dk [B, T, Hk, K] float32, summed over the head group in the kernels
    if l2:  # the l2norm Jacobian, elementwise in XLA
        dq = jax.vjp(l2norm, q_in)[1](dq)[0]
        dk = jax.vjp(l2norm, k_in)[1](dk)[0]
    # dg (zero where g was clamped) and dbeta come in the dtypes of g and beta from the kernels
    return (dq.astype(q_in.dtype), dk.astype(k_in.dtype), dv, dg.astype(g_in.dtype),
            dbeta.astype(beta.dtype), dh0.astype(h0_in.dtype) if h0_in is not None else None)
