"""Training data: canvases cached from a labelled folder, patches, augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.datasets import (
    PatchDataset,
    WholeCanvasDataset,
    build_canvas_cache,
    intensity_augment,
    load_canvas,
    patch_origins,
    read_labelled_rows,
    split_of_patient,
)
from training.phantom.study import plan_studies, synthesize


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    synthesize(plan_studies(4, seed=90, processing_fraction=0.5), out, scale=0.05, progress=False)
    return out


def test_cache_has_one_canvas_per_study_view_with_its_truth(folder: Path, tmp_path: Path) -> None:
    records = build_canvas_cache(folder, tmp_path / "cache", spacing_mm=1.0)
    assert len(records) == 8  # 4 studies x (CC, MLO)
    rows = read_labelled_rows(folder)
    for record in records:
        image, bac = load_canvas(tmp_path / "cache", record)
        assert image.shape == bac.shape == record.shape
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert record.split == next(r["split"] for r in rows if r["study"] == record.study)
        # BAC lies on bright breast tissue, never on the empty canvas background.
        if bac.any():
            assert image[bac > 0].mean() > image[image > 0].mean() * 0.8
    again = build_canvas_cache(folder, tmp_path / "cache", spacing_mm=1.0)
    assert again == records  # cached, not remade


def test_splits_are_by_patient(folder: Path, tmp_path: Path) -> None:
    records = build_canvas_cache(folder, tmp_path / "cache", spacing_mm=1.0)
    seen: dict[str, set[str]] = {}
    for r in records:
        seen.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in seen.values())
    assert split_of_patient("PHANTOM-x") == split_of_patient("PHANTOM-x")
    shares = [split_of_patient(f"p{i}") for i in range(2000)]
    assert abs(shares.count("train") / 2000 - 0.7) < 0.04


@pytest.mark.parametrize(
    ("extent", "expected"), [(512, [0]), (100, [0]), (1000, [0, 126, 252, 378, 488])]
)
def test_patch_origins_cover_the_canvas(extent: int, expected: list[int]) -> None:
    starts = sorted({y for y, _ in patch_origins((extent, 10), 512, 386)})
    assert starts == expected


def test_patches_and_whole_canvases(folder: Path, tmp_path: Path) -> None:
    records = build_canvas_cache(folder, tmp_path / "cache", spacing_mm=1.0)
    patches = PatchDataset(tmp_path / "cache", records, size=64, overlap=32, augment=True)
    image, target = patches[0]
    assert image.shape == target.shape == (1, 64, 64)
    assert set(np.unique(target.numpy())) <= {0.0, 1.0}
    whole = WholeCanvasDataset(tmp_path / "cache", records, shape=(128, 256))
    image, target = whole[0]
    assert image.shape == (1, 128, 256) and target.shape == (1, 128, 256)


def test_intensity_augment_changes_only_intensity() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32), np.float32)
    image[8:24, 8:24] = 0.6
    out = intensity_augment(image, rng)
    assert out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    # No geometric change: the bright square stays where it was.
    assert (out[8:24, 8:24].mean() > out[:8].mean()) and not np.array_equal(out, image)


def test_a_manifest_without_required_columns_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("study,file\ns1,a.dcm\n")
    with pytest.raises(Exception, match="lacks"):
        read_labelled_rows(tmp_path)
