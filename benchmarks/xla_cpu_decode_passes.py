"""Why the XLA decode step stays above one state copy: its two passes over the state, timed
alone, as plain XLA runs them (no gdn_jax code involved).

    python benchmarks/xla_cpu_decode_passes.py [--rounds 25]

State [B=32, Hv=32, K=128, V=128] float32 (64 MiB), donated, each call given the state the
previous one returned. A decode step must (1) read the state for its matvecs S^T k, S^T q and
(2) update it in place. Printed: every matvec form tried (both state layouts, N = 1..16
vectors, the einsum matrix-vector product) as a pass that only reads the state, the in-place
update pass, and `np.copyto` of the state (one read and one write); medians over alternating
rounds and process CPU time / wall time. XLA CPU runs the dots on one core and the
elementwise update on all of them.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

B, HV, K, V = 32, 32, 128, 128
HIGHEST = jax.lax.Precision.HIGHEST


def _passes():
    rng = np.random.default_rng(0)
    fs = {}
    for n in (1, 2, 4, 8, 16):
        x = jnp.asarray(rng.standard_normal((B, HV, n, K)), jnp.float32)
        fs[f"matvec pass, [N, K] x [K, V] (kv), N={n}"] = (
            lambda S, x=x: (S, jnp.einsum("bhjk,bhkv->bhjv", x, S, precision=HIGHEST)))
        fs[f"matvec pass, [V, K] x [K, N] (vk), N={n}"] = (
            lambda S, x=x: (S, jnp.matmul(S, jnp.swapaxes(x, -1, -2), precision=HIGHEST)))
    x1 = jnp.asarray(rng.standard_normal((B, HV, K)), jnp.float32)
    fs["matvec pass, einsum S^T x (kv)"] = (
        lambda S: (S, jnp.einsum("bhkv,bhk->bhv", S, x1, precision=HIGHEST)))
    u = jnp.asarray(rng.standard_normal((B, HV, V)), jnp.float32)
    fs["update pass in place, a S + k u^T"] = (
        lambda S: (S * 0.999 + x1[..., :, None] * u[..., None, :], None))
    return {name: jax.jit(f, donate_argnums=0) for name, f in fs.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=25)
    args = ap.parse_args(argv)
    h0 = np.random.default_rng(1).standard_normal((B, HV, K, V)).astype(np.float32)
    fs = _passes()
    states = {}
    for name, f in fs.items():
        states[name] = jax.block_until_ready(f(jnp.array(h0))[0])  # compile and warm up
    times = {name: [] for name in fs}
    cpu = {name: 0.0 for name in fs}
    copy = []
    dst = np.empty_like(h0)
    for _ in range(args.rounds):
        for name, f in fs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            states[name] = jax.block_until_ready(f(states[name])[0])
            times[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
        t0 = time.perf_counter()
        np.copyto(dst, h0)
        copy.append(time.perf_counter() - t0)
    c = float(np.median(copy))
    print(f"jax {jax.__version__}, state {B}x{HV}x{K}x{V} float32 (64 MiB); np.copyto median "
          f"{1e3 * c:.2f} ms")
    width = max(len(n) for n in fs)
    print(f"{'pass':<{width}}  median ms  / copy  cores busy")
    for name, t in times.items():
        m = float(np.median(t))
        print(f"{name:<{width}}  {1e3 * m:9.2f}  {m / c:5.2f}x  {cpu[name] / sum(t):10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
