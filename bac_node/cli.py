"""The ``bac-node`` command group.

Domain errors (:class:`bac_node.errors.BacNodeError`) become a one-line ``Error: …``
and exit status 1 here, and only here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from bac_node import __version__
from bac_node.config import (
    SECRET_SETTINGS,
    Settings,
    Source,
    load_settings,
    redact_url,
    setting_help,
    shown,
)
from bac_node.errors import BacNodeError, ConfigError

#: glibc keeps large tensors mapped instead of unmapping them after every use: 2-3x
#: faster large forward passes on CPU (measured; see README "Performance").
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
_REEXEC_GUARD = "BAC_NODE_ALLOCATOR_TUNED"

SAMPLE_DIR = Path("sample_dicom")
#: How sample_dicom/ was made (and how the demo remakes it when it is not at hand).
SAMPLE_RECIPE: dict[str, Any] = {
    "studies": 1,
    "seed": 2025,
    "vendor": "Hologic",
    "grades": {3: 1.0},
    "scale": 0.25,
}


def tune_allocator() -> None:
    """Re-run this command with the glibc allocator tuned, once, on Linux.

    Heavy commands call this first; it replaces the process (same arguments) unless the
    user set ``GLIBC_TUNABLES`` themselves or ``BAC_NODE_ALLOCATOR_TUNED`` is set. The
    new process also gets ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy:
    torch's OpenMP threads then sleep instead of spinning between parallel regions,
    which on busy cores made the torch backend's analysis 1.6x faster (README,
    Performance: the ``torch+passive`` row); ONNX Runtime sets its own.
    """
    if not sys.platform.startswith("linux") or os.environ.get(_REEXEC_GUARD):
        return
    if os.environ.get("GLIBC_TUNABLES"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, **{_REEXEC_GUARD: "1"})
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bac_node", *sys.argv[1:]], env)


class _Context:
    def __init__(
        self,
        settings: Settings,
        sources: dict[str, Source],
        cli_values: dict[str, Any],
    ) -> None:
        self.settings = settings
        self.sources = sources
        # The group's setting flags, so that `settings --config` can re-resolve with them.
        self.cli_values = cli_values


pass_context = click.make_pass_decorator(_Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="bac-node")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML settings file (default: $BAC_NODE_CONFIG, else ./bac-node.toml if present).",
)
@click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), help=setting_help()["data_dir"]
)
@click.option("--ae-title", help=setting_help()["ae_title"])
@click.option("--port", type=int, help=setting_help()["port"])
@click.option("--log-level", help=setting_help()["log_level"])
@click.option("--device", help=setting_help()["device"])
@click.option("--database", metavar="URL", help=setting_help()["database"])
@click.pass_context
def cli(
    ctx: click.Context,
    config_file: Path | None,
    data_dir: Path | None,
    ae_title: str | None,
    port: int | None,
    log_level: str | None,
    device: str | None,
    database: str | None,
) -> None:
    """bac-node: breast arterial calcification (BAC) on screening mammograms.

    Research use only. Not for clinical use.
    """
    cli_values: dict[str, Any] = {
        "data_dir": data_dir, "ae_title": ae_title, "port": port, "log_level": log_level,
        "device": device, "database": database,
    }  # fmt: skip
    try:
        settings, sources = load_settings(config_file=config_file, cli=cli_values)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # highdicom narrates every attribute it copies at INFO; keep its warnings only.
    logging.getLogger("highdicom").setLevel(max(logging.WARNING, logging.root.level))
    # APScheduler narrates every tick at INFO; pynetdicom every PDU at DEBUG.
    logging.getLogger("apscheduler").setLevel(max(logging.WARNING, logging.root.level))
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.root.level))
    # Alembic narrates its set-up at INFO; open_database logs a migration itself.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.root.level))
    ctx.obj = _Context(settings, sources, cli_values)


@cli.command("settings")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_context
def settings_command(obj: _Context, config_file: Path | None, as_json: bool) -> None:
    """Show every setting, its value and where the value came from."""
    # The group already resolved everything (its --config and flags included); only a
    # --config given here, after the command name, means resolving again.
    settings, sources = obj.settings, obj.sources
    if config_file is not None:
        settings, sources = load_settings(config_file=config_file, cli=obj.cli_values)
    values = {name: shown(getattr(settings, name)) for name in sources}
    for name in SECRET_SETTINGS:  # tokens are secrets: say how many, never which
        if getattr(settings, name):
            values[name] = f"({len(getattr(settings, name))} set, not shown)"
    values["database"] = redact_url(values["database"])  # a password is never printed
    if as_json:
        click.echo(
            json.dumps({n: {"value": v, "source": sources[n]} for n, v in values.items()}, indent=1)
        )
        return
    width = max(len(n) for n in values)
    for name, value in values.items():
        click.echo(f"{name:<{width}}  {value:<24}  ({sources[name]})")


@cli.command()
@click.option("--studies", "-n", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int, help="Random seed (default: the `seed` setting).")
@click.option("--vendor", help="Only this vendor style (default: the source study's vendor mix).")
@click.option(
    "--grades",
    default="0:0.3,1:0.3,2:0.2,3:0.2",
    show_default=True,
    help='Grade distribution: "0,1,2,3" (equal) or "GRADE:WEIGHT,...".',
)
@click.option(
    "--scale",
    type=click.FloatRange(min=0.01, max=1.0),
    default=1.0,
    show_default=True,
    help="Matrix scale: 1 is the vendor's full resolution; < 1 makes small images "
    "of the same field of view.",
)
@click.option(
    "--priors",
    type=click.FloatRange(0, 1),
    default=0.2,
    show_default=True,
    help="Share of studies that are another screening round of an earlier woman.",
)
@click.option(
    "--for-processing",
    "processing",
    type=click.FloatRange(0, 1),
    default=0.15,
    show_default=True,
    help="Share of studies that also carry For Processing images.",
)
@click.option(
    "--jpeg2000",
    type=click.Choice(["never", "some", "always"]),
    default="never",
    show_default=True,
    help="JPEG 2000 lossless for vendors that offer it.",
)
@click.option("--contact-sheet/--no-contact-sheet", default=True, show_default=True,
              help="Write contact_sheet.png of the first study.")  # fmt: skip
@click.option(
    "--prior-pair",
    is_flag=True,
    help="Instead of --studies: one woman's grade 1 prior and grade 3 current study a year "
    "later (same PatientID), to try the node's priors.",
)
@pass_context
def synth(
    obj: _Context,
    studies: int,
    out: Path,
    seed: int | None,
    vendor: str | None,
    grades: str,
    scale: float,
    priors: float,
    processing: float,
    jpeg2000: str,
    contact_sheet: bool,
    prior_pair: bool,
) -> None:
    """Generate synthetic 4-view screening studies with exact BAC ground truth.

    Writes DICOM (MG), 1-bit PNG masks (BAC, breast, pectoral) and manifest.csv/json
    with per-image vendor, patient, laterality, view, pixel counts, area %, grade and
    patient-level split. Deterministic for a given seed. Not patient data.
    """
    tune_allocator()
    from training.phantom.study import parse_grade_distribution, plan_studies, synthesize
    from training.phantom.vendors import VENDOR_NAMES

    if vendor is not None and vendor not in VENDOR_NAMES:
        raise BacNodeError(f"unknown vendor {vendor!r}; valid: {', '.join(VENDOR_NAMES)}")
    try:
        distribution = parse_grade_distribution(grades)
    except ValueError as exc:
        raise BacNodeError(f"--grades: {exc}") from None
    seed = obj.settings.seed if seed is None else seed
    plans = plan_studies(
        studies, seed, vendor=vendor, grades=distribution,
        prior_fraction=priors, processing_fraction=processing, jpeg2000=jpeg2000,
    )  # fmt: skip
    if prior_pair:
        from training.phantom.study import plan_prior_pair

        plans = list(plan_prior_pair(seed, vendor=vendor))
    rows = synthesize(plans, out, scale=scale, progress=True)
    if contact_sheet and rows:
        from training.phantom.contact_sheet import study_contact_sheet

        first = [r for r in rows if r["study"] == rows[0]["study"]]
        study_contact_sheet(out, first, out / "contact_sheet.png")
    click.echo(f"wrote {len(plans)} studies, {len(rows)} images, manifest: {out / 'manifest.csv'}")


@cli.command()
@click.option(
    "--input",
    "input_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A synth output directory (default: ./sample_dicom, remade in --out if absent).",
)
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              help="Where the demo writes its results (default: DATA_DIR/demo).")  # fmt: skip
@pass_context
def demo(obj: _Context, input_dir: Path | None, out: Path | None) -> None:
    """Run the sample study end to end through the node.

    Starts a node of its own (fresh data directory, free loopback port) and a receiving
    SCP, sends the sample study over C-STORE, waits for the SEG and SR to come back,
    prints the result table and where the files are. Research use only.
    """
    tune_allocator()
    from bac_node.demo import run_demo

    if obj.sources["log_level"] == "default":
        # The demo's output is its table; the node's own log lines are for `serve`.
        logging.getLogger().setLevel(logging.WARNING)
    out = out or obj.settings.data_dir / "demo"
    outcome = run_demo(input_dir, out, SAMPLE_RECIPE, obj.settings)
    click.echo(outcome.table())


@cli.command()
@click.option("--host", default="", help="Address to listen on (default: all interfaces).")
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Worker threads in this process (0: only receive and export).")  # fmt: skip
@pass_context
def serve(obj: _Context, host: str, workers: int) -> None:
    """Run the node: C-STORE SCP, scheduler, exporter and worker(s), until SIGTERM.

    Instances are acknowledged only once fsynced and committed; studies are analysed
    when their four screening views are in or `stable_after` seconds pass; SEG and SR go
    to each configured destination with retries. Research use only.
    """
    tune_allocator()
    from bac_node.node.service import serve as run_serve

    run_serve(obj.settings, host=host, workers=workers)


@cli.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Orthanc's storage and the node's data (default: DATA_DIR/viewer).")  # fmt: skip
@click.option("--http-port", type=int, default=3000, show_default=True, help="OHIF's port.")
@click.option("--orthanc-http-port", type=int, default=8042, show_default=True)
@click.option("--orthanc-dicom-port", type=int, default=4242, show_default=True)
@click.option("--stable-age", type=click.IntRange(min=1),
              help="Seconds before Orthanc routes a study (default: orthanc.json's).")  # fmt: skip
@click.option("--sample/--no-sample", default=True, show_default=True,
              help="Upload ./sample_dicom to Orthanc once everything is up.")  # fmt: skip
@pass_context
def viewer(
    obj: _Context,
    directory: Path | None,
    http_port: int,
    orthanc_http_port: int,
    orthanc_dicom_port: int,
    stable_age: int | None,
    sample: bool,
) -> None:
    """Orthanc + OHIF + bac-node on this machine in one step; prints the viewer's URL.

    Orthanc (Debian's, with deploy/orthanc/) routes each stable MG study to the node,
    which sends its SEG and SR back; OHIF (npm ci --prefix deploy/ohif) shows them.
    Runs until Ctrl-C. Research use only.
    """
    tune_allocator()
    from bac_node.viewer import run_viewer

    ports = {"http_port": http_port, "orthanc_http_port": orthanc_http_port,
             "orthanc_dicom_port": orthanc_dicom_port}  # fmt: skip
    run_viewer(
        obj.settings, directory or obj.settings.data_dir / "viewer",
        sample_dir=SAMPLE_DIR if sample else None, ports=ports, stable_age=stable_age,
        echo=click.echo,
    )  # fmt: skip


@cli.command()
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write it here (deploy/openapi.json is the committed copy).")  # fmt: skip
def openapi(out: Path | None) -> None:
    """Print the OpenAPI description of the HTTP interface (`serve` with `http_port`)."""
    from bac_node.node.http import openapi_document, write_openapi

    if out is None:
        click.echo(json.dumps(openapi_document(), indent=2))
    else:
        write_openapi(out)
        click.echo(f"wrote {out}")


@cli.command()
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker threads in this process.")  # fmt: skip
@click.option("--database", metavar="URL", help=setting_help()["database"])
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The data directory shared with the ingesting node (received instances, "
              "results); with --node-url, a local scratch folder.")  # fmt: skip
@click.option("--node-url", metavar="URL", help=setting_help()["node_url"])
@click.option("--token-file", type=click.Path(dir_okay=False),
              help=setting_help()["node_token_file"])  # fmt: skip
@click.option("--node-ca-file", type=click.Path(dir_okay=False),
              help=setting_help()["node_ca_file"])  # fmt: skip
@pass_context
def worker(
    obj: _Context, count: int, database: str | None, data_dir: Path | None,
    node_url: str | None, token_file: str | None, node_ca_file: str | None,
) -> None:  # fmt: skip
    """Run workers on the node's database, until SIGTERM.

    On another host: `bac-node worker --database postgresql+psycopg://… --data-dir PATH`
    with PATH the ingesting node's data directory (a shared filesystem), or, with no
    share, `--node-url https://node:8080 --token-file F`: inputs and results go over the
    node's HTTP interface and PATH is a local scratch folder. Research use only.
    """
    # A bad option fails here, before tune_allocator's re-exec.
    settings = _with_options(
        obj, database=database, data_dir=data_dir, node_url=node_url,
        node_token_file=token_file, node_ca_file=node_ca_file,
    )  # fmt: skip
    tune_allocator()
    from bac_node.node.service import run_workers

    run_workers(settings, count=count)


def _with_options(obj: _Context, **options: Any) -> Settings:
    """The settings with a subcommand's own setting flags (``worker --database``) applied."""
    given = {name: value for name, value in options.items() if value is not None}
    if not given:
        return obj.settings
    try:
        settings = dataclasses.replace(obj.settings, **given)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    obj.sources.update(dict.fromkeys(given, "cli"))
    obj.settings = settings
    return settings


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--failures", type=click.IntRange(min=0), default=10, show_default=True,
              help="How many recent failures to list.")  # fmt: skip
@pass_context
def status(obj: _Context, as_json: bool, failures: int) -> None:
    """Queue and export counts, and the recent failures by study UID."""
    from bac_node.node.db import DATABASE_FILE, open_database
    from bac_node.node.queue import queue_counts, recent_failures

    if not obj.settings.database and not (obj.settings.data_dir / DATABASE_FILE).is_file():
        raise BacNodeError(
            f"{obj.settings.data_dir}: no bac-node database here (set --data-dir to the "
            "node's data directory, or --database)"
        )
    db = open_database(obj.settings.database or obj.settings.data_dir)
    try:
        counts = queue_counts(db)
        recent = recent_failures(db, failures)
    finally:
        db.dispose()
    if as_json:
        doc = {"counts": counts, "recent_failures": [dataclasses.asdict(f) for f in recent]}
        click.echo(json.dumps(doc, indent=1, default=str))
        return
    for table, by_state in counts.items():
        line = ", ".join(f"{state} {n}" for state, n in sorted(by_state.items())) or "none"
        click.echo(f"{table}: {line}")
    if recent:
        click.echo("recent failures (newest first):")
    for f in recent:
        when = f.when.isoformat(timespec="seconds") if f.when else "-"
        click.echo(f"{when}  study {f.study_uid}  {f.what} [{f.state}]: {f.last_error}")


@cli.command()
@click.argument("study_uid", required=False)
@click.option("--dead-letter", is_flag=True, help="Retry every dead-lettered export.")
@pass_context
def retry(obj: _Context, study_uid: str | None, dead_letter: bool) -> None:
    """Send a study's results again (STUDY_UID), or every dead-lettered export."""
    from bac_node.node.db import open_database
    from bac_node.node.queue import retry_dead

    if bool(study_uid) == dead_letter:
        raise click.UsageError("give either STUDY_UID or --dead-letter")
    db = open_database(obj.settings.database or obj.settings.data_dir)
    try:
        count = retry_dead(db, study_uid)
    finally:
        db.dispose()
    click.echo(f"{count} item(s) queued again")


@cli.group("db")
def db_group() -> None:
    """The node's database: schema revision and migrations (SQLite or PostgreSQL)."""


@db_group.command("upgrade")
@pass_context
def db_upgrade(obj: _Context) -> None:
    """Migrate the database (the `database` setting, else DATA_DIR's) to the newest schema.

    Every process does this when it opens the database; run it on its own before
    starting a new bac-node version's workers, so none of them waits for the migration.
    """
    from bac_node.node.db import open_database
    from bac_node.node.migrations import current_revision

    db = open_database(obj.settings.database or obj.settings.data_dir)
    try:
        with db.engine.connect() as connection:
            revision = current_revision(connection)
        url = db.engine.url.render_as_string(hide_password=False)
        click.echo(f"{redact_url(url)}: at schema revision {revision}")
    finally:
        db.dispose()


@db_group.command("current")
@pass_context
def db_current(obj: _Context) -> None:
    """Print the database's schema revision and the newest this bac-node knows."""
    from sqlalchemy import create_engine

    from bac_node.node.db import DATABASE_FILE, database_url
    from bac_node.node.migrations import current_revision, head_revision

    if not obj.settings.database and not (obj.settings.data_dir / DATABASE_FILE).is_file():
        raise BacNodeError(f"{obj.settings.data_dir}: no bac-node database here")
    url = obj.settings.database or database_url(obj.settings.data_dir)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            revision = current_revision(connection)
    except Exception as exc:
        raise BacNodeError(f"{redact_url(url)}: cannot open the database ({exc})") from None
    finally:
        engine.dispose()
    click.echo(f"database {revision or '(none: a new or pre-migration database)'}, "
               f"newest {head_revision()}")  # fmt: skip


#: ``--device`` of the commands that run a model (``analyze``, ``evaluate``).
device_option = click.option(
    "--device",
    "device_option",
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where the model runs (default: the `device` setting).",
)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Results go to OUT/<StudyInstanceUID>/: a SEG per image, sr.dcm, summary.json.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A bac-node .safetensors model (default: the one shipped in the package).",
)
@device_option
@pass_context
def analyze(
    obj: _Context,
    paths: tuple[Path, ...],
    out: Path,
    model_path: Path | None,
    device_option: str | None,
) -> None:
    """Analyse the MG studies in PATHS (files or folders) and write SEG, SR and JSON.

    Exits non-zero when a study (or every input) could not be analysed, with the reason.
    Research use only. Not for clinical use.
    """
    tune_allocator()
    from tqdm import tqdm

    from bac_node.analysis import CanvasModel, describe, measure_study
    from bac_node.dicom.selection import read_paths, select_studies
    from bac_node.model.inference import load_predictor
    from bac_node.results import build_results, write_results

    device = device_option or obj.settings.device
    predictor, card, untrained = load_predictor(
        str(model_path) if model_path else None, device=device, backend=obj.settings.backend
    )
    if untrained:
        click.echo(
            "Warning: no trained weights are installed; using the untrained fixed-seed model "
            f"{card.name} {card.version}: its BAC results mean nothing.",
            err=True,
        )
    images, rejected = read_paths(paths)
    selections = select_studies(images, rejected)
    if not selections:
        reasons = "; ".join(f"{f}: {r}" for f, r in rejected[:5]) or "no DICOM file found"
        raise BacNodeError(f"no analysable MG image in {', '.join(map(str, paths))} ({reasons})")
    model = CanvasModel(card.input_spacing_mm, card.threshold)
    results = []
    failures: list[str] = []
    for selection in tqdm(selections, desc="analyze", unit="study", disable=None):
        try:
            result = measure_study(selection, predictor, model)
            if not result.images:
                reasons = "; ".join(f"{s}: {r}" for s, r in result.not_analysed)
                raise BacNodeError(f"no image could be analysed ({reasons})")
            write_results(build_results(result, card), out)
            results.append(result)
        except BacNodeError as exc:
            failures.append(f"study {selection.study_instance_uid}: {exc}")
    if results:
        click.echo(describe(results))
        for result in results:
            for source, reason in result.not_analysed:
                click.echo(f"not analysed in {result.study_instance_uid}: {source}: {reason}")
    for failure in failures:
        click.echo(f"Error: {failure}", err=True)
    if failures:
        raise click.exceptions.Exit(1)


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="A training config (training/configs/*.toml).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Run directory: data, cache, checkpoints, logs and the exported models.",
)
def train(config_path: Path, out: Path) -> None:
    """Train the U-Net: baseline, then entropy-selected pseudo-labelling rounds.

    Resumes an interrupted run in the same --out. Writes baseline.safetensors and
    final.safetensors (weights and model card), log.csv and log.json.
    """
    tune_allocator()
    from training.train import train as run_training

    final = run_training(config_path, out)
    click.echo(f"model: {final}")


@cli.command()
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The bac-node .safetensors model to evaluate (default: the one shipped).",
)
@click.option(
    "--compare",
    "compare_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A second model: paired bootstrap of the Jaccard difference MODEL - COMPARE.",
)
@click.option(
    "--data",
    "data_path",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="A labelled folder (bac-node synth output or your own, see training/datasets.py) "
    "or its manifest.csv / manifest.json.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Writes report.html, metrics.json, metrics.csv, images.csv, studies.csv, masks/.",
)
@click.option("--resamples", type=click.IntRange(min=100), default=10_000, show_default=True,
              help="Paired bootstrap resamples (by patient) of the Jaccard gain.")  # fmt: skip
@click.option("--interval-resamples", type=click.IntRange(min=100), default=5_000,
              show_default=True, help="Bootstrap resamples of the other intervals.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@device_option
@pass_context
def evaluate(
    obj: _Context,
    model_path: Path | None,
    compare_path: Path | None,
    data_path: Path,
    out: Path,
    resamples: int,
    interval_resamples: int,
    seed: int,
    device_option: str | None,
) -> None:
    """Evaluate a model on a labelled set: the source study's tables, with intervals.

    Runs the analysis as the node does on every study, scores pixels (per image and
    pooled), grades (kappa, confusion, Bland-Altman, Grade 3 ROC), per grade and per
    vendor, and writes a self-contained HTML report with JSON and CSV of every number.
    Research use only. Not for clinical use.
    """
    tune_allocator()
    import shlex

    from bac_node.evaluate import ModelSource
    from bac_node.evaluate import evaluate as run_evaluation
    from bac_node.evaluate.data import load_labelled_set
    from bac_node.evaluate.report import render_report

    data = load_labelled_set(data_path)  # a bad manifest fails before any model loads
    # The command as it could be typed again (recorded in the report and the JSON).
    command = ["bac-node", "evaluate"]
    command += ["--model", str(model_path)] if model_path else []
    command += ["--compare", str(compare_path)] if compare_path else []
    command += ["--data", str(data_path), "--out", str(out), "--seed", str(seed)]
    command += ["--resamples", str(resamples), "--interval-resamples", str(interval_resamples)]

    if obj.sources["log_level"] == "default":
        # One line per image would bury the progress bar; `--log-level INFO` shows them.
        logging.getLogger("bac_node.analysis").setLevel(logging.WARNING)
    device = device_option or obj.settings.device
    backend = obj.settings.backend  # the node's inference path (auto: ONNX on the CPU)
    sources = [ModelSource.load(model_path, device, backend)]
    if compare_path is not None:
        sources.append(ModelSource.load(compare_path, device, backend))
    for source in sources:
        if source.untrained:
            click.echo(f"Warning: {source.label} is untrained: its figures mean nothing.", err=True)
    result = run_evaluation(
        data, sources, out, resamples=resamples, interval_resamples=interval_resamples,
        seed=seed, command=shlex.join(command),
    )  # fmt: skip
    report = render_report(result)
    for model in result.doc["models"]:
        s = model["strata"]["all"]
        g = s["grades"]
        click.echo(
            f"{model['label']}: Jaccard per-image mean {s['per_image_mean']['jaccard']:.3f} "
            f"pooled {s['pooled']['jaccard']:.3f}, Dice {s['per_image_mean']['dice']:.3f} / "
            f"{s['pooled']['dice']:.3f}, kappa {g['quadratic_weighted_kappa']['value']:.3f}, "
            f"Grade 3 sens {g['grade3']['sensitivity']:.2f} spec {g['grade3']['specificity']:.2f}"
        )
    if "comparison" in result.doc:
        d = result.doc["comparison"]["strata"]["all"]["pooled_jaccard_difference"]
        click.echo(
            f"pooled Jaccard difference {d['value']:+.4f} "
            f"(95 % CI {d['ci95_low']:+.4f} to {d['ci95_high']:+.4f})"
        )
    click.echo(f"report: {report}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="bac-node", standalone_mode=False)
    except BacNodeError as exc:
        click.echo(f"Error: {exc}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
