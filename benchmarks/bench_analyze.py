"""Time and peak memory of `bac-node analyze` on one full-resolution 4-view study (CPU).

    .venv/bin/python benchmarks/bench_analyze.py [--vendor Fuji] [--repeats 1]

Generates the study with the phantom (not timed), then runs `bac-node analyze` in a
child process (which tunes glibc's allocator itself) and reads the child's peak
resident memory from the kernel (getrusage of children). Without shipped weights the
untrained fixed-seed model runs: the same network and the same compute as a trained
one. Prints a table and writes benchmarks/results/analyze.{json,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.phantom.study import plan_studies, synthesize

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--vendor", default="Fuji")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        plans = plan_studies(
            1, seed=5, vendor=args.vendor, grades={2: 1.0}, processing_fraction=0.0
        )
        synthesize(plans, study, progress=False)
        for r in range(args.repeats):
            out = Path(tmp) / f"out{r}"
            start = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "bac_node", "--log-level", "WARNING", "analyze", str(study),
                 "--out", str(out), "--device", "cpu"],
                capture_output=True, text=True,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            if run.returncode != 0:
                raise SystemExit(run.stderr)
            # ru_maxrss of children is the largest of them, in KiB on Linux.
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            rows.append(
                {
                    "vendor": args.vendor,
                    "seconds": round(seconds, 1),
                    "peak_rss_gib": round(peak / GIB, 2),
                    "under_3_gib": peak < 3 * GIB,
                }
            )
            print(f"{args.vendor}: analyze {seconds:.1f} s, peak RSS {peak / GIB:.2f} GiB")
    meta = {
        "command": "python benchmarks/bench_analyze.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "device": "cpu",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analyze.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    )
    with (args.out / "analyze.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
