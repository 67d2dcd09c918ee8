"""Settings: one typed table, resolved as CLI flag > environment > TOML file > default.

Every setting is a field of :class:`Settings`; its metadata carries the help text
shown by ``bac-node settings`` and in the README's settings table (a test keeps the
two in step). Environment variables are ``BAC_NODE_<NAME>`` in upper case. The TOML
file is ``--config PATH``, else ``$BAC_NODE_CONFIG``, else ``./bac-node.toml`` when
it exists; its keys are the field names at the top level.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from bac_node.errors import ConfigError

ENV_PREFIX = "BAC_NODE_"
CONFIG_ENV = "BAC_NODE_CONFIG"
DEFAULT_CONFIG_FILE = Path("bac-node.toml")

Source = Literal["default", "file", "env", "cli"]


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Every bac-node setting with its default."""

    data_dir: Path = _setting(
        Path("bac-node-data"), "Directory for received instances, the queue and results."
    )
    ae_title: str = _setting("BACNODE", "DICOM Application Entity title of the node.")
    port: int = _setting(11112, "DICOM (DIMSE) listening port of `bac-node serve`.")
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")
    device: str = _setting("auto", "Where the model runs: auto (CUDA when present), cpu or cuda.")
    backend: str = _setting(
        "auto",
        "Inference backend: torch, onnx (ONNX Runtime, CPU only) or auto (onnx on the CPU, "
        "torch on CUDA).",
    )
    seed: int = _setting(0, "Default random seed of `bac-node synth` and the demo.")
    allowed_peers: tuple[str, ...] = _setting(
        (),
        "Calling AE titles allowed to associate (`AE` or `AE@host`); empty: none but the "
        "destinations' AE titles.",
    )
    destinations: tuple[str, ...] = _setting(
        (),
        "Where results are sent: `AE@host:port` (C-STORE) or a DICOMweb base URL "
        "`http(s)://…` (STOW-RS); none: kept on disk.",
    )
    max_associations: int = _setting(10, "Most simultaneous DICOM associations accepted.")
    max_pdu: int = _setting(262144, "Largest P-DATA PDU the node receives, in bytes.")
    network_timeout: int = _setting(
        60, "Seconds of silence before a DICOM association is aborted (ACSE, DIMSE, network)."
    )
    tls_cert: str = _setting(
        "", "PEM certificate (chain) file: the DICOM port speaks TLS only (with tls_key)."
    )
    tls_key: str = _setting("", "PEM private key file of tls_cert.")
    tls_ca: str = _setting(
        "",
        "PEM CA certificate(s): DICOM TLS peers must present a client certificate they "
        "signed; empty: none asked.",
    )
    stable_after: int = _setting(
        60, "Seconds without a new instance after which an incomplete study is analysed."
    )
    lease_seconds: int = _setting(
        300, "How long a worker's claim on a job lasts without a heartbeat."
    )
    export_attempts: int = _setting(
        8, "Export attempts per destination before a result is dead-lettered."
    )
    export_backoff: int = _setting(
        10, "Seconds before the first export retry; doubled per attempt, with jitter."
    )
    export_backoff_cap: int = _setting(600, "Longest wait between export attempts, in seconds.")
    duplicates: str = _setting(
        "keep-first", "A SOP instance received again: keep-first (answer Success) or replace."
    )
    retention_days: int = _setting(
        0, "Delete a study's received images this many days after its results (0: never)."
    )
    min_free_mb: int = _setting(
        500, "Refuse new instances (0xA700) while the data directory has less free space (MiB)."
    )
    model: str = _setting(
        "", "Model weights (.safetensors) the worker runs; empty: the shipped default."
    )
    http_port: int = _setting(
        -1,
        "HTTP port of `bac-node serve` (STOW-RS, health, metrics, status page): -1 off, "
        "0 a free port chosen at start (logged).",
    )
    http_host: str = _setting(
        "", "Address the HTTP server listens on; empty: the address of `serve --host`."
    )
    http_tokens: tuple[str, ...] = _setting(
        (),
        "Bearer tokens the HTTP interface accepts (`sha256:HEX` entries hold a token's "
        "digest); empty: none.",
    )
    http_loopback_trusted: bool = _setting(
        False,
        "Loopback clients need no token (one-host set-ups); never behind a proxy on the same host.",
    )
    http_tls_cert: str = _setting(
        "", "PEM certificate (chain) file: serve HTTPS instead of HTTP (with http_tls_key)."
    )
    http_tls_key: str = _setting("", "PEM private key file of http_tls_cert.")
    http_max_request_mb: int = _setting(
        1024, "Largest STOW-RS request body accepted, in MiB (413 above)."
    )
    priors_pacs: str = _setting(
        "",
        "PACS asked for the patient's prior MG study (`AE@host:port`; C-FIND, then C-GET of "
        "the prior's bac-node SR or its images); the SR compares with it. Empty: priors off.",
    )
    priors_timeout: int = _setting(
        30, "Seconds the whole prior lookup may take; then the result goes out without it."
    )
    database: str = _setting(
        "",
        "Database URL of the queue: `sqlite:///PATH` or "
        "`postgresql+psycopg://user:password@host:port/db` (several worker hosts); empty: "
        "`sqlite:///<data_dir>/bac-node.sqlite`.",
    )
    node_url: str = _setting(
        "",
        "`bac-node worker` on a host without the shared data directory: the ingesting "
        "node's HTTP base URL (`http(s)://node:8080`); inputs and results go over HTTP and "
        "data_dir is a local scratch folder. Empty: data_dir is the node's (shared).",
    )
    node_token_file: str = _setting(
        "", "File holding the bearer token a worker sends to node_url (one of its http_tokens)."
    )
    node_ca_file: str = _setting(
        "", "PEM CA certificate(s) a worker trusts for an https node_url; empty: the system's."
    )

    def __post_init__(self) -> None:
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(
                f"log_level must be DEBUG, INFO, WARNING or ERROR, not {self.log_level!r}"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be between 1 and 65535, not {self.port}")
        # DICOM PS3.5 AE: spaces are not significant, so an all-space title is empty.
        if not 0 < len(self.ae_title) <= 16 or "\\" in self.ae_title or not self.ae_title.strip():
            raise ConfigError(
                "ae_title must be 1-16 characters, not all spaces, without a backslash, "
                f"not {self.ae_title!r}"
            )
        if self.device not in {"auto", "cpu", "cuda"}:
            raise ConfigError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.backend not in {"torch", "onnx", "auto"}:
            raise ConfigError(f"backend must be torch, onnx or auto, not {self.backend!r}")
        if self.duplicates not in {"keep-first", "replace"}:
            raise ConfigError(f"duplicates must be keep-first or replace, not {self.duplicates!r}")
        for name in (
            "max_associations", "network_timeout", "lease_seconds", "export_attempts",
            "export_backoff", "export_backoff_cap",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("stable_after", "retention_days", "min_free_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, not {getattr(self, name)}")
        if not 4096 <= self.max_pdu <= 2**31 - 1:
            raise ConfigError(f"max_pdu must be 4096 to 2147483647 bytes, not {self.max_pdu}")
        for peer in self.allowed_peers:
            parse_peer(peer)
        for destination in self.destinations:
            if is_dicomweb_destination(destination):
                parse_dicomweb_destination(destination)
            else:
                parse_destination(destination)
        if not -1 <= self.http_port < 65536:
            raise ConfigError(
                f"http_port must be -1 (off), 0 (any free port) or 1-65535, not {self.http_port}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key must be set together")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("tls_ca (client certificates) needs tls_cert and tls_key")
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ConfigError("http_tls_cert and http_tls_key must be set together")
        if self.http_max_request_mb < 1:
            raise ConfigError(
                f"http_max_request_mb must be at least 1, not {self.http_max_request_mb}"
            )
        for token in self.http_tokens:
            check_http_token(token)
        check_priors(self)
        if self.database:
            check_database_url(self.database)
        if self.node_url:  # with node_token_file and database: checked by the worker
            check_node_url(self.node_url)


@dataclass(frozen=True)
class Destination:
    """A DICOM peer results are sent to."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _check_ae(ae: str, what: str) -> str:
    if not 0 < len(ae) <= 16 or "\\" in ae or not ae.strip():
        raise ConfigError(f"{what}: AE title must be 1-16 characters without a backslash")
    return ae


def parse_peer(text: str) -> tuple[str, str | None]:
    """``AE`` or ``AE@host`` of ``allowed_peers`` as (AE title, host or None)."""
    ae, _, host = text.partition("@")
    return _check_ae(ae.strip(), f"allowed_peers entry {text!r}"), (host.strip() or None)


def parse_destination(text: str) -> Destination:
    """``AE@host:port`` of ``destinations``."""
    ae, at, rest = text.partition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"destinations entry {text!r} must look like AE@host:port")
    return Destination(_check_ae(ae.strip(), f"destinations entry {text!r}"), host, int(port))


def check_priors(settings: Settings) -> None:
    """``priors_pacs`` (empty, or ``AE@host:port``) and ``priors_timeout`` (>= 1 s)."""
    if settings.priors_pacs:
        parse_priors_pacs(settings.priors_pacs)
    if settings.priors_timeout < 1:
        raise ConfigError(f"priors_timeout must be at least 1, not {settings.priors_timeout}")


def parse_priors_pacs(text: str) -> Destination:
    """``priors_pacs``: the PACS asked for priors, ``AE@host:port``."""
    ae, at, rest = text.partition("@")
    host, colon, port = rest.rpartition(":")
    if not at or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"priors_pacs {text!r} must look like AE@host:port")
    return Destination(_check_ae(ae.strip(), f"priors_pacs {text!r}"), host, int(port))


def is_dicomweb_destination(text: str) -> bool:
    """Whether a ``destinations`` entry is a DICOMweb base URL (else ``AE@host:port``)."""
    return text.strip().lower().startswith(("http://", "https://"))


def parse_dicomweb_destination(text: str) -> str:
    """A ``destinations`` DICOMweb base URL (``…/dicom-web``), without a trailing slash.

    Credentials in the URL are refused: destinations appear in logs, ``bac-node status``
    and the status page.
    """
    url = urlsplit(text.strip())
    if url.scheme.lower() not in ("http", "https") or not url.hostname:
        raise ConfigError(f"destinations entry {text!r} must look like http(s)://host[:port]/path")
    if url.username is not None or url.password is not None:
        raise ConfigError(f"destinations entry {text!r}: credentials do not belong in the URL")
    if url.query or url.fragment:
        raise ConfigError(f"destinations entry {text!r}: a DICOMweb base URL has no query")
    try:
        url.port  # noqa: B018 (an out-of-range port raises here)
    except ValueError:
        raise ConfigError(f"destinations entry {text!r}: invalid port") from None
    return text.strip().rstrip("/")


#: Database URL schemes the ``database`` setting accepts (SQLite, PostgreSQL via psycopg 3).
DATABASE_SCHEMES = ("sqlite", "postgresql+psycopg")


def check_database_url(url: str) -> str:
    """A ``database`` URL: ``sqlite:///PATH`` or ``postgresql+psycopg://…/DBNAME``.

    Errors never repeat the URL's password (:func:`redact_url`).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") or url == "sqlite:///":
            raise ConfigError(
                f"database {redact_url(url)!r}: an SQLite URL is sqlite:///relative/path or "
                "sqlite:////absolute/path"
            )
        return url
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
        raise ConfigError(
            f"database {redact_url(url)!r}: use the postgresql+psycopg:// scheme (psycopg 3, "
            "`pip install bac-node[postgres]`)"
        )
    if scheme != "postgresql+psycopg":
        raise ConfigError(
            f"database {redact_url(url)!r} must start with sqlite:/// or postgresql+psycopg://"
        )
    if not parts.path.strip("/"):
        raise ConfigError(
            f"database {redact_url(url)!r}: name the database "
            "(postgresql+psycopg://user:password@host:5432/DBNAME)"
        )
    try:
        parts.port  # noqa: B018 (an out-of-range port raises here)
    except ValueError:
        raise ConfigError(f"database {redact_url(url)!r}: invalid port") from None
    return url


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: for logs, errors, status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()


def check_node_url(url: str) -> str:
    """A ``node_url``: ``http(s)://host[:port][/prefix]``, no credentials, no query."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"node_url {url!r} must look like http(s)://host:port")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"node_url {url!r}: credentials do not belong in the URL (a token file)")
    if parts.query or parts.fragment:
        raise ConfigError(f"node_url {url!r}: a base URL has no query")
    try:
        parts.port  # noqa: B018 (an out-of-range port raises here)
    except ValueError:
        raise ConfigError(f"node_url {url!r}: invalid port") from None
    return url


#: Settings whose values `bac-node settings` does not print.
SECRET_SETTINGS = frozenset({"http_tokens"})

#: ``sha256:`` and 64 hexadecimal digits: an ``http_tokens`` entry holding a digest.
_TOKEN_DIGEST = re.compile(r"sha256:[0-9a-fA-F]{64}")


def check_http_token(token: str) -> str:
    """An ``http_tokens`` entry: a token (16+ visible characters) or ``sha256:HEX``."""
    if token.lower().startswith("sha256:"):
        if not _TOKEN_DIGEST.fullmatch(token):
            raise ConfigError("http_tokens: a sha256: entry must hold 64 hexadecimal digits")
        return token
    if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(
            "http_tokens: a token must be at least 16 printable ASCII characters without "
            "spaces (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)"
        )
    return token


def shown(value: Any) -> str:
    """A setting's value as `bac-node settings` and the README show it."""
    if isinstance(value, tuple):
        value = ",".join(value)
    return str(value) if str(value) else "(none)"


def setting_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)]


def setting_help() -> dict[str, str]:
    return {f.name: str(f.metadata["help"]) for f in dataclasses.fields(Settings)}


def _field_types() -> dict[str, type]:
    defaults = Settings()
    return {f.name: type(getattr(defaults, f.name)) for f in dataclasses.fields(Settings)}


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = _field_types()[name]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if kind is tuple:
            items = value if isinstance(value, list | tuple) else str(value).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        if issubclass(kind, Path):
            return Path(str(value)).expanduser()
        # int(True) and int(12.5) would succeed silently; a TOML bool or float is a typo.
        if kind is int and isinstance(value, bool | float):
            raise ValueError(value)
        return kind(value)  # type: ignore[call-arg]
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {name} must be {kind.__name__}, got {value!r}") from None


def load_settings(
    *,
    config_file: Path | None = None,
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, Source]]:
    """Resolve every setting and say where each value came from."""
    env = os.environ if environ is None else environ
    names = setting_names()
    values: dict[str, Any] = {}
    sources: dict[str, Source] = dict.fromkeys(names, "default")

    path = config_file
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is None and DEFAULT_CONFIG_FILE.is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration file ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: configuration file is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(names)}"
            )
        for name, value in data.items():
            values[name] = _coerce(name, value, str(path))
            sources[name] = "file"

    for name in names:
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _coerce(name, env[key], key)
            sources[name] = "env"

    for name, value in (cli or {}).items():
        if value is None:
            continue
        if name not in names:
            raise ConfigError(f"unknown setting {name!r}; valid: {', '.join(names)}")
        values[name] = _coerce(name, value, "command line")
        sources[name] = "cli"

    return Settings(**values), sources
