"""16-bit state storage: a bfloat16 or float16 initial state (or pool) is widened to float32
for the maths and the final state, snapshots and updated pool are stored back in its dtype
(round to nearest), on every path. The float32 computation from the same rounded states is
the oracle: outputs within 1e-5, states within one rounding of the state dtype (1e-2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net, recurrent
from helpers import assert_pallas, pairwise, rel_err, slow_except

H, K, V = 2, 16, 16
SD = {"bf16": jnp.bfloat16, "f16": jnp.float16}
PATHS = [("reference", "xla"), ("recurrent", "xla"), ("chunked", "xla"),
         ("recurrent", "pallas"), ("chunked", "pallas")]


def _inputs(B, T, kda, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(x, (B, T, 1, K)) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, V))
    g = -0.1 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H, K) if kda else (B, T, H)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
    return (q, k, v, g, beta), jax.random.normal(ks[5], (B, H, K, V))


def _op(impl, backend, **kw):
    def f(q, k, v, g, beta, h0):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True, impl=impl, backend=backend,
                               interpret=backend == "pallas", **kw)
    return f


CASES = pairwise({"path": PATHS, "sd": list(SD), "kda": [False, True], "vk": [False, True]})
# the Pallas chunked kernels take "kv" only (supports() declines "vk"): that row runs "kv"
CASES = [dict(c, vk=c["vk"] and c["path"] != ("chunked", "pallas")) for c in CASES]


# Everyday tier: the XLA recurrent path (T = 4, its own backward): row 0 (bf16 state, "kv",
# GDA) and row 8 (f16 state, "vk", KDA): the state widened, the final state rounded back to its
# dtype, the gradient of h0 in it. A 16-bit pool on the Pallas recurrent kernel: the everyday
# rows of the bf16 pool test below. The other rows (the chunked and Pallas rows each compile a
# chunked backward): full suite only.
@pytest.mark.parametrize("case", slow_except(CASES, 0, 8), ids=lambda c: (
    f"{c['path'][0]}-{c['path'][1]}-{c['sd']}-{'KDA' if c['kda'] else 'GDA'}"
    f"{'-vk' if c['vk'] else ''}"))
def test_16bit_state_forward_and_gradients(case):
    (impl, backend), sd, kda, vk = case["path"], SD[case["sd"]], case["kda"], case["vk"]
    layout = "vk" if vk else "kv"
    T = 40 if impl == "chunked" else 4
    args, h = _inputs(2, T, kda)
    h16 = (jnp.swapaxes(h, -1, -2) if vk else h).astype(sd)
    f = _op(impl, backend, state_layout=layout)
    if backend == "pallas":
        assert_pallas(f, *args, h16)
    ref = _op("reference", "xla", state_layout=layout)

    def loss(fn, h0):
        o, s = fn(*args, h0)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s.astype(jnp.float32) ** 2)

    o, s = f(*args, h16)
    o32, s32 = ref(*args, h16.astype(jnp.float32))
    assert s.dtype == sd and o.dtype == jnp.float32
    assert rel_err(o, o32) < 1e-5
    assert rel_err(s.astype(jnp.float32), s32) < 1e-2
    dh = jax.grad(lambda h0: loss(f, h0))(h16)
    dh32 = jax.grad(lambda h0: loss(ref, h0))(h16.astype(jnp.float32))
    assert dh.dtype == sd
    assert rel_err(dh.astype(jnp.float32), dh32) < 2e-2


# Everyday tier: the token paths at T = 1 (the XLA recurrent in-place pool, the Pallas
# recurrent kernel's pool tile stored in bf16), with a padding entry; chunked-xla: full suite.
@pytest.mark.parametrize("impl,backend", slow_except([("recurrent", "xla"), ("recurrent", "pallas"),
                                                      ("chunked", "xla")], 0, 1))
def test_bf16_pool_keeps_its_dtype_and_other_slots(impl, backend):
    """A step into a bf16 pool: the pool stays bf16, the written slots hold the float32
    computation from the rounded slots (rounded once), every other slot is bit-identical."""
    P, read = 6, jnp.array([4, -1, 1], jnp.int32)
    T = 40 if impl == "chunked" else 1
    args, _ = _inputs(3, T, kda=False)
    pool = jax.random.normal(jax.random.key(3), (P, H, K, V)).astype(jnp.bfloat16)
    f = _op(impl, backend, state_indices=read)
    o, new = f(*args, pool)
    assert new.dtype == jnp.bfloat16
    h0 = jnp.where((read >= 0)[:, None, None, None], pool[jnp.maximum(read, 0)], 0)
    o32, s32 = _op("reference", "xla")(*args, h0.astype(jnp.float32))
    assert rel_err(o[jnp.array([0, 2])], o32[jnp.array([0, 2])]) < 1e-5
    assert float(jnp.max(jnp.abs(o[1]))) == 0.0  # padding
    for n, slot in ((0, 4), (2, 1)):  # one rounding of the float32 state (bf16: 2^-8)
        assert rel_err(new[slot].astype(jnp.float32), s32[n]) < 1e-2
    for slot in (0, 2, 3, 5):
        np.testing.assert_array_equal(np.asarray(new[slot]), np.asarray(pool[slot]))


def test_16bit_state_blocked_decode_and_snapshots(monkeypatch):
    """The XLA recurrent path's head-block loop keeps a 16-bit state in its dtype (widened one
    block at a time); snapshots are stored in the state's dtype too."""
    monkeypatch.setattr(recurrent, "BLOCK_BYTES", 2 * K * V * 4)
    args, h = _inputs(3, 3, kda=True)
    h16 = h.astype(jnp.float16)
    o, s, snaps = _op("recurrent", "xla", num_snapshots=2)(*args, h16)
    o32, s32, snaps32 = _op("reference", "xla", num_snapshots=2)(*args, h16.astype(jnp.float32))
    assert s.dtype == snaps.dtype == jnp.float16
    assert rel_err(o, o32) < 1e-5
    assert rel_err(s.astype(jnp.float32), s32) < 2e-3  # one float16 rounding (2^-11)
    assert rel_err(snaps.astype(jnp.float32), snaps32) < 2e-3


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_state_raises(dtype):
    args, h = _inputs(1, 2, kda=False)
    with pytest.raises(TypeError, match="initial_state"):
        gated_delta_net(*args, initial_state=h.astype(dtype), output_final_state=True)


def test_bf16_pool_gradients_on_the_recurrent_path():
    """A bf16 pool through the XLA recurrent path at T = 1 (it carries the pool as uint16 bits,
    which autodiff cannot see through): the op's backward runs on the chunked path, so all six
    gradients equal the reference's on the same pool (they were wrong by 100% before)."""
    rng = np.random.default_rng(0)
    B, T, H, K, V, P = 2, 1, 2, 8, 8, 4
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, d)), jnp.float32) for d in (K, K, V))
    g = jnp.asarray(-rng.uniform(0, 1, (B, T, H)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0, 1, (B, T, H)), jnp.float32)
    pool = jnp.asarray(rng.standard_normal((P, H, K, V)), jnp.bfloat16)
    idx = jnp.asarray([2, 0], jnp.int32)

    def grads(impl):
        def loss(*a):
            o, s = gated_delta_net(*a[:5], initial_state=a[5], state_indices=idx,
                                   output_final_state=True, impl=impl, backend="xla",
                                   use_qk_l2norm_in_kernel=True)
            return jnp.sum(o ** 2) + jnp.sum(s.astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, g, beta, pool)

    for name, got, want in zip("q k v g beta pool".split(), grads("recurrent"), grads("reference")):
        assert got.dtype == want.dtype, name
        assert rel_err(got, want) < 1e-4, (name, rel_err(got, want))
