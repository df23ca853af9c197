"""Flax NNX modules over the functional blocks of `gdn_jax.layers`.

    from gdn_jax.nnx import GatedDeltaNet
    layer = GatedDeltaNet(cfg, rngs=nnx.Rngs(0))                  # random init
    layer = GatedDeltaNet.from_state_dict(sd, cfg, prefix=prefix)  # Hugging Face weights
    y, cache = layer(x)            # prefill; then layer(x_next, cache): decode / continued prefill

Each module holds the parameter pytree of its functional block as `nnx.Param`s of the same
names and calls the block, so a module and `layers.gdn_block` / `layers.kda_block` with the
same parameters give the same numbers. Model writers get Flax's module system (state
handling, `nnx.jit`, `nnx.grad`, optax through `nnx.Optimizer`) without this library
writing one; the functional API stays free of it. Needs the `flax` extra.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

try:
    from flax import nnx
except ImportError as e:  # the functional API needs nothing; only this module needs Flax
    raise ImportError(
        "gdn_jax.nnx needs Flax: pip install 'gdn_jax[flax]' (gdn_jax.layers and "
        "gdn_jax.weights work without it)") from e

import jax
import jax.numpy as jnp
import numpy as np

from . import layers, weights

__all__ = ["GatedDeltaNet", "KimiDeltaAttention"]


def _float_dtype(name: str, dtype):
    if dtype is None:
        return None
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name}={dtype!r} is not a dtype") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{name}={dt} is not a floating dtype (expected float32, bfloat16 or float16)")
    return dt


class _LinearAttention(nnx.Module):
    """The shared part: parameters as `nnx.Param`s named as the functional pytree's keys."""

    _config_cls: type
    _init_params: Callable
    _block: Callable
    _init_cache: Callable

    def __init__(self, config, *, rngs: nnx.Rngs | None = None, params: Mapping | None = None,
                 param_dtype=None, dtype=None, impl: str = "auto", backend: str = "auto"):
        config = self._coerce_config(config)
        param_dtype = _float_dtype("param_dtype", param_dtype)
        if (rngs is None) == (params is None):
            raise TypeError(f"{type(self).__name__}: pass exactly one of rngs= (random init) and "
                            f"params= (a parameter pytree), got "
                            f"{'both' if rngs is not None else 'neither'}")
        init = type(self)._init_params
        if params is None:
            if not isinstance(rngs, nnx.Rngs):
                raise TypeError(f"rngs: expected a flax.nnx.Rngs, got {type(rngs).__name__}")
            params = init(rngs.params(), config, dtype=param_dtype or jnp.float32)
        else:
            params = self._checked(params, jax.eval_shape(
                lambda: init(jax.random.key(0), config, dtype=jnp.float32)), param_dtype)
        self.config = config
        self.dtype = _float_dtype("dtype", dtype)
        self.impl = impl
        self.backend = backend
        self._param_names = tuple(params)
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    @classmethod
    def _coerce_config(cls, config):
        if isinstance(config, cls._config_cls):
            return config
        try:
            return cls._config_cls.from_hf_config(config)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise TypeError(f"config: expected a {cls._config_cls.__name__} or a transformers config "
                            f"(object or config.json dict) with its fields, got "
                            f"{type(config).__name__} ({e})") from e

    @classmethod
    def _checked(cls, params, expected, param_dtype):
        if not isinstance(params, Mapping):
            raise TypeError(f"params: expected a dict of arrays, got {type(params).__name__}")
        if set(params) != set(expected):
            raise ValueError(f"params: keys {sorted(params)} are not the keys of the "
                             f"{cls.__name__} pytree {sorted(expected)}")
        out = {}
        for name in expected:
            value = jnp.asarray(params[name])
            if value.shape != expected[name].shape:
                raise ValueError(f"params[{name!r}] has shape {value.shape}, expected "
                                 f"{expected[name].shape} for this config")
            if not jnp.issubdtype(value.dtype, jnp.floating):
                raise TypeError(f"params[{name!r}] has dtype {value.dtype}, expected a floating dtype")
            out[name] = value if param_dtype is None else value.astype(param_dtype)
        return out

    def functional_params(self) -> dict:
        """The parameter pytree of the functional block (the arrays these `nnx.Param`s hold)."""
        return {name: getattr(self, name)[...] for name in self._param_names}

    def init_cache(self, batch: int, dtype=jnp.float32) -> layers.LinearAttentionCache:
        """An all-zero cache: passing it is the same as `cache=None`."""
        return type(self)._init_cache(self.config, batch, dtype)

    def __call__(self, x: jax.Array, cache: layers.LinearAttentionCache | None = None, *,
                 attention_mask: jax.Array | None = None):
        """`x` `[B, T, hidden]` and a cache or None -> `(y [B, T, hidden], new_cache)`.

        Prefill (cache None), decode (T = 1) and continued prefill (T > 1 with a cache) are one
        call, as in the functional block; the module keeps no state between calls.
        """
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 3 or shape[-1] != self.config.hidden_size:
            raise ValueError(f"x: expected shape [B, T, hidden_size={self.config.hidden_size}], "
                             f"got {shape}")
        params = self.functional_params()
        if self.dtype is not None:
            x = x.astype(self.dtype)
            params = {k: v.astype(self.dtype) for k, v in params.items()}
        return type(self)._block(params, x, cache, config=self.config,
                                 attention_mask=attention_mask, impl=self.impl,
                                 backend=self.backend)


class GatedDeltaNet(_LinearAttention):
    """The Qwen3-Next / Qwen3.5 GatedDeltaNet block (`layers.gdn_block`) as an NNX module.

    `GatedDeltaNet(config, *, rngs)` draws parameters as `layers.init_gdn_params` does (from
    `rngs.params()`); `params=` starts from a given pytree instead. config: a
    `layers.GatedDeltaNetConfig` or a transformers `Qwen3NextConfig` / `Qwen3_5TextConfig`
    (or its `config.json` dict). param_dtype: the dtype of the parameters (None: float32 for a
    random init, the given dtype otherwise). dtype: the computation dtype (x and the
    parameters are cast to it on each call; None: as they are). impl, backend: passed to the op.
    """

    _config_cls = layers.GatedDeltaNetConfig
    _init_params = staticmethod(layers.init_gdn_params)
    _block = staticmethod(layers.gdn_block)
    _init_cache = staticmethod(layers.init_gdn_cache)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], config, prefix: str = "", *,
                        layout: str | None = None, param_dtype=None, dtype=None,
                        impl: str = "auto", backend: str = "auto") -> "GatedDeltaNet":
        """From a Hugging Face state dict (names as `weights.gdn_params_from_state_dict` reads
        them, e.g. prefix "model.layers.0.linear_attn."). layout: "qwen3_5" or "qwen3_next";
        by default whichever the keys show, and the module's config records it."""
        config = cls._coerce_config(config)
        if layout is None:
            layout = "qwen3_next" if prefix + "in_proj_qkvz.weight" in state_dict else "qwen3_5"
        params = weights.gdn_params_from_state_dict(state_dict, config, prefix=prefix, layout=layout,
                                                    dtype=_float_dtype("param_dtype", param_dtype))
        return cls(dataclasses.replace(config, layout=layout), params=params, dtype=dtype,
                   impl=impl, backend=backend)

    def to_state_dict(self, prefix: str = "", layout: str | None = None) -> dict[str, np.ndarray]:
        """The Hugging Face state dict (torch layouts) of these parameters; layout defaults to
        the config's."""
        return weights.gdn_params_to_state_dict(self.functional_params(), self.config, prefix=prefix,
                                                layout=layout or self.config.layout)


class KimiDeltaAttention(_LinearAttention):
    """The Kimi Linear KDA block (`layers.kda_block`) as an NNX module.

    Arguments as for `GatedDeltaNet`; config: a `layers.KimiDeltaAttentionConfig` or a
    transformers `KimiLinearConfig` (or the checkpoint's `config.json` dict).
    """

    _config_cls = layers.KimiDeltaAttentionConfig
    _init_params = staticmethod(layers.init_kda_params)
    _block = staticmethod(layers.kda_block)
    _init_cache = staticmethod(layers.init_kda_cache)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], config, prefix: str = "", *,
                        param_dtype=None, dtype=None, impl: str = "auto",
                        backend: str = "auto") -> "KimiDeltaAttention":
        """From a Kimi Linear state dict: transformers module names or the released
        checkpoint's (`weights.kda_params_from_state_dict`)."""
        config = cls._coerce_config(config)
        params = weights.kda_params_from_state_dict(state_dict, config, prefix=prefix,
                                                    dtype=_float_dtype("param_dtype", param_dtype))
        return cls(config, params=params, dtype=dtype, impl=impl, backend=backend)

    def to_state_dict(self, prefix: str = "", naming: str = "transformers") -> dict[str, np.ndarray]:
        """The state dict of these parameters; naming: "transformers" or "checkpoint"."""
        return weights.kda_params_to_state_dict(self.functional_params(), self.config,
                                                prefix=prefix, naming=naming)
