"""Ingest: bac-node's C-STORE SCP against dcmtk's storescp, same files, same sender.

    python -m benchmarks.bench_ingest [--studies 5] [--scale 0.25] [--full-studies 1]
                                      [--repeats 3]

Two sets of phantom MG files (made first, not timed): ``--studies`` 4-view studies at
``--scale`` (sample-sized images) and ``--full-studies`` at full resolution (Hologic
style, 4096 × 3328, 27 MB an image). Each receiver is started afresh ``--repeats``
times (receivers alternate, so a busy moment of the shared machine falls on all of
them), and dcmtk's ``storescu`` sends it each set in one association; the median wall
time of ``storescu`` (association to release) is reported as instances/s and MB/s, and
as a ratio to storescp.

Receivers, each a fresh process with an empty folder:

* ``storescp``: dcmtk's ``storescp --max-pdu 131072 -od DIR`` (writes each file; no
  fsync; 128 KiB is dcmtk's largest PDU, its default 16 KiB is slower).
* ``bac-node``: the node of ``bac-node serve --workers 0`` (SCP, store, scheduler): every
  instance fsynced, its directory fsynced and its row committed (SQLite WAL,
  ``synchronous=FULL``) before Success: the product's default.
* ``bac-node nofsync``: the same with ``os.fsync`` a no-op and SQLite
  ``synchronous=OFF``, patched in the benchmark's child only (there is no such setting):
  what durability costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    MIB,
    RESULTS,
    child_env,
    dicom_files,
    echo,
    free_port,
    median,
    patch_sqlite_synchronous,
    print_table,
    process,
    storescu,
    synth_studies,
    tool,
    wait_until,
    write_result,
)

NAME = "bench_ingest"
RECEIVERS = ("storescp", "bac-node", "bac-node nofsync")
NODE_AE = "BACNODE"


def serve_node(data_dir: Path, port: int, *, fsync: bool) -> None:
    """The receiving node (child process): the SCP, store and scheduler, no worker."""
    from bac_node.config import Settings
    from bac_node.node.service import Node, run_until_signal

    if not fsync:
        os.fsync = lambda fd: None  # the store's file and directory fsyncs
        patch_sqlite_synchronous("OFF")
    settings = Settings(
        data_dir=data_dir, ae_title=NODE_AE, allowed_peers=("BENCH",), log_level="WARNING",
        stable_after=3600, min_free_mb=0,
    )  # fmt: skip
    node = Node(settings, port=port, workers=0)
    run_until_signal(node.start, node.stop)


def receive(receiver: str, sets: list[list[Path]], work: Path) -> list[float]:
    """Seconds storescu took to send each set of files, in turn, to a fresh ``receiver``.

    The sets hold different instances, so none is a duplicate for the receiver.
    """
    folder = work / "received"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = free_port()
    if receiver == "storescp":
        args = [tool("storescp"), "-aet", "STORESCP", "--max-pdu", "131072", "-od", str(folder),
                str(port)]  # fmt: skip
        called = "STORESCP"
    else:
        args = [sys.executable, "-m", "benchmarks.bench_ingest", "--serve", str(folder),
                "--port", str(port)]  # fmt: skip
        if receiver == "bac-node nofsync":
            args.append("--no-fsync")
        called = NODE_AE
    with process(args, work / f"{receiver.replace(' ', '-')}.log", child_env()) as child:
        wait_until(lambda: child.poll() is not None or echo(port, called), 60, receiver)
        if child.poll() is not None:
            raise RuntimeError(f"{receiver} exited: see {work}")
        return [storescu(files, port, called) for files in sets]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--full-studies", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--receivers", default=",".join(RECEIVERS), help="Comma-separated.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-fsync", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve_node(args.serve, args.port, fsync=not args.no_fsync)
        return []

    receivers = args.receivers.split(",")
    unknown = sorted(set(receivers) - set(RECEIVERS))
    if unknown or "storescp" not in receivers:
        parser.error(f"--receivers: storescp and any of {', '.join(RECEIVERS[1:])}, not {unknown}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        sets = []
        if args.studies:
            folders = synth_studies(work / "small", args.studies, seed=31, vendor="Hologic",
                                    scale=args.scale)  # fmt: skip
            sets.append((f"{args.studies} studies at scale {args.scale:g}", folders))
        if args.full_studies:
            folders = synth_studies(work / "full", args.full_studies, seed=37, vendor="Hologic",
                                    scale=1.0)  # fmt: skip
            sets.append((f"{args.full_studies} full-resolution studies", folders))
        files = [[f for folder in folders for f in dicom_files(folder)] for _, folders in sets]
        times: dict[str, list[list[float]]] = {r: [] for r in receivers}
        for repeat in range(args.repeats):
            for receiver in receivers if repeat % 2 == 0 else receivers[::-1]:
                times[receiver].append(receive(receiver, files, work))
        for index, (label, _) in enumerate(sets):
            megabytes = sum(f.stat().st_size for f in files[index]) / MIB
            reference = median([run[index] for run in times["storescp"]])
            for receiver in receivers:
                runs = [run[index] for run in times[receiver]]
                seconds = median(runs)
                rows.append({
                    "files": label,
                    "receiver": receiver,
                    "instances": len(files[index]),
                    "mb": round(megabytes, 1),
                    "seconds": round(seconds, 3),
                    "instances_per_s": round(len(files[index]) / seconds, 1),
                    "mb_per_s": round(megabytes / seconds, 1),
                    "throughput_vs_storescp": round(reference / seconds, 2),
                    "all_seconds": [round(t, 3) for t in runs],
                })  # fmt: skip
    columns = ["files", "receiver", "instances", "mb", "seconds", "instances_per_s", "mb_per_s",
               "throughput_vs_storescp"]  # fmt: skip
    print_table("Ingest: storescu → receiver, one association, median", rows, columns)
    write_result(NAME, rows, args.out, repeats=args.repeats, sender="dcmtk storescu")
    return rows


if __name__ == "__main__":
    main()
