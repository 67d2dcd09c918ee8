"""Generate the malformed-input corpus in ``tests/reliability/corpus/`` (deterministic).

Run ``.venv/bin/python tests/reliability/make_corpus.py`` from the repository root; the
output is byte-identical on every run (fixed UIDs, fixed pixels). Every file starts from
the first sample MG image with its pixel data replaced by a 64 x 52 ramp, so the folder
stays small. ``test_malformed.py`` sends each file to the C-STORE SCP and checks that it
is refused, nothing of it is stored, and the node keeps serving.

File                         What it proves
---------------------------  ----------------------------------------------------------
truncated_preamble.dcm       cut inside the 128-byte preamble: not even file meta
truncated_meta.dcm           cut inside the file meta group
truncated_header.dcm         cut in the middle of the data set header (an element value)
truncated_pixels_half.dcm    cut halfway through the pixel data
truncated_pixels_1byte.dcm   one byte short of the end
wrong_vr_rows_lo.dcm         Rows (0028,0010) encoded as LO "abc" instead of US
wrong_vr_unknown_zz.dcm      an element whose VR is the unknown "ZZ"
length_past_end_private.dcm  a private OB element declaring 2 GiB, followed by 16 bytes
length_past_end_pixels.dcm   PixelData declaring 0xFFFFFFF0 bytes, followed by 64 bytes
huge_65535x65535.dcm         Rows = Columns = 65535 (8 GiB promised), 128 bytes of pixels
pixeldata_short.dcm          a well-formed PixelData element half the length Rows x Columns need
nested_500_sequences.dcm     a sequence nested 500 deep (undefined lengths)
deflate_bomb.dcm             Deflated Explicit VR LE whose data set inflates to > 1 GiB
uid_traversal_sop.dcm        SOP Instance UID "../../../etc/passwd"
uid_traversal_study.dcm      Study Instance UID "1.2.3/../../4"
uid_illegal_chars.dcm        SOP Instance UID with letters, a space and a backslash
uid_too_long.dcm             SOP Instance UID of 80 digits (64 is the maximum)
non_mg_ct.dcm                a CT Image Storage object (not a class bac-node stores)
non_mg_mr.dcm                an MR Image Storage object
not_dicom.dcm                a text file with a .dcm name
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REPO = HERE.parents[1]
SAMPLE = sorted((REPO / "sample_dicom" / "study-00000" / "dicom").rglob("*.dcm"))[0]
ROWS, COLUMNS = 64, 52
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Inflated size of the deflate bomb's data set (its compressed size is about 1/1000).
BOMB_BYTES = 1100 * 1024 * 1024


def uid(n: int) -> str:
    """A fixed, valid UID for corpus file ``n``."""
    return f"2.25.{9_000_000_000 + n}"


def base(n: int) -> Dataset:
    """The sample MG image shrunk to 64 x 52, as corpus instance ``n`` (fixed UIDs)."""
    ds = pydicom.dcmread(SAMPLE)
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation = 1, 0
    pixels = (np.arange(ROWS * COLUMNS, dtype=np.uint16) % 4096).reshape(ROWS, COLUMNS)
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(0), uid(1)
    ds.SOPInstanceUID = uid(100 + n)
    return ds


def meta_bytes(sop_class: str, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(uid(99))
    buffer = io.BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def body(ds: Dataset) -> bytes:
    encoded = encode(ds, False, True)
    assert encoded is not None
    return encoded


def part10(ds: Dataset, data: bytes | None = None) -> bytes:
    """Meta + data set bytes (``data`` replaces the encoded data set when given)."""
    return meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) + (
        body(ds) if data is None else data
    )


def split(ds: Dataset, tag: int) -> tuple[Dataset, Dataset]:
    """The elements of ``ds`` before ``tag`` and from ``tag`` on."""
    before, after = Dataset(), Dataset()
    for element in ds:
        (before if element.tag < tag else after).add(element)
    return before, after


def valid_instance(n: int = 0) -> bytes:
    """A valid small MG instance (what the test sends after the corpus)."""
    return part10(base(1000 + n))


def corpus() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    good = part10(base(1))
    pixel_at = good.rfind(b"\xe0\x7f\x10\x00OW")
    files["truncated_preamble.dcm"] = good[:100]
    files["truncated_meta.dcm"] = good[:180]
    files["truncated_header.dcm"] = good[
        : (len(meta_bytes(str(base(1).SOPClassUID), uid(101))) + pixel_at) // 2
    ]
    files["truncated_pixels_half.dcm"] = good[: pixel_at + (len(good) - pixel_at) // 2]
    files["truncated_pixels_1byte.dcm"] = good[:-1]

    ds = base(2)
    ds[0x00280010] = DataElement(0x00280010, "LO", "abc")
    files["wrong_vr_rows_lo.dcm"] = part10(ds)
    ds = base(3)
    raw = body(ds)
    at = raw.find(b"\x08\x00\x70\x00LO")  # Manufacturer (0008,0070)
    assert at >= 0
    files["wrong_vr_unknown_zz.dcm"] = part10(ds, raw[: at + 4] + b"ZZ" + raw[at + 6 :])

    ds = base(4)
    head, _ = split(ds, 0x7FE00010)
    private = struct.pack("<HH", 0x0029, 0x1010) + b"OB\0\0" + struct.pack("<I", 0x80000000)
    files["length_past_end_private.dcm"] = part10(ds, body(head) + private + b"\x01" * 16)
    ds = base(5)
    head, _ = split(ds, 0x7FE00010)
    pixels = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\0\0" + struct.pack("<I", 0xFFFFFFF0)
    files["length_past_end_pixels.dcm"] = part10(ds, body(head) + pixels + b"\x02" * 64)

    ds = base(6)
    ds.Rows = ds.Columns = 65535
    ds.PixelData = b"\x03" * 128
    files["huge_65535x65535.dcm"] = part10(ds)
    ds = base(7)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    files["pixeldata_short.dcm"] = part10(ds)

    ds = base(8)
    nest_tag = 0x0040A730  # Content Sequence
    head, tail = split(ds, nest_tag)
    opening = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0\xff\xff\xff\xff"
    opening += b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
    nested = opening * 500 + closing * 500
    files["nested_500_sequences.dcm"] = part10(ds, body(head) + nested + body(tail))

    ds = base(9)
    head, _ = split(ds, 0x7FE00010)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = compressor.compress(body(head))
    bomb += compressor.compress(struct.pack("<HH", 0x0029, 0x1010) + b"OB\0\0")
    bomb += compressor.compress(struct.pack("<I", BOMB_BYTES))
    zeros = bytes(16 * 1024 * 1024)
    for _ in range(BOMB_BYTES // len(zeros)):
        bomb += compressor.compress(zeros)
    bomb += compressor.flush()
    files["deflate_bomb.dcm"] = (
        meta_bytes(str(ds.SOPClassUID), uid(109), DeflatedExplicitVRLittleEndian) + bomb
    )

    for n, (name, keyword, value) in enumerate(
        (
            ("uid_traversal_sop.dcm", "SOPInstanceUID", "../../../etc/passwd"),
            ("uid_traversal_study.dcm", "StudyInstanceUID", "1.2.3/../../4"),
            ("uid_illegal_chars.dcm", "SOPInstanceUID", "1.2.abc 4\\5"),
            ("uid_too_long.dcm", "SOPInstanceUID", "1." + "2" * 78),
        ),
        start=10,
    ):
        ds = base(n)
        setattr(ds, keyword, value)
        meta_uid = value if keyword == "SOPInstanceUID" else str(ds.SOPInstanceUID)
        files[name] = meta_bytes(str(ds.SOPClassUID), meta_uid) + body(ds)

    for n, (name, sop_class, modality) in enumerate(
        (("non_mg_ct.dcm", CT_IMAGE, "CT"), ("non_mg_mr.dcm", MR_IMAGE, "MR")), start=20
    ):
        ds = base(n)
        ds.SOPClassUID, ds.Modality = sop_class, modality
        files[name] = part10(ds)

    files["not_dicom.dcm"] = b"This is not a DICOM file; it only has a .dcm name.\n" * 20
    return files


def main() -> int:
    CORPUS.mkdir(exist_ok=True)
    for old in CORPUS.glob("*.dcm"):
        old.unlink()
    total = 0
    for name, data in corpus().items():
        (CORPUS / name).write_bytes(data)
        total += len(data)
        print(f"{name:32} {len(data):>9} bytes")
    print(f"{'total':32} {total:>9} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
