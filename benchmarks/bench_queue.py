"""Queue: jobs claimed and completed per second on the node's SQLite database.

    python -m benchmarks.bench_queue [--jobs 500] [--workers 1,4]

Fills a fresh database with ``--jobs`` complete 4-view studies (instance rows, no
files; not timed), makes their jobs (``enqueue_ready_studies``, timed once), then
``N`` threads (each of ``--workers``) claim and complete every job with the queue's own
functions (``claim_job``, ``complete_job`` with one destination, which also creates
the export row). Reported: claims + completions per second (a pair per job) and the
median time of one claim. The database is the product's: SQLite in WAL mode,
``synchronous=FULL``, on this machine's disk. PostgreSQL is not measured here (no
server on this machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, patch_sqlite_synchronous, print_table, write_result

NAME = "bench_queue"
VIEWS = ("R-CC", "L-CC", "R-MLO", "L-MLO")


def fill(data_dir: Path, studies: int) -> Any:
    """A database with ``studies`` complete studies, nothing queued yet."""
    from bac_node.node.db import Instance, Study, open_database, utcnow

    db = open_database(data_dir)
    now = utcnow()
    with db.session() as s:
        for n in range(studies):
            uid = f"2.25.{n + 1}"
            study = Study(study_uid=uid, first_received=now, last_received=now,
                          instance_count=4)  # fmt: skip
            s.add(study)
            s.flush()
            for v, view in enumerate(VIEWS):
                s.add(Instance(
                    sop_instance_uid=f"{uid}.{v + 1}", study_id=study.id, series_uid=f"{uid}.9",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"instances/{uid}.{v}.dcm",
                    size_bytes=1, sha256=f"{n:064x}", analysable=True, view=view,
                    received_at=now,
                ))  # fmt: skip
    return db


def drain(db: Any, workers: int) -> tuple[float, list[float], int]:
    """Claim and complete every job with ``workers`` threads: seconds, claim times, done."""
    from bac_node.node.queue import ResultRecord, claim_job, complete_job

    claim_seconds: list[float] = []
    done = [0]
    lock = threading.Lock()

    def work(index: int) -> None:
        owner = f"bench:{index}"
        while True:
            t0 = time.perf_counter()
            job = claim_job(db, owner, 300)
            t1 = time.perf_counter()
            if job is None:
                return
            record = ResultRecord(
                path=f"results/{job.inputs_key[:16]}", files=("sr.dcm",),
                sr_uid=f"2.25.9{job.job_id}",
                grade=0, cardiovascular_flag=False, area_percent=0.0, model_version="bench",
                analysis_seconds=0.0,
            )  # fmt: skip
            ok = complete_job(db, job.job_id, owner, record, ["DEST@127.0.0.1:104"])
            with lock:
                claim_seconds.append(t1 - t0)
                done[0] += int(ok)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, claim_seconds, done[0]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--workers", default="1,4", help="Comma-separated thread counts.")
    parser.add_argument(
        "--synchronous", default="FULL", choices=["FULL", "NORMAL", "OFF"],
        help="SQLite synchronous mode (FULL: the product's; others only to measure its cost).",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.synchronous != "FULL":
        patch_sqlite_synchronous(args.synchronous)

    from bac_node.node.queue import enqueue_ready_studies

    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
            db = fill(Path(tmp), args.jobs)
            try:
                t0 = time.perf_counter()
                queued = enqueue_ready_studies(db, stable_after=60)
                enqueue = time.perf_counter() - t0
                if len(queued) != args.jobs:
                    raise RuntimeError(f"{len(queued)} of {args.jobs} studies queued")
                seconds, claims, done = drain(db, workers)
            finally:
                db.dispose()
        if done != args.jobs:
            raise RuntimeError(f"{done} of {args.jobs} jobs completed with {workers} worker(s)")
        rows.append({
            "database": f"SQLite (WAL, synchronous={args.synchronous})",
            "workers": workers,
            "jobs": args.jobs,
            "enqueue_jobs_per_s": round(args.jobs / enqueue, 0),
            "claims_per_s": round(args.jobs / seconds, 0),
            "claims_and_completions_per_s": round(2 * args.jobs / seconds, 0),
            "median_claim_ms": round(1000 * statistics.median(claims), 2),
        })  # fmt: skip
    columns = ["database", "workers", "jobs", "enqueue_jobs_per_s", "claims_per_s",
               "claims_and_completions_per_s", "median_claim_ms"]  # fmt: skip
    print_table("Queue: claim + complete every job (threads in one process)", rows, columns)
    name = NAME if args.synchronous == "FULL" else f"{NAME}_{args.synchronous.lower()}"
    write_result(name, rows, args.out)
    return rows


if __name__ == "__main__":
    main()
