"""The command line both harnesses share: libFuzzer flags, a seeded corpus directory.

``python tests/reliability/fuzz/fuzz_read.py [libFuzzer flags] [CORPUS_DIR]``: without a
corpus directory the seeds (:func:`_targets.write_seeds`) go to a temporary one, which
libFuzzer also fills with the new inputs it finds. Defaults added unless given:
``-max_len=65536`` (the seeds are small; a 1 MB input would spend its time copying),
``-timeout=30`` (an input that takes 30 s is a finding: a sender could hold a thread so)
and ``-artifact_prefix=<cwd>/fuzz-findings/`` (where a crashing input is written).
Run it with ``-max_total_time=SECONDS`` or ``-runs=N``; exit status 0 means no finding.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import _targets

DEFAULTS = {"-max_len": "65536", "-timeout": "30"}


def arguments(kind: str, argv: list[str]) -> list[str]:
    """``argv`` with the defaults above and a seeded corpus directory when none is given."""
    args = list(argv)
    flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    for flag, value in DEFAULTS.items():
        if flag not in flags:
            args.append(f"{flag}={value}")
    if "-artifact_prefix" not in flags:
        findings = Path.cwd() / "fuzz-findings"
        findings.mkdir(exist_ok=True)
        args.append(f"-artifact_prefix={findings}{os.sep}")
    corpora = [a for a in args[1:] if not a.startswith("-")]
    if not corpora:
        corpus = Path(tempfile.mkdtemp(prefix=f"bac-node-fuzz-{kind}-"))
        args.append(str(_targets.write_seeds(kind, corpus)))
    elif not any(Path(c).is_file() for c in corpora) and not any(
        Path(c).is_dir() and any(Path(c).iterdir()) for c in corpora
    ):  # empty corpus directories get the seeds; files given are inputs to run again
        _targets.write_seeds(kind, Path(corpora[0]))
    print(f"fuzz {kind}: {' '.join(args[1:])}", file=sys.stderr, flush=True)
    return args
