"""Real DICOM peers for integration tests: dcmtk's storescp/storescu/echoscu and Orthanc.

Every peer is a real program on a loopback port, started in a subprocess and stopped by
the test (a ``with`` block or a fixture finalizer), so a test that passes has talked DICOM
to software a hospital runs. Import it the way tests import phantom_fixtures (pytest puts
``tests/`` on ``sys.path`` for the test modules there)::

    from peers import Orthanc, StoreSCP, dciodvfy_errors, free_port, storescu

    def test_node_exports(tmp_path):
        with StoreSCP(tmp_path / "dest", ae_title="DEST") as dest:  # storescp, free port
            node = ...  # Settings(destinations=(dest.destination,)): "DEST@127.0.0.1:<port>"
            sent = storescu(files, port=node_port, called_ae="BACNODE", calling_ae="SCU")
            assert sent.returncode == 0, sent.output
            for path in dest.wait_for_files(5, timeout=60):
                assert dciodvfy_errors(path) == [], path.name

    def test_from_orthanc(orthanc_peer):  # the factory fixture
        node_port = free_port()
        orthanc = orthanc_peer(modalities={"bacnode": ("BACNODE", "127.0.0.1", node_port)})
        ids = [orthanc.upload(path) for path in files]
        orthanc.send_to_modality("bacnode", ids)  # C-STORE from Orthanc, waits for the end

Fixtures, function scope: ``storescp_peer`` (a started :class:`StoreSCP`, AE
``STORESCP``) and ``orthanc_peer`` (a factory taking :class:`Orthanc`'s keyword arguments
and returning a started server; every server it made is stopped at teardown, whether the
test passed or not, and a server that does not exit 0 is a teardown error). Bind them in
the test module (``storescp_peer = peers.storescp_peer``): importing the name and using
it as an argument reads to ruff as a redefinition (F811).

Decisions a next engineer needs:

- Ports come from :func:`free_port` (bind port 0, close, hand the number on), so another
  process can take a port in between. A peer that chose its own port starts again on a
  fresh one when the program says "already in use"; a port the caller gave is never
  changed, so ``StoreSCP.stop()`` then ``start()`` comes back on the same port (a
  destination that is down, then up again). An open port alone is not "ready" (it may be
  someone else's): storescp must answer a C-ECHO, Orthanc ``/system`` with its own
  DICOM port. :func:`wait_for_port` (for the node) checks only the port, plus ``alive``.
- storescp writes a file in place, before it answers the C-STORE, so a poller can see a
  half-written file. It runs ``--exec-on-reception`` synchronously to touch a marker in
  ``<directory>/.received/`` once a file is complete, and :meth:`StoreSCP.received` lists
  only files with a marker. The marker lands just after the C-STORE response: wait with
  :meth:`StoreSCP.wait_for_files` rather than count right after storescu returns.
- storescp accepts every storage SOP class dcmtk knows (SEG and Comprehensive SR
  included) in the uncompressed transfer syntaxes, dcmtk's default. ``+xa``
  (``accept_all_transfer_syntaxes=True``) is not the default: it prefers JPEG 2000
  *lossy* when a sender proposes several syntaxes in one context.
- :func:`storescu` sends all files in one association and proposes only their SOP
  classes (``--required``; storescu's default proposal fills all 128 presentation
  contexts with its own list, which lacks SEG). It goes on after a failed store
  (``--no-halt``: one bad file does not hide what happens to the others), and since
  storescu then exits 0 whatever happened, the wrapper reads its output: ``returncode``
  is 0 only if every file was sent and got Success or a Warning.
- Orthanc (Debian's 1.10.1) gets its own JSON configuration with every path in the
  test's folder: nothing is read from /etc/orthanc or written to /var/lib/orthanc. REST
  calls use urllib with proxies switched off (a CI ``http_proxy`` must not see loopback
  traffic). Its log is ``<folder>/orthanc.log``, and its tail is in every
  :class:`PeerError`. Start-up takes about 0.2 s, a graceful stop about 3 s (its HTTP and
  DICOM servers poll for shutdown), so the fixture signals all its servers, then waits.
  SIGTERM is sent once: a second one kills Orthanc without its shutdown.
- In Orthanc's Lua, ``SendToModality()`` takes instance ids only (a study id fails with
  "Unable to read attachment"); forward a stable study with
  ``RestApiPost('/modalities/<name>/store', studyId)``.
- Missing programs skip a test locally and fail it in CI (``CI=true``), like
  ``phantom_fixtures.require_tool``. Debian packages: dcmtk, dicom3tools, orthanc,
  orthanc-dicomweb.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import pytest

LOOPBACK = "127.0.0.1"
# Debian installs Orthanc outside a normal user's PATH.
ORTHANC_BINARIES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc")
# Where orthanc-dicomweb puts the plugin (`dpkg -L orthanc-dicomweb`).
DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
PACKAGES = {
    "storescp": "dcmtk",
    "storescu": "dcmtk",
    "echoscu": "dcmtk",
    "dcmdump": "dcmtk",
    "dciodvfy": "dicom3tools",
    "Orthanc": "orthanc",
    "libOrthancDicomWeb.so": "orthanc-dicomweb",
}
# The C-STORE statuses storescu prints under --verbose that mean "stored".
STORED = ("Success", "Warning")


class PeerError(RuntimeError):
    """A peer did not start, answer or stop; the message carries the tail of its log."""


def missing(name: str) -> NoReturn:
    """Skip the test for a missing program locally, fail it in CI (where it must exist)."""
    package = PACKAGES.get(name, name)
    message = f"{name} is not installed (Debian package {package})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of command-line tool ``name``; skip without it, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        missing(name)
    return path


# --- ports ------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listened on when asked.

    The port is released before it is returned, so another process may take it before the
    caller binds it; the peers below retry with a fresh port when that happens.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 20.0,
    *,
    alive: Callable[[], bool] | None = None,
    what: str = "",
    log: Path | None = None,
) -> float:
    """Wait until ``host:port`` accepts connections; return the seconds it took.

    ``alive`` is polled too: when the process that should listen has exited, waiting on is
    pointless, so :class:`PeerError` is raised at once (with the tail of ``log``).
    """
    name = what or f"{host}:{port}"
    start = time.monotonic()
    while True:
        if alive is not None and not alive():
            raise PeerError(f"{name} exited before listening on port {port}{log_tail(log)}")
        if port_open(host, port):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise PeerError(f"{name} not listening on port {port} after {timeout:g} s"
                            f"{log_tail(log)}")  # fmt: skip
        time.sleep(0.05)


def log_tail(log: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of ``log``, formatted to append to an error message."""
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {log} ---\n" + "\n".join(tail)


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = 15.0, *, signalled: bool = False
) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code (negative: a signal).

    ``signalled``: SIGTERM was sent already. It is not sent twice: Orthanc takes a second
    SIGTERM as "die now" and skips its graceful shutdown.
    """
    if process.poll() is None:
        if not signalled:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


# --- dcmtk: storescp --------------------------------------------------------------------


class StoreSCP:
    """dcmtk's ``storescp`` as a C-STORE destination writing into ``directory``.

    Use as a context manager (started on enter, stopped on exit) or call :meth:`start`
    and :meth:`stop`, as often as needed: the port stays the same, so a node configured
    with :attr:`destination` sees a destination go down and come back. Files are named
    ``<modality>.<SOPInstanceUID>``, so an instance sent twice is one file, overwritten;
    ``unique_filenames=True`` keeps every copy (to count duplicates). ``extra_args`` go to
    storescp before the port (the ``--sort-*`` options would hide files from
    :meth:`received`, which looks only at the top folder).
    """

    def __init__(
        self,
        directory: Path,
        *,
        ae_title: str = "STORESCP",
        port: int | None = None,
        unique_filenames: bool = False,
        accept_all_transfer_syntaxes: bool = False,
        extra_args: Sequence[str] = (),
        start_timeout: float = 20.0,
    ) -> None:
        self.directory = Path(directory)
        self.ae_title = ae_title
        self._port_chosen = port is None
        self.port = free_port() if port is None else port
        self.unique_filenames = unique_filenames
        self.accept_all_transfer_syntaxes = accept_all_transfer_syntaxes
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.log = self.directory.with_name(f"{self.directory.name}-storescp.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def markers(self) -> Path:
        """Where a marker per completely written file goes (see the module docstring)."""
        return self.directory / ".received"

    @property
    def destination(self) -> str:
        """This peer in ``Settings.destinations`` form: ``AE@127.0.0.1:port``."""
        return f"{self.ae_title}@{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        # #f is storescp's placeholder for the file it has just written.
        touch = f"touch {shlex.quote(str(self.markers))}/#f"
        args = [require_tool("storescp"), "--verbose", "-aet", self.ae_title]
        args += ["--output-directory", str(self.directory)]
        args += ["--exec-on-reception", touch, "--exec-sync"]
        if self.unique_filenames:
            args.append("--unique-filenames")
        if self.accept_all_transfer_syntaxes:
            args.append("--accept-all")
        return [*args, *self.extra_args, str(self.port)]

    def start(self) -> StoreSCP:
        """Start storescp and wait until it accepts connections; a no-op if running."""
        if self.running:
            return self
        self.markers.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
                )
            try:
                self._wait_until_ready()
                return self
            except PeerError:
                stop_process(self.process)
                port_taken = "already in use" in self.log.read_text(errors="replace")
                if not (self._port_chosen and port_taken and attempt < 2):
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _wait_until_ready(self) -> None:
        # An open port alone could be another program's (the free_port race): ready means
        # this storescp is alive and answers a C-ECHO to its AE title.
        deadline = time.monotonic() + self.start_timeout
        while True:
            wait_for_port(LOOPBACK, self.port, max(deadline - time.monotonic(), 0.1),
                          alive=self.alive, what=f"storescp {self.ae_title}",
                          log=self.log)  # fmt: skip
            if echoscu(port=self.port, called_ae=self.ae_title, network_timeout=1).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"storescp {self.ae_title} does not answer C-ECHO on port "
                                f"{self.port}{log_tail(self.log)}")  # fmt: skip
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.running

    def stop(self) -> None:
        """Stop storescp (SIGTERM, SIGKILL after 10 s); files received stay."""
        if self.process is not None:
            stop_process(self.process, timeout=10)
            self.process = None

    def received(self) -> list[Path]:
        """Files storescp has completely written, sorted by name."""
        if not self.markers.is_dir():
            return []
        done = (self.directory / marker.name for marker in self.markers.iterdir())
        return sorted(path for path in done if path.is_file())

    def wait_for_files(self, count: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least ``count`` files are received; return them all."""
        deadline = time.monotonic() + timeout
        while len(files := self.received()) < count:
            if time.monotonic() > deadline:
                raise PeerError(f"storescp {self.ae_title} received {len(files)} of {count} "
                                f"files in {timeout:g} s{log_tail(self.log)}")  # fmt: skip
            time.sleep(0.05)
        return files

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# --- dcmtk: storescu / echoscu ----------------------------------------------------------


class StoreResult(subprocess.CompletedProcess[str]):
    """storescu's run, judged: ``returncode`` is 0 only if every file was sent and stored.

    Under ``--no-halt`` storescu exits 0 after a refused store or a file it could not send,
    and it skips a file of a SOP class it does not know with a warning, so its output is
    read: ``responses`` holds the status of each C-STORE response in order (``Success``,
    ``Error: CannotUnderstand``, ...), ``errors`` its error lines and ``requests`` the
    number of C-STOREs it sent; ``storescu_returncode`` keeps its own exit code.
    """

    responses: list[str]
    errors: list[str]
    requests: int
    storescu_returncode: int

    @property
    def failures(self) -> list[str]:
        """Responses other than Success or a Warning."""
        return [r for r in self.responses if not r.startswith(STORED)]

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @classmethod
    def judge(cls, run: subprocess.CompletedProcess[str]) -> StoreResult:
        lines = (run.stdout + run.stderr).splitlines()
        result = cls(run.args, run.returncode, run.stdout, run.stderr)
        result.storescu_returncode = run.returncode
        result.requests = sum("Sending Store Request" in line for line in lines)
        result.responses = [
            line.split("Received Store Response", 1)[1].strip(" ()") or "Success"
            for line in lines
            if "Received Store Response" in line
        ]
        # storescu skips a file of a SOP class it does not know with a mere warning.
        result.errors = [
            line for line in lines if line.startswith(("E: ", "F: ")) or "ignoring file" in line
        ]
        incomplete = result.requests != len(result.responses) or result.requests == 0
        if run.returncode == 0 and (result.failures or result.errors or incomplete):
            result.returncode = 1
        return result


def storescu(
    files: Sequence[Path | str] | Path | str,
    *,
    port: int,
    called_ae: str,
    calling_ae: str = "STORESCU",
    host: str = LOOPBACK,
    timeout: float = 120.0,
    no_halt: bool = True,
    extra_args: Sequence[str] = (),
) -> StoreResult:
    """Send ``files`` (files or folders, scanned recursively) in one association.

    dcmtk timeouts (30 s to connect and for each network step) keep a dead peer from
    hanging the test; ``timeout`` bounds the whole run.
    """
    paths = [Path(files)] if isinstance(files, str | Path) else [Path(f) for f in files]
    if not paths:
        raise ValueError("storescu needs at least one file or folder")
    args = [require_tool("storescu"), "--verbose", "-aet", calling_ae, "-aec", called_ae]
    # Only the SOP classes of the files, as a modality does: storescu's default proposal
    # fills all 128 presentation contexts with its own list, which lacks SEG.
    args.append("--required")
    args += ["--timeout", "30", "--acse-timeout", "30", "--dimse-timeout", "30"]
    if any(path.is_dir() for path in paths):
        args += ["--scan-directories", "--recurse"]
    if no_halt:
        args.append("--no-halt")
    args += [*extra_args, host, str(port), *map(str, paths)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    return StoreResult.judge(run)


def echoscu(
    *,
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    host: str = LOOPBACK,
    network_timeout: int = 10,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """One C-ECHO; ``returncode`` 0 means the peer accepted the association and answered.

    ``network_timeout`` (s) bounds connecting and each protocol step, so a port held by a
    program that never answers fails fast; ``timeout`` bounds the whole run.
    """
    seconds = str(network_timeout)
    args = [require_tool("echoscu"), "--verbose", "-aet", calling_ae, "-aec", called_ae]
    args += ["--timeout", seconds, "--acse-timeout", seconds, "--dimse-timeout", seconds]
    args += [host, str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


# --- dicom3tools ------------------------------------------------------------------------


def dciodvfy_lines(path: Path) -> list[str]:
    """Everything ``dciodvfy`` says about ``path``: the IOD it read it as, then findings."""
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return (run.stdout + run.stderr).splitlines()


def dciodvfy_errors(path: Path, iod: str | None = None) -> list[str]:
    """The ``Error`` lines dciodvfy reports for ``path``; [] means valid.

    With ``iod`` (dciodvfy's name, e.g. ``Segmentation``, ``ComprehensiveSR``) the file
    must also be read as that IOD: a file dciodvfy cannot place is an error either way.
    """
    lines = dciodvfy_lines(path)
    errors = [line for line in lines if line.startswith("Error")]
    if iod is not None and (not lines or lines[0] != iod):
        errors.insert(0, f"Error - dciodvfy read {Path(path).name} as {lines[:1]}, not {iod}")
    return errors


# --- Orthanc ----------------------------------------------------------------------------

Modality = Sequence[str | int] | Mapping[str, Any]


def orthanc_binary() -> str:
    for name in ORTHANC_BINARIES:
        found = shutil.which(name)
        if found is not None:
            return found
    missing("Orthanc")


def dicomweb_plugin() -> str:
    for path in DICOMWEB_PLUGINS:
        if Path(path).is_file():
            return path
    missing("libOrthancDicomWeb.so")


class Orthanc:
    """Debian's Orthanc with its own configuration and storage under ``directory``.

    ``modalities`` become ``DicomModalities`` (name → ``(AE, host, port)`` or Orthanc's
    object form); ``lua`` are Lua script sources; ``config`` overrides any configuration
    key last. Stores from any AE are accepted and the called AE is not checked, so a node
    under test needs no entry to send results here.
    """

    def __init__(
        self,
        directory: Path,
        *,
        aet: str = "ORTHANC",
        modalities: Mapping[str, Modality] | None = None,
        lua: Sequence[str] = (),
        lua_scripts: Sequence[Path] = (),
        stable_age: int = 2,
        dicomweb: bool = True,
        http_port: int | None = None,
        dicom_port: int | None = None,
        config: Mapping[str, Any] | None = None,
        start_timeout: float = 30.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.directory = Path(directory)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.lua = tuple(lua)
        self.lua_scripts = tuple(Path(p) for p in lua_scripts)
        self.stable_age = stable_age
        self.dicomweb = dicomweb
        self._ports_chosen = http_port is None and dicom_port is None
        self.http_port = free_port() if http_port is None else http_port
        self.dicom_port = free_port() if dicom_port is None else dicom_port
        self.overrides = dict(config or {})
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self.config_path = self.directory / "orthanc.json"
        self.log = self.directory / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._signalled = False
        self.startup_seconds: float | None = None
        # No proxy for loopback, whatever http_proxy says.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def destination(self) -> str:
        """This server in ``Settings.destinations`` form: ``AET@127.0.0.1:port``."""
        return f"{self.aet}@{LOOPBACK}:{self.dicom_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def configuration(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        scripts = [str(p.resolve()) for p in self.lua_scripts]
        for index, source in enumerate(self.lua):
            script = self.directory / f"script-{index}.lua"
            script.write_text(source)
            scripts.append(str(script))
        storage = str(self.directory / "storage")
        config: dict[str, Any] = {
            "Name": "bac-node-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": False,  # loopback only, hence no authentication
            "AuthenticationEnabled": False,
            "WebDavEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {name: self._modality(m) for name, m in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            # Close an outgoing association as soon as a send is done, like most PACS do,
            # so a test sees one association per send.
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 30,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "LuaScripts": scripts,
            "Plugins": [dicomweb_plugin()] if self.dicomweb else [],
        }
        if self.dicomweb:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True}
        config.update(self.overrides)
        return config

    @staticmethod
    def _modality(modality: Modality) -> list[str | int] | dict[str, Any]:
        if isinstance(modality, Mapping):
            return dict(modality)
        return list(modality)

    def start(self) -> Orthanc:
        """Start Orthanc and wait until its REST API answers ``/system``."""
        if self.running:
            return self
        binary = orthanc_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.config_path.write_text(json.dumps(self.configuration(), indent=2))
            began, self._signalled = time.monotonic(), False
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(
                    [binary, str(self.config_path)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.directory,
                )  # fmt: skip
            try:
                self._wait_until_ready()
                self.startup_seconds = time.monotonic() - began
                return self
            except PeerError:
                stop_process(self.process, timeout=5)
                port_taken = "already in use" in self.log.read_text(errors="replace")
                if not (self._ports_chosen and port_taken and attempt < 2):
                    raise
                self.http_port, self.dicom_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if not self.running:
                raise PeerError(f"Orthanc exited while starting{log_tail(self.log)}")
            with contextlib.suppress(OSError):
                system = self.get_json("/system", timeout=1)
                if system.get("DicomPort") != self.dicom_port:
                    raise PeerError(f"another server answers on {self.http_url}: {system}")
                break
            if time.monotonic() > deadline:
                raise PeerError(f"Orthanc's REST API not answering after "
                                f"{self.start_timeout:g} s{log_tail(self.log)}")  # fmt: skip
            time.sleep(0.05)
        if self.dicomweb and "dicom-web" not in self.get_json("/plugins"):
            raise PeerError(f"Orthanc started without the DICOMweb plugin{log_tail(self.log)}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop gracefully (SIGTERM), kill after ``timeout`` s; Orthanc's exit code."""
        if self.process is None:
            return None
        code = stop_process(self.process, timeout, signalled=self._signalled)
        self.process, self._signalled = None, False
        return code

    def signal_stop(self) -> None:
        """Ask Orthanc to stop without waiting (several servers stop in parallel)."""
        if self.running and self.process is not None and not self._signalled:
            self.process.send_signal(signal.SIGTERM)
            self._signalled = True

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)

    # --- REST (urllib only) ---

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str | None = None,
        accept: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """One REST call; a non-2xx answer raises :class:`PeerError` with Orthanc's log."""
        request = urllib.request.Request(self.http_url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if accept:
            request.add_header("Accept", accept)
        try:
            with self._opener.open(request, timeout=timeout or self.request_timeout) as answer:
                return bytes(answer.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise PeerError(f"Orthanc {method} {path}: HTTP {error.code} {detail}"
                            f"{self.log_tail()}") from error  # fmt: skip

    def get_json(self, path: str, *, timeout: float | None = None) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post_json(self, path: str, payload: Any, *, timeout: float | None = None) -> Any:
        body = json.dumps(payload).encode()
        answer = self.request("POST", path, body, content_type="application/json",
                              timeout=timeout)  # fmt: skip
        return json.loads(answer) if answer.strip() else None

    def upload(self, path: Path) -> str:
        """Store one DICOM file through the REST API; its Orthanc instance id."""
        answer = self.request("POST", "/instances", Path(path).read_bytes(),
                              content_type="application/dicom")  # fmt: skip
        return str(json.loads(answer)["ID"])

    def instances(self) -> list[str]:
        return [str(i) for i in self.get_json("/instances")]

    def studies(self) -> list[str]:
        return [str(s) for s in self.get_json("/studies")]

    def find_study(self, study_uid: str) -> str | None:
        """The Orthanc id of the study with this Study Instance UID, or None."""
        query = {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        found = self.post_json("/tools/find", query)
        return str(found[0]) if found else None

    def study_instances(self, study_id: str) -> list[str]:
        return [str(i["ID"]) for i in self.get_json(f"/studies/{study_id}/instances")]

    def study_modalities(self, study_id: str) -> list[str]:
        """The Modality of every instance of the study (one entry per instance)."""
        out: list[str] = []
        for series in self.get_json(f"/studies/{study_id}/series"):
            modality = str(series["MainDicomTags"].get("Modality", ""))
            out += [modality] * len(series["Instances"])
        return out

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """The instance's tags by keyword (Orthanc's ``simplified-tags``)."""
        return dict(self.get_json(f"/instances/{instance_id}/simplified-tags"))

    def download(self, instance_id: str, path: Path) -> Path:
        """Write the instance's DICOM file to ``path`` (for dciodvfy, pydicom)."""
        path.write_bytes(self.request("GET", f"/instances/{instance_id}/file"))
        return path

    def send_to_modality(
        self, modality: str, resources: Sequence[str], *, timeout: float = 120.0
    ) -> dict[str, Any]:
        """C-STORE ``resources`` (any Orthanc ids) to a ``DicomModalities`` entry.

        Synchronous: returns Orthanc's summary once the association is closed; a failed
        send (HTTP error, or any instance not stored) raises :class:`PeerError`.
        """
        payload = {"Resources": list(resources), "Synchronous": True, "Timeout": int(timeout)}
        path = f"/modalities/{urllib.parse.quote(modality)}/store"
        answer = dict(self.post_json(path, payload, timeout=timeout + 10) or {})
        if answer.get("FailedInstancesCount", 0):
            raise PeerError(f"Orthanc could not send to {modality}: {answer}{self.log_tail()}")
        return answer

    def echo(self, modality: str) -> bool:
        """C-ECHO from Orthanc to a ``DicomModalities`` entry."""
        try:
            self.post_json(f"/modalities/{urllib.parse.quote(modality)}/echo", {})
        except PeerError:
            return False
        return True


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def storescp_peer(tmp_path: Path) -> Iterator[StoreSCP]:
    """A started storescp, AE ``STORESCP``, writing into ``tmp_path / "storescp"``."""
    with StoreSCP(tmp_path / "storescp", ae_title="STORESCP") as peer:
        yield peer


@pytest.fixture
def orthanc_peer(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """A factory of started Orthanc servers (keyword arguments of :class:`Orthanc`).

    Each server lives in its own folder under ``tmp_path``; all are stopped at teardown,
    in parallel, whether the test passed or not.
    """
    made: list[Orthanc] = []

    def make(**options: Any) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc-{len(made)}", **options)
        made.append(server)
        return server.start()

    yield make
    for server in made:
        server.signal_stop()
    # Every server is stopped before a bad exit is reported; a crash or a hang (killed
    # after the timeout) is worth an error even in a test that passed.
    codes = {server: server.stop() for server in made}
    bad = [f"{s.directory.name}: exit {code}{s.log_tail(15)}" for s, code in codes.items()
           if code not in (0, None)]  # fmt: skip
    if bad:
        raise PeerError("Orthanc did not stop cleanly:\n" + "\n".join(bad))
