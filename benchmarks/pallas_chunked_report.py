"""Regenerates docs/pallas_chunked_report.md: the compile-only H100 report of every chunked Pallas
kernel (registers, spills, shared memory, blocks per SM, ptxas time) and the cost-model table.

    python benchmarks/pallas_chunked_report.py            # every case (CPU heavy: ~20 compiles)
    python benchmarks/pallas_chunked_report.py --cases gda-bf16-128 kda-bf16-128
    python benchmarks/pallas_chunked_report.py --cost-only   # the cost-model tables only

Needs jax-cuda12-plugin, jax-cuda12-pjrt and ptxas (see tests/gpu_compile.py); no GPU. Compiles
run one case at a time in this process (sm_90a, jaxlib's XLA + Triton, then `ptxas -v`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import gpu_compile  # noqa: E402  (sets JAX_PLATFORMS before jax is imported)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from gdn_jax.kernels import chunk_cost, chunked  # noqa: E402

OUT = os.path.join(ROOT, "docs", "pallas_chunked_report.md")
# hand-written notes on the compile rows (how they were compiled, what changed), shown after the table
NOTES = os.path.join(ROOT, "docs", "pallas_chunked_report_notes.md")
S = jax.ShapeDtypeStruct
# (name, kda, dtype, K = V, packed sequences N or 0); B=1, T=2048, Hk=16, Hv=32
CASES = [
    ("gda-bf16-128", False, "bfloat16", 128, 0), ("kda-bf16-128", True, "bfloat16", 128, 0),
    ("gda-f16-128", False, "float16", 128, 0), ("kda-f16-128", True, "float16", 128, 0),
    ("gda-bf16-64", False, "bfloat16", 64, 0), ("kda-bf16-64", True, "bfloat16", 64, 0),
    ("gda-bf16-128-packed8", False, "bfloat16", 128, 8),
    ("kda-bf16-128-packed8", True, "bfloat16", 128, 8),
    ("gda-bf16-256", False, "bfloat16", 256, 0),
    ("gda-f32-128", False, "float32", 128, 0), ("kda-f32-128", True, "float32", 128, 0),
]
# (label, B, T, Hk, Hv, K, V, kda) for the cost-model tables
COST_SHAPES = [
    ("backward target: B=1 T=8192 Hk=16 Hv=32 K=V=128 bf16", (1, 8192, 16, 32, 128, 128), False),
    ("forward target: B=1 T=8192 Hk=16 Hv=64 K=V=128 bf16", (1, 8192, 16, 64, 128, 128), False),
    ("prefill: B=1 T=2048 Hk=16 Hv=32 K=V=128 bf16", (1, 2048, 16, 32, 128, 128), False),
    ("KDA: B=1 T=8192 Hk=16 Hv=32 K=V=128 bf16", (1, 8192, 16, 32, 128, 128), True),
]
PEERS = ("Published peers (measured by their authors, not here): FlashQLA 0.79 ms backward on an "
         "H200; flash-linear-attention 1.44 ms, the same shape (T=8192, Hv=32, K=V=128, bf16).")


def programs(kda, dtype, K, N, T=2048, Hk=16, Hv=32):
    """(forward fn, args), (backward fn, args) for one case."""
    dt, f32 = jnp.dtype(dtype), jnp.float32
    g = S((1, T, Hv, K) if kda else (1, T, Hv), f32)
    base = [S((1, T, Hk, K), dt), S((1, T, Hk, K), dt), S((1, T, Hv, K), dt), g,
            S((1, T, Hv), f32), S((N or 1, Hv, K, K), f32)]
    cu = [S((N + 1,), jnp.int32)] if N else []

    def split(a):
        return (a[0], list(a[1:])) if N else (None, list(a))

    def fwd(*a):
        c, a = split(a)
        return chunked.chunked_forward(*a, scale=K ** -0.5, use_qk_l2norm=True, cu_seqlens=c)

    def bwd(*a):
        c, a = split(a)
        return chunked.chunked_backward(*a, scale=K ** -0.5, use_qk_l2norm=True, cu_seqlens=c)

    bargs = base + [S((1, T, Hv, K), dt), S((N or 1, Hv, K, K), f32)]
    return (fwd, cu + base), (bwd, cu + bargs)


def timed_ptxas():
    """Wraps gpu_compile.ptxas_info to record its wall time per kernel (one PTX module each)."""
    times = {}
    orig = gpu_compile.ptxas_info

    def wrapped(ptx, ptxas):
        t = time.perf_counter()
        arch, info = orig(ptx, ptxas)
        for name in info:
            times[name] = time.perf_counter() - t
        return arch, info
    gpu_compile.ptxas_info = wrapped
    return times


def compile_rows(names, save=None, which_programs=("fwd", "bwd")):
    """Compiles the named cases (all when empty), the programs named in which_programs; with
    save, the rows so far are written to that JSON file after every program (a long run can
    be stopped and still be reported)."""
    times = timed_ptxas()
    rows = []
    for name, kda, dtype, K, N in CASES:
        if names and name not in names:
            continue
        for which, (fn, args) in zip(("fwd", "bwd"), programs(kda, dtype, K, N)):
            if which not in which_programs:
                continue
            t = time.perf_counter()
            try:
                ks, _ = gpu_compile.compile_h100(fn, *args)
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append((name, which, f"error: {type(e).__name__}: {str(e)[:200]}", None))
                continue
            print(f"{name} {which}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            for k in ks:
                if k["pallas"]:
                    rows.append((name, which, k, times.get(k["name"])))
            if save:
                with open(save, "w") as fh:
                    json.dump(rows, fh)
    return rows


def compile_table(rows):
    out = ["| case | program | kernel | grid | warps | registers | spill bytes (st + ld) | "
           "smem (B) | blocks/SM | ptxas s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, which, k, pt in rows:
        if isinstance(k, str):
            out.append(f"| {name} | {which} | {k} | | | | | | | |")
            continue
        spill = k.get("spill_stores", 0) + k.get("spill_loads", 0)
        out.append(f"| {name} | {which} | `{k['name']}` | {'x'.join(map(str, k['grid']))} | "
                   f"{k['num_warps']} | {k.get('registers')} | "
                   f"{'**' + str(spill) + '**' if spill else 0} ({k.get('spill_stores', 0)} + "
                   f"{k.get('spill_loads', 0)}) | {k['smem']} | {k.get('blocks_per_sm')} | "
                   f"{'' if pt is None else f'{pt:.1f}'} |")
    return out


def cost_tables():
    out = []
    for label, shape, kda in COST_SHAPES:
        rows = chunk_cost.cost_model(*shape, kda=kda)
        times = dict(chunk_cost.predicted_times(rows))
        out += ["", f"**{label}**", "",
                "| kernel | grid | TC GFLOP | f32 GFLOP | MB | predicted us |",
                "|---|---|---|---|---|---|"]
        tot = {"fwd": [0, 0, 0, 0], "bwd": [0, 0, 0, 0]}
        for name, grid, f16, f32, b in rows:
            t = times[name]
            g = "x".join(map(str, grid)) if grid else "XLA"
            out.append(f"| {name} | {g} | {f16 / 1e9:.1f} | {f32 / 1e9:.2f} | {b / 1e6:.0f} | "
                       f"{t * 1e6:.0f} |")
            key = "bwd" if name.startswith("bwd") else "fwd"
            for i, x in enumerate((f16, f32, b, t)):
                tot[key][i] += x
        for key, (f16, f32, b, t) in tot.items():
            out.append(f"| **{key} total** | | {f16 / 1e9:.1f} | {f32 / 1e9:.2f} | {b / 1e6:.0f} | "
                       f"**{t * 1e6:.0f}** |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=None)
    ap.add_argument("--programs", nargs="*", default=["fwd", "bwd"], choices=["fwd", "bwd"],
                    help="compile only these programs of each case")
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--save-json", help="also save the compile rows here")
    ap.add_argument("--from-json", nargs="*", help="rows saved by --save-json (no compiles)")
    a = ap.parse_args()
    lines = ["# Pallas chunked kernels: compile report and cost model", "",
             "Generated by `python benchmarks/pallas_chunked_report.py`; nothing here was run on a "
             "GPU. The compile report is a compile-only H100 build (sm_90a, jaxlib "
             f"{jax.__version__}'s XLA + Triton, `ptxas -v`) of the forward and the backward "
             "program at B=1, T=2048, Hk=16, Hv=32 with l2norm and an initial state (packed: N=8 "
             "sequences, cu_seqlens traced). The cost model is a prediction (kernels/chunk_cost.py "
             "states its assumptions).", ""]
    if not a.cost_only:
        reason = gpu_compile.unavailable_reason()
        lines += ["## Compile report", ""]
        if a.from_json:
            rows = [tuple(r) for f in a.from_json for r in json.load(open(f))
                    if (not a.cases or r[0] in a.cases) and r[1] in a.programs]
            # the table in CASES order, forward before backward, whichever file a row came from
            order = {c[0]: i for i, c in enumerate(CASES)}
            rows.sort(key=lambda r: (order.get(r[0], len(order)), r[1] != "fwd"))
        elif reason:
            rows = None
        else:
            rows = compile_rows(a.cases, a.save_json, a.programs)
        lines += [f"Unavailable: {reason}"] if rows is None else compile_table(rows)
        lines.append("")
        if os.path.exists(NOTES):
            lines += [open(NOTES).read().rstrip(), ""]
    lines += ["## Cost model (predictions, H100 SXM roofline)", "",
              chunk_cost.ASSUMPTIONS, "", PEERS]
    lines += cost_tables()
    text = "\n".join(lines) + "\n"
    if a.out == "-":
        print(text)
    else:
        with open(a.out, "w") as fh:
            fh.write(text)
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
