"""`python -m gdn_jax.device_check --out DIR`: the one prepared check for a lent CUDA GPU.

In one process (about 8 minutes on an H100; `--budget-s` caps the optional parts):

1. correctness: every case of `gdn_jax._device_check_cases.CORRECTNESS` through the public op
   on the Pallas Triton kernels, forward and the gradients of all six inputs, against the XLA
   path on the same device and against the float32 `lax.scan` reference, at the tolerances of
   docs/spec.md 4.2; float32 cases also against a bound TF32 would break; the backward run twice
   (dq and dk are float32 atomic sums: how far two runs differ); each program asserted to hold
   the expected kernels (no silent fallback to XLA);
2. timing: each kernel of the chunked forward and backward timed on its own (its pallas_call
   bound alone, on the inputs the program gives it) and the whole programs, and the decode step
   into a pool, next to `gdn_jax.kernels.chunk_cost`'s prediction and the card's peaks;
3. peers: the same inputs through flash-linear-attention (`chunk_gated_delta_rule`,
   `chunk_kda`, `fused_recurrent_gated_delta_rule`) in the same process, timed and compared;
   "skipped: <reason>" where torch or fla is missing;
4. writes DIR/device_check.json (every row) and DIR/device_check.md (tables), prints a summary.
   Each case runs on its own: a failing case is a failure row and the rest go on. The exit code
   is 1 when a correctness row failed or raised, else 0 (2: no GPU and no --dry-run).

`--dry-run`: the same case lists shrunk (`shrunk()`), on the CPU, the kernels in Pallas
interpret mode and compared with the reference (the XLA path is left out: `case_paths`), every
timing case run once to exercise its code (no timing table), the peers skipped: what CI runs so
the script cannot rot. `--predict`: the timing tables with the cost model's figures alone. How
to run it on a lent machine, and what the dry run leaves to the GPU run: docs/gpu.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal, jaxprs_in_params

from . import _device_check_cases as cases_mod
from ._device_check_cases import DTYPES, CorrectnessCase, TimingCase
from .api import RECURRENT_BWD_MAX_T, gated_delta_net
from .benchmarking import block
from .kernels import chunked as pallas_chunked
from .kernels.chunk_cost import cost_model, predicted_times

GRAD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dh0")
# docs/spec.md 4.2: (output, gradient) relative tolerances; float32 by path, 16-bit for all paths
SPEC_TOL = {"reference": (1e-5, 1e-5), "recurrent": (1e-5, 1e-5), "chunked": (1e-4, 1e-4),
            "bf16": (1e-2, 2e-2), "f16": (5e-3, 1e-2)}
# docs/spec.md 2.7: a state stored in 16 bits is rounded once (relative)
STATE_ROUNDING = {"f32": 0.0, "bf16": 2.0 ** -8, "f16": 2.0 ** -11}
# float32 inputs: TF32 dots (10-bit mantissa) give errors of about 1e-3, IEEE float32 ones
# 3e-7 to 7e-7 here (the no_tf32 cases' outputs and gradients, interpret mode on the CPU)
NO_TF32_BOUND = 1e-5
# (device kind substring, card, HBM bytes/s, dense 16-bit tensor-core FLOP/s, float32 CUDA-core
# FLOP/s), first match wins; the vendors' datasheet peaks (dense, no sparsity)
PEAKS = (
    ("H200", "H200 SXM", 4.8e12, 989e12, 67e12),
    ("H100 PCIe", "H100 PCIe", 2.0e12, 756e12, 51e12),
    ("H100 NVL", "H100 NVL", 3.9e12, 835e12, 60e12),
    ("H100", "H100 SXM", 3.35e12, 989e12, 67e12),
    ("A100", "A100 SXM", 2.039e12, 312e12, 19.5e12),
)
CHUNK_STAGES = ("prep", "fwd", "states", "bwd_state", "bwd_dqv", "bwd_dk", "bwd_da")
CHUNK_BWD_STAGES = {"prep", "states", "bwd_state", "bwd_dqv", "bwd_dk", "bwd_da"}


@dataclasses.dataclass
class Row:
    """One line of the report. status: "pass" / "fail" / "error" (correctness), "ok" / "error"
    / "skipped" (timing); `peer` holds flash-linear-attention's figures or "skipped: why"."""

    section: str
    case: str
    status: str
    measured: dict | None = None
    predicted: dict | None = None
    peer: dict | str | None = None
    error: str | None = None
    spec: dict | None = None


@dataclasses.dataclass
class Context:
    """What every section reads and writes: the mode, the card's peaks, the time budget of the
    optional sections, timing repetitions, the programs the peers compare against, the rows."""

    dry: bool
    device: str
    peaks: dict | None
    deadline: float
    calls: int
    rounds: int
    out: Path | None = None
    start: float = dataclasses.field(default_factory=time.perf_counter)
    ours: dict = dataclasses.field(default_factory=dict)   # timing case name -> its programs
    programs: dict = dataclasses.field(default_factory=dict)   # signature -> programs
    rows: list[Row] = dataclasses.field(default_factory=list)
    done: bool = False

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.save()

    def save(self) -> None:
        """Writes the reports as they stand (after every row: a run cut off by the machine's
        time limit still leaves what it did)."""
        if self.out is not None:
            write_reports(self, self.out)

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {msg}", flush=True)

    def over_budget(self) -> str | None:
        used = time.perf_counter() - self.start
        return f"time budget ({used:.0f} s used)" if time.perf_counter() > self.deadline else None


# ------------------------------------------------------------------------ spec tolerances


def spec_tolerance(impl: str, dtype: str) -> tuple[float, float]:
    """(output, gradient) tolerance of docs/spec.md 4.2 for a path and an input dtype."""
    return SPEC_TOL[impl] if dtype == "f32" else SPEC_TOL[dtype]


def backward_impl(case: CorrectnessCase, path: str) -> str:
    """The path whose backward serves the call (docs/spec.md 3): with snapshots the XLA
    recurrent autodiff; a Pallas forward the Pallas chunked backward; the XLA recurrent path its
    own autodiff up to RECURRENT_BWD_MAX_T tokens, the chunked one above."""
    if path == "reference":
        return "reference"
    if case.num_snapshots:
        return "recurrent"
    if path == "pallas" or case.impl == "chunked" or case.tokens > RECURRENT_BWD_MAX_T:
        return "chunked"
    return "recurrent"


def tolerances(case: CorrectnessCase, path: str, names) -> dict[str, float]:
    """Each output's and gradient's tolerance for `path`; what is stored in the state dtype
    (the state or pool, snapshots, checkpoints, dh0) gets that dtype's rounding on top."""
    fwd = "reference" if path == "reference" else case.impl
    out = spec_tolerance(fwd, case.dtype)[0]
    grad = spec_tolerance(backward_impl(case, path), case.dtype)[1]
    rnd = STATE_ROUNDING[case.state_dtype]
    tol = {"o": out, "state": out + rnd, "snapshots": out + rnd, "checkpoints": out + rnd,
           **{n: grad for n in GRAD_NAMES}, "dh0": grad + rnd}
    return {n: tol[n] for n in names}


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    """`||x - ref|| / ||ref||` in float64 (absolute below a reference norm of 1e-30); NaN when
    either holds a NaN, which fails every comparison."""
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def host(x) -> np.ndarray:
    """A device array as float64 numpy (converted on the host: no device program per dtype)."""
    return np.asarray(x).astype(np.float64)


# ------------------------------------------------------------------------ kernels in programs


def kernel_names(jaxpr) -> list[str]:
    """The names of every pallas_call in a (closed) jaxpr, at any depth (the guard against a
    silent fallback to XLA, like tests/helpers.py's `pallas_in_jaxpr`)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    names = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            names.append(str(eqn.params["name"]))
            continue
        for sub in jaxprs_in_params(eqn.params):
            names += kernel_names(sub)
    return names


def kernel_stage(name: str) -> str:
    """"recurrent" for the recurrent kernel, the chunked stage ("prep", "bwd_dk", ...) for a
    chunked kernel (the names `kernels/chunk_*.py` give their pallas_calls)."""
    if name.startswith("gdn_recurrent_"):
        return "recurrent"
    m = re.match(rf"gdn_chunk_(?:kda_)?({'|'.join(sorted(CHUNK_STAGES, key=len)[::-1])})_k", name)
    return m.group(1) if m else name


def expected_stages(case: CorrectnessCase) -> set[str]:
    """The kernel stages a case's forward-and-backward program must hold."""
    fwd = {"recurrent"} if case.impl == "recurrent" else {"prep", "fwd"}
    pallas_bwd = case.grads and not case.num_snapshots
    return fwd | (CHUNK_BWD_STAGES if pallas_bwd else set())


# ------------------------------------------------------------------------ correctness


def case_paths(case: CorrectnessCase, dry: bool) -> tuple[str, ...]:
    """The paths a case runs: the reference, the Pallas kernels and, on a GPU, the XLA path
    (and for float32 cases the TF32 control). A dry run leaves the XLA programs out: they
    compiled for as long as the interpret-mode kernels on the CPU, which says nothing of a
    GPU, and the test suite checks the XLA paths against the reference at length."""
    if dry:
        return ("reference", "pallas")
    return ("reference", "xla", "pallas") + (("tf32_control",) if case.no_tf32 else ())


def path_options(case: CorrectnessCase, path: str, dry: bool) -> dict:
    """The op's impl / backend keywords of a path ("tf32_control": the XLA path with dots at
    default precision, which a GPU may run as TF32)."""
    return {"reference": dict(impl="reference"),
            "xla": dict(impl=case.impl, backend="xla"),
            "tf32_control": dict(impl=case.impl, backend="xla", precision="default"),
            "pallas": dict(impl=case.impl, backend="pallas_triton", interpret=dry)}[path]


def output_names(case: CorrectnessCase) -> tuple[str, ...]:
    if case.num_snapshots:
        return ("o", "state", "snapshots")
    return ("o", "state", "checkpoints") if case.checkpoint_every else ("o", "state")


def case_op(case: CorrectnessCase, options: dict, op_kw: dict) -> Callable:
    """(q, k, v, g, beta, state) -> (differentiable outputs: o, the state, snapshots; the rest:
    checkpoints, returned but not differentiated) of the op for a case and a path."""
    n_diff = 2 + bool(case.num_snapshots)

    def op(q, k, v, g, beta, state):
        out = gated_delta_net(q, k, v, g, beta, initial_state=state, output_final_state=True,
                              use_qk_l2norm_in_kernel=True, **op_kw, **options)
        return tuple(out[:n_diff]), tuple(out[n_diff:])

    return op


def case_program(op: Callable, grads: bool) -> Callable:
    """(args, state, cotangents) -> (outputs, gradients of the six inputs through `jax.vjp`;
    none without `grads`)."""
    def run(args, state, cots):
        if not grads:
            diff, aux = op(*args, state)
            return diff + aux, ()
        diff, vjp, aux = jax.vjp(op, *args, state, has_aux=True)
        return diff + aux, vjp(cots)

    return run


@dataclasses.dataclass
class Prepared:
    """A correctness case, its input state (pool cases compare the slots left alone), each
    path's compiled program bound to its inputs (`compiled[path]()` runs it) and the kernels
    in the Pallas program."""

    case: CorrectnessCase
    state: jax.Array
    compiled: dict[str, Callable[[], tuple]]
    kernels: list[str]


def prepare_case(case: CorrectnessCase, dry: bool) -> Prepared:
    """Builds a case's inputs and compiles its programs (the slow part; runs in threads)."""
    args, state, op_kw = cases_mod.correctness_inputs(case)
    ops = {path: case_op(case, path_options(case, path, dry), op_kw)
           for path in case_paths(case, dry)}
    shapes = jax.eval_shape(ops["reference"], *args, state)[0]
    cots = cases_mod.cotangents(shapes) if case.grads else ()
    compiled, kernels = {}, []
    for path, op in ops.items():
        grads = case.grads and path != "tf32_control"   # the TF32 control is a forward
        inputs = (args, state, cots if grads else ())
        traced = jax.jit(case_program(op, grads)).trace(*inputs)
        if path == "pallas":
            kernels = kernel_names(traced.jaxpr)
        compiled[path] = functools.partial(traced.lower().compile(), *inputs)
    return Prepared(case, state, compiled, kernels)


def _results(prep: Prepared, path: str) -> dict[str, Any]:
    outs, grads = prep.compiled[path]()
    return dict(zip(output_names(prep.case) + GRAD_NAMES, tuple(outs) + tuple(grads)))


def _untouched_identical(case: CorrectnessCase, state_in, state_out) -> bool:
    """Every pool slot the call does not write is bit-for-bit its input (docs/spec.md 2.4)."""
    keep = [s for s in range(case.pool.slots) if s not in case.pool.written_slots()]
    a, b = np.asarray(state_in)[keep], np.asarray(state_out)[keep]
    return a.tobytes() == b.tobytes()


def check_case(prep: Prepared) -> Row:
    """Runs a prepared case on each of its paths and compares (docs/spec.md 4.2)."""
    case = prep.case
    raw = {path: _results(prep, path) for path in prep.compiled}
    res = {path: {n: host(x) for n, x in r.items()} for path, r in raw.items()}
    pal, ref = res["pallas"], res["reference"]
    names = list(pal)
    tol_p = tolerances(case, "pallas", names)
    vs_ref = {n: rel_err(pal[n], ref[n]) for n in names}
    stages, want = {kernel_stage(n) for n in prep.kernels}, expected_stages(case)
    checks = {"kernels": stages == want,
              "pallas_vs_reference": all(vs_ref[n] <= tol_p[n] for n in names)}
    measured: dict[str, Any] = {"kernels": sorted(set(prep.kernels)), "stages": sorted(stages),
                                "expected_stages": sorted(want), "vs_reference": vs_ref,
                                "tolerance": tol_p}
    if "xla" in res:
        xla, tol_x = res["xla"], tolerances(case, "xla", names)
        # both paths are within their tolerance of the reference: their distance within the sum
        bound = {n: tol_p[n] + tol_x[n] for n in names}
        measured |= {"vs_xla": {n: rel_err(pal[n], xla[n]) for n in names},
                     "xla_vs_reference": {n: rel_err(xla[n], ref[n]) for n in names},
                     "bound_vs_xla": bound}
        checks["pallas_vs_xla"] = all(measured["vs_xla"][n] <= bound[n] for n in names)
        checks["xla_vs_reference"] = all(measured["xla_vs_reference"][n] <= tol_x[n] for n in names)
    if case.no_tf32:
        checks["no_tf32"] = all(vs_ref[n] <= NO_TF32_BOUND for n in names)
        if "tf32_control" in res:
            ctl = res["tf32_control"]
            measured["tf32_control"] = {n: rel_err(ctl[n], ref[n]) for n in ("o", "state")}
    if case.grads and not case.num_snapshots:   # the Pallas backward, run a second time
        again = _results(prep, "pallas")
        measured["atomics"] = {f"{n}_max_abs_diff": float(np.max(np.abs(host(again[n]) - pal[n])))
                               for n in ("dq", "dk")}
        # dq, dk are float32 atomic sums (docs/spec.md 4.1); every other output is reproducible
        checks["reproducible"] = all(np.asarray(raw["pallas"][n]).tobytes()
                                     == np.asarray(again[n]).tobytes()
                                     for n in names if n not in ("dq", "dk"))
    if case.pool is not None:
        checks["untouched_slots"] = _untouched_identical(case, prep.state, raw["pallas"]["state"])
    measured["checks"] = checks
    return Row("correctness", case.name, "pass" if all(checks.values()) else "fail",
               measured=measured, spec=_spec(case))


def _spec(case) -> dict:
    return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
            for k, v in dataclasses.asdict(case).items()}


def _error_row(section: str, case, exc: BaseException) -> Row:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Row(section, case.name, "error", error=f"{type(exc).__name__}: {exc}\n{tb[-3000:]}",
               spec=_spec(case))


def run_correctness(ctx: Context, cases: list[CorrectnessCase], jobs: int) -> None:
    """Compiles the cases in `jobs` threads (XLA compiles outside the GIL) and checks each as
    its programs are ready, in the list's order."""
    def prepare(case):
        try:
            return prepare_case(case, ctx.dry)
        except Exception as exc:  # noqa: BLE001 - recorded as the case's error row
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for case, prep in zip(cases, pool.map(prepare, cases)):
            try:
                row = _error_row("correctness", case, prep) if isinstance(prep, Exception) \
                    else check_case(prep)
            except Exception as exc:  # noqa: BLE001
                row = _error_row("correctness", case, exc)
            ctx.log(f"correctness {case.name}: {row.status}")
            ctx.add(row)


# ------------------------------------------------------------------------ timing


def time_calls(call: Callable[[], Any], *, calls: int, rounds: int,
               sync: Callable[[Any], Any] = block) -> dict[str, float]:
    """Microseconds per call: one untimed call (warm-up), then `rounds` rounds of `calls`
    back-to-back calls, each round ended by waiting for its last result (dispatch overlaps the
    device's work, as in a model's step); median and best round."""
    sync(call())
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = call()
        sync(out)
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return {"us": statistics.median(per), "best_us": min(per)}


@dataclasses.dataclass
class Launch:
    """One pallas_call of a program, bound alone: `fn(*inputs)` (jitted, the aliased inputs
    donated) on the inputs the program gives it."""

    name: str
    fn: Callable
    inputs: list
    aliases: dict[int, int]

    def call(self):
        """One launch; an aliased output becomes the next launch's input (donated in place)."""
        outs = self.fn(*self.inputs)
        for i, o in self.aliases.items():
            self.inputs[i] = outs[o]
        return outs


def _bind(eqn, *xs):
    with eqn.ctx.manager:
        return eqn.primitive.bind(*xs, **eqn.primitive.get_bind_params(eqn.params))


def kernel_launches(fn: Callable, *args) -> list[Launch]:
    """Every pallas_call of fn's program with its concrete inputs: the program's top-level
    equations evaluated one at a time (`jax.core.eval_jaxpr`'s loop), each pallas_call by its own
    jitted launch. Raises if a pallas_call sits below the top level (it would be missed)."""
    closed = jax.make_jaxpr(fn)(*args)
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts)) | dict(zip(jaxpr.invars, jax.tree.leaves(args)))
    launches = []
    for eqn in jaxpr.eqns:
        invals = [v.val if isinstance(v, Literal) else env[v] for v in eqn.invars]
        if eqn.primitive.name == "pallas_call":
            aliases = dict(eqn.params["input_output_aliases"])
            launch = Launch(str(eqn.params["name"]),
                            jax.jit(functools.partial(_bind, eqn), donate_argnums=tuple(aliases)),
                            [x + 0 if i in aliases else x for i, x in enumerate(invals)], aliases)
            outs = launch.fn(*[x + 0 if i in aliases else x for i, x in enumerate(invals)])
            launches.append(launch)
        else:
            outs = _bind(eqn, *invals)
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    if len(launches) != len(kernel_names(closed)):
        raise RuntimeError(f"{fn}: a pallas_call below the program's top level is not timed")
    return launches


def _achieved(us: float, nbytes: float, flops16: float, flops32: float, peaks) -> dict:
    """GB/s and TFLOP/s a time gives for the cost model's bytes and FLOPs, and their share of
    the card's peaks."""
    s = us * 1e-6
    out = {"GB/s": nbytes / s / 1e9, "TFLOP/s": (flops16 + flops32) / s / 1e12}
    if peaks:
        out["pct_hbm"] = 100 * nbytes / s / peaks["hbm"]
        out["pct_tc"] = 100 * flops16 / s / peaks["tc"]
    return out


def _prefill_op(q, k, v, g, beta, h0, *, interpret):
    return gated_delta_net(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                           use_qk_l2norm_in_kernel=True, impl="chunked",
                           backend="pallas_triton", interpret=interpret)


def _compiled(fn: Callable, *args, want: set[str], without: set[str] = frozenset(), **jit_kw):
    """`jax.jit(fn, **jit_kw)` compiled for args, after checking the kernel stages in its
    program: all of `want`, none of `without` (else an AssertionError: a silent fallback?)."""
    traced = jax.jit(fn, **jit_kw).trace(*args)
    got = {kernel_stage(n) for n in kernel_names(traced.jaxpr)}
    if not want <= got or got & without:
        raise AssertionError(f"{fn}: kernel stages {sorted(got)}, expected all of {sorted(want)} "
                             f"and none of {sorted(without)}")
    return traced.lower().compile()


@dataclasses.dataclass
class PrefillPrograms:
    """A prefill case's compiled programs: the public op's forward and backward-only
    (`bwd(vjp, cots)`, vjp holding the forward's residuals), and each kernel launch alone."""

    args: tuple
    cots: tuple
    fwd: Callable
    bwd: Callable
    vjp: Any
    launches: dict[str, list[Launch]]   # "" forward, "bwd: " backward


def _signature(case: TimingCase) -> TimingCase:
    """A timing case without its name: cases with one signature share their programs (only in
    a dry run do two cases shrink to one)."""
    return dataclasses.replace(case, name="")


def prefill_programs(ctx: Context, case: TimingCase) -> PrefillPrograms:
    """Builds (once per signature) the inputs and the compiled programs of a prefill case,
    each checked to hold its kernels."""
    key = _signature(case)
    if key in ctx.programs:
        return ctx.programs[key]
    args = cases_mod.model_inputs(case.shape, DTYPES[case.dtype])
    args = (*args[0], args[1])
    op = functools.partial(_prefill_op, interpret=ctx.dry)
    fwd = _compiled(op, *args, want={"prep", "fwd"})
    outs, vjp = jax.vjp(jax.jit(op), *args)
    cots = cases_mod.cotangents(outs)
    # the backward alone (vjp holds the forward's residuals): no forward state-pass kernel
    bwd = _compiled(lambda f, c: f(c), vjp, cots, want=CHUNK_BWD_STAGES, without={"fwd"})
    kw = dict(scale=case.K ** -0.5, use_qk_l2norm=True, interpret=ctx.dry)
    launches = {
        "": kernel_launches(functools.partial(pallas_chunked.chunked_forward, **kw), *args),
        "bwd: ": kernel_launches(functools.partial(pallas_chunked.chunked_backward, **kw),
                                 *args, *cots)}
    ctx.programs[key] = PrefillPrograms(args, cots, fwd, bwd, vjp, launches)
    return ctx.programs[key]


def time_prefill(ctx: Context, case: TimingCase) -> list[Row]:
    """The chunked kernels at a prefill shape: each kernel alone and the public op's whole
    forward and backward-only programs, next to the cost model."""
    prog = prefill_programs(ctx, case)
    args, cots, launches = prog.args, prog.cots, prog.launches
    ctx.ours[case.name] = prog
    programs = {"": time_calls(lambda: prog.fwd(*args), calls=ctx.calls, rounds=ctx.rounds),
                "bwd: ": time_calls(lambda: prog.bwd(prog.vjp, cots), calls=ctx.calls,
                                    rounds=ctx.rounds)}
    pred = prefill_predictions(case, ctx.peaks)
    rows = []
    for prefix, program_time in programs.items():
        kernel_us = 0.0
        for launch in launches[prefix]:
            name = prefix + kernel_stage(launch.name)
            t = time_calls(launch.call, calls=ctx.calls, rounds=ctx.rounds)
            kernel_us += t["us"]
            p = pred[name]
            rows.append(Row("timing", f"{case.name}/{name}", "ok",
                            measured={**t, "kernel": launch.name, **_achieved(
                                t["us"], p["bytes"], p["tc_flops"], p["f32_flops"], ctx.peaks)},
                            predicted=p, spec=_spec(case)))
        rows.append(Row("timing", f"{case.name}/{prefix or 'fwd: '}program", "ok",
                        measured={**program_time, "kernels_us": kernel_us,
                                  "rest_us": program_time["us"] - kernel_us},
                        predicted=program_prediction(pred, bool(prefix)), spec=_spec(case)))
    return rows


def prefill_predictions(case: TimingCase, peaks: dict | None) -> dict[str, dict]:
    """kernels/chunk_cost.py's rows for a prefill case, by row name ("prep", "bwd: bwd_dk",
    "bwd: xla epilogue", ...): grid, bytes, FLOPs and the time at the card's peaks (the cost
    model's own H100 SXM figures when there is no card)."""
    rows = cost_model(case.B, case.T, case.Hk, case.Hv, case.K, case.V,
                      in_bytes=jnp.dtype(DTYPES[case.dtype]).itemsize, kda=case.kda)
    kw = {} if peaks is None else dict(tc_flops=peaks["tc"], f32_flops=peaks["f32"],
                                       bw=peaks["hbm"])
    times = dict(predicted_times(rows, **kw))
    return {name: {"us": times[name] * 1e6, "grid": grid, "bytes": nbytes, "tc_flops": f16,
                   "f32_flops": f32} for name, grid, f16, f32, nbytes in rows}


def program_prediction(pred: dict[str, dict], backward: bool) -> dict:
    """The forward's (or the backward's) predicted total, and how much of it is XLA ops."""
    side = [n for n in pred if n.startswith("bwd") == backward]
    return {"us": sum(pred[n]["us"] for n in side),
            "xla_us": sum(pred[n]["us"] for n in side if "xla" in n)}


def decode_bytes(case: TimingCase) -> int:
    """HBM bytes of one decode step (the recurrent kernel's roofline, docs/
    pallas_recurrent_report.md): the B states read and written in the pool's dtype, q, k, v, o
    once, g and beta, the slot indices."""
    B, Hk, Hv, K, V = case.B, case.Hk, case.Hv, case.K, case.V
    ib, sb = (jnp.dtype(DTYPES[d]).itemsize for d in (case.dtype, case.state_dtype))
    return (2 * B * Hv * K * V * sb + 2 * B * Hk * K * ib + 2 * B * Hv * V * ib
            + B * Hv * 4 * (K if case.kda else 1) + B * Hv * ib + 4 * B)


def _decode_op(q, k, v, g, beta, pool, *, idx, interpret):
    return gated_delta_net(q, k, v, g, beta, initial_state=pool, state_indices=idx,
                           output_final_state=True, use_qk_l2norm_in_kernel=True,
                           impl="recurrent", backend="pallas_triton", interpret=interpret)


def time_decode(ctx: Context, case: TimingCase) -> list[Row]:
    """One decode step into a pool (donated: updated in place), each call reading the pool the
    previous one returned, as a serving loop does; against the bytes roofline."""
    key = _signature(case)
    if key not in ctx.programs:
        args, pool, idx = cases_mod.decode_inputs(case)
        step = _compiled(functools.partial(_decode_op, idx=idx, interpret=ctx.dry), *args, pool,
                         want={"recurrent"}, donate_argnums=5)
        ctx.programs[key] = (step, args, pool, idx)
    step, args, pool, idx = ctx.ours[case.name] = ctx.programs[key]
    carry = [pool + jnp.zeros((), pool.dtype)]   # a private copy to donate

    def call():
        _, carry[0] = step(*args, carry[0])
        return carry[0]

    t = time_calls(call, calls=ctx.calls * 5, rounds=ctx.rounds)
    pred = decode_prediction(case, ctx.peaks)
    return [Row("timing", case.name, "ok", predicted=pred, spec=_spec(case),
                measured={**t, **_achieved(t["us"], pred["bytes"], 0, 0, ctx.peaks)})]


def decode_prediction(case: TimingCase, peaks: dict | None) -> dict:
    """The decode step's bytes and, on a card, their time at its HBM peak."""
    nbytes = decode_bytes(case)
    return {"bytes": nbytes, **({"us": nbytes / peaks["hbm"] * 1e6} if peaks else {})}


def run_timing(ctx: Context, cases: list[TimingCase]) -> None:
    for case in cases:
        why = ctx.over_budget()
        if why:
            ctx.add(Row("timing", case.name, "skipped", error=why, spec=_spec(case)))
            continue
        try:
            rows = (time_prefill if case.kind == "prefill" else time_decode)(ctx, case)
        except Exception as exc:  # noqa: BLE001 - recorded as the case's error row
            rows = [_error_row("timing", case, exc)]
        ctx.log(f"timing {case.name}: {rows[-1].status}")
        ctx.rows += rows
        ctx.save()


# ------------------------------------------------------------------------ peers (fla)


@dataclasses.dataclass
class Peer:
    """flash-linear-attention's ops through torch (`Peer.load`: fla on the GPU), or `reason`,
    why they cannot run."""

    reason: str | None
    torch: Any = None
    chunk: Callable | None = None        # chunk_gated_delta_rule
    kda: Callable | None = None          # chunk_kda
    recurrent: Callable | None = None    # fused_recurrent_gated_delta_rule
    device: str = "cuda"
    version: str = ""

    @classmethod
    def load(cls, dry: bool) -> Peer:
        if dry:
            return cls("dry run")
        try:
            import torch  # noqa: PLC0415
            import fla  # noqa: PLC0415
            from fla.ops.gated_delta_rule import (chunk_gated_delta_rule,  # noqa: PLC0415
                                                  fused_recurrent_gated_delta_rule)
            from fla.ops.kda import chunk_kda  # noqa: PLC0415
        except Exception as exc:  # noqa: BLE001 - any import failure is a skip reason
            return cls(f"import failed: {type(exc).__name__}: {exc}")
        if not torch.cuda.is_available():
            return cls("torch sees no CUDA device")
        return cls(None, torch, chunk_gated_delta_rule, chunk_kda, fused_recurrent_gated_delta_rule,
                   version=f"fla {getattr(fla, '__version__', '?')}, torch {torch.__version__}")

    def tensor(self, x, grad: bool = False):
        """A jax array as a torch tensor of its dtype on the peer's device (through float32
        numpy: exact for 16-bit values)."""
        t = self.torch.from_numpy(np.asarray(x).astype(np.float32))   # a writable copy
        return t.to(self.device, getattr(self.torch, jnp.dtype(x.dtype).name)).requires_grad_(grad)

    def numpy(self, t) -> np.ndarray:
        return t.detach().float().cpu().numpy().astype(np.float64)

    def sync(self, _=None) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def _agreement(ours: dict, theirs: dict, tol: dict) -> dict:
    """fla's distance from our result per name (`rel_err`, relative to ours) and whether each
    is within the sum of the two paths' tolerances (`ok`: both are within theirs of the exact
    result)."""
    errs = {n: rel_err(theirs[n], host(ours[n])) for n in theirs}
    return {"rel_err": errs, "ok": {n: errs[n] <= 2 * tol[n] for n in errs}}


def peer_prefill(ctx: Context, peer: Peer, case: TimingCase, row: Row, bwd_row: Row) -> None:
    """fla's chunk_gated_delta_rule / chunk_kda on a prefill case's inputs: forward and
    backward times next to our programs' rows, its outputs and six gradients against ours."""
    prog = ctx.ours[case.name]
    args, cots = prog.args, prog.cots
    ours = dict(zip(("o", "state") + GRAD_NAMES,
                    tuple(prog.fwd(*args)) + tuple(prog.bwd(prog.vjp, cots))))
    torch = peer.torch
    op, name = (peer.kda, "chunk_kda") if case.kda else (peer.chunk, "chunk_gated_delta_rule")
    kw = dict(scale=case.K ** -0.5, output_final_state=True, use_qk_l2norm_in_kernel=True)
    with torch.no_grad():
        plain = [peer.tensor(x) for x in args]
        t_fwd = time_calls(lambda: op(*plain[:5], initial_state=plain[5], **kw),
                           calls=ctx.calls, rounds=ctx.rounds, sync=peer.sync)
    leaves = [peer.tensor(x, grad=True) for x in args]
    outs = op(*leaves[:5], initial_state=leaves[5], **kw)
    tcots = [peer.tensor(c) for c in cots]

    def grads():
        return torch.autograd.grad(outs, leaves, tcots, retain_graph=True)

    theirs = dict(zip(("o", "state") + GRAD_NAMES, map(peer.numpy, tuple(outs) + grads())))
    t_bwd = time_calls(grads, calls=ctx.calls, rounds=ctx.rounds, sync=peer.sync)
    tol = {n: spec_tolerance("chunked", case.dtype)[n in GRAD_NAMES] for n in theirs}
    agree = _agreement(ours, theirs, tol)
    for r, t, names, what in ((row, t_fwd, ("o", "state"), ""),
                              (bwd_row, t_bwd, GRAD_NAMES, " backward")):
        r.peer = {"op": f"fla {name}{what}", **t, "ours_over_peer": r.measured["us"] / t["us"],
                  "rel_err": {n: agree["rel_err"][n] for n in names},
                  "agree": all(agree["ok"][n] for n in names)}


def peer_decode(ctx: Context, peer: Peer, case: TimingCase, row: Row) -> None:
    """fla's fused_recurrent_gated_delta_rule on the states our decode step reads (fla has no
    pool: its initial_state is the B states, and it writes a new float32 final state)."""
    step, args, pool, idx = ctx.ours[case.name]
    o, new_pool = step(*args, pool + jnp.zeros((), pool.dtype))
    ours = {"o": o, "state": new_pool[idx]}
    q, k, v, g, beta = (peer.tensor(x) for x in args)
    kw = dict(beta=beta, scale=case.K ** -0.5, initial_state=peer.tensor(pool[idx]),
              output_final_state=True, use_qk_l2norm_in_kernel=True,
              **({"gk": g} if case.kda else {"g": g}))
    with peer.torch.no_grad():
        t = time_calls(lambda: peer.recurrent(q, k, v, **kw), calls=ctx.calls * 5,
                       rounds=ctx.rounds, sync=peer.sync)
        theirs = dict(zip(("o", "state"), map(peer.numpy, peer.recurrent(q, k, v, **kw))))
    out_tol = spec_tolerance("recurrent", case.dtype)[0]
    agree = _agreement(ours, theirs, {"o": out_tol,
                                      "state": out_tol + STATE_ROUNDING[case.state_dtype]})
    row.peer = {"op": "fla fused_recurrent_gated_delta_rule (no pool: the B states, float32 "
                      "final state)", **t, "ours_over_peer": row.measured["us"] / t["us"],
                "rel_err": agree["rel_err"], "agree": all(agree["ok"].values())}


def run_peers(ctx: Context, peer: Peer, timing: list[TimingCase]) -> None:
    """Fills the `peer` of the program and decode rows (or says why not)."""
    by_case = {r.case: r for r in ctx.rows}
    for case in timing:
        names = ([f"{case.name}/fwd: program", f"{case.name}/bwd: program"]
                 if case.kind == "prefill" else [case.name])
        targets = [by_case.get(n) for n in names]
        if any(r is None or r.status != "ok" for r in targets):
            continue
        why = peer.reason or ctx.over_budget()
        if why:
            for r in targets:
                r.peer = f"skipped: {why}"
            continue
        try:
            (peer_prefill if case.kind == "prefill" else peer_decode)(ctx, peer, case, *targets)
        except Exception as exc:  # noqa: BLE001 - the peer's failure never fails the check
            for r in targets:
                r.peer = f"skipped: failed: {type(exc).__name__}: {exc}"
        ctx.log(f"peer {case.name}: "
                f"{'done' if isinstance(targets[0].peer, dict) else targets[0].peer}")
        ctx.save()


# ------------------------------------------------------------------------ reports


def peaks_for(device_kind: str) -> dict:
    """The peaks of the first `PEAKS` entry the device kind contains; H100 SXM's for a kind not
    in the table (`matched` False, said in the report)."""
    for sub, card, hbm, tc, f32 in PEAKS:
        if sub in device_kind:
            return {"card": card, "hbm": hbm, "tc": tc, "f32": f32, "matched": True}
    _, card, hbm, tc, f32 = next(p for p in PEAKS if p[1] == "H100 SXM")
    return {"card": card, "hbm": hbm, "tc": tc, "f32": f32, "matched": False}


def card_peaks(device) -> dict | None:
    """The device's peaks; None off-GPU."""
    return peaks_for(device.device_kind) if device.platform == "gpu" else None


def _first_line(text: str | None, n: int = 200) -> str:
    return text.splitlines()[0][:n] if text else ""


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _worst(errs: dict, tol: dict) -> str:
    n = max(errs, key=lambda n: errs[n] / tol[n] if np.isfinite(errs[n]) else np.inf)
    return f"{n} {errs[n]:.2e} / {tol[n]:.0e}"


def _correctness_table(rows: list[Row]) -> list[str]:
    out = ["| case | what | kernel stages (of expected) | worst vs reference (err / tol) "
           "| worst vs XLA (err / bound) "
           "| dq, dk run to run (max abs) | checks | status |", "|" + "---|" * 8]
    for r in rows:
        if r.status == "error":
            out.append(f"| {r.case} | {r.spec['what']} | | | | | "
                       f"{_first_line(r.error, 160)} | **error** |")
            continue
        m = r.measured
        at = m.get("atomics")
        atom = f"{at['dq_max_abs_diff']:.1e}, {at['dk_max_abs_diff']:.1e}" if at else "-"
        failed = [c for c, ok in m["checks"].items() if not ok]
        extra = ""
        if "tf32_control" in m:
            extra = f" (XLA at default precision: o {m['tf32_control']['o']:.1e})"
        vs_xla = _worst(m["vs_xla"], m["bound_vs_xla"]) if "vs_xla" in m else "not in a dry run"
        checks = f"all {len(m['checks'])}" if not failed else "FAILED: " + ", ".join(failed)
        status = "pass" if r.status == "pass" else f"**{r.status}**"
        out.append(f"| {r.case} | {r.spec['what']} "
                   f"| {len(m['stages'])} of {len(m['expected_stages'])} "
                   f"| {_worst(m['vs_reference'], m['tolerance'])}{extra} | {vs_xla} | {atom} "
                   f"| {checks} | {status} |")
    return out


def _peer_cell(peer) -> str:
    if not isinstance(peer, dict):
        return peer or "-"
    agree = "agrees" if peer["agree"] else "DIFFERS"
    return f"{peer['us']:.1f} us (ours / fla {peer['ours_over_peer']:.2f}), {agree}"


def _prefill_tables(rows: list[Row]) -> list[str]:
    """Per prefill case: a line per kernel and per program, measured (empty in a predicted-only
    table) next to predicted."""
    out = []
    for name in dict.fromkeys(r.case.split("/")[0] for r in rows if r.spec["kind"] == "prefill"):
        mine = [r for r in rows if r.case.split("/")[0] == name]
        s = mine[0].spec
        out += [f"### {name}: {'KDA' if s['kda'] else 'GDA'} B={s['B']} T={s['T']} Hk={s['Hk']} "
                f"Hv={s['Hv']} K={s['K']} V={s['V']} {s['dtype']}", ""]
        if any(r.status not in ("ok", "predicted") for r in mine):
            out += [f"- {r.case}: {r.status} {_first_line(r.error)}" for r in mine] + [""]
            continue
        out += ["| kernel | grid | measured us | predicted us | measured / predicted | GB/s "
                "| % HBM peak | TFLOP/s | % tensor-core peak | flash-linear-attention |",
                "|" + "---|" * 10]
        for r in mine:
            m, p = r.measured or {}, r.predicted
            stage = r.case.split("/", 1)[1]
            ratio = _fmt(m["us"] / p["us"], ".2f") if m else "-"
            if stage.endswith("program"):
                parts = (f" (kernels {m['kernels_us']:.0f} us, rest {m['rest_us']:.0f} us)"
                         if m else "")
                out.append(f"| **{stage}**{parts} | | {_fmt(m.get('us'), '.0f')} "
                           f"| {p['us']:.0f} (XLA ops {p['xla_us']:.0f}) | {ratio} | | | | "
                           f"| {_peer_cell(r.peer)} |")
            else:
                kernel = f"`{m['kernel']}` ({stage})" if m else stage
                out.append(f"| {kernel} | {'x'.join(map(str, p['grid']))} "
                           f"| {_fmt(m.get('us'), '.0f')} "
                           f"| {p['us']:.0f} | {ratio} | {_fmt(m.get('GB/s'), '.0f')} "
                           f"| {_fmt(m.get('pct_hbm'), '.0f')} | {_fmt(m.get('TFLOP/s'), '.1f')} "
                           f"| {_fmt(m.get('pct_tc'), '.0f')} | |")
        out.append("")
    return out


def _decode_table(rows: list[Row]) -> list[str]:
    out = ["| case | measured us | predicted us (bytes / HBM peak) | MB moved | GB/s | % HBM peak "
           "| flash-linear-attention | fla vs ours (rel err) |", "|" + "---|" * 8]
    for r in rows:
        if r.spec["kind"] != "decode":
            continue
        m, p = r.measured or {}, r.predicted or {}
        if r.status not in ("ok", "predicted"):
            out.append(f"| {r.case} | {r.status}: {_first_line(r.error, 120)} "
                       "| | | | | | |")
            continue
        agree = "-"
        if isinstance(r.peer, dict):
            agree = ", ".join(f"{n} {e:.1e}" for n, e in r.peer["rel_err"].items())
        out.append(f"| {r.case} | {_fmt(m.get('us'), '.1f')} | {_fmt(p.get('us'), '.1f')} "
                   f"| {p['bytes'] / 1e6:.2f} | {_fmt(m.get('GB/s'), '.0f')} "
                   f"| {_fmt(m.get('pct_hbm'), '.0f')} | {_peer_cell(r.peer)} | {agree} |")
    return out


TIMING_NOTES = {
    "prefill": "Measured: median microseconds per call over rounds of back-to-back calls, each "
               "kernel's pallas_call bound alone on the inputs its program gives it; the program "
               "rows time the public op's whole forward (or backward-only) program, whose "
               "\"rest\" is its XLA ops and the gaps between kernels. Predicted: "
               "kernels/chunk_cost.py at the card's peaks. GB/s and TFLOP/s: the cost model's "
               "bytes and FLOPs over the measured time.",
    "decode": "B sequences, T=1, Hk=16, Hv=32, K=V=128, bf16 inputs, a pool of 2B slots in the "
              "state dtype, donated, each step reading the pool the last one wrote; predicted: "
              "the bytes of the B states read and written plus the token's inputs, over the HBM "
              "peak (B=1 is bound by launch latency, not bytes). flash-linear-attention has no "
              "pool: its call reads the B states and writes a new float32 final state.",
}


def timing_markdown(rows: list[Row]) -> list[str]:
    """The timing sections (hardware rows, or predicted-only rows)."""
    return ["## Timing: chunked kernels (prefill)", "", TIMING_NOTES["prefill"], "",
            *_prefill_tables(rows), "## Timing: decode step into a pool", "",
            TIMING_NOTES["decode"], "", *_decode_table(rows), ""]


def predicted_rows(peaks: dict) -> list[Row]:
    """Rows of the GPU-size timing cases with the predictions only (`--predict`): the tables of
    a hardware run with the measured columns empty."""
    rows = []
    for case in cases_mod.TIMING:
        if case.kind == "decode":
            rows.append(Row("timing", case.name, "predicted",
                            predicted=decode_prediction(case, peaks), spec=_spec(case)))
            continue
        pred = prefill_predictions(case, peaks)
        for backward in (False, True):
            prefix = "bwd: " if backward else ""
            rows += [Row("timing", f"{case.name}/{n}", "predicted", predicted=pred[n],
                         spec=_spec(case))
                     for n in pred if n.startswith("bwd") == backward and "xla" not in n]
            rows.append(Row("timing", f"{case.name}/{prefix or 'fwd: '}program", "predicted",
                            predicted=program_prediction(pred, backward), spec=_spec(case)))
    return rows


def predicted_markdown(peaks: dict) -> str:
    """`--predict`: the correctness cases and the timing tables with the predictions alone."""
    return "\n".join([
        "## Correctness cases", "",
        "| case | what | kernel stages its program must hold | result on a GPU |",
        "|---|---|---|---|",
        *(f"| {c.name} | {c.what} | {', '.join(sorted(expected_stages(c)))} | not run |"
          for c in cases_mod.CORRECTNESS), "",
        f"Predicted (kernels/chunk_cost.py; decode: bytes / HBM peak) at {peaks['card']} peaks: "
        f"{peaks['hbm'] / 1e12:.2f} TB/s HBM, {peaks['tc'] / 1e12:.0f} TFLOP/s dense 16-bit, "
        f"{peaks['f32'] / 1e12:.1f} TFLOP/s float32; nothing measured.", "",
        *timing_markdown(predicted_rows(peaks))]) + "\n"


def markdown(ctx: Context, rows: list[Row], wall_s: float) -> str:
    """The tables a person reads."""
    corr = [r for r in rows if r.section == "correctness"]
    timing = [r for r in rows if r.section == "timing"]
    failed = [r.case for r in corr if r.status != "pass"]
    pk = ctx.peaks
    mode = ("**Dry run** on the CPU (Pallas interpret mode, tiny shapes): no GPU figure here."
            if ctx.dry else "Hardware run.")
    now = datetime.datetime.now(datetime.timezone.utc)
    incomplete = " **Incomplete**: the run stopped (or is still running) after the rows below."
    peaks = "Peaks: none (not a GPU)."
    if pk:
        assumed = "" if pk["matched"] else " (device kind not in the table: H100 SXM peaks assumed)"
        peaks = (f"Peaks used: {pk['card']} {pk['hbm'] / 1e12:.2f} TB/s HBM, "
                 f"{pk['tc'] / 1e12:.0f} TFLOP/s dense 16-bit tensor core, {pk['f32'] / 1e12:.1f} "
                 f"TFLOP/s float32{assumed}; predictions are kernels/chunk_cost.py at these peaks.")
    lines = [
        "# gdn_jax device check", "",
        f"{mode} Device: {ctx.device}; jax {jax.__version__}; {now:%Y-%m-%d %H:%M} UTC; "
        f"{wall_s:.0f} s in all.{'' if ctx.done else incomplete}", "", peaks,
        "", f"Correctness: {len(corr) - len(failed)} of {len(corr)} cases pass"
            f"{': FAILED ' + ', '.join(failed) if failed else ''}.", "",
        "## Correctness: the Pallas Triton kernels through the public op", "",
        "Errors are `||x - ref|| / ||ref||` over the outputs and the six gradients; tolerances "
        "docs/spec.md 4.2 (16-bit states: plus one rounding); against XLA the bound is the sum of "
        f"both paths' tolerances; `no_tf32` cases: every output and gradient below "
        f"{NO_TF32_BOUND:g}. "
        "Every row of device_check.json has each output's error.", "",
        *_correctness_table(corr), ""]
    if ctx.dry:
        ok = sum(r.status == "ok" for r in timing)
        lines += ["## Timing", "", f"Omitted in a dry run (interpret mode times nothing of a GPU): "
                  f"the {len(timing)} timing rows ran once each to exercise the code, {ok} ok.", ""]
        return "\n".join(lines)
    lines += timing_markdown(timing)
    return "\n".join(lines)


def write_reports(ctx: Context, out: Path) -> None:
    """DIR/device_check.json and DIR/device_check.md, each replaced whole (written aside, then
    renamed), so a run killed while writing leaves the previous complete pair."""
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter() - ctx.start
    doc = {"device": ctx.device, "jax": jax.__version__, "dry_run": ctx.dry, "peaks": ctx.peaks,
           "complete": ctx.done, "wall_s": wall, "rows": [dataclasses.asdict(r) for r in ctx.rows]}
    for name, text in (("device_check.json", json.dumps(doc, indent=1, default=str)),
                       ("device_check.md", markdown(ctx, ctx.rows, wall))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)


def summary(rows: list[Row]) -> str:
    count = lambda sec, st: sum(r.section == sec and r.status == st for r in rows)  # noqa: E731
    lines = [f"correctness: {count('correctness', 'pass')} pass, "
             f"{count('correctness', 'fail')} fail, {count('correctness', 'error')} error; "
             f"timing: {count('timing', 'ok')} ok, {count('timing', 'error')} error, "
             f"{count('timing', 'skipped')} skipped"]
    lines += [f"  {r.status.upper()}: {r.section} {r.case} {_first_line(r.error)}"
              for r in rows if r.status in ("fail", "error")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for device_check.json / .md")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU, kernels in interpret mode, no timing table")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="after this many seconds the remaining timing and peer rows are "
                         "skipped (correctness always runs; default 420; none in a dry run)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="threads compiling the correctness cases (default 1 in a dry run, "
                         "else min(8, CPUs))")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--predict", metavar="DEVICE_KIND", nargs="?", const="H100 SXM",
                    help="write DIR/predicted.md, the timing tables with the cost model's "
                         "predictions only, for a card (default H100 SXM); runs nothing")
    args = ap.parse_args(argv)
    if args.predict:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "predicted.md").write_text(predicted_markdown(peaks_for(args.predict)))
        print(f"wrote {args.out / 'predicted.md'}")
        return 0
    with contextlib.ExitStack() as stack:
        if args.dry_run:
            _dry_run_setup(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="gdn_device_check_cache_")))
        else:   # torch (the peers) shares the GPU: JAX takes half of it, not 75%
            os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
        return run_check(args)


def _dry_run_setup(cache_dir: str) -> None:
    """The CPU, XLA CPU's quick compile (without LLVM's optimisations: about 2x faster on the
    interpret-mode programs, IEEE arithmetic either way; set before the backend starts), and a
    compilation cache for the run, so the timing cases that shrink to one program compile it
    once."""
    jax.config.update("jax_platforms", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_check(args: argparse.Namespace) -> int:
    """The check itself (main's JAX setup done)."""
    device = jax.devices()[0]
    if not args.dry_run and device.platform != "gpu":
        print(f"device_check: no GPU (JAX's device is {device}); use --dry-run on the CPU",
              file=sys.stderr)
        return 2
    corr, timing = cases_mod.cases(args.dry_run)
    if args.only:
        corr = [c for c in corr if args.only in c.name]
        timing = [c for c in timing if args.only in c.name]
    ctx = Context(dry=args.dry_run, device=f"{device.platform} ({device.device_kind})",
                  out=args.out,
                  peaks=card_peaks(device),
                  deadline=time.perf_counter() + (np.inf if args.dry_run else args.budget_s),
                  calls=1 if args.dry_run else 10, rounds=1 if args.dry_run else 7)
    ctx.log(f"device_check on {ctx.device}, jax {jax.__version__}: {len(corr)} correctness and "
            f"{len(timing)} timing cases{' (dry run)' if ctx.dry else ''}")
    jobs = args.jobs or (1 if ctx.dry else min(8, os.cpu_count() or 1))
    run_correctness(ctx, corr, jobs)
    run_timing(ctx, timing)
    peer = Peer.load(ctx.dry)
    if peer.reason is None:
        ctx.log(f"peers: {peer.version}")
    run_peers(ctx, peer, timing)
    ctx.done = True
    ctx.save()
    print(summary(ctx.rows))
    print(f"wrote {args.out / 'device_check.json'} and {args.out / 'device_check.md'} "
          f"({time.perf_counter() - ctx.start:.0f} s)")
    return 1 if any(r.section == "correctness" and r.status != "pass" for r in ctx.rows) else 0

if __name__ == "__main__":
    sys.exit(main())
