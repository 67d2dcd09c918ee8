"""Analysis: seconds per full-resolution 4-view study, by stage, for each backend.

    python -m benchmarks.bench_analysis [--vendors Fuji,Hologic] [--backends torch,onnx]
                                        [--repeats 1] [--scale 1]

Makes one phantom 4-view study per vendor style (not timed), then analyses it in a
fresh child process per (vendor, backend, repeat), exactly as ``bac-node analyze`` and
the worker do: the real :func:`bac_node.analysis.measure_study`,
:func:`bac_node.results.build_results` and :func:`bac_node.results.write_results`,
with the shipped model, the tuned allocator and every core. The model is loaded and
run once on a small canvas first (not timed: a worker does it once). Stages are timed
by wrapping the functions the analysis calls:

* read: ``read_paths`` + ``select_studies`` (headers, validation; compressed pixel data
  is decoded here);
* decode: the first ``pixel_array`` of each image (uncompressed: unpacked here);
* display: the display transform (Modality/VOI LUT, MONOCHROME1);
* breast mask: the full-range transform and ``breast_mask``;
* resample: ``CanvasLayout.render`` (both breasts onto the model's canvas);
* inference: the predictor (tiles, network, blending);
* inverse mapping: ``CanvasLayout.to_source`` plus the rest of ``measure_study``
  (geometry, thresholds, areas);
* SEG/SR build, write: ``build_results``, ``write_results``.

Peak RSS is the child's (``ru_maxrss``). Exams/hour = 3600 / total for one worker.
The backends' outputs are compared image by image (BAC pixels, grade): ONNX Runtime
must not change a result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    GIB,
    RESULTS,
    child_env,
    median,
    print_table,
    synth_studies,
    write_result,
)

NAME = "bench_analysis"
STAGES = ("read", "decode", "display", "breast_mask", "resample", "inference",
          "inverse_mapping", "seg_sr_build", "write")  # fmt: skip


def analyse_child(study: Path, backend: str, out: Path, model_path: str | None) -> dict[str, Any]:
    """Analyse ``study`` once with ``backend``; its stage times, results and peak RSS."""
    import numpy as np

    import bac_node.analysis as analysis
    import bac_node.results as results
    from bac_node.dicom.selection import read_paths, select_studies
    from bac_node.imaging.canvas import CanvasLayout
    from bac_node.model.inference import load_predictor

    t0 = time.perf_counter()
    predictor, card, untrained = load_predictor(model_path, device="cpu", backend=backend)
    load_seconds = time.perf_counter() - t0
    predictor(np.zeros((512, 512), np.float32))  # warm-up, as a worker's first job would
    stages: dict[str, float] = defaultdict(float)

    def timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages[stage] += time.perf_counter() - start

        return wrapper

    # The analysis module's own references, so measure_study calls the timed ones.
    presentation = getattr(analysis, "presentation_pixels")  # noqa: B009

    def shown(ds: Any, *, voi: bool = True) -> Any:
        start = time.perf_counter()
        ds.pixel_array  # noqa: B018 (decoded once; pydicom keeps it on the dataset)
        stages["decode"] += time.perf_counter() - start
        return timed("display" if voi else "breast_mask", presentation)(ds, voi=voi)

    setattr(analysis, "presentation_pixels", shown)  # noqa: B010
    setattr(analysis, "breast_mask", timed("breast_mask", getattr(analysis, "breast_mask")))  # noqa: B009, B010
    setattr(CanvasLayout, "render", timed("resample", CanvasLayout.render))  # noqa: B010
    setattr(CanvasLayout, "to_source", timed("inverse_mapping", CanvasLayout.to_source))  # noqa: B010
    model = analysis.CanvasModel(card.input_spacing_mm, card.threshold)

    start = time.perf_counter()
    images, rejected = timed("read", read_paths)([study])
    (selection,) = timed("read", select_studies)(images, rejected)
    t_measure = time.perf_counter()
    result = analysis.measure_study(selection, timed("inference", predictor), model)
    measured = time.perf_counter() - t_measure
    inner = sum(stages[s] for s in STAGES if s not in ("read", "seg_sr_build", "write"))
    stages["inverse_mapping"] += measured - inner  # geometry, thresholds, areas
    outputs = timed("seg_sr_build", results.build_results)(result, card)
    timed("write", results.write_results)(outputs, out)
    total = time.perf_counter() - start
    return {
        "backend": type(predictor).__name__,
        "untrained": untrained,
        "model": f"{card.name} {card.version}",
        "model_load_s": load_seconds,
        "stages": {s: stages[s] for s in STAGES},
        "total_s": total,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "images": {
            r.image.sop_instance_uid: [r.burden.bac_pixels, r.burden.breast_pixels]
            for r in result.images
        },
        "matrix": [[r.image.rows, r.image.columns] for r in result.images],
        "grade": int(result.grade),
    }


def run_child(study: Path, backend: str, work: Path, model_path: str | None) -> dict[str, Any]:
    """One child's report; ``torch+passive`` is torch with ``OMP_WAIT_POLICY=PASSIVE``."""
    report = work / f"report-{os.getpid()}-{time.monotonic_ns()}.json"
    args = [sys.executable, "-m", "benchmarks.bench_analysis", "--child", str(study),
            "--backend", backend.split("+")[0], "--report", str(report)]  # fmt: skip
    if model_path:
        args += ["--model", model_path]
    env = child_env(**({"OMP_WAIT_POLICY": "PASSIVE"} if backend.endswith("+passive") else {}))
    run = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"analysis child ({backend}) failed:\n{run.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--vendors", default="Fuji", help="Fuji: the largest matrix.")
    parser.add_argument(
        "--backends", default="torch,onnx,torch+passive",
        help="torch, onnx, auto; torch+passive: torch with OMP_WAIT_POLICY=PASSIVE.",
    )  # fmt: skip
    parser.add_argument("--model", help="A .safetensors model (default: the shipped one).")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="1: full resolution.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        with tempfile.TemporaryDirectory(prefix="bench-analysis-out-") as out:
            data = analyse_child(args.child, args.backend, Path(out), args.model)
        args.report.write_text(json.dumps(data))
        return []

    backends = args.backends.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-analysis-") as tmp:
        work = Path(tmp)
        for index, vendor in enumerate(args.vendors.split(",")):
            (study,) = synth_studies(work / vendor, 1, seed=50 + index, vendor=vendor,
                                     scale=args.scale)  # fmt: skip
            runs: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
            for repeat in range(args.repeats):
                for backend in backends if repeat % 2 == 0 else backends[::-1]:
                    runs[backend].append(run_child(study, backend, work, args.model))
            reference = runs[backends[0]][0]
            for backend in backends:
                done = runs[backend]
                total = median([r["total_s"] for r in done])
                first = done[0]
                differences = [
                    abs(first["images"][uid][0] - bac)
                    for uid, (bac, _) in reference["images"].items()
                ]
                rows.append({
                    "vendor": vendor,
                    "matrix": "x".join(map(str, first["matrix"][0])),
                    "backend": backend,
                    **{f"{s}_s": round(median([r["stages"][s] for r in done]), 2)
                       for s in STAGES},
                    "total_s": round(total, 2),
                    "exams_per_hour": round(3600 / total),
                    "peak_rss_gib": round(max(r["peak_rss_bytes"] for r in done) / GIB, 2),
                    "model_load_s": round(median([r["model_load_s"] for r in done]), 2),
                    "grade": first["grade"],
                    "grade_as_" + backends[0]: first["grade"] == reference["grade"],
                    "max_bac_pixel_difference_vs_" + backends[0]: max(differences),
                    "bac_pixels": sum(bac for bac, _ in first["images"].values()),
                    "model": first["model"],
                    "all_total_s": [round(r["total_s"], 2) for r in done],
                })  # fmt: skip
    columns = ["vendor", "matrix", "backend", *(f"{s}_s" for s in STAGES), "total_s",
               "exams_per_hour", "peak_rss_gib"]  # fmt: skip
    print_table("Analysis of one 4-view study, seconds by stage (CPU)", rows, columns)
    parity = ["vendor", "backend", "grade", f"grade_as_{backends[0]}", "bac_pixels",
              f"max_bac_pixel_difference_vs_{backends[0]}"]  # fmt: skip
    print_table("Backends' results", rows, parity)
    write_result(NAME, rows, args.out, repeats=args.repeats, scale=args.scale)
    return rows


if __name__ == "__main__":
    main()
