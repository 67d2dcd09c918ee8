"""Settings resolution: CLI flag > BAC_NODE_<NAME> > TOML file > default (bac_node.config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bac_node.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_FILE,
    ENV_PREFIX,
    Settings,
    load_settings,
    parse_destination,
    parse_peer,
    setting_help,
    setting_names,
)
from bac_node.errors import BacNodeError, ConfigError


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every test in an empty directory, so no ./bac-node.toml is picked up by chance."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


# One field of each kind: (name, TOML literal, env text, CLI value, expected value at each
# layer: file, env, cli). Every layer's value differs from the default and from the others.
LAYERS: list[tuple[str, str, str, Any, tuple[Any, Any, Any]]] = [
    (
        "data_dir",
        '"/from/file"',
        "/from/env",
        Path("/from/cli"),
        (Path("/from/file"), Path("/from/env"), Path("/from/cli")),
    ),
    ("ae_title", '"FILE_AE"', "ENV_AE", "CLI_AE", ("FILE_AE", "ENV_AE", "CLI_AE")),
    ("port", "4001", "4002", 4003, (4001, 4002, 4003)),
    ("seed", "11", "12", "13", (11, 12, 13)),  # a CLI string is coerced like env text
]


def test_defaults_when_nothing_is_set() -> None:
    settings, sources = load_settings(environ={})
    assert settings == Settings()
    assert sources == dict.fromkeys(setting_names(), "default")


@pytest.mark.parametrize(("name", "toml", "env", "cli", "expected"), LAYERS)
def test_each_layer_overrides_the_one_below(
    tmp_path: Path,
    name: str,
    toml: str,
    env: str,
    cli: Any,
    expected: tuple[Any, Any, Any],
) -> None:
    default = getattr(Settings(), name)
    assert default not in expected
    config = write_toml(tmp_path / "bac-node.toml", f"{name} = {toml}\n")
    environ = {env_name(name): env}
    others = [n for n in setting_names() if n != name]

    settings, sources = load_settings(environ={})
    assert (getattr(settings, name), sources[name]) == (default, "default")

    settings, sources = load_settings(config_file=config, environ={})
    assert (getattr(settings, name), sources[name]) == (expected[0], "file")

    settings, sources = load_settings(config_file=config, environ=environ)
    assert (getattr(settings, name), sources[name]) == (expected[1], "env")

    settings, sources = load_settings(config_file=config, environ=environ, cli={name: cli})
    assert (getattr(settings, name), sources[name]) == (expected[2], "cli")
    assert type(getattr(settings, name)) is type(default)
    # Setting one field leaves every other field at its default.
    assert all(sources[n] == "default" for n in others)
    assert all(getattr(settings, n) == getattr(Settings(), n) for n in others)

    # Env beats the file, and the CLI beats the default, without the layer in between.
    settings, sources = load_settings(environ=environ, cli={name: cli})
    assert (getattr(settings, name), sources[name]) == (expected[2], "cli")


def test_sources_name_the_layer_of_each_field(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'ae_title = "FILEAE"\nport = 2000\nseed = 5\n')
    environ = {env_name("port"): "3000", env_name("log_level"): "DEBUG"}
    cli = {"port": 4000, "device": "cpu", "data_dir": None}

    settings, sources = load_settings(config_file=config, environ=environ, cli=cli)

    assert sources == {
        **dict.fromkeys(setting_names(), "default"),
        "data_dir": "default",  # None on the command line means "not given"
        "ae_title": "file",
        "port": "cli",
        "log_level": "env",
        "device": "cli",
        "seed": "file",
    }
    assert settings == Settings(
        ae_title="FILEAE", port=4000, log_level="DEBUG", device="cpu", seed=5
    )


def test_environ_ignores_unrelated_and_lowercase_variables() -> None:
    environ = {"PORT": "1", "bac_node_port": "2", "BAC_NODE_UNKNOWN": "3"}
    settings, sources = load_settings(environ=environ)
    assert settings.port == Settings().port
    assert sources["port"] == "default"


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*setting_names(), "config"]:
        monkeypatch.delenv(env_name(name), raising=False)
    monkeypatch.setenv(env_name("seed"), "77")
    settings, sources = load_settings()
    assert (settings.seed, sources["seed"]) == (77, "env")


def test_path_values_expand_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    settings, _ = load_settings(environ={env_name("data_dir"): "~/bac"})
    assert settings.data_dir == tmp_path / "bac"


def test_unknown_toml_key_lists_valid_names(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "port = 2000\naet = 'X'\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=config, environ={})
    message = str(info.value)
    assert str(config) in message
    assert "aet" in message
    for name in setting_names():
        assert name in message


def test_unknown_cli_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'colour'") as info:
        load_settings(environ={}, cli={"colour": "red"})
    assert all(name in str(info.value) for name in setting_names())


@pytest.mark.parametrize("text", ["abc", "", "12.5", "1e3", "0x10"])
def test_bad_int_in_env_names_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match=env_name("port")) as info:
        load_settings(environ={env_name("port"): text})
    assert "port must be int" in str(info.value)


@pytest.mark.parametrize("literal", ["12.5", "true", "[1]"])
def test_wrong_toml_type_for_int_names_file_and_setting(tmp_path: Path, literal: str) -> None:
    config = write_toml(tmp_path / "c.toml", f"port = {literal}\n")
    with pytest.raises(ConfigError, match="port must be int") as info:
        load_settings(config_file=config, environ={})
    assert str(config) in str(info.value)


def test_whole_number_float_in_toml_is_refused_too(tmp_path: Path) -> None:
    # 4242.0 would be harmless, but a float in an int field is more likely a typo than
    # a wish; refusing all floats keeps the rule simple.
    config = write_toml(tmp_path / "c.toml", "seed = 4242.0\n")
    with pytest.raises(ConfigError, match="seed must be int"):
        load_settings(config_file=config, environ={})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("port", 0),
        ("port", 65536),
        ("port", -1),
        ("log_level", "LOUD"),
        ("ae_title", "A" * 17),
        ("ae_title", ""),
        ("ae_title", " " * 4),
        ("ae_title", "BAC\\NODE"),
        ("device", "tpu"),
    ],
)
def test_invalid_values_name_the_setting(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings(**{name: value})
    with pytest.raises(ConfigError, match=name):
        load_settings(environ={}, cli={name: value})
    with pytest.raises(ConfigError, match=name):
        load_settings(environ={env_name(name): str(value)})


def test_invalid_value_from_file_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "port = 0\n")
    with pytest.raises(ConfigError, match="port"):
        load_settings(config_file=config, environ={})


@pytest.mark.parametrize(
    ("name", "value"),
    [("port", 1), ("port", 65535), ("ae_title", "A" * 16), ("log_level", "debug")],
)
def test_values_at_the_limits_are_accepted(name: str, value: Any) -> None:
    settings, _ = load_settings(environ={}, cli={name: value})
    assert getattr(settings, name) == value


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_settings(config_file=missing, environ={})
    assert str(missing) in str(info.value)


def test_missing_config_file_from_env(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found"):
        load_settings(environ={CONFIG_ENV: str(missing)})


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ={CONFIG_ENV: str(tmp_path)})
    assert str(tmp_path) in str(info.value)


def test_config_file_that_is_not_text(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xff\xfe\x00port = 1")
    with pytest.raises(ConfigError, match=str(config)):
        load_settings(config_file=config, environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=config, environ={})


def test_config_env_var_points_at_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "elsewhere.toml", "port = 5000\n")
    settings, sources = load_settings(environ={CONFIG_ENV: str(config)})
    assert (settings.port, sources["port"]) == (5000, "file")


def test_config_file_argument_beats_config_env_var(tmp_path: Path) -> None:
    chosen = write_toml(tmp_path / "chosen.toml", "port = 5001\n")
    ignored = write_toml(tmp_path / "ignored.toml", "port = 5002\n")
    settings, _ = load_settings(config_file=chosen, environ={CONFIG_ENV: str(ignored)})
    assert settings.port == 5001


def test_default_config_file_in_cwd(_empty_cwd: Path, tmp_path: Path) -> None:
    write_toml(_empty_cwd / DEFAULT_CONFIG_FILE, "port = 5003\n")
    settings, sources = load_settings(environ={})
    assert (settings.port, sources["port"]) == (5003, "file")

    other = write_toml(tmp_path / "other.toml", "port = 5004\n")
    settings, _ = load_settings(environ={CONFIG_ENV: str(other)})
    assert settings.port == 5004


def test_empty_config_env_var_means_unset(_empty_cwd: Path) -> None:
    write_toml(_empty_cwd / DEFAULT_CONFIG_FILE, "port = 5005\n")
    settings, _ = load_settings(environ={CONFIG_ENV: ""})
    assert settings.port == 5005


def test_config_error_is_a_bac_node_error() -> None:
    # The CLI turns BacNodeError into "Error: ..."; a ConfigError must be one.
    assert issubclass(ConfigError, BacNodeError)


def test_every_setting_has_help_and_a_default() -> None:
    fields = dataclasses.fields(Settings)
    assert setting_names() == [f.name for f in fields]
    assert list(setting_help()) == setting_names()
    for name, text in setting_help().items():
        assert text.strip(), name
        assert text.endswith("."), name
    assert all(f.default is not dataclasses.MISSING for f in fields)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().port = 1  # type: ignore[misc]


def test_list_settings_from_toml_arrays_and_comma_separated_env(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'allowed_peers = ["ORTHANC", "PACS@10.0.0.5"]\n')
    environ = {env_name("destinations"): "PACS@10.0.0.5:104, ARCH@archive.local:11112"}
    settings, sources = load_settings(config_file=config, environ=environ)
    assert settings.allowed_peers == ("ORTHANC", "PACS@10.0.0.5")
    assert settings.destinations == ("PACS@10.0.0.5:104", "ARCH@archive.local:11112")
    assert [str(parse_destination(d)) for d in settings.destinations] == list(settings.destinations)
    assert parse_peer("PACS@10.0.0.5") == ("PACS", "10.0.0.5")
    assert (sources["allowed_peers"], sources["destinations"]) == ("file", "env")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("destinations", "PACS@host", "AE@host:port"),
        ("destinations", "@host:104", "AE title"),
        ("destinations", "PACS@host:70000", "AE@host:port"),
        ("allowed_peers", "WAY-TOO-LONG-AE-TITLE", "AE title"),
        ("duplicates", "keep-last", "keep-first or replace"),
        ("max_pdu", "100", "max_pdu"),
        ("lease_seconds", "0", "at least 1"),
        ("stable_after", "-1", "not be negative"),
    ],
)
def test_node_settings_are_checked(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={env_name(name): value})
