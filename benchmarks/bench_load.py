"""Load at full size: concurrent associations into `bac-node serve`, its peak memory.

    .venv/bin/python -m benchmarks.bench_load [--associations 20] [--instances 50]
        [--out benchmarks/results]

``bac-node serve --workers 0`` (ingestion only: no analysis competes) with
``max_associations`` equal to ``--associations``; that many pynetdicom senders
associate at once, wait until all are established, then each stores ``--instances``
tiny MG instances (``tests/reliability/_crash.py``: ``load_run``). Then the same number
of associations is held open and three more are requested: each must be rejected
with an A-ASSOCIATE-RJ (2, 3, 2) "local limit exceeded". Prints the figures and writes
``benchmarks/results/bench_load.json``: statuses, stores per second, serve's RSS when idle
(after start) and its peak (VmHWM) after the load. ``test_load.py`` is the CI size.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, print_table, write_result

for folder in ("tests", "tests/node", "tests/reliability"):
    if str(REPO / folder) not in sys.path:
        sys.path.append(str(REPO / folder))

MIB = 1024**2


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--instances", type=int, default=50, help="Per association.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from _crash import (
        LISTENING,
        SENDER_AE,
        free_port,
        load_run,
        node_env,
        rejection,
        serve_child,
        vm_hwm,
        vm_rss,
        wait_for_log,
    )  # fmt: skip
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    with tempfile.TemporaryDirectory(prefix="bac-node-load-") as tmp:
        env = node_env(
            Path(""), allowed_peers=SENDER_AE, max_associations=args.associations,
            stable_after=3600, network_timeout=120,
        )  # fmt: skip
        port = free_port()
        node = serve_child(Path(tmp) / "node", port, env).start()
        try:
            wait_for_log(node, LISTENING, 300)
            idle = vm_rss(node.pid)
            run = load_run(port, args.associations, args.instances)
            peak = vm_hwm(node.pid)
            ae = AE(ae_title=SENDER_AE)
            ae.add_requested_context("1.2.840.10008.1.1", ExplicitVRLittleEndian)
            held = [ae.associate("127.0.0.1", port, ae_title="BACNODE")
                    for _ in range(args.associations)]  # fmt: skip
            beyond = [rejection(ae.associate("127.0.0.1", port, ae_title="BACNODE"))
                      for _ in range(3)]  # fmt: skip
            for assoc in held:
                if assoc.is_established:
                    assoc.release()
        finally:
            node.stop()
    stores = args.associations * args.instances
    row = {
        "associations": args.associations,
        "instances_per_association": args.instances,
        "stores": stores,
        "statuses": ", ".join(f"{n} x {s}" for s, n in sorted(run.statuses.items())),
        "refused_under_limit": len(run.refused),
        "most_at_once": run.most_at_once,
        "seconds": round(run.seconds, 1),
        "stores_per_s": round(stores / run.seconds, 1),
        "serve_idle_rss_mib": round(idle / MIB),
        "serve_peak_rss_mib": round(peak / MIB),
        "beyond_limit": ", ".join(beyond),
    }
    write_result("bench_load", [row], args.out)
    table = [{"figure": k, "value": v} for k, v in row.items()]
    print_table("Load (concurrent associations into serve)", table, ["figure", "value"])
    return [row]


if __name__ == "__main__":
    main()
