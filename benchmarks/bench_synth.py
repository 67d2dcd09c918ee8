"""Time `bac-node synth` on one full-resolution 4-view study per vendor style.

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \
        .venv/bin/python benchmarks/bench_synth.py [--vendors Fuji,Hologic] [--repeats 3]

Prints a table and writes benchmarks/results/synth.{json,csv}. Phases: anatomy
(rendering both breasts' CC and MLO with ground truth) and pixels + write (vendor
physics and processing, DICOM and mask files). The median over repeats is reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from training.phantom.study import plan_studies, render_study, write_study
from training.phantom.vendors import VENDORS, vendor_by_name

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--vendors", default=",".join(v.name for v in VENDORS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jpeg2000", action="store_true", help="Also time JPEG 2000 lossless.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    rows = []
    for name in args.vendors.split(","):
        style = vendor_by_name(name)
        modes = [False, True] if args.jpeg2000 and style.offers_jpeg2000_lossless else [False]
        for j2k in modes:
            anatomy, write = [], []
            for r in range(args.repeats):
                plan = plan_studies(
                    1, seed=100 + r, vendor=style.name, grades={2: 1.0},
                    processing_fraction=0.0, jpeg2000="always" if j2k else "never",
                )[0]  # fmt: skip
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    study = render_study(plan)
                    t1 = time.perf_counter()
                    write_study(study, Path(tmp))
                    t2 = time.perf_counter()
                anatomy.append(t1 - t0)
                write.append(t2 - t1)
            a, w = statistics.median(anatomy), statistics.median(write)
            rows.append(
                {
                    "vendor": style.name,
                    "matrix": f"{style.rows}x{style.columns}",
                    "megapixels_per_view": round(style.rows * style.columns / 1e6, 1),
                    "jpeg2000": j2k,
                    "anatomy_s": round(a, 2),
                    "pixels_and_write_s": round(w, 2),
                    "total_s": round(a + w, 2),
                    "repeats": args.repeats,
                }
            )
            print(
                f"{style.name:<8} {rows[-1]['matrix']:>10} j2k={j2k!s:<5} anatomy {a:5.2f} s"
                f"  pixels+write {w:5.2f} s  total {a + w:5.2f} s"
            )
    meta = {
        "command": "python benchmarks/bench_synth.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synth.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with (args.out / "synth.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
