"""Context parallel: bytes communicated per device and arithmetic added, at a realistic shape.

Compiles (never runs) the sharded forward+backward for 8 host CPU devices, counts the
collectives in the compiled HLO (`gdn_jax.sharding.collective_stats`) and sets them against
a naive all-gather of the inputs. The arithmetic added by the transitions is counted for the
chunked form (chunk 64) and checked against XLA's cost analysis of the forward where it can.
Wall-clock scaling is not measured: 8 host "devices" share this machine's 2 cores.

    python benchmarks/context_parallel.py [--T 8192] [--heads 32] [--K 128] [--V 128]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from gdn_jax.sharding import collective_stats, partition_specs, sharded_gated_delta_net  # noqa: E402

CHUNK = 64


def chunked_flops_per_token(K: int, V: int, C: int = CHUNK) -> float:
    """Multiply-adds x 2 per token and head of the chunked forward (docs/spec.md section 5, GDA):
    A = beta K K^T, the triangular solve (C^3/3 per chunk), W = Tm(..K), U = Tm(..V), W S,
    Q S, Q K^T, (Q K^T) Vn and the state update."""
    per_chunk = (2 * C * C * K + C ** 3 / 3 + 2 * C * C * K + 2 * C * C * V + 2 * C * K * V
                 + 2 * C * K * V + 2 * C * C * K + 2 * C * C * V + 2 * C * K * V)
    return per_chunk / C


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32, help="value heads Hv")
    ap.add_argument("--qk-heads", type=int, default=16)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--devices", type=int, default=8)
    args = ap.parse_args()
    B, T, Hv, Hk, K, V, n = args.B, args.T, args.heads, args.qk_heads, args.K, args.V, args.devices
    dt = jnp.dtype(args.dtype)
    mesh = jax.make_mesh((n,), ("seq",), devices=jax.devices()[:n])
    specs = partition_specs(seq_axis="seq")
    shapes = [((B, T, Hk, K), dt, specs.q), ((B, T, Hk, K), dt, specs.k), ((B, T, Hv, V), dt, specs.v),
              ((B, T, Hv), jnp.float32, specs.g), ((B, T, Hv), dt, specs.beta),
              ((B, Hv, K, V), jnp.float32, specs.state)]
    sds = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, p)) for s, d, p in shapes]
    cts = [jax.ShapeDtypeStruct((B, T, Hv, V), dt, sharding=NamedSharding(mesh, specs.v)),
           jax.ShapeDtypeStruct((B, Hv, K, V), jnp.float32, sharding=NamedSharding(mesh, specs.state))]

    # The collectives do not depend on the path; the reference path compiles fastest.
    def op(q, k, v, g, beta, h0):
        return sharded_gated_delta_net(q, k, v, g, beta, initial_state=h0, mesh=mesh, seq_axis="seq",
                                       output_final_state=True, use_qk_l2norm_in_kernel=True,
                                       impl="reference")

    def fwd_bwd(q, k, v, g, beta, h0, do, ds):
        out, vjp = jax.vjp(op, q, k, v, g, beta, h0)
        return out, vjp((do, ds))

    fwd = collective_stats(jax.jit(op).lower(*sds).compile().as_text())
    both = collective_stats(jax.jit(fwd_bwd).lower(*sds, *cts).compile().as_text())

    # Bytes each device receives (ring algorithms): all-gather (n-1)/n of its result,
    # reduce-scatter (n-1)/n of its input (= n x its result), all-reduce 2 (n-1)/n.
    def received(stats):
        total = 0.0
        for c in stats:
            f = {"all-gather": (n - 1) / n, "reduce-scatter": (n - 1),
                 "all-reduce": 2 * (n - 1) / n}.get(c.kind, 1.0)
            total += f * c.result_bytes
        return total

    inputs = sum(jnp.dtype(d).itemsize * int(jnp.prod(jnp.array(s))) for s, d, _ in shapes[:5])
    naive_fwd = (n - 1) / n * inputs
    naive_bwd = 2 * naive_fwd  # gather the inputs, reduce-scatter their gradients
    print(f"context parallel over {n} devices: B={B} T={T} (T/device={T // n}) Hv={Hv} Hk={Hk} "
          f"K={K} V={V} inputs {args.dtype}, f32 state\n")
    print("collectives in the compiled programs (per device):")
    for name, stats in (("forward", fwd), ("forward+backward", both)):
        for c in stats:
            print(f"  {name:17s} {c.kind:15s} {','.join(c.shapes):28s} {fmt(c.result_bytes)}")
    print()
    print("| program | bytes received per device | naive all-gather of q,k,v,g,beta | ratio |")
    print("|---|---|---|---|")
    for name, stats, naive in (("forward", fwd, naive_fwd), ("forward+backward", both, naive_bwd)):
        r = received(stats)
        print(f"| {name} | {fmt(r)} | {fmt(naive)} | {r / naive:.4f} |")

    base = chunked_flops_per_token(K, V)
    aug = chunked_flops_per_token(K, K + V) + 2 * K * V  # the V' = K + V run and the correction
    compose = n * 2 * K * K * V  # the exclusive scan, once per head, negligible per token
    print()
    print("arithmetic of the forward per token and head (chunked form, chunk 64):")
    print("| | FLOPs/token/head | vs single device |")
    print("|---|---|---|")
    print(f"| single device (V columns) | {base:,.0f} | 1.00x |")
    print(f"| context parallel: one run with V' = K + V, plus the correction o += S_in^T o_id "
          f"| {aug:,.0f} | {aug / base:.2f}x |")
    rerun = chunked_flops_per_token(K, K + V) + base
    print(f"| (alternative: transition run, then a rerun from the true state) | {rerun:,.0f} | "
          f"{rerun / base:.2f}x |")
    print(f"\nexclusive scan of the transitions: {compose:,} FLOPs per head per device "
          f"({compose / (T // n) / base * 100:.2f}% of the segment's work)")
    print(f"per-device work against one device doing all of T: {aug / base / n:.3f} "
          f"(ideal 1/{n} = {1 / n:.3f})")


if __name__ == "__main__":
    main()
