"""``bac-node demo``: the sample study end to end through the node.

What it does, in the order a PACS would see it:

1. Makes a fresh data directory (``OUT/node``) for a node of its own and starts a
   receiving storage SCP (``DEMO-RECEIVER``, writing into ``OUT/received``), both on free
   loopback ports.
2. Starts the node (SCP, scheduler, one worker, exporter) on that data directory with
   the shipped model. The demo's node allows only its own sender (``DEMO-SENDER``) and
   its receiver, and sends results to the receiver.
3. Sends the sample study (``sample_dicom/``, or the built-in recipe when it is not at
   hand) over C-STORE from ``DEMO-SENDER``.
4. Waits until the SEG objects and the SR come back to the receiver, prints the result
   table and where the files are, stops the node and exits 0.

Everything it prints names images by UID. Research use only; not for clinical use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from bac_node.config import Settings
from bac_node.errors import BacNodeError, StudyError

log = logging.getLogger(__name__)

SENDER_AE = "DEMO-SENDER"
RECEIVER_AE = "DEMO-RECEIVER"
#: How long the demo waits for results (a CPU analysis of the sample takes seconds to
#: a minute; a cold start of torch on a slow disk can take longer).
WAIT_SECONDS = 900.0


@dataclass
class DemoOutcome:
    summary: dict[str, Any]
    received: list[Path]
    out: Path
    node_data: Path
    seconds: float

    def table(self) -> str:
        s = self.summary
        model = s.get("model", {})
        lines = [
            f"Study {s['study_instance_uid']}",
            f"model {model.get('name', '?')} {model.get('version', '?')}; "
            "research use only, not for clinical use",
            f"{'image (SOP Instance UID)':<66} {'side':>4} {'view':>4} {'area %':>7} grade",
        ]
        for image in s["images"]:
            lines.append(
                f"{image['sop_instance_uid']:<66} {image['laterality']:>4} {image['view']:>4} "
                f"{image['bac_area_percent']:>7.3f} {image['grade']:>5}"
            )
        for side, value in s["sides"].items():
            lines.append(
                f"side {side}: BAC {value['bac_area_percent']:.3f} % of breast, "
                f"grade {value['grade']}"
            )
        flag = "Grade 3 cardiovascular flag RAISED" if s["cardiovascular_flag"] else "no flag"
        lines.append(f"study grade {s['study_grade']} ({flag})")
        for item in s.get("not_analysed", []):
            lines.append(f"not analysed: {item['source']}: {item['reason']}")
        lines.append(
            f"{len(self.received)} objects came back over C-STORE in {self.seconds:.1f} s "
            f"(SEG per image + SR): {self.out / 'received'}"
        )
        lines.append(f"node data (instances, queue, results): {self.node_data}")
        return "\n".join(lines)


def _ensure_sample(
    input_dir: Path | None, out: Path, recipe: Mapping[str, Any]
) -> tuple[Path, str]:
    if input_dir is not None:
        if not (input_dir / "manifest.json").is_file():
            raise StudyError(f"{input_dir}: no manifest.json (make one with `bac-node synth`)")
        return input_dir, str(input_dir)
    default = Path("sample_dicom")
    if (default / "manifest.json").is_file():
        return default, str(default)
    from training.phantom.study import plan_studies, synthesize

    log.info("sample_dicom/ not found here; generating the sample study in %s", out / "sample")
    plans = plan_studies(
        int(recipe["studies"]), int(recipe["seed"]), vendor=str(recipe["vendor"]),
        grades=dict(recipe["grades"]), prior_fraction=0.0, processing_fraction=0.0,
    )  # fmt: skip
    synthesize(plans, out / "sample", scale=float(recipe["scale"]), progress=False)
    return out / "sample", "generated from the built-in sample recipe"


def _study_files(source_dir: Path) -> tuple[str, list[Path]]:
    from training.phantom.study import read_manifest

    rows = read_manifest(source_dir)
    if not rows:
        raise StudyError(f"{source_dir}: the manifest lists no image")
    first = rows[0]["study"]
    rows = [r for r in rows if r["study"] == first]
    return str(rows[0]["study_instance_uid"]), [source_dir / str(r["file"]) for r in rows]


def _fresh_dir(path: Path, marker: str | None) -> None:
    """Empty ``path`` if it is the demo's own (holds ``marker``, or always when ``marker``
    is None); refuse anything else."""
    if path.exists() and any(path.iterdir()):
        if marker is not None and not (path / marker).exists():
            raise BacNodeError(f"{path} exists and is not a bac-node demo directory; use --out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


class Receiver:
    """A storage SCP that writes what it receives under ``directory/<StudyUID>/``."""

    def __init__(self, directory: Path) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.directory = directory
        self.files: list[Path] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=RECEIVER_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None  # block=False always returns the server
        self._server = server
        self.port = int(server.server_address[1])

    def _on_store(self, event: Any) -> int:
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        folder = self.directory / str(ds.StudyInstanceUID)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            if path not in self.files:
                self.files.append(path)
        return 0x0000

    def shutdown(self) -> None:
        self._server.shutdown()


def send_study(files: list[Path], port: int, called_ae: str) -> list[int]:
    """C-STORE ``files`` in one association from ``DEMO-SENDER``; the statuses."""
    from pynetdicom import AE

    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=SENDER_AE)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    if not assoc.is_established:
        raise BacNodeError(f"the demo node at 127.0.0.1:{port} refused the association")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(getattr(status, "Status", 0xFFFF)))
    finally:
        assoc.release()
    return statuses


def run_demo(
    input_dir: Path | None, out: Path, recipe: Mapping[str, Any], settings: Settings
) -> DemoOutcome:
    from bac_node.node.db import DATABASE_FILE, Job, open_database, study_by_uid
    from bac_node.node.service import Node

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    source_dir, _ = _ensure_sample(input_dir, out, recipe)
    study_uid, files = _study_files(source_dir)
    node_data, received_dir = out / "node", out / "received"
    _fresh_dir(node_data, DATABASE_FILE)
    _fresh_dir(received_dir, None)  # only ever holds what the demo received
    receiver = Receiver(received_dir)
    node_settings = dataclasses.replace(
        settings,
        data_dir=node_data,
        database="",  # the demo's own fresh SQLite database, whatever `database` says
        allowed_peers=(SENDER_AE,),
        destinations=(f"{RECEIVER_AE}@127.0.0.1:{receiver.port}",),
        stable_after=10,
        min_free_mb=min(settings.min_free_mb, 50),
        http_port=-1,  # the demo talks DIMSE only; a configured port may be serve's own
    )
    node = Node(node_settings, host="127.0.0.1", port=0)
    try:
        node.start()
        statuses = send_study(files, node.bound_port, node_settings.ae_title)
        failed = [f"{f.name}: 0x{s:04X}" for f, s in zip(files, statuses, strict=True) if s]
        if failed:
            raise BacNodeError(f"the node did not store every image ({', '.join(failed)})")
        db = open_database(node_data)
        deadline = time.monotonic() + WAIT_SECONDS
        summary: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            with db.read() as session:
                study = study_by_uid(session, study_uid)
                jobs: list[Job] = list(study.jobs) if study else []
                if any(j.state == "failed" for j in jobs):
                    error = next(j.last_error for j in jobs if j.state == "failed")
                    raise BacNodeError(f"the analysis of study {study_uid} failed: {error}")
                done = [j for j in jobs if j.state == "done" and j.result is not None]
                if done and summary is None:
                    result_dir = node_data / done[-1].result.path  # type: ignore[union-attr]
                    summary = json.loads((result_dir / "summary.json").read_text())
            if summary is not None:
                expected = len(summary["images"]) + 1
                if len(receiver.files) >= expected:
                    break
            time.sleep(0.2)
        else:
            raise BacNodeError(
                f"no result came back within {WAIT_SECONDS:.0f} s; see `bac-node --data-dir "
                f"{node_data} status`"
            )
        db.dispose()
    finally:
        node.stop()
        receiver.shutdown()
    return DemoOutcome(
        summary=summary,
        received=sorted(receiver.files),
        out=out,
        node_data=node_data,
        seconds=time.perf_counter() - started,
    )
