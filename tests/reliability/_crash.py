"""The crash harness: senders, `bac-node serve` killed with SIGKILL and restarted, the tally.

Shared by ``test_crash.py`` (CI size), ``test_worker_crash.py``, ``test_load.py`` and
``benchmarks/bench_crash.py`` (full size). What it does, in order:

1. **Studies**: ``studies`` tiny 4-view screening studies, each the committed sample
   study subsampled ``factor`` times (128 x 104 pixels at 8) with new Study, Series and
   SOP Instance UIDs: every study is complete and analysable.
2. **The node**: ``bac-node serve --workers 0`` (SCP, scheduler, exporter; it restarts
   in about 4 s, where a serve that loads the model takes 12-16 s on this machine) and
   one ``bac-node worker`` process with the tiny test model, both on one data
   directory; results go to dcmtk's ``storescp`` with ``--unique-filenames`` (every copy
   received is kept, so a re-sent object is visible). ``stable_after`` is an hour: a
   study is analysed only when its four views are in, so a kill that delays a study's
   last instance cannot make a result of three images (that would be a second result
   set by design, not a fault).
3. **Senders**: ``senders`` threads, each a pynetdicom SCU with its share of the
   studies, sending as fast as the node answers (unpaced: the node is down for most of
   each kill cycle, so ingestion spans many kills by itself). A store counts as
   acknowledged when its C-STORE response says Success (0x0000). Anything else (no
   association, an abort, a failure status, no response) leaves the instance pending
   and the sender retries it on a new association; an acknowledged instance is not sent
   again.
4. **Kills**: ``kills`` times, at a uniformly random moment ``gap`` seconds after the
   node answers again, SIGKILL to ``serve`` (and, one time in three, to the worker too),
   then a restart. Kills continue after ingestion ends, so they also land in analyses
   and exports.
5. **Settling**: the node runs unkilled until every study's results are at the
   destination (or ``settle_timeout``), then stops with SIGTERM.

The tally (:class:`Tally`) reads the database and the data directory after the stop and
the destination's files. ``problems()`` lists each broken promise:

- an acknowledged instance not in the database, or in it without its file;
- a file under ``instances/`` without a row, or a row whose file is missing or differs
  from its recorded sha256;
- a study without exactly one result set at the destination (one SR and one SEG per
  image, by distinct SOP Instance UID), or with objects of a second result set;
- a SOP instance received twice with different content;
- more re-deliveries (copies of an object already received) than the kills can
  explain: each kill interrupts at most the export in flight (one result: 5 objects).

Re-deliveries of identical objects are counted but allowed: a kill after the destination
stored an object and before the node recorded the export as done makes the node send
it again, and DIMSE has no way to ask a storescp whether it has it. SEG/SR SOP Instance
UIDs are deterministic, so the destination gets the same instance again (a PACS keeps
one), never a second result set. RELIABILITY.md records this decision.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from bac_node.node.db import Instance, Job, Result, open_database

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SAMPLE_STUDY = REPO / "sample_dicom" / "study-00000" / "dicom"
NODE_AE, SENDER_AE, DEST_AE = "BACNODE", "CRASHSCU", "CRASHDEST"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
LOOPBACK = "127.0.0.1"
#: Objects of one result set of a 4-view study: a SEG per image and one SR.
RESULT_OBJECTS = 5


# --- studies ------------------------------------------------------------------------


def tiny_studies(count: int, factor: int = 8, seed: int = 0) -> list[list[Dataset]]:
    """``count`` complete 4-view studies made from the sample study, new UIDs each."""
    rng = random.Random(seed)
    views: list[Dataset] = []
    for path in sorted(SAMPLE_STUDY.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        pixels = np.ascontiguousarray(ds.pixel_array[::factor, ::factor])
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
            if keyword in ds:
                ds[keyword].value = [float(v) * factor for v in ds[keyword].value]
        views.append(ds)
    assert len(views) == 4, "the sample study has four views"
    studies: list[list[Dataset]] = []
    for _ in range(count):
        study_uid = generate_uid(prefix="2.25.", entropy_srcs=[str(rng.random())])
        study: list[Dataset] = []
        for view in views:
            instance = copy.deepcopy(view)
            instance.StudyInstanceUID = study_uid
            instance.SeriesInstanceUID = generate_uid(
                prefix="2.25.", entropy_srcs=[str(rng.random())]
            )
            instance.SOPInstanceUID = generate_uid(prefix="2.25.", entropy_srcs=[str(rng.random())])
            instance.file_meta.MediaStorageSOPInstanceUID = instance.SOPInstanceUID
            study.append(instance)
        studies.append(study)
    return studies


# --- processes ----------------------------------------------------------------------


def node_env(model: Path, **settings: Any) -> dict[str, str]:
    """The environment of `bac-node` children: settings as ``BAC_NODE_*`` variables."""
    env = dict(
        os.environ, BAC_NODE_ALLOCATOR_TUNED="1", BAC_NODE_MODEL=str(model),
        BAC_NODE_DEVICE="cpu", BAC_NODE_MIN_FREE_MB="1",
    )  # fmt: skip
    env.update({f"BAC_NODE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Child:
    """A `bac-node` subprocess that can be started again after SIGKILL; log appended."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = list(args), env, log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Child:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"\n=== start {self.starts + 1} at {time.time():.3f} ===\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bac_node", *self.args], env=self.env, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(sig)

    def kill9(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL after ``timeout`` (then the exit code is negative)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGUSR1)  # its stacks, into the log
                time.sleep(1)
                self.kill9()
        return self.process.returncode

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def serve_child(data_dir: Path, port: int, env: dict[str, str], workers: int = 0) -> Child:
    args = ["--data-dir", str(data_dir), "--port", str(port), "--ae-title", NODE_AE,
            "serve", "--host", LOOPBACK, "--workers", str(workers)]  # fmt: skip
    return Child(args, env, data_dir.parent / f"{data_dir.name}-serve.log")


def worker_child(data_dir: Path, env: dict[str, str], name: str = "worker") -> Child:
    return Child(["--data-dir", str(data_dir), "worker"], env, data_dir.parent / f"{name}.log")


def wait_for_port(port: int, timeout: float, alive: Callable[[], bool], log: Child) -> float:
    """Seconds until ``port`` accepts connections; RuntimeError if the process died."""
    import socket

    start = time.monotonic()
    while True:
        if not alive():
            raise RuntimeError(f"serve exited before listening\n{log.tail()}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"serve not listening after {timeout:g} s\n{log.tail()}")
        time.sleep(0.05)


def wait_for_log(child: Child, text: str, timeout: float, since: int = 0) -> float:
    """Seconds until ``text`` appears in the child's log after offset ``since``.

    For waiting on ``serve`` without probing its port: a TCP connection that closes
    without an A-ASSOCIATE-RQ holds one of the ``max_associations`` slots until
    ``network_timeout`` (pynetdicom's acceptor waits that long; see RELIABILITY.md).
    """
    start = time.monotonic()
    while True:
        log = child.log.read_text(errors="replace") if child.log.exists() else ""
        if text in log[since:]:
            return time.monotonic() - start
        if not child.alive():
            raise RuntimeError(f"{child.args[-1]} exited\n{child.tail()}")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"no {text!r} after {timeout:g} s\n{child.tail()}")
        time.sleep(0.05)


LISTENING = "bac-node listening as"


# --- senders ------------------------------------------------------------------------


@dataclass
class SenderStats:
    acknowledged: set[str] = field(default_factory=set)
    attempts: int = 0
    """C-STORE requests sent (first sends and retries)."""
    not_acknowledged: int = 0
    """Requests answered otherwise or not at all (then retried)."""
    refused_associations: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Senders:
    """``count`` sender threads sharing ``studies``; retry until every store is acknowledged."""

    def __init__(
        self, studies: list[list[Dataset]], port: int, count: int, interval: float = 0.0
    ) -> None:
        self.port, self.interval = port, interval
        self.stats = SenderStats()
        self.shares = [[ds for study in studies[i::count] for ds in study] for i in range(count)]
        self.threads = [
            threading.Thread(target=self._run, args=(share,), name=f"sender-{i}", daemon=True)
            for i, share in enumerate(self.shares)
        ]
        self.stop = threading.Event()
        self.started = 0.0
        self.finished: float | None = None

    def start(self) -> Senders:
        self.started = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def running(self) -> bool:
        alive = any(t.is_alive() for t in self.threads)
        if not alive and self.finished is None:
            self.finished = time.monotonic()
        return alive

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0.1))

    def _run(self, share: list[Dataset]) -> None:
        ae = AE(ae_title=SENDER_AE)
        ae.add_requested_context(MG_FOR_PRESENTATION, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        pending = list(share)
        while pending and not self.stop.is_set():
            assoc = ae.associate(LOOPBACK, self.port, ae_title=NODE_AE)
            if not assoc.is_established:
                with self.stats.lock:
                    self.stats.refused_associations += 1
                time.sleep(0.5)  # the node is restarting: ask again, gently
                continue
            try:
                while pending and assoc.is_established and not self.stop.is_set():
                    ds = pending[0]
                    with self.stats.lock:
                        self.stats.attempts += 1
                    try:
                        answer = assoc.send_c_store(ds)
                    except (RuntimeError, OSError, ValueError):
                        answer = Dataset()
                    status = int(answer.Status) if "Status" in answer else None
                    with self.stats.lock:
                        self.stats.statuses["none" if status is None else f"0x{status:04X}"] += 1
                        if status == 0x0000:
                            self.stats.acknowledged.add(str(ds.SOPInstanceUID))
                        else:
                            self.stats.not_acknowledged += 1
                    if status == 0x0000:
                        pending.pop(0)
                        if self.interval:
                            time.sleep(self.interval)
                    else:
                        break  # a new association for the retry
            finally:
                if assoc.is_established:
                    assoc.release()


# --- the destination and the tally --------------------------------------------------


@dataclass
class Delivery:
    sop_uid: str
    study_uid: str
    modality: str
    content: str
    """sha256 of the data set without its file meta (the receiver writes its own)."""


def deliveries(files: Sequence[Path]) -> list[Delivery]:
    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        del ds.file_meta
        body = ds.to_json()
        out.append(
            Delivery(
                sop_uid=str(ds.SOPInstanceUID),
                study_uid=str(ds.StudyInstanceUID),
                modality=str(ds.Modality),
                content=hashlib.sha256(body.encode()).hexdigest(),
            )
        )
    return out


def result_sets_complete(files: Sequence[Path], study_uids: Sequence[str]) -> bool:
    """Every study has ``RESULT_OBJECTS`` distinct objects at the destination."""
    per_study: dict[str, set[str]] = defaultdict(set)
    for path in files:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"]
        )
        per_study[str(ds.StudyInstanceUID)].add(str(ds.SOPInstanceUID))
    return all(len(per_study.get(uid, ())) >= RESULT_OBJECTS for uid in study_uids)


@dataclass
class Tally:
    """What the run left: at the senders, in the data directory, at the destination."""

    sent: set[str]
    acknowledged: set[str]
    rows: dict[str, tuple[str, str]]
    """SOP Instance UID → (path relative to the data directory, recorded sha256)."""
    files: set[str]
    """``instances/**/*.dcm`` relative to the data directory."""
    temporary_files: int
    bad_files: list[str]
    """Rows whose file is missing or whose bytes differ from the recorded sha256."""
    study_uids: list[str]
    delivered: list[Delivery]
    jobs: Counter[str]
    results: int
    kills: int

    @classmethod
    def read(
        cls, data_dir: Path, studies: list[list[Dataset]], stats: SenderStats,
        received: Sequence[Path], kills: int,
    ) -> Tally:  # fmt: skip
        db = open_database(data_dir)
        try:
            with db.read() as session:
                rows = {
                    sop: (path, sha)
                    for sop, path, sha in session.execute(
                        select(Instance.sop_instance_uid, Instance.path, Instance.sha256)
                    )
                }
                jobs = Counter(state for (state,) in session.execute(select(Job.state)))
                results = len(list(session.scalars(select(Result.id))))
        finally:
            db.dispose()
        instances = data_dir / "instances"
        files = {p.relative_to(data_dir).as_posix() for p in instances.rglob("*.dcm")}
        temporary = sum(1 for p in instances.rglob("*.tmp")) if instances.exists() else 0
        bad = []
        for sop, (path, sha) in rows.items():
            full = data_dir / path
            if not full.is_file() or hashlib.sha256(full.read_bytes()).hexdigest() != sha:
                bad.append(sop)
        return cls(
            sent={str(ds.SOPInstanceUID) for study in studies for ds in study},
            acknowledged=set(stats.acknowledged), rows=rows, files=files,
            temporary_files=temporary, bad_files=bad,
            study_uids=[str(study[0].StudyInstanceUID) for study in studies],
            delivered=deliveries(received), jobs=jobs, results=results, kills=kills,
        )  # fmt: skip

    # --- figures ---

    def per_study(self) -> dict[str, dict[str, set[str]]]:
        """Study → modality → distinct SOP Instance UIDs received."""
        out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for d in self.delivered:
            out[d.study_uid][d.modality].add(d.sop_uid)
        return out

    def one_result_set(self) -> list[str]:
        """Studies with exactly one result set: one SR, one SEG per image, nothing more."""
        per = self.per_study()
        return [
            uid for uid in self.study_uids
            if uid in per and len(per[uid]["SR"]) == 1
            and len(per[uid]["SEG"]) == RESULT_OBJECTS - 1 and set(per[uid]) == {"SEG", "SR"}
        ]  # fmt: skip

    def redeliveries(self) -> int:
        """Copies received of objects received before (identical re-sends)."""
        copies = Counter(d.sop_uid for d in self.delivered)
        return sum(n - 1 for n in copies.values())

    def conflicting(self) -> list[str]:
        """SOP Instance UIDs received with two different contents."""
        contents: dict[str, set[str]] = defaultdict(set)
        for d in self.delivered:
            contents[d.sop_uid].add(d.content)
        return [uid for uid, c in contents.items() if len(c) > 1]

    def figures(self) -> dict[str, Any]:
        row_paths = {path for path, _ in self.rows.values()}
        return {
            "studies": len(self.study_uids),
            "instances": len(self.sent),
            "kills": self.kills,
            "acknowledged": len(self.acknowledged),
            "in_database": len(self.rows),
            "on_disk": len(self.files),
            "acknowledged_not_stored": len(self.acknowledged - set(self.rows)),
            "files_without_row": len(self.files - row_paths),
            "rows_without_good_file": len(self.bad_files),
            "temporary_files_left": self.temporary_files,
            "studies_one_result_set": len(self.one_result_set()),
            "objects_received": len(self.delivered),
            "redeliveries": self.redeliveries(),
            "conflicting_objects": len(self.conflicting()),
            "jobs": dict(self.jobs),
            "results": self.results,
        }

    def problems(self) -> list[str]:
        f = self.figures()
        out = []
        lost = sorted(self.acknowledged - set(self.rows))
        if lost:
            out.append(f"{len(lost)} acknowledged instance(s) not in the database: {lost[:3]}")
        if self.bad_files:
            out.append(f"{len(self.bad_files)} row(s) whose file is missing or differs: "
                       f"{self.bad_files[:3]}")  # fmt: skip
        if f["files_without_row"]:
            out.append(f"{f['files_without_row']} file(s) under instances/ without a row")
        if f["in_database"] != f["on_disk"]:
            out.append(f"{f['in_database']} rows but {f['on_disk']} files")
        missing = sorted(set(self.study_uids) - set(self.one_result_set()))
        if missing:
            per = self.per_study()
            shown = {uid: {m: len(s) for m, s in per.get(uid, {}).items()} for uid in missing[:3]}
            out.append(f"{len(missing)} studies without exactly one result set: {shown}")
        if self.conflicting():
            out.append(f"objects received with different contents: {self.conflicting()[:3]}")
        if self.redeliveries() > RESULT_OBJECTS * max(self.kills, 1):
            out.append(f"{self.redeliveries()} re-deliveries for {self.kills} kill(s): more than "
                       f"the exports in flight at the kills")  # fmt: skip
        return out


# --- the run ------------------------------------------------------------------------


@dataclass
class CrashRun:
    tally: Tally
    seconds: float
    restarts: list[float]
    """Seconds from each (re)start of serve until it listened."""
    kills_during_ingest: int
    worker_kills: int
    ingest_seconds: float
    settle_seconds: float
    sender: SenderStats
    serve_log: Path

    def figures(self) -> dict[str, Any]:
        restarts = sorted(self.restarts)
        return {
            **self.tally.figures(),
            "kills_during_ingest": self.kills_during_ingest,
            "worker_kills": self.worker_kills,
            "store_attempts": self.sender.attempts,
            "not_acknowledged_answers": self.sender.not_acknowledged,
            "refused_associations": self.sender.refused_associations,
            "restart_median_s": round(restarts[len(restarts) // 2], 1) if restarts else None,
            "ingest_s": round(self.ingest_seconds, 1),
            "settle_s": round(self.settle_seconds, 1),
            "total_s": round(self.seconds, 1),
        }


def crash_run(
    work: Path,
    model: Path,
    dest: Any,
    *,
    studies: int,
    kills: int,
    senders: int = 4,
    gap: tuple[float, float] = (0.5, 2.5),
    seed: int = 0,
    settle_timeout: float = 300.0,
    factor: int = 8,
    worker_kill_every: int = 3,
    log: Callable[[str], None] = lambda _: None,
) -> CrashRun:
    """One crash-safety run (see the module docstring); ``dest`` a started peers.StoreSCP."""
    rng = random.Random(seed)
    made = tiny_studies(studies, factor=factor, seed=seed)
    data_dir = work / "node"
    port = free_port()
    env = node_env(
        model, allowed_peers=SENDER_AE, destinations=dest.destination, stable_after=3600,
        lease_seconds=4, network_timeout=3, export_backoff=1, export_backoff_cap=2,
    )  # fmt: skip
    serve = serve_child(data_dir, port, env)
    worker = worker_child(data_dir, env)
    start = time.monotonic()
    restarts = [wait_for_port(port, 120, serve.start().alive, serve)]
    worker.start()
    sending = Senders(made, port, senders).start()
    during_ingest = worker_kills = 0
    try:
        for k in range(kills):
            time.sleep(rng.uniform(*gap))
            ingesting = sending.running()
            serve.kill9()
            during_ingest += ingesting
            if worker_kill_every and k % worker_kill_every == worker_kill_every - 1:
                worker.kill9()
                worker.start()  # loads its model in the background
                worker_kills += 1
            restarts.append(wait_for_port(port, 120, serve.start().alive, serve))
            log(f"kill {k + 1}/{kills} ({'ingesting' if ingesting else 'after ingest'}); "
                f"{len(sending.stats.acknowledged)} acknowledged")  # fmt: skip
        sending.join(settle_timeout)
        sending.running()
        ingest_end = time.monotonic()
        uids = [str(s[0].StudyInstanceUID) for s in made]
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline and not result_sets_complete(dest.received(), uids):
            time.sleep(1.0)
        time.sleep(2.0)  # exports in flight land, and a re-send would show
        settle_end = time.monotonic()
    finally:
        sending.stop.set()
        serve.stop()
        worker.stop()
    tally = Tally.read(data_dir, made, sending.stats, dest.received(), kills)
    return CrashRun(
        tally=tally, seconds=time.monotonic() - start, restarts=restarts,
        kills_during_ingest=during_ingest, worker_kills=worker_kills,
        ingest_seconds=(sending.finished or ingest_end) - sending.started,
        settle_seconds=settle_end - ingest_end, sender=sending.stats, serve_log=serve.log,
    )  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# --- load ---------------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    """Peak resident memory (VmHWM) of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for process {pid}")


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


@dataclass
class LoadRun:
    associations: int
    per_association: int
    statuses: Counter[str]
    refused: list[str]
    """Associations that were not established, with the reason pynetdicom reports."""
    most_at_once: int
    """Most associations established at the same moment (counted by the senders)."""
    seconds: float


def load_run(port: int, associations: int, per_association: int, seed: int = 0) -> LoadRun:
    """``associations`` senders at once, each one association of ``per_association`` stores.

    Every sender associates first; all wait until every one is established (or refused)
    before the stores begin, so the associations really are concurrent.
    """
    studies = tiny_studies((associations * per_association + 3) // 4, factor=8, seed=seed)
    instances = [ds for study in studies for ds in study]
    shares = [instances[i::associations][:per_association] for i in range(associations)]
    statuses: Counter[str] = Counter()
    refused: list[str] = []
    lock = threading.Lock()
    established = [0, 0]  # now, most
    barrier = threading.Barrier(associations)

    def send(share: list[Dataset]) -> None:
        ae = AE(ae_title=SENDER_AE)
        ae.add_requested_context(MG_FOR_PRESENTATION, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AE)
        with lock:
            if assoc.is_established:
                established[0] += 1
                established[1] = max(established)
            else:
                refused.append(rejection(assoc))
        barrier.wait(timeout=300)
        if not assoc.is_established:
            return
        try:
            for ds in share:
                try:
                    answer = assoc.send_c_store(ds)
                except RuntimeError:  # the association is gone: count the rest as unanswered
                    answer = Dataset()
                status = int(answer.Status) if "Status" in answer else None
                with lock:
                    statuses["none" if status is None else f"0x{status:04X}"] += 1
        finally:
            with lock:
                established[0] -= 1
            if assoc.is_established:
                assoc.release()

    threads = [threading.Thread(target=send, args=(share,), daemon=True) for share in shares]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return LoadRun(
        associations=associations, per_association=per_association, statuses=statuses,
        refused=refused, most_at_once=established[1], seconds=time.monotonic() - start,
    )  # fmt: skip


def rejection(assoc: Any) -> str:
    """How an association request ended: 'rejected (result, source, diagnostic)' or other."""
    if assoc.is_rejected:
        p = assoc.acceptor.primitive
        return f"rejected ({p.result}, {p.result_source}, {p.diagnostic})"
    if assoc.is_aborted:
        return "aborted"
    return "no answer"
