"""Static cost model of the chunked kernels: FLOPs and HBM bytes per launched kernel from its
grid and blocks, and roofline times (predictions, not measurements)."""
from __future__ import annotations

from ._chunk_ops import CHUNK, SUB, choose_block_v


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
