"""Per-token state slots for speculative decoding: argument checks and the slot arithmetic.

vLLM's form (its GDN `fused_recurrent_gated_delta_rule` with a 2-D `ssm_state_indices` and
`num_accepted_tokens`): a verification step runs the T draft tokens of each sequence once and
stores the state after every draft token in its own pool slot, so the next step starts from
the state after the last accepted token by picking a slot, with no dense snapshot copy and no
rollback pass. Semantics: docs/spec.md section 2.5a.

- `state_indices` `[N, W]` int32 is the read table (vLLM's `ssm_state_indices`): sequence n
  starts from slot `state_indices[n, num_accepted_tokens[n] - 1]`.
- `output_state_indices` `[N, W]` int32 is the write table (default: the read table, vLLM's
  in-place form): the state after token p of sequence n goes to slot
  `output_state_indices[n, p]`; -1 writes nothing.
- `num_accepted_tokens` `[N]` int32 in [1, W] (default all 1: column 0 is read).

The op reduces the read table to one read slot per sequence (`read_slots`) and from there runs
the pool machinery of section 2.4 with a per-token write table.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._common import _concrete


def _check_table(name: str, x, want: tuple) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an int32 array, got {type(x).__name__}")
    if np.dtype(x.dtype) != np.dtype(np.int32):
        raise TypeError(f"{name} must have dtype int32, got {np.dtype(x.dtype)}")
    if tuple(x.shape) != want:
        raise ValueError(f"{name} must have shape {list(want)} with per-token slots "
                         f"(state_indices [N, W]), got {name}.shape={tuple(x.shape)}")


def is_token_table(state_indices) -> bool:
    """True for a 2-D `state_indices`: per-token slots (speculative decoding)."""
    return state_indices is not None and getattr(state_indices, "ndim", 1) == 2


def per_token_slots(state_indices, output_state_indices, num_accepted_tokens, *, B: int,
                    T: int, cu_seqlens, initial_state, num_snapshots, impl: str):
    """Checks the per-token slot arguments; returns (read slots `[N]`, write table `[N, W]`).

    Shapes and dtypes are checked at trace time, values where they are concrete. Raises
    naming the argument.
    """
    if not hasattr(state_indices, "dtype") or np.dtype(state_indices.dtype) != np.dtype(np.int32):
        raise TypeError(f"state_indices must have dtype int32, got "
                        f"{getattr(state_indices, 'dtype', type(state_indices).__name__)}")
    N = B if cu_seqlens is None else getattr(cu_seqlens, "shape", (1,))[0] - 1
    W = state_indices.shape[1]
    if state_indices.shape[0] != N:
        raise ValueError(f"state_indices [N, W] (per-token slots) must have N={N} rows (one per "
                         f"sequence), got state_indices.shape={tuple(state_indices.shape)}")
    if W < 1:
        raise ValueError(f"state_indices [N, W] (per-token slots) needs W >= 1 columns, got "
                         f"state_indices.shape={tuple(state_indices.shape)}")
    if cu_seqlens is None and W != T:
        raise ValueError(f"state_indices [N, W] (per-token slots) must have one column per token, "
                         f"W == T={T} (q.shape[1]) without cu_seqlens, got "
                         f"state_indices.shape={tuple(state_indices.shape)}")
    if num_snapshots:
        raise ValueError(f"num_snapshots={num_snapshots} with per-token slots (state_indices "
                         "[N, W]): the state after every token is already written to its slot; "
                         "pass one of them")
    if impl == "chunked":
        raise ValueError('per-token slots (state_indices [N, W]) are written by the token-by-token '
                         'paths: use impl="recurrent" (or "auto", which picks it), not '
                         'impl="chunked"')
    write = state_indices if output_state_indices is None else output_state_indices
    if output_state_indices is not None:
        _check_table("output_state_indices", output_state_indices, (N, W))
    if num_accepted_tokens is None:
        col = jnp.zeros((N,), jnp.int32)
    else:
        _check_table("num_accepted_tokens", num_accepted_tokens, (N,))
        acc = _concrete(num_accepted_tokens)
        if acc is not None and np.any((acc < 1) | (acc > W)):
            i = int(np.argmax((acc < 1) | (acc > W)))
            raise ValueError(f"num_accepted_tokens must lie in [1, W] with W={W} (state_indices."
                             f"shape[1]), got num_accepted_tokens[{i}]={acc[i]}")
        # traced values outside [1, W] read a clamped column (unspecified, never out of bounds)
        col = jnp.clip(num_accepted_tokens - 1, 0, W - 1)
    read = jnp.take_along_axis(state_indices, col[:, None].astype(jnp.int32), axis=1)[:, 0]
    P = initial_state.shape[0] if getattr(initial_state, "ndim", 0) == 4 else None
    for name, table in (("state_indices", state_indices), ("output_state_indices", write)):
        vals = _concrete(table)
        if vals is None or P is None:
            continue
        bad = (vals < -1) | (vals >= P)
        if np.any(bad):
            n, p = np.argwhere(bad)[0]
            raise ValueError(f"{name} must lie in [-1, P) with P={P} pool slots, got "
                             f"{name}[{n}, {p}]={vals[n, p]}")
    wvals = _concrete(write)
    if wvals is not None:
        used = wvals[wvals >= 0]
        uniq, counts = np.unique(used, return_counts=True)
        if np.any(counts > 1):
            which = "output_state_indices" if output_state_indices is not None else "state_indices"
            raise ValueError(f"{which} (the per-token write table) must not repeat a slot, got "
                             f"slot {uniq[counts > 1][0]} {counts[counts > 1][0]} times")
    cu = None if cu_seqlens is None else _concrete(cu_seqlens)
    if cu is not None and cu.ndim == 1 and cu.size >= 2:
        lens = np.diff(cu)
        if np.any(lens > W):
            n = int(np.argmax(lens > W))
            raise ValueError(f"sequence {n} has {lens[n]} tokens (cu_seqlens) but state_indices "
                             f"[N, W] has W={W} columns: one column per token is needed")
    return read, write


def token_write_slots(write, lens, W: int, read, P: int):
    """Pool slot of each snapshot `[N, W]` of the token-by-token paths, P (dropped) for none.

    The paths' snapshot j of sequence n (length L_n) is its state after token
    p = j - (W - L_n); it goes to `write[n, p]` when 0 <= p < W, the sequence is not padding (read
    slot >= 0) and the slot is not -1. Positions j < W - L_n hold the initial state: no write.
    """
    j = jnp.arange(W, dtype=jnp.int32)[None, :]
    p = j - (W - lens[:, None])
    w = jnp.take_along_axis(write, jnp.clip(p, 0, W - 1), axis=1)
    ok = (p >= 0) & (p < W) & (read[:, None] >= 0) & (w >= 0)
    return jnp.where(ok, w, P)
