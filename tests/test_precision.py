"""The precision policy of the XLA paths: default-precision data-state dots for 16-bit inputs,
HIGHEST for float32 inputs, the gate cumsums and triangular solve always HIGHEST; checked in
the programs lowered for TPU and CUDA, and the numbers within the spec's tolerances."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from gdn_jax import gated_delta_net
from gdn_jax.lowering import lower
from helpers import Case, make_inputs, numpy_reference, op_tolerance, rel_err, slow_except

S = jax.ShapeDtypeStruct


def _precisions(text):
    """Counts of DEFAULT and HIGHEST in the dots' precision configs of a StableHLO module."""
    found = re.findall(r"precision = \[(DEFAULT|HIGH|HIGHEST)\b", text)
    return found.count("DEFAULT"), found.count("HIGHEST")


# Everyday tier: GDA chunked for TPU, KDA chunked for CUDA (lowering only, no compile).
@pytest.mark.parametrize("platform,impl,kda", slow_except(
    [(p, i, k) for i, k in [("chunked", False), ("chunked", True), ("recurrent", False)]
     for p in ("tpu", "cuda")], 0, 3))
def test_lowered_dot_precisions_follow_the_policy(platform, impl, kda):
    T = 100 if impl == "chunked" else 4
    shapes = lambda dt: [S((1, T, 1, 32), dt), S((1, T, 1, 32), dt), S((1, T, 2, 32), dt),  # noqa: E731
                         S((1, T, 2, 32) if kda else (1, T, 2), jnp.float32),
                         S((1, T, 2), jnp.float32)]
    fn = lambda precision: lambda *a: gated_delta_net(  # noqa: E731
        *a, impl=impl, backend="xla", precision=precision)[0]
    d16, h16 = _precisions(lower(fn("auto"), *shapes(jnp.bfloat16), platforms=(platform,)).as_text())
    d32, h32 = _precisions(lower(fn("auto"), *shapes(jnp.float32), platforms=(platform,)).as_text())
    assert d16 > 0, "16-bit inputs: the data-state dots at default precision"
    assert d32 == 0 and h32 > 0, "float32 inputs: every dot HIGHEST"
    if impl == "chunked":
        assert h16 > 0, "the gate cumsums and the triangular solve stay HIGHEST"
    dh, _ = _precisions(lower(fn("highest"), *shapes(jnp.bfloat16), platforms=(platform,)).as_text())
    assert dh == 0, 'precision="highest" overrides the policy'


@pytest.mark.parametrize("impl", slow_except(["chunked", "recurrent"], 1))
def test_bf16_with_default_precision_dots_meets_the_bf16_tolerance(impl):
    case = Case(T=150 if impl == "chunked" else 6, K=32, V=32, Hk=1, group=2, dtype="bf16",
                h0=True, weak=True)
    args, h0 = make_inputs(case)
    o, st = gated_delta_net(*args, initial_state=h0, output_final_state=True,
                            use_qk_l2norm_in_kernel=True, impl=impl, backend="xla",
                            precision="default")
    o64, s64 = numpy_reference(*args, h0, l2norm=True)
    tol, _ = op_tolerance(impl, "bf16")
    assert rel_err(o, o64) <= tol and rel_err(st, s64) <= tol


def test_unknown_precision_is_named():
    args = [jnp.ones((1, 2, 1, 16))] * 3 + [jnp.zeros((1, 2, 1)), jnp.ones((1, 2, 1))]
    with pytest.raises(ValueError, match="precision='fast'"):
        gated_delta_net(*args, precision="fast")
