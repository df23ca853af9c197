"""Shared test helpers: random inputs, a float64 numpy recurrence, tolerances, pairwise cases."""
from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}

# SPEC section 4: relative errors per path and input dtype (outputs, gradients).
TOL = {
    ("recurrent", "f32"): (1e-5, 1e-5),
    ("chunked", "f32"): (1e-4, 1e-4),
    ("reference", "f32"): (1e-5, 1e-5),
    ("bf16",): (1e-2, 2e-2),
    ("f16",): (5e-3, 1e-2),
}


def tolerance(impl: str, dtype: str) -> tuple[float, float]:
    if dtype == "f32":
        return TOL[(impl, "f32")]
    return TOL[(dtype,)]


class Case(NamedTuple):
    kda: bool = False
    group: int = 1  # Hv // Hk
    T: int = 7
    B: int = 1
    K: int = 16
    V: int = 16
    h0: bool = False
    l2norm: bool = True
    scale: float | None = None
    dtype: str = "f32"
    Hk: int = 1
    gmin: float = -2.0  # per-token gates drawn uniformly from [gmin, 0]

    @property
    def Hv(self) -> int:
        return self.Hk * self.group

    def __str__(self) -> str:
        return (f"{'KDA' if self.kda else 'GDA'}-B{self.B}T{self.T}H{self.Hk}x{self.group}"
                f"-K{self.K}V{self.V}-{self.dtype}{'-h0' if self.h0 else ''}"
                f"{'-l2' if self.l2norm else ''}{'-scale' if self.scale else ''}")


def make_inputs(case: Case, seed: int = 0):
    """Random inputs for `case`; keys are unit-norm-ish so raw keys stay contractive."""
    rng = np.random.default_rng(seed)
    B, T, Hk, Hv, K, V = case.B, case.T, case.Hk, case.Hv, case.K, case.V
    dt = DTYPES[case.dtype]
    q = rng.standard_normal((B, T, Hk, K))
    k = rng.standard_normal((B, T, Hk, K))
    if not case.l2norm:  # keep beta * ||k||^2 <= 2 so the true recurrence is bounded
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
        q = q / np.sqrt(K)
    v = rng.standard_normal((B, T, Hv, V))
    gshape = (B, T, Hv, K) if case.kda else (B, T, Hv)
    g = rng.uniform(case.gmin, 0.0, gshape)
    beta = rng.uniform(0.0, 1.0, (B, T, Hv))
    h0 = rng.standard_normal((B, Hv, K, V)) if case.h0 else None
    args = tuple(jnp.asarray(x, dt) for x in (q, k, v))
    args += (jnp.asarray(g, jnp.float32), jnp.asarray(beta, dt))
    return args, (None if h0 is None else jnp.asarray(h0, jnp.float32))


def numpy_reference(q, k, v, g, beta, h0=None, *, scale=None, l2norm=False):
    """The recurrence of SPEC section 1 in float64 numpy, as literally as possible."""
    q, k, v, g, beta = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, g, beta))
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else scale
    if l2norm:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    g = np.maximum(g, -104.0)
    S = np.zeros((B, Hv, K, V)) if h0 is None else np.array(h0, np.float64)
    o = np.zeros((B, T, Hv, V))
    for b in range(B):
        for h in range(Hv):
            hk = h // (Hv // Hk)
            for t in range(T):
                decay = np.exp(g[b, t, h])
                S[b, h] = S[b, h] * (decay[:, None] if g.ndim == 4 else decay)
                u = beta[b, t, h] * (v[b, t, h] - S[b, h].T @ k[b, t, hk])
                S[b, h] += np.outer(k[b, t, hk], u)
                o[b, t, h] = S[b, h].T @ (scale * q[b, t, hk])
    return o, S


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(x - ref)
    return float(num / denom) if denom > 0 else float(num)


def pairwise(axes: dict[str, list], tries: int = 30, seed: int = 0) -> list[dict]:
    """A small deterministic covering array: every pair of values of any two axes appears.

    Greedy (AETG-style): each new row is the best of `tries` random completions of the
    first uncovered pair.
    """
    names = list(axes)
    pairs = list(itertools.combinations(names, 2))
    uncovered = {(a, va, b, vb) for a, b in pairs for va in axes[a] for vb in axes[b]}
    rng = np.random.default_rng(seed)
    rows = []
    while uncovered:
        a, va, b, vb = min(uncovered, key=repr)
        best, best_gain = None, -1
        for _ in range(tries):
            row = {a: va, b: vb}
            for n in rng.permutation(names):
                if n in row:
                    continue
                def gain(val, n=n):
                    trial = {**row, n: val}
                    return sum((x, trial[x], y, trial[y]) in uncovered for x, y in pairs
                               if x in trial and y in trial)
                vals = list(axes[n])
                gains = [gain(v) for v in vals]
                top = max(gains)
                choices = [v for v, gv in zip(vals, gains) if gv == top]
                row[n] = choices[rng.integers(len(choices))]
            row_gain = sum((x, row[x], y, row[y]) in uncovered for x, y in pairs)
            if row_gain > best_gain:
                best, best_gain = row, row_gain
        uncovered -= {(x, best[x], y, best[y]) for x, y in pairs}
        rows.append({n: best[n] for n in names})
    return rows


def vjp_all(fn, args, h0, cotangent_seed: int = 1):
    """Outputs and gradients of all six inputs through jax.vjp with random cotangents.

    `fn(q, k, v, g, beta, h0) -> (o, state)`; h0 None is replaced by zeros so that its
    gradient exists too.
    """
    if h0 is None:
        q, _, v = args[0], args[1], args[2]
        h0 = jnp.zeros((q.shape[0], v.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    (o, s), vjp = jax.vjp(fn, *args, h0)
    rng = np.random.default_rng(cotangent_seed)
    # bf16-representable values, so every input dtype sees exactly the same cotangent
    do = jnp.asarray(rng.standard_normal(o.shape), jnp.bfloat16).astype(o.dtype)
    ds = jnp.asarray(rng.standard_normal(s.shape), jnp.float32)
    return (o, s), vjp((do, ds))
