"""A tiny gated-delta-net language model trained over a device mesh.

Three layouts of the same SGD step, on 8 host CPU devices (this script sets
`--xla_force_host_platform_device_count=8` itself before importing jax):

* one device (the yardstick),
* data x tensor parallel (4 x 2): sequences over "data", value heads over "tensor"; the
  projections are split by heads, so the op runs on local heads with no communication,
* data x context parallel (2 x 4): sequences over "data", each sequence split along T over
  "seq"; the op combines per-segment state transitions (`gdn_jax.sharding`).

All three give the same loss and gradients (printed), and a few steps on a toy task (count on
with the stride seen in context) bring the loss down. `python examples/sharded_training.py`.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from gdn_jax import gated_delta_net  # noqa: E402
from gdn_jax.sharding import sharded_gated_delta_net  # noqa: E402

VOCAB, D, HK, HV, K, V, LAYERS = 16, 64, 2, 4, 16, 16, 2


def init_params(key) -> dict:
    def dense(key, n_in, n_out):
        return jax.random.normal(key, (n_in, n_out), jnp.float32) * n_in ** -0.5

    keys = iter(jax.random.split(key, 2 + 6 * LAYERS))
    params = {"embed": jax.random.normal(next(keys), (VOCAB, D), jnp.float32),
              "unembed": dense(next(keys), D, VOCAB), "layers": []}
    for _ in range(LAYERS):
        params["layers"].append({
            "wq": dense(next(keys), D, HK * K), "wk": dense(next(keys), D, HK * K),
            "wv": dense(next(keys), D, HV * V), "wa": dense(next(keys), D, HV),
            "wb": dense(next(keys), D, HV), "wo": dense(next(keys), HV * V, D),
        })
    return params


def param_specs(tensor_axis: str | None) -> dict:
    """Tensor parallel: the q/k/v/gate projections split by heads (columns), the output
    projection by its input rows; XLA adds the all-reduce after `wo`, the op needs none."""
    t = tensor_axis
    layer = {"wq": P(None, t), "wk": P(None, t), "wv": P(None, t), "wa": P(None, t),
             "wb": P(None, t), "wo": P(t, None)}
    return {"embed": P(), "unembed": P(), "layers": [layer] * LAYERS}


def forward(params, tokens, *, mesh=None, impl="auto", **axes):
    """Logits `[B, T, VOCAB]`; `mesh=None` runs the plain op on one device."""
    B, T = tokens.shape
    x = params["embed"][tokens]
    for p in params["layers"]:
        q = (x @ p["wq"]).reshape(B, T, HK, K)
        k = (x @ p["wk"]).reshape(B, T, HK, K)
        v = (x @ p["wv"]).reshape(B, T, HV, V)
        g = -jax.nn.softplus(x @ p["wa"])          # log decay, GDA: one gate per head
        beta = jax.nn.sigmoid(x @ p["wb"])
        kw = dict(use_qk_l2norm_in_kernel=True, impl=impl)
        if mesh is None:
            o, _ = gated_delta_net(q, k, v, g, beta, **kw)
        else:
            o, _ = sharded_gated_delta_net(q, k, v, g, beta, mesh=mesh, **axes, **kw)
        x = x + o.reshape(B, T, HV * V) @ p["wo"]
    return x @ params["unembed"]


def loss_fn(params, tokens, targets, **kw):
    logits = forward(params, tokens, **kw)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_step(lr: float, **kw):
    @jax.jit
    def step(params, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets, **kw)
        return loss, grads, jax.tree.map(lambda p, g: p - lr * g, params, grads)
    return step


def toy_batch(rng, B: int, T: int):
    """Sequences counting up modulo VOCAB from a random start with a random stride of 1..3
    (the stride is only visible from context); targets are the next tokens."""
    start = rng.integers(0, VOCAB, (B, 1))
    stride = rng.integers(1, 4, (B, 1))
    seqs = ((start + stride * np.arange(T + 1)) % VOCAB).astype(np.int32)
    return jnp.asarray(seqs[:, :-1]), jnp.asarray(seqs[:, 1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=96, help="T; a multiple of 4 (the seq axis)")
    ap.add_argument("--impl", default="auto", help="the op's path (auto, chunked, recurrent, reference)")
    args = ap.parse_args()
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, got {jax.device_count()} (set XLA_FLAGS before jax starts)")

    devices = np.array(jax.devices()[:8])
    auto = (AxisType.Auto, AxisType.Auto)
    layouts = {
        "1 device": (None, {}, None, None),
        "data x tensor (4 x 2)": (jax.sharding.Mesh(devices.reshape(4, 2), ("data", "tensor"), axis_types=auto),
                                  dict(batch_axis="data", head_axis="tensor"), "tensor", P("data", None)),
        "data x seq (2 x 4)": (jax.sharding.Mesh(devices.reshape(2, 4), ("data", "seq"), axis_types=auto),
                               dict(batch_axis="data", seq_axis="seq"), None, P("data", "seq")),
    }
    rng = np.random.default_rng(0)
    params0 = init_params(jax.random.key(0))
    tokens, targets = toy_batch(rng, args.batch, args.seq_len)

    print("one step from the same parameters and batch, in each layout:")
    first, steps = {}, {}
    for name, (mesh, axes, tensor_axis, data_spec) in layouts.items():
        params, tok, tgt = params0, tokens, targets
        if mesh is not None:  # place parameters and data as the layout wants them
            params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                  params0, param_specs(tensor_axis))
            tok, tgt = (jax.device_put(x, NamedSharding(mesh, data_spec)) for x in (tokens, targets))
        step = steps[name] = make_step(args.lr, mesh=mesh, impl=args.impl, **axes)
        t0 = time.perf_counter()
        loss, grads, _ = step(params, tok, tgt)
        loss = float(loss)
        first[name] = (loss, grads)
        base_loss, base_grads = first["1 device"]
        gerr = max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads)))
        print(f"  {name:24s} loss {loss:.6f}  |loss - 1 device| {abs(loss - base_loss):.1e}  "
              f"max grad rel. diff {gerr:.1e}  ({time.perf_counter() - t0:.1f} s with compile)")

    name = "data x seq (2 x 4)"
    mesh, axes, tensor_axis, data_spec = layouts[name]
    print(f"training {args.steps} steps, {name}:")
    step = steps[name]
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                          params0, param_specs(tensor_axis))
    for i in range(args.steps):
        tok, tgt = (jax.device_put(x, NamedSharding(mesh, data_spec))
                    for x in toy_batch(rng, args.batch, args.seq_len))
        loss, _, params = step(params, tok, tgt)
        if i % 10 == 0 or i == args.steps - 1:
            print(f"  step {i:3d}  loss {float(loss):.4f}")


if __name__ == "__main__":
    main()
