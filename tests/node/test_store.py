"""The instance store: durable files and rows, duplicates, failures that leave nothing behind.

The store is called directly here (no DICOM peer is involved: the SCP tests send through
dcmtk and pynetdicom). Failures of the disk and the database are provoked for real where
that is cheap (a free-space threshold above the disk's free space, a trigger or a commit
hook in the real SQLite database) and by replacing pydicom's writer only for ENOSPC.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from _ingest_helpers import (
    MG_FOR_PRESENTATION,
    PATIENT_ID,
    PATIENT_NAME,
    expected_name,
    files_under,
    ingest_settings,
    instance_rows,
    lazily_unparseable,
    non_image,
    read,
    sample_files,
    set_queued,
    sha256_of,
    study_row,
    syntax_of,
    truncated_pixels,
    with_new_uid,
)
from pydicom.dataset import Dataset
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

import bac_node.node.store as store_module
from bac_node.config import Settings
from bac_node.node.db import Database, open_database
from bac_node.node.store import (
    BASIC_TEXT_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    ERROR_COMMENT_MAX,
    IMPLEMENTATION_CLASS_UID,
    NOT_ANALYSED_COMMENT,
    SECONDARY_CAPTURE,
    SEGMENTATION,
    InstanceStore,
    StoreOutcome,
)

Make = Callable[..., tuple[InstanceStore, Database]]


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Make]:
    """A factory of stores over ``tmp_path / "data"`` (settings overridable)."""
    opened: list[Database] = []

    def make(**fields: Any) -> tuple[InstanceStore, Database]:
        settings = ingest_settings(tmp_path / "data", **fields)
        db = open_database(settings.data_dir)
        opened.append(db)
        return InstanceStore(settings, db), db

    yield make
    for db in opened:
        db.dispose()


def put(store: InstanceStore, ds: Dataset, **kwargs: Any) -> StoreOutcome:
    options: dict[str, Any] = {"calling_ae": "MODALITY", **kwargs}
    return store.store(ds, transfer_syntax_uid=syntax_of(ds), **options)


def instances_dir(store: InstanceStore) -> Path:
    return store.settings.data_dir / "instances"


# --- a stored instance -------------------------------------------------------------------


def test_success_means_a_part10_file_and_a_committed_row(make_store: Make) -> None:
    store, db = make_store()
    source = sample_files()[0]
    ds = read(source)
    original_pixels = bytes(ds.PixelData)

    outcome = put(store, ds, expected_sop_class=MG_FOR_PRESENTATION)

    assert (outcome.status, outcome.stored, outcome.duplicate, outcome.analysable) == (
        0x0000, True, False, True,
    )  # fmt: skip
    assert outcome.sop_instance_uid == ds.SOPInstanceUID
    assert outcome.study_uid == ds.StudyInstanceUID
    [row] = instance_rows(db)
    path = store.settings.data_dir / row.path
    assert files_under(instances_dir(store)) == [path]  # no temporary file left
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    assert (row.size_bytes, row.sha256) == (len(raw), sha256_of(path))
    assert (row.view, row.analysable, row.calling_ae, row.protocol) == (
        "R-CC", True, "MODALITY", "dimse",
    )  # fmt: skip
    assert row.transfer_syntax_uid == syntax_of(ds)
    assert row.sop_class_uid == MG_FOR_PRESENTATION
    assert row.series_uid == ds.SeriesInstanceUID

    stored = pydicom.dcmread(path)
    meta = stored.file_meta
    assert meta.MediaStorageSOPClassUID == MG_FOR_PRESENTATION
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.TransferSyntaxUID == syntax_of(ds)
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert str(meta.ImplementationVersionName).startswith("BAC_NODE_")
    assert meta.SourceApplicationEntityTitle == "MODALITY"
    assert stored.PixelData == original_pixels

    study = study_row(db, ds.StudyInstanceUID)
    assert study is not None
    assert (study.instance_count, study.queued) == (1, False)
    assert study.last_received == row.received_at


def test_file_name_is_a_hash_of_the_uids(make_store: Make) -> None:
    store, db = make_store()
    ds = read(sample_files()[1])
    assert put(store, ds).status == 0x0000
    [row] = instance_rows(db)
    path = Path(row.path)
    assert path.name == expected_name(ds)
    assert path.parts == ("instances", path.name[:2], path.name)
    assert str(ds.SOPInstanceUID) not in row.path
    assert str(ds.StudyInstanceUID) not in row.path


def test_a_study_counts_its_instances(make_store: Make) -> None:
    store, db = make_store()
    datasets = [read(source) for source in sample_files()]
    assert [put(store, ds).status for ds in datasets] == [0x0000] * 4
    assert sorted(row.view for row in instance_rows(db)) == ["L-CC", "L-MLO", "R-CC", "R-MLO"]
    study = study_row(db, datasets[0].StudyInstanceUID)
    assert study is not None and study.instance_count == 4


def test_log_names_uids_never_the_patient(
    make_store: Make, caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = make_store()
    caplog.set_level(logging.INFO)
    good, bad = read(sample_files()[0]), truncated_pixels(sample_files()[1])
    put(store, good)
    put(store, bad)
    lines = [r for r in caplog.records if r.name == "bac_node.node.store"]
    info = [r.getMessage() for r in lines if r.levelno == logging.INFO]
    assert any(good.SOPInstanceUID in m and good.StudyInstanceUID in m for m in info), info
    warnings = [r.getMessage() for r in lines if r.levelno == logging.WARNING]
    assert any(bad.SOPInstanceUID in m for m in warnings), warnings
    everything = caplog.text
    assert PATIENT_NAME not in everything and "Doe" not in everything
    assert PATIENT_ID not in everything


# --- duplicates --------------------------------------------------------------------------


def test_duplicate_keep_first_writes_nothing_and_leaves_the_queue_alone(
    make_store: Make,
) -> None:
    store, db = make_store(duplicates="keep-first")
    first = read(sample_files()[0])
    assert put(store, first).status == 0x0000
    [before] = instance_rows(db)
    path = store.settings.data_dir / before.path
    content = path.read_bytes()
    set_queued(db, first.StudyInstanceUID)  # a job was made for the study meanwhile

    again = read(sample_files()[0])
    again.InstitutionName = "changed on the second send"
    outcome = put(store, again)

    assert (outcome.status, outcome.stored, outcome.duplicate) == (0x0000, True, True)
    [after] = instance_rows(db)
    assert (after.sha256, after.size_bytes, after.received_at) == (
        before.sha256, before.size_bytes, before.received_at,
    )  # fmt: skip
    assert path.read_bytes() == content
    assert files_under(instances_dir(store)) == [path]
    study = study_row(db, first.StudyInstanceUID)
    assert study is not None and (study.queued, study.instance_count) == (True, 1)


def test_duplicate_replace_rewrites_the_file_and_requeues(make_store: Make) -> None:
    store, db = make_store(duplicates="replace")
    first = read(sample_files()[0])
    assert put(store, first).status == 0x0000
    [before] = instance_rows(db)
    set_queued(db, first.StudyInstanceUID)

    again = read(sample_files()[0])
    again.InstitutionName = "changed on the second send"
    outcome = put(store, again)

    assert (outcome.status, outcome.stored, outcome.duplicate) == (0x0000, True, True)
    [after] = instance_rows(db)
    path = store.settings.data_dir / after.path
    assert after.path == before.path
    assert after.sha256 != before.sha256
    assert after.sha256 == sha256_of(path)
    assert after.received_at >= before.received_at
    assert pydicom.dcmread(path).InstitutionName == "changed on the second send"
    assert files_under(instances_dir(store)) == [path]
    study = study_row(db, first.StudyInstanceUID)
    assert study is not None and (study.queued, study.instance_count) == (False, 1)


@pytest.mark.parametrize("policy", ["keep-first", "replace"])
def test_a_sop_instance_under_another_study_is_refused(make_store: Make, policy: str) -> None:
    store, db = make_store(duplicates=policy)
    first = read(sample_files()[0])
    assert put(store, first).status == 0x0000
    [before] = instance_rows(db)
    content = (store.settings.data_dir / before.path).read_bytes()

    moved = read(sample_files()[0])
    moved.StudyInstanceUID = pydicom.uid.generate_uid(prefix="2.25.")
    outcome = put(store, moved)

    assert (outcome.status, outcome.stored) == (0xA900, False)
    assert outcome.sop_instance_uid in outcome.comment
    assert "belongs to another study" in outcome.comment
    assert moved.StudyInstanceUID not in outcome.comment
    [after] = instance_rows(db)
    assert (after.sha256, after.path) == (before.sha256, before.path)
    assert (store.settings.data_dir / after.path).read_bytes() == content
    assert len(files_under(instances_dir(store))) == 1


@pytest.mark.parametrize("policy", ["keep-first", "replace"])
@pytest.mark.parametrize("stores", [1, 2], ids=["one-store", "two-stores"])
def test_concurrent_stores_of_one_instance_make_one_row(
    make_store: Make, policy: str, stores: int
) -> None:
    """Threads race to store one SOP instance; with two stores nothing in-process serialises
    them, as with two processes: the database's write transaction must."""
    made = [make_store(duplicates=policy) for _ in range(stores)]
    db = made[0][1]
    datasets = [read(sample_files()[2]) for _ in range(6)]
    start = threading.Barrier(len(datasets))
    outcomes: list[StoreOutcome] = []

    def send(index: int) -> None:
        start.wait()
        outcomes.append(put(made[index % stores][0], datasets[index]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(datasets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert [o.status for o in outcomes] == [0x0000] * len(datasets)
    assert sum(not o.duplicate for o in outcomes) == 1
    [row] = instance_rows(db)
    path = made[0][0].settings.data_dir / row.path
    assert files_under(instances_dir(made[0][0])) == [path]
    assert row.sha256 == sha256_of(path)
    study = study_row(db, datasets[0].StudyInstanceUID)
    assert study is not None and study.instance_count == 1


def test_concurrent_instances_of_a_new_study_make_one_study(make_store: Make) -> None:
    store, db = make_store()
    datasets = [read(path) for path in sample_files()]
    start = threading.Barrier(len(datasets))
    outcomes: list[StoreOutcome] = []

    def send(ds: Dataset) -> None:
        start.wait()
        outcomes.append(put(store, ds))

    threads = [threading.Thread(target=send, args=(ds,)) for ds in datasets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(o.status for o in outcomes) == [0x0000] * 4
    assert len(instance_rows(db)) == 4
    study = study_row(db, datasets[0].StudyInstanceUID)
    assert study is not None and study.instance_count == 4


# --- out of resources --------------------------------------------------------------------


def test_too_little_free_space_is_refused_before_writing(make_store: Make) -> None:
    store, db = make_store(min_free_mb=2**40)  # a yottabyte: more than any disk has free
    outcome = put(store, read(sample_files()[0]))
    assert (outcome.status, outcome.stored) == (0xA700, False)
    assert "MiB free" in outcome.comment
    assert files_under(instances_dir(store)) == []
    assert instance_rows(db) == []


def test_no_space_while_writing_leaves_no_file(
    make_store: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, db = make_store()

    def disk_full(fp: Any, ds: Dataset, **kwargs: Any) -> None:
        fp.write(b"\0" * 128 + b"DICM" + b"partial")  # some bytes reach the disk first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "dcmwrite", disk_full)
    outcome = put(store, read(sample_files()[0]))

    assert (outcome.status, outcome.stored) == (0xA700, False)
    assert "No space left on device" in outcome.comment
    assert files_under(instances_dir(store)) == []
    assert instance_rows(db) == []
    monkeypatch.undo()
    assert put(store, read(sample_files()[0])).status == 0x0000  # space came back


def _fail_commits(db: Database) -> Callable[[], None]:
    """Make every commit of ``db``'s write engine fail like a full disk; returns the undo."""

    def fail(_connection: Any) -> None:
        raise OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))

    event.listen(db.engine, "commit", fail)
    return lambda: event.remove(db.engine, "commit", fail)


def test_a_failed_commit_removes_the_new_file(make_store: Make) -> None:
    store, db = make_store()
    ds = read(sample_files()[0])
    restore = _fail_commits(db)
    outcome = put(store, ds)
    restore()

    assert (outcome.status, outcome.stored) == (0xA700, False)
    assert "database" in outcome.comment
    assert files_under(instances_dir(store)) == []
    assert instance_rows(db) == []
    assert put(store, read(sample_files()[0])).status == 0x0000


def test_a_failed_commit_of_a_replacement_restores_the_first_file(make_store: Make) -> None:
    store, db = make_store(duplicates="replace")
    assert put(store, read(sample_files()[0])).status == 0x0000
    [before] = instance_rows(db)
    path = store.settings.data_dir / before.path
    content = path.read_bytes()

    again = read(sample_files()[0])
    again.InstitutionName = "the replacement"
    restore = _fail_commits(db)
    outcome = put(store, again)
    restore()

    assert (outcome.status, outcome.stored) == (0xA700, False)
    assert path.read_bytes() == content
    assert files_under(instances_dir(store)) == [path]
    [after] = instance_rows(db)
    assert after.sha256 == before.sha256 == sha256_of(path)


def test_a_refused_insert_is_retried_then_answered_without_leaving_a_file(
    make_store: Make,
) -> None:
    """The unique-constraint path (another process inserted first), provoked by a trigger."""
    store, db = make_store()
    with db.engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TRIGGER refuse BEFORE INSERT ON instances "
                "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"
            )
        )
    outcome = put(store, read(sample_files()[0]))
    assert (outcome.status, outcome.stored) == (0xC000, False)
    assert "refused by a test trigger" in outcome.comment
    assert files_under(instances_dir(store)) == []
    assert instance_rows(db) == []


# --- what is stored but not analysed, and what is refused --------------------------------


@pytest.mark.parametrize(
    ("sop_class", "modality"),
    [
        (SEGMENTATION, "SEG"),
        (BASIC_TEXT_SR, "SR"),
        (ENHANCED_SR, "SR"),
        (COMPREHENSIVE_SR, "SR"),
        (SECONDARY_CAPTURE, "OT"),
    ],
)
def test_seg_sr_and_secondary_capture_are_stored_with_a_warning(
    make_store: Make, sop_class: str, modality: str
) -> None:
    store, db = make_store()
    ds = non_image(sop_class, modality)
    outcome = put(store, ds, expected_sop_class=sop_class)
    assert (outcome.status, outcome.stored, outcome.analysable) == (0xB000, True, False)
    assert outcome.comment == NOT_ANALYSED_COMMENT
    assert outcome.error_comment == NOT_ANALYSED_COMMENT
    [row] = instance_rows(db)
    assert (row.analysable, row.view, row.sop_class_uid) == (False, "", sop_class)
    assert (store.settings.data_dir / row.path).is_file()


def test_dx_is_analysed_only_when_its_modality_is_mg(make_store: Make) -> None:
    store, db = make_store()
    dx_for_presentation = "1.2.840.10008.5.1.4.1.1.1.1"
    mammogram = with_new_uid(read(sample_files()[0]))
    mammogram.SOPClassUID = dx_for_presentation
    chest = with_new_uid(read(sample_files()[1]))
    chest.SOPClassUID, chest.Modality = dx_for_presentation, "DX"

    assert put(store, mammogram).status == 0x0000
    assert put(store, chest).status == 0xB000
    by_uid = {row.sop_instance_uid: row for row in instance_rows(db)}
    assert by_uid[mammogram.SOPInstanceUID].analysable is True
    assert by_uid[mammogram.SOPInstanceUID].view == "R-CC"
    assert by_uid[chest.SOPInstanceUID].analysable is False


def test_a_data_set_of_another_sop_class_is_refused(make_store: Make) -> None:
    store, db = make_store()
    report = non_image(COMPREHENSIVE_SR, "SR")
    outcome = put(store, report, expected_sop_class=MG_FOR_PRESENTATION)
    assert (outcome.status, outcome.stored) == (0xA900, False)
    assert "does not match SOP class" in outcome.comment
    assert files_under(instances_dir(store)) == [] and instance_rows(db) == []


def test_a_sop_class_bac_node_does_not_store_is_refused(make_store: Make) -> None:
    store, db = make_store()
    ct = non_image("1.2.840.10008.5.1.4.1.1.2", "CT")
    outcome = put(store, ct)
    assert (outcome.status, outcome.stored) == (0x0122, False)
    assert files_under(instances_dir(store)) == [] and instance_rows(db) == []


def test_a_malformed_mammogram_is_refused_and_nothing_is_written(make_store: Make) -> None:
    store, db = make_store()
    broken = truncated_pixels(sample_files()[0])
    outcome = put(store, broken)
    assert (outcome.status, outcome.stored) == (0xC000, False)
    assert outcome.comment.startswith(f"SOP Instance UID {broken.SOPInstanceUID}: ")
    assert "PixelData" in outcome.comment
    assert "\n" not in outcome.comment
    assert len(outcome.error_comment) <= ERROR_COMMENT_MAX
    assert broken.SOPInstanceUID not in outcome.error_comment
    assert files_under(instances_dir(store)) == [] and instance_rows(db) == []


def test_a_data_set_that_does_not_parse_is_refused(make_store: Make) -> None:
    store, db = make_store()
    broken = lazily_unparseable(sample_files()[0])
    outcome = store.store(broken, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="X")
    assert (outcome.status, outcome.stored) == (0xC000, False)
    assert "cannot be parsed" in outcome.comment
    assert files_under(instances_dir(store)) == [] and instance_rows(db) == []


def test_a_truncated_data_set_is_refused(make_store: Make, tmp_path: Path) -> None:
    store, db = make_store()
    report = non_image(SEGMENTATION, "SEG")
    report.EncapsulatedDocument = b"\1" * 4096  # the last element, cut short below
    whole = tmp_path / "seg.dcm"
    report.save_as(whole, enforce_file_format=True)
    cut = whole.read_bytes()[:-1000]
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(cut))
    outcome = put(store, ds)
    assert (outcome.status, outcome.stored) == (0xC000, False)
    assert "truncated" in outcome.comment
    assert files_under(instances_dir(store)) == [] and instance_rows(db) == []


# pydicom warns when a test sets the malformed UIDs the store must refuse.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize(
    ("keyword", "value", "why"),
    [
        ("SOPInstanceUID", None, "missing"),
        ("SOPInstanceUID", "1.2.840.abc", "not a valid UID"),
        ("StudyInstanceUID", None, "is missing"),
        ("StudyInstanceUID", "1." * 32 + "1", "is not a valid UID"),  # 65 characters
        ("SeriesInstanceUID", "", "is missing"),
        ("SOPClassUID", "MG", "is not a valid UID"),
    ],
)
def test_missing_or_malformed_uids_are_refused(
    make_store: Make, keyword: str, value: str | None, why: str
) -> None:
    store, db = make_store()
    ds = read(sample_files()[0])
    if value is None:
        del ds[keyword]
    else:
        setattr(ds, keyword, value)
    outcome = store.store(ds, transfer_syntax_uid=syntax_of(ds), calling_ae="X")
    assert (outcome.status, outcome.stored) == (0xA900, False)
    assert why in outcome.comment
    assert files_under(instances_dir(store)) == [] and instance_rows(db) == []


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uids_with_leading_zeros_are_tolerated(make_store: Make) -> None:
    store, db = make_store()
    ds = with_new_uid(read(sample_files()[0]))
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.0123.007"
    assert put(store, ds).status == 0x0000
    assert instance_rows(db)[0].series_uid == "1.2.826.0.1.3680043.10.0123.007"


def test_settings_are_not_read_at_construction(tmp_path: Path) -> None:
    """No I/O in the constructor: the data directory appears with the first instance."""
    settings = Settings(data_dir=tmp_path / "later", min_free_mb=1)
    db = open_database(tmp_path / "db")
    try:
        store = InstanceStore(settings, db)
        assert not settings.data_dir.exists()
        assert put(store, read(sample_files()[0])).status == 0x0000
        assert len(files_under(settings.data_dir / "instances")) == 1
    finally:
        db.dispose()


def test_undoing_a_placement_keeps_a_file_another_writer_committed(tmp_path: Path) -> None:
    """The PostgreSQL race: this store placed its file, another process then placed and
    committed its own copy under the same name; this store's undo must leave that copy."""
    final = tmp_path / "instance.dcm"
    ours = tmp_path / ".instance.ours.tmp"
    ours.write_bytes(b"ours")
    placement = store_module._Placement(ours, final)
    placement.place()
    theirs = tmp_path / ".instance.theirs.tmp"
    theirs.write_bytes(b"theirs")
    theirs.replace(final)

    placement.undo()

    assert final.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instance.dcm"]


def test_undoing_a_placement_restores_the_file_it_replaced(tmp_path: Path) -> None:
    final = tmp_path / "instance.dcm"
    final.write_bytes(b"first")
    ours = tmp_path / ".instance.ours.tmp"
    ours.write_bytes(b"second")
    placement = store_module._Placement(ours, final)
    placement.place()
    assert final.read_bytes() == b"second"

    placement.undo()

    assert final.read_bytes() == b"first"
    assert ours.read_bytes() == b"second"  # back under its temporary name, for a retry
    assert sorted(p.name for p in tmp_path.iterdir()) == [".instance.ours.tmp", "instance.dcm"]
