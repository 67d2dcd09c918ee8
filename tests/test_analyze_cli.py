"""`bac-node analyze` end to end in a subprocess, with a small saved model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from phantom_fixtures import require_tool

from bac_node.model.factory import ModelConfig, fixed_seed_model
from bac_node.model.weights import ModelCard, save_model
from training.phantom.study import plan_studies, render_study, write_study

#: Timing attributes that say when an object was made; everything else must repeat.
_WHEN = {
    "ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "InstanceCreationDate",
    "InstanceCreationTime", "DateTime", "ContributionDateTime",
}  # fmt: skip


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = ModelConfig(encoder_depth=3, decoder_channels=(32, 16, 8))
    card = ModelCard(
        name="bac-node-test-small", version="0.0.0+test", architecture=config,
        input_spacing_mm=1.0, tile_size=128, tile_overlap=32,
        training_data="none: fixed-seed random weights, for tests",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("model") / "small.safetensors"
    save_model(path, fixed_seed_model(config, 0).eval(), card)
    return path


def _study(root: Path) -> list[dict[str, object]]:
    plan = plan_studies(1, seed=80, vendor="Siemens", grades={2: 1.0}, processing_fraction=0.0)[0]
    return write_study(render_study(plan, scale=0.05), root)


def _analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BAC_NODE_ALLOCATOR_TUNED="1")
    return subprocess.run(
        [sys.executable, "-m", "bac_node", "analyze", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def _content(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)

    def strip(dataset: pydicom.Dataset) -> None:
        for element in list(dataset):
            if element.keyword in _WHEN:
                del dataset[element.tag]
            elif element.VR == "SQ":
                for item in element.value:
                    strip(item)

    strip(ds)
    return ds


def test_analyze_writes_valid_seg_and_sr_and_repeats(small_model: Path, tmp_path: Path) -> None:
    rows = _study(tmp_path / "in")
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    first = _analyze(tmp_path / "in", "--out", out1, "--model", small_model)
    assert first.returncode == 0, first.stderr
    study_uid = str(rows[0]["study_instance_uid"])
    assert study_uid in first.stdout
    study_dir = out1 / study_uid
    segs = sorted(study_dir.glob("seg-*.dcm"))
    assert len(segs) == 4
    summary = json.loads((study_dir / "summary.json").read_text())
    assert summary["model"]["name"] == "bac-node-test-small"
    assert {i["sop_instance_uid"] for i in summary["images"]} == {
        r["sop_instance_uid"] for r in rows
    }
    assert summary["not_analysed"] == []
    dciodvfy = require_tool("dciodvfy")
    for path in [*segs, study_dir / "sr.dcm"]:
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, (path.name, errors)
    report = hd.sr.srread(study_dir / "sr.dcm")
    assert "not for clinical use" in str(report.SeriesDescription).lower()
    for seg in segs:
        back = hd.seg.segread(seg)
        assert back.Rows == pydicom.dcmread(tmp_path / "in" / str(rows[0]["file"])).Rows

    second = _analyze(tmp_path / "in", "--out", out2, "--model", small_model)
    assert second.returncode == 0, second.stderr
    names1 = sorted(p.name for p in study_dir.iterdir())
    names2 = sorted(p.name for p in (out2 / study_uid).iterdir())
    assert names1 == names2  # same UIDs, same files
    for name in names1:
        if name.endswith(".dcm"):
            assert _content(study_dir / name) == _content(out2 / study_uid / name), name
    again = json.loads((out2 / study_uid / "summary.json").read_text())
    assert {**summary, "seconds": 0} == {**again, "seconds": 0}


def test_bad_inputs_are_reported_and_the_rest_is_analysed(
    small_model: Path, tmp_path: Path
) -> None:
    rows = _study(tmp_path / "in")
    by_view = {(r["laterality"], r["view"]): tmp_path / "in" / str(r["file"]) for r in rows}
    # One side only for the MLO: the left MLO is gone.
    by_view[("L", "MLO")].unlink()
    # A truncated copy of the right CC and a non-MG instance beside the study.
    truncated = tmp_path / "in" / "truncated.dcm"
    data = by_view[("R", "CC")].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    ct = pydicom.dcmread(by_view[("L", "CC")])
    ct.Modality = "CT"
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.SOPInstanceUID = "2.25.1234"
    ct.save_as(tmp_path / "in" / "ct.dcm", enforce_file_format=True)

    run = _analyze(tmp_path / "in", "--out", tmp_path / "out", "--model", small_model)
    assert run.returncode == 0, run.stderr
    reasons = [ln for ln in run.stdout.splitlines() if ln.startswith("not analysed")]
    assert any("truncated.dcm" in ln for ln in reasons), run.stdout
    assert any("ct.dcm" in ln for ln in reasons), run.stdout
    assert any("L-MLO" in ln and "analysed alone" in ln for ln in reasons), run.stdout
    study_dir = tmp_path / "out" / str(rows[0]["study_instance_uid"])
    summary = json.loads((study_dir / "summary.json").read_text())
    assert len(summary["images"]) == 3
    assert len(summary["not_analysed"]) == 3
    texts: list[str] = []

    def collect(items: pydicom.Sequence) -> None:
        for item in items:
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            collect(item.get("ContentSequence", []))

    collect(pydicom.dcmread(study_dir / "sr.dcm").ContentSequence)
    text = "\n".join(texts)
    assert "truncated.dcm" in text and "ct.dcm" in text and "L-MLO" in text
    # No patient identifier in what the command printed.
    patient = pydicom.dcmread(by_view[("R", "CC")])
    assert str(patient.PatientID) not in run.stdout + run.stderr
    assert str(patient.PatientName) not in run.stdout + run.stderr


def test_analyze_without_mg_input_fails_with_a_reason(small_model: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.dcm").write_bytes(b"not dicom at all")
    run = _analyze(tmp_path / "in" / "notes.dcm", "--out", tmp_path / "out", "--model", small_model)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("Error: no analysable MG image")
    assert "Traceback" not in run.stderr
    shutil.rmtree(tmp_path / "in")
