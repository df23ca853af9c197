"""Lower Pallas Triton kernels for CUDA and compile them for a compile-only H100, no GPU needed.

Self-contained (the tests need no tool from outside the repository). Needs jax-cuda12-plugin and
jax-cuda12-pjrt (same version as jax) and a `ptxas` (PATH, /usr/local/cuda*/bin, $PTXAS or the
nvidia-cuda-nvcc-cu12 wheel).

    python tests/gpu_compile.py            # compiles the recurrent and chunked kernel sets, prints JSON
    python tests/gpu_compile.py --set chunked   # one set

The compile runs XLA's GPU pipeline (Triton -> LLVM NVPTX -> ptxas) for sm_90a; the PTX it
dumps is re-assembled with `ptxas -v` for registers / spills, and the thunk sequence gives the
launch grid, threads and shared memory per kernel. Run it in a subprocess: a kernel with a
non-power-of-two num_warps aborts the process (LLVM fatal error).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

# Before jax is imported: without a driver the CUDA plugin then registers quietly.
if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"
# XLA's GPU compile captures stack traces it never prints, and LLVM symbolizes each one in an
# llvm-symbolizer subprocess: 33 of them seen in 50 s of this script, each a second of a core.
# Unsymbolized (the raw addresses) they cost nothing; a crash's trace is then unsymbolized too.
os.environ.setdefault("LLVM_DISABLE_SYMBOLIZATION", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gdn_jax.lowering import abstract_gpu, lower  # noqa: E402

# jax >= 0.11 deprecates Pallas Triton (every Triton lowering warns; the kernels are Triton
# kernels on purpose, see the README); the compile report ignores that one warning only.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated"

H100_SMEM_PER_BLOCK = 232448  # 227 KiB opt-in
H100_SMEM_PER_SM = 233472
H100_REGS_PER_SM = 65536
H100_SMS = 132
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84942979072 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def _pip_ptxas() -> str | None:
    """ptxas of the nvidia-cuda-nvcc-cu12 wheel (where jax's CUDA plugin looks for CUDA tools)."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    except ModuleNotFoundError:
        return None
    locs = list(spec.submodule_search_locations or []) if spec else []
    return os.path.join(locs[0], "bin", "ptxas") if locs else None


def find_ptxas() -> str | None:
    cands = [os.environ.get("PTXAS"), shutil.which("ptxas"),
             *sorted(glob.glob("/usr/local/cuda*/bin/ptxas"), reverse=True), _pip_ptxas()]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def unavailable_reason() -> str | None:
    """None when CUDA compile checks can run here, else why not (for pytest.skip)."""
    for mod, pkg in (("jax_cuda12_plugin", "jax-cuda12-plugin"), ("jax_plugins.xla_cuda12", "jax-cuda12-pjrt")):
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{pkg} is not installed (pip install {pkg}==<jax version>)"
    if find_ptxas() is None:
        return "no ptxas found (PATH, /usr/local/cuda*/bin, $PTXAS or nvidia-cuda-nvcc-cu12)"
    return None


def triton_kernels(fn, *args):
    """Lowers fn(*args) for CUDA; returns [{name, grid, num_warps, num_stages, ir}] (ir: tt text)."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as tl

    lowered = lower(fn, *args, platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    out = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    yield o.operation
                    yield from walk(o.operation)

    for op in walk(module.operation):
        if op.name != "stablehlo.custom_call":
            continue
        if ir.StringAttr(op.attributes["call_target_name"]).value != "__gpu$xla.gpu.triton":
            continue
        cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])
        raw = ir.StringAttr(cfg["ir"]).value_bytes
        with tl._new_ir_context():
            text = ir.Module.parse(raw).operation.get_asm(enable_debug_info=False)
        ival = lambda key: ir.IntegerAttr(cfg[key]).value  # noqa: E731
        out.append({"name": ir.StringAttr(cfg["name"]).value,
                    "grid": [ival("grid_x"), ival("grid_y"), ival("grid_z")],
                    "num_warps": ival("num_warps"), "num_stages": ival("num_stages"), "ir": text})
    return out


_PTXAS_VALS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}
_THUNK = re.compile(r"\s(\S+)\s+grid: \[([^\]]*)\]\s+threads: \[([^\]]*)\]\s+shared_memory: (\d+)")


def ptxas_info(ptx: str, ptxas: str) -> tuple[str, dict]:
    arch = (re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M) or [None, "sm_90a"])[1]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        p = subprocess.run([ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    info, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([^' ]+)'?", line)
        if m:
            cur = info.setdefault(m.group(1), {})
        elif cur is not None:
            for key, rx in _PTXAS_VALS.items():
                mm = rx.search(line)
                if mm:
                    cur[key] = int(mm.group(1))
    return arch, info


def compile_h100(fn, *args, donate_argnums=()) -> tuple[list[dict], str]:
    """XLA-compiles fn(*args) for a compile-only H100.

    Returns (one dict per GPU kernel launched, the optimized HLO text).
    """
    import jax
    from jax._src import xla_bridge as xb
    from jax.sharding import SingleDeviceSharding
    from jaxlib import xla_client

    jax.devices()  # plugin discovery
    c_api = getattr(xb._backend_factories.get("cuda"), "c_api", None)
    if c_api is None:
        import jax_plugins.xla_cuda12 as xc
        c_api = xla_client.load_pjrt_plugin_dynamically("cuda", str(xc._get_library_path()))
    topo = xla_client.make_c_api_device_topology(c_api, "", target_config=H100_TARGET_CONFIG,
                                                 topology="1x1x1")
    shd = SingleDeviceSharding(topo._make_compile_only_devices()[0])
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shd) for a in args]
    ptxas = find_ptxas()
    pallas_names = {k["name"] for k in triton_kernels(fn, *args)}
    d = tempfile.mkdtemp(prefix="gdn_xla_dump_")
    try:
        # the arguments live on the compile-only H100; the abstract device names it to Pallas
        with abstract_gpu():
            lowered = jax.jit(fn, donate_argnums=donate_argnums).trace(*args).lower()
        # xla_dump_emitter_re: jaxlib >= 0.11 compiles the Triton custom calls apart from the
        # module's LLVM IR and dumps their PTX only for emitters matching this regex
        compiled = lowered.compile(compiler_options={"xla_dump_to": d, "xla_dump_emitter_re": ".*"})
        info = {}
        for p in sorted(glob.glob(os.path.join(d, "*.ptx"))):
            ptx = open(p).read()
            if ptx.strip():
                arch, fi = ptxas_info(ptx, ptxas)
                for name, v in fi.items():
                    info[name] = dict(v, arch=arch)
        out = []
        for tp in sorted(glob.glob(os.path.join(d, "*thunk_sequence.txt"))):
            for line in open(tp):
                m = _THUNK.search(line)
                if not m:
                    continue
                name, grid, threads, smem = m.groups()
                nthreads = 1
                for t in threads.split(","):
                    nthreads *= int(t)
                # ceil: tiny XLA fusions (e.g. the cu_seqlens tables) run fewer than 32 threads
                r = {"name": name, "pallas": re.sub(r"__\d+$", "", name) in pallas_names,
                     "grid": [int(g) for g in grid.split(",")], "num_warps": -(-nthreads // 32),
                     "dynamic_smem": int(smem), **info.get(name, {})}
                r["smem"] = r["dynamic_smem"] + r.get("static_smem", 0)
                if r.get("registers"):
                    regs_per_warp = -(-r["registers"] * 32 // 256) * 256
                    r["blocks_per_sm"] = min(H100_REGS_PER_SM // (regs_per_warp * r["num_warps"]),
                                             H100_SMEM_PER_SM // (r["smem"] + 1024), 32,
                                             64 // r["num_warps"])
                out.append(r)
        return out, compiled.as_text()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _recurrent_cases():
    """(label, fn, args) for the kernels the compile tests check."""
    import jax
    import jax.numpy as jnp

    from gdn_jax.kernels import recurrent

    S = jax.ShapeDtypeStruct
    f32 = jnp.float32

    def case(dt, kda, layout, B=32, T=1, Hk=16, Hv=32, K=128, V=128, h0=True, ht=True,
             varlen=False, pool=0, ns=0, tok=False):
        """varlen: B sequences packed into one row of T tokens (cu_seqlens); pool: P slots
        (state_indices [B]); ns: snapshots; tok: per-token write slots (output_state_indices
        [B, T], speculative decoding). Extra int32 inputs follow the state (arg 5)."""
        dt = jnp.dtype(dt)
        N, B = B, (1 if varlen else B)
        lead = pool or N
        st = (lead, Hv, K, V) if layout == "kv" else (lead, Hv, V, K)
        args = [S((B, T, Hk, K), dt), S((B, T, Hk, K), dt), S((B, T, Hv, V), dt),
                S((B, T, Hv, K) if kda else (B, T, Hv), f32), S((B, T, Hv), f32)]
        if h0:
            args.append(S(st, f32))
        if varlen:
            args.append(S((N + 1,), jnp.int32))
        if pool:
            args.append(S((N,), jnp.int32))
        if tok:
            args.append(S((N, T), jnp.int32))

        def fn(*a):
            a = list(a)
            out_idx = a.pop() if tok else None
            idx = a.pop() if pool else None
            cu = a.pop() if varlen else None
            return recurrent.fused_recurrent(*a, scale=K ** -0.5, use_qk_l2norm=True,
                                             output_final_state=ht, state_layout=layout,
                                             cu_seqlens=cu, state_indices=idx, num_snapshots=ns,
                                             output_state_indices=out_idx)
        extra = (f"{' varlen' if varlen else ''}{f' pool={pool}' if pool else ''}"
                 f"{f' snap{ns}' if ns else ''}{' token-slots' if tok else ''}")
        label = (f"{'kda' if kda else 'gda'} {dt.name} {layout}{extra} {'N' if varlen else 'B'}={N} "
                 f"T={T} Hv={Hv} K={K} V={V}{' h0' if h0 and not pool else ''}{' ht' if ht else ''}")
        return label, fn, args

    cases = [case(dt, kda, layout) for dt in (f32, jnp.bfloat16) for kda in (False, True)
             for layout in ("vk", "kv")]
    cases += [case(f32, False, "kv", T=8), case(f32, True, "vk", T=64),  # short chunks
              case(jnp.bfloat16, False, "vk", T=8), case(jnp.bfloat16, True, "kv", T=64),
              case(f32, False, "vk", B=1),                      # B=1 decode config
              case(jnp.float16, False, "kv", T=16, h0=False, ht=False),
              case(f32, True, "vk", B=2, T=8, Hv=4, Hk=4, K=256, V=256),
              case(jnp.bfloat16, False, "kv", B=2, T=8, Hv=4, Hk=2, K=16, V=16),
              case(f32, True, "kv", B=2, T=8, Hv=8, Hk=2, K=64, V=256)]
    # Packed sequences + state pool (32 sequences, 128 tokens, 64 slots), snapshots
    # (speculative decoding: the states after each of the last 4 tokens), and all of them at once.
    cases += [case(jnp.bfloat16, False, "kv", T=128, varlen=True, pool=64),
              case(jnp.bfloat16, True, "vk", T=8, ns=4),
              case(jnp.bfloat16, True, "kv", T=128, varlen=True, pool=64, ns=4),
              # per-token write slots (docs/spec.md 2.5a): 4 draft tokens, 160 slots
              case(jnp.bfloat16, False, "vk", T=4, pool=160, tok=True)]
    return cases


def _chunked_cases():
    """(label, fn, args) for the chunked kernels: forward and backward at the prefill shape
    B=1, T=2048, Hk=16, Hv=32, K=V=128, bf16 inputs, float32 gates, l2norm, initial state;
    GDA and KDA (per-key gates), GDA with packed sequences, and GDA at K=V=64."""
    import jax
    import jax.numpy as jnp

    from gdn_jax.kernels import chunked

    S = jax.ShapeDtypeStruct
    f32, bf16 = jnp.float32, jnp.bfloat16
    B, T, Hk, Hv, K, V = 1, 2048, 16, 32, 128, 128
    args = [S((B, T, Hk, K), bf16), S((B, T, Hk, K), bf16), S((B, T, Hv, V), bf16),
            S((B, T, Hv), f32), S((B, T, Hv), f32), S((B, Hv, K, V), f32)]

    def fwd(*a):
        return chunked.chunked_forward(*a, scale=K ** -0.5, use_qk_l2norm=True)

    def bwd(*a):
        return chunked.chunked_backward(*a, scale=K ** -0.5, use_qk_l2norm=True)

    label = f"chunked {{}} bfloat16 B={B} T={T} Hk={Hk} Hv={Hv} K={K} V={V}"
    # packed sequences: N = 8 sequences in the same T tokens, cu_seqlens traced
    N = 8
    vargs = [S((N + 1,), jnp.int32), *args[:5], S((N, Hv, K, V), f32)]

    def vfwd(cu, *a):
        return chunked.chunked_forward(*a, scale=K ** -0.5, use_qk_l2norm=True, cu_seqlens=cu)

    def vbwd(cu, *a):
        return chunked.chunked_backward(*a, scale=K ** -0.5, use_qk_l2norm=True, cu_seqlens=cu)

    # KDA: per-key gates g [B, T, Hv, K] float32, otherwise the same call
    kargs = args[:3] + [S((B, T, Hv, K), f32)] + args[4:]
    # GDA at K = V = 64 (a smaller head: other tiles, every kernel spill-free)
    K6 = 64
    args64 = [S((B, T, Hk, K6), bf16), S((B, T, Hk, K6), bf16), S((B, T, Hv, K6), bf16),
              S((B, T, Hv), f32), S((B, T, Hv), f32), S((B, Hv, K6, K6), f32)]

    def fwd64(*a):
        return chunked.chunked_forward(*a, scale=K6 ** -0.5, use_qk_l2norm=True)

    def bwd64(*a):
        return chunked.chunked_backward(*a, scale=K6 ** -0.5, use_qk_l2norm=True)

    label64 = f"chunked {{}} bfloat16 B={B} T={T} Hk={Hk} Hv={Hv} K={K6} V={K6}"
    return [(label64.format("k64-fwd"), fwd64, args64),
            (label64.format("k64-bwd"), bwd64,
             args64 + [S((B, T, Hv, K6), bf16), S((B, Hv, K6, K6), f32)]),
            (label.format("kda-fwd"), fwd, kargs),
            (label.format("kda-bwd"), bwd, kargs + [S((B, T, Hv, V), bf16), S((B, Hv, K, V), f32)]),
            (label.format("fwd"), fwd, args),
            (label.format("bwd"), bwd, args + [S((B, T, Hv, V), bf16), S((B, Hv, K, V), f32)]),
            (label.format("varlen-fwd") + f" N={N}", vfwd, vargs),
            (label.format("varlen-bwd") + f" N={N}", vbwd,
             vargs + [S((B, T, Hv, V), bf16), S((N, Hv, K, V), f32)])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="compile the kernel sets for a compile-only H100")
    ap.add_argument("--set", dest="sets", action="append", choices=("recurrent", "chunked"),
                    help="a kernel set to compile (repeatable; default: both)")
    sets = ap.parse_args(argv).sets or ["recurrent", "chunked"]
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    reason = unavailable_reason()
    if reason:
        print(json.dumps({"unavailable": reason}))
        return 0
    results = []
    for label, fn, args in _recurrent_cases() if "recurrent" in sets else ():
        try:
            # donated state or pool: in-place update
            donate = (5,) if (" h0" in label or " pool=" in label) else ()
            ks, hlo = compile_h100(fn, *args, donate_argnums=donate)
            aliased = bool(re.search(r"input_output_alias=\{[^\n]*\(5,", hlo))
            results.append({"case": label, "kernels": [k for k in ks if k["pallas"]],
                            "all_kernels": [k["name"] for k in ks], "state_aliased": aliased,
                            "copies": len(re.findall(r"= \S+ copy\(", hlo))})
        except Exception as e:  # noqa: BLE001 - reported to the test
            results.append({"case": label, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
    for label, fn, args in _chunked_cases() if "chunked" in sets else ():
        try:
            ks, _ = compile_h100(fn, *args)
            results.append({"case": label, "kernels": [k for k in ks if k["pallas"]],
                            "all_kernels": [k["name"] for k in ks]})
        except Exception as e:  # noqa: BLE001 - reported to the test
            results.append({"case": label, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
    print("GPU_COMPILE_JSON " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
