"""Measured calcified length against the phantom's true length, per view, across spacings.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_vessels.py [--vendor Fuji]
        [--scales 1,0.5,0.3333,0.25] [--grades 1,2,3] [--seed 5]

Renders one study per grade (no DICOM written) at each scale of a vendor's detector
(Fuji: 0.05 mm at scale 1, so 0.05 / 0.1 / 0.15 / 0.2 mm), measures every view's true
BAC mask with :func:`bac_node.imaging.vessels.measure_vessels` and compares it with the
view's ``true_bac_length_mm`` and ``true_vessel_count``. Prints a table and writes
``benchmarks/results/vessels.{json,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

from bac_node.imaging.vessels import measure_vessels
from training.phantom.study import plan_studies, render_study

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--vendor", default="Fuji")
    parser.add_argument("--scales", default="1,0.5,0.3333,0.25")
    parser.add_argument("--grades", default="1,2,3")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    print(f"{'spacing':>8} {'grade':>5} {'view':>6} {'true mm':>8} {'measured':>8} "
          f"{'error %':>7} {'vessels':>8} {'s':>5}")  # fmt: skip
    for scale in (float(s) for s in args.scales.split(",")):
        for grade in (int(g) for g in args.grades.split(",")):
            plan = plan_studies(
                1, args.seed, vendor=args.vendor, grades={grade: 1.0},
                prior_fraction=0.0, processing_fraction=0.0,
            )[0]  # fmt: skip
            rendered = render_study(plan, scale=scale)
            for (lat, view_name), view in rendered.views.items():
                spacing = view.pixel_spacing_mm
                started = time.perf_counter()
                measured = measure_vessels(view.bac_mask, (spacing, spacing))
                seconds = time.perf_counter() - started
                true = view.true_bac_length_mm
                error = 100.0 * (measured.length_mm / true - 1.0) if true > 0 else float("nan")
                row = {
                    "vendor": args.vendor, "scale": scale, "spacing_mm": round(spacing, 4),
                    "grade": grade, "view": f"{lat}-{view_name}",
                    "rows": view.shape[0], "columns": view.shape[1],
                    "true_length_mm": round(true, 2),
                    "measured_length_mm": round(measured.length_mm, 2),
                    "error_percent": round(error, 2),
                    "true_vessel_count": view.true_vessel_count,
                    "measured_vessel_count": measured.vessel_count,
                    "measured_longest_mm": round(measured.longest_mm, 2),
                    "seconds": round(seconds, 3),
                }  # fmt: skip
                rows.append(row)
                print(f"{spacing:8.3f} {grade:5d} {row['view']:>6} {true:8.1f} "
                      f"{measured.length_mm:8.1f} {error:+7.1f} "
                      f"{view.true_vessel_count:>3}/{measured.vessel_count:<4} {seconds:5.2f}",
                      flush=True)  # fmt: skip
    within = [abs(r["error_percent"]) <= 10 for r in rows if r["true_length_mm"] > 0]
    print(f"within 10 %: {sum(within)} of {len(within)} views")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": "benchmarks/bench_vessels.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": platform.platform(),
        "within_10_percent": f"{sum(within)} of {len(within)}",
        "rows": rows,
    }
    (args.out / "vessels.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    with (args.out / "vessels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
