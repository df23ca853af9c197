"""Sharding cases, run on 8 host CPU devices in their own process by tests/test_sharding.py.

Not collected by the main run (the device count must be set before jax is imported).
Run directly: `XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
python -m pytest -q -p no:cacheprovider tests/sharding_cases.py`.
"""
from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

sys.path.insert(0, os.path.dirname(__file__))
from helpers import GRAD_NAMES, Case, assert_close, make_inputs, rel_err, slow_except  # noqa: E402

from gdn_jax import gated_delta_net  # noqa: E402
from gdn_jax.sharding import (collective_stats, cpu_mesh, partition_specs,  # noqa: E402
                              sharded_gated_delta_net)

if jax.device_count() < 8:
    raise RuntimeError(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), "
                       f"got {jax.device_count()}")

OPTS = dict(use_qk_l2norm_in_kernel=True, output_final_state=True)
# The sharding logic does not depend on the path: most cases use the lax.scan reference, which
# compiles in about a second (the chunked XLA path's backward takes far longer to compile, KDA's
# most); the chunked path runs in one context-parallel case, the Pallas kernel in another.
# T per shard: 200/8 = 25, 200/4 = 50, 200/2 = 100 (none a multiple of the chunk size 64);
# 136/8 = 17, 136/2 = 68.
GDA = Case(kda=False, B=4, T=200, Hk=4, group=2, K=16, V=32, h0=True, gmin=-3.0)
KDA = Case(kda=True, B=2, T=136, Hk=3, group=2, K=16, V=16, h0=True)


def _fwd_bwd(op):
    """(o, state) and the gradients of all six inputs for cotangents (do, ds), one program."""

    def f(q, k, v, g, beta, h0, do, ds):
        out, vjp = jax.vjp(op, q, k, v, g, beta, h0)
        return out, vjp((do, ds))

    return f


def _cotangents(args, h0, state_shape):
    rng = np.random.default_rng(1)
    do = jnp.asarray(rng.standard_normal(args[2].shape), jnp.float32)
    ds = jnp.asarray(rng.standard_normal(state_shape), jnp.float32)
    return do, ds


@functools.lru_cache(maxsize=None)
def _inputs_and_reference(case: Case, state_layout: str = "kv"):
    """Inputs, cotangents, and outputs/gradients of the unsharded op (the lax.scan reference)."""
    args, h0 = make_inputs(case)
    if state_layout == "vk":
        h0 = jnp.swapaxes(h0, -1, -2)
    cts = _cotangents(args, h0, h0.shape)
    op = lambda q, k, v, g, beta, h0: gated_delta_net(q, k, v, g, beta, initial_state=h0,  # noqa: E731
                                                      state_layout=state_layout,
                                                      impl="reference", **OPTS)
    ref = jax.jit(_fwd_bwd(op))(*args, h0, *cts)
    return args, h0, cts, ref


def _mesh(shape: dict[str, int], explicit: bool = True) -> Mesh:
    n = int(np.prod(list(shape.values())))
    devices = jax.devices()[:n]
    if explicit:
        return jax.make_mesh(tuple(shape.values()), tuple(shape), devices=devices)
    return Mesh(np.array(devices).reshape(tuple(shape.values())), tuple(shape))


def _run_sharded(case: Case, mesh: Mesh, axes: dict, state_layout: str = "kv",
                 impl: str = "reference"):
    """Sharded outputs/gradients (inputs placed with the wrapper's specs), the unsharded call
    (always impl="reference": compiling the unsharded chunked backward too would double the
    cost; the chunked tolerance covers the difference), and the collectives of the compiled
    forward+backward program."""
    args, h0, cts, ref = _inputs_and_reference(case, state_layout)
    specs = partition_specs(**axes, kda=case.kda, split_qk_heads=(
        case.Hk % mesh.shape.get(axes.get("head_axis"), 1) == 0))
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    sargs = [place(x, sp) for x, sp in zip(args, specs[:5])]
    sh0 = place(h0, specs.state)
    scts = (place(cts[0], specs.v), place(cts[1], specs.state))
    op = lambda q, k, v, g, beta, h0: sharded_gated_delta_net(  # noqa: E731
        q, k, v, g, beta, initial_state=h0, mesh=mesh, state_layout=state_layout, impl=impl,
        **axes, **OPTS)
    compiled = jax.jit(_fwd_bwd(op)).lower(*sargs, sh0, *scts).compile()
    out = compiled(*sargs, sh0, *scts)
    return out, ref, collective_stats(compiled.as_text()), specs


def _assert_close(out, ref, tol=1e-4):
    """The sharded call against the unsharded one: outputs and all six gradients within tol."""
    (o, s), grads = out
    (o_r, s_r), grads_r = ref
    assert_close({"o": o, "final_state": s, **dict(zip(GRAD_NAMES, grads))},
                 {"o": o_r, "final_state": s_r, **dict(zip(GRAD_NAMES, grads_r))}, tol, tol,
                 "sharded against unsharded")


def _assert_no_collectives(stats):
    assert stats == [], f"expected no collectives, got {stats}"


# ---------------------------------------------------------------------------------------
# Data and head parallel: no communication at all, forward or backward
# ---------------------------------------------------------------------------------------

# Everyday tier: data x head parallel on an Auto-axes mesh.
@pytest.mark.parametrize("case,mesh_shape,axes,explicit", slow_except([
    (GDA, {"data": 2}, dict(batch_axis="data"), True),
    (GDA, {"data": 2, "tensor": 2}, dict(batch_axis="data", head_axis="tensor"), False),
    (GDA, {"data": 4, "tensor": 2}, dict(batch_axis="data", head_axis="tensor"), True),
    (KDA, {"data": 2}, dict(batch_axis="data"), False),
], 1), ids=["GDA-data2", "GDA-data2xhead2-auto", "GDA-data4xhead2", "KDA-data2-auto"])
def test_data_and_head_parallel(case, mesh_shape, axes, explicit):
    out, ref, stats, _ = _run_sharded(case, _mesh(mesh_shape, explicit), axes)
    _assert_close(out, ref, 1e-5)
    _assert_no_collectives(stats)


def test_head_parallel_qk_heads_not_divisible_slices_one_head():
    """GDA Hk=4 over 8 head shards: each device holds 1 value head, reading 1 q/k head sliced
    from q/k replicated over the axis; dq, dk are then summed over it (one all-reduce each or
    combined), nothing touches the forward."""
    out, ref, stats, specs = _run_sharded(GDA, _mesh({"tensor": 8}), dict(head_axis="tensor"))
    _assert_close(out, ref, 1e-5)
    assert specs.q[2] is None
    assert stats and {c.kind for c in stats} == {"all-reduce"}, stats
    qk_bytes = 2 * GDA.B * GDA.T * GDA.Hk * GDA.K * 4  # dq and dk, replicated over heads
    assert sum(c.result_bytes for c in stats) == qk_bytes, stats


@pytest.mark.slow
def test_cpu_mesh_splits_heads_over_every_cpu_device():
    """`cpu_mesh()`: one axis over all of the process's CPU devices; the head-split op on it
    (GDA Hv=8 over 8 devices, q/k replicated) equals the unsharded call."""
    mesh = cpu_mesh()
    assert mesh.axis_names == ("heads",)
    assert list(mesh.devices.flat) == jax.devices("cpu") and mesh.devices.size == 8
    out, ref, _, _ = _run_sharded(GDA, mesh, dict(head_axis="heads"))
    _assert_close(out, ref, 1e-5)
    with pytest.raises(TypeError, match="axis_name must be a str, got int"):
        cpu_mesh(1)


# ---------------------------------------------------------------------------------------
# Context parallel
# ---------------------------------------------------------------------------------------

def _transition_bytes(case: Case, n_seq: int, b_shards=1, h_shards=1):
    """Bytes of the all-gathered transitions [n, B, Hv, K, K + V] f32 on one device."""
    return n_seq * (case.B // b_shards) * (case.Hv // h_shards) * case.K * (case.K + case.V) * 4


def _assert_context_parallel_collectives(stats, case, n_seq, b_shards=1, h_shards=1, qk_bytes=0):
    """Forward: one all-gather of the transitions [n, B, Hv, K, K + V] (per device, float32).
    Backward: its transpose, a reduce-scatter to one block, and an all-reduce of d initial_state
    (replicated over the sequence axis); plus dq, dk when q/k are replicated over heads."""
    B, Hv = case.B // b_shards, case.Hv // h_shards
    trans = n_seq * B * Hv * case.K * (case.K + case.V) * 4
    want = [("all-gather", trans), ("reduce-scatter", trans // n_seq),
            ("all-reduce", B * Hv * case.K * case.V * 4)]
    if qk_bytes:
        want.append(("all-reduce", qk_bytes))
    got = sorted((c.kind, c.result_bytes) for c in stats)
    assert got == sorted(want), f"collectives {stats}, expected (kind, bytes) {sorted(want)}"


# Everyday tier: data x context parallel (GDA, reference path inside each segment).
@pytest.mark.parametrize("case,mesh_shape,axes,impl", slow_except([
    (GDA, {"seq": 8}, dict(seq_axis="seq"), "chunked"),
    (GDA, {"data": 2, "seq": 4}, dict(batch_axis="data", seq_axis="seq"), "reference"),
    (KDA, {"seq": 8}, dict(seq_axis="seq"), "reference"),
    (KDA, {"data": 2, "tensor": 2, "seq": 2},
     dict(batch_axis="data", head_axis="tensor", seq_axis="seq"), "reference"),
], 1), ids=["GDA-seq8-chunked", "GDA-data2xseq4", "KDA-seq8", "KDA-data2xhead2xseq2"])
def test_context_parallel(case, mesh_shape, axes, impl):
    mesh = _mesh(mesh_shape)
    out, ref, stats, specs = _run_sharded(case, mesh, axes, impl=impl)
    _assert_close(out, ref, 1e-4 if impl == "chunked" else 1e-5)
    n_seq = mesh.shape[axes["seq_axis"]]
    b = mesh.shape.get(axes.get("batch_axis"), 1)
    h = mesh.shape.get(axes.get("head_axis"), 1)
    # KDA has Hk=3: over 2 head shards q/k stay replicated over heads (dq, dk all-reduced)
    qk = 0 if specs.q[2] is not None or h == 1 else (
        2 * (case.B // b) * (case.T // n_seq) * case.Hk * case.K * 4)
    _assert_context_parallel_collectives(stats, case, n_seq, b, h, qk_bytes=qk)


@pytest.mark.slow
def test_context_parallel_vk_layout_auto_mesh():
    """state_layout="vk" (initial and final state transposed) on an Auto-axes mesh of 2."""
    mesh = _mesh({"seq": 2}, explicit=False)
    out, ref, stats, _ = _run_sharded(GDA, mesh, dict(seq_axis="seq"), state_layout="vk")
    _assert_close(out, ref, 1e-5)
    _assert_context_parallel_collectives(stats, GDA, 2)


@pytest.mark.slow
def test_context_parallel_bf16_recurrent():
    """bf16 inputs on the recurrent path (forward only), against the unsharded call."""
    case = GDA._replace(dtype="bf16", h0=False, T=64)
    args, _ = make_inputs(case)
    mesh = _mesh({"seq": 4})
    kw = dict(impl="recurrent", **OPTS)
    o_r, s_r = jax.jit(lambda *a: gated_delta_net(*a, **kw))(*args)
    o, s = jax.jit(lambda *a: sharded_gated_delta_net(*a, mesh=mesh, seq_axis="seq", **kw))(*args)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, o_r) < 1e-2 and rel_err(s, s_r) < 1e-5, (rel_err(o, o_r), rel_err(s, s_r))


def test_context_parallel_without_final_state_or_initial_state():
    case = KDA._replace(h0=False, T=8, B=1)
    args, _ = make_inputs(case)
    mesh = _mesh({"seq": 4})
    o_r, _ = gated_delta_net(*args, use_qk_l2norm_in_kernel=True)
    o, s = sharded_gated_delta_net(*args, mesh=mesh, seq_axis="seq", use_qk_l2norm_in_kernel=True)
    assert s is None
    assert rel_err(o, o_r) < 1e-5


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("axes,mesh_shape,match", [
    (dict(seq_axis="x"), {"x": 8}, r"T=12 is not divisible by the 8 shards of seq_axis='x'"),
    (dict(batch_axis="x"), {"x": 4}, r"B=2 is not divisible by the 4 shards of batch_axis='x'"),
    (dict(head_axis="x"), {"x": 4}, r"Hv=6 is not divisible by the 4 shards of head_axis='x'"),
    (dict(head_axis="y"), {"x": 2}, r"head_axis='y' is not an axis of the mesh"),
    (dict(batch_axis="x", seq_axis="x"), {"x": 2}, r"must be different mesh axes"),
])
def test_errors(axes, mesh_shape, match):
    args, _ = make_inputs(KDA._replace(T=12))
    with pytest.raises(ValueError, match=match):
        sharded_gated_delta_net(*args, mesh=_mesh(mesh_shape), **axes)


def test_context_parallel_on_the_pallas_recurrent_kernel():
    """backend="pallas" (interpret mode): each segment's transition run is the Pallas kernel
    (V' = K + V = 32 columns), forward only; against the unsharded XLA call."""
    case = GDA._replace(B=1, T=16, Hk=1, K=16, V=16)
    args, h0 = make_inputs(case)
    mesh = _mesh({"seq": 2})
    kw = dict(impl="recurrent", **OPTS)
    fn = jax.jit(lambda *a: sharded_gated_delta_net(*a[:5], initial_state=a[5], mesh=mesh,
                                                    seq_axis="seq", backend="pallas",
                                                    interpret=True, **kw))
    assert "pallas_call" in str(jax.make_jaxpr(fn)(*args, h0))
    o, s = fn(*args, h0)
    o_r, s_r = gated_delta_net(*args, initial_state=h0, backend="xla", **kw)
    assert rel_err(o, o_r) < 1e-5 and rel_err(s, s_r) < 1e-5, (rel_err(o, o_r), rel_err(s, s_r))
