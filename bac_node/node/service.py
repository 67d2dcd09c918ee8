"""The node as one process: SCP, scheduler (enqueue, export, leases, retention) and workers.

``bac-node serve`` runs :class:`Node` until SIGTERM or SIGINT; ``bac-node worker`` runs
:func:`run_workers` against the same database. Stopping is graceful: the SCP stops
accepting associations and lets the ones in flight finish their stores, workers finish
or release their job (its lease is given back, so another worker takes it at once),
the scheduler stops, and only then does the process exit. A second signal exits at once
(the database and the files on disk stay consistent either way: every acknowledged
instance was fsynced and committed before its Success).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from bac_node.config import Settings, redact_url
from bac_node.model.weights import ModelCard
from bac_node.node.db import Database, open_database

log = logging.getLogger(__name__)

# How often the main thread of `serve`/`worker` looks for a stop signal.
SIGNAL_POLL_SECONDS = 0.2


def owner_name(role: str, index: int = 0) -> str:
    """A lease owner name unique across hosts, processes and threads."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}{index}"


@dataclass
class Node:
    """The SCP, the scheduler and ``workers`` worker threads over one data directory.

    ``predictor``/``card`` let a caller that already loaded a model (the demo, tests)
    share it; otherwise the model is loaded once from ``settings.model``.
    """

    settings: Settings
    host: str = ""
    port: int | None = None
    workers: int = 1
    predictor: Any = None
    card: ModelCard | None = None
    db: Database = field(init=False)
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _worker_objects: list[Any] = field(init=False, default_factory=list)

    def start(self) -> None:
        from bac_node.node.export import Exporter, warn_if_no_destinations
        from bac_node.node.scheduler import NodeScheduler
        from bac_node.node.scp import start_scp
        from bac_node.node.store import InstanceStore
        from bac_node.node.worker import Worker

        # 0700: received images hold patient data (files are 0600: mkstemp's mode)
        self.settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = open_database(self.settings.database or self.settings.data_dir)
        if self.workers:
            if self.predictor is None or self.card is None:
                first = Worker.from_settings(self.settings, self.db, owner=owner_name("worker"))
                self.predictor, self.card = first.predictor, first.card
            for index in range(self.workers):
                worker = Worker(
                    self.settings, self.db, predictor=self.predictor, card=self.card,
                    owner=owner_name("worker", index),
                )  # fmt: skip
                self._worker_objects.append(worker)
                thread = threading.Thread(
                    target=worker.run_forever, args=(self._stop,), name=f"worker-{index}",
                    daemon=True,
                )  # fmt: skip
                self._threads.append(thread)
        warn_if_no_destinations(self.settings, log)
        self.exporter = Exporter(self.settings, self.db, owner=owner_name("exporter"))
        self.scheduler = NodeScheduler(self.settings, self.db, exporter=self.exporter)
        self.store = InstanceStore(self.settings, self.db)
        self.scp = start_scp(self.settings, self.store, host=self.host, port=self.port)
        if self.settings.http_port >= 0:  # -1: no HTTP interface (bac_node.node.http)
            from bac_node.node.http import start_http

            self.http = start_http(
                self.settings, self.db, self.store, host=self.host,
                model_problem=self._model_problem,
            )  # fmt: skip
        self.scheduler.start()
        for thread in self._threads:
            thread.start()
        log.info(
            "bac-node listening as %s on %s:%d (%d worker(s), data in %s)",
            self.settings.ae_title, self.host or "0.0.0.0", self.scp.port, self.workers,
            self.settings.data_dir,
        )  # fmt: skip

    @property
    def bound_port(self) -> int:
        return int(self.scp.port)

    @property
    def http_port(self) -> int | None:
        """The HTTP interface's port (the one chosen when ``http_port`` is 0); None if off."""
        return self.http.port if hasattr(self, "http") else None

    def _model_problem(self) -> str | None:
        """For /readyz: None when this process's workers have their model and are alive."""
        if not self.workers:
            return None  # receive-and-export only: workers run elsewhere
        if self.predictor is None:
            return "model not loaded"
        started = [t for t in self._threads if t.ident is not None]
        if started and not all(t.is_alive() for t in started) and not self._stop.is_set():
            return "a worker thread has died"
        return None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting, finish in-flight stores, finish or release jobs, then stop."""
        from bac_node.node.queue import release_jobs

        log.info("stopping: no new associations; finishing stores in flight")
        # start() may have failed part way (a port in use): stop what did start.
        if hasattr(self, "scp"):
            self.scp.shutdown()
        if hasattr(self, "http"):
            self.http.shutdown()  # STOW-RS requests in flight finish their stores first
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        if hasattr(self, "scheduler"):
            self.scheduler.shutdown()
        if not hasattr(self, "db"):
            return
        for worker in self._worker_objects:
            released = release_jobs(self.db, worker.owner)
            if released:
                log.info("released %d job(s) of %s for another worker", released, worker.owner)
        self.db.dispose()
        log.info("stopped")


def run_until_signal(start: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run ``start``, wait for SIGTERM/SIGINT, run ``stop``; a second signal exits at once.

    The handler only records the signal; the main thread polls for it. Setting a
    ``threading.Event`` from a handler can deadlock: the handler runs on the main thread,
    which may be holding that event's lock inside ``Event.wait`` at that very moment (a
    SIGTERM right as ``start`` returned hung ``serve`` exactly so).

    SIGUSR1 writes every thread's stack to stderr (the log) and carries on: what an
    administrator, or a test, needs when a stop takes longer than it should.
    """
    received: list[int] = []

    def handle(signum: int, _frame: FrameType | None) -> None:
        if received:
            os.write(2, f"second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(128 + signum)
        received.append(signum)

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        start()
        while not received:
            time.sleep(SIGNAL_POLL_SECONDS)
        log.info("%s received", signal.Signals(received[0]).name)
        stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(settings: Settings, *, host: str = "", workers: int = 1) -> None:
    node = Node(settings, host=host, workers=workers)
    run_until_signal(node.start, node.stop)


def run_workers(settings: Settings, *, count: int = 1) -> None:
    """``bac-node worker``: ``count`` worker threads on the database of ``settings``."""
    from bac_node.node.queue import release_jobs
    from bac_node.node.worker import Worker

    stop_event = threading.Event()
    state: dict[str, Any] = {}

    def start() -> None:
        db = open_database(settings.database or settings.data_dir)
        first = Worker.from_settings(settings, db, owner=owner_name("worker"))
        workers = [first] + [
            Worker(settings, db, predictor=first.predictor, card=first.card,
                   owner=owner_name("worker", i))
            for i in range(1, count)
        ]  # fmt: skip
        threads = [
            threading.Thread(target=w.run_forever, args=(stop_event,), daemon=True) for w in workers
        ]
        for thread in threads:
            thread.start()
        state.update(db=db, workers=workers, threads=threads)
        log.info(
            "%d worker(s) on %s, data in %s",
            count, redact_url(settings.database) or "its SQLite database", settings.data_dir,
        )  # fmt: skip

    def stop() -> None:
        stop_event.set()
        for thread in state["threads"]:
            thread.join(60)
        for worker in state["workers"]:
            release_jobs(state["db"], worker.owner)
        state["db"].dispose()

    run_until_signal(start, stop)
