"""Scale-out: studies per minute with 1, 2 and 4 ``bac-node worker`` processes.

    python -m benchmarks.bench_workers [--studies 24] [--workers 1,2,4]
                                       [--databases sqlite,postgresql] [--scale 0.05]

For each database and worker count: a fresh queue holding ``--studies`` tiny 4-view
studies (one phantom study rendered once, then copied with new UIDs: each copy is a
study of its own to the node), stored by the node's own store (not timed) and queued;
then N ``bac-node worker`` subprocesses (one worker thread each, the tiny test model:
mobilenet_v2 encoder of depth 3, 1 mm pixels, fixed-seed weights) run until every job
is done. Throughput is studies per minute between the first claim and the last result
(the workers' start-up, about 2 s each, is reported separately); per worker is that
divided by N.

PostgreSQL runs on a throw-away server of Debian's binaries (``tests/pg.py``, the test
suite's helper: ``fsync`` off, so its commits cost what a battery-backed server's do);
SQLite is the node's default file in WAL mode with ``synchronous=FULL``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, child_env, print_table, wait_until, write_result

NAME = "bench_workers"


def tiny_model(path: Path) -> Path:
    """The tests' tiny model (``tests/node/_processing_helpers.save_tiny_model``)."""
    from bac_node.model.factory import ModelConfig, fixed_seed_model
    from bac_node.model.weights import ModelCard, save_model

    config = ModelConfig(encoder="mobilenet_v2", encoder_depth=3, decoder_channels=(32, 16, 8))
    card = ModelCard(
        name="bac-node-bench-tiny", version="0.0.0+bench", architecture=config,
        input_spacing_mm=1.0, tile_size=128, tile_overlap=32,
        training_data="none: fixed-seed random weights, for benchmarks",
    )  # fmt: skip
    save_model(path, fixed_seed_model(config, 0).eval(), card)
    return path


def phantom(out: Path, *, seed: int = 7, scale: float = 0.05) -> list[Path]:
    """One 4-view For Presentation phantom study (the files)."""
    from training.phantom.study import plan_studies, render_study, write_study

    plan = plan_studies(1, seed=seed, processing_fraction=0.0, prior_fraction=0.0)[0]
    rows = write_study(render_study(plan, scale=scale), out)
    return [out / str(row["file"]) for row in rows]


def clone_studies(template: Sequence[Path], out: Path, count: int) -> list[list[Path]]:
    """``count`` copies of the study in ``template``, each with new Study, Series and SOP
    Instance UIDs (derived from the copy's number, so reruns make the same UIDs): to the
    node, ``count`` different studies with the same pixels. The files of each copy."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = [pydicom.dcmread(path) for path in template]
    studies = []
    for index in range(count):
        folder = out / f"copy-{index:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        study_uid = generate_uid(entropy_srcs=["bac-node copy", str(index)])
        files = []
        for ds in sources:
            copy = ds.copy()
            copy.StudyInstanceUID = study_uid
            copy.SeriesInstanceUID = generate_uid(
                entropy_srcs=[study_uid, str(ds.SeriesInstanceUID)]
            )
            copy.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, str(ds.SOPInstanceUID)])
            copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
            path = folder / f"{copy.SOPInstanceUID}.dcm"
            copy.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append(files)
    return studies


def ingest(settings: Any, studies: Sequence[Sequence[Path]]) -> None:
    """Store every file with the node's store (as C-STORE would) and queue the studies."""
    import pydicom

    from bac_node.node.db import open_database
    from bac_node.node.queue import enqueue_ready_studies
    from bac_node.node.store import InstanceStore

    db = open_database(settings.database or settings.data_dir)
    try:
        store = InstanceStore(settings, db)
        for files in studies:
            for path in files:
                ds = pydicom.dcmread(path)
                outcome = store.store(
                    ds, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), calling_ae="BENCH"
                )
                if outcome.failed:
                    raise RuntimeError(f"{path.name}: not stored ({outcome.error_comment})")
        queued = enqueue_ready_studies(db, stable_after=3600)
        if len(queued) != len(studies):
            raise RuntimeError(f"{len(queued)} of {len(studies)} studies queued")
    finally:
        db.dispose()


def job_times(location: str | Path) -> tuple[int, Any, Any]:
    """(done jobs, first claim, last finish) of the queue."""
    from sqlalchemy import func, select

    from bac_node.node.db import Job, open_database

    db = open_database(location)
    try:
        with db.read() as s:
            done = s.scalar(select(func.count()).where(Job.state == "done")) or 0
            failed = s.scalar(select(func.count()).where(Job.state == "failed")) or 0
            if failed:
                raise RuntimeError(f"{failed} job(s) failed")
            first, last = s.execute(
                select(func.min(Job.started_at), func.max(Job.finished_at))
            ).one()
        return int(done), first, last
    finally:
        db.dispose()


def run_workers(
    location: str | Path, data_dir: Path, model: Path, workers: int, studies: int, logs: Path
) -> dict[str, float]:
    """Start ``workers`` worker processes, wait until ``studies`` jobs are done."""
    database = location if isinstance(location, str) else ""
    env = child_env(
        BAC_NODE_MODEL=str(model), BAC_NODE_DEVICE="cpu", BAC_NODE_LOG_LEVEL="WARNING",
        BAC_NODE_LEASE_SECONDS="60",
    )  # fmt: skip
    command = [sys.executable, "-m", "bac_node", "worker", "--data-dir", str(data_dir)]
    if database:
        command += ["--database", database]
    children = []
    start = time.perf_counter()
    for index in range(workers):
        with (logs / f"worker-{workers}-{index}.log").open("wb") as log:
            children.append(
                subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            )
    try:

        def finished() -> bool:
            for child in children:
                if child.poll() is not None:
                    raise RuntimeError(f"a worker exited ({child.returncode}); see {logs}")
            return job_times(location)[0] >= studies

        wait_until(finished, 60.0 * studies, f"{studies} jobs done by {workers} worker(s)")
        wall = time.perf_counter() - start
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
    _, first, last = job_times(location)
    busy = (last - first).total_seconds()
    return {"seconds": busy, "wall_seconds": wall, "startup_seconds": wall - busy}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=24)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from bac_node.config import Settings

    counts = [int(n) for n in args.workers.split(",")]
    databases = args.databases.split(",")
    rows: list[dict[str, Any]] = []
    server = None
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp_name:
        tmp = Path(tmp_name)
        model = tiny_model(tmp / "tiny.safetensors")
        studies = clone_studies(phantom(tmp / "phantom", scale=args.scale), tmp / "studies",
                                args.studies)  # fmt: skip
        try:
            if "postgresql" in databases:
                sys.path.insert(0, str(REPO / "tests"))
                from pg import PostgresServer

                server = PostgresServer().start()
            for database in databases:
                for workers in counts:
                    data_dir = tmp / f"{database}-{workers}"
                    location: str | Path = data_dir
                    if database == "postgresql":
                        assert server is not None
                        location = server.create_database(f"bench_{workers}")
                    elif database != "sqlite":
                        parser.error(f"unknown database {database!r}: sqlite or postgresql")
                    settings = Settings(
                        data_dir=data_dir, min_free_mb=1,
                        database=location if isinstance(location, str) else "",
                    )  # fmt: skip
                    ingest(settings, studies)
                    timing = run_workers(location, data_dir, model, workers, args.studies, tmp)
                    per_minute = 60 * args.studies / timing["seconds"]
                    rows.append({
                        "database": database, "workers": workers, "studies": args.studies,
                        "studies_per_minute": round(per_minute, 1),
                        "per_worker_per_minute": round(per_minute / workers, 1),
                        "seconds": round(timing["seconds"], 1),
                        "startup_seconds": round(timing["startup_seconds"], 1),
                        "load_average": round(os.getloadavg()[0], 2),
                    })  # fmt: skip
                    print(rows[-1], flush=True)
        finally:
            if server is not None:
                server.stop()
    print_table(
        f"Workers: {args.studies} tiny 4-view studies (scale {args.scale}), tiny model, CPU",
        rows,
        ["database", "workers", "studies_per_minute", "per_worker_per_minute", "seconds",
         "startup_seconds", "load_average"],
    )  # fmt: skip
    write_result(NAME, rows, args.out, studies=args.studies, scale=args.scale)
    return rows


if __name__ == "__main__":
    main()
