"""The fuzz harnesses of ``fuzz/`` (atheris): their findings stay fixed, and a smoke run.

- Each input in ``fuzz/regressions/`` crashed a harness once (an exception escaped where
  the node promises a refusal: an HTTP 500 on STOW-RS); it must now get a failure status
  both ways an instance enters (STOW-RS part, C-STORE data set).
- The multipart finding (a Content-Type whose RFC 2231 parameters made the email package
  raise TypeError) is one line, so it is written here rather than kept as a file.
- The smoke run (slow): each harness for 30 s from its seeds, as a subprocess; any
  finding fails the test with libFuzzer's report. The full-size run (>= 1,000,000
  executions each) is ``python -m benchmarks.fuzz --runs 1000000`` (RELIABILITY.md).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bac_node.node.http import HttpError, request_boundary

FUZZ = Path(__file__).resolve().parent / "fuzz"
SMOKE_SECONDS = 30
SUCCESS_OR_WARNING = {0x0000, 0xB000}

_spec = importlib.util.spec_from_file_location("_targets", FUZZ / "_targets.py")
assert _spec is not None and _spec.loader is not None
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)


@pytest.mark.parametrize("path", sorted((FUZZ / "regressions").iterdir()), ids=lambda p: p.name)
def test_inputs_that_crashed_a_harness_are_refused_both_ways(path: Path) -> None:
    targets.quiet()
    data = path.read_bytes()
    for way in (targets.by_stow, targets.by_c_store):
        status = way(data)
        assert status not in SUCCESS_OR_WARNING, f"{way.__name__}: 0x{status:04X}"


def test_a_content_type_the_email_package_cannot_parse_is_a_400() -> None:
    content_type = 'multipart/related; type="application/dicom"; boundary*=x; boundary*0=y'
    with pytest.raises(HttpError) as refused:
        request_boundary(content_type)
    assert refused.value.status == 400
    assert "malformed Content-Type" in refused.value.reason
    assert targets.multipart(content_type.encode() + b"\n--x\r\n\r\nDICM\r\n--x--") == 0


def test_the_seeds_reach_the_store_both_ways() -> None:
    """The seeds are not all refused at the first byte: valid ones reach the disk check."""
    targets.quiet()
    seeds = targets.instance_seeds()
    valid = [data for name, data in seeds.items() if name.startswith("sample-")]
    assert len(valid) == 4
    for data in valid:  # validated, then refused only for want of (1 EiB of) free space
        assert targets.by_stow(data) == 0xA700
        assert targets.by_c_store(data) == 0xA700
    multipart = targets.multipart_seeds()
    assert all(targets.multipart(body) >= 1 for body in multipart.values())


@pytest.mark.slow
@pytest.mark.parametrize("harness", ["fuzz_read", "fuzz_multipart"])
def test_smoke_run_finds_nothing(harness: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(FUZZ / f"{harness}.py"), f"-max_total_time={SMOKE_SECONDS}",
         f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
        capture_output=True, text=True, cwd=tmp_path, timeout=SMOKE_SECONDS + 120,
    )  # fmt: skip
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-6000:]
    done = re.search(r"Done (\d+) runs in (\d+) second", report)
    assert done, report[-3000:]
    assert int(done.group(1)) >= 500, f"only {done.group(1)} executions: {report[-3000:]}"
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
