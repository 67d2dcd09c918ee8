"""Shared helpers of the store and SCP tests: settings, instances (good and broken), rows.

Broken instances are made from the committed sample study with pydicom, the way a
faulty modality would send them: a header that promises more pixel data than there is,
a data set pydicom cannot parse, a SOP instance under another study.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode
from sqlalchemy import select

from bac_node.config import Settings
from bac_node.node.db import Database, Instance, Study, study_by_uid

REPO = Path(__file__).resolve().parents[2]
SAMPLE_STUDY = REPO / "sample_dicom" / "study-00000" / "dicom"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
#: Patient identifiers planted in test instances: they must never reach a log line.
PATIENT_NAME = "Doe^Jane^Q"
PATIENT_ID = "PID-7734-XQ"


def ingest_settings(data_dir: Path, **fields: Any) -> Settings:
    """Settings for ingest tests: 1 MiB free suffices, short network timeouts."""
    values: dict[str, Any] = {"min_free_mb": 1, "network_timeout": 5, **fields}
    return Settings(data_dir=data_dir, **values)


def sample_files() -> list[Path]:
    """The committed 4-view sample study (Explicit VR Little Endian, 1024 x 832)."""
    files = sorted(SAMPLE_STUDY.rglob("*.dcm"))
    assert len(files) == 4, files
    return files


def read(path: Path) -> Dataset:
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    return ds


def syntax_of(ds: Dataset) -> str:
    return str(ds.file_meta.TransferSyntaxUID)


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def with_new_uid(ds: Dataset) -> Dataset:
    """``ds`` as another SOP instance of the same series."""
    ds.SOPInstanceUID = generate_uid(prefix="2.25.")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def truncated_pixels(source: Path) -> Dataset:
    """An MG instance whose header promises three times the pixel data it holds."""
    ds = with_new_uid(read(source))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    return ds


def small_mg(source: Path, factor: int = 4) -> Dataset:
    """The sample image subsampled ``factor`` times (fast to compress), a new instance."""
    ds = with_new_uid(read(source))
    pixels = np.ascontiguousarray(ds.pixel_array[::factor, ::factor])
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        if keyword in ds:
            ds[keyword].value = [float(v) * factor for v in ds[keyword].value]
    return ds


def non_image(sop_class: str, modality: str, *, study_uid: str | None = None) -> Dataset:
    """A minimal instance of a class bac-node stores but does not analyse (SR, SEG, SC)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(prefix="2.25.")
    ds.StudyInstanceUID = study_uid or generate_uid(prefix="2.25.")
    ds.SeriesInstanceUID = generate_uid(prefix="2.25.")
    ds.Modality = modality
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def unparseable_bytes(source: Path) -> tuple[Dataset, bytes]:
    """A valid header followed by a sequence that never ends: pydicom cannot decode it.

    The header is the sample's (new SOP Instance UID), encoded Explicit VR Little
    Endian; the sequence has undefined length, one item and no delimiter.
    """
    ds = with_new_uid(pydicom.dcmread(source, stop_before_pixels=True))
    head = encode(ds, False, True)
    assert head is not None
    item_body = b"\x08\x00\x50\x11UI\x04\x001.2\x00"
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(item_body)) + item_body
    sequence = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + b"\xff\xff\xff\xff" + item
    return ds, head + sequence


def unparseable_file(source: Path, path: Path) -> tuple[str, Path]:
    """A Part 10 file of :func:`unparseable_bytes` (its SOP Instance UID, its path)."""
    ds, body = unparseable_bytes(source)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue() + body)
    return str(ds.SOPInstanceUID), path


def lazily_unparseable(source: Path) -> Dataset:
    """A data set that decodes, but one of whose sequences holds an unknown VR."""
    from pynetdicom.dsutils import decode

    ds = with_new_uid(pydicom.dcmread(source, stop_before_pixels=True))
    head = encode(ds, False, True)
    assert head is not None
    body = b"\x08\x00\x16\x00ZZ\xff\xff" + b"x" * 20
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(body)) + body
    sequence = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + struct.pack("<I", len(item))
    decoded = decode(io.BytesIO(head + sequence + item), False, True, False)
    assert isinstance(decoded, Dataset)
    return decoded


# --- what the store left behind -------------------------------------------------------


def instance_rows(db: Database) -> list[Instance]:
    with db.read() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def study_row(db: Database, study_uid: str) -> Study | None:
    with db.read() as session:
        return study_by_uid(session, study_uid)


def set_queued(db: Database, study_uid: str, queued: bool = True) -> None:
    with db.session() as session:
        study = study_by_uid(session, study_uid)
        assert study is not None
        study.queued = queued


def files_under(directory: Path) -> list[Path]:
    """Every file under ``directory`` (temporary ones included), sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_name(ds: Dataset) -> str:
    key = f"{ds.StudyInstanceUID}|{ds.SeriesInstanceUID}|{ds.SOPInstanceUID}"
    return hashlib.sha256(key.encode()).hexdigest() + ".dcm"
