"""A small hybrid language model: gated delta net blocks plus one softmax-attention block.

The layout of Qwen3-Next / Qwen3.5 in miniature: pre-norm residual blocks, three linear-attention
mixers (GDN, optionally KDA) to one causal softmax attention, each followed by a SwiGLU MLP.
Everything is plain JAX: parameters are nested dicts, the optimiser is a hand-written Adam.

* `forward(params, tokens, cache, config=...)`: jit-compiled; with `cache=None` it is the
  training forward, with a cache it is a prefill or a decode step (the GDN blocks carry their
  conv and recurrent states, attention a preallocated KV cache).
* `train_step`: one Adam step; gradients flow through `gdn_jax.gated_delta_net` (its custom VJP).
* `generate`: greedy decoding, a prefill and then a `lax.scan` of one-token decode steps that
  go through the caches.
* `forward_packed(params, tokens, pools, batch, positions, config=...)`: one step of a serving
  engine: the packed tokens of several requests (prefills and decodes, `layers.ServingBatch`),
  each reading and writing its own slot of per-layer state pools (`init_pools`): the GDN blocks'
  conv and recurrent states, attention's KV cache. `examples/serve.py` drives it.

Run `python examples/hybrid_model.py` to train on a toy "continue the repeating pattern"
task for a few hundred steps and decode a few prompts (`--steps`, `--small` to shrink,
`--impl` to pick the op's path, `--kda` for KDA blocks). 400 steps reach 94-100% greedy
accuracy on held-out patterns.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from typing import NamedTuple

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gdn_jax import layers  # noqa: E402


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    vocab_size: int = 16
    hidden_size: int = 64
    mlp_size: int = 128
    layer_types: tuple[str, ...] = ("gdn", "gdn", "gdn", "attention")
    # linear attention (GDN: Hk q/k heads, Hv value heads; KDA uses gdn_heads_v and head_k_dim)
    gdn_heads_k: int = 2
    gdn_heads_v: int = 4
    head_k_dim: int = 16
    head_v_dim: int = 16
    # softmax attention
    attn_heads: int = 4
    attn_head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    impl: str = "auto"
    backend: str = "auto"

    @property
    def gdn(self) -> layers.GatedDeltaNetConfig:
        return layers.GatedDeltaNetConfig(self.hidden_size, self.gdn_heads_k, self.gdn_heads_v,
                                          self.head_k_dim, self.head_v_dim,
                                          rms_norm_eps=self.rms_norm_eps)

    @property
    def kda(self) -> layers.KimiDeltaAttentionConfig:
        return layers.KimiDeltaAttentionConfig(self.hidden_size, self.gdn_heads_v, self.head_k_dim,
                                               rms_norm_eps=self.rms_norm_eps)


class KVCache(NamedTuple):
    k: jax.Array  # [B, max_len, H, D]
    v: jax.Array


class HybridCache(NamedTuple):
    layers: tuple  # per layer: layers.LinearAttentionCache or KVCache
    pos: jax.Array  # int32 scalar: tokens already in the cache


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------

def _dense(key, n_in, n_out):
    return jax.random.normal(key, (n_in, n_out), jnp.float32) * n_in ** -0.5


def init_params(key, cfg: HybridConfig) -> dict:
    keys = jax.random.split(key, 2 + len(cfg.layer_types))
    D = cfg.hidden_size
    blocks = []
    for kind, k in zip(cfg.layer_types, keys[2:]):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        if kind == "gdn":
            mixer = layers.init_gdn_params(k1, cfg.gdn)
        elif kind == "kda":
            mixer = layers.init_kda_params(k1, cfg.kda)
        elif kind == "attention":
            a, b, c, d = jax.random.split(k1, 4)
            HD = cfg.attn_heads * cfg.attn_head_dim
            mixer = {"q": _dense(a, D, HD), "k": _dense(b, D, HD), "v": _dense(c, D, HD),
                     "o": _dense(d, HD, D) * 0.5}
        else:
            raise ValueError(f"unknown layer type {kind!r}")
        blocks.append({
            "norm1": jnp.ones((D,)), "mixer": mixer, "norm2": jnp.ones((D,)),
            "mlp": {"gate": _dense(k2, D, cfg.mlp_size), "up": _dense(k3, D, cfg.mlp_size),
                    "down": _dense(k4, cfg.mlp_size, D) * 0.5},
        })
    return {"embed": jax.random.normal(keys[0], (cfg.vocab_size, D)) * D ** -0.5, "blocks": blocks,
            "norm": jnp.ones((D,))}


def init_cache(cfg: HybridConfig, batch: int, max_len: int) -> HybridCache:
    caches = []
    for kind in cfg.layer_types:
        if kind == "gdn":
            caches.append(layers.init_gdn_cache(cfg.gdn, batch))
        elif kind == "kda":
            caches.append(layers.init_kda_cache(cfg.kda, batch))
        else:
            shape = (batch, max_len, cfg.attn_heads, cfg.attn_head_dim)
            caches.append(KVCache(jnp.zeros(shape), jnp.zeros(shape)))
    return HybridCache(tuple(caches), jnp.zeros((), jnp.int32))


def init_pools(cfg: HybridConfig, num_slots: int, max_len: int) -> tuple:
    """Per-layer state pools of `num_slots` request slots (for `serve_step`): a
    `layers.LinearAttentionCache` of pools for each GDN/KDA layer, a `KVCache` `[P, max_len, H, D]`
    for each attention layer."""
    return init_cache(cfg, num_slots, max_len).layers


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------

def _rope(x, positions, theta):
    """Rotary embedding on [B, T, H, D] at integer positions [T]."""
    D = x.shape[-1]
    inv = theta ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    ang = positions[:, None].astype(jnp.float32) * inv[None, :]  # [T, D/2]
    cos, sin = jnp.cos(ang)[None, :, None, :], jnp.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _attention(p, x, cache: KVCache | None, pos, cfg: HybridConfig):
    B, T, _ = x.shape
    H, Dh = cfg.attn_heads, cfg.attn_head_dim
    positions = pos + jnp.arange(T)
    q = _rope((x @ p["q"]).reshape(B, T, H, Dh), positions, cfg.rope_theta)
    k = _rope((x @ p["k"]).reshape(B, T, H, Dh), positions, cfg.rope_theta)
    v = (x @ p["v"]).reshape(B, T, H, Dh)
    if cache is None:
        keys, vals, kpos = k, v, positions
        new_cache = None
    else:
        keys = jax.lax.dynamic_update_slice(cache.k, k, (0, pos, 0, 0))
        vals = jax.lax.dynamic_update_slice(cache.v, v, (0, pos, 0, 0))
        kpos = jnp.arange(keys.shape[1])
        new_cache = KVCache(keys, vals)
    s = jnp.einsum("bthd,bshd->bhts", q, keys) * Dh ** -0.5
    mask = kpos[None, :] <= positions[:, None]  # causal; also hides unwritten cache slots
    s = jnp.where(mask[None, None], s, -1e30)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), vals)
    return o.reshape(B, T, H * Dh) @ p["o"], new_cache


def _layers(params, x, caches, mixer, cfg: HybridConfig):
    """The layer stack: per block, norm -> mixer -> residual -> norm -> SwiGLU MLP -> residual.
    `mixer(kind, params, h, cache)` runs one block's token mixer on its cache (or pool) and
    returns (h, new cache); the final norm and tied-embedding logits follow."""
    new = []
    for kind, blk, c in zip(cfg.layer_types, params["blocks"], caches):
        h = layers.rms_norm(x, blk["norm1"], cfg.rms_norm_eps)
        h, c = mixer(kind, blk["mixer"], h, c)
        new.append(c)
        x = x + h
        h = layers.rms_norm(x, blk["norm2"], cfg.rms_norm_eps)
        m = blk["mlp"]
        x = x + (jax.nn.silu(h @ m["gate"]) * (h @ m["up"])) @ m["down"]
    x = layers.rms_norm(x, params["norm"], cfg.rms_norm_eps)
    return x @ params["embed"].T, tuple(new)  # tied embeddings


def forward(params, tokens, cache: HybridCache | None = None, *, config: HybridConfig):
    """tokens `[B, T]` int -> (logits `[B, T, vocab]`, new cache or None).

    cache=None: training forward (no cache is built). With a cache (from `init_cache`): a
    prefill or decode step that continues after `cache.pos` tokens and returns the new cache.
    """
    cfg = config
    pos = jnp.zeros((), jnp.int32) if cache is None else cache.pos

    def mixer(kind, p, h, c):
        if kind == "gdn":
            return layers.gdn_block(p, h, c, config=cfg.gdn, impl=cfg.impl, backend=cfg.backend)
        if kind == "kda":
            return layers.kda_block(p, h, c, config=cfg.kda, impl=cfg.impl, backend=cfg.backend)
        return _attention(p, h, c, pos, cfg)

    caches = (None,) * len(cfg.layer_types) if cache is None else cache.layers
    logits, new = _layers(params, params["embed"][tokens], caches, mixer, cfg)
    if cache is None:
        return logits, None
    return logits, HybridCache(new, pos + tokens.shape[1])


def _packed_token_table(batch: layers.ServingBatch, positions, T: int):
    """Per packed token: its request's slot (the pool size P past cu_seqlens[N] and for padding
    requests, so writes there are dropped) and its position in the request's sequence."""
    cu, slots = batch.cu_seqlens, batch.state_indices
    t = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, slots.shape[0] - 1)
    valid = (t < cu[-1]) & (slots[seq] >= 0)
    return valid, slots[seq], positions[seq] + t - cu[seq]


def _packed_attention(p, x, pool: KVCache, batch, positions, cfg: HybridConfig):
    """Causal attention over packed requests, each over its own KV-cache slot: the new keys and
    values go to (slot, position), then each token attends to its slot's positions <= its own."""
    _, T, _ = x.shape
    H, Dh = cfg.attn_heads, cfg.attn_head_dim
    P = pool.k.shape[0]
    valid, slot, pos = _packed_token_table(batch, positions, T)
    q = _rope((x @ p["q"]).reshape(1, T, H, Dh), pos, cfg.rope_theta)[0]
    k = _rope((x @ p["k"]).reshape(1, T, H, Dh), pos, cfg.rope_theta)[0]
    v = (x @ p["v"]).reshape(T, H, Dh)
    write = jnp.where(valid, slot, P)
    pool = KVCache(pool.k.at[write, pos].set(k, mode="drop"),
                   pool.v.at[write, pos].set(v, mode="drop"))
    read = jnp.clip(slot, 0, P - 1)
    keys, vals = pool.k[read], pool.v[read]                        # [T, max_len, H, Dh]
    s = jnp.einsum("thd,tshd->hts", q, keys) * Dh ** -0.5
    mask = jnp.arange(keys.shape[1])[None, :] <= pos[:, None]       # [T, max_len]
    s = jnp.where(mask[None], s, -1e30)
    o = jnp.einsum("hts,tshd->thd", jax.nn.softmax(s, axis=-1), vals)
    o = jnp.where(valid[:, None, None], o, 0.0)
    return (o.reshape(1, T, H * Dh) @ p["o"]), pool


def forward_packed(params, tokens, pools: tuple, batch: layers.ServingBatch, positions, *,
                   config: HybridConfig):
    """One serving step. tokens `[1, T]`: the packed tokens of N requests laid out by `batch`
    (tokens after `batch.cu_seqlens[N]` are padding); pools: from `init_pools`; positions
    int32 `[N]`: tokens each request already has in its slot (0 for a new one, whose
    `has_initial_state` is False). Returns (logits `[1, T, vocab]`, new pools); per request
    equal to `forward` on that request alone with its own cache."""
    cfg = config

    def mixer(kind, p, h, pool):
        if kind == "gdn":
            return layers.gdn_block(p, h, pool, config=cfg.gdn, impl=cfg.impl,
                                    backend=cfg.backend, batch=batch)
        if kind == "kda":
            return layers.kda_block(p, h, pool, config=cfg.kda, impl=cfg.impl,
                                    backend=cfg.backend, batch=batch)
        return _packed_attention(p, h, pool, batch, positions, cfg)

    return _layers(params, params["embed"][tokens], pools, mixer, cfg)


def loss_fn(params, tokens, *, config: HybridConfig):
    """Mean next-token cross entropy."""
    logits, _ = forward(params, tokens[:, :-1], None, config=config)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(nll)


# --------------------------------------------------------------------------------------
# Training (hand-written Adam) and greedy decoding
# --------------------------------------------------------------------------------------

def adam_init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"m": zeros, "v": jax.tree.map(jnp.zeros_like, params), "t": jnp.zeros((), jnp.int32)}


@functools.partial(jax.jit, static_argnames=("config", "lr"))
def train_step(params, opt, tokens, *, config: HybridConfig, lr: float = 3e-3):
    """One Adam step; returns (params, opt, loss, grad_norm)."""
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, config=config)
    gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / (gnorm + 1e-6)), grads)  # clip at 1
    t = opt["t"] + 1
    b1, b2 = 0.9, 0.99
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, opt["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, opt["v"], grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    params = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + 1e-8), params, m, v)
    return params, {"m": m, "v": v, "t": t}, loss, gnorm


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def generate(params, prompt, *, config: HybridConfig, max_new_tokens: int):
    """Greedy decoding: prefill the prompt `[B, P]`, then `max_new_tokens` decode steps through the
    caches (each step is a T = 1 call of the op). Returns `[B, max_new_tokens]`."""
    B, P = prompt.shape
    cache = init_cache(config, B, P + max_new_tokens)
    logits, cache = forward(params, prompt, cache, config=config)
    first = jnp.argmax(logits[:, -1], axis=-1)

    def step(carry, _):
        tok, cache = carry
        logits, cache = forward(params, tok[:, None], cache, config=config)
        nxt = jnp.argmax(logits[:, -1], axis=-1)
        return (nxt, cache), tok

    (_, _), toks = jax.lax.scan(step, (first, cache), None, length=max_new_tokens)
    return toks.T


def toy_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, period=(2, 6)):
    """Sequences that repeat a random pattern of a random period: predictable after one period."""
    out = np.empty((batch, length), np.int32)
    for b in range(batch):
        p = rng.integers(period[0], period[1] + 1)
        pat = rng.integers(0, vocab, size=p)
        out[b] = np.tile(pat, length // p + 1)[:length]
    return out


def train(cfg: HybridConfig, steps: int, batch: int = 32, length: int = 32, seed: int = 0,
          log_every: int = 50, lr: float = 3e-3, print_fn=print):
    rng = np.random.default_rng(seed)
    params = init_params(jax.random.PRNGKey(seed), cfg)
    opt = adam_init(params)
    losses = []
    t0 = time.time()
    for i in range(steps):
        tokens = jnp.asarray(toy_batch(rng, batch, length, cfg.vocab_size))
        params, opt, loss, gnorm = train_step(params, opt, tokens, config=cfg, lr=lr)
        losses.append(float(loss))
        if print_fn and (i % log_every == 0 or i == steps - 1):
            print_fn(f"step {i:4d}  loss {float(loss):.3f}  grad-norm {float(gnorm):.2f}  "
                     f"({time.time() - t0:.1f}s)")
    return params, losses


def pattern_accuracy(params, cfg: HybridConfig, n: int = 32, prompt_len: int = 16, new: int = 16, seed: int = 1):
    """Greedy continuation of held-out repeating sequences: fraction of tokens right."""
    seqs = toy_batch(np.random.default_rng(seed), n, prompt_len + new, cfg.vocab_size)
    out = np.asarray(generate(params, jnp.asarray(seqs[:, :prompt_len]), config=cfg, max_new_tokens=new))
    return float(np.mean(out == seqs[:, prompt_len:])), seqs, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--impl", default="auto", help="impl of the op (auto, reference, recurrent, chunked)")
    ap.add_argument("--small", action="store_true", help="a tiny run (CI)")
    ap.add_argument("--kda", action="store_true", help="use KDA blocks instead of GDN")
    args = ap.parse_args(argv)
    cfg = HybridConfig(impl=args.impl)
    if args.kda:
        cfg = dataclasses.replace(cfg, layer_types=("kda", "kda", "kda", "attention"))
    steps = 20 if args.small else args.steps
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(init_params(jax.random.PRNGKey(0), cfg)))
    print(f"hybrid model {cfg.layer_types}, {n_params} parameters, backend {jax.default_backend()}")
    params, _ = train(cfg, steps)
    acc, seqs, out = pattern_accuracy(params, cfg)
    print(f"greedy continuation accuracy on held-out patterns: {acc:.1%}")
    for b in range(3):
        print("  prompt", seqs[b, :16].tolist(), "\n  model ", out[b].tolist(), "\n  truth ", seqs[b, 16:].tolist())
    return acc


if __name__ == "__main__":
    main()
