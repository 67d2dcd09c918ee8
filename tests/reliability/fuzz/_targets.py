"""What the fuzz harnesses run, and their seeds: shared by the harnesses and the tests.

Each target takes bytes and returns normally for every input; an exception that escapes
is a finding (an HTTP 500 or an unanswered C-STORE in the node). The node's documented
refusals are return values here, never exceptions:

- :func:`read_and_validate`: the bytes go one of the two ways an instance enters the
  node, chosen by the lowest bit of the first byte (a preamble byte, which neither
  reader looks at in a Part 10 file; each way costs a full parse, so one per input
  doubles the executions). STOW-RS (bit clear):
  :func:`bac_node.node.http.read_part` (its refusal is an ``InstanceOutcome``), then
  :meth:`InstanceStore.store`. C-STORE (bit set): the bytes after the file meta (or all
  of them when there is none) decoded as pynetdicom decodes a P-DATA data set (any
  exception there is the SCP's 0xC000, :mod:`bac_node.node.scp`), then
  :meth:`InstanceStore.store` with MG For Presentation negotiated. The store promises
  never to raise; it answers a
  ``StoreOutcome``. Its ``min_free_mb`` is set beyond any disk, so a data set that passes
  validation is refused with 0xA700 before a byte is written: the fuzzer measures the
  read-and-validate path, not the disk (writing is :mod:`test_disk_full`'s subject).
- :func:`multipart`: the first line of the input is the request's Content-Type, the
  rest its body: :func:`bac_node.node.http.request_boundary` and
  :func:`bac_node.node.http.split_multipart` may raise only ``HttpError`` (a 4xx answer).

Seeds (:func:`write_seeds`): every file of ``tests/reliability/corpus/``, the four
images of ``sample_dicom/`` subsampled 16 times (64 x 52 pixels: a mutation of a 1.7 MB
file would spend its time copying pixels), and multipart bodies holding them.
"""

from __future__ import annotations

import atexit
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import decode

from bac_node.config import Settings
from bac_node.node.db import open_database
from bac_node.node.http import (
    HttpError,
    _file_meta_problem,
    read_part,
    request_boundary,
    split_multipart,
)
from bac_node.node.store import InstanceStore, StoreOutcome

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CORPUS = HERE.parent / "corpus"
SAMPLE = REPO / "sample_dicom"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
BOUNDARY = "bac-node-fuzz"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'
#: Beyond any disk (1 EiB): validation runs, then the store refuses before writing.
NEVER_ENOUGH_MB = 2**40

_store: InstanceStore | None = None


def quiet() -> None:
    """No log lines or pydicom warnings per input (they cost more than the parse)."""
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")


def store() -> InstanceStore:
    """The store the targets use: a fresh data directory, never written to."""
    global _store
    if _store is None:
        data_dir = Path(tempfile.mkdtemp(prefix="bac-node-fuzz-"))
        atexit.register(shutil.rmtree, data_dir, True)
        settings = Settings(data_dir=data_dir, min_free_mb=NEVER_ENOUGH_MB)
        _store = InstanceStore(settings, open_database(data_dir))
    return _store


def read_and_validate(data: bytes) -> int:
    """The status ``data`` gets by STOW-RS or by C-STORE (the module docstring says which)."""
    if data[:1] and data[0] & 1:
        return by_c_store(data)
    return by_stow(data)


def by_stow(data: bytes) -> int:
    read = read_part(data, 1)
    if isinstance(read, tuple):
        ds, syntax = read
        return _stored(ds, syntax, None)
    return read.status


def by_c_store(data: bytes) -> int:
    try:
        ds = decode(io.BytesIO(_after_meta(data)), False, True)
    except Exception:  # the SCP's `event.dataset` failing: answered 0xC000
        return 0xC000
    return _stored(ds, ExplicitVRLittleEndian, MG_FOR_PRESENTATION)


def _stored(ds: pydicom.Dataset, syntax: str, expected: str | None) -> int:
    outcome = store().store(
        ds, transfer_syntax_uid=syntax, calling_ae="FUZZ", expected_sop_class=expected
    )
    assert isinstance(outcome, StoreOutcome)
    assert outcome.status != 0x0000, "stored with min_free_mb beyond any disk"
    return outcome.status


def _after_meta(data: bytes) -> bytes:
    """The data set bytes of a Part 10 file (all of ``data`` when its meta cannot be read).

    A meta the node refuses to hand to pydicom (``_file_meta_problem``: a sequence in
    group 0002 took pydicom's meta reader past 2 GiB) is not read here either.
    """
    if _file_meta_problem(data):
        return data
    try:
        with io.BytesIO(data) as fp:
            pydicom.filereader.read_preamble(fp, False)
            pydicom.filereader._read_file_meta_info(fp)
            return data[fp.tell() :]
    except Exception:
        return data


def multipart(data: bytes) -> int:
    """How many parts the body has; HttpError (a 4xx) is the only refusal."""
    content_type, _, body = data.partition(b"\n")
    try:
        boundary = request_boundary(content_type.decode("latin-1"))
        parts = split_multipart(body, boundary)
    except HttpError as error:
        assert 400 <= error.status < 500, error.status
        return 0
    for part in parts:
        assert 0 <= part.start <= part.end <= len(body), part
        part.media_type  # noqa: B018 (the header parsing the STOW-RS handler does next)
    return len(parts)


def small_sample(path: Path, factor: int = 16) -> bytes:
    """A sample_dicom image subsampled ``factor`` times, as Part 10 bytes."""
    ds = pydicom.dcmread(path)
    pixels = np.ascontiguousarray(ds.pixel_array[::factor, ::factor])
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def instance_seeds() -> dict[str, bytes]:
    seeds = {f"corpus-{p.name}": p.read_bytes() for p in sorted(CORPUS.glob("*.dcm"))}
    for path in sorted(SAMPLE.rglob("*.dcm")):
        seeds[f"sample-{path.stem}.dcm"] = small_sample(path)
    return seeds


def multipart_body(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    )
    return body + f"--{boundary}--\r\n".encode()


def multipart_seeds() -> dict[str, bytes]:
    instances = instance_seeds()
    head = CONTENT_TYPE.encode() + b"\n"
    small = [data for name, data in instances.items() if len(data) < 16384]
    seeds = {f"one-{name}": head + multipart_body(data) for name, data in instances.items()}
    seeds["several"] = head + multipart_body(*small[:4])
    seeds["preamble-epilogue"] = head + b"preamble\r\n" + multipart_body(small[0]) + b"epilogue"
    seeds["no-headers"] = head + f"--{BOUNDARY}\r\n\r\nDICM\r\n--{BOUNDARY}--".encode()
    return seeds


def write_seeds(kind: str, directory: Path) -> Path:
    """The seeds of harness ``kind`` ("read" or "multipart") as files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    seeds = instance_seeds() if kind == "read" else multipart_seeds()
    if kind == "read":  # each seed both ways (the first byte's lowest bit)
        seeds |= {f"c-store-{n}": b"\x01" + d[1:] for n, d in seeds.items() if d}
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
    return directory
