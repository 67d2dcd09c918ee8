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
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    seed: int = _setting(0, "Default random seed of `bac-node synth` and the demo.")

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
