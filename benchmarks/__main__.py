"""Run every benchmark: ``python -m benchmarks [--quick] [--only ingest,queue,...]``.

Each prints its table and writes ``benchmarks/results/<name>.json`` (``--out`` for
another folder). The default sizes take about 20 minutes on a 2-core machine;
``--quick`` runs tiny sizes (seconds each: what tests/test_benchmarks.py runs, so the
code cannot rot; its figures mean nothing). ``bench_synth`` (the phantom generator's
speed) is not part of the node's figures and runs on its own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import bench_analysis, bench_end_to_end, bench_ingest, bench_queue, bench_workers
from benchmarks.common import RESULTS

BENCHMARKS: dict[str, tuple[Callable[[list[str] | None], list[dict[str, Any]]], list[str]]] = {
    # name: (main, --quick arguments)
    "ingest": (bench_ingest.main, ["--studies", "1", "--scale", "0.05", "--full-studies", "0",
                                   "--repeats", "1", "--receivers", "storescp,bac-node"]),
    "queue": (bench_queue.main, ["--jobs", "20", "--workers", "1,2"]),
    "analysis": (bench_analysis.main, ["--vendors", "Hologic", "--scale", "0.1",
                                       "--backends", "onnx"]),
    "end_to_end": (bench_end_to_end.main, ["--studies", "1", "--scale", "0.05",
                                           "--modes", "sequential"]),
    "workers": (bench_workers.main, ["--studies", "2", "--workers", "1",
                                     "--databases", "sqlite"]),
}  # fmt: skip
MODEL_BENCHMARKS = ("analysis", "end_to_end")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Tiny sizes (a smoke run).")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="Comma-separated names.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--model", help="A .safetensors model for analysis and end_to_end (default: shipped)."
    )
    args = parser.parse_args(argv)
    for name in args.only.split(","):
        if name not in BENCHMARKS:
            parser.error(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    for name in args.only.split(","):
        run, quick = BENCHMARKS[name]
        start = time.perf_counter()
        model = ["--model", args.model] if args.model and name in MODEL_BENCHMARKS else []
        run([*(quick if args.quick else []), *model, "--out", str(args.out)])
        print(f"\n[{name}: {time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
