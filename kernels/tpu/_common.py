"""Pieces the Mosaic TPU kernels share: argument checks in `supports()` form, the interpret
mode switch, compiler parameters and small on-chip helpers (row <-> column moves)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ..._common import INPUT_DTYPES

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
# Scoped VMEM asked of Mosaic. Every kernel's own need is computed (`vmem_bytes` beside each
# call) and kept well under v7x's 64 MiB per core; the limit only has to cover it.
VMEM_LIMIT = 48 * 1024 * 1024


def interpret_arg(interpret: bool):
    """`pallas_call`'s interpret argument: the TPU interpreter (DMAs, semaphores, SMEM and
    out-of-bounds block checks on the CPU) when interpret is asked for."""
    return pltpu.InterpretParams() if interpret else False


def compiler_params(semantics, vmem_bytes: int | None = None):
    limit = VMEM_LIMIT if vmem_bytes is None else max(16 << 20, min(VMEM_LIMIT, 2 * vmem_bytes))
    return pltpu.CompilerParams(dimension_semantics=tuple(semantics), vmem_limit_bytes=limit)


def is_int(x) -> bool:
    return jnp.issubdtype(jnp.dtype(x.dtype), jnp.integer)


def check_common(q, k, v, g, beta, head_sizes):
    """The checks every TPU kernel makes: ranks, head sizes, dtypes, gate shapes. Returns a
    reason string or None."""
    if getattr(q, "ndim", None) != 4 or getattr(v, "ndim", None) != 4 \
            or getattr(k, "ndim", None) != 4:
        return "q, k and v must have rank 4"
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2], v.shape[3]
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape[:2]) != (B, T):
        return f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not agree"
    for name, d in (("K", K), ("V", V)):
        if d not in head_sizes:
            return (f"head size {name}={d} is not supported by the Mosaic TPU kernels "
                    f"(needs one of {head_sizes})")
    if T < 1:
        return f"T={T}: the kernels need at least one token"
    if Hk < 1 or Hv % Hk:
        return f"Hv={Hv} is not a multiple of Hk={Hk}"
    dt = jnp.dtype(q.dtype)
    if dt not in INPUT_DTYPES:
        return f"input dtype {dt} is not one of {', '.join(map(str, INPUT_DTYPES))}"
    if jnp.dtype(k.dtype) != dt or jnp.dtype(v.dtype) != dt:
        return "q, k and v must share one dtype"
    for name, x in (("g", g), ("beta", beta)):
        if jnp.dtype(x.dtype) not in (jnp.dtype(F32), dt):
            return f"{name} dtype {x.dtype} is neither float32 nor q's dtype {dt}"
    if tuple(g.shape) not in ((B, T, Hv), (B, T, Hv, K)):
        return f"g shape {tuple(g.shape)} is neither [B, T, Hv] (GDA) nor [B, T, Hv, K] (KDA)"
    if tuple(beta.shape) != (B, T, Hv):
        return f"beta shape {tuple(beta.shape)} is not [B, T, Hv]"
    return None


def check_cu_seqlens(cu_seqlens, B):
    """(N, reason): the number of sequences and a reason string or None."""
    if cu_seqlens is None:
        return B, None
    if getattr(cu_seqlens, "ndim", None) != 1 or cu_seqlens.shape[0] < 2:
        return B, (f"cu_seqlens shape {tuple(getattr(cu_seqlens, 'shape', ()))} is not [N + 1] "
                   "with N >= 1")
    if not is_int(cu_seqlens):
        return B, f"cu_seqlens dtype {cu_seqlens.dtype} is not an integer dtype"
    if B != 1:
        return B, f"cu_seqlens packs the sequences along T and needs B == 1, got B={B}"
    return cu_seqlens.shape[0] - 1, None


def eye_mask(n):
    return (jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
            == jax.lax.broadcasted_iota(jnp.int32, (n, n), 1))


def row_to_col(x, eye):
    """[1, n] -> [n, 1] exactly (select + lane reduce; no transpose of a 1-row array)."""
    return jnp.sum(jnp.where(eye, x, 0.0), axis=1, keepdims=True)


def col_to_row(x, eye):
    """[n, 1] -> [1, n] exactly (select + sublane reduce)."""
    return jnp.sum(jnp.where(eye, x, 0.0), axis=0, keepdims=True)


def any_spec():
    """A whole array left in HBM (the kernel moves what it needs by DMA)."""
    return pl.BlockSpec(memory_space=pl.ANY)
