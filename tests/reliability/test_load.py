"""Load: 20 concurrent associations, memory bounded; beyond the limit, a clean rejection.

One ``bac-node serve --workers 0`` subprocess (no analysis: this is ingestion's load)
with ``max_associations = 20``. At CI size each of the 20 associations stores 10 tiny
instances (the full size, 20 x 50, is ``python -m benchmarks.bench_load``; figures in
RELIABILITY.md). The peak RSS is serve's own VmHWM, read from /proc.

Beyond the limit: 20 associations are held open, then more are requested; each must be
answered with an A-ASSOCIATE-RJ (rejected-transient, service provider (presentation),
local limit exceeded: (2, 3, 2)), which pynetdicom shows as ``is_rejected``, never an
abort or a reset connection; the held associations still work, and once one is released
a new association is accepted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _crash import (
    LISTENING,
    MG_FOR_PRESENTATION,
    NODE_AE,
    SENDER_AE,
    Child,
    free_port,
    load_run,
    node_env,
    rejection,
    serve_child,
    vm_hwm,
    vm_rss,
    wait_for_log,
)
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from bac_node.node.db import Instance, open_database

pytestmark = [pytest.mark.slow]

LIMIT = 20
CI_PER_ASSOCIATION = 10
MIB = 1024**2
#: What 20 x 10 tiny stores may add to serve's peak RSS over its idle RSS.
MAX_GROWTH = 256 * MIB


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Child, int, Path]]:
    work = tmp_path_factory.mktemp("load")
    env = node_env(
        Path(""), allowed_peers=SENDER_AE, max_associations=LIMIT, stable_after=3600,
        network_timeout=120,
    )  # fmt: skip
    data_dir, port = work / "node", free_port()
    node = serve_child(data_dir, port, env).start()
    wait_for_log(node, LISTENING, 180)  # not a port probe: it would hold a slot
    yield node, port, data_dir
    assert node.stop() == 0, node.tail()


def associate(port: int) -> Association:
    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(MG_FOR_PRESENTATION, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE)


def test_twenty_concurrent_associations_store_everything_in_bounded_memory(
    serve: tuple[Child, int, Path],
) -> None:
    node, port, data_dir = serve
    idle = vm_rss(node.pid)
    run = load_run(port, LIMIT, CI_PER_ASSOCIATION)
    peak = vm_hwm(node.pid)
    figures = {
        "associations": run.associations, "per_association": run.per_association,
        "statuses": dict(run.statuses), "refused": run.refused, "most_at_once": run.most_at_once,
        "seconds": round(run.seconds, 1), "serve_idle_rss_mib": round(idle / MIB),
        "serve_peak_rss_mib": round(peak / MIB),
    }  # fmt: skip
    print(json.dumps(figures))
    assert run.refused == []
    assert run.most_at_once == LIMIT
    assert run.statuses == {"0x0000": LIMIT * CI_PER_ASSOCIATION}, node.tail()
    db = open_database(data_dir)
    try:
        with db.read() as session:
            rows = session.scalar(select(func.count()).select_from(Instance))
    finally:
        db.dispose()
    assert rows == LIMIT * CI_PER_ASSOCIATION
    assert peak - idle < MAX_GROWTH, f"serve's peak RSS {peak / MIB:.0f} MiB, idle {idle / MIB:.0f}"


def test_beyond_max_associations_new_ones_are_rejected_then_accepted(
    serve: tuple[Child, int, Path],
) -> None:
    node, port, _ = serve
    held = [associate(port) for _ in range(LIMIT)]
    try:
        assert all(a.is_established for a in held), [rejection(a) for a in held]
        extra = [associate(port) for _ in range(3)]
        assert [rejection(a) for a in extra] == ["rejected (2, 3, 2)"] * 3
        assert all(a.send_c_echo().Status == 0x0000 for a in held)
        held.pop().release()
        deadline = time.monotonic() + 10
        again = associate(port)
        while not again.is_established and time.monotonic() < deadline:
            time.sleep(0.2)  # the node notices the release a moment later
            again = associate(port)
        assert again.is_established, rejection(again)
        held.append(again)
        assert again.send_c_echo().Status == 0x0000
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    assert node.alive()
    assert "local limit exceeded" in node.tail(200_000)
