"""The case list of `python -m gdn_jax.device_check`: one list of correctness cases and one of
timing cases, at their GPU sizes; `--dry-run` runs the same lists shrunk (`shrunk()`), so every
case the GPU run has is exercised on the CPU too. Also the inputs each case is run on.

Every correctness case goes through the public op with `backend="pallas_triton"` (the kernel of
`impl`), forward and, where the op has one, the backward of all six inputs; docs/spec.md names
the semantics each option checks (2.3 packed sequences, 2.4 pools, 2.5 snapshots, 2.5a
per-token slots, 2.5b checkpoints, 2.7 state dtypes, 4.2 tolerances).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from .benchmarking import Shape

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
# Head sizes in a dry run: the kernels accept 16 and 32 (chunked: {16, ..., 256}; recurrent:
# powers of two in [16, 256]) and interpret mode copies whole blocks per grid step, so small
# sizes keep the dry run cheap; 128 and 64 stay distinct (32 and 16).
DRY_HEAD = {128: 32, 64: 16}
# Packed lengths of a dry run: the boundary lengths only (a sequence of length 0, of 1, and
# one chunk minus one, exactly, plus one).
DRY_LENGTHS = (0, 1, 63, 64, 65)


@dataclass(frozen=True)
class Pool:
    """A state pool of `slots` slots and the call's slot tables (docs/spec.md 2.4, 2.5a):
    `read` is state_indices ([N], or [N][W] for per-token slots), `write` output_state_indices,
    `has_initial` has_initial_state, `accepted` num_accepted_tokens. `poison` slots hold NaN:
    each must be one that only a sequence with has_initial False reads, which the spec says
    never reaches a result."""

    slots: int
    read: tuple
    write: tuple | None = None
    has_initial: tuple | None = None
    accepted: tuple | None = None
    poison: tuple[int, ...] = ()

    @property
    def per_token(self) -> bool:
        return isinstance(self.read[0], tuple)

    def written_slots(self) -> set[int]:
        """The slots the call writes: each non-padding sequence's write slot (per-token: its
        row of the write table, the read table by default)."""
        write = self.write if self.write is not None else self.read
        if self.per_token:
            col = [a - 1 for a in (self.accepted or (1,) * len(self.read))]
            live = [r[c] >= 0 for r, c in zip(self.read, col)]
            return {s for row, ok in zip(write, live) if ok for s in row if s >= 0}
        return {w for r, w in zip(self.read, write) if r >= 0 and w >= 0}


@dataclass(frozen=True)
class CorrectnessCase:
    """One call of the public op checked on the Pallas Triton kernel of `impl`.

    B sequences of T tokens (with `lengths`: B = 1 and the sequences packed by cu_seqlens);
    gates "model" (-softplus(N(0, 1)) / 2, about [-1.5, 0]), "weak" (uniform [-0.05, 0]: the
    state carried over many chunks matters) or "strong" (uniform [-30, 0]: the bottom of the
    spec's promise, 4.2). `no_tf32`: float32 inputs whose output and gradient errors must stay
    below device_check's `NO_TF32_BOUND` (TF32 dots give about 1e-3). `dry_T`: T in a dry run
    (None: T).
    """

    name: str
    impl: str
    what: str
    kda: bool = False
    dtype: str = "bf16"
    B: int = 1
    T: int = 320
    Hk: int = 2
    Hv: int = 4
    K: int = 128
    V: int = 128
    gates: str = "model"
    lengths: tuple[int, ...] | None = None
    pool: Pool | None = None
    state_dtype: str = "f32"
    num_snapshots: int = 0
    checkpoint_every: int = 0
    grads: bool = True
    no_tf32: bool = False
    dry_T: int | None = 130

    @property
    def tokens(self) -> int:
        return sum(self.lengths) if self.lengths else self.T

    @property
    def batch(self) -> int:
        return 1 if self.lengths else self.B

    @property
    def num_seqs(self) -> int:
        return len(self.lengths) if self.lengths else self.B

    def shrunk(self) -> CorrectnessCase:
        """The dry-run version: one q/k head (the group kept), small head sizes, short T."""
        lengths = self.lengths and tuple(n for n in self.lengths if n in DRY_LENGTHS)
        return dataclasses.replace(
            self, Hk=1, Hv=self.Hv // self.Hk, K=DRY_HEAD.get(self.K, self.K),
            V=DRY_HEAD.get(self.V, self.V), lengths=lengths,
            T=self.T if self.dry_T is None else min(self.T, self.dry_T))


@dataclass(frozen=True)
class TimingCase:
    """A timed call: "prefill" (the chunked kernels, forward and backward, each kernel on its
    own and the whole programs) or "decode" (one token per sequence from a pool of 2B slots,
    the recurrent kernel, the pool donated)."""

    name: str
    kind: str
    kda: bool
    B: int
    T: int
    Hk: int = 16
    Hv: int = 32
    K: int = 128
    V: int = 128
    dtype: str = "bf16"
    state_dtype: str = "f32"

    @property
    def shape(self) -> Shape:
        return Shape(self.B, self.T, self.Hk, self.Hv, self.K, self.V, self.kda)

    def shrunk(self) -> TimingCase:
        """Dry-run sizes: two chunks, two value heads on one q/k head, small heads, B = 1.
        Cases that differ only in sizes shrink to one program, which the dry run's
        compilation cache compiles once."""
        return dataclasses.replace(
            self, B=1, T=min(self.T, 128), Hk=1, Hv=2,
            K=DRY_HEAD.get(self.K, self.K), V=DRY_HEAD.get(self.V, self.V))


# Slot tables shared by the pool cases (P = 6): sequence 0 reads 4 and writes 2; 1 is padding
# (-1: nothing read or written); 2 starts from zeros (has_initial False) and writes the slot it
# would have read, 1, which holds NaN; 3 reads 0 and writes nothing (-1).
POOL = Pool(slots=6, read=(4, -1, 1, 0), write=(2, 3, 1, -1),
            has_initial=(True, True, False, True), poison=(1,))
# Per-token slots (vLLM's form), P = 16, W = T = 4: rows of four slots written in place, the
# read column picked by num_accepted_tokens; sequence 3 is padding.
TOKEN_POOL = Pool(slots=16, read=((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (-1, -1, -1, -1)),
                  accepted=(2, 4, 1, 1))
PACKED = (0, 1, 63, 64, 65, 200)

CORRECTNESS: list[CorrectnessCase] = [
    CorrectnessCase("chunked-gda-bf16-k128-packed", "chunked",
                    "GDA bf16, K=V=128, grouped heads (Hv = 2 Hk), packed cu_seqlens (lengths 0, "
                    "1, 63, 64, 65, 200)", lengths=PACKED),
    CorrectnessCase("chunked-kda-bf16-k128-packed", "chunked",
                    "KDA bf16, K=V=128, grouped heads, packed cu_seqlens", kda=True,
                    lengths=PACKED),
    CorrectnessCase("chunked-kda-f16-k64-strong", "chunked",
                    "KDA f16, K=V=64, group 4, strong decay", kda=True, dtype="f16", Hk=1, K=64,
                    V=64, T=200, gates="strong"),
    CorrectnessCase("chunked-gda-f32-weak-no-tf32", "chunked",
                    "GDA f32, K=V=128, weak decay over 16 chunks: no TF32 in any dot",
                    dtype="f32", Hk=1, Hv=2, T=1024, gates="weak", no_tf32=True, dry_T=256),
    CorrectnessCase("chunked-kda-f32-weak-no-tf32", "chunked",
                    "KDA f32, K=V=128, weak decay over 16 chunks: no TF32 in any dot", kda=True,
                    dtype="f32", Hk=1, Hv=2, T=1024, gates="weak", no_tf32=True, dry_T=256),
    CorrectnessCase("chunked-gda-f16-k64-pool-bf16-ckpt64", "chunked",
                    "GDA f16, K=V=64, group 4, prefill into a bf16 pool (padding, write slots, "
                    "has_initial_state over a NaN slot), checkpoint_every=64", dtype="f16", B=4,
                    Hk=1, K=64, V=64, T=130, pool=POOL, state_dtype="bf16", checkpoint_every=64),
    CorrectnessCase("recurrent-gda-f32-packed-strong", "recurrent",
                    "GDA f32 recurrent kernel (its backward: the chunked kernels), packed "
                    "cu_seqlens, strong decay", dtype="f32", Hk=1, Hv=2, lengths=PACKED,
                    gates="strong"),
    CorrectnessCase("recurrent-kda-bf16-decode-pool-bf16", "recurrent",
                    "KDA decode (T=1) into a bf16 pool: padding, write slots, has_initial_state "
                    "over a NaN slot", kda=True, B=4, T=1, pool=POOL, state_dtype="bf16"),
    CorrectnessCase("recurrent-gda-f32-token-slots", "recurrent",
                    "GDA f32 per-token slots [N, W] with num_accepted_tokens, f32 pool (no "
                    "gradients)", dtype="f32", B=4, T=4, Hk=1, Hv=2, pool=TOKEN_POOL, grads=False),
    CorrectnessCase("recurrent-kda-f16-snapshots", "recurrent",
                    "KDA f16, K=V=64, T=8, num_snapshots=3 (its backward: XLA)", kda=True,
                    dtype="f16", B=2, T=8, Hk=1, K=64, V=64, num_snapshots=3),
]

TIMING: list[TimingCase] = [
    TimingCase(f"prefill-{mode}-hv{hv}", "prefill", mode == "kda", B=1, T=8192, Hv=hv)
    for mode in ("gda", "kda") for hv in (32, 64)
] + [
    TimingCase(f"decode-{mode}-b{b}-{sd}", "decode", mode == "kda", B=b, T=1, state_dtype=sd)
    for mode in ("gda", "kda") for b in (1, 32, 256) for sd in ("bf16", "f32")
]


def cases(dry: bool) -> tuple[list[CorrectnessCase], list[TimingCase]]:
    """The case lists, shrunk for a dry run."""
    if not dry:
        return list(CORRECTNESS), list(TIMING)
    return [c.shrunk() for c in CORRECTNESS], [t.shrunk() for t in TIMING]


# ---------------------------------------------------------------------------------- inputs
# Drawn with numpy (no XLA compile per shape, which jax.random costs on the CPU): the
# distribution of `gdn_jax.benchmarking.make_inputs`.


def model_inputs(shape: Shape, dtype, seed: int = 0, states: int | None = None):
    """Model-like inputs ((q, k, v, g, beta), initial states): raw q, k, v ~ N(0, 1) in `dtype`
    (the op l2-normalises q and k), g = -softplus(N(0, 1)) / 2 float32 (about [-1.5, 0]),
    beta = sigmoid(N(0, 1)) in `dtype`, `states` float32 states 0.1 N(0, 1) (default B)."""
    B, T, Hk, Hv, K, V, kda = shape
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((B, T, Hk, K)) for _ in range(2))
    v = rng.standard_normal((B, T, Hv, V))
    g = -0.5 * np.logaddexp(0.0, rng.standard_normal((B, T, Hv, K) if kda else (B, T, Hv)))
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((B, T, Hv))))
    h0 = 0.1 * rng.standard_normal((B if states is None else states, Hv, K, V))
    args = (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(g, jnp.float32),
            jnp.asarray(beta, dtype))
    return args, jnp.asarray(h0, jnp.float32)


def correctness_inputs(case: CorrectnessCase, seed: int = 0):
    """((q, k, v, g, beta), state, op keywords) of a case: `model_inputs`, the case's gates
    (weak: uniform [-0.05, 0]; strong: uniform [-30, 0]), an initial state per sequence or the
    pool (NaN in its poisoned slots) in the state dtype, and the packing / slot keywords as
    concrete arrays (so the op checks their values)."""
    shape = Shape(case.batch, case.tokens, case.Hk, case.Hv, case.K, case.V, case.kda)
    n_states = case.pool.slots if case.pool else case.num_seqs
    args, state = model_inputs(shape, DTYPES[case.dtype], seed, states=n_states)
    if case.gates != "model":
        low = {"weak": -0.05, "strong": -30.0}[case.gates]
        g = np.random.default_rng(seed + 1).uniform(low, 0.0, args[3].shape)
        args = (*args[:3], jnp.asarray(g, jnp.float32), args[4])
    state = np.array(state)   # writable (the poisoned slots)
    kw: dict = {}
    if case.lengths:
        kw["cu_seqlens"] = jnp.asarray(np.cumsum((0,) + case.lengths), jnp.int32)
    if case.num_snapshots:
        kw["num_snapshots"] = case.num_snapshots
    if case.checkpoint_every:
        kw["checkpoint_every"] = case.checkpoint_every
    pool = case.pool
    if pool is not None:
        state[list(pool.poison)] = np.nan
        kw["state_indices"] = jnp.asarray(pool.read, jnp.int32)
        for name, table, dt in (("output_state_indices", pool.write, jnp.int32),
                                ("has_initial_state", pool.has_initial, jnp.bool_),
                                ("num_accepted_tokens", pool.accepted, jnp.int32)):
            if table is not None:
                kw[name] = jnp.asarray(table, dt)
    return args, jnp.asarray(state, DTYPES[case.state_dtype]), kw


def decode_inputs(case: TimingCase, seed: int = 0):
    """((q, k, v, g, beta), pool [2B, ...] in the state dtype, state_indices [B]: B distinct
    slots in a random order) of a decode timing case."""
    args, pool = model_inputs(case.shape, DTYPES[case.dtype], seed, states=2 * case.B)
    idx = np.random.default_rng(seed).permutation(2 * case.B)[:case.B]
    pool = jnp.asarray(np.asarray(pool), DTYPES[case.state_dtype])
    return args, pool, jnp.asarray(idx, jnp.int32)


def cotangents(shapes, seed: int = 1) -> tuple:
    """Random cotangents for the differentiable outputs (anything with .shape and .dtype), in
    their dtypes; bf16-representable values, so every dtype sees the same numbers."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s.shape).astype(jnp.bfloat16).astype(s.dtype))
                 for s in shapes)
