"""Bad input raises a clear error at trace time, naming the argument (docs/spec.md section 4.5)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net

B, T, Hk, Hv, K, V = 2, 5, 2, 4, 16, 8


def _args(**over):
    s = jax.ShapeDtypeStruct
    a = dict(q=s((B, T, Hk, K), jnp.float32), k=s((B, T, Hk, K), jnp.float32),
             v=s((B, T, Hv, V), jnp.float32), g=s((B, T, Hv), jnp.float32),
             beta=s((B, T, Hv), jnp.float32))
    a.update(over)
    return a


def _trace(kwargs=None, **over):
    """Traces the op under jit with abstract inputs: errors must come at trace time."""
    a = _args(**over)
    kwargs = kwargs or {}
    state = kwargs.pop("initial_state", None)

    def f(q, k, v, g, beta, state):
        return gated_delta_net(q, k, v, g, beta, initial_state=state, **kwargs)

    return jax.jit(f).trace(a["q"], a["k"], a["v"], a["g"], a["beta"], state)


S = jax.ShapeDtypeStruct
BAD = [
    # (overrides, op kwargs, exception, words the message must contain)
    (dict(q=S((B, T, K), jnp.float32)), {}, ValueError, ["q", "rank 4", str((B, T, K))]),
    (dict(k=S((B, T, Hk, K + 1), jnp.float32)), {}, ValueError, ["k", "q.shape", "k.shape"]),
    (dict(v=S((B, T + 1, Hv, V), jnp.float32)), {}, ValueError, ["v", "axes 0 and 1"]),
    (dict(v=S((B, T, 3, V), jnp.float32)), {}, ValueError, ["multiple", "Hv=3", "Hk=2"]),
    (dict(g=S((B, T, Hv, V + 1), jnp.float32)), {}, ValueError, ["g", "GDA", "KDA", "g.shape"]),
    (dict(g=S((B, T, Hk), jnp.float32)), {}, ValueError, ["g.shape", str((B, T, Hk))]),
    (dict(beta=S((B, T, Hv, 1), jnp.float32)), {}, ValueError, ["beta", "beta.shape"]),
    (dict(q=S((B, T, Hk, K), jnp.int32), k=S((B, T, Hk, K), jnp.int32),
          v=S((B, T, Hv, V), jnp.int32)), {}, TypeError, ["q", "int32"]),
    (dict(k=S((B, T, Hk, K), jnp.bfloat16)), {}, TypeError, ["share one dtype", "bfloat16"]),
    (dict(g=S((B, T, Hv), jnp.int32)), {}, TypeError, ["g", "int32"]),
    (dict(beta=S((B, T, Hv), jnp.float16)), {}, TypeError, ["beta", "float16"]),
    ({}, dict(initial_state=S((B, Hv, V, K), jnp.float32)), ValueError,
     ["initial_state", "[N, Hv, K, V]", str((B, Hv, V, K))]),
    ({}, dict(initial_state=S((B + 1, Hv, K, V), jnp.float32)), ValueError, ["initial_state"]),
    ({}, dict(initial_state=S((B, Hv, K, V), jnp.int32)), TypeError, ["initial_state", "int32"]),
    ({}, dict(state_layout="vk", initial_state=S((B, Hv, K, V), jnp.float32)), ValueError,
     ["initial_state", "[N, Hv, V, K]"]),
    ({}, dict(impl="fast"), ValueError, ["impl", "'fast'"]),
    ({}, dict(backend="cuda"), ValueError, ["backend", "'cuda'"]),
    ({}, dict(state_layout="kvv"), ValueError, ["state_layout"]),
    ({}, dict(scale="0.1"), TypeError, ["scale", "str"]),
    ({}, dict(output_final_state=1), TypeError, ["output_final_state", "bool"]),
    ({}, dict(impl="reference", backend="pallas"), ValueError, ["backend", "reference"]),
    (dict(v=S((B, T, Hv * V), jnp.float32)), {}, ValueError, ["v", "rank 4", str((B, T, Hv * V))]),
    (dict(v=S((B + 1, T, Hv, V), jnp.float32)), {}, ValueError, ["v", "axes 0 and 1", "v.shape"]),
    (dict(beta=S((B, T, Hv), jnp.int32)), {}, TypeError, ["beta", "int32", "floating"]),
    (dict(g=S((B, T, Hv), jnp.float16)), {}, TypeError, ["g", "float16", "q.dtype=float32"]),
    (dict(q=S((B, T, Hk, 0), jnp.float32), k=S((B, T, Hk, 0), jnp.float32)), {}, ValueError,
     ["positive", "K=0", "q.shape[3]"]),
    (dict(v=S((B, T, Hv, 0), jnp.float32)), {}, ValueError, ["positive", "V=0", "v.shape[3]"]),
    (dict(q=S((B, T, 0, K), jnp.float32), k=S((B, T, 0, K), jnp.float32)), {}, ValueError,
     ["positive", "Hk=0"]),
    ({}, dict(scale=float("nan")), ValueError, ["scale", "finite", "nan"]),
    ({}, dict(scale=float("-inf")), ValueError, ["scale", "finite", "inf"]),
    ({}, dict(scale=True), TypeError, ["scale", "bool"]),
    ({}, dict(use_qk_l2norm_in_kernel=1), TypeError, ["use_qk_l2norm_in_kernel", "bool", "int"]),
    ({}, dict(interpret="yes"), TypeError, ["interpret", "bool", "'yes'"]),
    ({}, dict(output_final_state=np.True_), TypeError, ["output_final_state", "Python bool"]),
    ({}, dict(num_snapshots=True), TypeError, ["num_snapshots", "int", "bool"]),
    ({}, dict(num_snapshots=2.0), TypeError, ["num_snapshots", "int", "float"]),
    ({}, dict(impl=None), ValueError, ["impl=None"]),
    ({}, dict(state_indices=S((B,), jnp.float32), initial_state=S((3, Hv, K, V), jnp.float32),
              output_final_state=True), TypeError, ["state_indices", "int32", "float32"]),
    ({}, dict(state_indices=S((B,), jnp.int16), initial_state=S((3, Hv, K, V), jnp.float32),
              output_final_state=True), TypeError, ["state_indices", "int32", "int16"]),
    ({}, dict(cu_seqlens=S((3,), jnp.uint32)), TypeError, ["cu_seqlens", "int32", "uint32"]),
]


@pytest.mark.parametrize("over,kwargs,exc,words", BAD, ids=lambda x: None)
def test_bad_input_raises_at_trace_time(over, kwargs, exc, words):
    with pytest.raises(exc) as info:
        _trace(dict(kwargs), **over)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in error message {msg!r}"


def _concrete(**over):
    a = {n: jnp.zeros(x.shape, x.dtype) for n, x in _args().items()}
    a.update(over)
    return a


@pytest.mark.parametrize("name,value", [
    ("q", [[0.0]]), ("k", np.zeros((B, T, Hk, K)).tolist()), ("v", 1.0), ("g", None),
    ("beta", (0.5,))])
def test_non_array_inputs_raise_naming_the_argument(name, value):
    a = _concrete(**{name: value})
    with pytest.raises(TypeError, match=f"^{name} must be an array, got {type(value).__name__}"):
        gated_delta_net(*a.values())


@pytest.mark.parametrize("kw,words", [
    (dict(initial_state=[[0.0]]), ["initial_state", "array", "list"]),
    (dict(cu_seqlens=[0, T]), ["cu_seqlens", "int32 array", "list"]),
    (dict(state_indices=[0, 1], initial_state=jnp.zeros((3, Hv, K, V)), output_final_state=True),
     ["state_indices", "int32 array", "list"]),
    # numpy int64 is not silently narrowed (jnp would, where x64 is off)
    (dict(state_indices=np.asarray([0, 1]), initial_state=jnp.zeros((3, Hv, K, V)),
          output_final_state=True), ["state_indices", "int32", "int64"]),
    (dict(scale=jnp.float32(0.5)), ["scale", "Python float"]),
])
def test_non_array_and_wrong_kind_options_raise(kw, words):
    with pytest.raises(TypeError) as info:
        gated_delta_net(*_concrete().values(), **kw)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_traced_scale_is_rejected():
    a = _args()
    with pytest.raises(TypeError, match="scale"):
        jax.jit(lambda s: gated_delta_net(*(jnp.zeros(x.shape, x.dtype) for x in a.values()),
                                          scale=s)).trace(0.5)


def test_valid_inputs_trace():
    """The baseline of the table above traces (so each bad case fails for its own reason)."""
    _trace()
    _trace(dict(initial_state=S((B, Hv, K, V), jnp.float32), output_final_state=True))
    _trace(dict(initial_state=S((B, Hv, V, K), jnp.float32), state_layout="vk"))
    _trace(g=S((B, T, Hv, K), jnp.float32))
    _trace(q=S((B, T, Hk, K), jnp.bfloat16), k=S((B, T, Hk, K), jnp.bfloat16),
           v=S((B, T, Hv, V), jnp.bfloat16), beta=S((B, T, Hv), jnp.bfloat16))
