"""Renders the JSON of tests/timing_plugin.py as the markdown tables of docs/testing.md.

    python tests/timing_report.py FILE [--top N]

Per test file: tests, wall seconds, XLA compile seconds, trace + lowering seconds and the
number of compiles; then the N slowest tests. Wall time of a test that waits for a background
subprocess (tests/background.py) includes the wait; the subprocess's own compiles are not
counted (they happen in another process).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def render(rows: dict, top: int) -> str:
    files: dict = defaultdict(lambda: defaultdict(float))
    for nodeid, r in rows.items():
        f = files[_file_of(nodeid)]
        f["tests"] += 1
        for col in ("wall_s", "compile_s", "trace_s", "lower_s", "compiles", "cache_hits"):
            f[col] += r.get(col, 0.0)
    total = {col: sum(f[col] for f in files.values())
             for col in ("tests", "wall_s", "compile_s", "trace_s", "lower_s", "compiles",
                         "cache_hits")}
    out = ["| file | tests | wall s | compile s | trace + lower s | compiles | cache hits |",
           "|---|---|---|---|---|---|---|"]
    for name, f in sorted(files.items(), key=lambda kv: -kv[1]["wall_s"]):
        out.append(f"| {name} | {int(f['tests'])} | {f['wall_s']:.1f} | {f['compile_s']:.1f} | "
                   f"{f['trace_s'] + f['lower_s']:.1f} | {int(f['compiles'])} | "
                   f"{int(f['cache_hits'])} |")
    out.append(f"| **all** | {int(total['tests'])} | {total['wall_s']:.1f} | "
               f"{total['compile_s']:.1f} | {total['trace_s'] + total['lower_s']:.1f} | "
               f"{int(total['compiles'])} | {int(total['cache_hits'])} |")
    out += ["", f"The {top} slowest tests:", "",
            "| test | wall s | compile s | trace + lower s | compiles |", "|---|---|---|---|---|"]
    for nodeid, r in sorted(rows.items(), key=lambda kv: -kv[1].get("wall_s", 0.0))[:top]:
        out.append(f"| `{nodeid}` | {r.get('wall_s', 0):.1f} | {r.get('compile_s', 0):.1f} | "
                   f"{r.get('trace_s', 0) + r.get('lower_s', 0):.1f} | {int(r.get('compiles', 0))} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with open(args.file) as f:
        print(render(json.load(f), args.top))


if __name__ == "__main__":
    main()
