"""A small hybrid language model in Flax NNX, trained with optax through `gdn_jax.nnx`.

Pre-norm residual blocks whose mixers are a `GatedDeltaNet` (Qwen3.5 layout) and a causal
softmax attention (`nnx.MultiHeadAttention`), or any list of those and `KimiDeltaAttention`
(`--layers gdn,kda,attention`), each followed by a SwiGLU MLP, with tied embeddings. The task: continue a random pattern that
repeats with a random period (2 to 6 tokens), predictable after one period. The train step
is an `nnx.jit` function: `nnx.value_and_grad` through the modules (and the op's custom VJP),
then `nnx.Optimizer.update` with AdamW.

    pip install 'gdn_jax[flax]'
    python examples/train_nnx.py            # 200 steps; prints the loss going down

Needs the `flax` extra (flax and optax). On the CPU most of the time is the compile of the train
step (about 10 s of CPU per linear-attention block); the default model runs in under a minute.
"""
from __future__ import annotations

import argparse
import os
import time

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from gdn_jax import layers  # noqa: E402
from gdn_jax.nnx import GatedDeltaNet, KimiDeltaAttention  # noqa: E402

VOCAB, HIDDEN, MLP = 16, 32, 64


class SwiGLU(nnx.Module):
    def __init__(self, d: int, hidden: int, *, rngs: nnx.Rngs):
        self.gate = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(d, hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """`x + mixer(norm(x))`, then `x + mlp(norm(x))`; the mixer is linear or softmax attention."""

    def __init__(self, kind: str, *, rngs: nnx.Rngs):
        self.kind = kind
        self.norm1 = nnx.RMSNorm(HIDDEN, rngs=rngs)
        self.norm2 = nnx.RMSNorm(HIDDEN, rngs=rngs)
        if kind == "gdn":
            self.mixer = GatedDeltaNet(layers.GatedDeltaNetConfig(HIDDEN, num_k_heads=2, num_v_heads=4,
                                                                  head_k_dim=16, head_v_dim=16),
                                       rngs=rngs)
        elif kind == "kda":
            self.mixer = KimiDeltaAttention(layers.KimiDeltaAttentionConfig(HIDDEN, num_heads=2, head_dim=16),
                                            rngs=rngs)
        elif kind == "attention":
            self.mixer = nnx.MultiHeadAttention(num_heads=2, in_features=HIDDEN, decode=False, rngs=rngs)
        else:
            raise ValueError(f"kind={kind!r} is not 'gdn', 'kda' or 'attention'")
        self.mlp = SwiGLU(HIDDEN, MLP, rngs=rngs)

    def __call__(self, x, causal_mask):
        h = self.norm1(x)
        if self.kind == "attention":
            h = self.mixer(h, mask=causal_mask)
        else:
            h, _ = self.mixer(h)  # training: a fresh sequence, the returned cache is not needed
        x = x + h
        return x + self.mlp(self.norm2(x))


class HybridLM(nnx.Module):
    def __init__(self, kinds: tuple[str, ...], *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, HIDDEN, rngs=rngs)
        self.blocks = nnx.List([Block(k, rngs=rngs) for k in kinds])
        self.norm = nnx.RMSNorm(HIDDEN, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))  # tied embeddings


def batch(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """Rows that repeat a random pattern of period 2..6."""
    out = np.empty((n, length), np.int32)
    for i in range(n):
        pattern = rng.integers(0, VOCAB, rng.integers(2, 7))
        out[i] = np.resize(pattern, length)
    return out


def loss_fn(model: HybridLM, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model: HybridLM, optimizer: nnx.Optimizer, tokens):
    loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy_after_first_period(model: HybridLM, tokens):
    """Next-token accuracy over positions 6+ (every pattern has repeated once by then)."""
    pred = jnp.argmax(model(tokens[:, :-1]), -1)
    return jnp.mean(pred[:, 6:] == tokens[:, 7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--layers", default="gdn,attention", help="comma-separated gdn / kda / attention")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()

    model = HybridLM(tuple(args.layers.split(",")), rngs=nnx.Rngs(args.seed))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: layers {args.layers}, "
          f"{n_params} parameters")
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.01), wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    held_out = jnp.asarray(batch(np.random.default_rng(10_000 + args.seed), 64, args.length))

    t0 = time.perf_counter()
    first = None
    for step in range(1, args.steps + 1):
        loss = float(train_step(model, optimizer, jnp.asarray(batch(rng, args.batch, args.length))))
        first = loss if first is None else first
        if step == 1:
            print(f"step    1  loss {loss:.3f}  (compiled in {time.perf_counter() - t0:.1f} s)")
        elif step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss:.3f}")
    acc = float(accuracy_after_first_period(model, held_out))
    print(f"loss {first:.3f} -> {loss:.3f} in {args.steps} steps, {time.perf_counter() - t0:.1f} s; "
          f"held-out next-token accuracy after the first period: {acc:.1%}")


if __name__ == "__main__":
    main()
