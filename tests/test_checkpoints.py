"""Prefill checkpoints (`checkpoint_every=n`, docs/spec.md section 2.5b): the states after
tokens n, 2n, ... of every sequence, on every path, against float64 prefix states (the final
state of the first m tokens is the state after token m)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdn_jax import gated_delta_net, recurrent
from helpers import (Case, assert_no_pallas, assert_pallas, make_inputs, numpy_reference, rel_err,
                     slow_except)

TOL = 1e-4


def prefix_states(args, h0, n, *, cu_seqlens=None, l2norm=True):
    """float64 `[N, T // n, Hv, K, V]`: entry j of sequence s is the final state of its first
    (j + 1) n tokens, zeros where that is past its end."""
    T = args[0].shape[1]
    J = T // n
    if cu_seqlens is None:
        per = [numpy_reference(*(x[:, :(j + 1) * n] for x in args), h0, l2norm=l2norm)[1]
               for j in range(J)]
        return np.stack(per, 1) if per else None
    cu = np.asarray(cu_seqlens)
    N = len(cu) - 1
    Hv, V = args[2].shape[2:]
    K = args[0].shape[3]
    out = np.zeros((N, J, Hv, K, V))
    for s in range(N):
        for j in range(J):
            m = (j + 1) * n
            if m <= cu[s + 1] - cu[s]:
                seg = tuple(x[:, cu[s]:cu[s] + m] for x in args)
                out[s, j] = numpy_reference(*seg, None if h0 is None else h0[s:s + 1],
                                            l2norm=l2norm)[1][0]
    return out


def _call(args, h0, n, *, layout="kv", cu_seqlens=None, **kw):
    """The op under jit (one compile, not one per eager primitive), states as "kv"."""
    def run(args, h0, cu_seqlens):
        h = h0 if (h0 is None or layout == "kv") else jnp.swapaxes(h0, -1, -2)
        o, ht, ck = gated_delta_net(*args, initial_state=h, output_final_state=True,
                                    use_qk_l2norm_in_kernel=True, checkpoint_every=n,
                                    state_layout=layout, backend="xla", cu_seqlens=cu_seqlens,
                                    **kw)
        if layout == "vk":
            ht, ck = jnp.swapaxes(ht, -1, -2), jnp.swapaxes(ck, -1, -2)
        return o, ht, ck
    return jax.jit(run)(args, h0, cu_seqlens)


def _check(args, h0, n, got, *, cu_seqlens=None, what=""):
    o, ht, ck = got
    T = args[0].shape[1]
    want = prefix_states(args, h0, n, cu_seqlens=cu_seqlens)
    N = ht.shape[0]
    assert ck.shape == (N, T // n) + ht.shape[1:], (what, ck.shape)
    assert ck.dtype == jnp.float32
    assert rel_err(ck, want) <= TOL, (what, rel_err(ck, want))
    o64, s64 = numpy_reference(*args, h0, l2norm=True, cu_seqlens=cu_seqlens)
    assert rel_err(o, o64) <= TOL and rel_err(ht, s64) <= TOL, what


# Chunked (chunk size 64): T = 150 is 3 chunks (ragged: the last one is padded), so n = 64 and
# 128 are per-chunk states and n = 32 two checkpoints per chunk; GDA and KDA each see every n
# between this test and test_packed_sequences (each case compiles the chunked path).
# Everyday tier: n = 32, two checkpoints per chunk (one inside, one at the chunk's end).
@pytest.mark.parametrize("n,kda,layout", slow_except(
    [(32, False, "kv"), (64, True, "vk"), (128, False, "kv")], 0))
def test_chunked_matches_prefix_states(n, kda, layout):
    case = Case(kda=kda, T=150, B=2, K=8, V=8, Hk=1, group=2, h0=True, weak=True)
    args, h0 = make_inputs(case)
    _check(args, h0, n, _call(args, h0, n, impl="chunked", layout=layout), what=f"n={n}")


# Everyday tier: the XLA recurrent path, KDA, n = 3 (T = 10 is not a multiple of n).
@pytest.mark.parametrize("impl,n,kda,layout", slow_except([
    ("recurrent", 1, False, "vk"), ("recurrent", 3, True, "kv"), ("recurrent", 3, False, "kv"),
    ("recurrent", 1, True, "vk"), ("reference", 3, False, "kv"), ("reference", 1, True, "kv")], 1))
def test_token_paths_match_prefix_states(impl, n, kda, layout):
    case = Case(kda=kda, T=10, B=2, K=8, V=8, Hk=1, group=2, h0=True, weak=True)
    args, h0 = make_inputs(case)
    _check(args, h0, n, _call(args, h0, n, impl=impl, layout=layout), what=f"{impl} n={n}")


@pytest.mark.parametrize("layout", slow_except(["kv", "vk"], 1))
def test_recurrent_head_blocks(monkeypatch, layout):
    """A state over BLOCK_BYTES runs one block of heads at a time (`_run_head_blocks`)."""
    monkeypatch.setattr(recurrent, "BLOCK_BYTES", 2 * 8 * 8 * 4)  # two 8x8 heads per block
    taken, run = [], recurrent._run_head_blocks

    def spy(*a, **kw):
        taken.append(True)
        return run(*a, **kw)

    monkeypatch.setattr(recurrent, "_run_head_blocks", spy)
    case = Case(kda=layout == "vk", T=7, B=2, K=8, V=8, Hk=2, group=2, h0=True, weak=True)
    args, h0 = make_inputs(case)
    _check(args, h0, 3, _call(args, h0, 3, impl="recurrent", layout=layout), what=layout)
    assert taken, "the blocked path was not taken"


# Packed sequences whose lengths are not multiples of n, an empty one included.
# n = 40 puts checkpoints at varying positions inside chunks. Everyday tier: the reference path's
# packed checkpoints (the token-path offsets; n = 32 inside chunks is in the everyday tier above).
@pytest.mark.parametrize("impl,n,lens,kda", slow_except([
    ("chunked", 32, (70, 0, 45, 100), True), ("chunked", 64, (70, 0, 45, 100), False),
    ("chunked", 40, (70, 0, 45, 100), False), ("chunked", 128, (130, 20), True),
    ("recurrent", 3, (5, 0, 13, 1, 8), True), ("recurrent", 1, (3, 4), False),
    ("reference", 4, (5, 0, 13, 9), False)], 6))
def test_packed_sequences(impl, n, lens, kda):
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = int(cu[-1])
    case = Case(kda=kda, T=T, B=1, K=8, V=8, Hk=1, group=2, weak=True)
    args, _ = make_inputs(case)
    h0 = jnp.asarray(np.random.default_rng(3).standard_normal((len(lens), 2, 8, 8)), jnp.float32)
    got = _call(args, h0, n, impl=impl, cu_seqlens=jnp.asarray(cu), layout="vk" if kda else "kv")
    _check(args, h0, n, got, cu_seqlens=cu, what=f"{impl} {lens}")


def test_chunked_checkpoints_at_chunk_ends_add_no_work():
    """n a multiple of the chunk: the checkpoints are the per-chunk states, no extra dots;
    n = 40 computes its in-chunk states with more."""
    case = Case(T=128, B=1, K=8, V=8, Hk=1, group=2, h0=True)
    args, h0 = make_inputs(case)

    def dots(**kw):
        jaxpr = jax.make_jaxpr(lambda *a: gated_delta_net(
            *a, initial_state=h0, output_final_state=True, impl="chunked", backend="xla",
            **kw))(*args)
        return str(jaxpr).count("dot_general")

    plain = dots()
    assert dots(checkpoint_every=64) == plain
    assert dots(checkpoint_every=128) == plain
    assert dots(checkpoint_every=40) > plain


@pytest.mark.slow
def test_pool_checkpoints_are_per_sequence():
    """With a state pool: checkpoints per sequence (zeros for a padding entry), the pool is
    updated as without checkpoints."""
    case = Case(T=9, B=3, K=8, V=8, Hk=1, group=2, weak=True)
    args, _ = make_inputs(case)
    pool = jnp.asarray(np.random.default_rng(5).standard_normal((5, 2, 8, 8)), jnp.float32)
    idx = jnp.asarray([3, -1, 0], jnp.int32)
    for impl in ("recurrent", "chunked"):
        kw = dict(initial_state=pool, state_indices=idx, output_final_state=True,
                  use_qk_l2norm_in_kernel=True, impl=impl, backend="xla")
        o, new_pool, ck = jax.jit(lambda a: gated_delta_net(*a, checkpoint_every=4, **kw))(args)
        untouched = np.asarray([1, 2, 4])
        np.testing.assert_array_equal(np.asarray(new_pool)[untouched], np.asarray(pool)[untouched])
        assert ck.shape == (3, 2, 2, 8, 8)
        assert not np.asarray(ck[1]).any() and not np.asarray(o[1]).any(), "padding entry"
        for b, slot in ((0, 3), (2, 0)):
            one, h = tuple(x[b:b + 1] for x in args), np.asarray(pool[slot:slot + 1])
            o64, s64 = numpy_reference(*one, h, l2norm=True)
            assert rel_err(ck[b:b + 1], prefix_states(one, h, 4)) <= TOL, (impl, b)
            assert rel_err(new_pool[slot:slot + 1], s64) <= TOL, (impl, b)
            assert rel_err(o[b:b + 1], o64) <= TOL, (impl, b)


@pytest.mark.slow
def test_fewer_tokens_than_n_and_no_tokens():
    case = Case(T=5, B=2, K=8, V=8, h0=True)
    args, h0 = make_inputs(case)
    for impl in ("recurrent", "chunked"):
        o, ht, ck = _call(args, h0, 6, impl=impl)
        assert ck.shape == (2, 0, 1, 8, 8)
    empty = tuple(x[:, :0] for x in args)
    o, ht, ck = jax.eval_shape(lambda a: gated_delta_net(*a, initial_state=h0,
                                                         output_final_state=True,
                                                         checkpoint_every=2), empty)
    assert ck.shape == (2, 0, 1, 8, 8) and o.shape == (2, 0, 1, 8)


def test_return_signature_unchanged_without_checkpoints():
    args, h0 = make_inputs(Case(T=5, B=1, K=8, V=8, h0=True))
    def shapes(n):
        return jax.eval_shape(lambda a: gated_delta_net(*a, initial_state=h0,
                                                        checkpoint_every=n), args)
    assert len(shapes(None)) == 2
    o, ht, ck = shapes(2)
    assert ht is None and ck.shape == (1, 2, 1, 8, 8)


@pytest.mark.parametrize("bad,err", [(0, ValueError), (-2, ValueError), (True, TypeError),
                                     (2.0, TypeError), ("4", TypeError),
                                     (np.float32(4), TypeError)])
def test_bad_checkpoint_every(bad, err):
    args, _ = make_inputs(Case(T=5, K=8, V=8))
    with pytest.raises(err, match="checkpoint_every"):
        gated_delta_net(*args, checkpoint_every=bad)


def test_conflicting_options_raise():
    args, h0 = make_inputs(Case(T=8, K=16, V=16, h0=True))
    with pytest.raises(ValueError, match="checkpoint_every and num_snapshots"):
        gated_delta_net(*args, checkpoint_every=2, num_snapshots=2)
    seg = jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="checkpoint_every with segment_ids"):
        gated_delta_net(*args, checkpoint_every=2, segment_ids=seg)
    for impl in ("recurrent", "chunked"):
        with pytest.raises(ValueError, match="checkpoint_every=2"):
            gated_delta_net(*args, initial_state=h0, checkpoint_every=2, impl=impl,
                            backend="pallas", interpret=True)


def test_auto_backend_falls_back_to_xla():
    args, h0 = make_inputs(Case(T=8, K=16, V=16, h0=True))
    for impl in ("recurrent", "chunked"):
        fn = lambda *a, impl=impl: gated_delta_net(*a, initial_state=h0, checkpoint_every=4,  # noqa: E731
                                                   impl=impl, interpret=True)
        assert_no_pallas(fn, *args)
        assert jax.eval_shape(fn, *args)[2].shape == (1, 2, 1, 16, 16)


def _loss(impl, n, use_ckpts=False):
    def f(q, k, v, g, beta, h):
        res = gated_delta_net(q, k, v, g, beta, initial_state=h, output_final_state=True,
                              impl=impl, backend="xla", checkpoint_every=n)
        out = jnp.sum(jnp.sin(res[0])) + jnp.sum(res[1] ** 2)
        return out + (jnp.sum(res[2]) if use_ckpts else 0.0)
    return f


@pytest.mark.slow
def test_gradients_of_o_and_state_with_unused_checkpoints():
    """The same gradients as the call without checkpoints: the op saves only its inputs, and
    its backward (`api._xla_backward`, whatever the forward path) leaves the checkpoints out."""
    impl = "recurrent"
    args, h0 = make_inputs(Case(T=6, B=2, K=8, V=8, Hk=1, group=2, h0=True, weak=True))
    argnums = tuple(range(6))
    want = jax.jit(jax.grad(_loss(impl, None), argnums))(*args, h0)
    got = jax.jit(jax.grad(_loss(impl, 4), argnums))(*args, h0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "recurrent", "chunked"])
def test_gradient_through_checkpoints_raises(impl):
    args, h0 = make_inputs(Case(T=12, B=1, K=8, V=8, h0=True))
    with pytest.raises(ValueError, match="gradients through the checkpoints"):
        jax.eval_shape(jax.grad(_loss(impl, 4, use_ckpts=True), tuple(range(6))), *args, h0)


# The Pallas Triton chunked forward (interpret mode) at multiples of its chunk size 64: the
# per-chunk states its state pass computes, stored. Each case has a checkpoint at a sequence's
# end (taken from the final state) and one inside it (from a chunk's entering state).
# Everyday tier: the packed KDA case (an empty sequence, a sequence of two whole chunks).
@pytest.mark.parametrize("n,lens,kda", slow_except([(64, None, False), (64, (70, 0, 128, 40), True)], 1))
def test_pallas_chunked_forward(n, lens, kda):
    cu = None if lens is None else np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T = 128 if cu is None else int(cu[-1])
    B = 2 if cu is None else 1
    args, _ = make_inputs(Case(kda=kda, T=T, B=B, K=16, V=16, Hk=1, group=2, weak=True))
    N = B if cu is None else len(lens)
    h0 = jnp.asarray(np.random.default_rng(4).standard_normal((N, 2, 16, 16)), jnp.float32)
    kw = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
              impl="chunked", backend="pallas", interpret=True, checkpoint_every=n,
              cu_seqlens=None if cu is None else jnp.asarray(cu))
    fn = jax.jit(lambda *a: gated_delta_net(*a, **kw))
    assert_pallas(fn, *args)
    _check(args, h0, n, fn(*args), cu_seqlens=cu, what=f"pallas n={n} {lens}")
