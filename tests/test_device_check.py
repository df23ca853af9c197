"""The prepared GPU check (`python -m gdn_jax.device_check`) in its dry run: every case of its
case lists on tiny shapes, the kernels in Pallas interpret mode, on the CPU, in a subprocess
started beside the other tests (tests/background.py; the dry run sets the CPU platform, XLA
flags and its compilation cache before JAX starts). It keeps the script from rotting between the
sessions that are lent a GPU; docs/gpu.md says how to run it on one. The dry run takes about
3.5 CPU minutes, so its two consumers are `slow` (CI runs them); the other tests here cover its
parts in the everyday tier: a wrong result fails its row, the peer code on fake torch ops, the
predicted tables, kernel names and card peaks."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import background
import pytest

from gdn_jax import _device_check_cases as cases_mod
from gdn_jax import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In the session's job folder (tests/background.py), which every xdist worker sees and the main
# process removes at the end; its own folder when that is not there.
OUT = os.path.join(os.environ.get("GDN_BG_DIR") or tempfile.mkdtemp(prefix="gdn_dc_"),
                   "device_check")
# The dry run starts when collection ends and runs beside the other tests (tests/background.py).
BACKGROUND = {"device_check": background.Job(
    [sys.executable, "-m", "gdn_jax.device_check", "--dry-run", "--out", OUT],
    dict(os.environ, JAX_PLATFORMS="cpu"), ROOT,
    lambda item: "dry_run" in getattr(item, "fixturenames", ()))}


@pytest.fixture(scope="module")
def dry_run():
    proc = background.result("device_check", BACKGROUND["device_check"], timeout=1200)
    return Path(OUT), proc.returncode, proc.stdout + proc.stderr


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "device_check.json").read_text())["rows"]


@pytest.mark.slow   # the dry run: about 3.5 CPU minutes; the tests below cover its parts cheaply
def test_dry_run_passes_every_case(dry_run):
    out, rc, log = dry_run
    assert rc == 0, log[-4000:]
    rows = _rows(out)
    corr, timing = cases_mod.cases(dry=True)
    got = {r["case"]: r for r in rows if r["section"] == "correctness"}
    assert set(got) == {c.name for c in corr}
    bad = {n: (r["status"], r["error"] or r["measured"]["checks"]) for n, r in got.items()
           if r["status"] != "pass"}
    assert not bad, bad
    for r in got.values():   # the kernels ran (no fallback) and every gradient was compared
        assert r["measured"]["kernels"], r["case"]
        assert set(r["measured"]["vs_reference"]) >= {"o", "state"}
    timed = [r for r in rows if r["section"] == "timing"]
    names = {r["case"].split("/")[0] for r in timed}
    assert names == {c.name for c in timing}
    assert all(r["status"] == "ok" for r in timed), [(r["case"], r["error"]) for r in timed
                                                      if r["status"] != "ok"]
    # every kernel of the chunked forward and backward was timed on its own
    prefill = [c.name for c in timing if c.kind == "prefill"]
    for name in prefill:
        stages = {r["case"].split("/", 1)[1] for r in timed if r["case"].startswith(name + "/")}
        assert stages == {"prep", "fwd", "fwd: program", "bwd: prep", "bwd: states",
                          "bwd: bwd_state", "bwd: bwd_dqv", "bwd: bwd_dk", "bwd: bwd_da",
                          "bwd: program"}, (name, stages)
    assert all(r["peer"] == "skipped: dry run" for r in timed
               if r["case"].endswith("program") or "/" not in r["case"])
    md = (out / "device_check.md").read_text()
    assert "Dry run" in md and f"{len(corr)} of {len(corr)} cases pass" in md


@pytest.mark.slow
def test_timing_tables_render_the_dry_run_rows(dry_run):
    """The hardware run's timing tables (omitted from a dry run's report) from the dry run's
    rows: every timing case appears."""
    out, _, _ = dry_run
    rows = [device_check.Row(**r) for r in _rows(out) if r["section"] == "timing"]
    text = "\n".join(device_check.timing_markdown(rows))
    for case in cases_mod.cases(dry=True)[1]:
        assert case.name in text


def test_predicted_tables(tmp_path):
    assert device_check.main(["--predict", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "predicted.md").read_text()
    assert all(c.name in text for c in cases_mod.TIMING)
    # the cost model at H100 SXM peaks: decode B=32 moves 2 x 64 MiB of float32 state in ~40 us
    assert "| decode-gda-b32-f32 | - | 40.3 |" in text


def test_a_wrong_result_fails_its_row():
    """The comparison can fail: a Pallas output 10% off fails the row (interpret mode, one
    of the cheapest cases: per-token slots, forward only)."""
    case = next(c for c in cases_mod.CORRECTNESS if not c.grads).shrunk()
    prep = device_check.prepare_case(case, dry=True)
    assert device_check.check_case(prep).status == "pass"
    good = prep.compiled["pallas"]

    def off(*a):
        outs, grads = good(*a)
        return (outs[0] * 1.1, *outs[1:]), grads

    prep.compiled["pallas"] = off
    row = device_check.check_case(prep)
    assert row.status == "fail"
    assert not row.measured["checks"]["pallas_vs_reference"]


def test_kernel_stages_and_peaks():
    assert device_check.kernel_stage("gdn_chunk_kda_bwd_state_k128_v128_bv32") == "bwd_state"
    assert device_check.kernel_stage("gdn_chunk_bwd_da_k64") == "bwd_da"
    assert device_check.kernel_stage("gdn_recurrent_gda_k128_v128_bv16_kv_pool_ht") == "recurrent"
    assert device_check.peaks_for("NVIDIA H100 80GB HBM3")["card"] == "H100 SXM"
    assert device_check.peaks_for("NVIDIA H100 PCIe")["card"] == "H100 PCIe"
    assert device_check.peaks_for("NVIDIA H200")["card"] == "H200 SXM"
    unknown = device_check.peaks_for("NVIDIA L4")
    assert unknown["card"] == "H100 SXM" and not unknown["matched"]


def _fake_peer():
    """A Peer on the CPU whose ops return v and the initial state (differentiable in every
    input), to run the peer plumbing without fla or a GPU."""
    torch = pytest.importorskip("torch")

    def chunk(q, k, v, g, beta, *, initial_state, scale, output_final_state,
              use_qk_l2norm_in_kernel):
        zero = 0 * (q.float().sum() + k.float().sum() + g.float().sum() + beta.float().sum())
        return v * (1 + zero).to(v.dtype), initial_state * 1.0

    def recurrent(q, k, v, *, beta, scale, initial_state, output_final_state,
                  use_qk_l2norm_in_kernel, g=None, gk=None):
        return v, initial_state.float()

    return device_check.Peer(None, torch, chunk, chunk, recurrent, device="cpu", version="fake")


def test_peer_rows_from_fake_ops():
    """The peer code (conversion, torch autograd, timing, agreement) on fake ops whose results
    equal the fake "ours": every figure is filled and everything agrees."""
    import jax.numpy as jnp  # noqa: PLC0415

    peer = _fake_peer()
    ctx = device_check.Context(dry=True, device="cpu", peaks=None, deadline=float("inf"),
                               calls=1, rounds=1)
    prefill = next(c for c in cases_mod.TIMING if c.kind == "prefill").shrunk()
    (q, k, v, g, beta), h0 = cases_mod.model_inputs(prefill.shape, jnp.bfloat16)
    args = (q, k, v, g, beta, h0)
    zeros = [jnp.zeros_like(x) for x in args]
    ctx.ours[prefill.name] = device_check.PrefillPrograms(   # o = v, state = h0
        args, cases_mod.cotangents((v, h0)), fwd=lambda *a: (a[2], a[5]),
        bwd=lambda _, ct: (*zeros[:2], ct[0], *zeros[3:5], ct[1]), vjp=None, launches={})
    fwd_row, bwd_row = (device_check.Row("timing", n, "ok", measured={"us": 1.0})
                        for n in ("fwd", "bwd"))
    device_check.peer_prefill(ctx, peer, prefill, fwd_row, bwd_row)
    assert fwd_row.peer["agree"] and set(fwd_row.peer["rel_err"]) == {"o", "state"}
    assert bwd_row.peer["agree"] and set(bwd_row.peer["rel_err"]) == set(device_check.GRAD_NAMES)
    decode = next(c for c in cases_mod.TIMING if c.kind == "decode").shrunk()
    dargs, pool, idx = cases_mod.decode_inputs(decode)
    ctx.ours[decode.name] = (lambda *a: (a[2], a[5]), dargs, pool, idx)
    row = device_check.Row("timing", decode.name, "ok", measured={"us": 1.0})
    device_check.peer_decode(ctx, peer, decode, row)
    assert row.peer["agree"] and row.peer["us"] > 0
