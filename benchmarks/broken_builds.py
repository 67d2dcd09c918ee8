"""Broken-build proofs: each reliability test fails on a build that breaks its promise.

    .venv/bin/python -m benchmarks.broken_builds [--only NAME[,NAME...]] [--no-baseline]
        [--update] [--list] [--keep] [--out DIR]

For each :class:`Mutant` of :data:`MUTANTS` the runner copies the working tree (``git
ls-files`` plus untracked files git does not ignore; never ``.venv``) to a temporary
folder, replaces ``old`` by ``new`` in ``file`` there (``old`` must occur exactly once:
a mutant whose text drifted is reported ``invalid``, never silently skipped), and runs
the named test in the copy with ``PYTHONPATH=<copy>``. Outcomes:

- ``caught``: the test failed (or errored in a fixture) on the broken build;
- ``missed``: it passed: the test does not guard that promise;
- ``skipped``: pytest skipped it (a tool missing here): proves nothing;
- ``timeout``: it ran past the mutant's ``timeout_s`` (a hang is not a proof either);
- ``invalid``: the replacement did not apply, or some process imported ``bac_node``
  from elsewhere than the copy (see below);
- ``baseline-failed``: the same test failed on the unbroken copy too, so a failure on
  the broken one proves nothing (``--no-baseline`` skips the baseline runs).

**Which code ran.** Every Python process started in the copy (pytest, ``bac-node
serve`` and ``bac-node worker`` subprocesses, spawned children) loads a
``sitecustomize`` from a folder put on ``PYTHONPATH`` after the copy; it logs each
process's ``bac_node.__file__`` the moment ``bac_node`` is imported (so a process killed
with SIGKILL is logged too). A run counts only when every one of those files lies in
the copy; the number of processes checked is in the table and the JSON.

Writes ``benchmarks/results/broken_builds.json`` and prints a Markdown table (the one in
RELIABILITY.md). Adding a mutant is one entry in :data:`MUTANTS`; ``--only`` runs some,
and ``--update`` keeps the rows of the others from the existing JSON (the table printed
is then the whole list, each row dated by the run that made it: see ``when`` per row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS, print_table, write_result


@dataclass(frozen=True)
class Mutant:
    """One deliberate break: ``old`` → ``new`` in ``file``; ``test`` must then fail."""

    name: str
    file: str
    """Relative to the repository root."""
    old: str
    """Text that occurs exactly once in ``file`` (one line, or a few)."""
    new: str
    test: str
    """A pytest node id, relative to the repository root."""
    what: str
    """The promise the mutant breaks, in a line."""
    timeout_s: float = 600.0


CRASH = "tests/reliability/test_crash.py"
WORKER_CRASH = "tests/reliability/test_worker_crash.py"
LOAD = "tests/reliability/test_load.py"
MALFORMED = "tests/reliability/test_malformed.py"
DISK_FULL = "tests/reliability/test_disk_full.py"
FUZZ = "tests/reliability/test_fuzz.py"
SECURITY = "tests/reliability/test_security.py"

MUTANTS: list[Mutant] = [
    # --- 1. crash safety ------------------------------------------------------------
    Mutant(
        name="ack-before-commit",
        file="bac_node/node/scp.py",
        old="            outcome = self.store.store(\n",
        new=(
            "            import threading as _t\n"
            "            _t.Timer(0.3, self.store.store, (ds,), dict(\n"
            "                transfer_syntax_uid=str(event.context.transfer_syntax),\n"
            "                calling_ae=calling, protocol='dimse',\n"
            "                expected_sop_class=str(event.context.abstract_syntax))).start()\n"
            "            return _response(SUCCESS)\n"
            "            outcome = self.store.store(\n"
        ),
        test=f"{CRASH}::test_kill9_during_ingest_loses_no_acknowledged_instance",
        what="C-STORE answered Success before the file and row are durable (write-behind)",
        timeout_s=900,
    ),
    Mutant(
        name="no-fsync",
        file="bac_node/node/store.py",
        old="            os.fsync(file.fileno())\n",
        new="            pass  # os.fsync(file.fileno())\n",
        test=f"{CRASH}::test_success_comes_after_fsync_and_commit",
        what="the instance file is not fsynced before Success (kill -9 cannot show it)",
    ),
    # --- 2. worker crash ------------------------------------------------------------
    Mutant(
        name="complete-without-lease",
        file="bac_node/node/queue.py",
        old=(
            '            select(Job).where(Job.id == job_id, Job.state == "running", '
            "Job.lease_owner == owner),\n"
        ),
        new="            select(Job).where(Job.id == job_id),\n",
        test=f"{WORKER_CRASH}::test_a_killed_worker_s_job_is_finished_by_another_once",
        what="complete_job records a result without checking the worker still holds the lease",
        timeout_s=900,
    ),
    # --- 4. load --------------------------------------------------------------------
    Mutant(
        name="no-association-limit",
        file="bac_node/node/scp.py",
        old="    ae.maximum_associations = settings.max_associations\n",
        new="    ae.maximum_associations = 1000\n",
        test=f"{LOAD}::test_beyond_max_associations_new_ones_are_rejected_then_accepted",
        what="max_associations is not enforced",
    ),
    # --- 5. malformed input ---------------------------------------------------------
    Mutant(
        name="accept-illegal-uids",
        file="bac_node/node/store.py",
        old='_UID_PATTERN = re.compile(r"[0-9]+(\\.[0-9]+)*")\n',
        new='_UID_PATTERN = re.compile(r".+")\n',
        test=f"{MALFORMED}::test_every_corpus_file_is_refused_and_the_node_keeps_serving",
        what="UIDs with `../` and other illegal characters are stored",
    ),
    Mutant(
        name="scp-offers-deflate",
        file="bac_node/node/scp.py",
        old="    RLELossless,\n    ExplicitVRLittleEndian,\n",
        new='    RLELossless,\n    "1.2.840.10008.1.2.1.99",\n    ExplicitVRLittleEndian,\n',
        test=f"{MALFORMED}::test_every_corpus_file_is_refused_and_the_node_keeps_serving",
        what="the SCP accepts Deflated Explicit VR LE: the deflate bomb is inflated",
    ),
    Mutant(
        name="stow-inflates-deflate",
        file="bac_node/node/http.py",
        old="    if _deflated(data):\n",
        new="    if False:\n",
        test=f"{MALFORMED}::test_stow_refuses_every_corpus_file_and_never_shows_the_canary",
        what="STOW-RS reads deflated parts whole: the deflate bomb is inflated",
    ),
    Mutant(
        name="patient-name-in-log",
        file="bac_node/node/store.py",
        old="        return _logged(outcome)\n",
        new=(
            '        log.info("stored for %s", ds.get("PatientName", ""))\n'
            "        return _logged(outcome)\n"
        ),
        test=f"{MALFORMED}::test_canary_patient_never_reaches_logs_or_error_messages",
        what="the store logs the patient's name",
    ),
    # --- 3. disk full (tests/reliability/test_disk_full.py) --------------------------
    Mutant(
        name="ignore-min-free-mb",
        file="bac_node/node/store.py",
        old="        if free < self.settings.min_free_mb * 1024 * 1024:\n",
        new="        if False:\n",
        test=f"{DISK_FULL}::test_disk_full_refuses_with_a700_then_resumes_by_itself",
        what="the store writes below min_free_mb (only ENOSPC stops it)",
    ),
    Mutant(
        name="readyz-ignores-disk",
        file="bac_node/node/http.py",
        old="            enough = free >= self.settings.min_free_mb\n",
        new="            enough = True\n",
        test=f"{DISK_FULL}::test_disk_full_refuses_with_a700_then_resumes_by_itself",
        what="/readyz stays 200 while free space is under min_free_mb",
    ),
    Mutant(
        name="success-on-enospc",
        file="bac_node/node/store.py",
        old=(
            "            return _failure(OUT_OF_RESOURCES, sop_uid, study_uid, "
            '_os_reason("write", exc))\n'
        ),
        new="            return StoreOutcome(SUCCESS, True, False, True, sop_uid, study_uid, '')\n",
        test=f"{DISK_FULL}::test_a_write_that_runs_out_of_space_is_a700_and_leaves_nothing",
        what="a write that fails with ENOSPC is answered Success",
    ),
    Mutant(
        name="temp-file-left-on-enospc",
        file="bac_node/node/store.py",
        old="            temporary.unlink()\n        raise\n",
        new="            pass\n        raise\n",
        test=f"{DISK_FULL}::test_a_write_that_runs_out_of_space_is_a700_and_leaves_nothing",
        what="a partly written temporary file stays after ENOSPC",
    ),
    # --- 6. fuzzing (tests/reliability/test_fuzz.py) ---------------------------------
    Mutant(
        name="stow-read-narrow-except",
        file="bac_node/node/http.py",
        old="    except Exception as exc:\n        reason = ",
        new="    except (InvalidDicomError, ValueError, RecursionError) as exc:\n        reason = ",
        test=f"{FUZZ}::test_inputs_that_crashed_a_harness_are_refused_both_ways",
        what="STOW-RS lets pydicom's OSError out of read_part (an HTTP 500; fuzz finding)",
    ),
    Mutant(
        name="truncation-check-unguarded",
        file="bac_node/node/store.py",
        old="        checked = self._validate(ds, ",
        new="        _truncated_element(ds)\n        checked = self._validate(ds, ",
        test=f"{FUZZ}::test_inputs_that_crashed_a_harness_are_refused_both_ways",
        what="store() raises on an unknown VR in the last element (fuzz finding)",
    ),
    Mutant(
        name="content-type-params-unguarded",
        file="bac_node/node/http.py",
        old="    except Exception as exc:  # the stdlib parser's failures are not documented\n",
        new="    except HttpError as exc:  # the stdlib parser's failures are not documented\n",
        test=f"{FUZZ}::test_a_content_type_the_email_package_cannot_parse_is_a_400",
        what="a Content-Type the email package cannot parse is an HTTP 500 (fuzz finding)",
    ),
    # --- 7. security (tests/reliability/test_security.py) ----------------------------
    Mutant(
        name="ip-allowlist-ignored",
        file="bac_node/node/scp.py",
        old="        return _normal_ip(address) in self.by_address.get(ae_title, frozenset())\n",
        new="        return ae_title in self.by_address\n",
        test=f"{SECURITY}::test_ae_at_host_admits_its_address_and_rejects_another",
        what="an AE@host entry admits its AE title from any address",
    ),
    Mutant(
        name="tls-client-cert-not-required",
        file="bac_node/node/scp.py",
        old="        context.verify_mode = ssl.CERT_REQUIRED\n",
        new="        context.verify_mode = ssl.CERT_NONE\n",
        test=f"{SECURITY}::test_tls_refuses_another_ca_no_certificate_and_plain_tcp",
        what="tls_ca set, but a client without a certificate of that CA is served",
    ),
    Mutant(
        name="tls-handshake-in-accept-loop",
        file="bac_node/node/scp.py",
        old='        kwargs["do_handshake_on_connect"] = False\n',
        new='        kwargs["do_handshake_on_connect"] = True\n',
        test=f"{SECURITY}::test_a_silent_client_does_not_stall_the_tls_port",
        what="the TLS handshake runs in the accept loop: one silent client stalls the port",
        timeout_s=300.0,
    ),
    Mutant(
        name="data-dir-default-mode",
        file="bac_node/node/service.py",
        old="        self.settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)\n",
        new="        self.settings.data_dir.mkdir(parents=True, exist_ok=True)\n",
        test=f"{SECURITY}::test_data_directory_is_0700_and_received_files_0600",
        what="serve creates the data directory readable by every user (0755)",
    ),
    Mutant(
        name="weights-fall-back-to-torch-load",
        file="bac_node/model/weights.py",
        old="    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:\n",
        new=(
            "    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:\n"
            "        torch.load(path, weights_only=False)\n"
        ),
        test=f"{SECURITY}::test_pickled_weights_are_refused_and_never_unpickled",
        what="a weights file that is not safetensors is unpickled (runs its code)",
    ),
    Mutant(
        name="patient-in-worker-log",
        file="bac_node/node/worker.py",
        old="            job.job_id, job.study_uid, len(job.paths), job.attempts,\n",
        new=(
            "            job.job_id, __import__('pydicom').dcmread(job.paths[0]).PatientName,\n"
            "            len(job.paths), job.attempts,\n"
        ),
        test=f"{SECURITY}::test_canary_patient_is_nowhere_after_a_full_run",
        what="the worker logs the patient's name (seen only in a full run)",
    ),
]


# --- the working tree and its copy --------------------------------------------------


def tree_files(repo: Path = REPO) -> list[str]:
    """Tracked and untracked-but-not-ignored files that exist (never ``.venv``)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    return sorted(
        {name for name in listed if name and not name.startswith(".venv/")
         and (repo / name).is_file()}
    )  # fmt: skip


def copy_tree(dest: Path, repo: Path = REPO) -> int:
    """Copy the working tree's files to ``dest``; how many."""
    files = tree_files(repo)
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, target)
    return len(files)


def apply(mutant: Mutant, root: Path) -> None:
    """The mutant's replacement in the copy at ``root``; ValueError unless it matches once."""
    path = root / mutant.file
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"{mutant.file}: the old text occurs {count} times, not once")
    path.write_text(text.replace(mutant.old, mutant.new))


_SITECUSTOMIZE = '''
"""Written by benchmarks.broken_builds: log where this process imports bac_node from."""
import os
import sys
from importlib.machinery import PathFinder


class _Where:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "bac_node":
            return None
        spec = PathFinder.find_spec(name, path)
        origin = spec.origin if spec else None
        command = " ".join(sys.argv)[:200]
        with open(os.environ["BAC_NODE_BROKEN_BUILD_IMPORTS"], "a") as log:
            log.write(f"{os.getpid()}\\t{origin}\\t{command}\\n")
        return spec


sys.meta_path.insert(0, _Where)
'''


@dataclass
class Run:
    outcome: str
    seconds: float
    processes: int
    detail: str


def run_test(root: Path, test: str, timeout_s: float, hook: Path) -> Run:
    """Run ``test`` with pytest in the copy at ``root``; what happened."""
    imports = root / ".broken-build-imports.log"
    imports.unlink(missing_ok=True)
    report = root / ".broken-build-junit.xml"
    report.unlink(missing_ok=True)
    env = dict(os.environ, BAC_NODE_ALLOCATOR_TUNED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(hook)])
    env["BAC_NODE_BROKEN_BUILD_IMPORTS"] = str(imports)
    args = [sys.executable, "-m", "pytest", test, "-x", "-q", "-p", "no:cacheprovider",
            f"--junitxml={report}"]  # fmt: skip
    start = time.monotonic()
    try:
        done = subprocess.run(
            args, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s,
            start_new_session=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Run("timeout", time.monotonic() - start, 0, f"ran past {timeout_s:g} s")
    seconds = time.monotonic() - start
    origins = _origins(imports)
    outside = [o for o in origins if not o.startswith(str(root) + os.sep)]
    if not origins:
        return Run("invalid", seconds, 0, "no process imported bac_node")
    if outside:
        return Run("invalid", seconds, len(origins), f"bac_node imported from {outside[0]}")
    outcome, detail = _judge(done, report)
    return Run(outcome, seconds, len(origins), detail)


def _origins(imports: Path) -> list[str]:
    if not imports.exists():
        return []
    return [line.split("\t")[1] for line in imports.read_text().splitlines() if "\t" in line]


def _judge(done: subprocess.CompletedProcess[str], report: Path) -> tuple[str, str]:
    tail = (done.stdout + done.stderr).strip().splitlines()
    summary = tail[-1] if tail else f"pytest exited {done.returncode}"
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.exists():
        root = ElementTree.parse(report).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            counts = {k: int(suite.get(k, "0")) for k in counts}
    reasons = [line.strip() for line in tail if line.startswith(("E ", "FAILED", "ERROR"))]
    first_failure = next((r for r in reasons if "Error" in r), reasons[0] if reasons else summary)
    if done.returncode == 1 and (counts["failures"] or counts["errors"]):
        return "failed", first_failure[:300]
    if done.returncode == 0 and counts["tests"] and counts["skipped"] == counts["tests"]:
        return "skipped", summary
    if done.returncode == 0 and counts["tests"]:
        return "passed", summary
    return "error", f"pytest exited {done.returncode}: {summary}"[:300]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", help="Comma-separated mutant names (default: all).")
    parser.add_argument(
        "--no-baseline", action="store_true", help="Skip the runs on the unbroken copy."
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="Keep the other mutants' rows of the existing JSON (replace only those run).",
    )
    parser.add_argument("--list", action="store_true", help="List the mutants and exit.")
    parser.add_argument("--keep", action="store_true", help="Keep the copies (their paths print).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    known = {m.name: m for m in MUTANTS}
    if len(known) != len(MUTANTS):
        parser.error("two mutants share a name")
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<28} {m.test}\n{'':<28} {m.what}")
        return []
    chosen = MUTANTS
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"unknown mutant(s) {', '.join(unknown)}; known: {', '.join(known)}")
        chosen = [known[n] for n in names]

    work = Path(tempfile.mkdtemp(prefix="bac-node-broken-builds-"))
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(_SITECUSTOMIZE).lstrip())
    rows: list[dict[str, Any]] = []
    try:
        baselines: dict[str, Run] = {}
        if not args.no_baseline:
            for test in dict.fromkeys(m.test for m in chosen):
                copy = work / f"baseline-{len(baselines)}"
                copy_tree(copy)
                timeout = max(m.timeout_s for m in chosen if m.test == test)
                baselines[test] = run_test(copy, test, timeout, hook)
                b = baselines[test]
                print(f"baseline {test}: {b.outcome} ({b.seconds:.0f} s) {b.detail}", flush=True)
                if not args.keep:
                    shutil.rmtree(copy, ignore_errors=True)
        for index, mutant in enumerate(chosen):
            copy = work / f"{index:02d}-{mutant.name}"
            files = copy_tree(copy)
            try:
                apply(mutant, copy)
            except (OSError, ValueError) as exc:
                run = Run("invalid", 0.0, 0, str(exc))
            else:
                run = run_test(copy, mutant.test, mutant.timeout_s, hook)
            base = baselines.get(mutant.test)
            outcome = {"failed": "caught", "passed": "missed"}.get(run.outcome, run.outcome)
            if base is not None and base.outcome != "passed" and outcome == "caught":
                outcome = "baseline-failed"
            row = {
                "mutant": mutant.name,
                "file": mutant.file,
                "test": mutant.test.split("::")[-1],
                "outcome": outcome,
                "baseline": "-" if base is None else base.outcome,
                "seconds": round(run.seconds, 1),
                "processes_checked": run.processes,
                "what": mutant.what,
                "detail": run.detail,
                "files_copied": files,
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "mutant_spec": asdict(mutant),
            }  # fmt: skip
            rows.append(row)
            print(f"{mutant.name}: {outcome} ({run.seconds:.0f} s, {run.processes} processes "
                  f"checked) {run.detail}", flush=True)  # fmt: skip
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
    finally:
        if args.keep:
            print(f"copies kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.update and (args.out / "broken_builds.json").exists():
        ran = {row["mutant"] for row in rows}
        kept = json.loads((args.out / "broken_builds.json").read_text())["rows"]
        merged = {row["mutant"]: row for row in kept if row["mutant"] not in ran}
        merged.update({row["mutant"]: row for row in rows})
        order = [m.name for m in MUTANTS]
        rows = sorted(merged.values(), key=lambda r: order.index(r["mutant"])
                      if r["mutant"] in order else len(order))  # fmt: skip
    path = write_result("broken_builds", rows, args.out, copies_under=str(work))
    print_table(
        "Broken builds (outcome 'caught': the test failed on the broken build)",
        rows, ["mutant", "file", "what", "test", "baseline", "outcome", "seconds"],
    )  # fmt: skip
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()
