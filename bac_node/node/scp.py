"""The node's DICOM SCP: C-STORE into the :class:`~bac_node.node.store.InstanceStore`, C-ECHO.

:func:`start_scp` starts pynetdicom's threaded association server (one thread per
association) and returns a :class:`ScpServer` that knows its bound port and shuts down
gracefully.

Decisions a next engineer needs:

- **Presentation contexts**: Verification, and the storage SOP classes of
  :data:`bac_node.node.store.STORABLE_SOP_CLASSES` (MG For Presentation/For Processing,
  DX For Presentation/For Processing, CR, SEG, Basic Text/Enhanced/Comprehensive SR,
  Secondary Capture), each with :data:`TRANSFER_SYNTAXES`: the uncompressed little
  endian syntaxes and every compressed syntax the reader decodes with the installed
  plugins (JPEG baseline and lossless, JPEG-LS, JPEG 2000, RLE). Deflated Explicit VR
  Little Endian and Explicit VR Big Endian (retired) are not offered, so a context that
  proposes only those is rejected at negotiation; senders fall back to another syntax.
  When one context proposes several syntaxes, lossless compressed ones are preferred,
  then uncompressed, then lossy: a sender proposes a compressed syntax because it holds
  the image so, and may not be able to decompress it (dcmtk's storescu cannot decompress
  RLE, JPEG-LS or JPEG 2000); lossless pixels are the same either way; and bac-node
  never makes a sender compress an uncompressed image lossily. A sender holding a lossy image
  that proposes lossy and uncompressed syntaxes in one context is asked to decompress.
- **Who may associate** is decided at A-ASSOCIATE time, answered with an
  A-ASSOCIATE-RJ (rejected-permanent, service user, "calling AE title not recognised"),
  never by accepting and then aborting. Allowed: the ``allowed_peers`` entries plus the
  AE titles of the ``destinations`` (a PACS we send results to is trusted to send us
  studies, from whichever of its hosts). An ``AE@host`` entry also requires the peer's
  IP address to be one of the host's addresses, resolved once at start (a name that
  does not resolve admits nobody and is logged). Both rules are one EVT_REQUESTED
  handler rather than ``AE.require_calling_aet``, because an empty list there means
  "anyone", while an empty allowlist here means nobody (logged as a WARNING at start).
- **The called AE title must be ours** (``require_called_aet``): PACS administrators
  configure a node by AE title, and a study sent to the wrong AE title is a
  misconfiguration worth an A-ASSOCIATE-RJ ("called AE title not recognised").
- ``max_associations`` concurrent associations; the next one is rejected by pynetdicom
  (rejected-transient, "local limit exceeded"), which senders retry later.
  ``max_pdu`` is the largest PDU we receive; ``network_timeout`` is the ACSE, DIMSE
  and idle timeout.
- The C-STORE handler never raises: every instance gets a status from the store, a
  data set pydicom cannot parse gets 0xC000, and an unexpected error 0xC000 with a log
  line naming the SOP Instance UID; the association and the other instances go on.
  Error Comment (at most 64 characters) carries the reason, never patient data.
- **TLS** (``tls_cert`` + ``tls_key``): the DICOM port then speaks TLS only (TLS 1.2 or
  later; DICOM's own TLS port is 2762, set ``port`` to it if your PACS expects it).
  ``tls_ca`` also requires a client certificate signed by that CA; a peer without one,
  or with another CA's, fails the handshake and never reaches A-ASSOCIATE. pynetdicom
  wraps each accepted socket in its single accept loop, so a handshake there would let
  one silent client stall every new association: :class:`_DeferredHandshakeContext`
  wraps without the handshake, which then happens on the association's first read, in
  its own thread, under ``network_timeout``. A refused handshake is logged by
  pynetdicom (``pynetdicom.dul``, ERROR, OpenSSL's reason such as "certificate verify
  failed", with a traceback). Exports to TLS destinations are not built:
  ``destinations`` entries are plain DIMSE (a TLS tunnel such as stunnel, or the
  destination's DICOMweb URL over https, meets that need).
- :meth:`ScpServer.shutdown` stops accepting, lets the associations in flight finish
  (their stores complete and are answered) for up to a timeout, then aborts the rest.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from bac_node.config import Settings, is_dicomweb_destination, parse_destination, parse_peer
from bac_node.errors import BacNodeError, ConfigError
from bac_node.node.store import (
    CANNOT_UNDERSTAND,
    ERROR_COMMENT_MAX,
    STORABLE_SOP_CLASSES,
    SUCCESS,
    InstanceStore,
)

log = logging.getLogger(__name__)

#: Accepted for every storage SOP class. pynetdicom accepts, of the syntaxes a requestor
#: proposes in one context, the first in this order (see the module docstring).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEGLSNearLossless,
    JPEGBaseline8Bit,
)
VERIFICATION_TRANSFER_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, diagnostic.
_REJECTED_PERMANENT = 0x01
_SERVICE_USER = 0x01
_CALLING_AE_NOT_RECOGNISED = 0x03
_REJECTION_REASONS = {
    (0x01, 0x01): "no reason given",
    (0x01, 0x02): "application context name not supported",
    (0x01, 0x03): "calling AE title not recognised",
    (0x01, 0x07): "called AE title not recognised",
    (0x02, 0x01): "no reason given",
    (0x02, 0x02): "protocol version not supported",
    (0x03, 0x01): "temporary congestion",
    (0x03, 0x02): "local limit exceeded (max_associations)",
}
#: Seconds a rejected requestor gets to read the A-ASSOCIATE-RJ before the socket closes.
_REJECT_GRACE = 0.1

Resolver = Callable[[str], Iterable[str]]


def build_ae(settings: Settings) -> AE:
    """The node's Application Entity: contexts, limits and timeouts from ``settings``."""
    ae = AE(ae_title=settings.ae_title)
    for sop_class in STORABLE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification, list(VERIFICATION_TRANSFER_SYNTAXES))
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.network_timeout
    ae.dimse_timeout = settings.network_timeout
    ae.network_timeout = settings.network_timeout
    return ae


# --- TLS -------------------------------------------------------------------------------


class _DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets do their handshake on first read, with a timeout.

    pynetdicom calls ``wrap_socket`` in its accept loop (see the module docstring).
    """

    handshake_timeout: float = 60.0

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(sock, *args, **kwargs)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's TLS context from ``tls_cert``/``tls_key``/``tls_ca``; None when TLS is off.

    A file that cannot be loaded is a :class:`ConfigError` naming the setting.
    """
    if not settings.tls_cert:
        return None
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout = float(settings.network_timeout)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls_cert {settings.tls_cert} / tls_key {settings.tls_key}: cannot load "
            f"({_tls_reason(exc)}); both must be PEM files, the key unencrypted"
        ) from None
    if settings.tls_ca:
        try:
            context.load_verify_locations(cafile=settings.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls_ca {settings.tls_ca}: cannot load ({_tls_reason(exc)}); "
                "it must hold PEM CA certificates"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _tls_reason(exc: OSError | ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__)


# --- calling AE allowlist ---------------------------------------------------------------


def resolve_host(host: str) -> list[str]:
    """Every IP address of ``host`` (a name or an address literal)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({_normal_ip(str(info[4][0])) for info in infos})


@dataclass(frozen=True)
class CallingAllowlist:
    """Calling AE titles allowed to associate, from any host or from given addresses."""

    any_host: frozenset[str] = frozenset()
    by_address: dict[str, frozenset[str]] = field(default_factory=dict)
    """AE title → IP addresses it may call from (``AE@host`` entries)."""

    @classmethod
    def from_settings(
        cls, settings: Settings, resolve: Resolver = resolve_host
    ) -> CallingAllowlist:
        any_host = {
            parse_destination(text).ae_title
            for text in settings.destinations
            if not is_dicomweb_destination(text)  # a DICOMweb URL has no AE title
        }
        by_address: dict[str, set[str]] = {}
        for entry in settings.allowed_peers:
            ae_title, host = parse_peer(entry)
            if host is None:
                any_host.add(ae_title)
                continue
            addresses = by_address.setdefault(ae_title, set())
            try:
                addresses.update(_normal_ip(a) for a in resolve(host))
            except OSError as exc:
                log.warning(
                    "allowed_peers entry %s: host %s does not resolve (%s); %s may not "
                    "associate from it until bac-node restarts with a host that resolves",
                    entry, host, exc.strerror or exc, ae_title,
                )  # fmt: skip
        return cls(frozenset(any_host), {ae: frozenset(ips) for ae, ips in by_address.items()})

    @property
    def empty(self) -> bool:
        return not self.any_host and not self.by_address

    def admits(self, ae_title: str, address: str) -> bool:
        ae_title = ae_title.strip()
        if ae_title in self.any_host:
            return True
        return _normal_ip(address) in self.by_address.get(ae_title, frozenset())


def _normal_ip(address: str) -> str:
    """``address`` as one spelling: IPv4-mapped IPv6 (``::ffff:10.0.0.1``) as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


# --- the server ---------------------------------------------------------------------------


class ScpServer:
    """A running SCP: its bound port, its associations in flight, a graceful shutdown."""

    def __init__(self, server: ThreadedAssociationServer, ae: AE, default_timeout: float) -> None:
        self._server = server
        self.ae = ae
        self._default_timeout = default_timeout
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The TCP port the server is bound to (the real one when started on port 0)."""
        return int(self._server.server_address[1])

    @property
    def active_associations(self) -> list[Association]:
        """The associations this server is serving now."""
        return list(self._server.active_associations)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting; let associations in flight finish up to ``timeout`` s, abort the rest.

        ``timeout`` defaults to ``network_timeout`` + 5 s: an association idle longer
        than ``network_timeout`` is aborted by pynetdicom anyway. Idempotent.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.shutdown()  # no new connections: the listening socket is closed
        deadline = time.monotonic() + (self._default_timeout if timeout is None else timeout)
        waiting = self.active_associations
        if waiting:
            log.info("waiting for %d association(s) in flight to finish", len(waiting))
        while waiting and time.monotonic() < deadline:
            time.sleep(0.05)
            waiting = self.active_associations
        for assoc in waiting:
            log.warning(
                "aborting the association with %s at %s: still open at shutdown",
                assoc.requestor.ae_title, assoc.requestor.address,
            )  # fmt: skip
            assoc.abort()
        for assoc in waiting:
            assoc.join(5)
        log.info("DICOM SCP on port %d stopped", self.port)


def start_scp(
    settings: Settings,
    store: InstanceStore,
    *,
    host: str = "",
    port: int | None = None,
    resolve: Resolver = resolve_host,
) -> ScpServer:
    """Start the SCP on ``host:port`` (``port`` None: ``settings.port``; 0: any free port)."""
    ae = build_ae(settings)
    allowlist = CallingAllowlist.from_settings(settings, resolve)
    if allowlist.empty:
        log.warning(
            "no calling AE title may associate: set allowed_peers (AE or AE@host entries, "
            "e.g. BAC_NODE_ALLOWED_PEERS=PACS or PACS@pacs.example.org) or destinations"
        )
    handlers = _Handlers(store, allowlist)
    address = (host, settings.port if port is None else port)
    context = tls_context(settings)
    try:
        server = ae.start_server(
            address,
            block=False,
            ssl_context=context,
            evt_handlers=[
                (evt.EVT_REQUESTED, handlers.on_requested),
                (evt.EVT_ESTABLISHED, handlers.on_established),
                (evt.EVT_REJECTED, handlers.on_rejected),
                (evt.EVT_RELEASED, handlers.on_released),
                (evt.EVT_ABORTED, handlers.on_aborted),
                (evt.EVT_C_ECHO, handlers.on_c_echo),
                (evt.EVT_C_STORE, handlers.on_c_store),
            ],
        )
    except OSError as exc:
        raise BacNodeError(
            f"cannot listen on {address[0] or '*'}:{address[1]} ({exc.strerror or exc}); "
            "is another node or PACS using the port? Set `port` or --port"
        ) from None
    assert isinstance(server, ThreadedAssociationServer)
    scp = ScpServer(server, ae, default_timeout=settings.network_timeout + 5)
    log.info(
        "DICOM SCP %s listening on %s:%d (max %d associations%s)",
        settings.ae_title, host or "*", scp.port, settings.max_associations,
        "" if context is None
        else ", TLS, client certificates required" if settings.tls_ca else ", TLS",
    )  # fmt: skip
    return scp


@dataclass
class _Handlers:
    store: InstanceStore
    allowlist: CallingAllowlist

    def on_requested(self, event: Event) -> None:
        assoc = event.assoc
        calling, _ = _requested_titles(assoc)
        address = assoc.requestor.address
        if self.allowlist.admits(calling, address):
            return
        log.warning(
            "rejected an association from AE %r at %s: calling AE title not allowed "
            "(allowed_peers, destinations)",
            calling, address,
        )  # fmt: skip
        assoc.acse.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, _CALLING_AE_NOT_RECOGNISED)
        # As pynetdicom does after its own rejections: the requestor reads the A-ASSOCIATE-RJ,
        # then the association (and its socket) is ended.
        time.sleep(_REJECT_GRACE)
        assoc.kill()

    def on_established(self, event: Event) -> None:
        requestor = event.assoc.requestor
        log.info(
            "association from AE %s at %s:%s accepted (%d presentation context(s))",
            requestor.ae_title, requestor.address, requestor.port,
            len(event.assoc.accepted_contexts),
        )  # fmt: skip

    def on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling, called = _requested_titles(event.assoc)
        primitive = event.assoc.acceptor.primitive
        source = getattr(primitive, "result_source", None)
        diagnostic = getattr(primitive, "diagnostic", None)
        reason = _REJECTION_REASONS.get((source, diagnostic), "rejected")  # type: ignore[arg-type]
        log.warning(
            "rejected an association from AE %s at %s: %s (called AE title %r)",
            calling, requestor.address, reason, called,
        )  # fmt: skip

    def on_released(self, event: Event) -> None:
        requestor = event.assoc.requestor
        log.info("association from AE %s at %s released", requestor.ae_title, requestor.address)

    def on_aborted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        log.info("association from AE %s at %s aborted", requestor.ae_title, requestor.address)

    def on_c_echo(self, event: Event) -> int:
        return SUCCESS

    def on_c_store(self, event: Event) -> Dataset:
        request_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
        except Exception as exc:
            log.warning(
                "SOP Instance UID %s from AE %s: the data set cannot be parsed (%s)",
                request_uid, calling, type(exc).__name__,
            )  # fmt: skip
            return _response(CANNOT_UNDERSTAND, "the data set cannot be parsed")
        try:
            outcome = self.store.store(
                ds,
                transfer_syntax_uid=str(event.context.transfer_syntax),
                calling_ae=calling,
                protocol="dimse",
                expected_sop_class=str(event.context.abstract_syntax),
            )
        except Exception:
            log.exception(
                "SOP Instance UID %s from AE %s: unexpected error while storing",
                request_uid, calling,
            )  # fmt: skip
            return _response(CANNOT_UNDERSTAND, "internal error in bac-node; see its log")
        if outcome.status == SUCCESS:
            return _response(SUCCESS)
        return _response(outcome.status, outcome.error_comment)


def _requested_titles(assoc: Association) -> tuple[str, str]:
    """Calling and called AE titles of the A-ASSOCIATE-RQ."""
    primitive = assoc.requestor.primitive
    if primitive is None:
        return "", ""
    return str(primitive.calling_ae_title).strip(), str(primitive.called_ae_title).strip()


def _response(status: int, comment: str = "") -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment[:ERROR_COMMENT_MAX]
    return rsp
