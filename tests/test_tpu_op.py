"""The Mosaic TPU kernels through the public op (`backend="pallas_mosaic_tpu", interpret=True`:
the TPU interpreter on the CPU), outputs and all six gradients against float64 numpy, with
weak decay (state carried over three full 128-token chunks and a ragged one) and strong decay.
"""
from __future__ import annotations

import jax
import pytest

from gdn_jax import gated_delta_net
from helpers import (Case, assert_close, assert_pallas, make_inputs, numpy_expected,
                     op_tolerance, op_vjp, slow_except)

BACKEND = "pallas_mosaic_tpu"
K = V = 128  # the TPU kernels' lane-dense head size

CASES = [  # (impl, case)
    ("chunked", Case(kda=False, Hk=1, group=2, T=3 * 128 + 8, K=K, V=V, h0=True, weak=True)),
    ("chunked", Case(kda=True, Hk=1, group=1, T=136, K=K, V=V, h0=True, gmin=-30.0)),
    ("recurrent", Case(kda=False, Hk=1, group=2, T=5, B=2, K=K, V=V, h0=True, weak=True)),
    ("recurrent", Case(kda=True, Hk=1, group=1, T=3, K=K, V=V, h0=True, gmin=-30.0)),
]
# Everyday tier: case 3, the op's dispatch to the Mosaic kernels: the recurrent kernel forward
# (N = 1: one busy and one idle chain of the (2, 1) grid) and its backward on the Mosaic
# chunked kernels with KDA gates (one ragged chunk of 3 rows, strong decay, dh0). The chunked
# GDA backward over two chunks: tests/test_tpu_chunked.py's everyday test_strong_decay[GDA].
EVERYDAY_CASES = (3,)


@pytest.mark.parametrize("impl,case", slow_except(CASES, *EVERYDAY_CASES),
                         ids=[f"{i}-{c}" for i, c in CASES])
def test_mosaic_tpu_kernels_through_the_op_match_float64(impl, case):
    args, h0 = make_inputs(case)

    def fn(q, k, v, g, beta, h):
        return gated_delta_net(q, k, v, g, beta, initial_state=h, output_final_state=True,
                               use_qk_l2norm_in_kernel=case.l2norm, impl=impl, backend=BACKEND,
                               interpret=True)

    assert_pallas(fn, *args, h0)
    got, cots = op_vjp(jax.jit(fn), args, h0)
    want = numpy_expected(args, h0, cots, l2norm=case.l2norm)
    tol_out, _ = op_tolerance(impl, case.dtype, backend="pallas", T=case.T)
    # the backward of a Mosaic forward is the Mosaic chunked backward: chunked tolerance
    tol_grad = op_tolerance("chunked", case.dtype, backend="pallas", T=case.T)[1]
    assert_close(got, want, tol_out, tol_grad, f"{impl}/{BACKEND} {case}")


def test_explicit_mosaic_backend_declines_what_its_kernels_cannot_serve():
    args, h0 = make_inputs(Case(T=70, K=16, V=16, h0=True))  # K = 16: not lane-dense
    with pytest.raises(ValueError, match='backend="pallas_mosaic_tpu" cannot serve'):
        gated_delta_net(*args, initial_state=h0, impl="chunked", backend=BACKEND, interpret=True)
