"""Argument checks shared by the Pallas kernels' `supports` functions (recurrent and chunked).

Each returns None when the arguments fit, else the reason as a sentence naming the argument,
what it got and what was expected. They look at shapes and dtypes only (ShapeDtypeStructs
work), never at values, so traced `cu_seqlens` pass.
"""
from __future__ import annotations

import jax.numpy as jnp

from .._common import INPUT_DTYPES


def pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def is_int_dtype(x) -> bool:
    return jnp.issubdtype(jnp.dtype(x.dtype), jnp.integer)


def check_inputs(q, k, v, g, beta, *, head_ok, head_need: str, what: str):
    """Ranks, head sizes (`head_ok(d)`, `head_need` says what is needed), T, the head group,
    dtypes of q, k, v, g, beta. `what` names the kernel(s) in the messages."""
    if getattr(q, "ndim", None) != 4 or getattr(v, "ndim", None) != 4:
        return "q, k and v must have rank 4"
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    for name, d in (("K", K), ("V", V)):
        if not head_ok(d):
            return f"head size {name}={d} is not supported by the {what} (needs {head_need})"
    if T < 1:
        return f"T={T}: at least one token is needed by the {what}"
    if Hk < 1 or Hv % Hk:
        return f"Hv={Hv} is not a multiple of Hk={Hk}"
    dt = jnp.dtype(q.dtype)
    if dt not in INPUT_DTYPES:
        return f"input dtype {dt} is not one of {', '.join(map(str, INPUT_DTYPES))}"
    if jnp.dtype(k.dtype) != dt or jnp.dtype(v.dtype) != dt:
        return "q, k and v must share one dtype"
    for name, x in (("g", g), ("beta", beta)):
        if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), dt):
            return f"{name} dtype {x.dtype} is neither float32 nor q's dtype {dt}"
    return None


def check_cu_seqlens(cu_seqlens, B: int, *, int32_only: bool):
    """cu_seqlens [N + 1] (N >= 1), an integer dtype (int32 when `int32_only`), B == 1."""
    if getattr(cu_seqlens, "ndim", None) != 1 or cu_seqlens.shape[0] < 2:
        return (f"cu_seqlens shape {tuple(getattr(cu_seqlens, 'shape', ()))} is not [N + 1] "
                "with N >= 1")
    if int32_only and jnp.dtype(cu_seqlens.dtype) != jnp.dtype(jnp.int32):
        return f"cu_seqlens dtype {cu_seqlens.dtype} is not int32"
    if not is_int_dtype(cu_seqlens):
        return f"cu_seqlens dtype {cu_seqlens.dtype} is not an integer dtype"
    if B != 1:
        return f"cu_seqlens needs B == 1 (the sequences are packed along T), got B={B}"
    return None


STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_state_dtype(initial_state):
    """A state is stored as float32, bfloat16 or float16 (the kernels compute in float32)."""
    if jnp.dtype(initial_state.dtype) not in STATE_DTYPES:
        return f"initial_state must be float32, bfloat16 or float16, got {initial_state.dtype}"
    return None
