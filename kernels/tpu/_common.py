"""Pieces the Mosaic TPU kernels share: argument checks in `supports()` form, the interpret
mode switch, compiler parameters and small on-chip helpers (row <-> column moves)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .. import _checks

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


def check_common(q, k, v, g, beta, head_sizes):
    """The checks every TPU kernel makes (kernels/_checks.py, plus the shapes of k, v, g and
    beta against q's). Returns a reason string or None."""
    reason = _checks.check_inputs(q, k, v, g, beta, head_ok=lambda d: d in head_sizes,
                                  head_need=f"one of {head_sizes}", what="Mosaic TPU kernels")
    if reason is not None:
        return reason
    B, T, Hk, K = q.shape
    Hv = v.shape[2]
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape[:2]) != (B, T):
        return f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not agree"
    if tuple(g.shape) not in ((B, T, Hv), (B, T, Hv, K)):
        return f"g shape {tuple(g.shape)} is neither [B, T, Hv] (GDA) nor [B, T, Hv, K] (KDA)"
    if tuple(beta.shape) != (B, T, Hv):
        return f"beta shape {tuple(beta.shape)} is not [B, T, Hv]"
    return None


def check_cu_seqlens(cu_seqlens, B):
    """(N, reason): the number of sequences and a reason string or None."""
    if cu_seqlens is None:
        return B, None
    reason = _checks.check_cu_seqlens(cu_seqlens, B, int32_only=False)
    return (B, reason) if reason is not None else (cu_seqlens.shape[0] - 1, None)


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
