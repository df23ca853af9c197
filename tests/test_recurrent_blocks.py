"""The XLA recurrent path on a state larger than `BLOCK_BYTES`: a loop over blocks of value
heads (gdn_jax/recurrent.py). Tests shrink BLOCK_BYTES so small shapes take that path, and
check it against the float64 numpy recurrence, in both layouts, forward and gradients, and
that a donated decode state is still updated in place."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import recurrent
from gdn_jax import gated_delta_net
from helpers import Case, assert_close, make_inputs, numpy_expected, op_vjp, slow_except

HEAD_BYTES = 16 * 32 * 4  # K=16, V=32 float32


@pytest.fixture
def two_heads_per_block(monkeypatch):
    """BLOCK_BYTES of two heads; returns the list of block sizes the blocked runner traced."""
    monkeypatch.setattr(recurrent, "BLOCK_BYTES", 2 * HEAD_BYTES)
    traced, run = [], recurrent._run_head_blocks

    def spy(step, S, xs, *args, **kwargs):
        traced.append(recurrent._head_block(S.shape[0] * S.shape[1], HEAD_BYTES))
        return run(step, S, xs, *args, **kwargs)

    monkeypatch.setattr(recurrent, "_run_head_blocks", spy)
    return traced


def _op(layout):
    def fn(q, k, v, g, beta, h0):
        h = h0 if layout == "kv" else jnp.swapaxes(h0, -1, -2)
        o, s = gated_delta_net(q, k, v, g, beta, initial_state=h, output_final_state=True,
                               impl="recurrent", backend="xla", state_layout=layout)
        return o, (s if layout == "kv" else jnp.swapaxes(s, -1, -2))
    return fn


def test_head_block_sizes():
    assert recurrent._head_block(1024, 64 << 10) == 64          # 4 MiB of 64 KiB heads
    assert recurrent._head_block(12, recurrent.BLOCK_BYTES // 5) == 4  # largest divisor <= 5
    assert recurrent._head_block(7, recurrent.BLOCK_BYTES) == 1
    assert recurrent._head_block(3, 8 * recurrent.BLOCK_BYTES) == 1  # a head over the budget


# (T, kda, layout): T = 1 (decode, no token loop) and T > 1 (a token scan inside each block)
CASES = [(1, False, "vk"), (1, True, "kv"), (4, False, "kv"), (3, True, "vk")]


# Everyday tier: KDA, T = 3 (the token scan inside each block), "vk".
@pytest.mark.parametrize("T,kda,layout", slow_except(CASES, 3),
                         ids=[f"T{t}-{'KDA' if kd else 'GDA'}-{lay}" for t, kd, lay in CASES])
def test_blocked_matches_float64(two_heads_per_block, T, kda, layout):
    """Outputs, final state and all six gradients against float64 numpy, weak decay (the
    initial state matters at the last token), grouped heads (Hk=2, Hv=6: 18 heads, 9 blocks)."""
    case = Case(B=3, T=T, Hk=2, group=3, K=16, V=32, kda=kda, h0=True, weak=True, l2norm=False)
    args, h0 = make_inputs(case)
    got, cots = op_vjp(_op(layout), args, h0)
    assert two_heads_per_block and set(two_heads_per_block) == {2}, "the blocked path was not taken"
    assert_close(got, numpy_expected(args, h0, cots), 1e-5, 1e-5, f"blocked {layout}")


@pytest.mark.parametrize("layout", slow_except(["kv", "vk"], 0))
def test_blocked_decode_updates_the_donated_state_in_place(two_heads_per_block, layout):
    case = Case(B=4, T=1, Hk=1, group=2, K=16, V=32, kda=False, h0=True, l2norm=False)
    args, h0 = make_inputs(case)
    h = h0 if layout == "kv" else jnp.swapaxes(h0, -1, -2)
    step = jax.jit(lambda h, *a: gated_delta_net(*a, initial_state=h, output_final_state=True,
                                                 backend="xla", state_layout=layout),
                   donate_argnums=0)
    hlo = step.lower(h, *args).compile().as_text()
    assert two_heads_per_block == [2] and "while" in hlo, "the blocked path was not taken"
    assert re.search(r"input_output_alias=\{ \{1\}: \(0,", hlo), "state not updated in place"
    state = r"f32\[(4,2,|8,)(16,32|32,16)\]"  # the state, or its [B*Hv, ..] view
    big = [line.strip()[:160] for line in hlo.splitlines()
           if re.search(rf"%\S*(transpose|copy)\S* = {state}", line)
           or re.search(rf"= {state}\S* (transpose|copy)\(", line)]
    assert not big, big
    o, s = step(h + 0.0, *args)
    ref_o, ref_s = gated_delta_net(*args, initial_state=h0, output_final_state=True,
                                   impl="reference")
    if layout == "vk":
        s = jnp.swapaxes(s, -1, -2)
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref_o), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), np.asarray(ref_s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,ns,layout", slow_except([(5, 3, "vk"), (2, 4, "kv")], 1))
def test_blocked_snapshots(two_heads_per_block, T, ns, layout):
    """Snapshots from the blocked path equal the reference's (T < num_snapshots included:
    the leading snapshots hold the initial state)."""
    case = Case(B=2, T=T, Hk=1, group=3, K=16, V=32, kda=True, h0=True, weak=True,
                l2norm=False)
    args, h0 = make_inputs(case)
    h = h0 if layout == "kv" else jnp.swapaxes(h0, -1, -2)
    o, s, snaps = gated_delta_net(*args, initial_state=h, output_final_state=True,
                                  impl="recurrent", backend="xla", state_layout=layout,
                                  num_snapshots=ns)
    assert two_heads_per_block == [2], "the blocked path was not taken"
    ref_o, ref_s, ref_snaps = gated_delta_net(*args, initial_state=h0, output_final_state=True,
                                              impl="reference", num_snapshots=ns)
    if layout == "vk":
        s, snaps = jnp.swapaxes(s, -1, -2), jnp.swapaxes(snaps, -1, -2)
    for got, want in ((o, ref_o), (s, ref_s), (snaps, ref_snaps)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
