"""Gates and beta computed inside the op from a model's raw projections (fla's names and formulas).

With `use_gate_in_kernel=True` the op's `g` argument is the raw gate input `a` and

    g = -exp(A_log) * softplus(a + dt_bias)                       (GDA and KDA)
    g = lower_bound * sigmoid(exp(A_log) * (a + dt_bias))         (KDA with lower_bound, fla's safe gate)

with `use_beta_sigmoid_in_kernel=True` the `beta` argument is the raw `b` and beta = sigmoid(b).
Everything is float32 (softplus and sigmoid are stable for any |a|). The op applies these
before its custom_vjp, so gradients for a, A_log, dt_bias and b come from autodiff of the
formulas on every path; XLA fuses them into the ops that consume g and beta.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _float_array(name, x, shapes, what):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if tuple(x.shape) not in shapes:
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name} must have shape {want} ({what}), got {list(x.shape)}")


def check_gate_args(g, v, q, *, use_gate_in_kernel, A_log, dt_bias, lower_bound,
                    use_beta_sigmoid_in_kernel) -> None:
    """Trace-time checks of the in-op gate arguments, naming the argument."""
    for name, flag in (("use_gate_in_kernel", use_gate_in_kernel),
                       ("use_beta_sigmoid_in_kernel", use_beta_sigmoid_in_kernel)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {flag!r} of type {type(flag).__name__}")
    if not use_gate_in_kernel:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)):
            if x is not None:
                raise ValueError(f"{name} is given but use_gate_in_kernel=False: pass "
                                 f"use_gate_in_kernel=True to compute g in the op, or drop {name}")
        return
    if not hasattr(g, "dtype") or not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"g (the raw gate input a, with use_gate_in_kernel=True) must be a "
                        f"floating-point array, got {getattr(g, 'dtype', type(g).__name__)}")
    if A_log is None or dt_bias is None:
        missing = [n for n, x in (("A_log", A_log), ("dt_bias", dt_bias)) if x is None]
        raise ValueError(f"use_gate_in_kernel=True needs A_log and dt_bias; missing: "
                         f"{', '.join(missing)}")
    Hv = v.shape[2] if getattr(v, "ndim", 0) == 4 else None
    K = q.shape[3] if getattr(q, "ndim", 0) == 4 else None
    if Hv is None or K is None:
        return  # the op's own checks name q or v
    kda = getattr(g, "ndim", 0) == 4
    _float_array("A_log", A_log, [(Hv,)], "one per value head")
    if kda:
        _float_array("dt_bias", dt_bias, [(Hv, K), (Hv * K,)], "KDA: one per value head and key channel")
    else:
        _float_array("dt_bias", dt_bias, [(Hv,)], "GDA: one per value head")
    if lower_bound is not None:
        if not kda:
            raise ValueError("lower_bound is KDA's safe gate (g of shape [B, T, Hv, K]); this "
                             "call is GDA (g of shape [B, T, Hv])")
        if (isinstance(lower_bound, (bool, np.bool_)) or not isinstance(lower_bound, numbers.Real)
                or isinstance(lower_bound, jax.core.Tracer)):
            raise TypeError(f"lower_bound must be a Python float, got {lower_bound!r}")
        if not (np.isfinite(float(lower_bound)) and float(lower_bound) < 0):
            raise ValueError(f"lower_bound must be a finite negative float, got {lower_bound}")


def gate_from_raw(a, A_log, dt_bias, lower_bound=None):
    """The log decay g (float32, a's shape) from the raw gate input a: `[B, T, Hv]` (GDA) or
    `[B, T, Hv, K]` (KDA)."""
    a = a.astype(jnp.float32)
    A = jnp.exp(A_log.astype(jnp.float32))
    bias = dt_bias.astype(jnp.float32)
    if a.ndim == 4:  # KDA: A per head, dt_bias per head and key channel
        A = A[:, None]
        bias = bias.reshape(a.shape[2], a.shape[3])
    x = a + bias
    if lower_bound is not None:
        return float(lower_bound) * jax.nn.sigmoid(A * x)
    return -A * jax.nn.softplus(x)


def beta_from_raw(b):
    """beta = sigmoid(b) in float32."""
    return jax.nn.sigmoid(b.astype(jnp.float32))


def segment_masks(segment_ids):
    """(reset, pad), both `[B, T]` bool, from MaxText-style segment ids `[B, T]`.

    Id 0 marks padding. A token starts a new sequence (reset) when its id is nonzero and
    differs from the last nonzero id before it in its row; a row's first real token continues
    from the row's initial state. jnp only, so traced ids work.
    """
    seg = segment_ids.astype(jnp.int32)
    T = seg.shape[1]
    real = seg != 0
    pos = jnp.where(real, jnp.arange(T, dtype=jnp.int32), -1)
    last = jax.lax.cummax(pos, axis=1)                        # last real position <= t
    prev = jnp.concatenate([jnp.full_like(last[:, :1], -1), last[:, :-1]], axis=1)
    prev_id = jnp.take_along_axis(seg, jnp.maximum(prev, 0), axis=1)
    reset = real & (prev >= 0) & (seg != prev_id)
    return reset, ~real


# A gate this negative makes exp(g) exactly 0 in float32 after the op's clamp: the state is
# wiped before the token's update, so the token starts its sequence from zeros.
RESET_GATE = -1.0e4


def apply_segments(g, beta, reset, pad):
    """g and beta with segment starts wiping the state and padding tokens made identity
    tokens (g = 0, beta = 0: they leave the state as it is)."""
    r = reset[..., None, None] if g.ndim == 4 else reset[..., None]
    p = pad[..., None, None] if g.ndim == 4 else pad[..., None]
    g = jnp.where(r, jnp.asarray(RESET_GATE, g.dtype), jnp.where(p, jnp.zeros((), g.dtype), g))
    beta = jnp.where(pad[..., None], jnp.zeros((), beta.dtype), beta)
    return g, beta
