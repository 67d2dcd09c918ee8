"""Fuzz the read-and-validate path of an incoming instance (STOW-RS part and C-STORE).

What runs per input and what counts as a finding: :func:`_targets.read_and_validate`.
Usage and defaults: :mod:`_harness` (``-max_total_time=30`` for a smoke run; the
full-size run is ``python -m benchmarks.fuzz --runs 1000000``).
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["bac_node", "pydicom", "pynetdicom"]):
    import _targets

import _harness


def test_one_input(data: bytes) -> None:
    _targets.read_and_validate(data)


def main() -> None:
    _targets.quiet()
    _targets.store()  # the database is made once, before fuzzing
    atheris.Setup(_harness.arguments("read", sys.argv), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
