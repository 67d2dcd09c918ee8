"""`bac-node serve` as a process between real peers: the node issue's acceptance.

dcmtk's storescu sends, dcmtk's storescp (``+uf``: a repeated store makes a second file,
so duplicates are visible) or Orthanc receives; the node runs the tiny test model so each
study takes seconds. The tests wait on observable facts (files at the destination, rows
in the node's database), never on fixed sleeps alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from _processing_helpers import sample_study, save_tiny_model
from _serve import NODE_AE, Serve
from peers import Orthanc, StoreSCP, dciodvfy_errors, free_port, storescu

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SENDER_AE = "STORESCU"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def serve(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def make(name: str = "node", **settings: Any) -> Serve:
        node = Serve(tmp_path / name, tiny_model, **settings)
        started.append(node)
        return node

    yield make
    for node in started:
        node.stop()


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, node: Serve | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}\n{node.tail() if node else ''}")


def by_modality(files: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for path in files:
        out.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).Modality), []).append(
            path
        )
    return out


def test_storescu_to_node_to_storescp_and_the_same_study_twice(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    with StoreSCP(tmp_path / "dest", ae_title="DEST", unique_filenames=True) as dest:
        node = serve(allowed_peers=SENDER_AE, destinations=f"DEST@127.0.0.1:{dest.port}").start()
        sent = storescu(sample_study(), port=node.port, called_ae=NODE_AE, calling_ae=SENDER_AE)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        wait_until(lambda: len(dest.received()) >= 5, 180, "SEG x4 + SR at storescp", node)
        objects = by_modality(dest.received())
        assert sorted((m, len(f)) for m, f in objects.items()) == [("SEG", 4), ("SR", 1)]
        for path in dest.received():
            assert dciodvfy_errors(path) == [], path.name
        status = node.status()
        assert status["counts"]["jobs"] == {"done": 1}
        assert status["counts"]["exports"] == {"done": 1}

        # The same study again: duplicates are recognised, no new job, nothing re-sent.
        again = storescu(sample_study(), port=node.port, called_ae=NODE_AE, calling_ae=SENDER_AE)
        assert again.returncode == 0
        time.sleep(5)  # stable_after (3 s) has passed: a new job would exist by now
        assert node.status()["counts"]["jobs"] == {"done": 1}
        assert len(dest.received()) == 5


def test_calling_ae_not_on_the_allowlist_is_rejected(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    node = serve(allowed_peers=SENDER_AE).start()
    sent = storescu(sample_study()[:1], port=node.port, called_ae=NODE_AE, calling_ae="STRANGER")
    assert sent.returncode != 0
    assert "reject" in (sent.stdout + sent.stderr).lower()
    assert node.status()["counts"]["jobs"] == {}
    assert not list((node.data_dir / "instances").rglob("*.dcm"))


def test_malformed_instance_in_the_middle_of_a_study(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    files = sample_study()
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid(prefix="2.25.")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # header promises 3x the data
    ds.save_as(broken, enforce_file_format=True)
    with StoreSCP(tmp_path / "dest", ae_title="DEST", unique_filenames=True) as dest:
        node = serve(allowed_peers=SENDER_AE, destinations=f"DEST@127.0.0.1:{dest.port}").start()
        sent = storescu(
            [*files[:2], broken, *files[2:]], port=node.port, called_ae=NODE_AE,
            calling_ae=SENDER_AE,
        )  # fmt: skip
        # storescu goes on after a failed store and reports it.
        assert "0xc000" in (sent.stdout + sent.stderr).lower() or sent.returncode != 0
        wait_until(lambda: len(dest.received()) >= 5, 180, "results of the 4 good images", node)
        assert sorted((m, len(f)) for m, f in by_modality(dest.received()).items()) == [
            ("SEG", 4), ("SR", 1),
        ]  # fmt: skip
        stored = list((node.data_dir / "instances").rglob("*.dcm"))
        assert len(stored) == 4


def test_kill9_after_acknowledgement_exports_exactly_once(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    dest_port = free_port()
    node = serve(
        allowed_peers=SENDER_AE, destinations=f"DEST@127.0.0.1:{dest_port}", lease_seconds=4
    ).start()
    sent = storescu(sample_study(), port=node.port, called_ae=NODE_AE, calling_ae=SENDER_AE)
    assert sent.returncode == 0
    node.kill9()  # acknowledged, not yet exported (nothing listens at the destination)
    with StoreSCP(tmp_path / "dest", ae_title="DEST", port=dest_port, unique_filenames=True) as d:
        node.start()
        wait_until(lambda: len(d.received()) >= 5, 180, "results after the restart", node)
        time.sleep(4)  # a second export would have started by now
        assert len(d.received()) == 5
        status = node.status()
        assert status["counts"]["jobs"] == {"done": 1}
        assert status["counts"]["exports"] == {"done": 1}
        sr = next(p for p in d.received() if p.name.startswith("SR"))
        results = list((node.data_dir / "results").rglob("sr.dcm"))
        assert len(results) == 1
        assert pydicom.dcmread(sr).SOPInstanceUID == pydicom.dcmread(results[0]).SOPInstanceUID


def test_destination_down_then_dead_letter_then_retry(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    dest_port = free_port()
    node = serve(
        allowed_peers=SENDER_AE, destinations=f"DEST@127.0.0.1:{dest_port}", export_attempts=2
    ).start()
    assert (
        storescu(sample_study(), port=node.port, called_ae=NODE_AE, calling_ae=SENDER_AE).returncode
        == 0
    )
    wait_until(lambda: node.status()["counts"]["exports"] == {"dead": 1}, 180, "dead letter", node)
    failures = node.status()["recent_failures"]
    assert any("DEST@127.0.0.1" in json.dumps(f) for f in failures)
    with StoreSCP(tmp_path / "dest", ae_title="DEST", port=dest_port, unique_filenames=True) as d:
        retried = node.cli("retry", "--dead-letter")
        assert "1" in retried.stdout
        wait_until(lambda: len(d.received()) >= 5, 60, "delivery after retry", node)
        assert node.status()["counts"]["exports"] == {"done": 1}


@pytest.mark.orthanc
def test_orthanc_sends_the_study_and_receives_seg_and_sr(
    serve: Callable[..., Serve], tmp_path: Path
) -> None:
    node_port = free_port()
    with Orthanc(tmp_path / "orthanc", aet="ORTHANC",
                 modalities={"bacnode": [NODE_AE, "127.0.0.1", node_port]}) as orthanc:  # fmt: skip
        node = serve(destinations=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
        node.port = node_port
        node.start()
        ids = [orthanc.upload(path) for path in sample_study()]
        orthanc.send_to_modality("bacnode", ids)
        study_uid = str(pydicom.dcmread(sample_study()[0]).StudyInstanceUID)

        def modalities() -> list[str]:
            study = orthanc.find_study(study_uid)
            return [] if study is None else orthanc.study_modalities(study)

        wait_until(lambda: sorted(modalities()).count("SEG") == 4 and "SR" in modalities(), 180,
                   "SEG and SR in Orthanc", node)  # fmt: skip
        assert sorted(modalities()) == ["MG"] * 4 + ["SEG"] * 4 + ["SR"]


def test_sigterm_stops_cleanly(serve: Callable[..., Serve]) -> None:
    node = serve(allowed_peers=SENDER_AE).start()
    assert node.stop() == 0, node.tail()
    assert "stopped" in node.tail()
