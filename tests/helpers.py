"""The shared test helpers: tolerances from the spec, relative error, input makers (including
weak decay and eps-scale l2norm rows), a float64 numpy recurrence and its VJP, the
`pallas_call`-in-the-program assertion and a small pairwise covering array.

Every test file imports these rather than writing its own, so a tolerance or an oracle is
defined once.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gdn_jax.api import RECURRENT_BWD_MAX_T

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
L2NORM_EPS = 1e-6  # the op's l2norm: x * rsqrt(sum(x**2) + 1e-6)
G_MIN = -104.0  # every path clamps g to this (exp underflows to 0 below it in float32)

# docs/spec.md section 4.2: relative errors per path and input dtype (outputs, gradients). float32
# inputs compare against float64 numpy (or the float32 reference at HIGHEST precision);
# bf16 / f16 inputs compare against the float32 reference on the same rounded inputs,
# whatever the path.
TOL = {
    ("reference", "f32"): (1e-5, 1e-5),
    ("recurrent", "f32"): (1e-5, 1e-5),
    ("chunked", "f32"): (1e-4, 1e-4),
    ("bf16",): (1e-2, 2e-2),
    ("f16",): (5e-3, 1e-2),
}


def _dtype_key(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    return {jnp.dtype(v): k for k, v in DTYPES.items()}[jnp.dtype(dtype)]


def tolerance(impl: str, dtype="f32") -> tuple[float, float]:
    """(output, gradient) tolerance of the path `impl` for inputs of `dtype` (name or dtype)."""
    dtype = _dtype_key(dtype)
    if dtype == "f32":
        return TOL[(impl, "f32")]
    return TOL[(dtype,)]


def backward_path(impl: str, backend: str = "xla", T: int = 1, num_snapshots: int = 0) -> str:
    """The path whose backward serves a call of the public op (gdn_jax/api.py): the XLA
    recurrent impl differentiates itself up to RECURRENT_BWD_MAX_T tokens (or with snapshots)
    and uses the chunked backward above; a Pallas forward is differentiated by the Pallas
    chunked backward (where that kernel supports the call)."""
    if impl != "recurrent" or num_snapshots:
        return impl
    if backend == "pallas":
        return "chunked"
    return "recurrent" if T <= RECURRENT_BWD_MAX_T else "chunked"


def op_tolerance(impl: str, dtype="f32", *, backend: str = "xla", T: int = 1,
                 num_snapshots: int = 0) -> tuple[float, float]:
    """(output, gradient) tolerance of a public-op call: outputs by the forward path, gradients
    by the path whose backward serves the call."""
    tol_out = tolerance(impl, dtype)[0]
    tol_grad = tolerance(backward_path(impl, backend, T, num_snapshots), dtype)[1]
    return tol_out, tol_grad


def rel_err(x, ref) -> float:
    """`||x - ref|| / ||ref||` in float64. A reference of norm below 1e-30 (zero, or a float64
    value float32 cannot hold, e.g. a gradient through exp(-104)) is compared absolutely."""
    x = np.asarray(x) if _is_f64(x) else np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(ref) if _is_f64(ref) else np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _is_f64(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.float64


def assert_close(got: dict, want: dict, tol_out: float, tol_grad: float, what: str = "") -> dict:
    """Relative error of every entry of `got` against `want`; names starting with "d" are
    gradients (tol_grad), others outputs (tol_out). Returns the errors."""
    errs = {n: rel_err(got[n], want[n]) for n in want}
    bad = {n: e for n, e in errs.items()
           if not e <= (tol_grad if n.startswith("d") else tol_out)}
    assert not bad, f"{what}: errors over tolerance {bad} (all: {errs})"
    return errs


def pallas_in_jaxpr(fn, *args) -> bool:
    """True when the traced program of fn(*args) contains a pallas_call (at any depth)."""
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def assert_pallas(fn, *args) -> None:
    """A kernel test's guard against a silent fallback to XLA."""
    assert pallas_in_jaxpr(fn, *args), "no pallas_call in the traced program (silent fallback?)"


def assert_no_pallas(fn, *args) -> None:
    assert not pallas_in_jaxpr(fn, *args), "a pallas_call in the traced program of an XLA path"


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
    weak: bool = False  # weak decay: see weak_gates
    l2edge: bool = False  # some q/k rows of norm ~sqrt(eps) and some exactly zero

    @property
    def Hv(self) -> int:
        return self.Hk * self.group

    def __str__(self) -> str:
        return (f"{'KDA' if self.kda else 'GDA'}-B{self.B}T{self.T}H{self.Hk}x{self.group}"
                f"-K{self.K}V{self.V}-{self.dtype}{'-h0' if self.h0 else ''}"
                f"{'-l2' if self.l2norm else ''}{'-scale' if self.scale else ''}"
                f"{'-weak' if self.weak else ''}{'-l2edge' if self.l2edge else ''}"
                f"{f'-g{self.gmin:g}' if self.gmin != -2.0 and not self.weak else ''}")


def weak_gates(rng, shape_g, shape_beta):
    """Weak decay, so the state carried from chunk to chunk (and its gradients) matters:
    per-token g in [-0.1, 0] (64 tokens decay the state by at least e^-6.4), every third value
    head g = 0 exactly (no decay at all), beta in [0, 1] with every fifth token beta = 1 and
    every seventh beta = 0. Head axis is 2 in both shapes."""
    g = rng.uniform(-0.1, 0.0, shape_g)
    g[:, :, ::3] = 0.0
    beta = rng.uniform(0.0, 1.0, shape_beta)
    beta[:, ::5] = 1.0
    beta[:, 3::7] = 0.0
    return g, beta


def l2edge_rows(x, rng):
    """x `[B, T, H, K]` with some rows of norm ~sqrt(eps) (1e-3: there the l2norm's eps
    changes the result by tens of percent) and some exactly zero."""
    x = np.array(x)
    small = rng.standard_normal(x[:, 1::4].shape)
    small /= np.linalg.norm(small, axis=-1, keepdims=True)
    x[:, 1::4] = small * rng.uniform(0.3e-3, 3e-3, small.shape[:-1] + (1,))
    x[:, 2::9] = 0.0
    return x


def make_inputs(case: Case, seed: int = 0):
    """Random inputs for `case`: ((q, k, v, g, beta), h0 or None); keys are unit-norm-ish so
    raw keys stay contractive. g is float32, the rest in case.dtype (h0 float32)."""
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
    if case.weak:
        g, beta = weak_gates(rng, gshape, (B, T, Hv))
    else:
        g = rng.uniform(case.gmin, 0.0, gshape)
        beta = rng.uniform(0.0, 1.0, (B, T, Hv))
    if case.l2edge:
        q, k = l2edge_rows(q, rng), l2edge_rows(k, rng)
    h0 = rng.standard_normal((B, Hv, K, V)) if case.h0 else None
    args = tuple(jnp.asarray(x, dt) for x in (q, k, v))
    args += (jnp.asarray(g, jnp.float32), jnp.asarray(beta, dt))
    return args, (None if h0 is None else jnp.asarray(h0, jnp.float32))


def cotangents(o_shape, s_shape, seed: int = 1):
    """Random cotangents (do, dstate) as float64 numpy; do is bf16-representable, so every
    input dtype sees exactly the same cotangent."""
    rng = np.random.default_rng(seed)
    do = np.asarray(jnp.asarray(rng.standard_normal(o_shape), jnp.bfloat16).astype(jnp.float32),
                    np.float64)
    ds = np.asarray(jnp.asarray(rng.standard_normal(s_shape), jnp.float32), np.float64)
    return do, ds


def vjp_all(fn, args, h0, cotangent_seed: int = 1):
    """Outputs and gradients of all six inputs through jax.vjp with random cotangents.

    `fn(q, k, v, g, beta, h0) -> (o, state)`; h0 None is replaced by zeros so that its
    gradient exists too.
    """
    if h0 is None:
        q, _, v = args[0], args[1], args[2]
        h0 = jnp.zeros((q.shape[0], v.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    (o, s), vjp = jax.vjp(fn, *args, h0)
    do, ds = cotangents(o.shape, s.shape, cotangent_seed)
    return (o, s), vjp((jnp.asarray(do, o.dtype), jnp.asarray(ds, jnp.float32)))


# ----------------------------------------------------------------------- float64 oracle


def _f64(x):
    if x is None:
        return None
    if isinstance(x, np.ndarray) and x.dtype == np.float64:
        return x
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _l2norm(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + L2NORM_EPS)


def _l2norm_vjp(x, dy):
    n = np.sqrt((x * x).sum(-1, keepdims=True) + L2NORM_EPS)
    return dy / n - x * (x * dy).sum(-1, keepdims=True) / n ** 3


def _forward64(q, k, v, g, beta, S, scale, keep):
    """One batch of sequences: q, k `[B, T, Hv, K]` (already per value head); returns o and the
    final state, and the states before each token when `keep`."""
    B, T, Hv, K = q.shape
    V = v.shape[-1]
    kda = g.ndim == 4
    o = np.zeros((B, T, Hv, V))
    before = []
    for t in range(T):
        if keep:
            before.append(S)
        d = np.exp(g[:, t])[..., None] if kda else np.exp(g[:, t])[..., None, None]
        Sd = S * d
        u = beta[:, t, :, None] * (v[:, t] - np.einsum("bhkv,bhk->bhv", Sd, k[:, t]))
        S = Sd + k[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = np.einsum("bhkv,bhk->bhv", S, scale * q[:, t])
    return o, S, before


def _prep(q, k, v, g, beta, h0, scale, l2norm):
    q, k, v, g, beta = (_f64(x) for x in (q, k, v, g, beta))
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    scale = K ** -0.5 if scale is None else float(scale)
    qn, kn = (_l2norm(q), _l2norm(k)) if l2norm else (q, k)
    rep = lambda x: np.repeat(x, Hv // Hk, axis=2)  # noqa: E731  value head h reads h // group
    return q, k, rep(qn), rep(kn), v, np.maximum(g, G_MIN), g, beta, scale


def _segments(B, T, cu_seqlens):
    if cu_seqlens is None:
        return None
    cu = np.asarray(cu_seqlens)
    assert B == 1 and cu[0] == 0 and cu[-1] == T
    return list(zip(cu[:-1], cu[1:]))


def numpy_reference(q, k, v, g, beta, h0=None, *, scale=None, l2norm=False, cu_seqlens=None):
    """The recurrence of docs/spec.md section 1 in float64 numpy: (o, final states).

    With cu_seqlens (B = 1), h0 and the returned states hold one state per sequence.
    """
    q, k, qn, kn, v, gc, _, beta, scale = _prep(q, k, v, g, beta, h0, scale, l2norm)
    B, T, Hv, V = v.shape
    K = q.shape[-1]
    segs = _segments(B, T, cu_seqlens)
    N = B if segs is None else len(segs)
    S0 = np.zeros((N, Hv, K, V)) if h0 is None else _f64(h0)
    if segs is None:
        o, S, _ = _forward64(qn, kn, v, gc, beta, S0, scale, False)
        return o, S
    o = np.zeros((1, T, Hv, V))
    S = np.zeros_like(S0)
    for n, (a, e) in enumerate(segs):
        o[:, a:e], S[n:n + 1], _ = _forward64(qn[:, a:e], kn[:, a:e], v[:, a:e], gc[:, a:e],
                                              beta[:, a:e], S0[n:n + 1], scale, False)
    return o, S


def _backward64(qn, kn, v, gc, graw, beta, S0, do, dS, scale):
    o, S_T, before = _forward64(qn, kn, v, gc, beta, S0, scale, True)
    B, T, Hv, K = qn.shape
    kda = gc.ndim == 4
    dq, dk, dv = np.zeros_like(qn), np.zeros_like(kn), np.zeros_like(v)
    dg, dbeta = np.zeros_like(gc), np.zeros_like(beta)
    for t in reversed(range(T)):
        Sp = before[t]
        d = np.exp(gc[:, t])[..., None] if kda else np.exp(gc[:, t])[..., None, None]
        Sd = Sp * d
        r = v[:, t] - np.einsum("bhkv,bhk->bhv", Sd, kn[:, t])
        u = beta[:, t, :, None] * r
        S = Sd + kn[:, t, :, :, None] * u[:, :, None, :]
        dq[:, t] = scale * np.einsum("bhkv,bhv->bhk", S, do[:, t])
        dS = dS + scale * qn[:, t, :, :, None] * do[:, t, :, None, :]
        dk[:, t] = np.einsum("bhkv,bhv->bhk", dS, u)
        du = np.einsum("bhkv,bhk->bhv", dS, kn[:, t])
        dbeta[:, t] = (du * r).sum(-1)
        w = beta[:, t, :, None] * du
        dv[:, t] = w
        dSd = dS - kn[:, t, :, :, None] * w[:, :, None, :]
        dk[:, t] -= np.einsum("bhkv,bhv->bhk", Sd, w)
        dd = (dSd * Sp).sum(-1) if kda else (dSd * Sp).sum((-1, -2))
        dg[:, t] = dd * np.exp(gc[:, t]) * (graw[:, t] >= G_MIN)
        dS = dSd * d
    return (o, S_T), (dq, dk, dv, dg, dbeta, dS)


def numpy_vjp(q, k, v, g, beta, h0=None, do=None, dstate=None, *, scale=None, l2norm=False,
              cu_seqlens=None):
    """Float64 numpy outputs and the VJP of all six inputs: ((o, state), (dq, dk, dv, dg,
    dbeta, dh0)), for cotangents do `[B, T, Hv, V]` and dstate (the final states' shape;
    None for zeros). The backward of the recurrence written out by hand, checked against
    finite differences in tests/test_weak_decay.py."""
    q, k, qn, kn, v, gc, graw, beta, scale = _prep(q, k, v, g, beta, h0, scale, l2norm)
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    G = Hv // Hk
    segs = _segments(B, T, cu_seqlens)
    N = B if segs is None else len(segs)
    S0 = np.zeros((N, Hv, K, V)) if h0 is None else _f64(h0)
    do = np.zeros((B, T, Hv, V)) if do is None else _f64(do)
    dS = np.zeros((N, Hv, K, V)) if dstate is None else _f64(dstate)
    if segs is None:
        (o, S), (dqn, dkn, dv, dg, dbeta, dh0) = _backward64(qn, kn, v, gc, graw, beta, S0, do,
                                                             dS, scale)
    else:
        o, S = np.zeros((1, T, Hv, V)), np.zeros_like(S0)
        dqn, dkn, dv = np.zeros_like(qn), np.zeros_like(kn), np.zeros_like(v)
        dg, dbeta, dh0 = np.zeros_like(gc), np.zeros_like(beta), np.zeros_like(S0)
        for n, (a, e) in enumerate(segs):
            sl = slice(a, e)
            (o[:, sl], S[n:n + 1]), grads = _backward64(
                qn[:, sl], kn[:, sl], v[:, sl], gc[:, sl], graw[:, sl], beta[:, sl],
                S0[n:n + 1], do[:, sl], dS[n:n + 1], scale)
            dqn[:, sl], dkn[:, sl], dv[:, sl], dg[:, sl], dbeta[:, sl] = grads[:5]
            dh0[n:n + 1] = grads[5]
    # value heads back onto their q/k head, then the l2norm Jacobian
    dqn = dqn.reshape(B, T, Hk, G, K).sum(3)
    dkn = dkn.reshape(B, T, Hk, G, K).sum(3)
    dq, dk = (_l2norm_vjp(q, dqn), _l2norm_vjp(k, dkn)) if l2norm else (dqn, dkn)
    return (o, S), (dq, dk, dv, dg, dbeta, dh0)


def op_vjp(fn, args, h0, *, N=None, cotangent_seed: int = 1):
    """Runs `fn(q, k, v, g, beta, h0) -> (o, state)` forward and backward with the cotangents
    of `cotangents()`; h0 None becomes zeros (N states). Returns a dict of o, state and the
    six gradients, plus the float64 cotangents (do, dstate) to feed numpy_vjp."""
    q, v = args[0], args[2]
    if h0 is None:
        N = q.shape[0] if N is None else N
        h0 = jnp.zeros((N, v.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    (o, s), vjp = jax.vjp(fn, *args, h0)
    do, ds = cotangents(o.shape, s.shape, cotangent_seed)
    grads = vjp((jnp.asarray(do, o.dtype), jnp.asarray(ds, jnp.float32)))
    out = {"o": o, "state": s, **dict(zip(GRAD_NAMES, grads))}
    return out, (do, ds)


def numpy_expected(args, h0, cots, *, scale=None, l2norm=False, cu_seqlens=None) -> dict:
    """The float64 counterpart of op_vjp's dict."""
    (o, s), grads = numpy_vjp(*args, h0, *cots, scale=scale, l2norm=l2norm, cu_seqlens=cu_seqlens)
    return {"o": o, "state": s, **dict(zip(GRAD_NAMES, grads))}


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


def slow_except(cases, *everyday: int) -> list:
    """pytest params for `@pytest.mark.parametrize`: the cases at the indexes `everyday` run in
    both tiers, every other case is marked `slow` (the full suite only). A plain tuple case
    fills several argnames (a NamedTuple such as `Case` is one value); wrap a one-argname
    tuple case as a 1-tuple."""
    import pytest  # noqa: PLC0415

    def param(i, case):
        values = case if type(case) is tuple else (case,)
        return pytest.param(*values, marks=() if i in everyday else pytest.mark.slow)
    return [param(i, case) for i, case in enumerate(cases)]


def examples_per_case(n_cases: int):
    """Hypothesis settings for a test parametrized `n_cases` ways outside hypothesis: the loaded
    profile's example budget shared among the cases (at least one each), so that
    parametrizing the path and mode does not multiply the test's cost."""
    from hypothesis import settings  # noqa: PLC0415

    return settings(max_examples=max(1, settings.default.max_examples // n_cases))
