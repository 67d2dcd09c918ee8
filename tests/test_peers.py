"""The peer harness itself, proved against the real programs it wraps.

Each helper in tests/peers.py is exercised the way the integration tests use it: storescu
into storescp (files arrive whole, one association, a refused SOP class is a failure), a
destination that goes down and comes back on the same port, Orthanc receiving over REST
and sending to a DicomModalities entry, its DICOMweb plugin and a Lua auto-forward.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pydicom
import pytest
from peers import (
    Orthanc,
    PeerError,
    StoreSCP,
    dciodvfy_errors,
    echoscu,
    free_port,
    port_open,
    storescu,
    wait_for_port,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# The fixtures, bound here so pytest finds them (an import and a same-named test
# argument would read to ruff as a redefinition).
storescp_peer = peers.storescp_peer
orthanc_peer = peers.orthanc_peer

pytestmark = [pytest.mark.network, pytest.mark.dcmtk]

SAMPLE = Path(__file__).resolve().parents[1] / "sample_dicom" / "study-00000" / "dicom"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"


def sample_files() -> list[Path]:
    files = sorted(SAMPLE.rglob("*.dcm"))
    assert len(files) == 4, files
    return files


def sop_instance_uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def minimal_instance(path: Path, sop_class_uid: str, modality: str) -> Path:
    """A header-only instance of ``sop_class_uid``: enough for a C-STORE, not a valid IOD."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, generate_uid(prefix="2.25.")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(prefix="2.25."), generate_uid()
    ds.Modality = modality
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


# --- ports ------------------------------------------------------------------------------


def test_free_port_can_be_bound_and_wait_for_port_sees_a_listener() -> None:
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        assert not port_open("127.0.0.1", port)
        server.listen()
        assert wait_for_port("127.0.0.1", port, timeout=2) < 2


def test_wait_for_port_gives_up_at_once_when_the_process_has_died() -> None:
    started = time.monotonic()
    with pytest.raises(PeerError, match="exited before listening"):
        wait_for_port("127.0.0.1", free_port(), timeout=30, alive=lambda: False, what="x")
    assert time.monotonic() - started < 1
    with pytest.raises(PeerError, match="not listening"):
        wait_for_port("127.0.0.1", free_port(), timeout=0.2)


# --- dcmtk ------------------------------------------------------------------------------


def test_storescu_sends_the_sample_study_in_one_association(storescp_peer: StoreSCP) -> None:
    scp = storescp_peer
    sent = storescu(SAMPLE, port=scp.port, called_ae=scp.ae_title, calling_ae="SENDER")
    assert sent.returncode == 0, sent.output
    assert sent.responses == ["Success"] * 4
    assert sent.output.count("Requesting Association") == 1
    received = scp.wait_for_files(4, timeout=10)
    assert len(received) == 4
    assert sop_instance_uids(received) == sop_instance_uids(sample_files())
    # Markers are not files received; the storescp log lives beside the folder.
    assert all(p.parent == scp.directory for p in received)


def test_storescp_accepts_seg_and_comprehensive_sr_and_a_skipped_file_fails(
    storescp_peer: StoreSCP, tmp_path: Path
) -> None:
    scp = storescp_peer
    seg = minimal_instance(tmp_path / "seg.dcm", SEG_STORAGE, "SEG")
    sr = minimal_instance(tmp_path / "sr.dcm", COMPREHENSIVE_SR_STORAGE, "SR")
    sent = storescu([seg, sr], port=scp.port, called_ae=scp.ae_title)
    assert sent.returncode == 0, sent.output
    classes = {str(pydicom.dcmread(p).SOPClassUID) for p in scp.wait_for_files(2, timeout=10)}
    assert classes == {SEG_STORAGE, COMPREHENSIVE_SR_STORAGE}

    # storescu skips a file of a SOP class it does not know with a warning and exits 0
    # (under --no-halt it would also go on after a refused store); the wrapper reports it.
    unknown = minimal_instance(tmp_path / "unknown.dcm", "1.2.826.0.1.3680043.2.1143.9", "OT")
    sent = storescu([unknown, seg], port=scp.port, called_ae=scp.ae_title)
    assert sent.storescu_returncode == 0
    assert sent.returncode == 1
    assert sent.responses == ["Success"]
    assert any("ignoring file" in line for line in sent.errors), sent.output


def test_destination_down_then_back_on_the_same_port(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "dest", ae_title="DEST") as scp:
        port = scp.port
        assert echoscu(port=port, called_ae="DEST").returncode == 0
        scp.stop()
        down = storescu(SAMPLE, port=port, called_ae="DEST")
        assert down.returncode != 0
        assert "Association Request Failed" in down.output
        assert echoscu(port=port, called_ae="DEST").returncode != 0
        assert scp.received() == []

        scp.start()
        assert scp.port == port
        up = storescu(SAMPLE, port=port, called_ae="DEST")
        assert up.returncode == 0, up.output
        assert len(scp.wait_for_files(4, timeout=10)) == 4
    assert not scp.running


def test_storescp_moves_to_a_fresh_port_only_when_it_chose_the_port(tmp_path: Path) -> None:
    scp = StoreSCP(tmp_path / "dest", ae_title="DEST")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", scp.port))
        squatter.listen()
        taken = scp.port
        with scp:
            assert scp.port != taken
            assert echoscu(port=scp.port, called_ae="DEST").returncode == 0
        fixed = StoreSCP(tmp_path / "fixed", port=taken, start_timeout=5)
        with pytest.raises(PeerError, match="storescp"):
            fixed.start()
        assert fixed.port == taken and not fixed.running


# --- dicom3tools ------------------------------------------------------------------------


def test_dciodvfy_errors(tmp_path: Path) -> None:
    mg = sample_files()[0]
    assert dciodvfy_errors(mg) == []
    assert dciodvfy_errors(mg, "MammographyImageForPresentation") == []
    assert dciodvfy_errors(mg, "Segmentation")  # read as another IOD: an error
    header_only = minimal_instance(tmp_path / "seg.dcm", SEG_STORAGE, "SEG")
    assert dciodvfy_errors(header_only, "Segmentation")  # missing modules
    with pytest.raises(FileNotFoundError):
        dciodvfy_errors(tmp_path / "absent.dcm")


# --- Orthanc ----------------------------------------------------------------------------


@pytest.mark.orthanc
def test_orthanc_rest_modality_send_and_dicomweb(
    orthanc_peer: Callable[..., Orthanc], storescp_peer: StoreSCP
) -> None:
    scp = storescp_peer
    orthanc = orthanc_peer(modalities={"dest": (scp.ae_title, "127.0.0.1", scp.port)})
    assert orthanc.startup_seconds is not None and orthanc.startup_seconds < 10
    assert orthanc.get_json("/system")["DicomAet"] == "ORTHANC"
    config = json.loads(orthanc.config_path.read_text())
    assert str(orthanc.directory) in config["StorageDirectory"]

    ids = [orthanc.upload(path) for path in sample_files()]
    assert sorted(orthanc.instances()) == sorted(ids)
    study_uid = str(pydicom.dcmread(sample_files()[0], stop_before_pixels=True).StudyInstanceUID)
    study = orthanc.find_study(study_uid)
    assert study is not None and orthanc.studies() == [study]
    assert orthanc.find_study("2.25.1") is None
    assert orthanc.study_modalities(study) == ["MG"] * 4
    assert orthanc.instance_tags(ids[0])["StudyInstanceUID"] == study_uid

    # Orthanc as the sender, to a DicomModalities entry: the way a PACS feeds the node.
    assert orthanc.echo("dest")
    orthanc.send_to_modality("dest", [study])
    received = scp.wait_for_files(4, timeout=10)
    assert sop_instance_uids(received) == sop_instance_uids(sample_files())

    found = json.loads(orthanc.request("GET", "/dicom-web/studies", accept="application/json"))
    assert [s["0020000D"]["Value"][0] for s in found] == [study_uid]
    with pytest.raises(PeerError, match="HTTP 404"):
        orthanc.get_json("/instances/no-such-instance")

    # The destination down: Orthanc's failure reaches the test as an error.
    scp.stop()
    assert not orthanc.echo("dest")
    with pytest.raises(PeerError, match="HTTP"):
        orthanc.send_to_modality("dest", [study])


@pytest.mark.orthanc
def test_orthanc_lua_forwards_a_stable_study_over_dicom(
    orthanc_peer: Callable[..., Orthanc], storescp_peer: StoreSCP
) -> None:
    scp = storescp_peer
    # Lua's SendToModality() takes instance ids only (a study id fails with "Unable to
    # read attachment"); a whole stable study goes through the REST route.
    forward = """
    function OnStableStudy(studyId, tags, metadata)
      RestApiPost('/modalities/dest/store', studyId)
    end
    """
    orthanc = orthanc_peer(
        modalities={"dest": (scp.ae_title, "127.0.0.1", scp.port)}, lua=[forward], stable_age=1
    )
    # The study arrives over DICOM (storescu into Orthanc's DICOM port), as from a modality.
    sent = storescu(SAMPLE, port=orthanc.dicom_port, called_ae=orthanc.aet)
    assert sent.returncode == 0, sent.output
    received = scp.wait_for_files(4, timeout=20)
    assert sop_instance_uids(received) == sop_instance_uids(sample_files())


@pytest.mark.orthanc
def test_orthanc_moves_to_fresh_ports_when_its_port_was_taken(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", dicomweb=False)
    taken = orthanc.http_port
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", taken))
        squatter.listen()
        with orthanc:
            assert orthanc.http_port != taken
            assert orthanc.get_json("/system")["HttpPort"] == orthanc.http_port
    assert not orthanc.running
    assert "Orthanc has stopped" in orthanc.log.read_text()
