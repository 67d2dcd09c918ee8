"""End to end: from a study's last C-STORE acknowledgement to its SEG + SR at the destination.

    python -m benchmarks.bench_end_to_end [--studies 20] [--scale 0.25] [--backend auto]
                                          [--modes sequential,burst]

Runs the real ``bac-node serve`` (one worker, the shipped model, ``--backend``) in a
child process, with a pynetdicom C-STORE SCP in this process as its destination that
notes when each SEG and SR arrives. dcmtk's ``storescu`` sends each phantom 4-view
study (made first, not timed) in one association. A study's latency runs from the
moment ``storescu`` returns (every instance acknowledged, so fsynced and committed) to
the arrival of its last result object (4 SEG + 1 SR). All four views arrive, so no
stability wait applies; what remains is the node's polling (enqueue, worker and export
ticks of 1 s each), the analysis and the export.

* ``sequential``: one study at a time, the next sent once the last one's results
  arrived: the latency of a quiet node.
* ``burst``: ``--studies`` other studies sent back to back, then waited for: latency
  includes queueing; throughput is studies per hour over the whole burst.

Peak RSS is the ``serve`` process's high-water mark (VmHWM) at the end of each mode.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GIB,
    RESULTS,
    child_env,
    dicom_files,
    echo,
    free_port,
    peak_rss_bytes,
    percentile,
    print_table,
    process,
    storescu,
    synth_studies,
    wait_until,
    write_result,
)

NAME = "bench_end_to_end"
NODE_AE = "BACNODE"
DEST_AE = "BENCHDEST"
RESULTS_PER_STUDY = 5  # 4 SEG + 1 SR
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


class Destination:
    """A pynetdicom storage SCP that notes each study's result arrivals."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.arrivals: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self.lock = threading.Lock()
        ae = AE(ae_title=DEST_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )  # fmt: skip
        assert server is not None  # non-blocking: the server is returned
        self.server = server

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        with self.lock:
            self.arrivals[str(ds.StudyInstanceUID)].append(
                (time.perf_counter(), str(ds.SOPClassUID))
            )
        return 0x0000

    def done_at(self, study_uid: str) -> float | None:
        """When the study's last result arrived, once all have; else None."""
        with self.lock:
            got = self.arrivals.get(study_uid, [])
            if len(got) < RESULTS_PER_STUDY:
                return None
            return max(t for t, _ in got)

    def stop(self) -> None:
        self.server.shutdown()


def study_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(dicom_files(folder)[0], stop_before_pixels=True).StudyInstanceUID)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--vendor", default="Hologic")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--model", default="", help="A .safetensors model (default: shipped).")
    parser.add_argument("--modes", default="sequential,burst")
    parser.add_argument("--timeout", type=float, default=600, help="Per study, in seconds.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    destination = Destination()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
            work = Path(tmp)
            folders = synth_studies(work / "studies", args.studies * len(modes), seed=70,
                                    vendor=args.vendor, scale=args.scale)  # fmt: skip
            port = free_port()
            env = child_env(
                BAC_NODE_DATA_DIR=str(work / "data"), BAC_NODE_PORT=str(port),
                BAC_NODE_ALLOWED_PEERS="BENCH", BAC_NODE_AE_TITLE=NODE_AE,
                BAC_NODE_DESTINATIONS=f"{DEST_AE}@127.0.0.1:{destination.port}",
                BAC_NODE_LOG_LEVEL="WARNING", BAC_NODE_DEVICE="cpu",
                BAC_NODE_BACKEND=args.backend, BAC_NODE_MIN_FREE_MB="0", BAC_NODE_MODEL=args.model,
            )  # fmt: skip
            import sys

            serve = [sys.executable, "-m", "bac_node", "serve", "--workers", "1"]
            with process(serve, work / "serve.log", env) as node:
                wait_until(lambda: node.poll() is not None or echo(port, NODE_AE), 120, "serve")
                if node.poll() is not None:
                    raise RuntimeError((work / "serve.log").read_text()[-3000:])
                for m, mode in enumerate(modes):
                    batch = folders[m * args.studies : (m + 1) * args.studies]
                    rows.append(run_mode(mode, batch, port, destination, node.pid, args.timeout))
                    rows[-1].update(scale=args.scale, vendor=args.vendor, backend=args.backend)
                if node.poll() is not None:
                    raise RuntimeError("serve exited during the run")
    finally:
        destination.stop()
    columns = ["mode", "studies", "scale", "backend", "p50_s", "p95_s", "max_s",
               "studies_per_hour", "serve_peak_rss_gib"]  # fmt: skip
    print_table("End to end: last acknowledgement → SEG + SR at the destination", rows, columns)
    write_result(NAME, rows, args.out)
    return rows


def arrived(destination: Destination, uid: str) -> Callable[[], float | None]:
    return lambda: destination.done_at(uid)


def run_mode(
    mode: str, folders: list[Path], port: int, destination: Destination, pid: int, timeout: float
) -> dict[str, Any]:
    uids = [study_uid(folder) for folder in folders]
    acked: dict[str, float] = {}
    start = time.perf_counter()
    for uid, folder in zip(uids, folders, strict=True):
        storescu(dicom_files(folder), port, NODE_AE)
        acked[uid] = time.perf_counter()
        if mode == "sequential":
            wait_until(arrived(destination, uid), timeout, f"results of {uid}")
    finished = {
        uid: wait_until(arrived(destination, uid), timeout * len(uids), f"results of {uid}")
        for uid in uids
    }
    elapsed = time.perf_counter() - start
    latencies = [finished[uid] - acked[uid] for uid in uids]
    return {
        "mode": mode,
        "studies": len(uids),
        "p50_s": round(percentile(latencies, 50), 2),
        "p95_s": round(percentile(latencies, 95), 2),
        "max_s": round(max(latencies), 2),
        "studies_per_hour": round(3600 * len(uids) / elapsed),
        "serve_peak_rss_gib": round(peak_rss_bytes(pid) / GIB, 2),
        "latencies_s": [round(x, 2) for x in latencies],
    }


if __name__ == "__main__":
    main()
