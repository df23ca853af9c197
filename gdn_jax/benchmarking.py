"""Timing helpers shared by the benchmark script, the demo (`python -m gdn_jax`) and the notebook.

Times are medians of repeated calls after a warm-up (compile timed separately); the machines
are shared and noisy, so compare implementations side by side in one run and read ratios.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Shape(NamedTuple):
    B: int
    T: int
    Hk: int
    Hv: int
    K: int
    V: int
    kda: bool = False

    def __str__(self) -> str:
        return (f"{'KDA' if self.kda else 'GDA'} B={self.B} T={self.T} Hk={self.Hk} Hv={self.Hv} "
                f"K={self.K} V={self.V}")


def make_inputs(shape: Shape, dtype=jnp.float32, seed: int = 0, with_state: bool = True):
    """Model-like random inputs: raw q/k (use l2norm), sigmoid beta, gates in about [-1.5, 0]."""
    B, T, Hk, Hv, K, V, kda = shape
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hk, K), dtype)
    k = jax.random.normal(ks[1], (B, T, Hk, K), dtype)
    v = jax.random.normal(ks[2], (B, T, Hv, V), dtype)
    gshape = (B, T, Hv, K) if kda else (B, T, Hv)
    g = -jax.nn.softplus(jax.random.normal(ks[3], gshape, jnp.float32)) * 0.5
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv), jnp.float32)).astype(dtype)
    h0 = jax.random.normal(ks[5], (B, Hv, K, V), jnp.float32) * 0.1 if with_state else None
    return (q, k, v, g, beta), h0


def yardstick_scan(q, k, v, g, beta, h0, *, scale: float):
    """The fixed yardstick of the benchmarks: a plain `lax.scan` with q/k repeated to Hv heads.

    Kept exactly so (decay, einsum S.k, rank-1 update, einsum S.q) so that ratios against it
    mean the same thing from run to run. GDA only.
    """
    group = v.shape[2] // q.shape[2]
    q = jnp.repeat(q, group, axis=2)
    k = jnp.repeat(k, group, axis=2)

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t = xs
        S = S * jnp.exp(g_t)[..., None, None]
        kv = jnp.einsum("bhkv,bhk->bhv", S, k_t)
        u = b_t[..., None] * (v_t - kv)
        S = S + k_t[..., :, None] * u[..., None, :]
        o_t = jnp.einsum("bhkv,bhk->bhv", S, q_t * scale)
        return S, o_t

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    S, o = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(o, 0, 1), S


def block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


class Timing(NamedTuple):
    compile_s: float
    median_ms: float
    min_ms: float
    cores: float = float("nan")  # process CPU time / wall time over the timed calls


def time_jitted(fn: Callable, *args, reps: int = 5, min_time_s: float = 0.0,
                fresh_args: Callable | None = None) -> Timing:
    """Compiles `fn` (already jitted) for `args`, then times `reps` calls.

    fresh_args: called before each timed call to make new arguments (for donated buffers);
    its own time is not counted.
    """
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    block(compiled(*(fresh_args() if fresh_args else args)))  # warm-up
    times, cpu = [], 0.0
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time_s:
        a = block(fresh_args()) if fresh_args else args  # async dispatch: finish it before timing
        c0, t0 = time.process_time(), time.perf_counter()
        block(compiled(*a))
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    return Timing(compile_s, 1e3 * float(np.median(times)), 1e3 * float(np.min(times)),
                  cpu / sum(times))


def time_decode_loops(jobs, reps: int = 20, min_time_s: float = 0.0,
                      state_out: int = 1) -> list[Timing]:
    """Times decode loops side by side: each job is `(fn, args)`, fn jitted with its last
    argument a donated state; each call gets the state its previous call returned
    (`fn(...)[state_out]`), as a serving loop does, so every call updates one buffer in place.
    The jobs' calls alternate (one call of each per round), so load on the machine falls on
    all of them alike and their ratios are read within one run.
    """
    compiled, states, compile_s = [], [], []
    for fn, args in jobs:
        t0 = time.perf_counter()
        compiled.append(fn.lower(*args).compile())
        compile_s.append(time.perf_counter() - t0)
        state = block(args[-1] + 0)  # a private copy to donate
        states.append(block(compiled[-1](*args[:-1], state))[state_out])  # warm-up
    times, cpu = [[] for _ in jobs], [0.0 for _ in jobs]
    start = time.perf_counter()
    while len(times[0]) < reps or time.perf_counter() - start < min_time_s:
        for j, (_, args) in enumerate(jobs):
            c0, t0 = time.process_time(), time.perf_counter()
            out = block(compiled[j](*args[:-1], states[j]))
            times[j].append(time.perf_counter() - t0)
            cpu[j] += time.process_time() - c0
            states[j] = out[state_out]
    return [Timing(c, 1e3 * float(np.median(t)), 1e3 * float(np.min(t)), u / sum(t))
            for c, t, u in zip(compile_s, times, cpu)]


def copy_time_ms(nbytes: int, reps: int = 20) -> Timing:
    """Time of `np.copyto` of `nbytes`: one read and one write, the decode floor."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return Timing(0.0, 1e3 * float(np.median(times)), 1e3 * float(np.min(times)))


class Progress:
    """A minimal progress bar on stderr (no dependency): `with Progress(n) as p: p.step(label)`."""

    def __init__(self, total: int, width: int = 28, stream=sys.stderr):
        self.total, self.done, self.width, self.stream = total, 0, width, stream
        self.t0 = time.perf_counter()

    def step(self, label: str = "") -> None:
        self.done += 1
        self.show(label)

    def show(self, label: str = "") -> None:
        frac = self.done / max(self.total, 1)
        bar = "#" * int(frac * self.width)
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r[{bar:<{self.width}}] {self.done}/{self.total} {elapsed:6.1f}s {label[:48]:<48}")
        self.stream.flush()

    def __enter__(self):
        self.show("starting")
        return self

    def __exit__(self, *exc):
        self.stream.write("\n")
        self.stream.flush()


def table(rows: list[list], header: list[str]) -> str:
    """A plain text table with right-aligned numeric columns."""
    cells = [[str(h) for h in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
