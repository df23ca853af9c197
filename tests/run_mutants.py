"""Plants each bug of tests/mutants.md in a copy of the repository and shows that its test
selection catches it.

For every row of the table in tests/mutants.md (or only the ids given to `--only`):

1. the files git tracks (`git ls-files`, as they are in the working tree) are copied into a
   temporary directory, with the symlink `gdn_jax/kernels -> ../kernels` that the editable
   install's package-dir mapping stands for;
2. the row's change is applied there (its original text must occur exactly once in the file);
3. a check in the copy's environment imports gdn_jax, gdn_jax.kernels and the mutated module
   and requires all three to come from the copy. With `PYTHONPATH=<copy>` the copy is found
   by the normal path finder, ahead of the editable install's finder (which setuptools
   appends to `sys.meta_path`), so the tests really run the mutated code;
4. `python -m pytest -q -x -n 0 -p no:cacheprovider <selection>` runs inside the copy
   (`-m "not slow"` added for `--tier everyday`), with `PYTHONPATH=<copy>` and
   `JAX_PLATFORMS=cpu`.

A mutant is *caught* when pytest exits 1 with a failing test (the first one is named), *NOT
caught* when the selection passes (exit 0), and an *error* otherwise (a collection error, no
test selected, a timeout, a test erroring in setup): an error is a defect of the row, not a
catch. `--baseline` first runs every selection unmutated (one pytest run over their union) and
stops if that fails, so no catch is a failure that was there before the bug.

Why running only a row's selection is enough: the selection is a subset of the tier (the
whole suite for `--tier full`, its tests not marked slow for `--tier everyday`), and a tier
fails when any of its tests fails. So a selection that fails under the mutant proves that
the whole tier fails under it too; the selection is the cheapest witness, not the only test
that could catch the bug.

Usage: `python tests/run_mutants.py [--baseline] [--only ID ...] [--tier everyday|full]
[--report FILE]`. Prints a markdown table of the results (and writes it to FILE); exits
non-zero when the baseline fails or any mutant is not caught or errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "tests" / "mutants.md"
COLUMNS = ("id", "file", "line", "original", "replacement", "bug", "selection")
DEFAULT_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted bug: replace `original` (occurring exactly once in `file`) by `replacement`;
    `selection` (pytest node ids or files) must then fail."""

    id: str
    file: str
    line: int
    original: str
    replacement: str
    bug: str
    selection: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The result of one pytest run of a selection."""

    id: str
    verdict: str  # "caught", "NOT caught", "error", "passed" or "FAILED" (the last two: baseline)
    detail: str
    seconds: float


def _cells(row: str) -> list[str]:
    """The cells of one markdown table row; `\\|` is a literal bar inside a cell."""
    parts = re.split(r"(?<!\\)\|", row.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def _code(cell: str) -> str:
    """The text of a cell holding one code span, exactly as written between the backticks."""
    m = re.fullmatch(r"`([^`]+)`", cell)
    if m is None:
        raise ValueError(f"expected one code span `...`, got {cell!r}")
    return m.group(1)


def load_mutants(table: Path = TABLE) -> list[Mutant]:
    """The rows of the first table in `table` whose header is COLUMNS."""
    lines = table.read_text().splitlines()
    header = next((i for i, ln in enumerate(lines)
                   if ln.startswith("|") and tuple(_cells(ln)) == COLUMNS), None)
    if header is None:
        raise ValueError(f"{table}: no table with the columns {' | '.join(COLUMNS)}")
    mutants = []
    for ln in lines[header + 2:]:
        if not ln.startswith("|"):
            break
        c = dict(zip(COLUMNS, _cells(ln)))
        mutants.append(Mutant(
            id=c["id"].strip("`"), file=c["file"].strip("`"), line=int(c["line"]),
            original=_code(c["original"]), replacement=_code(c["replacement"]), bug=c["bug"],
            selection=tuple(re.findall(r"`([^`]+)`", c["selection"]))))
    ids = [m.id for m in mutants]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{table}: repeated ids {sorted({i for i in ids if ids.count(i) > 1})}")
    return mutants


def locate(text: str, m: Mutant) -> int:
    """The line of `text` on which m's original text starts; raises ValueError unless it occurs
    exactly once and the replacement differs from it."""
    count = text.count(m.original)
    if count != 1:
        raise ValueError(f"{m.id}: the original text occurs {count} times in {m.file} "
                         f"(must be exactly once): {m.original!r}")
    if m.original == m.replacement:
        raise ValueError(f"{m.id}: the replacement equals the original")
    return text[:text.index(m.original)].count("\n") + 1


def apply_change(root: Path, m: Mutant) -> None:
    """Plants m in the copy at `root` (`locate`'s checks first)."""
    path = root / m.file
    text = path.read_text()
    locate(text, m)
    path.write_text(text.replace(m.original, m.replacement))


def copy_repo(dest: Path) -> None:
    """The tracked files as they are in the working tree, and the `gdn_jax/kernels` link."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if not src.exists() and not src.is_symlink():  # deleted in the working tree
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name, follow_symlinks=False)
    (dest / "gdn_jax" / "kernels").symlink_to(Path("..") / "kernels")


def module_name(file: str) -> str | None:
    """The import name of a package file (kernels/ is installed as gdn_jax.kernels)."""
    parts = Path(file).with_suffix("").parts
    if parts[0] == "kernels":
        parts = ("gdn_jax",) + parts
    if parts[0] != "gdn_jax" or Path(file).suffix != ".py":
        return None
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _env(root: Path) -> dict[str, str]:
    # COLUMNS: pytest's short summary keeps more of the failure's message
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu",
               PYTHONDONTWRITEBYTECODE="1", COLUMNS="240")
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports(root: Path, modules: list[str]) -> None:
    """Raises unless every module in `modules` imports from the copy at `root`."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    print(name, importlib.import_module(name).__file__)\n")
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=root, env=_env(root),
                         capture_output=True, text=True, timeout=300)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"importing {modules} in the copy failed: {last}")
    real = root.resolve()
    for line in out.stdout.splitlines():
        name, file = line.split(" ", 1)
        if not Path(file).resolve().is_relative_to(real):
            raise RuntimeError(f"{name} imports from {file}, not from the copy {root}")


def run_pytest(root: Path, selection: tuple[str, ...], tier: str,
               timeout_s: float) -> tuple[int, str]:
    """(exit code, output) of pytest on `selection` inside the copy; exit code -1 on timeout."""
    # -n 0: one process (pyproject's addopts spread a run over xdist workers), so -x stops at
    # the first failure and names it
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
           *selection]
    if tier == "everyday":
        cmd += ["-m", "not slow"]
    try:
        out = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True,
                             timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        return -1, f"timed out after {timeout_s:.0f} s\n{exc.stdout or ''}"
    return out.returncode, out.stdout + out.stderr


def first_failure(output: str) -> str | None:
    """`node id - message` of the first FAILED line of pytest's short summary, or None."""
    for line in output.splitlines():
        if line.startswith("FAILED "):
            return line[len("FAILED "):]
    return None


def judge(rc: int, output: str, mutated: bool) -> tuple[str, str]:
    """(verdict, detail) of one run: a mutant is caught by a failing test, a baseline passes."""
    failed = first_failure(output)
    if rc == 0:
        return ("NOT caught", "the selection passed") if mutated else ("passed", "")
    if rc == 1 and failed is not None:
        return ("caught", failed) if mutated else ("FAILED", failed)
    tail = " / ".join(ln for ln in output.strip().splitlines()[-3:] if ln.strip())
    return "error", f"pytest exit {rc}: {tail}"


def run_one(mutant: Mutant | None, selection: tuple[str, ...], tier: str,
            timeout_s: float) -> Outcome:
    """Copies the repo, plants `mutant` (None: the baseline), checks the imports, runs pytest."""
    start = time.monotonic()
    name = mutant.id if mutant else "baseline"
    with tempfile.TemporaryDirectory(prefix=f"mutant-{name}-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        modules = ["gdn_jax", "gdn_jax.kernels"]
        if mutant is not None:
            apply_change(root, mutant)
            target = module_name(mutant.file)
            if target is not None and target not in modules:
                modules.append(target)
        try:
            check_imports(root, modules)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            return Outcome(name, "error", str(exc), time.monotonic() - start)
        rc, output = run_pytest(root, selection, tier, timeout_s)
    verdict, detail = judge(rc, output, mutated=mutant is not None)
    return Outcome(name, verdict, detail, time.monotonic() - start)


def markdown(outcomes: list[Outcome], tier: str) -> str:
    """The results as a markdown table."""
    rows = [f"Tier: {tier}. Total {sum(o.seconds for o in outcomes):.0f} s.", "",
            "| id | result | first failing test / detail | seconds |", "|---|---|---|---|"]
    for o in outcomes:
        detail = o.detail.replace("|", "\\|")
        rows.append(f"| {o.id} | {o.verdict} | {detail[:200]} | {o.seconds:.0f} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    parser.add_argument("--baseline", action="store_true",
                        help="first run the selections unmutated; stop unless they pass")
    parser.add_argument("--tier", choices=("everyday", "full"), default="full",
                        help='"everyday" adds -m "not slow"; "full" runs the selection as is')
    parser.add_argument("--report", type=Path, help="also write the results table here")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds one pytest run may take (default %(default)s)")
    args = parser.parse_args(argv)
    mutants = load_mutants()
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in mutants})
        if unknown:
            parser.error(f"unknown ids {unknown}; known: {[m.id for m in mutants]}")
        mutants = [m for m in mutants if m.id in args.only]
    for m in mutants:  # every row must apply to the working tree before anything runs
        try:
            line = locate((REPO / m.file).read_text(), m)
        except ValueError as exc:
            parser.error(str(exc))
        if line != m.line:
            print(f"warning: {m.id}: the original text is on line {line} of {m.file}, "
                  f"the table says {m.line}", file=sys.stderr)
    outcomes = []
    if args.baseline:
        union = tuple(dict.fromkeys(s for m in mutants for s in m.selection))
        outcomes.append(run_one(None, union, args.tier, args.timeout))
        print(f"baseline: {outcomes[-1].verdict} {outcomes[-1].detail} "
              f"({outcomes[-1].seconds:.0f} s)", flush=True)
    if not outcomes or outcomes[0].verdict == "passed":
        for m in mutants:
            outcomes.append(run_one(m, m.selection, args.tier, args.timeout))
            o = outcomes[-1]
            print(f"{o.id}: {o.verdict} {o.detail} ({o.seconds:.0f} s)", flush=True)
    table = markdown(outcomes, args.tier)
    print(table)
    if args.report:
        args.report.write_text(table)
    good = {"caught", "passed"}
    return 0 if all(o.verdict in good for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
