"""The public op: argument checks, path selection, and the `jax.custom_vjp` around it.

Forward runs the selected path (reference scan, XLA recurrent, XLA chunked, or a Pallas
kernel); the backward is autodiff of a memory-lean XLA path on the saved inputs.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from ._common import Dims, check_inputs, default_scale
from .gates import apply_segments, beta_from_raw, check_gate_args, gate_from_raw, segment_masks
from .chunked import chunked_gated_delta_net
from .recurrent import recurrent_gated_delta_net
from .reference import reference_gated_delta_net
from ._varlen import token_table
from .spec_decode import is_token_table, per_token_slots, token_write_slots

# Measured on the project's 2-core CPU (`benchmarks/benchmark.py --sections sweep`, B=1, Hv=32,
# K=V=128): the XLA recurrent path beats the XLA chunked one up to T = 8, chunked wins from
# T = 16 on (README, "Benchmarks"). The same holds at B=32 by the decode timings.
RECURRENT_MAX_T = 8
# Backward of the recurrent path by autodiff stores one state per token; above this T the
# chunked backward (states stored per 64-token chunk) is used instead.
RECURRENT_BWD_MAX_T = 8

XLA_PATHS: dict[str, Callable] = {
    "reference": reference_gated_delta_net,
    "recurrent": recurrent_gated_delta_net,
    "chunked": chunked_gated_delta_net,
}


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static choices of one call (hashable: a `nondiff_argnums` of the custom_vjp)."""

    impl: str  # "reference" | "recurrent" | "chunked" (resolved, never "auto")
    # "xla"; a kernel family run as is ("pallas_triton", "pallas_mosaic_tpu"); "pallas" (each
    # platform's family, no fallback) or "auto" (each platform's family, XLA elsewhere), both
    # over `families`, the families whose kernels support the call.
    backend: str
    scale: float
    use_qk_l2norm: bool
    output_final_state: bool
    state_layout: str  # layout of h0 and of the returned state: "kv" or "vk"
    interpret: bool
    num_snapshots: int = 0
    pool: bool = False  # h0 is a state pool indexed by state_indices
    families: tuple[str, ...] = ()
    dot_precision: str = "highest"  # XLA paths' data-state dots: "highest" or "default"
    token_slots: int = 0  # W of a per-token write table [N, W] (speculative decoding), 0 for none
    # > 0: the forward also returns the states after every checkpoint_every tokens, carried
    # in the snapshots' place through _pooled / _gdn (the two are never asked for together)
    checkpoint_every: int = 0


def _resolve_impl(impl: str, dims: Dims, num_snapshots: int) -> str:
    if num_snapshots and impl == "chunked":
        raise ValueError(f"num_snapshots={num_snapshots} is computed by the token-by-token paths: "
                         'use impl="recurrent" (or "auto", which picks it), not impl="chunked"')
    if impl != "auto":
        return impl
    if num_snapshots:
        return "recurrent"
    return "recurrent" if dims.T <= RECURRENT_MAX_T else "chunked"


# The Pallas kernel families and the platform each runs on.
FAMILY_PLATFORM = {"pallas_triton": "cuda", "pallas_mosaic_tpu": "tpu"}


def _pallas_module(impl: str, family: str = "pallas_triton"):
    """The kernel module of `family` for `impl` ("recurrent" or "chunked")."""
    if family == "pallas_triton":
        from .kernels import chunked, recurrent  # noqa: PLC0415
    else:
        from .kernels.tpu import chunked, recurrent  # noqa: PLC0415
    return recurrent if impl == "recurrent" else chunked


def _varlen_kwargs(cu_seqlens=None, state_indices=None, num_snapshots=0, *, impl="recurrent",
                   output_state_indices=None, has_initial_state=None):
    """The packed/pool/snapshot keywords a kernel takes, only where they are in use. The
    chunked kernel sees per-sequence states: the op handles a pool around it."""
    kw = {}
    if cu_seqlens is not None:
        kw["cu_seqlens"] = cu_seqlens
    if impl == "recurrent":
        if isinstance(state_indices, Slots):
            state_indices, output_state_indices, has_initial_state = state_indices
        if state_indices is not None:
            kw["state_indices"] = state_indices
            if output_state_indices is not None:
                kw["output_state_indices"] = output_state_indices
            if has_initial_state is not None:
                kw["has_initial_state"] = has_initial_state
        if num_snapshots:
            kw["num_snapshots"] = num_snapshots
    return kw


def _resolve_backend(backend: str, impl: str, interpret: bool, args, state_layout: str,
                     varlen: dict, checkpoint_every: int = 0) -> tuple[str, tuple[str, ...]]:
    """(backend, families) for `_Config`; raises if an explicit request cannot be served."""
    if impl == "reference":
        if backend != "auto" and backend != "xla":
            raise ValueError(f'backend="{backend}" has no kernel for impl="reference"; the '
                             'reference is plain XLA: use backend="auto" or "xla"')
        return "xla", ()
    if backend == "xla":
        return "xla", ()
    q, k, v, g, beta, h0 = args
    if impl == "chunked" and varlen.get("state_indices") is not None:  # the kernel sees gathered states
        h0 = jax.ShapeDtypeStruct((varlen["state_indices"].shape[0],) + h0.shape[1:], h0.dtype)
    kw = _varlen_kwargs(**varlen, impl=impl)
    serving = {"output_state_indices", "has_initial_state"} & set(kw)
    if getattr(kw.get("output_state_indices"), "ndim", 1) == 2:
        serving = (serving - {"output_state_indices"}) | {"per-token slots (state_indices [N, W])"}
    reasons = {fam: (f"the Mosaic TPU kernels do not take {', '.join(sorted(serving))}"
                     if serving and fam == "pallas_mosaic_tpu" else
                     _pallas_module(impl, fam).supports(q, k, v, g, beta, h0,
                                                        state_layout=state_layout, **kw))
               for fam in FAMILY_PLATFORM}
    if checkpoint_every:  # the XLA paths, and the Triton chunked forward at chunk multiples
        for fam in FAMILY_PLATFORM:
            if impl == "chunked" and fam == "pallas_triton":
                reasons[fam] = reasons[fam] or _pallas_module(impl, fam).checkpoint_support(
                    checkpoint_every)
            else:
                reasons[fam] = (f"the {fam} {impl} kernel does not take "
                                f"checkpoint_every={checkpoint_every}")
    asked = backend
    if interpret and backend in ("auto", "pallas"):
        # interpret mode: the Triton kernels' code on any platform ("auto" falls back to XLA)
        if backend == "auto" and reasons["pallas_triton"] is not None:
            return "xla", ()
        backend = "pallas_triton"
    if backend in FAMILY_PLATFORM:
        if reasons[backend] is not None:
            raise ValueError(f'backend="{asked}" cannot serve impl="{impl}" for this call: '
                             f'{reasons[backend]}. Use backend="auto" to fall back to XLA.')
        return backend, (backend,)
    families = tuple(fam for fam, reason in reasons.items() if reason is None)
    if backend == "pallas" and not families:
        why = "; ".join(f"{fam}: {reason}" for fam, reason in reasons.items())
        raise ValueError(f'backend="pallas" cannot serve impl="{impl}" for this call ({why}). '
                         'Use backend="auto" to fall back to XLA.')
    if not families:  # "auto" with no kernel for the call
        return "xla", ()
    return backend, families


def _to_kv(cfg: _Config, x):
    return jnp.swapaxes(x, -1, -2) if (x is not None and cfg.state_layout == "vk") else x


class Slots(NamedTuple):
    """A pool's per-sequence slots: `read` (state_indices, -1 for padding), `write`
    (output_state_indices, None to write where read, -1 to skip) and `has` (has_initial_state:
    False starts from zeros without using the slot; None for all True)."""

    read: jax.Array
    write: jax.Array | None = None
    has: jax.Array | None = None


def _read_mask(s: Slots):
    valid = s.read >= 0
    return valid if s.has is None else valid & s.has


def _write_index(s: Slots, P: int):
    """Slot each sequence writes, P (dropped) for none: padding reads and writes nothing."""
    w = s.read if s.write is None else s.write
    return jnp.where((s.read >= 0) & (w >= 0), w, P)


def _gather_slots(pool, s: Slots, index=None):
    """The pool slots the sequences read (`pool[read]`), zeros for padding entries (-1) and
    for has_initial_state False; `index` overrides the slots read (the mask stays)."""
    idx = s.read if index is None else index
    valid = _read_mask(s)[:, None, None, None]
    return jnp.where(valid, jnp.take(pool, jnp.clip(idx, 0, pool.shape[0] - 1), axis=0), 0.0)


def _scatter_slots(pool, s: Slots, states):
    """`pool` with each sequence's write slot set to its state; nothing else changes."""
    return pool.at[_write_index(s, pool.shape[0])].set(states, mode="drop")


def _zero_padding_tokens(x, s: Slots, cu):
    """x `[B, T, ...]` with the tokens of padding sequences (read slot -1) set to zero."""
    valid = s.read >= 0
    if cu is None:
        mask = valid[:, None, None, None]
    else:  # per packed token: the validity of its sequence
        mask = valid[token_table(cu, x.shape[1]).seq][None, :, None, None]
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


def _scatter_token_states(pool, s: Slots, snaps, cu):
    """`pool` with the state after each token written to its slot of the table `s.write`."""
    N, W = s.write.shape  # W == T without cu_seqlens
    lens = jnp.full((N,), W, jnp.int32) if cu is None else (cu[1:] - cu[:-1]).astype(jnp.int32)
    slots = token_write_slots(s.write, lens, W, s.read, pool.shape[0])
    return pool.at[slots.reshape(-1)].set(snaps.reshape((N * W,) + snaps.shape[2:]), mode="drop")


def _pooled(cfg: _Config, fn):
    """Wraps fn(q, k, v, g, beta, h0, cu) -> (o, ht, snaps), all per sequence and in the
    caller's layout, to read and write a state pool: gather the indexed slots, run, scatter the
    final states back (in place when the pool is donated). Padding slots (-1) read zeros, write
    nothing, and get zero outputs."""

    def run(q, k, v, g, beta, h0, cu, idx):
        if not cfg.pool:
            return fn(q, k, v, g, beta, h0, cu)
        o, ht, snaps = fn(q, k, v, g, beta, _gather_slots(h0, idx), cu)
        if cfg.token_slots:  # the paths' snapshots are the states after each token
            return _zero_padding_tokens(o, idx, cu), _scatter_token_states(h0, idx, snaps, cu), None
        if snaps is not None:
            snaps = jnp.where((idx.read >= 0)[:, None, None, None, None], snaps, 0.0)
        return _zero_padding_tokens(o, idx, cu), _scatter_slots(h0, idx, ht), snaps

    return run


def _xla_fn(cfg: _Config, impl: str):
    """An XLA path in the op's calling convention: (q, k, v, g, beta, h0, cu_seqlens,
    state_indices) -> (o, final_state, snapshots); h0 may be None, a pool, or "vk"."""
    path = functools.partial(XLA_PATHS[impl], scale=cfg.scale, use_qk_l2norm=cfg.use_qk_l2norm)
    ns = cfg.num_snapshots or cfg.token_slots  # per-token slots: the states after each token
    if ns:
        path = functools.partial(path, num_snapshots=ns)
    if cfg.checkpoint_every:
        path = functools.partial(path, checkpoint_every=cfg.checkpoint_every)
    # The fast paths compute in the caller's layout; the reference (the oracle) sees "kv".
    native = impl != "reference"
    if native:
        path = functools.partial(path, state_layout=cfg.state_layout,
                                 dot_precision=_PRECISIONS[cfg.dot_precision])
    layout = cfg.state_layout if native else "kv"

    def to_path(x):
        return x if native else _to_kv(cfg, x)

    def per_sequence(q, k, v, g, beta, h0, cu):
        K = q.shape[3]
        Hv, V = v.shape[2:]
        N = q.shape[0] if cu is None else cu.shape[0] - 1
        shape = (N, Hv, V, K) if layout == "vk" else (N, Hv, K, V)
        h0 = jnp.zeros(shape, jnp.float32) if h0 is None else to_path(h0)
        res = path(q, k, v, g, beta, h0, **({} if cu is None else {"cu_seqlens": cu}))
        o, ht = res[:2]
        snaps = res[2] if (ns or cfg.checkpoint_every) else None
        return o, to_path(ht), to_path(snaps)

    pooled = _pooled(cfg, per_sequence)

    def in_place_pool(q, k, v, g, beta, pool, idx):
        """The XLA recurrent path reads and writes the pool's slots itself (no gather or
        scatter of whole states, which XLA CPU runs serially)."""
        res = path(q, k, v, g, beta, pool, slots=tuple(idx))
        snaps = None
        if cfg.num_snapshots:
            snaps = jnp.where((idx.read >= 0)[:, None, None, None, None], res[2], 0.0)
        return _zero_padding_tokens(res[0], idx, None), res[1], snaps

    def fn(q, k, v, g, beta, h0, cu, idx):
        if (cfg.pool and impl == "recurrent" and cu is None and not cfg.token_slots
                and not cfg.checkpoint_every):
            o, ht, snaps = in_place_pool(q, k, v, g, beta, h0, idx)
        else:
            o, ht, snaps = pooled(q, k, v, g, beta, h0, cu, idx)
        return o, (ht if cfg.output_final_state else None), snaps

    return fn


def _on_platform(cfg: _Config, family_fn, xla_fn):
    """The function that runs the configured backend: `family_fn(family)` builds one kernel
    family's version. "pallas" and "auto" decide the family at lowering, per platform (XLA on
    the others for "auto"; for "pallas" a platform without a kernel gets the first family's,
    whose lowering raises there), so a program lowered or exported for several platforms at
    once carries every path, and lowering for a GPU or TPU works on a CPU-only machine."""
    if cfg.backend == "xla":
        return xla_fn
    if cfg.backend in FAMILY_PLATFORM:
        return family_fn(cfg.backend)
    from .kernels._platform import by_platform  # noqa: PLC0415
    branches = {FAMILY_PLATFORM[fam]: family_fn(fam) for fam in cfg.families}
    default = xla_fn if cfg.backend == "auto" else family_fn(cfg.families[0])
    return lambda *a: by_platform(*a, default=default, **branches)


def _forward(cfg: _Config, q, k, v, g, beta, h0, cu, idx, *, alias_state: bool):
    """Runs the selected path. alias_state: let the recurrent kernel write the final state over
    the initial one (in place when the caller donates it); off when h0 is kept for the backward."""
    kw = dict(scale=cfg.scale, use_qk_l2norm=cfg.use_qk_l2norm,
              output_final_state=cfg.output_final_state, interpret=cfg.interpret)

    def family_fn(family):
        mod = _pallas_module(cfg.impl, family)
        if cfg.impl == "recurrent":
            def pallas_fn(q, k, v, g, beta, h0, cu, idx):
                res = mod.fused_recurrent(q, k, v, g, beta, h0, state_layout=cfg.state_layout,
                                          alias_state=alias_state, **kw,
                                          **_varlen_kwargs(cu, idx, cfg.num_snapshots))
                return res[0], res[1], (res[2] if cfg.num_snapshots else None)
            return pallas_fn

        ckpt_kw = {"checkpoint_every": cfg.checkpoint_every} if cfg.checkpoint_every else {}

        def per_sequence(q, k, v, g, beta, h0, cu):  # supports() declined "vk" already
            res = mod.chunked_forward(q, k, v, g, beta, h0, **kw, **ckpt_kw,
                                      **_varlen_kwargs(cu, impl="chunked"))
            return res[0], res[1], (res[2] if ckpt_kw else None)
        return _pooled(cfg, per_sequence)

    fn = _on_platform(cfg, family_fn, _xla_fn(cfg, cfg.impl))
    return fn(q, k, v, g, beta, h0, cu, idx)


def _xla_backward(cfg: _Config, inputs, h0, cu, idx, cotangents):
    """Gradients by autodiff of a memory-lean XLA path on the saved inputs."""
    impl = cfg.impl
    if cfg.checkpoint_every:  # no gradient through checkpoints (_checkpoints_without_grad)
        cfg = dataclasses.replace(cfg, checkpoint_every=0)
        cotangents = (*cotangents[:2], None)
    if impl == "recurrent" and inputs[0].shape[1] > RECURRENT_BWD_MAX_T and not cfg.num_snapshots:
        impl = "chunked"
    if impl == "recurrent" and h0 is not None and h0.dtype == jnp.bfloat16:
        # The XLA recurrent path carries a bf16 pool or blocked state as its uint16 bits (a
        # bitcast: no gradient through it); the chunked path (snapshots: the reference) gathers
        # and rounds the same way and differentiates.
        impl = "reference" if cfg.num_snapshots else "chunked"
    fn = _xla_fn(cfg, impl)
    if h0 is None:  # no state to differentiate: keep None out of jax.vjp
        _, vjp = jax.vjp(lambda *a: fn(*a, None, cu, idx), *inputs)
        return (*vjp(cotangents), None)
    _, vjp = jax.vjp(lambda *a: fn(*a, cu, idx), *inputs, h0)
    return vjp(cotangents)


def _pallas_backward(cfg: _Config, family: str, inputs, h0, cu, idx, cotangents):
    """Gradients by a family's Pallas chunked backward kernels (state in the "kv" layout inside)."""
    chunked_backward = _pallas_module("chunked", family).chunked_backward

    do, dht, _ = cotangents
    pool = h0 if cfg.pool else None
    if cfg.pool:  # per-sequence states and their cotangents from the pool
        P = pool.shape[0]
        w = _write_index(idx, P)
        h0 = _gather_slots(pool, idx)
        dht = jnp.where((w < P)[:, None, None, None], jnp.take(dht, jnp.minimum(w, P - 1), axis=0), 0.0)
        do = _zero_padding_tokens(do, idx, cu)
    h0, dht = _to_kv(cfg, h0), _to_kv(cfg, dht)
    *grads, dh0 = chunked_backward(*inputs, h0, do, dht, scale=cfg.scale,
                                   use_qk_l2norm=cfg.use_qk_l2norm, interpret=cfg.interpret,
                                   **_varlen_kwargs(cu, impl="chunked"))
    dh0 = _to_kv(cfg, dh0)
    if cfg.pool:  # overwritten slots get no cotangent; the slots read get dh0
        dpool = cotangents[1].at[w].set(0.0, mode="drop")
        dpool = dpool.at[jnp.where(_read_mask(idx), idx.read, P)].add(dh0, mode="drop")
        return (*grads, dpool)
    return (*grads, dh0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdn(cfg: _Config, q, k, v, g, beta, h0, cu, idx):
    return _forward(cfg, q, k, v, g, beta, h0, cu, idx, alias_state=True)


def _gdn_fwd(cfg, q, k, v, g, beta, h0, cu, idx):
    if cfg.token_slots:
        raise NotImplementedError(
            "gradients of a call with per-token slots (state_indices [N, W], speculative "
            "decoding) are not supported: it is a serving path; differentiate a call without them")
    out = _forward(cfg, q, k, v, g, beta, h0, cu, idx, alias_state=False)
    return out, (q, k, v, g, beta, h0, cu, idx)


def _gdn_bwd(cfg, residuals, cotangents):
    *inputs, h0, cu, idx = residuals
    no_index_grads = (None, None)  # cu_seqlens and state_indices are integer arrays

    xla = functools.partial(_xla_backward, cfg)
    args = (inputs, h0, cu, idx, cotangents)
    if cfg.backend == "xla" or cfg.num_snapshots:
        return (*xla(*args), *no_index_grads)
    # The forward ran on a kernel family: its chunked backward wherever it supports the call.
    chunk_kw = _varlen_kwargs(cu, impl="chunked")
    families = tuple(fam for fam in cfg.families
                     if _pallas_module("chunked", fam).supports(*inputs, **chunk_kw) is None)
    if not families:
        return (*xla(*args), *no_index_grads)
    bwd = dataclasses.replace(cfg, backend="auto" if cfg.backend == "pallas" else cfg.backend,
                              families=families)
    grads = _on_platform(bwd, lambda fam: functools.partial(_pallas_backward, cfg, fam), xla)
    return (*grads(*args), *no_index_grads)


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


def _empty_call(q, v, initial_state, cu_seqlens, state_indices, dims, *, output_final_state,
                num_snapshots, state_layout, checkpoint_every=0):
    """T == 0: nothing runs; every sequence's state passes through unchanged."""
    B, _, _, Hv, K, V, _, N = dims
    o = jnp.zeros((B, 0, Hv, V), q.dtype)
    shape = (N, Hv, K, V) if state_layout == "kv" else (N, Hv, V, K)
    if initial_state is None:
        per_seq = jnp.zeros(shape, jnp.float32)
    elif state_indices is not None:
        per_seq = _gather_slots(initial_state, state_indices)
    else:
        per_seq = initial_state
    ht = None
    if output_final_state:
        ht = initial_state if initial_state is not None else per_seq
        if state_indices is not None and state_indices.write is not None and \
                state_indices.write.ndim == 1:  # a per-token table has no token to write
            ht = _scatter_slots(initial_state, state_indices, per_seq)
    if checkpoint_every:
        return o, ht, jnp.zeros((N, 0) + shape[1:], jnp.float32)
    if not num_snapshots:
        return o, ht
    return o, ht, jnp.broadcast_to(per_seq[:, None], (N, num_snapshots) + shape[1:])


def gated_delta_net(q, k, v, g, beta, *, scale: float | None = None, initial_state=None,
                    output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                    cu_seqlens=None, state_indices=None, num_snapshots: int = 0,
                    impl: str = "auto", backend: str = "auto", interpret: bool = False,
                    state_layout: str = "kv", use_gate_in_kernel: bool = False, A_log=None,
                    dt_bias=None, lower_bound: float | None = None,
                    use_beta_sigmoid_in_kernel: bool = False, segment_ids=None,
                    precision: str = "auto", output_state_indices=None,
                    has_initial_state=None, num_accepted_tokens=None,
                    checkpoint_every: int | None = None):
    """The gated delta rule (GDA or KDA) over T tokens of B independent sequences.

    Args:
      q, k: `[B, T, Hk, K]`, float32, bfloat16 or float16 (one dtype shared with v).
      v: `[B, T, Hv, V]` with `Hv % Hk == 0`; value head h reads q/k head `h // (Hv // Hk)`.
      g: log decay, `[B, T, Hv]` (GDA: one gate per head) or `[B, T, Hv, K]` (KDA: one gate
        per key channel); float32 or q's dtype. Applied as `exp(g)`, normally `g <= 0`.
      beta: `[B, T, Hv]`, float32 or q's dtype, used as given.
      scale: query scale, default `K ** -0.5`.
      initial_state: `[N, Hv, K, V]` (N = B, or the number of packed sequences), or None for
        zeros; with `state_indices`, the state pool `[P, Hv, K, V]`. float32, bfloat16 or
        float16: the maths is float32 on every path; the final state, snapshots and the
        updated pool are stored in this dtype (round to nearest). docs/spec.md 2.7.
      output_final_state: return the state after the last token (else None).
      use_qk_l2norm_in_kernel: l2-normalise q and k over K first (float32, eps 1e-6).
      cu_seqlens: int32 `[N + 1]` offsets of N sequences packed along T (B must be 1): each
        starts from its own initial state, nothing crosses a boundary. May be traced (one
        compiled program per T and N). See docs/spec.md section 2.3.
      state_indices: int32 `[N]`: sequence n reads and writes pool slot `state_indices[n]`
        of `initial_state`; -1 marks a padding entry (skipped, zero outputs). The updated pool
        is returned as final_state (needs `output_final_state=True`); other slots are left
        bit-for-bit unchanged, in place when the pool is donated. A 2-D `[N, W]` table gives
        per-token slots (speculative decoding): see num_accepted_tokens.
      num_snapshots: if > 0, also return the states after each of the last `num_snapshots`
        tokens of every sequence, `[N, num_snapshots, Hv, K, V]` (speculative decoding
        rollback); computed by the recurrent path.
      impl: "auto" (recurrent for T <= RECURRENT_MAX_T or with snapshots, else chunked),
        "reference", "recurrent" or "chunked".
      backend: "auto" (per platform, at lowering: the Triton kernels on CUDA and the Mosaic
        kernels on TPU where they support the call, else XLA), "xla", "pallas" (the kernel
        family of the platform lowered for; raises if none can serve the call), or one family:
        "pallas_triton", "pallas_mosaic_tpu". See docs/spec.md section 3.
      interpret: run Pallas kernels in interpret mode (CPU testing of the kernel code): the
        Triton kernels with "auto"/"pallas", the TPU interpreter with "pallas_mosaic_tpu".
      state_layout: "kv" (the public `[N, Hv, K, V]`) or "vk" (`[N, Hv, V, K]`, the layout the
        Pallas recurrent kernel reads natively) for initial_state, final_state and snapshots;
        a decode loop that keeps its state in the kernel's layout skips a transpose per step.

      use_gate_in_kernel: `g` is the raw gate input `a` (same shape) and the op computes
        `g = -exp(A_log) * softplus(a + dt_bias)`, or for KDA with `lower_bound`
        `g = lower_bound * sigmoid(exp(A_log) * (a + dt_bias))`, in float32.
      A_log: `[Hv]`; dt_bias: `[Hv]` (GDA) or `[Hv, K]` / `[Hv * K]` (KDA). Only with
        use_gate_in_kernel.
      lower_bound: a negative float, KDA only (fla's safe gate).
      use_beta_sigmoid_in_kernel: `beta` is the raw `b` and the op uses `sigmoid(b)`.
      precision: the XLA paths' dots between data and state: "auto" (default precision
        with float32 accumulation for 16-bit inputs, HIGHEST for float32 inputs), "highest" or
        "default". Gate cumsums, the triangular solve and the state stay float32 / HIGHEST;
        the reference always uses HIGHEST. No effect on the CPU, where both are exact.
      output_state_indices: int32 `[N]` with `state_indices` (FlashInfer's name): sequence n
        reads slot `state_indices[n]` and writes its final state to slot
        `output_state_indices[n]` (-1: writes nothing); every other slot, the read slots
        included, is left unchanged. Write slots must be distinct from each other and from the
        slots other sequences of the call read (else unspecified, no crash).
      has_initial_state: bool `[N]`: False starts sequence n from zeros without using its
        initial state or pool slot (a new request in a recycled slot).
      num_accepted_tokens: int32 `[N]` in [1, W], with per-token slots (speculative
        decoding, vLLM's form): `state_indices` is then a 2-D read table `[N, W]` (vLLM's
        `ssm_state_indices`; W == T, or with cu_seqlens W >= every sequence's length) and
        sequence n starts from slot `state_indices[n, num_accepted_tokens[n] - 1]` (None:
        column 0); `output_state_indices` `[N, W]` (default: the read table) names the slot
        that receives the state after each token p of sequence n (-1: none). A read slot of -1
        is a padding sequence (no read, no write, zero outputs). Recurrent and reference paths
        only; no gradients. See docs/spec.md section 2.5a.
      segment_ids: int `[B, T]`, documents packed into rows (MaxText / Levanter style): a
        change of nonzero id starts a new sequence from a zero state; id 0 is padding (zero
        outputs, the state passes through unchanged). A row's first real token continues from
        the row's initial state; the final state is the state after the row's last real token.
        May be traced. Not with cu_seqlens, state_indices or num_snapshots.
      checkpoint_every: a positive Python int n (prefix caching): also return `checkpoints`
        `[N, T // n, Hv, K, V]` (`[.., V, K]` for "vk"), float32: entry j of sequence n is its
        state after its token (j + 1) * n, zeros where that lies past a packed sequence's end;
        n > T gives an empty axis. Per sequence (with a pool, not written into it; zeros for
        padding entries), whatever output_final_state. XLA paths, and the Triton chunked
        kernel for n a multiple of 64 (elsewhere backend="auto" falls back to XLA and
        "pallas" raises); not with num_snapshots or segment_ids. Not
        differentiable: a gradient that needs the checkpoints' cotangent raises, while
        gradients of o and the final state work when the checkpoints go unused.
        See docs/spec.md section 2.5b.

    Returns:
      `(o, final_state)`, or `(o, final_state, snapshots)` when `num_snapshots > 0`, or
      `(o, final_state, checkpoints)` with `checkpoint_every`: o
      `[B, T, Hv, V]` in q's dtype; final_state in initial_state's dtype (float32 without one)
      and `state_layout` (the pool with
      `state_indices`), or None when `output_final_state` is False.

    Under `jit` with traced `cu_seqlens` or `state_indices`, their values cannot be checked:
    out-of-range or non-monotone offsets and repeated or out-of-range slots give unspecified
    results (no crash); a repeated slot receives one of the sequences' states.
    """
    check_gate_args(g, v, q, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log,
                    dt_bias=dt_bias, lower_bound=lower_bound,
                    use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel)
    if use_gate_in_kernel:
        g = gate_from_raw(g, A_log, dt_bias, lower_bound)
    seg_masks = None
    if segment_ids is not None:
        _check_segment_ids(segment_ids, q, cu_seqlens, state_indices, num_snapshots)
        seg_masks = segment_masks(segment_ids)
    if use_beta_sigmoid_in_kernel:
        if not hasattr(beta, "dtype") or not jnp.issubdtype(beta.dtype, jnp.floating):
            raise TypeError("beta (the raw b, with use_beta_sigmoid_in_kernel=True) must be a "
                            f"floating-point array, got {getattr(beta, 'dtype', type(beta).__name__)}")
        beta = beta_from_raw(beta)
    for name, flag in (("output_final_state", output_final_state),
                       ("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel), ("interpret", interpret)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a Python bool, got {flag!r} of type {type(flag).__name__}")
    token_slots = 0
    if is_token_table(state_indices):  # per-token slots: one read slot, a write table
        token_slots = state_indices.shape[1]
        state_indices, output_state_indices = per_token_slots(
            state_indices, output_state_indices, num_accepted_tokens, B=q.shape[0],
            T=q.shape[1], cu_seqlens=cu_seqlens, initial_state=initial_state,
            num_snapshots=num_snapshots, impl=impl)
    elif num_accepted_tokens is not None:
        raise ValueError("num_accepted_tokens needs per-token slots: a 2-D state_indices [N, W] "
                         "(it picks the column of the read slot)")
    dims = check_inputs(q, k, v, g, beta, initial_state, scale=scale, impl=impl, backend=backend,
                        state_layout=state_layout, cu_seqlens=cu_seqlens,
                        state_indices=state_indices, num_snapshots=num_snapshots,
                        output_final_state=output_final_state)
    dot_precision = _resolve_precision(precision, q.dtype)
    if seg_masks is not None:
        g, beta = apply_segments(g, beta, *seg_masks)
    _check_serving(None if token_slots else output_state_indices, has_initial_state,
                   state_indices, dims.N, initial_state)
    num_snapshots = int(num_snapshots)
    checkpoint_every = _check_checkpoint_every(checkpoint_every, num_snapshots, segment_ids)
    impl = _resolve_impl(impl, dims, num_snapshots)  # option conflicts raise even at T == 0
    if token_slots and impl == "chunked":  # "auto" past RECURRENT_MAX_T: tokens one by one
        impl = "recurrent"
    if impl == "reference":
        _resolve_backend(backend, impl, interpret, None, state_layout, {})  # raises on kernels
    if initial_state is not None and has_initial_state is not None and state_indices is None:
        initial_state = jnp.where(has_initial_state[:, None, None, None], initial_state, 0.0)
    if state_indices is not None:
        state_indices = Slots(state_indices, output_state_indices, has_initial_state)
    if dims.T == 0:  # nothing to run: the states pass through
        return _empty_call(q, v, initial_state, cu_seqlens, state_indices, dims,
                           output_final_state=output_final_state, num_snapshots=num_snapshots,
                           state_layout=state_layout, checkpoint_every=checkpoint_every)
    varlen = dict(cu_seqlens=cu_seqlens, num_snapshots=num_snapshots,
                  **({} if state_indices is None else dict(zip(
                      ("state_indices", "output_state_indices", "has_initial_state"),
                      state_indices))))
    backend, families = _resolve_backend(backend, impl, interpret,
                                         (q, k, v, g, beta, initial_state), state_layout, varlen,
                                         checkpoint_every)
    cfg = _Config(impl, backend, default_scale(scale, dims.K), use_qk_l2norm_in_kernel,
                  output_final_state, state_layout, interpret, num_snapshots,
                  state_indices is not None, families, dot_precision, token_slots=token_slots,
                  checkpoint_every=checkpoint_every)
    o, ht, snaps = _gdn(cfg, q, k, v, g, beta, initial_state, cu_seqlens, state_indices)
    if seg_masks is not None:
        o = jnp.where(seg_masks[1][..., None, None], jnp.zeros((), o.dtype), o)
    if checkpoint_every:
        o, ht, _ = _named_outputs(o, ht, None)
        return o, ht, _checkpoints_without_grad(checkpoint_name(snaps, CHECKPOINTS_NAME))
    o, ht, snaps = _named_outputs(o, ht, snaps)
    return (o, ht) if not num_snapshots else (o, ht, snaps)


_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


def _resolve_precision(precision, dtype) -> str:
    if precision == "auto":
        return "highest" if jnp.dtype(dtype) == jnp.float32 else "default"
    if precision not in _PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of ('auto', 'highest', 'default')")
    return precision


def _check_serving(out_idx, has, state_indices, N, initial_state):
    """Checks output_state_indices and has_initial_state (shapes and dtypes; values when concrete)."""
    from ._common import _concrete  # noqa: PLC0415
    if out_idx is not None:
        if state_indices is None:
            raise ValueError("output_state_indices needs state_indices (it names the pool slot each "
                             "sequence writes; state_indices names the slot it reads)")
        if not hasattr(out_idx, "dtype") or jnp.dtype(out_idx.dtype) != jnp.int32:
            raise TypeError(f"output_state_indices must be an int32 array [N], got "
                            f"{getattr(out_idx, 'dtype', type(out_idx).__name__)}")
        if tuple(out_idx.shape) != (N,):
            raise ValueError(f"output_state_indices must have shape [N]=[{N}], got "
                             f"{tuple(out_idx.shape)}")
        vals = _concrete(out_idx)
        if vals is not None:
            P = initial_state.shape[0]
            bad = (vals < -1) | (vals >= P)
            if bad.any():
                raise ValueError(f"output_state_indices must lie in [-1, P) with P={P}, got "
                                 f"{int(vals[bad][0])}")
            used = vals[vals >= 0]
            if len(set(used.tolist())) != used.size:
                raise ValueError("output_state_indices must not repeat a slot")
    if has is not None:
        if not hasattr(has, "dtype") or jnp.dtype(has.dtype) != jnp.bool_:
            raise TypeError(f"has_initial_state must be a bool array [N], got "
                            f"{getattr(has, 'dtype', type(has).__name__)}")
        if tuple(has.shape) != (N,):
            raise ValueError(f"has_initial_state must have shape [N]=[{N}], got {tuple(has.shape)}")


def _check_segment_ids(segment_ids, q, cu_seqlens, state_indices, num_snapshots):
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        raise TypeError(f"segment_ids must be an integer array [B, T], got "
                        f"{type(segment_ids).__name__}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be an integer array, got dtype {segment_ids.dtype}")
    want = tuple(q.shape[:2]) if getattr(q, "ndim", 0) == 4 else None
    if want is not None and tuple(segment_ids.shape) != want:
        raise ValueError(f"segment_ids must have shape [B, T] = {list(want)} (q's first two "
                         f"axes), got {list(segment_ids.shape)}")
    for name, x in (("cu_seqlens", cu_seqlens), ("state_indices", state_indices)):
        if x is not None:
            raise ValueError(f"segment_ids and {name} are two ways to pack sequences: pass one")
    if num_snapshots:
        raise ValueError("segment_ids with num_snapshots is not supported (snapshots are per "
                         "sequence; use cu_seqlens)")


# Names for `jax.checkpoint` policies (`jax.checkpoint_policies.save_only_these_names`). The op
# saves only its inputs for its backward (per-chunk states are recomputed there), so its
# outputs are what a remat policy chooses to keep or recompute.
REMAT_NAMES = ("gdn_output", "gdn_final_state", "gdn_snapshots")


def _named_outputs(o, ht, snaps):
    from jax.ad_checkpoint import checkpoint_name  # noqa: PLC0415
    return (checkpoint_name(o, REMAT_NAMES[0]),
            None if ht is None else checkpoint_name(ht, REMAT_NAMES[1]),
            None if snaps is None else checkpoint_name(snaps, REMAT_NAMES[2]))

CHECKPOINTS_NAME = "gdn_checkpoints"  # the remat name of the checkpoints output


def _check_checkpoint_every(n, num_snapshots: int, segment_ids) -> int:
    """checkpoint_every as an int (0 for None); raises at trace time on a bad value or a
    conflicting option."""
    if n is None:
        return 0
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"checkpoint_every must be a positive Python int or None, got {n!r} of "
                        f"type {type(n).__name__}")
    if n <= 0:
        raise ValueError(f"checkpoint_every must be a positive int, got checkpoint_every={n}")
    if num_snapshots:
        raise ValueError("checkpoint_every and num_snapshots cannot be combined: checkpoints are "
                         "the states after every n tokens of a prefill, snapshots the states after "
                         "the last tokens of a decode step; pass one")
    if segment_ids is not None:
        raise ValueError("checkpoint_every with segment_ids is not supported (checkpoints are per "
                         "sequence; use cu_seqlens)")
    return int(n)


@functools.partial(jax.custom_vjp)
def _checkpoints_without_grad(ckpts):
    """Identity whose backward raises unless the checkpoints' cotangent is a symbolic zero
    (they were not used by what is differentiated)."""
    return ckpts


def _checkpoints_fwd(ckpts):
    return ckpts.value, None


def _checkpoints_bwd(_, ct):
    if not isinstance(ct, jax.custom_derivatives.SymbolicZero):
        raise ValueError("gated_delta_net: gradients through the checkpoints (checkpoint_every) "
                         "are not supported; differentiate o and the final state only (the "
                         "checkpoints may be returned, but must not reach the differentiated "
                         "value)")
    return (None,)


_checkpoints_without_grad.defvjp(_checkpoints_fwd, _checkpoints_bwd, symbolic_zeros=True)
