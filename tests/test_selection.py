"""Selection rules: which images of a study are paired, analysed alone or skipped, and why."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from bac_node.dicom.codes import MODIFIER_IMPLANT_DISPLACED, MODIFIER_SPOT_COMPRESSION, Code
from bac_node.dicom.reader import MGImage, read_instance
from bac_node.dicom.selection import BilateralPair, read_paths, select_studies
from bac_node.dicom.uids import derived_uid
from training.phantom.study import plan_studies, render_study, write_study

PRESENTATION, PROCESSING = "FOR PRESENTATION", "FOR PROCESSING"


def _write_phantom(vendor: str, out: Path, seed: int) -> list[dict[str, Any]]:
    """A small study of ``vendor`` with For Presentation and For Processing images."""
    for attempt in range(seed, seed + 50):
        plan = plan_studies(1, seed=attempt, vendor=vendor, processing_fraction=1.0)[0]
        if len(plan.intents) == 2:
            return write_study(render_study(plan, scale=0.05), out)
    raise AssertionError("no plan with both intents")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("study")
    return out, _write_phantom("Konica", out, seed=1)


@pytest.fixture(scope="module")
def images(study: tuple[Path, list[dict[str, Any]]]) -> dict[tuple[str, str, str], MGImage]:
    """The study's images by (laterality, view, intent)."""
    out, rows = study
    return {
        (r["laterality"], r["view"], r["presentation_intent"]): read_instance(out / r["file"])
        for r in rows
    }


def _variant(image: MGImage, **changes: Any) -> MGImage:
    """A new instance made from ``image``: a new SOP Instance UID and ``changes``."""
    ds = pydicom.dcmread(image.path) if image.path else image.dataset
    ds.SOPInstanceUID = derived_uid(image.sop_instance_uid, *sorted(changes.items()))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.filename = None
    return read_instance(ds)


def _with_modifier(image: MGImage, code: Code) -> MGImage:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
        code.value, code.scheme, code.meaning,
    )  # fmt: skip
    ds = pydicom.dcmread(image.path)  # type: ignore[arg-type]
    ds.SOPInstanceUID = derived_uid(image.sop_instance_uid, code.value)
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence([item])
    return read_instance(ds)


def _presentation(images: dict[tuple[str, str, str], MGImage]) -> list[MGImage]:
    return [im for key, im in images.items() if key[2] == PRESENTATION]


def _reasons(skipped: list[tuple[str, str]]) -> dict[str, str]:
    return dict(skipped)


def test_four_views_make_two_pairs_and_processing_is_superseded(
    images: dict[tuple[str, str, str], MGImage],
) -> None:
    [selection] = select_studies(images.values())
    assert [p.view for p in selection.pairs] == ["CC", "MLO"]
    for pair in selection.pairs:
        assert pair.right is images[("R", pair.view, PRESENTATION)]
        assert pair.left is images[("L", pair.view, PRESENTATION)]
    assert selection.single == []
    reasons = _reasons(selection.skipped)
    assert len(reasons) == 4
    for (lat, view, intent), image in images.items():
        if intent == PROCESSING:
            assert reasons[image.sop_instance_uid].startswith(
                f"For Processing image superseded by For Presentation {lat}-{view}"
            )
    assert selection.all_images() == [
        images[("R", "CC", PRESENTATION)], images[("L", "CC", PRESENTATION)],
        images[("R", "MLO", PRESENTATION)], images[("L", "MLO", PRESENTATION)],
    ]  # fmt: skip


def test_processing_only_study_is_paired_from_processing_images(
    images: dict[tuple[str, str, str], MGImage],
) -> None:
    [selection] = select_studies(im for key, im in images.items() if key[2] == PROCESSING)
    assert len(selection.pairs) == 2
    assert all(im.presentation_intent == PROCESSING for im in selection.all_images())
    assert selection.skipped == []


def test_presentation_wins_even_when_processing_is_later(
    images: dict[tuple[str, str, str], MGImage],
) -> None:
    later_processing = _variant(images[("R", "CC", PROCESSING)], AcquisitionTime="235959")
    [selection] = select_studies([*_presentation(images), later_processing])
    assert selection.pairs[0].right is images[("R", "CC", PRESENTATION)]
    assert (
        "superseded by For Presentation R-CC"
        in _reasons(selection.skipped)[later_processing.sop_instance_uid]
    )


def test_latest_of_several_presentation_images_is_kept(
    images: dict[tuple[str, str, str], MGImage],
) -> None:
    original = images[("L", "MLO", PRESENTATION)]
    retake = _variant(original, AcquisitionTime="101500", InstanceNumber=9)
    # Order of arrival must not matter: the retake wins either way.
    for order in ([original, retake], [retake, original]):
        others = [im for im in _presentation(images) if im is not original]
        [selection] = select_studies([*others, *order])
        assert selection.pairs[1].left is retake
        reason = _reasons(selection.skipped)[original.sop_instance_uid]
        assert (
            reason
            == f"For Presentation L-MLO superseded by a later one ({retake.sop_instance_uid})"
        )
    # Without any time, the instance number decides.
    numbered = _variant(original, InstanceNumber=42)
    for image in (original, numbered):
        for keyword in ("AcquisitionTime", "AcquisitionDate", "ContentTime", "ContentDate"):
            if keyword in image.dataset:
                delattr(image.dataset, keyword)
    [selection] = select_studies([numbered, original])
    assert selection.single[0][0] is numbered


def test_duplicates_are_collapsed_and_reported(
    study: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    out, rows = study
    first = out / rows[0]["file"]
    copy = tmp_path / "copy.dcm"
    shutil.copy(first, copy)
    images, rejected = read_paths([out, copy])
    assert rejected == []
    [selection] = select_studies(images)
    assert len(selection.pairs) == 2
    reason = _reasons(selection.skipped)[rows[0]["sop_instance_uid"]]
    assert reason == f"duplicate SOP instance: {copy} is another copy of {first}"
    assert selection.pairs[0].right.path == first  # the first copy read is kept


def test_supplementary_views_are_skipped_with_reasons(
    images: dict[tuple[str, str, str], MGImage],
) -> None:
    spot = _with_modifier(images[("R", "CC", PRESENTATION)], MODIFIER_SPOT_COMPRESSION)
    implant = _with_modifier(images[("L", "MLO", PRESENTATION)], MODIFIER_IMPLANT_DISPLACED)
    lateral = _variant(images[("L", "CC", PRESENTATION)], ViewPosition="ML")
    del lateral.dataset.ViewCodeSequence
    lateral = read_instance(lateral.dataset)
    [selection] = select_studies([*_presentation(images), spot, implant, lateral])
    assert len(selection.pairs) == 2
    reasons = _reasons(selection.skipped)
    assert reasons[spot.sop_instance_uid] == "R-CC with spot compression: not a screening view"
    assert reasons[implant.sop_instance_uid] == (
        "L-MLO with implant displaced: not a screening view"
    )
    assert reasons[lateral.sop_instance_uid] == "L-ML: not a screening view (CC or MLO)"


def test_one_side_only_is_analysed_alone(images: dict[tuple[str, str, str], MGImage]) -> None:
    right = [im for im in _presentation(images) if im.laterality == "R"]
    [selection] = select_studies(right)
    assert selection.pairs == []
    assert [(im.label, why) for im, why in selection.single] == [
        ("R-CC", "no left CC to pair with"),
        ("R-MLO", "no left MLO to pair with"),
    ]
    # A spot view of the missing side does not make a pair.
    spot = _with_modifier(images[("L", "CC", PRESENTATION)], MODIFIER_SPOT_COMPRESSION)
    [selection] = select_studies([*right, spot])
    assert selection.pairs == []
    assert len(selection.single) == 2


def test_bad_files_are_reported_and_the_rest_analysed(
    study: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    out, rows = study
    folder = tmp_path / "incoming"
    shutil.copytree(out / rows[0]["study"], folder)
    truncated = folder / "cut.dcm"
    data = (out / rows[0]["file"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    ct = pydicom.dcmread(out / rows[1]["file"])
    ct.Modality = "CT"
    pydicom.dcmwrite(folder / "ct.dcm", ct, enforce_file_format=True)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00not dicom" * 50)
    (folder / "notes.txt").write_text("ignored: not DICOM, inside a folder")

    images, rejected = read_paths([folder, garbage])
    assert len(images) == 8
    assert [Path(f).name for f, _ in rejected] == ["ct.dcm", "cut.dcm", "garbage.dcm"]
    for _file, reason in rejected:
        assert "\n" not in reason
        assert ct.PatientID not in reason and str(ct.PatientName) not in reason
    [selection] = select_studies(images, rejected)
    assert len(selection.pairs) == 2
    assert [f for f, _ in selection.skipped if f.endswith(".dcm")] == [f for f, _ in rejected]


def test_two_studies_and_rejects_go_to_the_nearest(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    rows_a = _write_phantom("Agfa", a, seed=5)
    rows_b = _write_phantom("Agfa", b, seed=60)
    assert rows_a[0]["study_instance_uid"] != rows_b[0]["study_instance_uid"]
    bad = b / rows_b[0]["study"] / "dicom" / "broken.dcm"
    bad.write_bytes(b"DICM")
    images, rejected = read_paths([a, b, bad])
    selections = select_studies(images, rejected)
    assert [s.study_instance_uid for s in selections] == [
        rows_a[0]["study_instance_uid"], rows_b[0]["study_instance_uid"],
    ]  # fmt: skip
    assert all(len(s.pairs) == 2 for s in selections)
    assert not any(f == str(bad) for f, _ in selections[0].skipped)
    assert (str(bad), rejected[0][1]) in selections[1].skipped
    assert select_studies([], rejected) == []


def test_bilateral_pair_checks_its_images(images: dict[tuple[str, str, str], MGImage]) -> None:
    right, left = images[("R", "CC", PRESENTATION)], images[("L", "CC", PRESENTATION)]
    assert BilateralPair("CC", right, left).left is left
    with pytest.raises(ValueError, match="not R-CC"):
        BilateralPair("CC", left, right)
    with pytest.raises(ValueError, match="CC or MLO"):
        BilateralPair("ML", right, left)
