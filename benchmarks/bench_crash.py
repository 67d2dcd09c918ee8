"""Crash safety at full size: SIGKILL `bac-node serve` during ingestion, count what survived.

    .venv/bin/python -m benchmarks.bench_crash [--instances 1000] [--kills 50] [--senders 4]
        [--seed 0] [--out benchmarks/results]

The harness is ``tests/reliability/_crash.py`` (its docstring says what runs and what
is checked): ``--instances / 4`` tiny 4-view studies sent by ``--senders`` pynetdicom
threads to ``bac-node serve --workers 0`` plus one ``bac-node worker`` (tiny test
model), ``--kills`` SIGKILLs of serve at random moments (the worker too, one time in
three), results to dcmtk's storescp. Prints the figures and writes
``benchmarks/results/bench_crash.json``; exits 1 when a promise was broken (the problems are
printed). ``test_crash.py`` runs the same harness at CI size.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS, print_table, write_result

for folder in ("tests", "tests/node", "tests/reliability"):
    if str(REPO / folder) not in sys.path:
        sys.path.append(str(REPO / folder))


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000, help="A multiple of 4.")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle-timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    # SIGTERM unwinds like Ctrl-C, so the node, the worker and storescp are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from _crash import crash_run
    from _processing_helpers import save_tiny_model
    from peers import StoreSCP

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bac-node-crash-") as tmp:
        work = Path(tmp)
        model = save_tiny_model(work / "tiny.safetensors")
        with StoreSCP(work / "dest", ae_title="CRASHDEST", unique_filenames=True) as dest:
            run = crash_run(
                work, model, dest, studies=args.instances // 4, kills=args.kills,
                senders=args.senders, seed=args.seed, settle_timeout=args.settle_timeout,
                log=log,
            )  # fmt: skip
        problems = run.tally.problems()
    figures = run.figures()
    row = {k: v for k, v in figures.items() if k != "jobs"}
    row["jobs"] = ", ".join(f"{n} {state}" for state, n in sorted(figures["jobs"].items()))
    write_result("bench_crash", [row], args.out, problems=problems)
    table = [{"figure": k, "value": v} for k, v in row.items()]
    print_table("Crash safety (kill -9 of serve during ingestion)", table, ["figure", "value"])
    for problem in problems:
        print(f"PROBLEM: {problem}")
    if problems:
        raise SystemExit(1)
    return [row]


if __name__ == "__main__":
    main()
