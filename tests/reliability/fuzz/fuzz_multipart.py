"""Fuzz the STOW-RS multipart parser (Content-Type boundary and body parts).

What runs per input and what counts as a finding: :func:`_targets.multipart`.
Usage and defaults: :mod:`_harness` (``-max_total_time=30`` for a smoke run; the
full-size run is ``python -m benchmarks.fuzz --runs 1000000``).
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["bac_node", "email"]):
    import _targets

import _harness


def test_one_input(data: bytes) -> None:
    _targets.multipart(data)


def main() -> None:
    _targets.quiet()
    atheris.Setup(_harness.arguments("multipart", sys.argv), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
