"""Our layers against the transformers modules they reimplement (torch, on the CPU).

Tested against transformers 5.23.0 and torch 2.13.0 (the `equivalence` extra). Tiny
random-weight linear-attention layers of Qwen3.5 (`Qwen3_5GatedDeltaNet`), Qwen3-Next
(`Qwen3NextGatedDeltaNet`) and Kimi Linear (`KimiLinearDeltaAttention`) are built in
transformers, their weights go through `gdn_jax.weights` into our pytrees, and both run:

  1. a prefill (T = 70: more than one 64-token chunk of transformers' torch chunked path;
     and T = 3: shorter than the conv kernel, so the conv state is zero-padded),
  2. one decode step through the cache,
  3. a continued prefill of several tokens from the cache,

comparing outputs and both caches (conv state, recurrent state) at 1e-5 relative (measured:
at most 2.1e-6, Kimi's recurrent state after the continuation). The
continuation is also compared with a single transformers prefill over the whole sequence.

flash-linear-attention and causal-conv1d are blocked before transformers is imported, so
transformers takes its torch fallbacks (with fla importable it would route to GPU kernels).

Run as a script to print the error table: `python tests/test_transformers_equivalence.py`.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys

import numpy as np
import pytest

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

TESTED_TRANSFORMERS = "5.23.0"
TESTED_TORCH = "2.13.0"
TOL = 1e-5  # measured errors are at most 2.1e-6 (run this file as a script for the table)

for _missing in ("torch", "transformers"):
    if importlib.util.find_spec(_missing) is None:
        pytest.skip(f"{_missing} is not installed: pip install 'torch=={TESTED_TORCH}' "
                    f"'transformers=={TESTED_TRANSFORMERS}' (the `equivalence` extra) to run the "
                    "transformers equivalence tests", allow_module_level=True)

# Keep transformers on its torch reference paths: with these importable it would dispatch to
# their (GPU) kernels. A None entry in sys.modules makes `import fla` raise ImportError.
for _blocked in ("fla", "causal_conv1d"):
    if _blocked not in sys.modules or sys.modules[_blocked] is None:
        sys.modules[_blocked] = None

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DynamicCache, KimiLinearConfig, Qwen3_5TextConfig, Qwen3NextConfig  # noqa: E402
from transformers.models.kimi_linear import modeling_kimi_linear as hf_kimi  # noqa: E402
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen35  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as hf_qwen3n  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gdn_jax import layers, weights  # noqa: E402
from helpers import rel_err  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

MODELS = ("qwen3_5", "qwen3_next", "kimi_linear")


def _uses_torch_fallback(fn) -> bool:
    """True when a `use_kernel_func_from_hub_with_fallback` function runs its torch body."""
    nonlocals = inspect.getclosurevars(fn).nonlocals
    return not nonlocals.get("is_new_implementation", False)


def build(model: str, seed: int = 0):
    """A tiny transformers layer with random weights, its cache, and our matching layer."""
    torch.manual_seed(seed)
    common = dict(hidden_size=48, num_hidden_layers=1, layer_types=["linear_attention"],
                  vocab_size=64, num_attention_heads=2, intermediate_size=32)
    if model == "qwen3_5":
        cfg = Qwen3_5TextConfig(**common, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
                                linear_num_value_heads=4, linear_key_head_dim=16,
                                linear_value_head_dim=24, linear_conv_kernel_dim=4)
        mod = hf_qwen35.Qwen3_5GatedDeltaNet(cfg, 0)
        fns = (hf_qwen35.torch_chunk_gated_delta_rule, hf_qwen35.torch_recurrent_gated_delta_rule)
    elif model == "qwen3_next":
        cfg = Qwen3NextConfig(**common, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
                              linear_num_value_heads=4, linear_key_head_dim=16,
                              linear_value_head_dim=24, linear_conv_kernel_dim=4)
        mod = hf_qwen3n.Qwen3NextGatedDeltaNet(cfg, 0)
        fns = (hf_qwen3n.torch_chunk_gated_delta_rule, hf_qwen3n.torch_recurrent_gated_delta_rule)
    elif model == "kimi_linear":
        cfg = KimiLinearConfig(**common, linear_num_heads=2, linear_head_dim=16,
                               linear_conv_kernel_dim=4, pad_token_id=None, bos_token_id=None,
                               eos_token_id=None)
        mod = hf_kimi.KimiLinearDeltaAttention(cfg, 0)
        fns = (hf_kimi.chunk_kimi_delta_attention, hf_kimi.recurrent_kimi_delta_attention)
    else:
        raise ValueError(model)
    for fn in fns:
        assert _uses_torch_fallback(fn), f"{fn.__name__} is not the torch fallback (fla importable?)"
    # Random weights for every parameter (Kimi's forget gate is allocated with torch.empty).
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(0.05, 3.0)))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("conv1d.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    mod.eval()
    sd = {k: v.detach().numpy().copy() for k, v in mod.state_dict().items()}
    if model == "kimi_linear":
        ours_cfg = layers.KimiDeltaAttentionConfig.from_hf_config(cfg)
        params = weights.kda_params_from_state_dict(sd, ours_cfg)
        fwd = jax.jit(lambda p, x, c: layers.kda_block(p, x, c, config=ours_cfg))
    else:
        ours_cfg = layers.GatedDeltaNetConfig.from_hf_config(cfg)
        assert ours_cfg.layout == model
        params = weights.gdn_params_from_state_dict(sd, ours_cfg)
        fwd = jax.jit(lambda p, x, c: layers.gdn_block(p, x, c, config=ours_cfg))
    return cfg, mod, params, fwd


def hf_run(mod, x, cache):
    with torch.no_grad():
        y = mod(torch.from_numpy(x), cache_params=cache)
    layer = cache.layers[0]
    return y.numpy(), layer.conv_states[0].numpy().copy(), layer.recurrent_states[0].numpy().copy()


def run_phases(model: str, T_prefill: int = 70, T_cont: int = 37, B: int = 2, seed: int = 0):
    """Prefill, one decode step, a continued prefill: the relative errors of each phase."""
    cfg, mod, params, fwd = build(model, seed)
    rng = np.random.default_rng(seed + 1)
    xs = [rng.standard_normal((B, t, cfg.hidden_size)).astype(np.float32) for t in (T_prefill, 1, T_cont)]
    cache_hf = DynamicCache(config=cfg)
    cache = None
    errors = {}
    outs_ours, outs_hf = [], []
    for phase, x in zip(("prefill", "decode", "continue"), xs):
        y_hf, conv_hf, rec_hf = hf_run(mod, x, cache_hf)
        y, cache = fwd(params, jnp.asarray(x), cache)
        errors[phase] = {"out": rel_err(y, y_hf), "conv_state": rel_err(cache.conv_state, conv_hf),
                         "recurrent_state": rel_err(cache.recurrent_state, rec_hf)}
        outs_ours.append(np.asarray(y))
        outs_hf.append(y_hf)
    # The continuation against one transformers prefill over the whole sequence (fresh cache).
    _, mod_full, _, _ = build(model, seed)
    full_hf, conv_full, rec_full = hf_run(mod_full, np.concatenate(xs, 1), DynamicCache(config=cfg))
    ours_all = np.concatenate(outs_ours, 1)
    errors["whole_sequence"] = {"out": rel_err(ours_all, full_hf), "conv_state": rel_err(cache.conv_state, conv_full),
                                "recurrent_state": rel_err(cache.recurrent_state, rec_full)}
    return errors


@pytest.fixture(scope="module", autouse=True)
def _versions():
    print(f"\ntransformers {transformers.__version__} (tested {TESTED_TRANSFORMERS}), "
          f"torch {torch.__version__} (tested {TESTED_TORCH})")


# Everyday tier: Qwen3.5 with a short prefill and continuation (the recurrent path).
@pytest.mark.parametrize("model,T_prefill,T_cont", [
    pytest.param(m, tp, tc, id=f"{tp}-{tc}-{m}",
                 marks=() if (m, tp) == ("qwen3_5", 3) else pytest.mark.slow)
    for tp, tc in [(70, 37), (3, 5)] for m in MODELS])
def test_matches_transformers(model, T_prefill, T_cont):
    errors = run_phases(model, T_prefill=T_prefill, T_cont=T_cont)
    print(f"\n{model} T_prefill={T_prefill} T_cont={T_cont}: {errors}")
    bad = {f"{ph}.{k}": e for ph, d in errors.items() for k, e in d.items() if not e <= TOL}
    assert not bad, (f"{model}: relative errors above {TOL} against transformers "
                     f"{transformers.__version__}: {bad} (all: {errors})")


@pytest.mark.slow
def test_state_dict_round_trip_and_layouts():
    """Qwen3-Next's grouped `in_proj_qkvz`/`in_proj_ba` and Qwen3.5's split projections load to the
    same parameters; writing back gives the transformers state dict again."""
    for model in ("qwen3_5", "qwen3_next"):
        cfg, mod, params, _ = build(model)
        ours_cfg = layers.GatedDeltaNetConfig.from_hf_config(cfg)
        sd = weights.gdn_params_to_state_dict(params, ours_cfg, layout=model)
        ref = mod.state_dict()
        assert set(sd) == set(ref)
        for k in sd:
            np.testing.assert_array_equal(sd[k], ref[k].numpy(), err_msg=k)
    cfg, mod, params, _ = build("kimi_linear")
    kcfg = layers.KimiDeltaAttentionConfig.from_hf_config(cfg)
    sd = weights.kda_params_to_state_dict(params, kcfg)
    assert set(sd) == set(mod.state_dict())
    # The original checkpoint names (separate q/k/v convs, forget gate on the attention) load too.
    ck = weights.kda_params_to_state_dict(params, kcfg, prefix="model.layers.0.self_attn.", naming="checkpoint")
    again = weights.kda_params_from_state_dict(ck, kcfg, prefix="model.layers.0.self_attn.")
    for k in params:
        np.testing.assert_array_equal(np.asarray(again[k]), np.asarray(params[k]), err_msg=k)


def main():
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, jax {jax.__version__}")
    for model in MODELS:
        for T_prefill, T_cont in ((70, 37), (3, 5)):
            errors = run_phases(model, T_prefill=T_prefill, T_cont=T_cont)
            for phase, d in errors.items():
                print(f"{model:12s} T={T_prefill:3d}/{T_cont:3d} {phase:15s} "
                      + "  ".join(f"{k} {v:.2e}" for k, v in d.items()))


if __name__ == "__main__":
    main()
