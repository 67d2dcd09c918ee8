"""``bac-node viewer``: Orthanc, OHIF and bac-node on this machine in one step (a demo).

What it starts, all on loopback, all stopped together by Ctrl-C / SIGTERM:

1. **Orthanc** (Debian's ``orthanc`` + ``orthanc-dicomweb``) with ``deploy/orthanc/
   orthanc.json``, its storage, index, log and the generated configuration under
   ``DIR/orthanc``, and ``deploy/orthanc/autorouting.lua``: each stable study's MG series
   go to bac-node (``DicomModalities`` entry ``bacnode``), which may store results back.
2. **bac-node** (the node of ``bac-node serve``, in this process) with its data in
   ``DIR/node``, sending its SEG and SR to that Orthanc.
3. **OHIF** v3: the prebuilt ``dist/`` of npm ``@ohif/app`` (``npm ci --prefix
   deploy/ohif``), with ``deploy/ohif/app-config.js``, served by :class:`OhifProxy`, a
   small same-origin reverse proxy that also forwards ``/dicom-web/`` to Orthanc (Orthanc
   has no CORS). Paths that are not files get ``index.html`` (OHIF's client-side routes,
   e.g. ``/viewer?StudyInstanceUIDs=…``). The proxy forwards the browser's ``Host``, so
   the BulkDataURIs Orthanc's DICOMweb plugin writes point back through the proxy.
   ``deploy/ohif/nginx.conf`` does the same for a real deployment.

Unless ``--no-sample``, the sample study is then uploaded to Orthanc (REST), and the
URL of the study list and of the study are printed: a minute later the SEG and SR are
in Orthanc and open in OHIF with the images. It needs a checkout (``deploy/`` is not part
of the installed package). Research use only; not for clinical use.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import mimetypes
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bac_node.config import Settings
from bac_node.errors import BacNodeError

log = logging.getLogger(__name__)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ORTHANC_TEMPLATE = DEPLOY / "orthanc" / "orthanc.json"
AUTOROUTING_LUA = DEPLOY / "orthanc" / "autorouting.lua"
APP_CONFIG = DEPLOY / "ohif" / "app-config.js"
OHIF_DIST = DEPLOY / "ohif" / "node_modules" / "@ohif" / "app" / "dist"
#: The ``DicomModalities`` entry the Lua script sends to (autorouting.lua's MODALITY).
NODE_MODALITY = "bacnode"
ORTHANC_BINARIES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc")
DICOMWEB_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)
#: Headers that belong to one connection, not to the message (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
     "trailer", "transfer-encoding", "upgrade", "proxy-connection")
)  # fmt: skip
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


# --- Orthanc ----------------------------------------------------------------------------


def find_orthanc() -> tuple[str, str]:
    """Paths of Debian's Orthanc and its DICOMweb plugin; a clear error without them."""
    binary = next((found for n in ORTHANC_BINARIES if (found := shutil.which(n))), None)
    plugin = next((p for p in DICOMWEB_PLUGINS if Path(p).is_file()), None)
    if binary is None or plugin is None:
        raise BacNodeError(
            "Orthanc with its DICOMweb plugin is needed: sudo apt-get install orthanc "
            "orthanc-dicomweb"
        )
    return binary, plugin


def orthanc_configuration(
    directory: Path,
    *,
    http_port: int,
    dicom_port: int,
    node_ae: str,
    node_port: int,
    plugin: str,
    stable_age: int | None = None,
) -> dict[str, Any]:
    """deploy/orthanc/orthanc.json with its paths under ``directory`` and these ports."""
    config: dict[str, Any] = json.loads(ORTHANC_TEMPLATE.read_text())
    storage = str(directory / "storage")
    config.update(
        StorageDirectory=storage, IndexDirectory=storage, HttpPort=http_port,
        DicomPort=dicom_port, LuaScripts=[str(AUTOROUTING_LUA)], Plugins=[plugin],
    )  # fmt: skip
    config["DicomModalities"][NODE_MODALITY].update(AET=node_ae, Host="127.0.0.1", Port=node_port)
    if stable_age is not None:
        config["StableAge"] = stable_age
    return config


@dataclass
class OrthancServer:
    """Debian's Orthanc in a subprocess, configured and logging under ``directory``."""

    directory: Path
    config: dict[str, Any]
    binary: str
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['HttpPort']}"

    @property
    def log(self) -> Path:
        return self.directory / "orthanc.log"

    def start(self, timeout: float = 30.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "orthanc.json"
        path.write_text(json.dumps(self.config, indent=2))
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [self.binary, str(path)], stdout=out, stderr=subprocess.STDOUT,
                cwd=self.directory,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BacNodeError(f"Orthanc exited at start (exit {self.process.returncode}); "
                                   f"see {self.log}")  # fmt: skip
            with contextlib.suppress(OSError, ValueError):
                system = self.get("/system")
                if system.get("DicomPort") != self.config["DicomPort"]:
                    raise BacNodeError(f"another server answers on {self.url}")
                return
            if time.monotonic() > deadline:
                raise BacNodeError(f"Orthanc not answering on {self.url}; see {self.log}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> Any:  # fmt: skip
        request = urllib.request.Request(self.url + path, data=body, method=method)
        request.add_header("Content-Type", content_type)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=60) as answer:
            return json.loads(answer.read() or b"null")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, path: Path) -> Any:
        return self.request("POST", "/instances", path.read_bytes(), "application/dicom")

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # once: a second one skips its shutdown
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- OHIF behind a same-origin proxy ----------------------------------------------------


class OhifProxy(ThreadingHTTPServer):
    """OHIF's ``dist/`` (our ``app-config.js``) and Orthanc's ``/dicom-web/``, one origin."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], *, dist: Path, app_config: Path, orthanc: str
    ) -> None:
        if not (dist / "index.html").is_file():
            raise BacNodeError(
                f"OHIF is not installed in {dist}: run `npm ci --prefix deploy/ohif`"
            )
        self.dist, self.app_config = dist.resolve(), app_config
        target = urlsplit(orthanc)
        self.orthanc = (target.hostname or "127.0.0.1", target.port or 80)
        super().__init__(address, _ProxyHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _ProxyHandler(BaseHTTPRequestHandler):
    server: OhifProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("viewer proxy: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        if path == "/dicom-web" or path.startswith("/dicom-web/"):
            self._forward()
        elif self.command in ("GET", "HEAD"):
            self._static(unquote(path))
        else:
            self.send_error(405)

    def _static(self, path: str) -> None:
        dist = self.server.dist
        file = self.server.app_config if path == "/app-config.js" else (dist / path.lstrip("/"))
        with contextlib.suppress(OSError):
            file = file.resolve()
        inside = file == self.server.app_config or file.is_relative_to(dist)
        if not (inside and file.is_file()):
            # OHIF's routes (/viewer, /segmentation, ...) are pages of index.html.
            file = dist / "index.html"
        body = file.read_bytes()
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        connection = http.client.HTTPConnection(*self.server.orthanc, timeout=300)
        try:
            # Host is forwarded as the browser sent it (http.client keeps a given Host).
            connection.request(self.command, self.path, body=body, headers=headers)
            answer = connection.getresponse()
        except OSError as exc:
            connection.close()
            self.send_error(502, f"Orthanc is not answering: {exc}")
            return
        try:
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            if answer.getheader("Content-Length") is None:
                # No length known ahead (chunked from Orthanc): the end of the body is
                # the end of this connection.
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                while chunk := answer.read(1 << 16):
                    self.wfile.write(chunk)
        finally:
            connection.close()


# --- the whole stack --------------------------------------------------------------------


@dataclass
class ViewerStack:
    """Orthanc + bac-node + the OHIF proxy, started and stopped together."""

    settings: Settings
    directory: Path
    http_port: int = 3000
    orthanc_http_port: int = 8042
    orthanc_dicom_port: int = 4242
    stable_age: int | None = None
    host: str = "127.0.0.1"
    orthanc: OrthancServer = field(init=False)
    node: Any = field(init=False, default=None)
    proxy: OhifProxy | None = field(init=False, default=None)

    def start(self) -> None:
        from bac_node.node.service import Node

        binary, plugin = find_orthanc()
        if not (OHIF_DIST / "index.html").is_file():
            raise BacNodeError(f"OHIF is not installed ({OHIF_DIST} is missing): run "
                               "`npm ci --prefix deploy/ohif` in the checkout")  # fmt: skip
        config = orthanc_configuration(
            self.directory / "orthanc", http_port=self.orthanc_http_port,
            dicom_port=self.orthanc_dicom_port, node_ae=self.settings.ae_title,
            node_port=self.settings.port, plugin=plugin, stable_age=self.stable_age,
        )  # fmt: skip
        self.orthanc = OrthancServer(self.directory / "orthanc", config, binary)
        aet = str(config["DicomAet"])
        node_settings = replace(
            self.settings,
            data_dir=self.directory / "node",
            destinations=(f"{aet}@127.0.0.1:{self.orthanc_dicom_port}",),
            allowed_peers=(f"{aet}@127.0.0.1",),
        )
        try:
            self.orthanc.start()
            self.node = Node(node_settings, host="127.0.0.1")
            self.node.start()
            self.proxy = OhifProxy(
                (self.host, self.http_port), dist=OHIF_DIST, app_config=APP_CONFIG,
                orthanc=self.orthanc.url,
            )  # fmt: skip
        except OSError as exc:
            self.stop()
            raise BacNodeError(f"viewer: {exc} (a port in use? see --help for the ports)") from exc
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self.proxy.serve_forever, name="viewer-proxy", daemon=True).start()

    def upload(self, files: list[Path]) -> str:
        """Store ``files`` in Orthanc (REST); the Study Instance UID of the first."""
        study_uid = ""
        for path in files:
            answer = self.orthanc.upload(path)
            if not study_uid:
                tags = self.orthanc.get(f"/instances/{answer['ID']}/simplified-tags")
                study_uid = str(tags.get("StudyInstanceUID", ""))
        return study_uid

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.shutdown()
            self.proxy.server_close()
        if self.node is not None:
            self.node.stop()
        if hasattr(self, "orthanc"):
            self.orthanc.stop()


def sample_files(sample_dir: Path) -> list[Path]:
    files = sorted(p for p in sample_dir.rglob("*.dcm") if p.is_file())
    if not files:
        raise BacNodeError(f"no sample study in {sample_dir} (run from a bac-node checkout, "
                           "or give --no-sample and send your own study to Orthanc)")  # fmt: skip
    return files


def run_viewer(
    settings: Settings,
    directory: Path,
    *,
    sample_dir: Path | None,
    ports: Mapping[str, int],
    stable_age: int | None = None,
    echo: Any = print,
) -> None:
    """Start the stack, upload the sample, print the URLs, run until SIGTERM/SIGINT."""
    from bac_node.node.service import run_until_signal

    stack = ViewerStack(
        settings, directory, ports.get("http_port", 3000), ports.get("orthanc_http_port", 8042),
        ports.get("orthanc_dicom_port", 4242), stable_age,
    )  # fmt: skip

    def start() -> None:
        stack.start()
        try:
            announce()
        except BaseException:
            stack.stop()
            raise

    def announce() -> None:
        assert stack.proxy is not None
        echo(f"Orthanc: {stack.orthanc.url} (DICOM {stack.orthanc_dicom_port}, AE "
             f"{stack.orthanc.config['DicomAet']}); bac-node: {settings.ae_title} on port "
             f"{settings.port}; files under {directory}")  # fmt: skip
        echo(f"OHIF: {stack.proxy.url}/")
        if sample_dir is not None:
            uid = stack.upload(sample_files(sample_dir))
            echo(f"sample study sent to Orthanc; its SEG and SR arrive in about a minute: "
                 f"{stack.proxy.url}/viewer?StudyInstanceUIDs={uid}")  # fmt: skip
        echo("Ctrl-C stops Orthanc, bac-node and the viewer.")

    try:
        run_until_signal(start, stack.stop)
    except urllib.error.URLError as exc:
        raise BacNodeError(f"Orthanc refused the sample study: {exc}") from exc
