"""Recurrent / decode gated delta rule (GDA and KDA) as one Mosaic TPU kernel: state pools,
packed sequences and snapshots.

Grid `(2, ceil(N / 2))`: two chains of sequences ("parallel": one per TensorCore on chips
with two), each walked in order ("arbitrary"). A step owns the float32 state of all Hv heads of
its sequence in one of two VMEM buffers (`Hv * K * V * 4` bytes each, 2 MiB at Hv = 32,
K = V = 128): while it runs its tokens, the next sequence's state is loading into the other
buffer and the previous one's is being stored, so the state crosses HBM twice per call (the
decode roofline) with the transfers overlapping the compute. Everything sits in HBM
(`memory_space=ANY`) and moves by DMA:

- `cu_seqlens` and `state_indices` are scalar-prefetched into SMEM. Without `cu_seqlens` the
  B sequences of T tokens are the packed row `[B * T]` with offsets `n * T`, so one kernel body
  serves both. Offsets are clamped into [0, T_total]: bad traced values give undefined results
  but never an out-of-bounds DMA.
- Pools: the step reads and writes slot `state_indices[n]` only; the pool is aliased to the
  final state (`input_output_aliases`), so every other slot keeps its bytes and a donated pool
  is updated in place. An index outside [0, P) (padding: -1) reads nothing, writes nothing and
  gets zero outputs and snapshots.
- Snapshots: after each of the last ns tokens the state is copied to `[N, ns, Hv, ...]`; slots
  before the sequence's first token get its initial state.

Per token the rows of q, k (`[Hk, K]`), v (`[Hv, V]`) and the gates come in by five concurrent
DMAs (GDA gates and beta into SMEM as scalars, KDA gates as `[Hv, K]` rows), are cast to
float32 and l2-normed once, and a loop over value heads applies `S <- exp(g) S`, `u = beta (v - S^T k)`,
`S += k u^T`, `o = S^T (scale q)`. Value head h reads q/k head `lax.div(h, Hv // Hk)`. One token
has no matrix product: the matvecs are float32 multiply + reduce on the VPU (exact), the rows
that must become columns move by a select + reduce against the identity (`_common.row_to_col`).

State layouts: "kv" (`[.., K, V]`, V on lanes) and "vk" (`[.., V, K]`, K on lanes; KDA's gate
then scales lanes directly) are both native: the head step is written for each.
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..._common import G_MIN, L2NORM_EPS
from .. import _checks
from . import _common as tc

__all__ = ["supports", "fused_recurrent", "vmem_bytes", "STATE_LAYOUTS", "HEAD_SIZES"]

STATE_LAYOUTS = ("kv", "vk")
HEAD_SIZES = (16, 32, 64, 128, 256)
# The whole state of one sequence lives in VMEM; above this it would crowd v7x's 64 MiB.
MAX_STATE_BYTES = 8 * 1024 * 1024
F32 = tc.F32


def vmem_bytes(Hk, Hv, K, V, itemsize=2, kda=False) -> int:
    """VMEM the kernel's scratch needs (no pipelined blocks: everything else is in HBM)."""
    state = 2 * Hv * K * V * 4  # double-buffered: the next sequence's state loads meanwhile
    rows = 2 * Hk * K * (itemsize + 4) + Hv * V * (itemsize + 4) + Hv * V * (itemsize + 4)
    gates = Hv * K * (itemsize + 4) if kda else 0
    return state + rows + gates


def supports(q, k, v, g, beta, initial_state=None, *, state_layout: str = "kv",
             cu_seqlens=None, state_indices=None, num_snapshots: int = 0):
    """None if `fused_recurrent` can serve these shapes and dtypes, else the reason (a str).

    Looks at shapes and dtypes only (ShapeDtypeStructs work), never at values or devices.
    """
    if state_layout not in STATE_LAYOUTS:
        return f"state_layout={state_layout!r} is not one of {STATE_LAYOUTS}"
    reason = tc.check_common(q, k, v, g, beta, HEAD_SIZES)
    if reason is not None:
        return reason
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    if Hv * K * V * 4 > MAX_STATE_BYTES:
        return (f"one sequence's state (Hv={Hv}, K={K}, V={V}: {Hv * K * V * 4} bytes) exceeds "
                f"the {MAX_STATE_BYTES} bytes the TPU recurrent kernel keeps in VMEM")
    if (isinstance(num_snapshots, bool) or not isinstance(num_snapshots, numbers.Integral)
            or num_snapshots < 0):
        return f"num_snapshots={num_snapshots!r} is not a Python int >= 0"
    N, reason = tc.check_cu_seqlens(cu_seqlens, B)
    if reason is not None:
        return reason
    pool = state_indices is not None
    if pool:
        if getattr(state_indices, "ndim", None) != 1 or state_indices.shape[0] != N:
            return (f"state_indices shape {tuple(getattr(state_indices, 'shape', ()))} is not "
                    f"[N] = [{N}]")
        if not _checks.is_int_dtype(state_indices):
            return f"state_indices dtype {state_indices.dtype} is not an integer dtype"
        if initial_state is None:
            return "state_indices needs initial_state (the state pool [P, Hv, ...])"
    if initial_state is not None:
        lead = initial_state.shape[0] if (pool and getattr(initial_state, "ndim", 0) == 4) else N
        want = (lead, Hv, K, V) if state_layout == "kv" else (lead, Hv, V, K)
        if tuple(initial_state.shape) != want:
            what = "state pool" if pool else "initial_state"
            return (f"{what} shape {tuple(initial_state.shape)} does not match the "
                    f"{state_layout!r} layout {want}")
        if lead < 1:
            return "the state pool has no slots (P = 0)"
        if jnp.dtype(initial_state.dtype) != jnp.dtype(F32):
            return f"initial_state must be float32, got {initial_state.dtype}"
    return None


def _l2norm_rows(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) + L2NORM_EPS)


def _head_step(S, k_row, q_row, v_row, beta, gate, *, layout, kda, eye_k, eye_v):
    """One token of one head on the state tile S ([K, V] "kv" / [V, K] "vk"), float32.

    gate: GDA a [1, 1] decay factor exp(g); KDA the [1, K] row exp(g). Returns (S, o [1, V]).
    """
    if layout == "kv":
        k_col = tc.row_to_col(k_row, eye_k)
        q_col = tc.row_to_col(q_row, eye_k)
        S = S * (tc.row_to_col(gate, eye_k) if kda else gate)
        u = beta * (v_row - jnp.sum(S * k_col, axis=0, keepdims=True))     # [1, V]
        S = S + k_col * u
        return S, jnp.sum(S * q_col, axis=0, keepdims=True)
    S = S * gate                                                            # lanes are K
    v_col = tc.row_to_col(v_row, eye_v)
    u = beta * (v_col - jnp.sum(S * k_row, axis=1, keepdims=True))         # [V, 1]
    S = S + u * k_row
    return S, tc.col_to_row(jnp.sum(S * q_row, axis=1, keepdims=True), eye_v)


def _seq_info(cu_ref, idx_ref, m, *, N, T_total, pool, P):
    """(live, valid, slot, bos, eos) of sequence m (live: m < N, the grid has a tail step when N
    is odd; valid: live and its slot in [0, P))."""
    live = m < N
    mc = jnp.minimum(m, N - 1)
    bos = jnp.clip(cu_ref[mc], 0, T_total)
    eos = jnp.where(live, jnp.clip(cu_ref[mc + 1], bos, T_total), bos)  # a tail step runs nothing
    if pool:
        raw = idx_ref[mc]
        valid = live & (raw >= 0) & (raw < P)
        slot = jnp.where(valid, raw, 0)
    else:
        valid, slot = live, mc
    return live, valid, slot, bos, eos


def _kernel(cu_ref, idx_ref, *refs, N, T_total, group, scale, l2, kda, layout, has_h0,
            store_ht, pool, ns):
    it = iter(refs)
    q_hbm, k_hbm, v_hbm, g_hbm, b_hbm = (next(it) for _ in range(5))
    h0_hbm = next(it) if has_h0 else None
    o_hbm = next(it)
    ht_hbm = next(it) if store_ht else None
    snap_hbm = next(it) if ns else None
    (s_buf, qb, kb, vb, qf, kf, vf, of, ob, bs) = (next(it) for _ in range(10))
    gb, gf, gs, sems, load_sems, store_sems = (next(it) for _ in range(6))
    Hv = s_buf.shape[1]
    K = qf.shape[1]
    V = vf.shape[1]

    # Sequence m = p * per + j: two chains (one per TensorCore where there are two), each
    # walking its sequences in order so the next state's load overlaps this step.
    p, j = pl.program_id(0), pl.program_id(1)
    per = pl.num_programs(1)
    m = p * per + j
    cur = jax.lax.rem(j, 2)
    s_scr = s_buf.at[cur]
    info = functools.partial(_seq_info, cu_ref, idx_ref, N=N, T_total=T_total, pool=pool,
                             P=h0_hbm.shape[0] if has_h0 else 1)
    live, valid, slot, bos, eos = info(m)
    hi = jnp.where(valid, eos, bos)  # end of the tokens that run (bos for padding)

    def load(slot_, buf):
        return pltpu.make_async_copy(h0_hbm.at[slot_], s_buf.at[buf], load_sems.at[buf])

    def store(slot_, buf):
        return pltpu.make_async_copy(s_buf.at[buf], ht_hbm.at[slot_], store_sems.at[buf])

    if store_ht:  # the other buffer is free once the previous step's store has landed
        _, valid_p, slot_p, _, _ = info(m - 1)

        @pl.when((j >= 1) & valid_p)
        def _():
            store(slot_p, 1 - cur).wait()

    if has_h0:
        @pl.when((j == 0) & valid)
        def _():
            load(slot, cur).start()

        _, valid_n, slot_n, _, _ = info(m + 1)

        @pl.when((j + 1 < per) & valid_n)
        def _():
            load(slot_n, 1 - cur).start()

        @pl.when(valid)
        def _():
            load(slot, cur).wait()

        @pl.when(jnp.logical_not(valid))
        def _():
            s_scr[...] = jnp.zeros(s_scr.shape, F32)
    else:
        s_scr[...] = jnp.zeros(s_scr.shape, F32)

    if ns:
        # snapshot slots before the first token hold the initial state
        n_init = jnp.where(live, jnp.clip(ns - (hi - bos), 0, ns), 0)

        def init_snap(i, c):
            pltpu.sync_copy(s_scr, snap_hbm.at[m, i])
            return c

        jax.lax.fori_loop(0, n_init, init_snap, 0)
        first_snap = hi - ns

    eye_k = tc.eye_mask(K)
    eye_v = tc.eye_mask(V)

    def token(t, c):
        # the token's five rows are in flight together (one DMA latency, not five)
        copies = [pltpu.make_async_copy(src.at[t], dst, sems.at[i]) for i, (src, dst) in
                  enumerate(((q_hbm, qb), (k_hbm, kb), (v_hbm, vb), (b_hbm, bs),
                             (g_hbm, gb if kda else gs)))]
        for cp in copies:
            cp.start()
        for cp in copies:
            cp.wait()
        if kda:
            gf[...] = jnp.exp(jnp.maximum(gb[...].astype(F32), G_MIN))
        qv = qb[...].astype(F32)
        kv = kb[...].astype(F32)
        if l2:
            qv, kv = _l2norm_rows(qv), _l2norm_rows(kv)
        qf[...] = qv * scale
        kf[...] = kv
        vf[...] = vb[...].astype(F32)

        def head(h, c):
            hk = jax.lax.div(h, group)
            if kda:
                gate = gf[pl.ds(h, 1), :]
            else:
                gate = jnp.exp(jnp.maximum(jnp.full((1, 1), gs[h], F32), G_MIN))
            S, o_row = _head_step(s_scr[h], kf[pl.ds(hk, 1), :], qf[pl.ds(hk, 1), :],
                                  vf[pl.ds(h, 1), :], bs[h], gate, layout=layout, kda=kda,
                                  eye_k=eye_k, eye_v=eye_v)
            s_scr[h] = S
            of[pl.ds(h, 1), :] = o_row
            return c

        jax.lax.fori_loop(0, Hv, head, 0)
        ob[...] = of[...].astype(ob.dtype)
        pltpu.sync_copy(ob, o_hbm.at[t])
        if ns:
            @pl.when(t >= first_snap)
            def _():
                pltpu.sync_copy(s_scr, snap_hbm.at[m, t - first_snap])
        return c

    jax.lax.fori_loop(bos, hi, token, 0)

    if pool:
        # padding: zero rows for its tokens [hi, eos) = [bos, eos) (an empty range otherwise)
        def zero_row(t, c):
            ob[...] = jnp.zeros(ob.shape, ob.dtype)
            pltpu.sync_copy(ob, o_hbm.at[t])
            return c

        jax.lax.fori_loop(hi, eos, zero_row, 0)

    if store_ht:
        @pl.when(valid)
        def _():
            store(slot, cur).start()

        @pl.when((j + 1 == per) & valid)
        def _():
            store(slot, cur).wait()


def fused_recurrent(q, k, v, g, beta, initial_state=None, *, scale: float,
                    use_qk_l2norm: bool = False, output_final_state: bool = True,
                    interpret: bool = False, state_layout: str = "kv",
                    alias_state: bool = True, cu_seqlens=None, state_indices=None,
                    num_snapshots: int = 0):
    """The gated delta rule through the Mosaic TPU recurrent kernel (T >= 1 tokens).

    The calling convention of `gdn_jax.kernels.recurrent.fused_recurrent` (same arguments,
    same returns): q, k `[B, T, Hk, K]`; v `[B, T, Hv, V]`; g `[B, T, Hv]` (GDA) or
    `[B, T, Hv, K]` (KDA); beta `[B, T, Hv]`; initial_state float32 `[N, Hv, K, V]` ("kv") /
    `[N, Hv, V, K]` ("vk") or None (zeros). Returns `(o, final_state)` or, with
    num_snapshots > 0, `(o, final_state, snapshots [N, ns, Hv, ...])`.

    cu_seqlens int `[N + 1]` (B == 1) packs N sequences along T. state_indices int `[N]` makes
    initial_state a pool `[P, Hv, ...]`, always aliased to final_state (only indexed slots are
    written; index outside [0, P): nothing read or written, zero outputs); needs
    output_final_state. alias_state: alias a per-sequence initial state to the final state (in
    place when donated). interpret: run in the TPU interpreter on the CPU.
    """
    reason = supports(q, k, v, g, beta, initial_state, state_layout=state_layout,
                      cu_seqlens=cu_seqlens, state_indices=state_indices,
                      num_snapshots=num_snapshots)
    if reason is not None:
        raise ValueError(f"gdn_jax: the Mosaic TPU recurrent kernel cannot serve this call: {reason}")
    pool = state_indices is not None
    if pool and not output_final_state:
        raise ValueError("gdn_jax: the Mosaic TPU recurrent kernel with state_indices needs "
                         "output_final_state=True: the updated pool is its final state")
    ns = int(num_snapshots)
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    kda = g.ndim == 4
    has_h0 = initial_state is not None
    Tt = B * T
    if cu_seqlens is None:
        N = B
        cu = jnp.arange(N + 1, dtype=jnp.int32) * T
    else:
        N = cu_seqlens.shape[0] - 1
        cu = jnp.asarray(cu_seqlens).astype(jnp.int32)
    idx = (jnp.asarray(state_indices).astype(jnp.int32) if pool
           else jnp.arange(N, dtype=jnp.int32))
    tile = (K, V) if state_layout == "kv" else (V, K)
    gdt = g.dtype if kda else F32
    args = [q.reshape(Tt, Hk, K), k.reshape(Tt, Hk, K), v.reshape(Tt, Hv, V),
            g.reshape((Tt, Hv, K) if kda else (Tt, Hv)).astype(gdt),
            beta.reshape(Tt, Hv).astype(F32)]
    if has_h0:
        args.append(initial_state)
    out_shape = [jax.ShapeDtypeStruct((Tt, Hv, V), q.dtype)]
    lead = initial_state.shape[0] if pool else N
    if output_final_state:
        out_shape.append(jax.ShapeDtypeStruct((lead, Hv) + tile, F32))
    if ns:
        out_shape.append(jax.ShapeDtypeStruct((N, ns, Hv) + tile, F32))
    # operand 2 + 5 is the state (after the two scalar-prefetch operands and five inputs)
    aliases = {7: 1} if (has_h0 and output_final_state and (alias_state or pool)) else {}
    scratch = [
        pltpu.VMEM((2, Hv) + tile, F32),
        pltpu.VMEM((Hk, K), q.dtype), pltpu.VMEM((Hk, K), q.dtype), pltpu.VMEM((Hv, V), q.dtype),
        pltpu.VMEM((Hk, K), F32), pltpu.VMEM((Hk, K), F32), pltpu.VMEM((Hv, V), F32),
        pltpu.VMEM((Hv, V), F32), pltpu.VMEM((Hv, V), q.dtype),
        pltpu.SMEM((Hv,), F32),
        pltpu.VMEM((Hv, K) if kda else (1, 128), gdt), pltpu.VMEM((Hv, K) if kda else (1, 128), F32),
        pltpu.SMEM((1,) if kda else (Hv,), F32),
        pltpu.SemaphoreType.DMA((5,)), pltpu.SemaphoreType.DMA((2,)),
        pltpu.SemaphoreType.DMA((2,)),
    ]
    isz = jnp.dtype(q.dtype).itemsize
    state_bytes = N * Hv * K * V * 4
    cost = pl.CostEstimate(
        flops=int(Tt * Hv * K * V * 8),
        transcendentals=int(Tt * Hv * (K if kda else 1)),
        bytes_accessed=int(state_bytes * (int(has_h0) + int(output_final_state) + ns)
                           + Tt * (2 * Hk * K + 2 * Hv * V) * isz
                           + Tt * Hv * ((K * jnp.dtype(gdt).itemsize) if kda else 4) + Tt * Hv * 4))
    kernel = functools.partial(
        _kernel, N=N, T_total=Tt, group=Hv // Hk, scale=float(scale), l2=bool(use_qk_l2norm),
        kda=kda, layout=state_layout, has_h0=has_h0, store_ht=bool(output_final_state),
        pool=pool, ns=ns)
    name = (f"gdn_tpu_recurrent_{'kda' if kda else 'gda'}_k{K}_v{V}_{state_layout}"
            f"{'_varlen' if cu_seqlens is not None else ''}{'_pool' if pool else ''}"
            f"{f'_snap{ns}' if ns else ''}")
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(2, -(-N // 2)),
            in_specs=[tc.any_spec()] * len(args),
            out_specs=[tc.any_spec()] * len(out_shape),
            scratch_shapes=scratch),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=tc.compiler_params(
            ("parallel", "arbitrary"), vmem_bytes(Hk, Hv, K, V, isz, kda)),
        cost_estimate=cost,
        interpret=tc.interpret_arg(interpret),
        name=name,
    )(cu, idx, *args)
    o = outs[0].reshape(B, T, Hv, V)
    ht = outs[1] if output_final_state else None
    if ns:
        return o, ht, outs[-1]
    return o, ht
