"""Platform plumbing shared by the Pallas kernels: the guard and the per-platform dispatch.

`guard(...)`: `pallas_call` with `interpret=False` only lowers for GPUs; lowered for the CPU
it raises "Only interpret mode is supported on CPU backend." which names neither the op's
`backend` argument nor the fix. `guard` passes its arguments through a tiny identity
primitive whose lowering rule is chosen per platform *at lowering time*:

- cuda / rocm (and any platform without a specific rule): identity, emits nothing;
- cpu / tpu: raises a ValueError naming `backend="pallas"` and suggesting `interpret=True`
  or `backend="xla"`.

Tracing never looks at the default device, so lowering for CUDA works on a CPU-only machine
(with `gdn_jax.lowering` on jax >= 0.11). The kernels call `guard` on their inputs only when
`interpret=False`, before `pallas_call`, so the clear error is raised before pallas_call's own.

`by_platform(...)`: the op's `backend="auto"` dispatch (kernel on CUDA, XLA elsewhere), with
each branch lowered only for its own platforms, so multi-platform lowering and export work.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax._src import dispatch, effects
from jax._src.interpreters import mlir as _mlir
from jax.extend.core import Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir

GPU_PLATFORMS = ("cuda", "rocm")

_guard_p = Primitive("gdn_pallas_platform_guard")
_guard_p.multiple_results = True


def _abstract_eval(*avals, what):
    del what
    return avals


# Eager use (outside jit): compile the primitive alone (cached) so the per-platform lowering decides.
_impl = functools.partial(dispatch.apply_primitive, _guard_p)


def _identity_lowering(ctx, *xs, what):
    del ctx, what
    return xs


def _raising_lowering(platform):
    def rule(ctx, *xs, what):
        del ctx, xs
        raise ValueError(
            f"gdn_jax: backend=\"pallas\" ({what}) runs Pallas Triton kernels, which need an NVIDIA GPU "
            f"(cuda); this program is being lowered for the {platform.upper()}. Pass interpret=True to run "
            f"the Pallas kernel in interpret mode on the {platform.upper()}, or use backend=\"xla\" "
            f"(backend=\"auto\" picks XLA off-GPU).")
    return rule


_guard_p.def_impl(_impl)
_guard_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_guard_p, _identity_lowering)
for _plat in ("cpu", "tpu"):
    mlir.register_lowering(_guard_p, _raising_lowering(_plat), platform=_plat)


def _batch(args, dims, *, what):
    return _guard_p.bind(*args, what=what), list(dims)


def _jvp(primals, tangents, *, what):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return _guard_p.bind(*primals, what=what), tangents


batching.primitive_batchers[_guard_p] = _batch
ad.primitive_jvps[_guard_p] = _jvp


def guard(*xs, what: str = "kernel", interpret: bool = False):
    """Returns `xs` unchanged; lowering them for the CPU or TPU raises (unless interpret).

    None entries are passed through untouched.
    """
    if interpret:
        return xs
    idx = [i for i, x in enumerate(xs) if x is not None]
    if not idx:
        return xs
    out = list(xs)
    res = _guard_p.bind(*(xs[i] for i in idx), what=what)
    for i, r in zip(idx, res):
        out[i] = r
    return tuple(out)


# --------------------------------------------------------------------------------------
# Per-platform dispatch whose branches are lowered only for their own platforms
# --------------------------------------------------------------------------------------
# `jax.lax.platform_dependent` lowers every branch for every lowering platform: with
# `lowering_platforms=("cpu", "cuda")` the CUDA branch's pallas_call is also lowered for the
# CPU, where Pallas Triton cannot lower. `by_platform` binds a primitive whose lowering rule
# lowers each branch under a context narrowed to that branch's platforms (the mechanism
# `mlir.lower_per_platform` provides), so a multi-platform program (and a multi-platform
# `jax.export`) gets the kernel on CUDA and the XLA path elsewhere.

_select_p = Primitive("gdn_by_platform")
_select_p.multiple_results = True


def _branch_avals(branches):
    outs = [tuple((a.shape, a.dtype) for a in b.out_avals) for b in branches]
    if any(o != outs[0] for o in outs[1:]):
        raise TypeError(f"gdn_jax: by_platform branches disagree on their outputs: {outs}")
    return branches[-1].out_avals


def _select_abstract_eval(*avals, branches, platforms):
    del avals, platforms
    return _branch_avals(branches)


def _select_lowering(ctx, *args, branches, platforms):
    rules = {}
    default = None
    for branch, plats in zip(branches, platforms):
        rule = mlir.lower_fun(jaxpr_as_fun(branch), multiple_results=True)
        if plats is None:
            default = rule
        else:
            rules.update({p: rule for p in plats})
    return _mlir.lower_per_platform(ctx, "gdn_by_platform", rules, default, effects.no_effects,
                                    *args)


def _select_batch(args, dims, *, branches, platforms):
    in_axes = [d if isinstance(d, int) else None for d in dims]  # unmapped: None
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in args]
    vmapped = [jax.make_jaxpr(jax.vmap(jaxpr_as_fun(b), in_axes=in_axes))(*avals)
               for b in branches]
    outs = _select_p.bind(*args, branches=tuple(vmapped), platforms=platforms)
    return outs, [0] * len(outs)


_select_p.def_impl(functools.partial(dispatch.apply_primitive, _select_p))
_select_p.def_abstract_eval(_select_abstract_eval)
mlir.register_lowering(_select_p, _select_lowering)
batching.primitive_batchers[_select_p] = _select_batch


def by_platform(*args, default: Callable, **per_platform: Callable):
    """`per_platform[p](*args)` on platform p, `default(*args)` elsewhere, decided at lowering.

    Like `jax.lax.platform_dependent`, but each branch is lowered only for the platforms it
    serves, so a Pallas Triton branch (`cuda=...`) survives a multi-platform lowering such as
    `lowering_platforms=("cpu", "cuda")`. `args` are pytrees of arrays; the branches must take
    everything they use as arguments (no closed-over tracers) and return pytrees of one
    structure, shapes and dtypes.
    """
    flat, in_tree = jax.tree.flatten(args)
    avals = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in flat]
    names = list(per_platform) + [None]
    fns = list(per_platform.values()) + [default]
    branches, out_trees = [], []
    for fn in fns:
        def flat_fn(*xs, fn=fn):
            out = fn(*jax.tree.unflatten(in_tree, xs))
            leaves, tree = jax.tree.flatten(out)
            out_trees.append(tree)
            return leaves
        branches.append(jax.make_jaxpr(flat_fn)(*avals))
    if any(t != out_trees[0] for t in out_trees[1:]):
        raise TypeError(f"gdn_jax: by_platform branches return different structures: {out_trees}")
    if any(b.effects for b in branches):
        raise TypeError("gdn_jax: by_platform branches must be free of side effects")
    platforms = tuple(None if n is None else (n,) for n in names)
    outs = _select_p.bind(*flat, branches=tuple(branches), platforms=platforms)
    return jax.tree.unflatten(out_trees[0], outs)
