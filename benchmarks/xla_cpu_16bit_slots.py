"""Why a bfloat16 state pool is slow on XLA CPU: the cost of writing B slots into a pool, in
place, per storage dtype, as plain XLA runs it (no gdn_jax code involved).

    python benchmarks/xla_cpu_16bit_slots.py [--slots 64] [--writes 32]

Each program reads slot i, computes in float32 and writes it back with dynamic_update_slice on a
donated loop carry (what a decode step into a pool does per sequence), for float32, float16 and
bfloat16 pools, plus bfloat16 carried as its uint16 bits (what gdn_jax does: the two whole-pool
bitcasts are copies). XLA CPU widens every bfloat16 dynamic-update-slice to float32 over the
whole operand (float16 and integers it updates in place), so no plain-XLA formulation of a
bfloat16 pool update costs less than one pass over the pool. Rounds alternate between the
variants; medians and ratios to float32 are printed.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HV, K, V = 32, 128, 128


def _updates(dtype, writes, widen, narrow):
    def f(pool):
        def body(i, p):
            blk = jax.lax.dynamic_slice(p, (i, 0, 0, 0), (1, HV, K, V))
            return jax.lax.dynamic_update_slice(p, narrow(widen(blk) * 0.5 + 1.0), (i, 0, 0, 0))
        return jax.lax.fori_loop(0, writes, body, pool)
    return f


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--writes", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    bc = jax.lax.bitcast_convert_type
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    from gdn_jax.recurrent import _bf16_bits, _bf16_widen  # noqa: PLC0415

    def as_bits(f):
        return lambda p: bc(f(bc(p, jnp.uint16)), jnp.bfloat16)

    variants = {
        "float32": (jnp.float32, _updates(jnp.float32, a.writes, f32, lambda x: x)),
        "float16": (jnp.float16, _updates(jnp.float16, a.writes, f32, lambda x: x.astype(jnp.float16))),
        "bfloat16": (jnp.bfloat16, _updates(jnp.bfloat16, a.writes, f32,
                                            lambda x: x.astype(jnp.bfloat16))),
        "bfloat16 as uint16 bits": (jnp.bfloat16, as_bits(_updates(jnp.uint16, a.writes,
                                                                   _bf16_widen, _bf16_bits))),
    }
    shape = (a.slots, HV, K, V)
    progs, pools, times = {}, {}, {n: [] for n in variants}
    for name, (dt, f) in variants.items():
        x = jnp.ones(shape, dt)
        progs[name] = jax.jit(f, donate_argnums=0).lower(x).compile()
        pools[name] = jax.block_until_ready(progs[name](x))
    for _ in range(a.rounds):
        for name in variants:
            t = time.perf_counter()
            pools[name] = jax.block_until_ready(progs[name](pools[name]))
            times[name].append(time.perf_counter() - t)
    mib = a.slots * HV * K * V / 2**20
    print(f"pool [{a.slots}, {HV}, {K}, {V}] ({mib * 4:.0f} MiB float32, {mib * 2:.0f} MiB 16-bit), "
          f"{a.writes} slots written in place; medians of {a.rounds} alternating rounds")
    base = np.median(times["float32"])
    print("| storage | ms | / float32 |\n|---|---|---|")
    for name in variants:
        m = np.median(times[name])
        print(f"| {name} | {1e3 * m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
