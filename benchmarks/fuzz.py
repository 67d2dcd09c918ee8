"""The fuzzing run at full size: ``python -m benchmarks.fuzz --runs 1000000``.

Runs each atheris harness of ``tests/reliability/fuzz/`` (``fuzz_read``: the
read-and-validate path of an incoming instance; ``fuzz_multipart``: the STOW-RS multipart
parser) as a subprocess for ``--runs`` executions or ``--max-time`` seconds, whichever
comes first, each from its seeds in a fresh corpus directory, one after the other (one
process each: the figure is executions on one core). A finding (an exception other than
the node's documented refusals, a timeout, an out-of-memory) ends that harness; the input
is kept under ``--out``/fuzz-findings/, libFuzzer's output in
``$TMPDIR/bac-node-fuzz-<harness>.log``. Prints a table and writes
``benchmarks/results/fuzz.json`` (``--out`` elsewhere): executions, seconds, executions
per second (start-up included), findings.
``--quick``: 2,000 executions each, a check that this command runs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, print_table, write_result

FUZZ = REPO / "tests" / "reliability" / "fuzz"
HARNESSES = ("multipart", "read")
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")


def run_harness(name: str, runs: int, max_time: int, out: Path) -> dict[str, Any]:
    findings = out / "fuzz-findings" / name
    findings.mkdir(parents=True, exist_ok=True)
    before = set(findings.iterdir())
    with tempfile.TemporaryDirectory(prefix=f"bac-node-fuzz-{name}-") as corpus:
        command = [
            sys.executable, str(FUZZ / f"fuzz_{name}.py"), f"-runs={runs}",
            f"-max_total_time={max_time}", "-print_final_stats=1",
            f"-artifact_prefix={findings}/", corpus,
        ]  # fmt: skip
        start = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, cwd=out)
        seconds = time.monotonic() - start
    log = done.stdout + done.stderr
    (Path(tempfile.gettempdir()) / f"bac-node-fuzz-{name}.log").write_text(log)
    executed = _EXECUTED.findall(log)
    new = sorted(str(p) for p in set(findings.iterdir()) - before)
    return {
        "harness": f"fuzz_{name}",
        "executions": int(executed[-1]) if executed else 0,
        "seconds": round(seconds),
        "exec_per_s": round(int(executed[-1]) / seconds) if executed and seconds else 0,
        "exit_status": done.returncode,
        "findings": len(new),
        "finding_files": new,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000, help="Executions per harness.")
    parser.add_argument("--max-time", type=int, default=7200, help="Seconds per harness at most.")
    parser.add_argument("--only", default=",".join(HARNESSES), help="Comma-separated harnesses.")
    parser.add_argument("--quick", action="store_true", help="2,000 executions each.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    runs = 2000 if args.quick else args.runs
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    names = args.only.split(",")
    for name in names:
        if name not in HARNESSES:
            parser.error(f"unknown harness {name!r}; valid: {', '.join(HARNESSES)}")
        rows.append(run_harness(name, runs, args.max_time, args.out.resolve()))
        print_table("fuzzing", rows, ["harness", "executions", "seconds", "exec_per_s", "findings"])
    write_result("fuzz", rows, args.out, runs=runs, max_time=args.max_time)
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(1 if any(row["findings"] or row["exit_status"] for row in rows) else 0)
