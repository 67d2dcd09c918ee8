"""A tiny run of every benchmark (``python -m benchmarks --quick``), so the code cannot rot.

The figures of a smoke run mean nothing; what is checked is that each benchmark runs
the real thing end to end (real dcmtk peers, the real node, the ONNX backend; the
torch/ONNX parity is tests/test_onnx.py's) and writes the JSON its README figures come
from, with sane values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _processing_helpers import save_tiny_model
from phantom_fixtures import require_tool

from benchmarks.__main__ import main as run_benchmarks
from benchmarks.bench_analysis import STAGES

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk, pytest.mark.network]


def rows(out: Path, name: str) -> list[dict[str, Any]]:
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["meta"]["machine"]["cores"] >= 1
    assert doc["meta"]["command"].startswith("python -m benchmarks.")
    found: list[dict[str, Any]] = doc["rows"]
    return found


def test_every_benchmark_runs_and_writes_its_json(tmp_path: Path) -> None:
    for tool in ("storescu", "storescp", "echoscu"):
        require_tool(tool)
    model = save_tiny_model(tmp_path / "tiny.safetensors")
    out = tmp_path / "results"
    run_benchmarks(["--quick", "--model", str(model), "--out", str(out)])

    ingest = rows(out, "bench_ingest")
    assert [r["receiver"] for r in ingest] == ["storescp", "bac-node"]
    assert all(r["instances"] == 4 and r["instances_per_s"] > 0 for r in ingest)
    assert ingest[0]["throughput_vs_storescp"] == 1.0

    queue = rows(out, "bench_queue")
    assert [r["workers"] for r in queue] == [1, 2]
    assert all(r["jobs"] == 20 and r["claims_per_s"] > 0 for r in queue)

    analysis = rows(out, "bench_analysis")
    (row,) = analysis
    assert row["backend"] == "onnx" and row["model"] == "bac-node-test-tiny 0.0.0+test"
    stages = sum(row[f"{stage}_s"] for stage in STAGES)
    assert 0 < stages <= row["total_s"] + 0.05, row
    assert row["inference_s"] > 0 and row["peak_rss_gib"] > 0

    (e2e,) = rows(out, "bench_end_to_end")
    assert e2e["mode"] == "sequential" and e2e["studies"] == 1
    assert 0 < e2e["p50_s"] <= e2e["p95_s"] <= e2e["max_s"]
    assert e2e["serve_peak_rss_gib"] > 0

    (workers,) = rows(out, "bench_workers")
    assert (workers["database"], workers["workers"], workers["studies"]) == ("sqlite", 1, 2)
    assert workers["studies_per_minute"] > 0 and workers["startup_seconds"] > 0
