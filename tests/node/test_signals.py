"""`run_until_signal`, the stop logic of `serve` and `worker`, in this process.

The subprocess tests (test_serve.py) cover a real SIGTERM to `bac-node serve`; these pin
the timing cases down: a signal that arrives while ``start`` is still running (what a
supervisor does when it stops a node that is just coming up) must still stop it.
"""

from __future__ import annotations

import os
import signal

from bac_node.node.service import run_until_signal


def test_signal_during_start_stops() -> None:
    calls: list[str] = []
    before = signal.getsignal(signal.SIGTERM)

    def start() -> None:
        calls.append("start")
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (the main) thread at once

    run_until_signal(start, lambda: calls.append("stop"))
    assert calls == ["start", "stop"]
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_sigint_after_start_stops() -> None:
    calls: list[str] = []

    def start() -> None:
        calls.append("start")
        # Arrives while the main thread waits for it, not during start.
        signal.setitimer(signal.ITIMER_REAL, 0.3)

    previous_alarm = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    try:
        run_until_signal(start, lambda: calls.append("stop"))
    finally:
        signal.signal(signal.SIGALRM, previous_alarm)
    assert calls == ["start", "stop"]
