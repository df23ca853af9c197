"""Static cost model of the chunked kernels: FLOPs and HBM bytes of every kernel the forward and
the backward program launch (XLA epilogue included), from their grids and blocks, and roofline
times. Predictions, not measurements.

    python -m gdn_jax.kernels.chunk_cost        # the tables of docs/pallas_chunked_report.md
"""
from __future__ import annotations

from ._chunk_ops import CHUNK, SUB, choose_block_v, padded_rows
from .chunk_bwd_grad import key_window

# the gradient kernels that add dq / dk into the shared float32 buffer (`acc_shape`) atomically
ATOMIC_STAGES = ("bwd_dqv", "bwd_dk", "bwd_da")


def acc_shape(B, T, Hk, K):
    """The float32 buffer the gradient kernels add dq ([.., :K]) and dk ([.., K:]) into."""
    return (B, padded_rows(T), Hk, 2 * K)

ASSUMPTIONS = (
    "Assumptions: H100 SXM, 990 TFLOP/s dense 16-bit tensor-core, 67 TFLOP/s float32 CUDA-core "
    "(IEEE FMA), 3.35 TB/s HBM; each kernel takes max(bytes / bandwidth, tensor-core time + "
    "CUDA-core time) (perfect overlap of memory and compute inside a kernel, none between "
    "kernels, launch gaps ignored). FLOPs: 2 m n k per dot, summed over every program of the grid "
    "(masked dots counted whole; elementwise work, exps and reductions not counted). Bytes: each "
    "distinct array a kernel reads or writes counted once (re-reads of a q / k head by the value "
    "heads of its group, and of a chunk's operands by the value blocks of a head, are L2 hits); "
    "a float32 buffer the kernels add into atomically (dq, dk per key head) counts a read and a "
    "write per kernel (the value heads of a key head add while its lines are in L2). "
    "16-bit inputs: W, U, Vn, dVn and the backward's per-chunk states in the input dtype, the WY "
    "chain's float32 products as bf16x3 (three tensor-core dots); float32 inputs: every dot an "
    "IEEE float32 dot.")


def _inv_flops(n):
    """FLOPs of `_chunk_ops._inv_unit_lower` on an n x n block."""
    if n <= SUB:
        levels, s = 0, 2
        while s < n:
            levels, s = levels + 1, s * 2
        return levels * 2 * (2 * n ** 3)
    h = n // 2
    return 2 * _inv_flops(h) + 2 * (2 * h ** 3)


def cost_model(B, T, Hk, Hv, K, V, *, in_bytes=2, backward=True, kda=False):
    """[(kernel, grid, tensor-core FLOPs, float32 CUDA-core FLOPs, HBM bytes)] for one call.

    kernel: the pallas_call name's stage ("prep", "fwd", "states", "bwd_state", "bwd_dqv",
    "bwd_dk", "bwd_da") or "xla zero-fill" / "xla epilogue"; grid: the launched grid (None for
    XLA). The
    backward rows (prefixed "bwd: ") are the backward program's kernels, prep included.
    """
    C = CHUNK
    NC = -(-T // C)
    f = 4
    lp = in_bytes < 4
    w = in_bytes if lp else 4             # W, U, Vn, dVn, P and the backward's states
    bv = choose_block_v(B, Hv, V, K)
    nvb = V // bv
    bvo = choose_block_v(B, Hv, V, K, output=True)   # the forward pass with the output
    d = lambda m, n, k: 2 * m * n * k  # noqa: E731
    x3 = 3 if lp else 1                    # bf16x3: three tensor-core dots
    out = []

    def add(name, grid, flops16, flops32, byts):
        progs = 1
        for x in grid or (1,):
            progs *= x
        if not lp:  # float32 inputs: every dot is an IEEE float32 dot
            flops32, flops16 = flops32 + flops16, 0
        out.append((name, grid, flops16 * progs, flops32 * progs, byts))

    qk_b = B * T * Hk * K * in_bytes       # q or k
    v_b = B * T * Hv * V * in_bytes        # v, o, dO, dv
    vw_b = B * T * Hv * V * w              # U, Vn, dVn
    kw_b = B * T * Hv * K * w              # W
    g_b = B * T * Hv * 4 * (K if kda else 1)
    b_b = B * T * Hv * 4
    c_b = B * T * Hv * C * 4               # a [.., C] float32 per-chunk matrix (Tm, X, dA, A/beta)
    p_b = B * T * Hv * C * w if kda else 0  # KDA: P
    st_b = B * Hv * K * V * f
    hs_b = B * Hv * NC * K * V * w
    b_, tp, hk, kk = acc_shape(B, T, Hk, K)
    acc_b = b_ * tp * hk * kk * f // 2      # a half (dq or dk) of the atomic-add buffer
    # prep: A (KDA: the sub-block pairs of k and q), the inverse, W, U
    pair16 = 6 * d(C, C, K) if kda else d(C, C, K)
    diag32 = SUB * 22 * C * K if kda else 0
    prep16 = pair16 + d(C, C, K) + d(C, C, V)
    prep32 = _inv_flops(C) + diag32
    prep_b = qk_b * (2 if kda else 1) + v_b + g_b + b_b + kw_b + vw_b + p_b
    add("prep", (B, Hv, NC), prep16, prep32, prep_b)
    qk_fwd = 0 if kda else d(C, C, K)      # q k^T inside the state passes (KDA: P from prep)
    add("fwd", (B, Hv, V // bvo),
        NC * (d(C, K, bvo) + qk_fwd + d(C, K, bvo) + d(C, C, bvo) + d(K, C, bvo)), 0,
        2 * qk_b + g_b + kw_b + vw_b + v_b + 2 * st_b + p_b)
    if not backward:
        return out
    add("bwd: prep", (B, Hv, NC), prep16, prep32, prep_b + c_b)
    add("bwd: states", (B, Hv, nvb), NC * (d(C, K, bv) + d(K, C, bv)), 0,
        qk_b + g_b + kw_b + vw_b + st_b + hs_b + vw_b)
    add("bwd: bwd_state", (B, Hv, nvb),
        NC * (qk_fwd + d(C, C, bv) + d(C, K, bv) + 2 * d(K, C, bv)), 0,
        2 * qk_b + g_b + kw_b + v_b + st_b + hs_b + st_b + vw_b + p_b)
    # XLA: the zero fill of the float32 [B, T + C, Hk, 2K] buffer the kernels add dq, dk into
    add("bwd: xla zero-fill", None, 0, 0, 2 * acc_b)
    # kernel 1: dP, dOS over V, dv = beta Tm^T dVn (bf16x3); dq, P's terms of dk (added into
    # both halves of the buffer), dG
    # KDA: the gradient kernels work in key windows (`key_window`); each window of kernel 1
    # reads dO again (its V loop over the window's state rows), each of kernel 2 reads dVn
    # and Vn again (its two V loops); the states are read once, a window's rows each
    nw1 = K // key_window(K, "dqv") if kda else 1
    nw2 = K // key_window(K, "dk") if kda else 1
    pairs_bwd = (2 * 3 * d(C, C, K), SUB * 15 * C * K) if kda else (3 * d(C, C, K), 0)
    add("bwd: bwd_dqv", (B, Hv, NC),
        d(C, C, V) + d(C, K, V) + x3 * d(C, C, V) + pairs_bwd[0], pairs_bwd[1],
        2 * qk_b + g_b + b_b + nw1 * v_b + 2 * vw_b + hs_b + c_b
        + 2 * 2 * acc_b + v_b + g_b)
    # kernel 2: dKd, dW, X = dVn v^T over V; dT, dA, dbK (bf16x3); KDA: dg's masked dot
    add("bwd: bwd_dk", (B, Hv, NC),
        2 * d(C, K, V) + d(C, C, V) + x3 * (d(C, C, K) + 2 * d(C, C, C) + d(C, C, K)
                                            + (d(C, C, K) if kda else 0)), 0,
        qk_b + g_b + b_b + v_b + 2 * nw2 * vw_b + 2 * hs_b + c_b + g_b
        + 2 * acc_b + c_b + b_b + g_b)
    # kernel 3: A's terms (GDA: k k^T, dKK k, dKK^T k; KDA: the sub-block pairs' cotangents)
    da16 = (x3 * (2 * 3 * d(C, C, K) + d(C, C, K))) if kda else d(C, C, K) + x3 * 2 * d(C, C, K)
    add("bwd: bwd_da", (B, Hv, NC), da16, SUB * 15 * C * K if kda else 0,
        qk_b + g_b + b_b + c_b + b_b + g_b
        + 2 * acc_b + b_b + g_b)
    # XLA epilogue: the l2norm Jacobian of dq, dk [B, T, Hk, K] (float32 in, q and k read),
    # casts to the input dtypes (dg's clamp mask and the dg, dbeta dtypes are kernel 3's)
    kk_b = B * T * Hk * K * f
    add("bwd: xla epilogue", None, 0, 0, 2 * kk_b + 2 * qk_b + 2 * qk_b)
    return out


def predicted_times(rows, *, tc_flops=990e12, f32_flops=67e12, bw=3.35e12):
    """Per kernel: max(bytes / bandwidth, tensor-core time + CUDA-core time), in seconds."""
    return [(name, max(b / bw, f16 / tc_flops + f32 / f32_flops)) for name, _, f16, f32, b in rows]


def totals(rows):
    """(forward seconds, backward seconds) of `cost_model` rows by `predicted_times`."""
    times = predicted_times(rows)
    fwd = sum(t for n, t in times if not n.startswith("bwd"))
    return fwd, sum(t for n, t in times if n.startswith("bwd"))


if __name__ == "__main__":
    for label, shape, kda in (
            ("B=1 T=8192 Hk=16 Hv=32 K=V=128 bf16", (1, 8192, 16, 32, 128, 128), False),
            ("B=1 T=8192 Hk=16 Hv=64 K=V=128 bf16", (1, 8192, 16, 64, 128, 128), False),
            ("KDA B=1 T=8192 Hk=16 Hv=32 K=V=128 bf16", (1, 8192, 16, 32, 128, 128), True)):
        rows = cost_model(*shape, kda=kda)
        fwd, bwd = totals(rows)
        print(f"\n{label}: forward {fwd * 1e6:.0f} us, backward {bwd * 1e6:.0f} us (predicted)")
        for (name, grid, f16, f32, b), (_, t) in zip(rows, predicted_times(rows)):
            print(f"  {name:22s} grid={grid} TC {f16 / 1e9:7.1f} GF  f32 {f32 / 1e9:6.2f} GF  "
                  f"{b / 1e6:6.0f} MB  {t * 1e6:6.0f} us")
