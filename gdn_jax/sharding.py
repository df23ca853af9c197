"""The gated delta net over a device mesh: sequences, heads and context parallelism.

`sharded_gated_delta_net` wraps the op in `jax.shard_map`. Sequences (batch) and value heads
are independent, so each device runs the op on its block and nothing is communicated. A
sequence split along T (context parallel) is exact too: the state map of a segment is affine,
`S_out = M S_in + N`; each device computes its `[M | N]`, the devices all-gather those small
matrices, compose the prefix locally and correct their outputs for the true incoming state.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._common import HIGHEST, check_inputs
from .api import gated_delta_net

__all__ = ["sharded_gated_delta_net", "partition_specs", "Specs", "collective_stats",
           "CollectiveStats", "cpu_mesh"]


def _axis_size(mesh: Mesh, name: str | None, arg: str) -> int:
    if name is None:
        return 1
    if not isinstance(name, str):
        raise TypeError(f"{arg} must be a mesh axis name (str) or None, got {type(name).__name__}")
    if name not in mesh.shape:
        raise ValueError(f"{arg}={name!r} is not an axis of the mesh (axes: {tuple(mesh.shape)})")
    return mesh.shape[name]


def _local_qk_heads(q, k, *, head_axis: str, hv_local: int, group: int):
    """The q/k heads this value-head shard reads, from q/k replicated over `head_axis`.

    Used when Hk is not a multiple of the head shards, so q/k cannot be split with v: value
    head h reads q/k head h // group. When every local value head reads one q/k head, that
    one head is sliced (the op keeps its grouped indexing); otherwise q/k are gathered per
    local value head (group 1 locally).
    """
    first = jax.lax.axis_index(head_axis) * hv_local  # first global value head of this shard
    if group % hv_local == 0:
        start = first // group
        return (jax.lax.dynamic_slice_in_dim(q, start, 1, axis=2),
                jax.lax.dynamic_slice_in_dim(k, start, 1, axis=2))
    idx = (first + jnp.arange(hv_local)) // group
    return jnp.take(q, idx, axis=2), jnp.take(k, idx, axis=2)


def _context_parallel_segment(q, k, v, g, beta, h0, *, seq_axis: str, n_seq: int, op_kwargs):
    """One device's segment of a sequence split along T; returns (o, final_state).

    One call of the op on `[I | 0]` initial states and values `[0 | v]` (V' = K + V columns)
    gives, for the segment alone, the transition `P = [M | N]` as its final state and, per
    token t, `o' = [M_t^T (scale q_t) | o_t(zero state)]` (M_t: the transition up to t). With
    the true incoming state S, `o_t = o_t(zero state) + S^T M_t^T (scale q_t)` and
    `S_out = M S + N`: exact, no second pass over the tokens.
    """
    B, _, _, K = q.shape
    Hv, V = v.shape[2:]
    v_aug = jnp.concatenate([jnp.zeros(v.shape[:3] + (K,), v.dtype), v], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(K, dtype=jnp.float32), (B, Hv, K, K))
    s_aug = jnp.concatenate([eye, jnp.zeros((B, Hv, K, V), jnp.float32)], axis=-1)
    o_aug, trans = gated_delta_net(q, k, v_aug, g, beta, initial_state=s_aug,
                                   output_final_state=True, **op_kwargs)
    # Exclusive scan of the affine maps: every device composes all n (tiny) transitions, so
    # each gets its own incoming state and all agree on the final one.
    trans = jax.lax.all_gather(trans, seq_axis)  # [n, B, Hv, K, K + V]
    state = jnp.zeros((B, Hv, K, V), jnp.float32) if h0 is None else h0
    incoming = []
    for i in range(n_seq):
        incoming.append(state)
        m, n = trans[i, ..., :K], trans[i, ..., K:]
        state = jnp.einsum("bhij,bhjv->bhiv", m, state, precision=HIGHEST) + n
    s_in = jnp.stack(incoming)[jax.lax.axis_index(seq_axis)]
    o_id = o_aug[..., :K].astype(jnp.float32)
    o = o_aug[..., K:].astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", o_id, s_in,
                                                        precision=HIGHEST)
    return o.astype(q.dtype), state


def cpu_mesh(axis_name: str = "heads") -> Mesh:
    """A 1-D mesh over this process's CPU devices, for `sharded_gated_delta_net(...,
    head_axis=axis_name)` (or `batch_axis`): the way to keep every core busy on XLA CPU.

    XLA CPU runs one program's loop of small dots largely on one core (prefill keeps about
    1.3 of 2 cores busy); separate devices run their programs on their own threads. JAX gives
    one CPU device unless the process starts with
    `XLA_FLAGS=--xla_force_host_platform_device_count=N` (read once, before JAX's backend
    starts; N = the cores to use). Splitting value heads moves nothing and communicates
    nothing (README, "Sharding and context parallel": measured speed-ups).
    """
    if not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a str, got {type(axis_name).__name__}")
    devices = jax.devices("cpu")
    return Mesh(np.array(devices), (axis_name,))


class Specs(NamedTuple):
    """PartitionSpecs of the op's arrays (o shares v's, the final state initial_state's)."""

    q: P
    k: P
    v: P
    g: P
    beta: P
    state: P


def partition_specs(*, batch_axis: str | None = None, head_axis: str | None = None,
                    seq_axis: str | None = None, kda: bool = False,
                    split_qk_heads: bool = True) -> Specs:
    """The PartitionSpecs `sharded_gated_delta_net` gives its arrays; place inputs with
    `NamedSharding(mesh, spec)` so that nothing moves on entry. `split_qk_heads=False` is the
    layout used when Hk is not a multiple of the head shards (q/k replicated over heads)."""
    b, s, h = batch_axis, seq_axis, head_axis
    qk = P(b, s, h if split_qk_heads else None, None)
    return Specs(q=qk, k=qk, v=P(b, s, h, None), g=P(b, s, h, None) if kda else P(b, s, h),
                 beta=P(b, s, h), state=P(b, h, None, None))


def sharded_gated_delta_net(q, k, v, g, beta, *, mesh: Mesh, batch_axis: str | None = None,
                            head_axis: str | None = None, seq_axis: str | None = None,
                            scale: float | None = None, initial_state=None,
                            output_final_state: bool = False,
                            use_qk_l2norm_in_kernel: bool = False, impl: str = "auto",
                            backend: str = "auto", interpret: bool = False,
                            state_layout: str = "kv"):
    """`gated_delta_net` split over the axes of `mesh` (a `jax.shard_map` wrapper).

    Call it inside or outside `jit`, on arrays of any sharding (they are resharded to the specs
    below if needed; arrays already laid out so move nothing). Differentiable: the gradients
    come out with the inputs' specs.

    Args:
      q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
        impl, backend, interpret, state_layout: as for `gated_delta_net` (global shapes).
        `impl="auto"` decides by the T of each device's block.
      mesh: the `jax.sharding.Mesh`.
      batch_axis: mesh axis splitting the sequences (axis 0 of every array); B must divide.
      head_axis: mesh axis splitting the value heads; Hv must divide. Value-head shard i holds
        heads `[i Hv/n, (i+1) Hv/n)`, which read q/k heads `[i Hk/n, (i+1) Hk/n)` when Hk % n
        == 0, so q/k are split the same way. Otherwise (Hk < n, say) q/k stay replicated over
        this axis and each device picks the q/k heads its value heads read; their gradients
        are then summed over the axis (one all-reduce of dq, dk).
      seq_axis: mesh axis splitting T (context parallel); T must divide. Each device runs its
        segment once with K extra value columns (its transition), the devices all-gather the
        per-segment transitions `[M | N]` (Hv K (K+V) float32 per sequence), and each corrects
        its outputs for its true incoming state. `initial_state` is the state before the first
        segment. The final state is returned replicated over `seq_axis`.

    Specs (None where an axis is not given): q, k `P(batch, seq, head, None)`; v, o
    `P(batch, seq, head, None)`; g `P(batch, seq, head)` (KDA: `+ (None,)`); beta
    `P(batch, seq, head)`; initial and final state `P(batch, head, None, None)`.

    Returns:
      `(o, final_state)` as for `gated_delta_net`.
    """
    dims = check_inputs(q, k, v, g, beta, initial_state, scale=scale, impl=impl,
                        backend=backend, state_layout=state_layout)
    B, T, Hk, Hv, K, V, kda, _ = dims
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    named = {"batch_axis": batch_axis, "head_axis": head_axis, "seq_axis": seq_axis}
    sizes = {arg: _axis_size(mesh, name, arg) for arg, name in named.items()}
    used = [name for name in named.values() if name is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"batch_axis, head_axis and seq_axis must be different mesh axes, got {named}")
    for arg, (what, n) in {"batch_axis": ("B", B), "head_axis": ("Hv", Hv),
                           "seq_axis": ("T", T)}.items():
        if n % sizes[arg]:
            hint = ""
            if arg == "seq_axis":
                hint = (" (pad the front of the sequence with tokens that leave the state "
                        "unchanged: g = 0, beta = 0, and drop their outputs)")
            raise ValueError(f"{what}={n} is not divisible by the {sizes[arg]} shards of "
                             f"{arg}={named[arg]!r}{hint}")
    n_head, n_seq = sizes["head_axis"], sizes["seq_axis"]
    qk_split = Hk % n_head == 0
    specs = partition_specs(batch_axis=batch_axis, head_axis=head_axis, seq_axis=seq_axis,
                            kda=kda, split_qk_heads=qk_split)
    h, s = head_axis, seq_axis
    op_kwargs = dict(scale=scale, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, impl=impl,
                     backend=backend, interpret=interpret)
    has_h0 = initial_state is not None
    want_state = output_final_state

    def local(q, k, v, g, beta, *maybe_h0):
        h0 = maybe_h0[0] if has_h0 else None
        if not qk_split:
            q, k = _local_qk_heads(q, k, head_axis=h, hv_local=Hv // n_head, group=Hv // Hk)
        if s is None:
            return gated_delta_net(q, k, v, g, beta, initial_state=h0,
                                   output_final_state=want_state, state_layout=state_layout,
                                   **op_kwargs)
        if h0 is not None and state_layout == "vk":
            h0 = jnp.swapaxes(h0, -1, -2)
        o, state = _context_parallel_segment(q, k, v, g, beta, h0, seq_axis=s, n_seq=n_seq,
                                             op_kwargs=op_kwargs)
        if not want_state:
            return o, None
        return o, (jnp.swapaxes(state, -1, -2) if state_layout == "vk" else state)

    args = (q, k, v, g, beta) + ((initial_state,) if has_h0 else ())
    in_specs = specs[:5] + ((specs.state,) if has_h0 else ())
    out_specs = (specs.v, specs.state if want_state else None)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # Explicit axes: shard_map wants the arrays' own specs to match (a no-op when they do)
        args = tuple(jax.reshard(x, NamedSharding(mesh, spec)) for x, spec in zip(args, in_specs))
    # check_vma=False: the Pallas kernels' pallas_call (traced on every platform by the op's
    # platform_dependent dispatch) declares no varying-axes type for its outputs.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


# --------------------------------------------------------------------------------------
# Inspecting the communication of a compiled program
# --------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1,
                "u8": 1, "pred": 1, "s16": 2, "u16": 2, "u64": 8}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_LINE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


class CollectiveStats(NamedTuple):
    """One collective of a compiled HLO module: its kind and the bytes of its result."""

    kind: str
    shapes: tuple[str, ...]
    result_bytes: int


def collective_stats(hlo_text: str) -> list[CollectiveStats]:
    """The collectives in `jax.jit(f).lower(...).compile().as_text()` (asynchronous pairs
    counted once, at their `-start`), with the bytes of each result (per device)."""
    found = []
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        result_type, kind, _ = m.groups()
        shapes, nbytes = [], 0
        for dt, dims in _SHAPE.findall(result_type):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            shapes.append(f"{dt}[{dims}]")
            nbytes += n * _DTYPE_BYTES.get(dt, 4)
        if kind in ("all-gather", "collective-permute", "all-reduce") and m.group(3) and len(shapes) > 1:
            # async start ops return (operand, result[, contexts]): count the result only
            shapes, nbytes = shapes[1:2], _shape_bytes(shapes[1])
        found.append(CollectiveStats(kind, tuple(shapes), nbytes))
    return found


def _shape_bytes(shape: str) -> int:
    dt, dims = _SHAPE.match(shape).groups()
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n * _DTYPE_BYTES.get(dt, 4)
