"""Loading Hugging Face state dicts into the parameter pytrees of `gdn_jax.layers`.

A state dict here is a plain `dict[str, numpy.ndarray]` keyed by the transformers parameter
names (`model.layers.0.linear_attn.in_proj_qkv.weight`, ...). It comes from safetensors
files (read by the small reader below: no `safetensors` or `torch` needed, bf16 included
through `ml_dtypes`), from `.npz` files, or from `{k: v.numpy() for k, v in
module.state_dict().items()}`.

Layouts understood:

* Qwen3.5 (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`): taken as is.
* Qwen3-Next (`in_proj_qkvz` and `in_proj_ba`, rows grouped per key head: for each key head
  `[q (K), k (K), v (g*V), z (g*V)]` and `[b (g), a (g)]`, g = Hv // Hk): ungrouped into the
  Qwen3.5 order, so one forward serves both.
* Kimi Linear, both the transformers module names (`forget_gate.f_a_proj`, one `conv1d`)
  and the original checkpoint names (`f_a_proj`, `dt_bias`, `A_log` on the attention module,
  separate `q_conv1d` / `k_conv1d` / `v_conv1d`), which transformers converts at load time.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from .layers import GatedDeltaNetConfig, KimiDeltaAttentionConfig

__all__ = [
    "load_state_dict",
    "load_safetensors",
    "save_safetensors",
    "find_layer_prefixes",
    "gdn_params_from_state_dict",
    "gdn_params_to_state_dict",
    "kda_params_from_state_dict",
    "kda_params_to_state_dict",
]

# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _st_dtype(name: str):
    if name in _ST_DTYPES:
        return np.dtype(_ST_DTYPES[name])
    if name == "BF16":
        import ml_dtypes  # a dependency of jax
        return np.dtype(ml_dtypes.bfloat16)
    raise TypeError(f"safetensors dtype {name!r} is not supported")


def _st_name(dtype) -> str:
    dtype = np.dtype(dtype)
    for k, v in _ST_DTYPES.items():
        if np.dtype(v) == dtype:
            return k
    if dtype.name == "bfloat16":
        return "BF16"
    raise TypeError(f"dtype {dtype} cannot be written to safetensors")


def load_safetensors(path: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Reads a `.safetensors` file (memory-mapped) into numpy arrays; `keys` limits what is read."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    want = None if keys is None else set(keys)
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or (want is not None and name not in want):
            continue
        start, end = info["data_offsets"]
        dt = _st_dtype(info["dtype"])
        out[name] = np.asarray(data[start:end].view(dt).reshape(info["shape"]))
    return out


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes numpy arrays to a `.safetensors` file (the format `safetensors.numpy.save_file` writes)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        b = arr.tobytes()
        header[name] = {"dtype": _st_name(arr.dtype), "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    if metadata:
        header["__metadata__"] = dict(metadata)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_state_dict(path: str, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """A state dict from a `.safetensors` file, a `.npz` file, or a directory holding either
    (sharded checkpoints with `model.safetensors.index.json` included)."""
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".npz")))
        if not files:
            raise FileNotFoundError(f"no .safetensors or .npz file in {path}")
        out = {}
        for name in files:
            out.update(load_state_dict(os.path.join(path, name), keys))
        return out
    if path.endswith(".safetensors"):
        return load_safetensors(path, keys)
    if path.endswith(".npz"):
        with np.load(path) as z:
            names = z.files if keys is None else [k for k in z.files if k in set(keys)]
            return {k: z[k] for k in names}
    raise ValueError(f"cannot read {path!r}: expected a .safetensors or .npz file or a directory")


def find_layer_prefixes(state_dict: Mapping[str, np.ndarray], kind: str = "auto") -> list[str]:
    """The key prefixes of the linear-attention layers in a state dict, in layer order.

    kind: "qwen3_5" (keys ending in `in_proj_qkv.weight`), "qwen3_next" (`in_proj_qkvz.weight`),
    "kda" (`b_proj.weight` next to `g_a_proj.weight`), or "auto" (any of them).
    """
    suffixes = {"qwen3_5": ["in_proj_qkv.weight"], "qwen3_next": ["in_proj_qkvz.weight"],
                "kda": ["g_a_proj.weight"]}
    if kind == "auto":
        ends = [s for v in suffixes.values() for s in v]
    elif kind in suffixes:
        ends = suffixes[kind]
    else:
        raise ValueError(f"kind={kind!r} is not one of {('auto', *suffixes)}")
    prefixes = {k[: -len(e)] for k in state_dict for e in ends if k.endswith(e)}

    def order(p):
        m = re.findall(r"\d+", p)
        return ([int(x) for x in m], p)

    return sorted(prefixes, key=order)


# --------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------

def _get(sd, prefix, name):
    key = prefix + name
    if key not in sd:
        near = [k for k in sd if k.startswith(prefix)][:8]
        raise KeyError(f"state dict has no {key!r} (keys under {prefix!r}: {near})")
    return np.asarray(sd[key])


def _check(name, arr, shape):
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    return arr


def _cast(x, dtype):
    return jnp.asarray(x if dtype is None else np.asarray(x).astype(dtype))


def gdn_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: GatedDeltaNetConfig,
                               prefix: str = "", layout: str | None = None, dtype=None) -> dict:
    """Parameters of `layers.gdn_block` from a Qwen3.5 or Qwen3-Next state dict.

    prefix: what precedes the parameter names, e.g. "model.layers.0.linear_attn." (see
    `find_layer_prefixes`). layout: "qwen3_5" or "qwen3_next"; by default, whichever the keys
    show. dtype: cast every array (default: keep the stored dtype).
    """
    c = config
    if layout is None:
        layout = "qwen3_next" if prefix + "in_proj_qkvz.weight" in state_dict else "qwen3_5"
    H, Hk, K, V, D = c.num_v_heads, c.num_k_heads, c.head_k_dim, c.head_v_dim, c.hidden_size
    grp = H // Hk
    if layout == "qwen3_next":
        qkvz = _check("in_proj_qkvz.weight", _get(state_dict, prefix, "in_proj_qkvz.weight"),
                      (Hk * (2 * K + 2 * grp * V), D))
        qkvz = qkvz.reshape(Hk, 2 * K + 2 * grp * V, D)
        q, k, v, z = np.split(qkvz, [K, 2 * K, 2 * K + grp * V], axis=1)
        qkv = np.concatenate([q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)], 0)
        z = z.reshape(-1, D)
        ba = _check("in_proj_ba.weight", _get(state_dict, prefix, "in_proj_ba.weight"), (2 * H, D))
        ba = ba.reshape(Hk, 2 * grp, D)
        b, a = ba[:, :grp].reshape(H, D), ba[:, grp:].reshape(H, D)
    elif layout == "qwen3_5":
        qkv = _check("in_proj_qkv.weight", _get(state_dict, prefix, "in_proj_qkv.weight"), (c.conv_dim, D))
        z = _check("in_proj_z.weight", _get(state_dict, prefix, "in_proj_z.weight"), (c.value_dim, D))
        b = _check("in_proj_b.weight", _get(state_dict, prefix, "in_proj_b.weight"), (H, D))
        a = _check("in_proj_a.weight", _get(state_dict, prefix, "in_proj_a.weight"), (H, D))
    else:
        raise ValueError(f"layout={layout!r} is not 'qwen3_5' or 'qwen3_next'")
    conv = _get(state_dict, prefix, "conv1d.weight")
    conv = _check("conv1d.weight", conv.reshape(conv.shape[0], -1), (c.conv_dim, c.conv_kernel_size))
    return {
        "in_proj_qkv": _cast(qkv.T, dtype),
        "in_proj_z": _cast(z.T, dtype),
        "in_proj_b": _cast(b.T, dtype),
        "in_proj_a": _cast(a.T, dtype),
        "conv1d": _cast(conv, dtype),
        "dt_bias": _cast(_check("dt_bias", _get(state_dict, prefix, "dt_bias"), (H,)), dtype),
        "A_log": _cast(_check("A_log", _get(state_dict, prefix, "A_log"), (H,)), dtype),
        "norm": _cast(_check("norm.weight", _get(state_dict, prefix, "norm.weight"), (V,)), dtype),
        "out_proj": _cast(_check("out_proj.weight", _get(state_dict, prefix, "out_proj.weight"),
                                 (D, c.value_dim)).T, dtype),
    }


def gdn_params_to_state_dict(params: Mapping, config: GatedDeltaNetConfig, prefix: str = "",
                             layout: str = "qwen3_5") -> dict[str, np.ndarray]:
    """The inverse of `gdn_params_from_state_dict` (torch layouts: Linear weights `[out, in]`,
    conv1d weight `[C, 1, W]`)."""
    c = config
    H, Hk, K, V, D = c.num_v_heads, c.num_k_heads, c.head_k_dim, c.head_v_dim, c.hidden_size
    grp = H // Hk
    p = {k: np.asarray(v) for k, v in params.items()}
    sd = {}
    qkv, z, b, a = p["in_proj_qkv"].T, p["in_proj_z"].T, p["in_proj_b"].T, p["in_proj_a"].T
    if layout == "qwen3_next":
        q, k, v = np.split(qkv, [c.key_dim, 2 * c.key_dim], axis=0)
        qkvz = np.concatenate([q.reshape(Hk, K, D), k.reshape(Hk, K, D), v.reshape(Hk, grp * V, D),
                               z.reshape(Hk, grp * V, D)], axis=1).reshape(-1, D)
        ba = np.concatenate([b.reshape(Hk, grp, D), a.reshape(Hk, grp, D)], axis=1).reshape(-1, D)
        sd["in_proj_qkvz.weight"], sd["in_proj_ba.weight"] = qkvz, ba
    elif layout == "qwen3_5":
        sd.update({"in_proj_qkv.weight": qkv, "in_proj_z.weight": z, "in_proj_b.weight": b,
                   "in_proj_a.weight": a})
    else:
        raise ValueError(f"layout={layout!r} is not 'qwen3_5' or 'qwen3_next'")
    sd["conv1d.weight"] = p["conv1d"][:, None, :]
    sd["dt_bias"], sd["A_log"], sd["norm.weight"] = p["dt_bias"], p["A_log"], p["norm"]
    sd["out_proj.weight"] = p["out_proj"].T
    return {prefix + k: np.ascontiguousarray(v) for k, v in sd.items()}


def kda_params_from_state_dict(state_dict: Mapping[str, np.ndarray], config: KimiDeltaAttentionConfig,
                               prefix: str = "", dtype=None) -> dict:
    """Parameters of `layers.kda_block` from a Kimi Linear state dict (transformers module names
    or the original checkpoint names, see the module docstring)."""
    c = config
    H, K, D, HK = c.num_heads, c.head_dim, c.hidden_size, c.qkv_dim

    def pick(*names):
        for n in names:
            if prefix + n in state_dict:
                return np.asarray(state_dict[prefix + n])
        return _get(state_dict, prefix, names[0])

    if prefix + "conv1d.weight" in state_dict:
        conv = np.asarray(state_dict[prefix + "conv1d.weight"])
    else:
        conv = np.concatenate([_get(state_dict, prefix, f"{n}_conv1d.weight") for n in "qkv"], 0)
    conv = _check("conv1d.weight", conv.reshape(conv.shape[0], -1), (3 * HK, c.conv_kernel_size))
    lin = lambda name, shape: _cast(_check(name, pick(name), shape).T, dtype)  # noqa: E731
    return {
        "q_proj": lin("q_proj.weight", (HK, D)),
        "k_proj": lin("k_proj.weight", (HK, D)),
        "v_proj": lin("v_proj.weight", (HK, D)),
        "conv1d": _cast(conv, dtype),
        "f_a_proj": _cast(_check("f_a_proj.weight", pick("forget_gate.f_a_proj.weight", "f_a_proj.weight"),
                                 (K, D)).T, dtype),
        "f_b_proj": _cast(_check("f_b_proj.weight", pick("forget_gate.f_b_proj.weight", "f_b_proj.weight"),
                                 (HK, K)).T, dtype),
        "dt_bias": _cast(pick("forget_gate.dt_bias", "dt_bias").reshape(HK), dtype),
        "A_log": _cast(pick("forget_gate.A_log", "A_log").reshape(H), dtype),
        "b_proj": lin("b_proj.weight", (H, D)),
        "g_a_proj": lin("g_a_proj.weight", (K, D)),
        "g_b_proj": lin("g_b_proj.weight", (HK, K)),
        "o_norm": _cast(_check("o_norm.weight", pick("o_norm.weight"), (K,)), dtype),
        "o_proj": lin("o_proj.weight", (D, HK)),
    }


def kda_params_to_state_dict(params: Mapping, config: KimiDeltaAttentionConfig, prefix: str = "",
                             naming: str = "transformers") -> dict[str, np.ndarray]:
    """The inverse of `kda_params_from_state_dict`. naming: "transformers" (module names of
    `KimiLinearDeltaAttention`) or "checkpoint" (the original released names)."""
    c = config
    p = {k: np.asarray(v) for k, v in params.items()}
    sd = {n + ".weight": p[n].T for n in ("q_proj", "k_proj", "v_proj", "b_proj", "g_a_proj",
                                          "g_b_proj", "o_proj")}
    sd["o_norm.weight"] = p["o_norm"]
    if naming == "transformers":
        sd["conv1d.weight"] = p["conv1d"][:, None, :]
        sd["forget_gate.f_a_proj.weight"] = p["f_a_proj"].T
        sd["forget_gate.f_b_proj.weight"] = p["f_b_proj"].T
        sd["forget_gate.dt_bias"] = p["dt_bias"]
        sd["forget_gate.A_log"] = p["A_log"].reshape(1, 1, c.num_heads, 1)
    elif naming == "checkpoint":
        for i, n in enumerate("qkv"):
            sd[f"{n}_conv1d.weight"] = p["conv1d"][i * c.qkv_dim:(i + 1) * c.qkv_dim, None, :]
        sd["f_a_proj.weight"], sd["f_b_proj.weight"] = p["f_a_proj"].T, p["f_b_proj"].T
        sd["dt_bias"], sd["A_log"] = p["dt_bias"], p["A_log"].reshape(1, 1, c.num_heads, 1)
    else:
        raise ValueError(f"naming={naming!r} is not 'transformers' or 'checkpoint'")
    return {prefix + k: np.ascontiguousarray(v) for k, v in sd.items()}
