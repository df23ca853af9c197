"""The public op at the program level: lowering for several platforms at once, and jax.export.

`backend="auto"` must lower for any set of platforms, forward and gradient: the CUDA branch
carries the Pallas Triton kernels, every other platform the XLA path. Only an explicit
`backend="pallas"` on a platform that cannot run the kernels raises (the guard's message).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from gdn_jax import gated_delta_net
from gdn_jax.lowering import abstract_gpu, lower
from helpers import slow_except

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"
# The Triton custom call carries compiled kernel IR with no compatibility guarantee, so
# jax.export refuses it unless this check is disabled (see README "Exporting").
TRITON_EXPORT_CHECKS = [export.DisabledSafetyCheck.custom_call(TRITON)]

T, Hk, Hv, K, V = 70, 1, 2, 32, 32  # chunked by default (T > 8), one ragged chunk
N_PACKED, POOL = 3, 5


def _shapes(kda: bool, variant: str):
    """Inputs of one call as ShapeDtypeStructs: plain (B=2, h0), packed (cu_seqlens) or a pool."""
    B = 2 if variant == "plain" else 1
    bf = jnp.bfloat16
    args = [S((B, T, Hk, K), bf), S((B, T, Hk, K), bf), S((B, T, Hv, V), bf),
            S((B, T, Hv, K) if kda else (B, T, Hv), jnp.float32), S((B, T, Hv), jnp.float32)]
    if variant == "plain":
        return args, S((B, Hv, K, V), jnp.float32), None, None
    if variant == "packed":
        return args, S((N_PACKED, Hv, K, V), jnp.float32), S((N_PACKED + 1,), jnp.int32), None
    return args, S((POOL, Hv, K, V), jnp.float32), S((N_PACKED + 1,), jnp.int32), S((N_PACKED,), jnp.int32)


def _loss(backend="auto"):
    def loss(q, k, v, g, beta, h0, cu, idx):
        o, ht = gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                cu_seqlens=cu, state_indices=idx, use_qk_l2norm_in_kernel=True,
                                backend=backend)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(ht ** 2)
    return loss


PLATFORMS = [("cuda",), ("cpu", "cuda"), ("cuda", "cpu"), ("cpu", "tpu")]
# Pairwise over (platforms, mode, variant, fwd/grad): each platform tuple meets both modes,
# all three variants and both directions.
CASES = [(p, kda, variant, grad)
         for i, p in enumerate(PLATFORMS)
         for j, (kda, variant, grad) in enumerate([(False, "plain", False), (True, "packed", True),
                                                   (False, "pool", True), (True, "plain", False),
                                                   (True, "pool", False), (False, "packed", True)])
         if (i + j) % 2 == 0 or j < 2]


# Everyday tier: a CUDA-only pool gradient, cpu+cuda and cpu+tpu forwards.
@pytest.mark.parametrize("platforms,kda,variant,grad", slow_except(CASES, 2, 4, 12),
                         ids=[f"{'+'.join(p)}-{'KDA' if k else 'GDA'}-{v}-{'grad' if g else 'fwd'}"
                              for p, k, v, g in CASES])
def test_auto_lowers_for_every_platform_set(platforms, kda, variant, grad):
    args, h0, cu, idx = _shapes(kda, variant)
    fn = jax.grad(_loss(), argnums=(0, 1, 2, 3, 4, 5)) if grad else _loss()
    text = lower(fn, *args, h0, cu, idx, platforms=platforms).as_text()
    if "cuda" in platforms:
        assert TRITON in text, "the CUDA branch lost its Pallas kernels"
    else:
        assert TRITON not in text
    if len(platforms) > 1:  # one module that dispatches on the platform at run time
        assert "stablehlo.case" in text


def test_explicit_pallas_still_refuses_the_cpu_in_a_multi_platform_lowering():
    args, h0, cu, idx = _shapes(False, "plain")
    with pytest.raises(ValueError, match=r'backend="pallas".*lowered for the CPU'):
        lower(_loss(backend="pallas"), *args, h0, cu, idx, platforms=("cpu", "cuda"))


def _inputs(seed=0, B=1, kda=False):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, Hk, K), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, Hk, K), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, Hv, V), jnp.bfloat16)
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, T, Hv, K) if kda else (B, T, Hv)))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, Hv)))
    h0 = jax.random.normal(ks[5], (B, Hv, K, V), jnp.float32) * 0.1
    return q, k, v, g, beta, h0


def _export(fn, args, platforms):
    with abstract_gpu():
        return export.export(jax.jit(fn), platforms=platforms,
                             disabled_checks=TRITON_EXPORT_CHECKS)(*args)


def _assert_bit_identical(got, want):
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_export_without_the_disabled_check_names_the_triton_custom_call():
    f = jax.jit(lambda *a: gated_delta_net(*a)[0])
    with abstract_gpu(), pytest.raises(ValueError, match="custom call"):
        export.export(f, platforms=("cpu", "cuda"))(*_inputs()[:5])


# Everyday tier: the GDA forward. (KDA's gradient export: the same path, 50 s more, not run.)
@pytest.mark.parametrize("kda,grad", slow_except([(False, False), (False, True), (True, False)], 0),
                         ids=["GDA-fwd", "GDA-grad", "KDA-fwd"])
def test_cpu_cuda_export_round_trips_bit_exactly_on_the_cpu(kda, grad):
    """Exported for cpu+cuda, serialized, deserialized and called on the CPU: the same bits
    as calling the op directly, for the forward (GDA and KDA) and the gradient (GDA)."""
    args = _inputs(kda=kda)

    def fwd(q, k, v, g, beta, h0):
        return gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                               use_qk_l2norm_in_kernel=True)

    def grads(*a):
        return jax.grad(lambda *x: jnp.sum(fwd(*x)[0].astype(jnp.float32) ** 2)
                        + jnp.sum(fwd(*x)[1]), argnums=(0, 1, 2, 3, 4, 5))(*a)

    fn = grads if grad else fwd
    exp = _export(fn, args, ("cpu", "cuda"))
    assert exp.platforms == ("cpu", "cuda")
    assert TRITON in exp.mlir_module()
    restored = export.deserialize(exp.serialize())
    _assert_bit_identical(restored.call(*args), jax.jit(fn)(*args))


def test_cpu_only_export_round_trips_without_disabled_checks():
    """A CPU-only export has no Triton custom call, so it needs no disabled check."""
    args = _inputs(seed=1)
    fn = jax.jit(lambda *a: gated_delta_net(*a[:5], initial_state=a[5], output_final_state=True))
    exp = export.export(fn, platforms=("cpu",))(*args)
    assert TRITON not in exp.mlir_module()
    _assert_bit_identical(export.deserialize(exp.serialize()).call(*args), fn(*args))


TPU_CUSTOM_CALL = "tpu_custom_call"


@pytest.mark.parametrize("impl,grad", slow_except([("chunked", False), ("chunked", True), ("recurrent", False)], 0, 2))
def test_auto_picks_the_mosaic_tpu_kernels_when_lowering_for_tpu(impl, grad):
    """K = V = 128 (the TPU kernels' lane-dense head size): the TPU branch of a cpu+tpu
    program carries Mosaic kernels, the CUDA branch of a cpu+cuda one Triton kernels; no TPU
    or libtpu needed. (Since jax 0.11 a deviceless lowering names one abstract device, so TPU
    and CUDA are lowered apart here.)"""
    B, T_ = (1, 256) if impl == "chunked" else (4, 1)
    bf, f32 = jnp.bfloat16, jnp.float32
    args = [S((B, T_, 2, 128), bf), S((B, T_, 2, 128), bf), S((B, T_, 4, 128), bf),
            S((B, T_, 4), f32), S((B, T_, 4), f32)]
    pool = impl == "recurrent"
    h0 = S((8 if pool else B, 4, 128, 128), f32)
    idx = S((B,), jnp.int32) if pool else None

    def loss(q, k, v, g, beta, h0, idx):
        o, ht = gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                state_indices=idx, impl=impl)
        return jnp.sum(o.astype(f32)) + jnp.sum(ht)

    fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)) if grad else loss
    tpu_only = lower(fn, *args, h0, idx, platforms=("tpu",)).as_text()
    assert TPU_CUSTOM_CALL in tpu_only and TRITON not in tpu_only
    cpu_tpu = lower(fn, *args, h0, idx, platforms=("cpu", "tpu")).as_text()
    assert TPU_CUSTOM_CALL in cpu_tpu and TRITON not in cpu_tpu
    cpu_cuda = lower(fn, *args, h0, idx, platforms=("cpu", "cuda")).as_text()
    assert TRITON in cpu_cuda and TPU_CUSTOM_CALL not in cpu_cuda


def test_unknown_backend_lists_the_valid_names():
    args = _inputs()[:5]
    with pytest.raises(ValueError, match="pallas_mosaic_tpu"):
        gated_delta_net(*args, backend="mosaic")
