"""`python -m gdn_jax`: a demonstration on the default device.

Runs a Qwen3.5-shaped call (B=1, T=2048, Hk=16, Hv=32, K=V=128, bf16 inputs) forward and
backward through `impl="auto"`, checks it against the scan reference on a slice of heads
(heads are independent, so the slice is an exact check of the full-size result), and prints
a table of times per impl and the errors.
"""
from __future__ import annotations

import argparse
import os
import sys

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"  # the optional CUDA plugin would look for a GPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gdn_jax import RECURRENT_MAX_T, gated_delta_net  # noqa: E402
from gdn_jax.benchmarking import Progress, Shape, make_inputs, table, time_jitted  # noqa: E402

BF16_TOL = (1e-2, 2e-2)  # docs/spec.md section 4.2: outputs, gradients


def _fns(impl):
    def fwd(q, k, v, g, beta, h0):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, impl=impl)

    def fwd_bwd(q, k, v, g, beta, h0, do, dh):
        (o, s), vjp = jax.vjp(fwd, q, k, v, g, beta, h0)
        return (o, s), vjp((do, dh))

    return jax.jit(fwd), jax.jit(fwd_bwd)


def _rel(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=2048, help="tokens (default 2048)")
    ap.add_argument("--slice-heads", type=int, default=2, help="q/k heads in the reference check")
    args = ap.parse_args(argv)
    shape = Shape(1, args.T, 16, 32, 128, 128, False)
    group = shape.Hv // shape.Hk
    print(f"gdn_jax demo on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print(f"Qwen3.5-shaped call: {shape}, bf16 inputs, l2norm on, float32 state; "
          f"impl='auto' picks {'recurrent' if shape.T <= RECURRENT_MAX_T else 'chunked'} at this T")
    (q, k, v, g, beta), h0 = make_inputs(shape, jnp.bfloat16)
    rng = np.random.default_rng(1)
    do = jnp.asarray(rng.standard_normal((1, shape.T, shape.Hv, shape.V)), jnp.bfloat16)
    dh = jnp.asarray(rng.standard_normal(h0.shape), jnp.float32)
    full = (q, k, v, g, beta, h0)

    # The reference check: q/k heads [0, hs) and their value heads, on the same inputs.
    hs = args.slice_heads
    hv = hs * group
    sl = (q[:, :, :hs], k[:, :, :hs], v[:, :, :hv], g[:, :, :hv], beta[:, :, :hv], h0[:, :hv])

    rows, results = [], {}
    jobs = [("auto", full, "full"), ("recurrent", full, "full"),
            ("reference", sl, f"{hs}/{shape.Hk} q/k heads")]
    with Progress(2 * len(jobs)) as p:
        for impl, a, what in jobs:
            fwd, fwd_bwd = _fns(impl)
            tf = time_jitted(fwd, *a, reps=3)
            p.step(f"{impl}: forward")
            cot = (do[:, :, :a[2].shape[2]], dh[:, :a[2].shape[2]])
            tb = time_jitted(fwd_bwd, *a, *cot, reps=2)
            p.step(f"{impl}: forward + backward")
            results[impl] = fwd_bwd(*a, *cot)
            rows.append([impl, what, tf.median_ms, tb.median_ms, tf.compile_s + tb.compile_s])
    print(table(rows, ["impl", "problem", "fwd ms", "fwd+bwd ms", "compile s"]))

    (o_ref, s_ref), g_ref = results["reference"]
    (o, s), grads = results["auto"]
    take = (lambda x: x[:, :, :hs], lambda x: x[:, :, :hs], lambda x: x[:, :, :hv],
            lambda x: x[:, :, :hv], lambda x: x[:, :, :hv], lambda x: x[:, :hv])
    errs = [("o", _rel(o[:, :, :hv], o_ref), BF16_TOL[0]),
            ("final_state", _rel(s[:, :hv], s_ref), BF16_TOL[0])]
    for name, t, gx, gr in zip(("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"), take, grads, g_ref):
        errs.append((name, _rel(t(gx), gr), BF16_TOL[1]))
    print(f"\nimpl='auto' against the float32 scan reference on q/k heads 0..{hs - 1} "
          f"(value heads 0..{hv - 1}), relative error ||x - ref|| / ||ref||:")
    print(table([[n, f"{e:.2e}", f"{tol:.0e}", "ok" if e <= tol else "FAIL"] for n, e, tol in errs],
                ["output", "rel err", "tolerance", ""]))
    ok = all(e <= tol for _, e, tol in errs)
    print("all within the tolerances of docs/spec.md" if ok else "SOME ERRORS EXCEED THE TOLERANCES OF docs/spec.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
