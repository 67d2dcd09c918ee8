"""`bac-node serve` as a subprocess on free loopback ports, for the tests that need the real
process (signals, restarts, the HTTP interface): test_serve.py, test_http.py.

The node runs with test-friendly timings (3 s stability wait, 1 s export backoff) and
its log goes to ``<data_dir>-serve.log`` next to the data directory; a stop that takes
longer than 60 s fails the test with the node's own stack dump (SIGUSR1).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from peers import free_port, wait_for_port

NODE_AE = "BACNODE"


class Serve:
    """A `bac-node serve` subprocess; ``settings`` become ``BAC_NODE_<NAME>`` variables."""

    def __init__(self, data_dir: Path, model: Path | None, **settings: Any) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.env = dict(
            os.environ,
            BAC_NODE_ALLOCATOR_TUNED="1",
            BAC_NODE_MODEL=str(model or ""),  # empty: the shipped model
            BAC_NODE_DEVICE="cpu",
            BAC_NODE_MIN_FREE_MB="1",
            BAC_NODE_NETWORK_TIMEOUT="10",
            BAC_NODE_STABLE_AFTER="3",
            BAC_NODE_EXPORT_BACKOFF="1",
            BAC_NODE_EXPORT_BACKOFF_CAP="2",
            **{f"BAC_NODE_{k.upper()}": str(v) for k, v in settings.items()},
        )
        self.log = data_dir.parent / f"{data_dir.name}-serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Serve:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bac_node", "--data-dir", str(self.data_dir),
                 "--port", str(self.port), "--ae-title", NODE_AE, "serve", "--host", "127.0.0.1"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until the DICOM port accepts connections (the process must stay alive)."""
        wait_for_port("127.0.0.1", self.port, timeout=120, alive=self.alive)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        """SIGTERM and the exit status; after 60 s, the node's stacks and a failed test."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)  # the node dumps its threads' stacks
            time.sleep(2)
            self.process.kill()
            self.process.wait(30)
            pytest.fail(f"serve did not stop within 60 s of SIGTERM:\n{self.tail(20000)}")

    def status(self) -> dict[str, Any]:
        """`bac-node status --json`, with the zero counts left out."""
        doc = dict(json.loads(self.cli("status", "--json").stdout))
        doc["counts"] = {
            table: {state: n for state, n in by_state.items() if n}
            for table, by_state in doc["counts"].items()
        }
        return doc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Another `bac-node` command on the same data directory and settings."""
        result = subprocess.run(
            [sys.executable, "-m", "bac_node", "--data-dir", str(self.data_dir), *args],
            env=self.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
