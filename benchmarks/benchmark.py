"""Times every impl and backend of gdn_jax on prefill and decode shapes; prints tables of ms and ratios.

    python benchmarks/benchmark.py                       # all sections, plot to benchmark_sweep.png
    python benchmarks/benchmark.py --sections decode     # one section
    python benchmarks/benchmark.py --quick               # fewer repetitions, smaller sweep

Sections:
  prefill  B=1, T=2048, Hk=16, Hv=32, K=V=128, float32: forward and forward+backward of each XLA path
           against the fixed `lax.scan` yardstick (gdn_jax.benchmarking.yardstick_scan); compile times;
           KDA / GDA per path; cores busy; the chunked path again with value heads split over one
           CPU device per usable core (the script sets XLA_FLAGS; `taskset` narrows the cores).
  decode   B=32, Hk=16, Hv=32, K=V=128, T=1, state donated: one jitted step against `np.copyto` of the
           64 MiB state (the floor: the state must be read and written once); the recurrent path
           also with value heads split over the CPU devices.
  pools    decode into a state pool stored as float32, bfloat16 and float16 at B = 1, 32, 256:
           time against the bytes of the states touched, 16-bit / float32 ratios.
  sweep    time against T (B=1, Hv=32, K=V=128) for reference, recurrent and chunked: the break-even
           T that `impl="auto"` uses; saves a PNG plot when matplotlib is installed.
  packed   16 sequences of mixed lengths (8192 tokens) packed with cu_seqlens against the same
           sequences padded to the longest (B=16), XLA chunked, forward and forward+backward; plus
           the Pallas kernels on a small packed case in interpret mode (numerics only).
  pallas   the Pallas kernels in interpret mode at a moderate size (a few MiB of state): numerics
           against the reference and interpret-mode time (not a GPU time: no GPU here).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"
# One CPU device per core this process may use (taskset narrows it), for the rows that split
# heads over host devices (`gdn_jax.sharding.cpu_mesh`); the one-device rows are unaffected.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
HV = 32  # value heads of the prefill and decode shapes
# the head split needs the device count to divide HV: the largest such count <= CORES
_DEVICES = max(d for d in range(1, CORES + 1) if HV % d == 0)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gdn_jax import gated_delta_net, sharded_gated_delta_net  # noqa: E402
from gdn_jax.sharding import cpu_mesh, partition_specs  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from gdn_jax.benchmarking import (Progress, Shape, copy_time_ms, make_inputs, table,  # noqa: E402
                                  time_decode_loops, time_jitted, yardstick_scan)


NDEV = len(jax.devices("cpu")) if jax.default_backend() == "cpu" else 1
if HV % NDEV:  # XLA_FLAGS set by the caller to a count that does not divide HV
    NDEV = 1


def _op(impl, backend="xla", interpret=False, donate=False, state_layout="kv"):
    def fn(q, k, v, g, beta, h0):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, impl=impl, backend=backend,
                               interpret=interpret, state_layout=state_layout)
    return jax.jit(fn, donate_argnums=(5,) if donate else ())


def _sharded_op(impl, donate=False, state_layout="kv"):
    """The op with value heads split over the CPU devices (`cpu_mesh`)."""
    mesh = cpu_mesh()

    def fn(q, k, v, g, beta, h0):
        return sharded_gated_delta_net(q, k, v, g, beta, mesh=mesh, head_axis="heads",
                                       initial_state=h0, output_final_state=True,
                                       use_qk_l2norm_in_kernel=True, impl=impl,
                                       backend="xla", state_layout=state_layout)
    return jax.jit(fn, donate_argnums=(5,) if donate else ())


def _place_heads(args, kda: bool):
    """q, k, v, g, beta, h0 placed as the head-split op takes them (nothing moves per call)."""
    mesh = cpu_mesh()
    sp = partition_specs(head_axis="heads", kda=kda)
    return tuple(jax.device_put(x, NamedSharding(mesh, s))
                 for x, s in zip(args, (sp.q, sp.k, sp.v, sp.g, sp.beta, sp.state)))


def _fwd_bwd(fn):
    """Forward and backward: gradients of all inputs under a fixed random cotangent."""
    def loss(*a):
        o, s = fn(*a)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * 0.01)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))


def prefill(reps: int, modes=("GDA", "KDA")):
    rows = []
    shapes = [Shape(1, 2048, 16, 32, 128, 128, m == "KDA") for m in ("GDA", "KDA") if m in modes]
    scale = 128 ** -0.5
    jobs = []
    for shape in shapes:
        args, h0 = make_inputs(shape)
        if not shape.kda:
            # the yardstick takes l2-normalised q/k like the op does with use_qk_l2norm_in_kernel
            from gdn_jax._common import l2norm
            ya = (l2norm(args[0]), l2norm(args[1])) + args[2:]
            jobs.append((shape, "yardstick scan", jax.jit(functools.partial(yardstick_scan, scale=scale)),
                         ya + (h0,), None))
        for impl in ("recurrent", "chunked"):
            jobs.append((shape, f"{impl} (xla)", _op(impl), args + (h0,), _fwd_bwd(_op(impl))))
        if NDEV > 1:
            jobs.append((shape, f"chunked (xla), heads / {NDEV} devices", _sharded_op("chunked"),
                         _place_heads(args + (h0,), shape.kda), _fwd_bwd(_sharded_op("chunked"))))
    results = {}
    with Progress(len(jobs)) as p:
        for shape, name, fwd, a, bwd in jobs:
            t = time_jitted(fwd, *a, reps=reps)
            tb = time_jitted(bwd, *a, reps=max(2, reps // 2)) if bwd is not None else None
            results[(shape.kda, name)] = (t, tb)
            p.step(f"{shape.kda and 'KDA' or 'GDA'} {name}")
    base = results[(False, "yardstick scan")][0].median_ms if "GDA" in modes else float("nan")
    for (kda, name), (t, tb) in results.items():
        gda = results.get((False, name), (None,))[0]
        rows.append(["KDA" if kda else "GDA", name, t.median_ms, f"{base / t.median_ms:.2f}x",
                     f"{t.median_ms / gda.median_ms:.2f}x" if gda else "-", f"{t.cores:.2f}",
                     tb.median_ms if tb else "-", t.compile_s, tb.compile_s if tb else "-"])
    print(f"\nPrefill {shapes[0]} (float32, l2norm on); ratio = yardstick time / path time (higher "
          "is faster); vs GDA = KDA time / GDA time of the same path; cores busy = process CPU "
          f"time / wall time of the timed forward calls ({CORES} cores); 'heads / n devices': "
          "value heads split over n CPU devices (gdn_jax.sharding.cpu_mesh)")
    print(table(rows, ["mode", "path", "fwd ms", "vs yardstick", "vs GDA", "cores busy",
                       "fwd+bwd ms", "fwd compile s", "fwd+bwd compile s"]))
    return results


def decode(reps: int, modes=("GDA", "KDA")):
    shape = Shape(32, 1, 16, 32, 128, 128, False)
    _, h0 = make_inputs(shape)
    nbytes = h0.size * 4
    copy = copy_time_ms(nbytes, reps=50)
    rows = []
    # Both state layouts of a path run as alternating decode loops, so "vk" / "kv" is read
    # within one run under the same load.
    impls = ("recurrent", "chunked")

    def add_rows(mode, name, kv, vk):  # one path's two layouts, against the copy and "kv"
        for layout, t in (("kv", kv), ("vk", vk)):
            rows.append([mode, name, layout, t.median_ms, t.min_ms,
                         f"{t.median_ms / copy.median_ms:.2f}x", f"{t.min_ms / copy.min_ms:.2f}x",
                         f"{t.median_ms / kv.median_ms:.2f}x", f"{t.cores:.2f}"])

    with Progress((len(impls) + (NDEV > 1)) * len(modes)) as p:
        for kda in (False, True):
            mode = "KDA" if kda else "GDA"
            if mode not in modes:
                continue
            a, h = make_inputs(shape._replace(kda=kda))
            for impl in impls:
                jobs = [(_op(impl, donate=True, state_layout=layout),
                         (*a, h if layout == "kv" else jnp.swapaxes(h, -1, -2) + 0.0))
                        for layout in ("kv", "vk")]
                add_rows(mode, f"{impl} (xla)", *time_decode_loops(jobs, reps=reps, min_time_s=1.0))
                p.step(f"{mode} {impl}")
            if NDEV > 1:
                name = f"recurrent (xla), heads / {NDEV} devices"
                jobs = [(_sharded_op("recurrent", donate=True, state_layout=layout),
                         _place_heads((*a, h if layout == "kv" else jnp.swapaxes(h, -1, -2) + 0.0),
                                      kda)) for layout in ("kv", "vk")]
                add_rows(mode, name, *time_decode_loops(jobs, reps=reps, min_time_s=1.0))
                p.step(f"{mode} {name}")
    print(f"\nDecode step {shape}, float32, state donated ({nbytes / 2**20:.0f} MiB), each call "
          f"given the state the previous call returned; np.copyto of the state: median "
          f"{copy.median_ms:.2f} ms, best {copy.min_ms:.2f} ms")
    print(table(rows, ["mode", "path", "layout", "median ms", "best ms", "median / copy",
                       "best / best copy", "vk / kv (median)", "cores busy"]))


def pools(reps: int, batches=(1, 32, 256)):
    """Decode into a state pool (2B slots, B read and written per step) stored as float32,
    bfloat16 and float16: time against the bytes of the states the step touches."""
    rows = []
    with Progress(2 * len(batches)) as p:
        for B in batches:
            for kda in (False, True):
                shape = Shape(B, 1, 16, 32, 128, 128, kda)
                a, h = make_inputs(shape)
                P = 2 * B
                pool = jnp.concatenate([h, h[::-1]], axis=0)
                idx = jnp.asarray(np.random.default_rng(0).permutation(P)[:B], jnp.int32)

                def op(q, k, v, g, beta, pool):
                    return gated_delta_net(q, k, v, g, beta, initial_state=pool,
                                           state_indices=idx, output_final_state=True,
                                           use_qk_l2norm_in_kernel=True, impl="recurrent",
                                           backend="xla")
                fn = jax.jit(op, donate_argnums=(5,))
                jobs = [(fn, (*a, pool.astype(dt)))
                        for dt in (jnp.float32, jnp.bfloat16, jnp.float16)]
                f32, b16, f16 = time_decode_loops(jobs, reps=reps, min_time_s=1.0)
                for name, t, nbytes in (("float32", f32, 4), ("bfloat16", b16, 2),
                                        ("float16", f16, 2)):
                    mib = h.size * nbytes / 2**20  # the B states read and written per step
                    rows.append(["KDA" if kda else "GDA", B, name, f"{mib:.0f}", t.median_ms,
                                 t.min_ms, f"{2 * mib / 1024 / (t.median_ms / 1e3):.1f}",
                                 f"{t.median_ms / f32.median_ms:.2f}x"])
                p.step(f"B={B} {'KDA' if kda else 'GDA'}")
    print("\nDecode into a state pool (XLA recurrent, T=1, Hk=16, Hv=32, K=V=128, 2B slots, B "
          "read and written, pool donated); GB/s counts one read and one write of the B states")
    print(table(rows, ["mode", "B", "pool dtype", "states MiB", "median ms", "best ms",
                       "GB/s (median)", "vs float32 (median)"]))


def sweep(reps: int, quick: bool, plot: str | None):
    Ts = [1, 4, 16, 32, 64, 128, 256] if quick else [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512]
    impls = ["reference", "recurrent", "chunked"]
    times = {impl: [] for impl in impls}
    with Progress(len(Ts) * len(impls)) as p:
        for T in Ts:
            shape = Shape(1, T, 16, 32, 128, 128, False)
            args, h0 = make_inputs(shape)
            for impl in impls:
                times[impl].append(time_jitted(_op(impl), *args, h0, reps=reps).median_ms)
                p.step(f"T={T} {impl}")
    rows = [[T] + [times[i][n] for i in impls] + [f"{times['chunked'][n] / times['recurrent'][n]:.2f}"]
            for n, T in enumerate(Ts)]
    print("\nForward time against T, GDA, B=1, Hk=16, Hv=32, K=V=128, float32 (ms)")
    print(table(rows, ["T"] + impls + ["chunked / recurrent"]))
    faster = [T for n, T in enumerate(Ts) if times["recurrent"][n] <= times["chunked"][n]]
    print(f"recurrent is at least as fast as chunked for T in {faster}")
    if plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib not installed: no plot)")
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in impls:
            ax.loglog(Ts, times[impl], "o-", label=f"{impl} (xla)")
        ax.set_xlabel("T (tokens per call)")
        ax.set_ylabel("forward time (ms)")
        ax.set_title(f"gdn_jax on {jax.devices()[0].platform}: GDA, B=1, Hv=32, K=V=128")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"plot saved to {plot}")


def pallas(reps: int):
    from gdn_jax.reference import reference_gated_delta_net
    shape = Shape(4, 16, 4, 16, 128, 128, False)  # 4 MiB of state, 512 programs
    rows = []
    impls = [("recurrent", s) for s in (shape, shape._replace(kda=True))]
    with Progress(len(impls)) as p:
        for impl, s in impls:
            args, h0 = make_inputs(s)
            fn = _op(impl, backend="pallas", interpret=True)
            assert "pallas_call" in str(jax.make_jaxpr(fn)(*args, h0))
            t = time_jitted(fn, *args, h0, reps=max(2, reps // 2))
            o, st = fn(*args, h0)
            o_ref, st_ref = reference_gated_delta_net(*args, h0, scale=128 ** -0.5, use_qk_l2norm=True)
            err = float(jnp.linalg.norm(o - o_ref) / jnp.linalg.norm(o_ref))
            err_s = float(jnp.linalg.norm(st - st_ref) / jnp.linalg.norm(st_ref))
            rows.append(["KDA" if s.kda else "GDA", f"{impl} (pallas, interpret)", t.median_ms,
                         f"{err:.1e}", f"{err_s:.1e}"])
            p.step(f"{impl} {'KDA' if s.kda else 'GDA'}")
    print(f"\nPallas kernels in interpret mode, {shape} (interpret-mode time, not a GPU time)")
    print(table(rows, ["mode", "path", "ms", "o rel err", "state rel err"]))


PACKED_LENGTHS = [1536, 1024, 900, 800, 700, 600, 500, 450, 400, 350, 300, 200, 150, 100, 50, 132]


def packed(reps: int, modes=("GDA", "KDA")):
    """Packed (cu_seqlens) against padded-to-the-longest, same sequences, same answers."""
    lens = PACKED_LENGTHS
    T, N, L = sum(lens), len(lens), max(lens)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    starts = np.concatenate([[0], np.cumsum(lens)])
    rows = []

    def packed_fn(q, k, v, g, beta, h0, cu):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu,
                               output_final_state=True, use_qk_l2norm_in_kernel=True,
                               impl="chunked", backend="xla")

    def padded_fn(q, k, v, g, beta, h0):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, impl="chunked", backend="xla")

    def pad(x):  # [1, T, ...] -> [N, L, ...], padded at the front with identity tokens (zeros)
        return jnp.stack([jnp.pad(x[0, starts[n]:starts[n + 1]],
                                  [(L - lens[n], 0)] + [(0, 0)] * (x.ndim - 2)) for n in range(N)])

    jobs = [m for m in ("GDA", "KDA") if m in modes]
    with Progress(4 * len(jobs)) as p:
        for mode in jobs:
            shape = Shape(1, T, 16, 32, 128, 128, mode == "KDA")
            args, _ = make_inputs(shape)
            h0 = jnp.asarray(np.random.default_rng(1).standard_normal((N, 32, 128, 128)) * 0.1, jnp.float32)
            padded_args = tuple(pad(x) for x in args)
            f_packed = jax.jit(packed_fn)
            f_padded = jax.jit(padded_fn)
            t_packed = time_jitted(f_packed, *args, h0, cu, reps=reps)
            p.step(f"{mode} packed fwd")
            t_padded = time_jitted(f_padded, *padded_args, h0, reps=reps)
            p.step(f"{mode} padded fwd")

            def grads(fn):
                def loss(*a):
                    o, s = fn(*a)
                    return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * 0.01)
                return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
            tb_packed = time_jitted(grads(packed_fn), *args, h0, cu, reps=max(2, reps // 2))
            p.step(f"{mode} packed fwd+bwd")
            tb_padded = time_jitted(grads(padded_fn), *padded_args, h0, reps=max(2, reps // 2))
            p.step(f"{mode} padded fwd+bwd")
            o1, s1 = f_packed(*args, h0, cu)
            o2, s2 = f_padded(*padded_args, h0)
            o2 = jnp.concatenate([o2[n, L - lens[n]:] for n in range(N)])[None]
            diff = max(float(jnp.linalg.norm(o1 - o2) / jnp.linalg.norm(o2)),
                       float(jnp.linalg.norm(s1 - s2) / jnp.linalg.norm(s2)))
            rows.append([mode, f"packed (T={T}, N={N})", t_packed.median_ms, tb_packed.median_ms,
                         t_packed.compile_s, "1.00x", f"{diff:.1e}"])
            rows.append([mode, f"padded (B={N}, T={L})", t_padded.median_ms, tb_padded.median_ms,
                         t_padded.compile_s, f"{t_padded.median_ms / t_packed.median_ms:.2f}x", "-"])
    print(f"\nPacked against padded: {N} sequences, lengths {lens} ({T} tokens; padded: {N * L}), "
          "Hk=16, Hv=32, K=V=128, float32, XLA chunked; ratio = padded fwd / packed fwd")
    print(table(rows, ["mode", "layout", "fwd ms", "fwd+bwd ms", "fwd compile s", "padded/packed",
                       "rel diff"]))
    # The Pallas kernels on a small packed case, interpret mode: numerics only (no GPU here).
    small = [0, 5, 70, 1, 37]
    cu_s = jnp.asarray(np.concatenate([[0], np.cumsum(small)]), jnp.int32)
    rows = []
    for impl in ("recurrent", "chunked"):
        shape = Shape(1, sum(small), 1, 2, 32, 32, False)
        args, _ = make_inputs(shape)
        h0 = jnp.zeros((len(small), 2, 32, 32), jnp.float32)
        outs = {}
        for backend in ("xla", "pallas"):
            outs[backend] = gated_delta_net(*args, initial_state=h0, cu_seqlens=cu_s,
                                            output_final_state=True, impl=impl, backend=backend,
                                            interpret=backend == "pallas")
        err = float(jnp.linalg.norm(outs["pallas"][0] - outs["xla"][0]) / jnp.linalg.norm(outs["xla"][0]))
        rows.append([f"{impl} (pallas, interpret)", f"{err:.1e}"])
    print(f"\nPallas kernels, packed lengths {small}, interpret mode vs XLA (numerics only)")
    print(table(rows, ["path", "o rel err"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", default=["prefill", "decode", "pools", "sweep", "packed",
                                                       "pallas"],
                    choices=["prefill", "decode", "pools", "sweep", "packed", "pallas"])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a shorter sweep")
    ap.add_argument("--modes", nargs="+", default=["GDA", "KDA"], choices=["GDA", "KDA"],
                    help="gate modes for the prefill and decode sections")
    ap.add_argument("--plot", default="benchmark_sweep.png", help="PNG path for the sweep plot ('' for none)")
    args = ap.parse_args(argv)
    reps = 3 if args.quick else 7
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({CORES} cores usable, "
          f"{NDEV} CPU devices)")
    for section in args.sections:
        if section == "prefill":
            prefill(reps, args.modes)
        elif section == "decode":
            decode(reps, args.modes)
        elif section == "pools":
            pools(reps)
        elif section == "sweep":
            sweep(reps, args.quick, args.plot or None)
        elif section == "packed":
            packed(reps, args.modes)
        elif section == "pallas":
            pallas(reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
