"""Platform guard shared by the Pallas (Triton) kernels.

`pallas_call` with `interpret=False` only lowers for GPUs; lowered for the CPU it raises
"Only interpret mode is supported on CPU backend." which names neither the op's `backend`
argument nor the fix. `guard(...)` passes its arguments through a tiny identity primitive
whose lowering rule is chosen per platform *at lowering time*:

- cuda / rocm (and any platform without a specific rule): identity, emits nothing;
- cpu / tpu: raises a ValueError naming `backend="pallas"` and suggesting `interpret=True`
  or `backend="xla"`.

Tracing never looks at the default device, so
`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` works on a CPU-only machine.
The kernels call `guard` on their inputs only when `interpret=False`, before `pallas_call`,
so the clear error is raised before pallas_call's own one.
"""
from __future__ import annotations

import functools

from jax._src import dispatch
from jax.extend.core import Primitive
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
