"""Plain-XLA chunk-parallel gated delta net (docs/spec.md section 5): one lax.scan over 64-token chunks
whose body does all the work of a chunk for all heads, so XLA's dots stay small and cache-resident."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._common import G_MIN, HIGHEST, prepare
from ._varlen import _sequence_chunks, chunk_layout, from_aligned, to_aligned

SUB = 16  # KDA sub-block size and block size of the triangular solve


def _dot(spec, a, b, precision=HIGHEST):
    return jnp.einsum(spec, a, b, precision=precision)


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


TINY = 4  # KDA: the exact pairwise terms stay inside 4-token blocks


def _exact(xs, k, G):
    """The pairs inside every TINY-token block, each with its own exp(G_i - G_j):
    sum_d xs_id k_jd exp(G_id - G_jd) for i > j; returns the blocks [..., 2, n // TINY, TINY, TINY]
    (one op per offset o = i - j, over all blocks at once)."""
    n, K = k.shape[-2:]
    lead = k.shape[:-2]
    nT = n // TINY
    x4 = xs.reshape(lead + (2, nT, TINY, K))
    k4, G4 = k.reshape(lead + (nT, TINY, K)), G.reshape(lead + (nT, TINY, K))
    ones = jnp.ones((K,), k.dtype)
    s = jnp.arange(TINY)
    out = 0.0
    for o in range(1, TINY):
        kE = k4[..., :TINY - o, :] * jnp.exp(G4[..., o:, :] - G4[..., :TINY - o, :])        # [..., nT, TINY - o, K]
        # The sum over channels as a dot with ones (XLA CPU runs it ~2.5x faster than a reduce), one per
        # row kind: broadcasting kE over the row-kind axis instead makes the backward reduce over
        # a middle axis, which crashes XLA's YNN fusion (jaxlib 0.10.2, Hv > Hk).
        val = jnp.stack([_dot("...bid,d->...bi", x4[..., x, :, o:, :] * kE, ones) for x in range(2)],
                        axis=-3)                                                         # [..., 2, nT, TINY - o]
        place = (s[o:, None] - o == s[None, :]).astype(k.dtype)                          # row i, column i - o
        out = out + jnp.pad(val[..., None] * place, [(0, 0)] * (val.ndim - 1) + [(o, 0), (0, 0)])
    return out


def _block_diagonal(blocks):
    """[..., nb, m, m] blocks -> the [..., nb m, nb m] block-diagonal matrix."""
    nb, m = blocks.shape[-3], blocks.shape[-1]
    # pads and a concatenate: their gradient is slices (a mask with eye(nb) broadcast over the
    # blocks would make the backward reduce over a middle axis, which crashes XLA's YNN fusion)
    lead = [(0, 0)] * (blocks.ndim - 3)
    return jnp.concatenate([jnp.pad(blocks[..., a, :, :], lead + [(0, 0), (a * m, (nb - 1 - a) * m)])
                            for a in range(nb)], axis=-2)


def _through(xs, k, G, m, inner, precision):
    """The pairs of xs rows i and k rows j in different m-token sub-blocks a > b of every
    `inner`-token block (m divides inner), through the boundary token r = a*m - 1 of that block:
    one dot of xs_i exp(G_i - G_r) with k_j exp(G_r - G_j) per sub-block row a (both factors
    <= 1). Returns [..., nI, 2, inner, inner] for the nI = n // inner blocks (zero for a <= b)."""
    n, K = k.shape[-2:]
    lead = k.shape[:-2]
    nI = n // inner
    xb = jnp.moveaxis(xs.reshape(lead + (2, nI, inner, K)), -4, -3)      # [..., nI, 2, inner, K]
    kb, Gb = k.reshape(lead + (nI, inner, K)), G.reshape(lead + (nI, inner, K))
    rows = [jnp.zeros(lead + (nI, 2, m, inner), k.dtype)]
    for a in range(1, inner // m):
        r = a * m - 1
        Gr = Gb[..., r:r + 1, :]
        e = jnp.exp(Gb[..., a * m:(a + 1) * m, :] - Gr)
        # one product per row kind, stacked: broadcasting e over the row-kind axis makes the
        # backward reduce over a middle axis, which crashes XLA's YNN fusion (jaxlib 0.10.2)
        left = jnp.stack([xb[..., x, a * m:(a + 1) * m, :] * e for x in range(2)], axis=-3)
        right = kb[..., :r + 1, :] * jnp.exp(Gr - Gb[..., :r + 1, :])
        # as one batch axis: the [rows, K] x [cols, K] form XLA CPU runs without transposing
        nbat = math.prod(lead) * nI
        off = _dot("bik,bjk->bij", left.reshape(nbat, 2 * m, K), right.reshape(nbat, r + 1, K),
                   precision).reshape(lead + (nI, 2, m, r + 1))
        rows.append(jnp.pad(off, [(0, 0)] * (off.ndim - 1) + [(0, inner - r - 1)]))
    return jnp.concatenate(rows, axis=-2)


def _pairs(xs, k, G, precision=HIGHEST):
    """Strictly-lower pairwise terms sum_d xs_xid k_jd exp(G_id - G_jd), i > j (docs/spec.md section 5).

    xs: [..., 2, n, K] (rows: k and q), k, G: [..., n, K], n a multiple of SUB; returns
    [..., 2, n, n]. Three levels, every exp argument a later cumulative gate minus an earlier
    one: pairs in different SUB-token sub-blocks factor through the boundary token of the later
    one (`_through`, dots), so do pairs in different TINY-token blocks of one sub-block; inside
    a TINY-token block every pair gets its own exp(G_i - G_j) (`_exact`).
    """
    n = k.shape[-2]
    out = _block_diagonal(jnp.moveaxis(_through(xs, k, G, TINY, SUB, precision), -4, -3))
    out = out + _block_diagonal(_exact(xs, k, G))
    if n > SUB:
        out = out + _through(xs, k, G, SUB, n, precision)[..., 0, :, :, :]
    return out


def _kda_pair_terms(k, q, b, Gc, precision=HIGHEST):
    """KDA's A = beta_i sum_d k_id k_jd exp(G_id - G_jd) (i > j) and the causal
    P = sum_d q_id k_jd exp(G_id - G_jd) (i >= j; the diagonal factor is the constant 1)."""
    C = k.shape[-2]
    out = _pairs(jnp.stack([k, q], axis=-3), k, Gc, precision)
    A = b[..., None] * out[..., 0, :, :]
    P = out[..., 1, :, :] + jnp.sum(q * k, axis=-1)[..., :, None] * jnp.eye(C, dtype=k.dtype)
    return A, P


def chunked_gated_delta_net(q, k, v, g, beta, initial_state, *, scale: float,
                            use_qk_l2norm: bool = False, chunk_size: int = 64, cu_seqlens=None,
                            state_layout: str = "kv", dot_precision=HIGHEST,
                            checkpoint_every: int = 0):
    """Chunk-parallel gated delta rule; GDA or KDA by the shape of g.

    q, k: [B, T, Hk, K]; v: [B, T, Hv, V]; g: [B, T, Hv] (GDA) or [B, T, Hv, K] (KDA);
    beta: [B, T, Hv]; initial_state: [B, Hv, K, V] float32, bfloat16 or float16. Returns
    (o [B, T, Hv, V] in q.dtype, final_state [B, Hv, K, V] in initial_state's dtype). All math
    in float32. Differentiable by
    autodiff; the scan body is rematerialised, so the backward stores one state per chunk.
    chunk_size must be a multiple of 16; short sequences use a smaller chunk (T rounded up
    to 16). A ragged T is padded at the FRONT with g = beta = q = k = v = 0.

    cu_seqlens (int32 [N + 1], B == 1, may be traced): N packed sequences, initial_state
    [N, Hv, K, V]. The tokens are laid out chunk-aligned (`_varlen.chunk_layout`): every
    sequence starts a chunk, so a boundary never falls inside one; the scan resets the state
    at each sequence's first chunk and the final states are read from the per-chunk states.

    state_layout="vk": initial and final states are `[.., Hv, V, K]` and the carried state
    stays in that layout (its two dots contract it where it lies; no transpose of the state).

    dot_precision: the precision of the dots between data and state (k k^T, q k^T, the state
    products, P Vn); the gate cumsums and the triangular solve always use HIGHEST.

    checkpoint_every=n > 0: also returns checkpoints `[N, T // n, Hv, K, V]` (docs/spec.md
    section 2.5b). A ragged T is then padded at the back, so every chunk starts at a multiple
    of C in its sequence. When C divides n the checkpoints are per-chunk states the scan
    computes anyway; otherwise each chunk also forms the states at its checkpoint positions
    from its start state and corrected values (`_chunk_checkpoints`).
    """
    if chunk_size <= 0 or chunk_size % SUB:
        raise ValueError(f"chunk_size must be a positive multiple of {SUB}, got {chunk_size}")
    out_dtype = q.dtype
    q, k, v, g, beta = prepare(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm, clamp_g=False)
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    G = Hv // Hk
    kda = g.ndim == 4
    C = min(chunk_size, -(-T // SUB) * SUB)
    ce = int(checkpoint_every)
    at_chunk_ends = ce > 0 and ce % C == 0  # the checkpoints are per-chunk states
    layout = None
    if cu_seqlens is not None:
        # chunk-aligned packing; identity tokens (all zero) fill each sequence's last chunk
        layout = chunk_layout(cu_seqlens, T, C)
        q, k, v, g, beta = (to_aligned(x, layout) for x in (q, k, v, g, beta))
        NC = layout.num_chunks
        pad = 0
    else:
        NC = -(-T // C)
        pad = NC * C - T
    Tp = NC * C
    # Pad at the FRONT: padding tokens (g = beta = 0, q = k = v = 0) leave the state unchanged,
    # get exactly-zero cotangents, and the last real token stays last in its chunk (its decay
    # to itself stays the constant 1).
    # With checkpoints, at the back (the same identity tokens) so chunks start at multiples of C.
    def padt(x):
        where = (0, pad) if ce else (pad, 0)
        return jnp.pad(x, [(0, 0), where] + [(0, 0)] * (x.ndim - 2)) if pad else x
    q, k, v, g, beta = (padt(x) for x in (q, k, v, g, beta))
    i = jnp.arange(C)
    strictf = (i[:, None] > i[None, :]).astype(jnp.float32)
    tril1 = (i[:, None] >= i[None, :]).astype(jnp.float32)
    eye = (i[:, None] == i[None, :]).astype(jnp.float32)
    last = i == C - 1

    N = initial_state.shape[0]
    vk = state_layout == "vk"
    s_shape = (V, K) if vk else (K, V)
    h0_all = initial_state.astype(jnp.float32).reshape((N, Hk, G) + s_shape)
    J = T // ce if ce else 0
    if ce and not at_chunk_ends:
        ck_pos, ck_seq, ck_idx = _checkpoint_positions(ce, C, NC, T, B, layout, cu_seqlens)

    def step(S, n):
        if layout is not None:  # a sequence's first chunk starts from its own initial state
            h0_c = jnp.take(h0_all, jnp.minimum(layout.chunk_seq[n], N - 1), axis=0)[None]
            S = jnp.where(layout.first[n], h0_c, S)
        # Inputs are closed over and sliced here (token-major, one contiguous block for B == 1);
        # passing them as scan xs makes XLA copy them into the loop first. The head-major
        # transposes then happen on cache-resident chunk data.
        q_c, k_c, v_c, b_c, g_c = (jax.lax.dynamic_slice_in_dim(x, n * C, C, axis=1)
                                   for x in (q, k, v, beta, g))
        g_c = jnp.maximum(g_c, G_MIN)  # the gate clamp, here on chunk data (fused with the slice)
        q_c = q_c.transpose(0, 2, 1, 3) * scale                      # [B, Hk, C, K]
        k_c = k_c.transpose(0, 2, 1, 3)
        v_c = v_c.reshape(B, C, Hk, G, V).transpose(0, 2, 3, 1, 4)    # [B, Hk, G, C, V]
        b_c = b_c.reshape(B, C, Hk, G).transpose(0, 2, 3, 1)         # [B, Hk, G, C]
        # in-chunk cumulative gates as a dot with a triangle of ones (XLA's cumsum is a slow
        # reduce-window on CPU)
        if kda:  # one [C, C] x [C, B Hv K] product (token-major: a bitcast when B == 1), then head-major
            G_c = _dot("ij,jx->ix", tril1, jnp.moveaxis(g_c, 1, 0).reshape(C, B * Hv * K))
            G_c = G_c.reshape(C, B, Hk, G, K).transpose(1, 2, 3, 0, 4)
        else:
            G_c = _dot("ij,bjhg->bhgi", tril1, g_c.reshape(B, C, Hk, G))
        if kda:
            kg = jnp.broadcast_to(k_c[:, :, None], G_c.shape)
            qg = jnp.broadcast_to(q_c[:, :, None], G_c.shape)
            A, P = _kda_pair_terms(kg, qg, b_c, G_c, dot_precision)
            eG = jnp.exp(G_c)
            Gl = G_c[..., -1:, :]
            kd = kg * jnp.where(last[:, None], 1.0, jnp.exp(jnp.where(last[:, None], 0.0, Gl - G_c)))
            eQ = qg * eG
            bK = b_c[..., None] * kg * eG
            dec = jnp.exp(Gl[..., 0, :])[..., :, None]
        else:
            # k.k^T and q.k^T depend only on the key head: once per key head, shared by its group
            KK = _dot("bhik,bhjk->bhij", k_c, k_c, dot_precision)[:, :, None]
            QK = _dot("bhik,bhjk->bhij", q_c, k_c, dot_precision)[:, :, None]
            Ds = jnp.exp((G_c[..., :, None] - G_c[..., None, :]) * strictf) * strictf  # masked args: 0
            A = b_c[..., None] * KK * Ds
            P = QK * (Ds + eye)
            eG = jnp.exp(G_c)[..., None]
            Gl = G_c[..., -1:]
            kd = k_c[:, :, None] * jnp.where(last, 1.0, jnp.exp(jnp.where(last, 0.0, Gl - G_c)))[..., None]
            eQ = q_c[:, :, None] * eG
            bK = (b_c[..., None] * eG) * k_c[:, :, None]
            dec = jnp.exp(Gl)[..., None]
        # One dot of the state against [beta exp(G) K ; exp(G) Q]. Then the corrected values
        # Vn = (I + A)^-1 (beta V - beta exp(G) K S) by forward substitution (no W, U), the
        # output exp(G) Q S + P Vn and the state update.
        Y = _dot("...ck,...vk->...cv" if vk else "...ck,...kv->...cv",
                 jnp.concatenate([bK, eQ], axis=-2), S, dot_precision)
        X = b_c[..., None] * v_c - Y[..., :C, :]
        Vn = _solve_unit_lower(A, X)
        o_c = Y[..., C:, :] + _dot("...ij,...jv->...iv", P, Vn, dot_precision)
        ys = {}
        if ce and not at_chunk_ends:
            ys["ck"] = _chunk_checkpoints(S, k_c, Vn, G_c, ck_pos[n], kda=kda, vk=vk,
                                          precision=dot_precision)
        if vk:
            S = jnp.swapaxes(dec, -1, -2) * S + _dot("...cv,...ck->...vk", Vn, kd, dot_precision)
        else:
            S = dec * S + _dot("...ck,...cv->...kv", kd, Vn, dot_precision)
        ys["o"] = o_c.transpose(0, 3, 1, 2, 4).reshape(B, C, Hv, V)
        if layout is not None or at_chunk_ends:
            ys["S"] = S
        return S, ys

    # jax.checkpoint: the backward recomputes each chunk's body from the stored per-chunk
    # state (memory O(T/C * K * V)); it is also faster here than storing the residuals.
    def checkpoints(ys):
        """`[N, J, Hv, ..]` from the per-chunk states (C divides n) or checkpoint states."""
        if not at_chunk_ends:  # ys["ck"]: [NC, M, B, Hk, G, ..], scattered to (ck_seq, ck_idx)
            ck = jnp.moveaxis(ys["ck"], 2, 0).reshape((B * NC * ck_pos.shape[1], Hv) + s_shape)
            out = jnp.zeros((N, J, Hv) + s_shape, jnp.float32)
            return out.at[ck_seq.reshape(-1), ck_idx.reshape(-1)].set(ck, mode="drop")
        r = ce // C  # checkpoint j: the state after chunk (j + 1) r - 1 of its sequence
        states = ys["S"].reshape((NC, B, Hv) + s_shape)
        if layout is None:
            return jnp.moveaxis(states[r - 1::r][:J], 0, 1)
        j = jnp.arange(J, dtype=jnp.int32)
        start = _sequence_chunks(cu_seqlens.astype(jnp.int32), C)[2]
        c = jnp.clip(start[:, None] + (j + 1) * r - 1, 0, NC - 1)
        valid = ((j + 1) * ce <= layout.lens[:, None])[..., None, None, None]
        return jnp.where(valid, jnp.take(states[:, 0], c, axis=0), 0.0)

    ckpts = ()
    if layout is None:
        S, ys = jax.lax.scan(jax.checkpoint(step), h0_all, jnp.arange(NC))  # o: [NC, B, C, Hv, V]
        o = jnp.moveaxis(ys["o"], 0, 1).reshape(B, Tp, Hv, V)
        o = o[:, :T] if ce else o[:, pad:]
        if ce:
            ckpts = (checkpoints(ys).astype(initial_state.dtype),)
        return (o.astype(out_dtype), S.reshape((B, Hv) + s_shape).astype(initial_state.dtype),
                *ckpts)
    S_in = jnp.zeros((1, Hk, G) + s_shape, jnp.float32)
    _, ys = jax.lax.scan(jax.checkpoint(step), S_in, jnp.arange(NC))
    o = from_aligned(jnp.moveaxis(ys["o"], 0, 1).reshape(1, Tp, Hv, V), layout)
    # each sequence's final state: the state after its last chunk (its initial one if empty)
    ends = jnp.take(ys["S"][:, 0], jnp.maximum(layout.last_chunk, 0), axis=0)
    final = jnp.where((layout.last_chunk >= 0)[:, None, None, None, None], ends, h0_all)
    if ce:
        ckpts = (checkpoints(ys).astype(initial_state.dtype),)
    return (o.astype(out_dtype), final.reshape((N, Hv) + s_shape).astype(initial_state.dtype),
            *ckpts)


def _checkpoint_positions(n: int, C: int, NC: int, T: int, B: int, layout, cu_seqlens):
    """Where each chunk's checkpoints lie when C does not divide n: (pos [NC, M], the in-chunk
    position of each of its M possible checkpoints, clipped to C - 1; seq [B * NC * M] and
    idx, their sequence and checkpoint index, N and J where none, so a scatter drops them).
    Chunk c starts at token s_c of its sequence (chunks start at multiples of C there)."""
    M = min(C, -(-C // n))  # at most this many multiples of n among C consecutive tokens
    J = T // n
    c = jnp.arange(NC, dtype=jnp.int32)
    if layout is None:
        s, L, seq = c * C, jnp.full((NC,), T, jnp.int32), None
    else:
        N = cu_seqlens.shape[0] - 1
        start = _sequence_chunks(cu_seqlens.astype(jnp.int32), C)[2]
        cs = jnp.minimum(layout.chunk_seq, N - 1)
        s = (c - start[cs]) * C
        L = jnp.where(layout.chunk_seq < N, layout.lens[cs], 0)
        seq = layout.chunk_seq
    j = s[:, None] // n + jnp.arange(M, dtype=jnp.int32)   # [NC, M] checkpoint indices
    pos = (j + 1) * n - 1 - s[:, None]
    valid = (pos < C) & ((j + 1) * n <= L[:, None])
    idx = jnp.where(valid, j, J)
    if layout is None:  # B sequences: (b, c, m) flattened
        seq_all = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None, None], (B, NC, M))
        idx_all = jnp.broadcast_to(idx[None], (B, NC, M))
    else:
        seq_all = jnp.where(valid, seq[:, None], cu_seqlens.shape[0] - 1)[None]
        idx_all = idx[None]
    return jnp.minimum(pos, C - 1), seq_all, idx_all


def _chunk_checkpoints(S, k, Vn, Gc, pos, *, kda: bool, vk: bool, precision):
    """The states after the tokens at in-chunk positions pos [M] of one chunk:
    S_r = exp(G_r) S + sum_{j <= r} exp(G_r - G_j) k_j Vn_j^T, r = pos[m].

    S: the chunk's start state [B, Hk, G, K, V] ([.., V, K] when vk); k: [B, Hk, C, K];
    Vn: the corrected values [B, Hk, G, C, V]; Gc: in-chunk cumulative gates [B, Hk, G, C]
    (GDA) or [B, Hk, G, C, K] (KDA). Returns [M, B, Hk, G, K, V] (or [.., V, K])."""
    C = k.shape[-2]
    mask = (jnp.arange(C)[None, :] <= pos[:, None]).astype(jnp.float32)   # [M, C]
    if kda:
        Gr = jnp.take(Gc, pos, axis=-2)                                    # [B, Hk, G, M, K]
        D = jnp.exp((Gr[..., :, None, :] - Gc[..., None, :, :]) * mask[..., None]) * mask[..., None]
        W = D * k[:, :, None, None]                                         # [B, Hk, G, M, C, K]
        decay = jnp.exp(Gr)[..., None, :] if vk else jnp.exp(Gr)[..., :, None]
    else:
        Gr = jnp.take(Gc, pos, axis=-1)                                    # [B, Hk, G, M]
        D = jnp.exp((Gr[..., :, None] - Gc[..., None, :]) * mask) * mask   # [B, Hk, G, M, C]
        W = D[..., None] * k[:, :, None, None]
        decay = jnp.exp(Gr)[..., None, None]
    if vk:
        add = _dot("...cv,...mck->...mvk", Vn, W, precision)
    else:
        add = _dot("...mck,...cv->...mkv", W, Vn, precision)
    return jnp.moveaxis(decay * S[..., None, :, :] + add, 3, 0)
