"""Training end to end on the CI config: baseline, two pseudo-label rounds, export,
then `bac-node analyze` of the sample study with the exported model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bac_node.model.weights import load_model
from training.train import load_config, soft_jaccard_loss

REPO = Path(__file__).resolve().parents[1]
CI_CONFIG = REPO / "training" / "configs" / "ci.toml"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, BAC_NODE_ALLOCATOR_TUNED="1")
    return subprocess.run(
        [sys.executable, "-m", "bac_node", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


def test_configs_load() -> None:
    for name in ("ci.toml", "default.toml", "paper.toml"):
        config = load_config(REPO / "training" / "configs" / name)
        assert config.keep_fraction == 0.03 and config.min_bac_fraction == 0.007
    paper = load_config(REPO / "training" / "configs" / "paper.toml")
    assert (paper.patch_size, paper.patch_overlap, paper.rounds) == (512, 386, 10)
    assert paper.labelled.studies * 4 == 2560 and paper.unlabelled.studies * 4 == 6000


def test_soft_jaccard_loss_is_zero_for_a_perfect_prediction() -> None:
    import torch

    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:5, 2:5] = 1
    perfect = (target * 2 - 1) * 50  # logits far on the right side
    assert float(soft_jaccard_loss(perfect, target)) < 1e-3
    assert float(soft_jaccard_loss(-perfect, target)) > 0.9


@pytest.mark.slow
def test_ci_config_trains_exports_and_analyzes(tmp_path: Path) -> None:
    run = _run("train", "--config", CI_CONFIG, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    with (tmp_path / "run" / "log.csv").open() as fh:
        log = list(csv.DictReader(fh))
    stages = {row["stage"] for row in log}
    assert {"baseline", "round1", "round2"} <= stages
    rounds = [row for row in log if row["stage"].startswith("round") and row["epoch"] == "0"]
    assert len(rounds) == 2 and all(row["kept"] != "" for row in rounds)
    _, card = load_model(tmp_path / "run" / "final.safetensors")
    assert card.name == "bac-node-unet-ci"
    assert "validation_jaccard" in card.metrics and "seconds_per_epoch" in card.metrics
    assert "Not for clinical use" in card.intended_use
    assert (tmp_path / "run" / "baseline.safetensors").is_file()
    analyzed = _run(
        "analyze", REPO / "sample_dicom", "--out", tmp_path / "results",
        "--model", tmp_path / "run" / "final.safetensors",
    )  # fmt: skip
    assert analyzed.returncode == 0, analyzed.stderr[-2000:]
    assert "2.25.114867425315320975189791517370372022308" in analyzed.stdout
