"""Disk full: the data directory on a small tmpfs this test mounts (root only).

``bac-node serve`` (a subprocess, tests/node/_serve.py) keeps its data directory on a
32 MiB tmpfs with ``min_free_mb`` 8; a filler file leaves room for about three 1.7 MB
sample images above the threshold. A pynetdicom SCU sends images one association each
until the node answers 0xA700, then asserted:

- every C-STORE after the first 0xA700 is 0xA700 too, with an "out of resources" comment;
- no temporary file remains; files on disk and rows are exactly the acknowledged ones;
- ``/readyz`` is 503 with the disk check below ``min_free_mb`` while space is short;
- deleting the filler is enough: ``/readyz`` turns 200 and the next C-STORE succeeds,
  with no restart (same process);
- after a graceful stop, every acknowledged instance has its row and a file whose sha256
  is the row's.

A second test writes past the end of the file system (``min_free_mb`` 0, in-process SCP):
the write fails with ENOSPC and the C-STORE is 0xA700, never Success, and nothing of it
remains; the same instance is stored once space is freed.

Mounting needs root (CAP_SYS_ADMIN): the tests skip without it locally and fail in CI
(``CI=true``), where they run as root.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from _ingest_helpers import ingest_settings, instance_rows, sample_files
from _processing_helpers import save_tiny_model
from _serve import NODE_AE, Serve
from peers import free_port
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from bac_node.node.db import open_database
from bac_node.node.scp import start_scp
from bac_node.node.store import OUT_OF_RESOURCES, SUCCESS, InstanceStore

PY_AE, LOOPBACK = "PYSCU", "127.0.0.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MIB = 1024**2
FS_MB, MIN_FREE_MB = 32, 8
#: Free space above the threshold left by the filler: room for three 1.7 MB images.
HEADROOM = 6 * MIB


def need_root(reason: str) -> None:
    message = f"the disk-full tests mount a tmpfs: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A ``FS_MB`` MiB tmpfs at ``tmp_path/fs``, unmounted afterwards."""
    if os.geteuid() != 0:
        need_root("not root")
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={FS_MB}m", "bac-node-test", str(mount_point)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        need_root(f"mount failed: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def fill(mount_point: Path, leave: int) -> Path:
    """A filler file that leaves ``leave`` bytes free on the file system."""
    filler = mount_point / "filler"
    size = shutil.disk_usage(mount_point).free - leave
    assert size > 0, "the file system is already fuller than wanted"
    with filler.open("wb") as file:
        chunk = b"\0" * MIB
        while size > 0:
            size -= file.write(chunk[: min(size, MIB)])
    return filler


def new_image(source: Path) -> Dataset:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid(prefix="2.25.")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def c_store(port: int, ds: Dataset) -> tuple[int, str]:
    ae = AE(ae_title=PY_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MG_FOR_PRESENTATION, [ExplicitVRLittleEndian])
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AE)
    assert assoc.is_established, "the node refused the association"
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp and "Status" in rsp, "no C-STORE response"
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def leftovers(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob("*") if p.is_file() and p.name.endswith(".tmp")]


def stored_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "instances").rglob("*.dcm"))


@pytest.mark.slow
def test_disk_full_refuses_with_a700_then_resumes_by_itself(small_fs: Path, tmp_path: Path) -> None:
    data_dir = small_fs / "data"
    http_port = free_port()
    node = Serve(
        data_dir, save_tiny_model(tmp_path / "tiny.safetensors"),
        allowed_peers=PY_AE, http_port=http_port, http_host=LOOPBACK,
    )  # fmt: skip
    # Serve's own defaults, changed: the threshold, and no analysis during the test
    node.env.update(BAC_NODE_MIN_FREE_MB=str(MIN_FREE_MB), BAC_NODE_STABLE_AFTER="3600")
    node.log = tmp_path / "serve.log"  # not on the small file system
    client = httpx.Client(base_url=f"http://{LOOPBACK}:{http_port}", timeout=30, trust_env=False)

    def readiness() -> tuple[int, str]:
        answer = client.get("/readyz")
        return answer.status_code, str(answer.json()["checks"]["disk"])

    def wait_ready(expected: int) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, disk = readiness()
                if status == expected:
                    return disk
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"/readyz never answered {expected}:\n{node.tail()}")

    node.start()
    try:
        assert "ok" in wait_ready(200)
        filler = fill(small_fs, MIN_FREE_MB * MIB + HEADROOM)
        sources = sample_files()
        acknowledged: list[str] = []
        answers: list[tuple[int, str]] = []
        for index in range(12):
            ds = new_image(sources[index % 4])
            status, comment = c_store(node.port, ds)
            answers.append((status, comment))
            if status == SUCCESS:
                assert OUT_OF_RESOURCES not in [s for s, _ in answers], answers
                acknowledged.append(str(ds.SOPInstanceUID))
            if len(answers) - len(acknowledged) >= 3:
                break
        # the threshold was not hit at once, and was hit before the disk was full
        assert 2 <= len(acknowledged) <= 4, answers  # 6 MiB of headroom, 1.7 MB images
        refused = answers[len(acknowledged) :]
        assert len(refused) == 3, answers
        for status, comment in refused:
            assert status == OUT_OF_RESOURCES, answers
            assert f"less than {MIN_FREE_MB} MiB free" in comment, comment  # not ENOSPC

        status, disk = readiness()
        assert status == 503 and "below min_free_mb" in disk, disk
        assert leftovers(data_dir) == []
        assert len(stored_files(data_dir)) == len(acknowledged)

        filler.unlink()  # space comes back: no restart, no command
        freed = time.monotonic()
        wait_ready(200)
        print(
            f"{len(acknowledged)} stored, then {len(refused)} x 0x{OUT_OF_RESOURCES:04X}; "
            f"/readyz 200 {time.monotonic() - freed:.1f} s after the space was freed"
        )
        ds = new_image(sources[0])
        assert c_store(node.port, ds) == (SUCCESS, "")
        acknowledged.append(str(ds.SOPInstanceUID))
        assert node.alive()
    finally:
        client.close()
        assert node.stop() == 0, node.tail()

    assert leftovers(data_dir) == []
    db = open_database(data_dir)
    try:
        rows = {row.sop_instance_uid: row for row in instance_rows(db)}
    finally:
        db.dispose()
    assert sorted(rows) == sorted(acknowledged)
    for row in rows.values():
        path = data_dir / row.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row.sha256, row.path
    assert len(stored_files(data_dir)) == len(acknowledged)


def test_a_write_that_runs_out_of_space_is_a700_and_leaves_nothing(small_fs: Path) -> None:
    settings = ingest_settings(small_fs / "data", min_free_mb=0, allowed_peers=(PY_AE,))
    db = open_database(settings.data_dir)
    scp = start_scp(settings, InstanceStore(settings, db), host=LOOPBACK, port=0)
    try:
        filler = fill(small_fs, 512 * 1024)  # less than one 1.7 MB image
        ds = new_image(sample_files()[0])
        status, comment = c_store(scp.port, ds)
        assert status == OUT_OF_RESOURCES, comment
        assert "No space left" in comment, comment  # ENOSPC, in 64 characters
        assert leftovers(settings.data_dir) == [] and stored_files(settings.data_dir) == []
        assert instance_rows(db) == []

        filler.unlink()
        assert c_store(scp.port, ds) == (SUCCESS, "")
        assert len(stored_files(settings.data_dir)) == 1 and len(instance_rows(db)) == 1
    finally:
        scp.shutdown(timeout=5)
        db.dispose()
