"""Argument checking and the small pieces every path shares.

Every path (reference, XLA recurrent, XLA chunked, Pallas) takes the same canonical
arguments: q, k `[B, T, Hk, K]`, v `[B, T, Hv, V]`, g `[B, T, Hv]` (GDA) or
`[B, T, Hv, K]` (KDA), beta `[B, T, Hv]` and a float32 initial state `[B, Hv, K, V]`.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

IMPLS = ("auto", "reference", "recurrent", "chunked")
STATE_LAYOUTS = ("kv", "vk")
BACKENDS = ("auto", "xla", "pallas", "pallas_triton", "pallas_mosaic_tpu")
INPUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# A state (or pool) is stored in one of these; the maths is float32 on every path.
STATE_DTYPES = INPUT_DTYPES

# exp() of anything below this underflows to 0 in float32; clamping keeps every
# gate finite (docs/spec.md section 1) without changing any result.
G_MIN = -104.0
L2NORM_EPS = 1e-6


class Dims(NamedTuple):
    """Static sizes of one call."""

    B: int
    T: int
    Hk: int
    Hv: int
    K: int
    V: int
    kda: bool
    N: int = 0  # sequences: B, or len(cu_seqlens) - 1 for packed sequences

    @property
    def group(self) -> int:
        """Value heads per q/k head."""
        return self.Hv // self.Hk


def _dtype_name(x) -> str:
    return str(jnp.result_type(x))


def _check_float(name: str, x, allowed, want: str | None = None) -> None:
    dt = jnp.result_type(x)
    want = want or "one of " + ", ".join(str(a) for a in allowed)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name} must be a floating array ({want}), got dtype {dt}")
    if dt not in allowed:
        raise TypeError(f"{name} has dtype {dt}; expected {want}")


def _concrete(x):
    """x as a numpy array when its value is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_index_array(name: str, x, length_hint: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an int32 array or None, got {type(x).__name__}")
    # the array's own dtype: jnp.result_type would silently accept int64 where x64 is off
    if np.dtype(x.dtype) != np.dtype(np.int32):
        raise TypeError(f"{name} must have dtype int32, got {np.dtype(x.dtype)}")
    if x.ndim != 1:
        raise ValueError(f"{name} must have rank 1 ({length_hint}), got {name}.shape={tuple(x.shape)}")


def check_varlen(B: int, T: int, cu_seqlens, state_indices, num_snapshots,
                 output_final_state) -> int:
    """Checks cu_seqlens, state_indices and num_snapshots (docs/spec.md 2.3-2.5); returns N.

    Shapes and dtypes are checked at trace time; values (cu_seqlens monotone from 0 to T,
    indices in range and distinct) only when the arrays are concrete.
    """
    N = B
    if cu_seqlens is not None:
        _check_index_array("cu_seqlens", cu_seqlens, "[N + 1]")
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must hold N + 1 >= 2 offsets, got cu_seqlens.shape="
                             f"{tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"cu_seqlens packs sequences along T and needs B == 1, got B={B} "
                             "(q.shape[0])")
        N = cu_seqlens.shape[0] - 1
        cu = _concrete(cu_seqlens)
        if cu is not None:
            if cu[0] != 0:
                raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={cu[0]}")
            if np.any(np.diff(cu) < 0):
                i = int(np.argmax(np.diff(cu) < 0))
                raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}]={cu[i]} > "
                                 f"cu_seqlens[{i + 1}]={cu[i + 1]}")
            if cu[-1] != T:
                raise ValueError(f"cu_seqlens must end at T={T} (q.shape[1]), got cu_seqlens[-1]={cu[-1]}")
    if state_indices is not None:
        _check_index_array("state_indices", state_indices, "[N]")
        if state_indices.shape[0] != N:
            raise ValueError(f"state_indices must have shape [N]=[{N}] (one slot per sequence), got "
                             f"state_indices.shape={tuple(state_indices.shape)}")
        if not output_final_state:
            raise ValueError("state_indices updates a state pool, which the op returns as final_state: "
                             "pass output_final_state=True")
    if isinstance(num_snapshots, bool) or not isinstance(num_snapshots, numbers.Integral):
        raise TypeError(f"num_snapshots must be a Python int >= 0, got {type(num_snapshots).__name__}")
    if num_snapshots < 0:
        raise ValueError(f"num_snapshots must be >= 0, got num_snapshots={num_snapshots}")
    return N


def check_pool_indices(state_indices, P: int) -> None:
    """Value checks of concrete state_indices against a pool of P slots."""
    idx = _concrete(state_indices)
    if idx is None:
        return
    bad = (idx < -1) | (idx >= P)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(f"state_indices must lie in [-1, P) with P={P} pool slots "
                         f"(initial_state.shape[0]), got state_indices[{i}]={idx[i]}")
    used = idx[idx >= 0]
    if len(np.unique(used)) != len(used):
        vals, counts = np.unique(used, return_counts=True)
        raise ValueError(f"state_indices must not repeat a slot, got slot {vals[counts > 1][0]} "
                         f"{counts[counts > 1][0]} times")


def check_inputs(q, k, v, g, beta, initial_state=None, *, scale=None, impl="auto",
                 backend="auto", state_layout="kv", cu_seqlens=None, state_indices=None,
                 num_snapshots=0, output_final_state=False) -> Dims:
    """Validates shapes, dtypes and options at trace time; returns the sizes.

    Raises TypeError for bad dtypes or option types and ValueError for bad shapes or
    option values, naming the argument, what it got and what was expected.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if state_layout not in STATE_LAYOUTS:
        raise ValueError(f"state_layout={state_layout!r} is not one of {STATE_LAYOUTS}")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, H, D]), got {name}.shape={tuple(x.shape)}")
    _check_float("q", q, INPUT_DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q.dtype={q.dtype}, "
                        f"k.dtype={k.dtype}, v.dtype={v.dtype}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q, got q.shape={tuple(q.shape)} and "
                         f"k.shape={tuple(k.shape)}")
    B, T, Hk, K = q.shape
    Bv, Tv, Hv, V = v.shape
    if (Bv, Tv) != (B, T):
        raise ValueError(f"v must agree with q on axes 0 and 1 (B, T), got q.shape={tuple(q.shape)} "
                         f"and v.shape={tuple(v.shape)}")
    for what, n, where in (("Hk", Hk, "q.shape[2]"), ("K", K, "q.shape[3]"), ("Hv", Hv, "v.shape[2]"),
                           ("V", V, "v.shape[3]")):
        if n < 1:
            raise ValueError(f"head counts and head sizes must be positive, got {what}={n} ({where}; "
                             f"q.shape={tuple(q.shape)}, v.shape={tuple(v.shape)})")
    if Hv % Hk:
        raise ValueError(f"the number of value heads must be a multiple of the number of q/k heads, "
                         f"got Hv={Hv} (v.shape={tuple(v.shape)}) and Hk={Hk} (q.shape={tuple(q.shape)})")
    gate_dtypes = tuple(dict.fromkeys((jnp.dtype(jnp.float32), jnp.dtype(q.dtype))))
    for name, x in (("g", g), ("beta", beta)):
        _check_float(name, x, gate_dtypes, f"float32 or q's dtype (q.dtype={q.dtype})")
    if tuple(g.shape) == (B, T, Hv):
        kda = False
    elif tuple(g.shape) == (B, T, Hv, K):
        kda = True
    else:
        raise ValueError(f"g must have shape [B, T, Hv]={[B, T, Hv]} (GDA) or [B, T, Hv, K]="
                         f"{[B, T, Hv, K]} (KDA), got g.shape={tuple(g.shape)}")
    if tuple(beta.shape) != (B, T, Hv):
        raise ValueError(f"beta must have shape [B, T, Hv]={[B, T, Hv]}, got beta.shape={tuple(beta.shape)}")
    N = check_varlen(B, T, cu_seqlens, state_indices, num_snapshots, output_final_state)
    if state_indices is not None and initial_state is None:
        raise ValueError("state_indices needs the state pool: pass it as initial_state "
                         "([P, Hv, K, V] for state_layout='kv'), got initial_state=None")
    if initial_state is not None:
        if not hasattr(initial_state, "shape"):
            raise TypeError(f"initial_state must be an array or None, got {type(initial_state).__name__}")
        _check_float("initial_state", initial_state, STATE_DTYPES)
        pool = state_indices is not None
        lead = initial_state.shape[0] if (pool and initial_state.ndim == 4) else N
        want = (lead, Hv, K, V) if state_layout == "kv" else (lead, Hv, V, K)
        if tuple(initial_state.shape) != want:
            axes = (("[P, " if pool else "[N, ") + ("Hv, K, V]" if state_layout == "kv" else "Hv, V, K]"))
            what = "the state pool" if pool else "one state per sequence"
            raise ValueError(f"initial_state must have shape {axes}={list(want)} ({what}, "
                             f"state_layout={state_layout!r}), got initial_state.shape="
                             f"{tuple(initial_state.shape)}")
        if pool:
            check_pool_indices(state_indices, initial_state.shape[0])
    if scale is not None:
        if (isinstance(scale, (jax.core.Tracer, bool, np.bool_))
                or not isinstance(scale, (numbers.Real, np.floating))):
            raise TypeError(f"scale must be a Python float or None, got {scale!r} of type "
                            f"{type(scale).__name__}")
        if not np.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got scale={scale}")
    return Dims(B, T, Hk, Hv, K, V, kda, N)


def l2norm(x: jax.Array) -> jax.Array:
    """`x * rsqrt(sum(x**2) + 1e-6)` over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def prepare(q, k, v, g, beta, *, use_qk_l2norm: bool, clamp_g: bool = True):
    """Casts every input to float32, l2-normalises q and k if asked, clamps g (clamp_g=False:
    the caller clamps it where it reads it, e.g. per chunk, saving a pass over a KDA gate)."""
    q = q.astype(jnp.float32)
    k = k.astype(jnp.float32)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    g = g.astype(jnp.float32)
    if clamp_g:
        g = jnp.maximum(g, G_MIN)
    return q, k, v.astype(jnp.float32), g, beta.astype(jnp.float32)


def default_scale(scale, K: int) -> float:
    return float(K) ** -0.5 if scale is None else float(scale)
