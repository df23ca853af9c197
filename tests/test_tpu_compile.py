"""Deviceless compile of the Mosaic TPU kernels for v5e and v6e with libtpu (no TPU needed):
the prefill forward + backward at B=1, T=8192, Hk=16, Hv=32, K=V=128 bf16 and a decode step
of N=256 sequences into a pool of 512 slots, GDA and KDA. Each program must compile with its
kernels as `tpu_custom_call`s (Mosaic), within the kernels' VMEM limits.

Needs the `tpu-compile` extra (`jax[tpu]`, which pins the matching libtpu); skipped without it.
"""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install '.[tpu-compile]')")

BF16, F32 = jnp.bfloat16, jnp.float32
B, T, HK, HV, K, V = 1, 8192, 16, 32, 128, 128
N, P = 256, 512
CHIPS = ("v5e", "v6e")
# libtpu takes a machine-wide lock file by default; compiling without a TPU needs no exclusive
# access, and CI runs other libtpu users (this suite's subprocesses) beside this one.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def compile_for(chip, fn, *shapes, donate=()):
    """Traces, lowers (under jax.set_mesh of the topology) and compiles fn for one chip of
    `chip`:2x2; inputs are ShapeDtypeStructs on that chip's device."""
    from jax.experimental import topologies  # noqa: PLC0415

    topo = topologies.get_topology_desc(f"{chip}:2x2", platform="tpu")
    dev = topo.devices[0]
    sharding = jax.sharding.SingleDeviceSharding(dev)
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    with jax.set_mesh(jax.sharding.Mesh(topo.devices[:1], ("x",))):
        lowered = jax.jit(fn, donate_argnums=donate).trace(*args).lower()
    return lowered.compile().as_text()


def gate_shape(kda, b, t):
    return (b, t, HV, K) if kda else (b, t, HV)


def chips_and_modes(everyday):
    """chip x mode params (ids "chip-GDA" / "chip-KDA"); `everyday` runs in the everyday tier."""
    return pytest.mark.parametrize("chip,kda", [
        pytest.param(chip, kda, id=f"{chip}-{'KDA' if kda else 'GDA'}",
                     marks=() if (chip, kda) == everyday else pytest.mark.slow)
        for chip in CHIPS for kda in (False, True)])


@chips_and_modes(("v6e", True))
def test_prefill_forward_and_backward_compile(chip, kda):
    from gdn_jax.kernels.tpu import chunked  # noqa: PLC0415

    def fn(q, k, v, g, beta, h0, do, dht):
        o, ht = chunked.chunked_forward(q, k, v, g, beta, h0, scale=K ** -0.5, use_qk_l2norm=True)
        grads = chunked.chunked_backward(q, k, v, g, beta, h0, do, dht, scale=K ** -0.5,
                                         use_qk_l2norm=True)
        return o, ht, grads

    qk = ((B, T, HK, K), BF16)
    text = compile_for(chip, fn, qk, qk, ((B, T, HV, V), BF16), (gate_shape(kda, B, T), F32),
                       ((B, T, HV), BF16), ((B, HV, K, V), F32), ((B, T, HV, V), BF16),
                       ((B, HV, K, V), F32))
    assert text.count("tpu_custom_call") >= 3, "forward, state pass and backward kernels"
    for name in ("fwd", "states", "bwd"):
        assert f"gdn_tpu_chunk_{'kda_' if kda else ''}{name}_k{K}_v{V}" in text, name


@chips_and_modes(("v5e", False))
def test_pool_decode_step_compiles_in_place(chip, kda):
    from gdn_jax.kernels.tpu import recurrent  # noqa: PLC0415

    def fn(q, k, v, g, beta, pool, idx):
        return recurrent.fused_recurrent(q, k, v, g, beta, pool, scale=K ** -0.5,
                                         use_qk_l2norm=True, state_indices=idx)

    qk = ((N, 1, HK, K), BF16)
    text = compile_for(chip, fn, qk, qk, ((N, 1, HV, V), BF16), (gate_shape(kda, N, 1), F32),
                       ((N, 1, HV), BF16), ((P, HV, K, V), F32), ((N,), jnp.int32), donate=(5,))
    assert "tpu_custom_call" in text
    assert f"gdn_tpu_recurrent_{'kda' if kda else 'gda'}_k{K}_v{V}_kv_pool" in text
    assert "input_output_alias" in text, "the donated pool must be updated in place"
