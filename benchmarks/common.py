"""What every benchmark shares: the machine's description, tables, JSON, peers, studies.

Each benchmark prints a table and writes ``benchmarks/results/<name>.json`` (``--out``
elsewhere): ``{"meta": {...}, "rows": [...]}`` with the command, the machine, the
allocator setting and the versions in ``meta``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
MIB = 1024**2
GIB = 1024**3


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    import torch

    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(name: str, rows: Sequence[Mapping[str, Any]], out: Path, **meta: Any) -> Path:
    """``out/<name>.json`` with the rows and their meta (command, machine, ``meta``)."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": {
            "command": " ".join(["python", "-m", f"benchmarks.{name}", *sys.argv[1:]]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            **meta,
        },
        "rows": list(rows),
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def print_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """A Markdown table of ``columns`` of ``rows`` (pasteable into the README)."""
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0-100) by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def tool(name: str) -> str:
    """The path of a dcmtk program; a clear error naming the Debian package without it."""
    path = shutil.which(name)
    if path is None:
        raise SystemExit(f"{name} is not installed (Debian package dcmtk)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
    return value


def echo(port: int, called_ae: str) -> bool:
    """One C-ECHO with dcmtk's echoscu: the peer is up and answers."""
    run = subprocess.run(
        [tool("echoscu"), "-aet", "BENCH", "-aec", called_ae, "-to", "2", "-ta", "2", "-td", "2",
         LOOPBACK, str(port)],
        capture_output=True, check=False,
    )  # fmt: skip
    return run.returncode == 0


def storescu(files: Sequence[Path], port: int, called_ae: str) -> float:
    """Send ``files`` in one association with dcmtk's storescu; the seconds it took.

    Raises when any store was not answered Success (storescu's output is read).
    """
    args = [tool("storescu"), "--verbose", "-aet", "BENCH", "-aec", called_ae, "--required"]
    args += [LOOPBACK, str(port), *map(str, files)]
    start = time.perf_counter()
    run = subprocess.run(args, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    lines = (run.stdout + run.stderr).splitlines()
    answers = [line for line in lines if "Received Store Response" in line]
    failed = [line for line in answers if "Success" not in line and "Warning" not in line]
    if run.returncode != 0 or len(answers) != len(files) or failed:
        tail = "\n".join(lines[-10:])
        raise RuntimeError(f"storescu: {len(answers)}/{len(files)} answered, {failed[:2]}\n{tail}")
    return seconds


@contextmanager
def process(
    args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process writing to ``log``; SIGTERM (then SIGKILL) when the block ends."""
    with log.open("wb") as out:
        child = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT,
                                 env=dict(env) if env is not None else None)  # fmt: skip
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def peak_rss_bytes(pid: int) -> int:
    """The high-water mark of a live process's resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a bac-node child: the allocator tuned, no re-exec, quiet."""
    from bac_node.cli import GLIBC_TUNABLES

    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, BAC_NODE_ALLOCATOR_TUNED="1")
    # Children run `python -m benchmarks.…`: the repository must be importable.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def synth_studies(out: Path, studies: int, *, seed: int, vendor: str, scale: float) -> list[Path]:
    """``studies`` phantom 4-view studies (For Presentation only) under ``out``; each
    study's folder. Not timed by any benchmark."""
    from training.phantom.study import plan_studies, render_study, write_study

    plans = plan_studies(
        studies, seed=seed, vendor=vendor, grades={2: 1.0}, processing_fraction=0.0,
        prior_fraction=0.0,
    )  # fmt: skip
    folders = []
    for index, plan in enumerate(plans):
        folder = out / f"study-{index:03d}"
        write_study(render_study(plan, scale=scale), folder)
        folders.append(folder)
    return folders


def dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.dcm"))


def patch_sqlite_synchronous(mode: str) -> None:
    """Make every SQLite engine the node opens from now on use ``PRAGMA synchronous=mode``.

    For measuring what durability costs only (the product always uses FULL): wraps
    ``bac_node.node.db._sqlite_engine`` with one more connect hook, run after its own.
    """
    from sqlalchemy import event

    import bac_node.node.db as db_module

    make_engine = db_module._sqlite_engine

    def engine_with_mode(url: str, begin: str) -> Any:
        engine = make_engine(url, begin)

        @event.listens_for(engine, "connect")
        def _mode(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute(f"PRAGMA synchronous={mode}")

        return engine

    db_module._sqlite_engine = engine_with_mode
