"""Workers on other hosts: network namespaces joined to the node by veth, nothing on loopback.

The test builds two "hosts" with ``ip netns`` (each its own network stack: only ``lo``
and one veth; its own host name and IPC namespace through ``unshare --uts --ipc``; the
filesystem stays shared, as a network filesystem would be), their veths' other ends
on a bridge in the root namespace at ``10.231.N.1``. PostgreSQL (``pg.py``) and
``bac-node serve --workers 0`` (C-STORE in, scheduler, exporter, HTTP with a token)
listen on the bridge address only. In the namespaces:

- host A runs ``bac-node worker --database URL --data-dir NODE_DATA``: the shared data
  directory (here the same filesystem, in production a network filesystem);
- host B runs ``bac-node worker --database URL --data-dir SCRATCH --node-url
  http://10.231.N.1:PORT --token-file F``: inputs and results over the node's HTTP.

Two studies go to host A alone (B is stopped with SIGSTOP), then A stops and B
continues with two more: each host's worker provably analyses studies. Each study must
be analysed once (one done job, one result) by the expected host, every result reach
dcmtk's storescp, and nothing rely on loopback: inside a namespace 127.0.0.1 is the
namespace's own ``lo`` (connecting to PostgreSQL's port there is refused), and the
addresses the workers were given are the bridge's. Everything the test made (namespaces,
veths, the bridge) is removed on exit, failure included. Needs root and iproute2: skips
without them locally, fails in CI (``CI=true``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from _processing_helpers import save_tiny_model
from peers import StoreSCP, free_port, missing, port_open, storescu, wait_for_port
from pg import PostgresServer
from sqlalchemy import select

from bac_node.node.db import Database, Export, Job, Result, open_database
from benchmarks.bench_workers import clone_studies, phantom

pytestmark = [pytest.mark.postgres, pytest.mark.network, pytest.mark.slow, pytest.mark.dcmtk]

NODE_AE, SENDER_AE, DEST_AE = "BACNODE", "MODALITY", "PACS"
TOKEN = "netns-worker-token-0123456789"
VENV_BIN = Path(sys.executable).parent


# --- the network ---------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and run.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {run.stderr.strip()}")
    return run


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespaces: {reason}")
    pytest.skip(f"network namespaces: {reason}")


def _free_subnet() -> int:
    """A third octet N with no address of 10.231.N.0/24 on this machine."""
    used = str(_ip("-o", "-4", "addr").stdout)
    start = os.getpid() % 200 + 20
    for third in list(range(start, 250)) + list(range(20, start)):
        if f" 10.231.{third}." not in used:
            return third
    raise RuntimeError("no free 10.231.N.0/24 subnet")


@dataclass
class Host:
    """A network namespace with one veth on the bridge and its own host name."""

    name: str
    namespace: str
    address: str
    outer: str
    inner: str

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace under this host's name, with IPC objects
        of its own (System V, POSIX message queues); the same process id."""
        return [
            "ip", "netns", "exec", self.namespace, "unshare", "--uts", "--ipc",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv,
        ]  # fmt: skip

    def addresses(self) -> list[str]:
        shown = _ip("-n", self.namespace, "-o", "-4", "addr").stdout.splitlines()
        return sorted(line.split()[3] for line in shown)


@dataclass
class Network:
    """A bridge at ``10.231.N.1/24`` in the root namespace and hosts behind veths."""

    bridge: str
    gateway: str
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def make(cls, names: list[str]) -> Network:
        tag = os.getpid() % 100_000
        third = _free_subnet()
        network = cls(bridge=f"bnbr{tag}", gateway=f"10.231.{third}.1")
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            _ip("addr", "add", f"{network.gateway}/24", "dev", network.bridge)
            _ip("link", "set", network.bridge, "up")
            for index, name in enumerate(names):
                host = Host(
                    name=name, namespace=f"bacnode-{tag}-{index}",
                    address=f"10.231.{third}.{index + 2}",
                    outer=f"bn{tag}h{index}", inner=f"bn{tag}n{index}",
                )  # fmt: skip
                network.hosts.append(host)
                _ip("netns", "add", host.namespace)
                _ip("link", "add", host.outer, "type", "veth", "peer", "name", host.inner)
                _ip("link", "set", host.inner, "netns", host.namespace)
                _ip("link", "set", host.outer, "master", network.bridge, "up")
                _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.inner)
                _ip("-n", host.namespace, "link", "set", host.inner, "up")
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            network.remove()
            raise
        return network

    def remove(self) -> None:
        """Delete whatever of the network exists (processes inside are killed first)."""
        for host in self.hosts:
            pids = _ip("netns", "pids", host.namespace, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", host.namespace, check=False)
            _ip("link", "del", host.outer, check=False)
        _ip("link", "del", self.bridge, check=False)


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0:
        _unavailable("root is needed (ip netns add)")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            missing(tool)
    probe = f"bacnode-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode:
        _unavailable(f"ip netns add failed: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)
    made_network = Network.make(["bac-host-a", "bac-host-b"])
    try:
        yield made_network
    finally:
        made_network.remove()
    leftovers = _ip("netns", "list").stdout + _ip("-o", "link").stdout
    assert made_network.bridge not in leftovers
    assert all(h.namespace not in leftovers for h in made_network.hosts)


# --- processes -------------------------------------------------------------------------------


class Processes:
    """bac-node processes (root namespace or a host's), each logging to ``<name>.log``."""

    def __init__(self, folder: Path, **settings: str) -> None:
        self.folder = folder
        self.env = dict(
            os.environ, BAC_NODE_ALLOCATOR_TUNED="1", BAC_NODE_DEVICE="cpu",
            BAC_NODE_MIN_FREE_MB="1", BAC_NODE_LOG_LEVEL="INFO",
            **{f"BAC_NODE_{k.upper()}": v for k, v in settings.items()},
        )  # fmt: skip
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("ab") as log:
            child = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.running[name] = child
        return child

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {n}.log ---\n{self.log(n)[-chars:]}" for n in self.running)

    def check_alive(self, *names: str) -> None:
        for name in names:
            code = self.running[name].poll()
            assert code is None, f"{name} exited with {code}\n{self.logs()}"

    def stop(self, name: str) -> int:
        child = self.running[name]
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
            child.send_signal(signal.SIGTERM)
        try:
            return child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(30)
            pytest.fail(f"{name} did not stop within 60 s of SIGTERM\n{self.logs()}")

    def stop_all(self) -> dict[str, int]:
        return {name: self.stop(name) for name in list(self.running)}


def _wait(condition: Callable[[], object], timeout: float, what: str, group: Processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{group.logs()}")
        time.sleep(0.2)


def _jobs(db: Database) -> list[Job]:
    with db.read() as s:
        return list(s.scalars(select(Job).order_by(Job.id)))


def _connects_from(host: Host, address: str, port: int) -> bool:
    """Whether a TCP connection from inside ``host`` to ``address:port`` is accepted."""
    probe = (
        "import socket,sys\n"
        f"try: socket.create_connection(({address!r}, {port}), timeout=5).close()\n"
        "except OSError: sys.exit(1)\n"
    )
    run = subprocess.run(
        ["ip", "netns", "exec", host.namespace, sys.executable, "-c", probe],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return run.returncode == 0


# --- the test --------------------------------------------------------------------------------


def test_workers_in_network_namespaces_reach_postgresql_and_the_node_over_veth_only(
    network: Network, tmp_path: Path
) -> None:
    host_a, host_b = network.hosts
    gateway = network.gateway
    data_dir, scratch = tmp_path / "node-data", tmp_path / "scratch-b"
    data_dir.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    model = save_tiny_model(tmp_path / "tiny.safetensors")
    studies = clone_studies(phantom(tmp_path / "phantom"), tmp_path / "studies", 4)

    # Each namespace: lo and its veth only; 127.0.0.1 there is its own.
    for host in network.hosts:
        assert host.addresses() == sorted(["127.0.0.1/8", f"{host.address}/24"])

    with (
        PostgresServer(host=gateway) as postgres,
        StoreSCP(tmp_path / "pacs", ae_title=DEST_AE) as pacs,
    ):
        url = postgres.create_database("netns")
        assert postgres.listen == (gateway,)
        db = open_database(url)
        group = Processes(
            tmp_path, model=str(model), lease_seconds="30", destinations=pacs.destination,
            allowed_peers=SENDER_AE, stable_after="60", export_backoff="1",
            export_backoff_cap="2", network_timeout="10", http_tokens=TOKEN,
        )  # fmt: skip
        try:
            dicom_port, http_port = free_port(gateway), free_port(gateway)
            group.env["BAC_NODE_HTTP_PORT"] = str(http_port)
            node = group.start("serve", [
                sys.executable, "-m", "bac_node", "--data-dir", str(data_dir), "--database", url,
                "--port", str(dicom_port), "--ae-title", NODE_AE,
                "serve", "--host", gateway, "--workers", "0",
            ])  # fmt: skip
            node_url = f"http://{gateway}:{http_port}"
            worker_a = group.start("worker-a", host_a.command(
                str(VENV_BIN / "bac-node"), "worker", "--database", url,
                "--data-dir", str(data_dir),
            ))  # fmt: skip
            worker_b = group.start("worker-b", host_b.command(
                str(VENV_BIN / "bac-node"), "worker", "--database", url, "--data-dir",
                str(scratch), "--node-url", node_url, "--token-file", str(token_file),
            ))  # fmt: skip
            # The workers were given the bridge's address (PostgreSQL, the node), no
            # loopback one.
            assert not ipaddress.ip_address(gateway).is_loopback
            for child in (worker_a, worker_b):
                argv = [str(a) for a in child.args]  # type: ignore[union-attr]
                given = [a for a in argv if a.startswith(("postgresql", "http"))]
                assert given and all(f"@{gateway}:" in a or f"//{gateway}:" in a for a in given)
                assert not any("127.0.0.1" in a or "localhost" in a for a in argv)

            wait_for_port(gateway, http_port, timeout=180, alive=lambda: node.poll() is None)
            _wait(lambda: "worker bac-host-a:" in group.log("worker-a"), 180, "worker A", group)
            _wait(lambda: "worker bac-host-b:" in group.log("worker-b"), 180, "worker B", group)
            group.check_alive("serve", "worker-a", "worker-b")
            # Loopback leads nowhere: inside a host, PostgreSQL's and the node's ports on
            # 127.0.0.1 refuse, while the bridge address answers; the root namespace's
            # loopback has neither (they listen on the bridge address only).
            for host in network.hosts:
                assert _connects_from(host, gateway, postgres.port)
                assert not _connects_from(host, "127.0.0.1", postgres.port)
                assert not _connects_from(host, "127.0.0.1", http_port)
            assert not port_open("127.0.0.1", postgres.port)
            assert not port_open("127.0.0.1", http_port)

            # Phase 1: host A alone (B stopped), two studies.
            worker_b.send_signal(signal.SIGSTOP)
            send(studies[:2], gateway, dicom_port)
            _wait(lambda: _done(db) == 2, 240, "2 jobs done by host A", group)
            group.check_alive("serve", "worker-a")
            assert group.stop("worker-a") == 0, group.logs()

            # Phase 2: host B alone, two more, over HTTP.
            worker_b.send_signal(signal.SIGCONT)
            send(studies[2:], gateway, dicom_port)

            def all_exported() -> bool:
                group.check_alive("serve", "worker-b")
                with db.read() as s:
                    states = [e.state for e in s.scalars(select(Export))]
                return _done(db) == 4 and states == ["done"] * 4

            _wait(all_exported, 300, "4 jobs done and exported", group)
            received = pacs.wait_for_files(4 * 5, timeout=60)  # 4 SEG + 1 SR per study
            codes = group.stop_all()
            assert codes == {"serve": 0, "worker-a": 0, "worker-b": 0}, group.logs()
        finally:
            group.stop_all()

        jobs = _jobs(db)
        with db.read() as s:
            results = list(s.scalars(select(Result)))
        db.dispose()

    # Each study analysed once, by the expected host's worker process.
    assert [j.state for j in jobs] == ["done"] * 4 and [j.attempts for j in jobs] == [1] * 4
    assert len({j.study_id for j in jobs}) == 4
    assert sorted(r.job_id for r in results) == [j.id for j in jobs]
    owners = [j.lease_owner or "" for j in jobs]
    assert owners[:2] == [f"bac-host-a:{worker_a.pid}:worker0"] * 2, owners
    assert owners[2:] == [f"bac-host-b:{worker_b.pid}:worker0"] * 2, owners
    # Host B's results reached the node's data directory over HTTP, where the exporter
    # read them; its scratch folder is empty again.
    log_b = group.log("worker-b")
    assert f"fetched from {node_url}" in log_b and f"uploaded to {node_url}" in log_b
    expected = set()
    for result in results:
        for name in result.files:
            expected.add(
                str(pydicom.dcmread(data_dir / name, stop_before_pixels=True).SOPInstanceUID)
            )
    got = [path.name.split(".", 1)[1] for path in received]
    assert len(got) == len(set(got)) == 20 and set(got) == expected
    assert [p for p in scratch.rglob("*") if p.is_file()] == []


def send(files: list[list[Path]], host: str, port: int) -> None:
    sent = storescu([f for study in files for f in study], port=port, called_ae=NODE_AE,
                    calling_ae=SENDER_AE, host=host, timeout=120)  # fmt: skip
    assert sent.returncode == 0, sent.output


def _done(db: Database) -> int:
    return sum(j.state == "done" for j in _jobs(db))
