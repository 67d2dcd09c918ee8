"""The ``bac-node`` command, run as a real process (``python -m bac_node``).

Most tests set ``BAC_NODE_ALLOCATOR_TUNED=1`` so heavy commands do not re-exec
themselves; ``test_heavy_command_reexecs_with_glibc_tunables`` checks the re-exec.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from subprocess import CompletedProcess, Popen
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from bac_node import __version__
from bac_node.cli import GLIBC_TUNABLES, SAMPLE_RECIPE
from bac_node.config import (
    CONFIG_ENV,
    ENV_PREFIX,
    Settings,
    setting_help,
    setting_names,
    shown,
)
from bac_node.grading import BACGrade
from training.phantom.vendors import VENDOR_NAMES

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "sample_dicom"
README = REPO / "README.md"
REEXEC_GUARD = "BAC_NODE_ALLOCATOR_TUNED"

SYNTH_ARGS = ["synth", "--studies", "2", "--scale", "0.05", "--seed", "3"]
SYNTH_IMAGES = 8  # 2 studies x 4 views; seed 3 draws no prior and no For Processing image


def clean_env(extra: Mapping[str, str] | None = None, *, tuned: bool = True) -> dict[str, str]:
    """This process's environment without any bac-node setting or allocator tuning."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(ENV_PREFIX) and k not in {"GLIBC_TUNABLES", CONFIG_ENV}
    }
    # The package is importable from any cwd, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if tuned:
        env[REEXEC_GUARD] = "1"
    env.update(extra or {})
    return env


def start(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Popen[str]:
    """Start ``python -m bac_node ARGS``; several may run at once (see :func:`finish`)."""
    return Popen(
        [sys.executable, "-m", "bac_node", *map(str, args)],
        cwd=cwd,
        env=clean_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: Popen[str], timeout: float = 180) -> CompletedProcess[str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def bac_node(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> CompletedProcess[str]:
    return finish(start(*args, cwd=cwd, env=env), timeout)


def assert_one_line_error(result: CompletedProcess[str]) -> str:
    """The run failed with exit status 1 and exactly one ``Error: ...`` line, no traceback."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    path = tmp_path / "cwd"
    path.mkdir()
    return path


def manifest_rows(directory: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((directory / "manifest.json").read_text())["images"]
    return rows


# --- version and settings -------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(cwd: Path, flag: str) -> None:
    result = bac_node(flag, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"bac-node, version {__version__}"


@pytest.mark.parametrize("config_before_command", [False, True])
def test_settings_json_shows_values_and_sources(
    cwd: Path, tmp_path: Path, config_before_command: bool
) -> None:
    config = tmp_path / "site.toml"
    config.write_text('ae_title = "FROMFILE"\nseed = 7\n', encoding="utf-8")
    env = clean_env({ENV_PREFIX + "PORT": "4100", ENV_PREFIX + "SEED": "8"})
    config_args = ["--config", str(config)]
    args = (
        [*config_args, "--device", "cpu", "settings", "--json"]
        if config_before_command
        else ["--device", "cpu", "settings", "--json", *config_args]
    )

    result = bac_node(*args, cwd=cwd, env=env)

    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert list(doc) == setting_names()
    assert doc["ae_title"] == {"value": "FROMFILE", "source": "file"}
    assert doc["port"] == {"value": "4100", "source": "env"}
    assert doc["seed"] == {"value": "8", "source": "env"}  # env beats the file
    assert doc["device"] == {"value": "cpu", "source": "cli"}
    defaults = Settings()
    for name in ("data_dir", "log_level"):
        assert doc[name] == {"value": str(getattr(defaults, name)), "source": "default"}


def test_settings_table_lists_every_setting(cwd: Path) -> None:
    result = bac_node("--data-dir", "elsewhere", "settings", cwd=cwd)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == setting_names()
    assert re.fullmatch(r"data_dir\s+elsewhere\s+\(cli\)", lines[0])


def test_config_env_var_and_default_config_file(cwd: Path, tmp_path: Path) -> None:
    (cwd / "bac-node.toml").write_text("port = 4200\n", encoding="utf-8")
    result = bac_node("settings", "--json", cwd=cwd)
    assert json.loads(result.stdout)["port"] == {"value": "4200", "source": "file"}

    other = tmp_path / "other.toml"
    other.write_text("port = 4300\n", encoding="utf-8")
    result = bac_node("settings", "--json", cwd=cwd, env=clean_env({CONFIG_ENV: str(other)}))
    assert json.loads(result.stdout)["port"] == {"value": "4300", "source": "file"}


def test_bad_setting_in_env_is_a_one_line_error(cwd: Path) -> None:
    line = assert_one_line_error(
        bac_node("settings", cwd=cwd, env=clean_env({ENV_PREFIX + "PORT": "eleven"}))
    )
    assert ENV_PREFIX + "PORT" in line


def test_missing_config_file_is_a_one_line_error(cwd: Path) -> None:
    line = assert_one_line_error(bac_node("settings", "--config", "nope.toml", cwd=cwd))
    assert "nope.toml" in line


# --- synth ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same synth command run twice (at once, to save time) into two directories."""
    cwd = tmp_path_factory.mktemp("synth")
    runs = [start(*SYNTH_ARGS, "--out", out, cwd=cwd) for out in ("out", "again")]
    for result in map(finish, runs):
        assert result.returncode == 0, result.stderr
        assert f"wrote 2 studies, {SYNTH_IMAGES} images" in result.stdout
    return cwd / "out", cwd / "again"


@pytest.fixture
def synth_dir(synth_twice: tuple[Path, Path]) -> Path:
    return synth_twice[0]


def test_synth_writes_manifests(synth_dir: Path) -> None:
    rows = manifest_rows(synth_dir)
    assert len(rows) == SYNTH_IMAGES
    with (synth_dir / "manifest.csv").open(newline="", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == SYNTH_IMAGES
    assert [r["sop_instance_uid"] for r in csv_rows] == [r["sop_instance_uid"] for r in rows]
    assert len({r["study"] for r in rows}) == 2
    for study in {r["study"] for r in rows}:
        views = sorted((r["laterality"], r["view"]) for r in rows if r["study"] == study)
        assert views == [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]


def test_synth_dicom_files_read_back(synth_dir: Path) -> None:
    for row in manifest_rows(synth_dir):
        ds = pydicom.dcmread(synth_dir / row["file"])
        assert ds.Modality == "MG"
        assert ds.SOPInstanceUID == row["sop_instance_uid"]
        assert ds.StudyInstanceUID == row["study_instance_uid"]
        assert (ds.ImageLaterality, ds.ViewPosition) == (row["laterality"], row["view"])
        assert ds.pixel_array.shape == (row["rows"], row["columns"])


def test_synth_masks_match_the_manifest(synth_dir: Path) -> None:
    for row in manifest_rows(synth_dir):
        masks = {}
        for kind in ("bac", "breast", "pectoral"):
            path = synth_dir / row[f"{kind}_mask"]
            assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
            with Image.open(path) as img:
                assert img.mode == "1"
                masks[kind] = np.asarray(img, dtype=bool)
            assert masks[kind].shape == (row["rows"], row["columns"])
        assert np.count_nonzero(masks["bac"]) == row["bac_pixels"]
        assert np.count_nonzero(masks["breast"]) == row["breast_pixels"]
        assert not (masks["bac"] & ~masks["breast"]).any()


def test_synth_writes_a_contact_sheet(synth_dir: Path) -> None:
    with Image.open(synth_dir / "contact_sheet.png") as img:
        assert img.format == "PNG"
        assert min(img.size) > 0


def test_synth_is_deterministic_for_a_seed(synth_twice: tuple[Path, Path]) -> None:
    synth_dir, again = synth_twice
    files = sorted(p.relative_to(synth_dir) for p in synth_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert sum(p.suffix == ".dcm" for p in files) == SYNTH_IMAGES
    differ = [str(p) for p in files if (synth_dir / p).read_bytes() != (again / p).read_bytes()]
    assert differ == []


BAD_INPUTS: dict[str, list[str]] = {
    "vendor": ["synth", "--out", "out", "--scale", "0.05", "--vendor", "Acme"],
    "grades abc": ["synth", "--out", "out", "--scale", "0.05", "--grades", "abc"],
    "grades 4:1": ["synth", "--out", "out", "--scale", "0.05", "--grades", "4:1"],
    "demo input": ["demo", "--input", ".", "--out", "out"],
}


BadRuns = dict[str, tuple[Path, CompletedProcess[str]]]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> BadRuns:
    """Each of BAD_INPUTS run in its own empty cwd, all at once: each loads torch (~2 s)."""
    cwds = {key: tmp_path_factory.mktemp("bad") for key in BAD_INPUTS}
    procs = {key: start(*args, cwd=cwds[key]) for key, args in BAD_INPUTS.items()}
    return {key: (cwds[key], finish(proc)) for key, proc in procs.items()}


def test_synth_unknown_vendor(bad_runs: BadRuns) -> None:
    cwd, result = bad_runs["vendor"]
    line = assert_one_line_error(result)
    assert "Acme" in line
    for name in VENDOR_NAMES:
        assert name in line
    assert not (cwd / "out").exists()


@pytest.mark.parametrize("grades", ["abc", "4:1"])
def test_synth_bad_grades(bad_runs: BadRuns, grades: str) -> None:
    cwd, result = bad_runs[f"grades {grades}"]
    line = assert_one_line_error(result)
    assert line.startswith("Error: --grades:")
    assert repr(grades) in line
    assert not (cwd / "out").exists()


# --- demo -------------------------------------------------------------------------------


def tree_state(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    }


def study_grade_of(manifest: list[dict[str, Any]]) -> int:
    first = manifest[0]["study"]
    grades = {r["study_grade"] for r in manifest if r["study"] == first}
    assert len(grades) == 1
    return int(grades.pop())


def test_sample_is_what_the_recipe_says() -> None:
    rows = manifest_rows(SAMPLE_DIR)
    assert len({r["study"] for r in rows}) == SAMPLE_RECIPE["studies"]
    assert {r["vendor"] for r in rows} == {SAMPLE_RECIPE["vendor"]}
    generator = json.loads((SAMPLE_DIR / "manifest.json").read_text())["generator"]
    assert generator["seed"] == SAMPLE_RECIPE["seed"]
    assert generator["scale"] == SAMPLE_RECIPE["scale"]
    planned = [g for g, w in SAMPLE_RECIPE["grades"].items() if w > 0]
    assert {r["planned_grade"] for r in rows} == set(planned)


@pytest.fixture(scope="module")
def tiny_model_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for a demo with the tiny test model (seconds, meaningless grades)."""
    from _processing_helpers import save_tiny_model

    model = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    return clean_env({"BAC_NODE_MODEL": str(model)})


def received_modalities(out: Path) -> list[str]:
    return sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).Modality)
        for p in (out / "received").rglob("*.dcm")
    )


def test_demo_goes_through_the_node(cwd: Path, tiny_model_env: dict[str, str]) -> None:
    before = tree_state(SAMPLE_DIR)
    result = bac_node(
        "demo", "--input", SAMPLE_DIR, "--out", "demo-out", cwd=cwd, env=tiny_model_env
    )
    assert result.returncode == 0, result.stderr
    assert "research use only, not for clinical use" in result.stdout
    assert re.search(r"^study grade [0-3] \(", result.stdout, re.MULTILINE)
    assert "5 objects came back over C-STORE" in result.stdout
    out = cwd / "demo-out"
    assert received_modalities(out) == ["SEG"] * 4 + ["SR"]
    study_uid = manifest_rows(SAMPLE_DIR)[0]["study_instance_uid"]
    assert (out / "received" / study_uid).is_dir()
    for row in manifest_rows(SAMPLE_DIR):
        assert row["sop_instance_uid"] in result.stdout
    # the node's own database says the same: one job done, one export done
    status = bac_node("--data-dir", out / "node", "status", "--json", cwd=cwd, env=tiny_model_env)
    counts = json.loads(status.stdout)["counts"]
    assert (counts["jobs"]["done"], counts["exports"]["done"]) == (1, 1)
    assert sum(counts["jobs"].values()) == sum(counts["exports"].values()) == 1
    assert tree_state(SAMPLE_DIR) == before  # the committed sample is only read
    # a second run in the same --out starts afresh
    again = bac_node(
        "demo", "--input", SAMPLE_DIR, "--out", "demo-out", cwd=cwd, env=tiny_model_env
    )
    assert again.returncode == 0, again.stderr
    assert received_modalities(out) == ["SEG"] * 4 + ["SR"]


def test_demo_refuses_an_out_directory_that_is_not_its_own(
    cwd: Path, tiny_model_env: dict[str, str]
) -> None:
    (cwd / "mine" / "node").mkdir(parents=True)
    (cwd / "mine" / "node" / "precious.txt").write_text("keep me")
    result = bac_node("demo", "--input", SAMPLE_DIR, "--out", "mine", cwd=cwd, env=tiny_model_env)
    line = assert_one_line_error(result)
    assert "not a bac-node demo directory" in line
    assert (cwd / "mine" / "node" / "precious.txt").read_text() == "keep me"


def test_demo_input_without_manifest(
    bad_runs: BadRuns,
) -> None:
    _, result = bad_runs["demo input"]
    line = assert_one_line_error(result)
    assert "no manifest.json" in line


@pytest.mark.slow
def test_demo_with_the_shipped_model_finds_the_sample_grade(cwd: Path) -> None:
    """The README's first command: no --input (sample remade from the recipe when the
    cwd has no sample_dicom/), the shipped model, the sample's true grade."""
    result = bac_node("demo", cwd=cwd, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "untrained" not in result.stderr
    committed = manifest_rows(SAMPLE_DIR)
    expected = study_grade_of(committed)
    flag = "Grade 3 cardiovascular flag RAISED" if expected == BACGrade.SEVERE else "no flag"
    assert re.search(rf"^study grade {expected} \({flag}\)", result.stdout, re.MULTILINE)
    out = cwd / Settings().data_dir / "demo"  # the default --out
    assert study_grade_of(manifest_rows(out / "sample")) == expected
    assert received_modalities(out) == ["SEG"] * 4 + ["SR"]


# --- allocator re-exec ------------------------------------------------------------------

TUNE_SCRIPT = """
import sys
sys.argv = ["bac-node", "--version"]
from bac_node.cli import tune_allocator
tune_allocator()
print("returned without exec")
"""

needs_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the allocator re-exec is Linux-only"
)


@needs_linux
@pytest.mark.parametrize(
    ("env_extra", "execs"),
    [
        ({}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, False),  # the user's own tuning
        ({REEXEC_GUARD: "1"}, False),
    ],
)
def test_tune_allocator_execs_only_when_untuned(
    cwd: Path, env_extra: dict[str, str], execs: bool
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", TUNE_SCRIPT],
        cwd=cwd,
        env=clean_env(env_extra, tuned=False),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # After execve the process is `python -m bac_node --version`: the script's print never runs.
    expected = f"bac-node, version {__version__}" if execs else "returned without exec"
    assert result.stdout.strip() == expected


# Records, at every interpreter start, the command line and the allocator variables.
SITECUSTOMIZE = """
import json, os, sys
_log = os.environ.get("BAC_NODE_TEST_START_LOG")
if _log:
    with open(_log, "a", encoding="utf-8") as f:
        f.write(json.dumps({
            "argv": sys.orig_argv[1:],
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
            "guard": os.environ.get("BAC_NODE_ALLOCATOR_TUNED"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        }) + "\\n")
"""


@needs_linux
def test_heavy_command_reexecs_with_glibc_tunables(cwd: Path, tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = tmp_path / "starts.jsonl"
    env = clean_env({"BAC_NODE_TEST_START_LOG": str(log)}, tuned=False)
    env.pop("OMP_WAIT_POLICY", None)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    args = ["synth", "--studies", "1", "--scale", "0.02", "--no-contact-sheet", "--out", "o"]

    result = bac_node(*args, cwd=cwd, env=env)

    assert result.returncode == 0, result.stderr
    assert len(manifest_rows(cwd / "o")) == 4
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(starts) == 2, starts  # the command, then its one re-exec
    assert starts[0] == {"argv": ["-m", "bac_node", *args], "GLIBC_TUNABLES": None, "guard": None,
                         "OMP_WAIT_POLICY": None}  # fmt: skip
    # The re-exec also lets torch's idle OpenMP threads sleep (README, Performance).
    assert starts[1] == {"argv": ["-m", "bac_node", *args], "GLIBC_TUNABLES": GLIBC_TUNABLES,
                         "guard": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # fmt: skip


# --- README -----------------------------------------------------------------------------


def readme_settings_table() -> dict[str, dict[str, str]]:
    """Rows of README's settings table, ``| `name` | default | environment | meaning |``."""
    if not README.is_file():
        pytest.fail(f"{README} does not exist; it must hold the settings table")
    lines = README.read_text(encoding="utf-8").splitlines()

    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        return [p.strip().replace("\\|", "|") for p in parts]

    header = ["setting", "default", "environment", "meaning"]
    starts = [
        i
        for i, line in enumerate(lines)
        if line.lstrip().startswith("|") and [c.lower() for c in cells(line)] == header
    ]
    if len(starts) != 1:
        pytest.fail(f"README needs one table with columns {' | '.join(header)}, has {len(starts)}")
    table: dict[str, dict[str, str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.lstrip().startswith("|"):
            break
        name, default, environment, meaning = cells(line)
        match = re.fullmatch(r"`([a-z_]+)`", name)
        assert match, f"first column must be a setting name in backticks: {line!r}"
        assert match[1] not in table, f"{match[1]} listed twice"
        table[match[1]] = {"default": default, "environment": environment, "meaning": meaning}
    return table


def test_readme_settings_table_matches_the_settings() -> None:
    table = readme_settings_table()
    assert sorted(table) == sorted(setting_names())
    defaults = Settings()
    for name, row in table.items():
        assert row["meaning"] == setting_help()[name], name
        assert (ENV_PREFIX + name.upper()) in row["environment"], name
        assert row["default"].strip("`") == shown(getattr(defaults, name)), name
