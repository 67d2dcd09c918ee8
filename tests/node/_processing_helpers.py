"""Shared helpers of the queue, worker, export and scheduler tests.

Instances are put into the database the way the store does it (a file copied under
the data directory, a Study row and an Instance row with the path relative to the data
directory); peers are real (dcmtk's storescp, pynetdicom SCPs) on loopback ports.

Nothing heavy is imported at module level: processes started with the ``spawn``
context import this module to find their target and must start fast.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bac_node.config import Settings
from bac_node.node.db import Database, Instance, Study, open_database, study_by_uid, utcnow

REPO = Path(__file__).resolve().parents[2]
SAMPLE_STUDY = REPO / "sample_dicom" / "study-00000" / "dicom"
MG_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1"}
ALL_VIEWS = ("R-CC", "L-CC", "R-MLO", "L-MLO")


# --- settings, model, studies ---------------------------------------------------------


def node_settings(data_dir: Path, **fields: Any) -> Settings:
    """Test settings: a fast network timeout, everything else as given."""
    return Settings(data_dir=data_dir, **{"network_timeout": 5, "device": "cpu", **fields})


def save_tiny_model(path: Path) -> Path:
    """A real but tiny U-Net (mobilenet_v2, depth 3) with a 1 mm card, saved to ``path``."""
    from bac_node.model.factory import ModelConfig, fixed_seed_model
    from bac_node.model.weights import ModelCard, save_model

    config = ModelConfig(encoder="mobilenet_v2", encoder_depth=3, decoder_channels=(32, 16, 8))
    card = ModelCard(
        name="bac-node-test-tiny", version="0.0.0+test", architecture=config,
        input_spacing_mm=1.0, tile_size=128, tile_overlap=32,
        training_data="none: fixed-seed random weights, for tests",
    )  # fmt: skip
    save_model(path, fixed_seed_model(config, 0).eval(), card)
    return path


def phantom_study(out_dir: Path, seed: int) -> list[Path]:
    """The four For Presentation views of one tiny phantom study (scale 0.05)."""
    from training.phantom.study import plan_studies, render_study, write_study

    plan = plan_studies(1, seed=seed, processing_fraction=0.0, prior_fraction=0.0)[0]
    rows = write_study(render_study(plan, scale=0.05), out_dir)
    return [out_dir / str(row["file"]) for row in rows]


def sample_study() -> list[Path]:
    """The committed 4-view sample study (1024 x 832, Hologic style)."""
    return sorted(SAMPLE_STUDY.rglob("*.dcm"))


# --- the store's part -----------------------------------------------------------------


def store_files(
    db: Database,
    data_dir: Path,
    files: Iterable[Path],
    *,
    received: dt.datetime | None = None,
    study_uid: str | None = None,
) -> str:
    """Store ``files`` as the store would: copy, then Study + Instance rows.

    ``study_uid`` files the instances under another study than their own (a study UID
    mismatch). A SOP instance stored again replaces the row's file and sha256 (the
    store's ``duplicates = "replace"``). The study's ``queued`` is cleared.
    """
    import pydicom

    from bac_node.dicom.reader import read_instance
    from bac_node.errors import BacNodeError

    when = received or utcnow()
    uid = ""
    for source in files:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        uid = study_uid or str(ds.StudyInstanceUID)
        sop_uid = str(ds.SOPInstanceUID)
        analysable = str(ds.SOPClassUID) in MG_SOP_CLASSES
        view = ""
        if analysable:
            try:
                image = read_instance(source)
                view = image.label if image.is_screening_view else ""
            except BacNodeError:
                analysable = False
        relative = Path("instances") / uid / f"{sop_uid}.dcm"
        (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, data_dir / relative)
        sha = hashlib.sha256((data_dir / relative).read_bytes()).hexdigest()
        _row(db, uid, sop_uid, relative, sha, view, analysable, when, ds)
    return uid


def _row(
    db: Database,
    study_uid: str,
    sop_uid: str,
    relative: Path,
    sha: str,
    view: str,
    analysable: bool,
    when: dt.datetime,
    ds: Any = None,
) -> None:
    from sqlalchemy import select

    with db.session() as s:
        study = study_by_uid(s, study_uid)
        if study is None:
            study = Study(study_uid=study_uid, first_received=when, last_received=when)
            s.add(study)
            s.flush()
        existing = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).first()
        if existing is None:
            s.add(
                Instance(
                    sop_instance_uid=sop_uid,
                    study_id=study.id,
                    series_uid=str(ds.SeriesInstanceUID) if ds is not None else "1.2.3",
                    sop_class_uid=str(ds.SOPClassUID) if ds is not None else "1.2.3",
                    transfer_syntax_uid=(
                        str(ds.file_meta.TransferSyntaxUID) if ds is not None else "1.2.3"
                    ),
                    path=str(relative),
                    size_bytes=1,
                    sha256=sha,
                    analysable=analysable,
                    view=view,
                    received_at=when,
                )
            )
            study.instance_count += 1
        else:
            existing.path, existing.sha256 = str(relative), sha
        study.last_received = max(study.last_received, when)
        study.queued = False


def add_rows(
    db: Database,
    study_uid: str,
    views: Sequence[str] = ALL_VIEWS,
    *,
    received: dt.datetime | None = None,
    analysable: bool = True,
    sha: str = "0" * 64,
) -> None:
    """Instance rows without files, for queue tests that never read the images."""
    when = received or utcnow()
    for view in views:
        sop_uid = f"{study_uid}.{ALL_VIEWS.index(view) + 1 if view in ALL_VIEWS else 9}"
        _row(db, study_uid, sop_uid, Path(f"x/{sop_uid}.dcm"), sha, view, analysable, when)


# --- processes ------------------------------------------------------------------------


def claim_until_empty(location: str | Path, owner: str, out: str, start: Any) -> None:
    """Target of the multi-process claim test: claim jobs until none is left.

    ``location``: a data directory (SQLite) or a database URL. ``start`` (a
    multiprocessing Barrier) lines the processes up, so they race.
    """
    from bac_node.node.queue import claim_job

    db = open_database(location)
    claimed = []
    start.wait()
    while (job := claim_job(db, owner, 300, data_dir=Path("/d"))) is not None:
        claimed.append(job.job_id)
        time.sleep(0.01)  # "work": without it one process re-takes the lock every time
    db.dispose()
    Path(out).write_text(json.dumps(claimed))


def slow_worker_main(data_dir: str, model: str, lease_seconds: int, database: str = "") -> None:
    """A worker whose (real) model takes a minute per canvas: killed in the meantime.

    ``database``: the queue's URL (empty: the SQLite file in ``data_dir``)."""
    import numpy as np
    from numpy.typing import NDArray

    from bac_node.model.inference import load_predictor
    from bac_node.node.worker import Worker

    predictor, card, _ = load_predictor(model, device="cpu")

    def slow(canvas: NDArray[np.float32]) -> NDArray[np.float32]:
        time.sleep(60)
        return predictor(canvas)

    settings = node_settings(Path(data_dir), lease_seconds=lease_seconds, database=database)
    db = open_database(settings.database or settings.data_dir)
    Worker(settings, db, predictor=slow, card=card, owner="doomed").run_once()


# --- peers ----------------------------------------------------------------------------


def require_tool(name: str) -> str:
    """phantom_fixtures.require_tool, imported late: spawned worker processes import this
    module with only tests/node on their path."""
    from phantom_fixtures import require_tool as require

    return require(name)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class StoreSCP:
    """dcmtk's ``storescp`` writing what it receives into a folder."""

    def __init__(self, out_dir: Path, ae_title: str, port: int, *extra: str) -> None:
        tool = require_tool("storescp")
        self.out_dir, self.ae_title, self.port = out_dir, ae_title, port
        out_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [tool, "-aet", ae_title, "-od", str(out_dir), *extra, str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        echoscu = require_tool("echoscu")

        def answers() -> bool:
            if self.process.poll() is not None:
                pytest.fail(
                    f"storescp exited: {self.process.stderr.read() if self.process.stderr else ''}"
                )
            return (
                subprocess.run(
                    [echoscu, "-aec", ae_title, "127.0.0.1", str(port)],
                    capture_output=True,
                    check=False,
                    timeout=10,
                ).returncode
                == 0
            )

        wait_for(answers, 20, "storescp to answer C-ECHO")

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def received(self) -> dict[str, str]:
        """SOP Instance UID → SOP Class UID of every file received."""
        import pydicom

        found = {}
        for path in self.out_dir.iterdir():
            if path.is_file():
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                found[str(ds.SOPInstanceUID)] = str(ds.SOPClassUID)
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


def dciodvfy_errors(path: Path, iod: str) -> list[str]:
    """The ``Error`` lines dciodvfy reports for ``path``, which it must read as ``iod``."""
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    lines = (run.stdout + run.stderr).splitlines()
    assert lines and lines[0] == iod, f"dciodvfy did not read {path.name} as {iod}: {lines[:3]}"
    return [line for line in lines if line.startswith("Error")]
