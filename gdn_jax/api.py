"""The public op: argument checks, path selection, and the `jax.custom_vjp` around it.

Forward runs the selected path (reference scan, XLA recurrent, XLA chunked, or a Pallas
kernel); the backward is autodiff of a memory-lean XLA path on the saved inputs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from ._common import Dims, check_inputs, default_scale
from .chunked import chunked_gated_delta_net
from .recurrent import recurrent_gated_delta_net
from .reference import reference_gated_delta_net

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
    backend: str  # "xla" | "pallas" | "auto-pallas" (Pallas on GPU, XLA elsewhere)
    scale: float
    use_qk_l2norm: bool
    output_final_state: bool
    state_layout: str  # layout of h0 and of the returned state: "kv" or "vk"
    interpret: bool


def _resolve_impl(impl: str, dims: Dims) -> str:
    if impl != "auto":
        return impl
    return "recurrent" if dims.T <= RECURRENT_MAX_T else "chunked"


def _pallas_module(impl: str):
    """The Pallas kernel module for `impl` ("recurrent" or "chunked"), or None for the reference."""
    if impl == "recurrent":
        from .kernels import recurrent as mod  # noqa: PLC0415
    elif impl == "chunked":
        from .kernels import chunked as mod  # noqa: PLC0415
    else:
        return None
    return mod


def _resolve_backend(backend: str, impl: str, interpret: bool, args, state_layout: str) -> str:
    """Returns "xla", "pallas" or "auto-pallas"; raises if an explicit request cannot be served."""
    if impl == "reference":
        if backend == "pallas":
            raise ValueError('backend="pallas" has no kernel for impl="reference"; the reference is '
                             'plain XLA: use backend="auto" or "xla"')
        return "xla"
    if backend == "xla":
        return "xla"
    reason = _pallas_module(impl).supports(*args, state_layout=state_layout)
    if backend == "pallas":
        if reason is not None:
            raise ValueError(f'backend="pallas" cannot serve impl="{impl}" for this call: {reason}. '
                             'Use backend="auto" to fall back to XLA.')
        return "pallas"
    # backend == "auto": the kernel where it supports the call, on GPU (or anywhere in interpret mode).
    if reason is not None:
        return "xla"
    return "pallas" if interpret else "auto-pallas"


def _xla_fn(cfg: _Config, impl: str):
    """An XLA path in the op's calling convention: h0 may be None or in the "vk" layout."""
    path = functools.partial(XLA_PATHS[impl], scale=cfg.scale, use_qk_l2norm=cfg.use_qk_l2norm)

    def fn(q, k, v, g, beta, h0):
        B, _, _, K = q.shape
        Hv, V = v.shape[2:]
        if h0 is None:
            h0 = jnp.zeros((B, Hv, K, V), jnp.float32)
        elif cfg.state_layout == "vk":
            h0 = jnp.swapaxes(h0, -1, -2)
        o, ht = path(q, k, v, g, beta, h0)
        if not cfg.output_final_state:
            return o, None
        return o, (jnp.swapaxes(ht, -1, -2) if cfg.state_layout == "vk" else ht)

    return fn


def _on_platform(cfg: _Config, pallas_fn, xla_fn):
    """Pallas for backend "pallas"; for "auto-pallas" the platform decides at lowering (Pallas
    on CUDA, XLA elsewhere), so lowering for CUDA works on a machine without a GPU."""
    if cfg.backend == "pallas":
        return pallas_fn
    return lambda *a: jax.lax.platform_dependent(*a, cuda=pallas_fn, default=xla_fn)


def _forward(cfg: _Config, q, k, v, g, beta, h0, *, alias_state: bool):
    """Runs the selected path. alias_state: let the recurrent kernel write the final state over
    the initial one (in place when the caller donates it); off when h0 is kept for the backward."""
    xla_fn = _xla_fn(cfg, cfg.impl)
    if cfg.backend == "xla":
        return xla_fn(q, k, v, g, beta, h0)
    kw = dict(scale=cfg.scale, use_qk_l2norm=cfg.use_qk_l2norm,
              output_final_state=cfg.output_final_state, interpret=cfg.interpret)
    if cfg.impl == "recurrent":
        from .kernels.recurrent import fused_recurrent  # noqa: PLC0415

        def pallas_fn(q, k, v, g, beta, h0):
            return fused_recurrent(q, k, v, g, beta, h0, state_layout=cfg.state_layout,
                                   alias_state=alias_state, **kw)
    else:
        from .kernels.chunked import chunked_forward  # noqa: PLC0415

        def pallas_fn(q, k, v, g, beta, h0):  # supports() declined "vk" already
            return chunked_forward(q, k, v, g, beta, h0, **kw)

    return _on_platform(cfg, pallas_fn, xla_fn)(q, k, v, g, beta, h0)


def _xla_backward(cfg: _Config, inputs, h0, cotangents):
    """Gradients by autodiff of a memory-lean XLA path on the saved inputs."""
    impl = cfg.impl
    if impl == "recurrent" and inputs[0].shape[1] > RECURRENT_BWD_MAX_T:
        impl = "chunked"
    fn = _xla_fn(cfg, impl)
    if h0 is None:  # no state to differentiate: keep None out of jax.vjp
        _, vjp = jax.vjp(lambda *a: fn(*a, None), *inputs)
        return (*vjp(cotangents), None)
    _, vjp = jax.vjp(fn, *inputs, h0)
    return vjp(cotangents)


def _pallas_backward(cfg: _Config, inputs, h0, cotangents):
    """Gradients by the Pallas chunked backward kernels (state in the "kv" layout inside)."""
    from .kernels.chunked import chunked_backward  # noqa: PLC0415

    do, dht = cotangents
    vk = cfg.state_layout == "vk"
    if vk:
        h0 = None if h0 is None else jnp.swapaxes(h0, -1, -2)
        dht = None if dht is None else jnp.swapaxes(dht, -1, -2)
    *grads, dh0 = chunked_backward(*inputs, h0, do, dht, scale=cfg.scale,
                                   use_qk_l2norm=cfg.use_qk_l2norm, interpret=cfg.interpret)
    if vk and dh0 is not None:
        dh0 = jnp.swapaxes(dh0, -1, -2)
    return (*grads, dh0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdn(cfg: _Config, q, k, v, g, beta, h0):
    return _forward(cfg, q, k, v, g, beta, h0, alias_state=True)


def _gdn_fwd(cfg, q, k, v, g, beta, h0):
    return _forward(cfg, q, k, v, g, beta, h0, alias_state=False), (q, k, v, g, beta, h0)


def _gdn_bwd(cfg, residuals, cotangents):
    *inputs, h0 = residuals
    xla = functools.partial(_xla_backward, cfg)
    if cfg.backend == "xla":
        return xla(inputs, h0, cotangents)
    # The forward ran on Pallas: use the Pallas chunked backward wherever it supports the call.
    from .kernels.chunked import supports  # noqa: PLC0415
    if supports(*inputs) is not None:  # (h0's shape was checked at the entry)
        return xla(inputs, h0, cotangents)
    pallas = functools.partial(_pallas_backward, cfg)
    if cfg.backend == "pallas":
        return pallas(inputs, h0, cotangents)
    return jax.lax.platform_dependent(inputs, h0, cotangents, cuda=pallas, default=xla)


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


def gated_delta_net(q, k, v, g, beta, *, scale: float | None = None, initial_state=None,
                    output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                    impl: str = "auto", backend: str = "auto", interpret: bool = False,
                    state_layout: str = "kv"):
    """The gated delta rule (GDA or KDA) over T tokens of B independent sequences.

    Args:
      q, k: `[B, T, Hk, K]`, float32, bfloat16 or float16 (one dtype shared with v).
      v: `[B, T, Hv, V]` with `Hv % Hk == 0`; value head h reads q/k head `h // (Hv // Hk)`.
      g: log decay, `[B, T, Hv]` (GDA: one gate per head) or `[B, T, Hv, K]` (KDA: one gate
        per key channel); float32 or q's dtype. Applied as `exp(g)`, normally `g <= 0`.
      beta: `[B, T, Hv]`, float32 or q's dtype, used as given.
      scale: query scale, default `K ** -0.5`.
      initial_state: `[B, Hv, K, V]` float32, or None for zeros.
      output_final_state: return the state after the last token (else None).
      use_qk_l2norm_in_kernel: l2-normalise q and k over K first (float32, eps 1e-6).
      impl: "auto" (recurrent for T <= RECURRENT_MAX_T, else chunked), "reference",
        "recurrent" or "chunked".
      backend: "auto" (a Pallas kernel on GPU where one supports the call, else XLA), "xla"
        or "pallas" (raises if no kernel can serve the call).
      interpret: run Pallas kernels in interpret mode (CPU testing of the kernel code).
      state_layout: "kv" (the public `[N, Hv, K, V]`) or "vk" (`[N, Hv, V, K]`, the layout the
        Pallas recurrent kernel reads natively) for initial_state and final_state; a decode loop
        that keeps its state in the kernel's layout skips a transpose per step.

    Returns:
      `(o, final_state)`: o `[B, T, Hv, V]` in q's dtype; final_state float32 in
      `state_layout`, or None when `output_final_state` is False.
    """
    dims = check_inputs(q, k, v, g, beta, initial_state, scale=scale, impl=impl, backend=backend,
                        state_layout=state_layout)
    for name, flag in (("output_final_state", output_final_state),
                       ("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel), ("interpret", interpret)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    B, T, Hk, Hv, K, V, _ = dims
    if T == 0:  # nothing to run: the state passes through
        o = jnp.zeros((B, 0, Hv, V), q.dtype)
        if not output_final_state:
            return o, None
        shape = (B, Hv, K, V) if state_layout == "kv" else (B, Hv, V, K)
        return o, (jnp.zeros(shape, jnp.float32) if initial_state is None else initial_state)
    impl = _resolve_impl(impl, dims)
    backend = _resolve_backend(backend, impl, interpret,
                               (q, k, v, g, beta, initial_state), state_layout)
    cfg = _Config(impl, backend, default_scale(scale, K), use_qk_l2norm_in_kernel,
                  output_final_state, state_layout, interpret)
    return _gdn(cfg, q, k, v, g, beta, initial_state)
