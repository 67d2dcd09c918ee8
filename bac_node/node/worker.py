"""The worker: claims a job, analyses its study, writes SEG + SR and records the result.

A worker holds one model, loaded once (:meth:`Worker.from_settings`, or passed in by
the caller), and runs jobs one at a time; run several workers (threads, processes or
hosts sharing a PostgreSQL queue) for more throughput.

Decisions a next engineer needs:

- **The analysis is the pure one** (:func:`bac_node.analysis.measure_study`, as
  ``bac-node analyze`` runs it): read the job's files, select the job's study, measure,
  build and write the results.
- **Failures.** A :class:`~bac_node.errors.BacNodeError` from the analysis means the
  study cannot be analysed (no readable MG image, a study UID that does not match):
  the job fails for good with that reason. Any other exception is a bug or a passing
  condition (memory, disk): the attempt fails with the traceback in the log and the
  job is tried again until ``MAX_JOB_ATTEMPTS``.
- **Leases.** A heartbeat thread renews the job's lease every ``lease_seconds / 3``
  while the analysis runs. A worker that dies stops renewing; another worker claims
  the job once the lease ran out.
- **Crash safety.** Result files are written atomically and their UIDs are derived
  from the inputs, so a job run again after a crash writes the same objects over the
  same names. They go to ``data_dir/results/<inputs_key[:16]>/<StudyInstanceUID>/``:
  one folder per set of inputs, so a study analysed again with new images never
  overwrites the files an earlier result (and its pending exports) point at.
- **Lost lease.** If another worker took the job meanwhile, :func:`complete_job`
  writes nothing and this worker drops its result: the other worker's result is the
  same objects.
- **Other hosts.** :attr:`Worker.files` (:mod:`bac_node.node.jobfiles`) says where the
  job's files are: the node's data directory (this host's, or a network filesystem
  share), or, with ``node_url``, the node's HTTP interface: the inputs are fetched
  into ``data_dir`` (a scratch folder) before the analysis and the results uploaded
  before :func:`complete_job`. A node that cannot be reached gives the job back
  (no attempt counted) and the worker waits ``poll`` seconds before claiming again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from bac_node.analysis import CanvasModel, ImageResult, Predictor, StudyResult, measure_study
from bac_node.config import Settings
from bac_node.dicom.selection import read_paths, select_studies
from bac_node.errors import BacNodeError, StudyError
from bac_node.grading import cardiovascular_flag
from bac_node.model.weights import ModelCard
from bac_node.node.db import Database
from bac_node.node.jobfiles import (
    JobFiles,
    LeaseLostError,
    NodeUnavailableError,
    TransferError,
    job_files,
)
from bac_node.node.queue import (
    RESULTS_DIR,
    ClaimedJob,
    ResultRecord,
    claim_job,
    complete_job,
    default_owner,
    fail_job,
    heartbeat,
    release_jobs,
)
from bac_node.outputs.sr import PriorLookup
from bac_node.results import StudyOutputs, build_results, write_results

log = logging.getLogger(__name__)


class Worker:
    """Claims jobs from the queue and analyses them with one loaded model."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        predictor: Predictor,
        card: ModelCard,
        owner: str | None = None,
        files: JobFiles | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.predictor = predictor
        self.card = card
        self.owner = owner or default_owner("worker")
        self.model = CanvasModel(card.input_spacing_mm, card.threshold)
        #: Where the job's files are: the shared data directory, or the node over HTTP.
        self.files = files if files is not None else job_files(settings)

    @classmethod
    def from_settings(cls, settings: Settings, db: Database, *, owner: str | None = None) -> Worker:
        """A worker with the model of ``settings`` (``model``, ``device``), loaded once."""
        from bac_node.model.inference import load_predictor

        files = job_files(settings)  # a wrong node_url/token file fails before the model loads
        predictor, card, untrained = load_predictor(
            settings.model or None, device=settings.device, backend=settings.backend
        )
        if untrained:
            log.warning(
                "no trained weights are installed: the worker runs the untrained fixed-seed "
                "model %s %s and its BAC results mean nothing; set `model`",
                card.name, card.version,
            )  # fmt: skip
        log.info(
            "worker model: %s %s (%s, %s)",
            card.name, card.version, settings.device, type(predictor).__name__,
        )  # fmt: skip
        return cls(settings, db, predictor=predictor, card=card, owner=owner, files=files)

    # --- the loop -------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim one job and process it; False when there was none (or it was given back)."""
        job = claim_job(
            self.db, self.owner, self.settings.lease_seconds, data_dir=self.settings.data_dir
        )
        if job is None:
            return False
        return self.process(job)

    def run_forever(self, stop: threading.Event, poll: float = 1.0) -> None:
        """Process jobs until ``stop`` is set (the job in hand is finished first)."""
        log.info("worker %s started", self.owner)
        try:
            while not stop.is_set():
                try:
                    worked = self.run_once()
                except Exception:  # the database went away for a moment: try again
                    log.exception("worker %s: cannot claim a job", self.owner)
                    worked = False
                if not worked:
                    stop.wait(poll)
        finally:
            released = release_jobs(self.db, self.owner)
            self.files.close()
            log.info("worker %s stopped (%d job(s) released)", self.owner, released)

    # --- one job --------------------------------------------------------------------

    def process(self, job: ClaimedJob) -> bool:
        """Analyse ``job``'s study and record the result (or the failure).

        False when the job was given back because the node could not be reached.
        """
        try:
            return self._process(job)
        finally:
            self.files.cleanup(job)

    def _process(self, job: ClaimedJob) -> bool:
        log.info(
            "job %d: study %s, %d image(s), attempt %d",
            job.job_id, job.study_uid, len(job.paths), job.attempts,
        )  # fmt: skip
        lost = threading.Event()
        done = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(job, done, lost), name=f"heartbeat-{job.job_id}"
        )
        beat.start()
        try:
            record = self._analyse(self.files.fetch(job, self.owner))
            self.files.publish(job, self.owner, record)
        except BacNodeError as exc:
            log.error("job %d: study %s cannot be analysed: %s", job.job_id, job.study_uid, exc)
            self._fail(job, str(exc), permanent=True)
            return True
        except LeaseLostError as exc:
            log.warning("job %d: lease lost to another worker; dropped (%s)", job.job_id, exc)
            return True
        except NodeUnavailableError as exc:
            log.error("job %d: given back: the node cannot be reached: %s", job.job_id, exc)
            release_jobs(self.db, self.owner)
            return False
        except TransferError as exc:
            log.error("job %d: study %s: %s", job.job_id, job.study_uid, exc)
            self._fail(job, str(exc), permanent=False)
            return True
        except Exception as exc:
            log.exception("job %d: analysis of study %s crashed", job.job_id, job.study_uid)
            self._fail(job, f"{type(exc).__name__}: {exc}", permanent=False)
            return True
        finally:
            done.set()
            beat.join()
        if complete_job(self.db, job.job_id, self.owner, record, self.settings.destinations):
            log.info(
                "job %d: study %s done: grade %s, %d file(s) in %s, %d export(s)",
                job.job_id, job.study_uid, record.grade, len(record.files), record.path,
                len(set(self.settings.destinations)),
            )  # fmt: skip
        else:
            log.warning(
                "job %d: study %s: lease lost to another worker; result dropped (its result "
                "is the same objects)",
                job.job_id, job.study_uid,
            )  # fmt: skip
        return True

    def _fail(self, job: ClaimedJob, error: str, *, permanent: bool) -> None:
        if not fail_job(self.db, job.job_id, self.owner, error, permanent=permanent):
            log.warning("job %d: lease lost before the failure was recorded", job.job_id)

    def _heartbeat(self, job: ClaimedJob, done: threading.Event, lost: threading.Event) -> None:
        interval = self.settings.lease_seconds / 3
        while not done.wait(interval):
            try:
                if not heartbeat(self.db, job.job_id, self.owner, self.settings.lease_seconds):
                    log.warning("job %d: lease lost to another worker", job.job_id)
                    lost.set()
                    return
            except Exception:  # a busy database: the next beat may get through
                log.exception("job %d: heartbeat failed", job.job_id)

    def _analyse(self, job: ClaimedJob) -> ResultRecord:
        start = time.perf_counter()
        images, rejected = read_paths(job.paths)
        selections = select_studies(images, rejected)
        selection = next((s for s in selections if s.study_instance_uid == job.study_uid), None)
        others = [s.study_instance_uid for s in selections if s is not selection]
        if others:
            log.warning(
                "job %d: file(s) of study %s hold Study Instance UID %s; not analysed",
                job.job_id, job.study_uid, ", ".join(others),
            )  # fmt: skip
        if selection is None:
            reasons = [f"{self._name(f)}: {r}" for f, r in rejected]
            reasons += [
                f"Study Instance UID {uid} in the files, not {job.study_uid}" for uid in others
            ]
            raise StudyError(
                f"no analysable MG image ({'; '.join(reasons) or 'no instance stored'})"
            )
        result = measure_study(selection, self.predictor, self.model)
        if not result.images:
            reasons = [f"{self._name(s)}: {r}" for s, r in result.not_analysed]
            raise StudyError(f"no image could be analysed ({'; '.join(reasons)})")
        outputs = build_results(result, self.card, prior=self._prior(job, result))
        study_dir = write_results(outputs, self.results_root(job))
        return self._record(outputs, study_dir, time.perf_counter() - start)

    def _prior(self, job: ClaimedJob, result: StudyResult) -> PriorLookup | None:
        """The prior study to compare with (priors on), or why there is none; within
        ``priors_timeout`` whatever the PACS does (:mod:`bac_node.node.priors`)."""
        if not self.settings.priors_pacs:
            return None
        from bac_node.node.priors import current_study, lookup_prior

        start = time.perf_counter()
        current = current_study(job.study_uid, result.images[0].image.dataset)
        lookup = lookup_prior(self.settings, current, self.predictor, self.model)
        seconds = time.perf_counter() - start
        if lookup.prior is not None:
            log.info(
                "job %d: study %s: prior study %s (%s) found in %.1f s",
                job.job_id, job.study_uid, lookup.prior.study_instance_uid,
                lookup.prior.source, seconds,
            )  # fmt: skip
        else:
            log.warning(
                "job %d: study %s: reported without a prior (%.1f s): %s",
                job.job_id, job.study_uid, seconds, lookup.reason,
            )  # fmt: skip
        return lookup

    def results_root(self, job: ClaimedJob) -> Path:
        """Where :func:`write_results` puts ``job``'s study folder."""
        return self.settings.data_dir / RESULTS_DIR / job.inputs_key[:16]

    def _name(self, source: str) -> str:
        """A file named relative to the data directory (its path there names UIDs only)."""
        try:
            return str(Path(source).relative_to(self.settings.data_dir))
        except ValueError:
            return source

    def _record(self, outputs: StudyOutputs, study_dir: Path, seconds: float) -> ResultRecord:
        result: StudyResult = outputs.result
        files = [study_dir / _seg_name(image) for image in result.images] + [study_dir / "sr.dcm"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:  # write_results names its files differently: a bug here, not bad input
            raise RuntimeError(f"result files not found where expected: {', '.join(missing)}")
        sides = [burden.area_percent for burden in result.sides.values()]
        data_dir = self.settings.data_dir
        return ResultRecord(
            path=str(study_dir.relative_to(data_dir)),
            files=tuple(str(f.relative_to(data_dir)) for f in files),
            sr_uid=str(outputs.report.SOPInstanceUID),
            grade=int(result.grade),
            cardiovascular_flag=cardiovascular_flag(result.grade),
            area_percent=max(sides) if sides else None,
            model_version=f"{self.card.name} {self.card.version}"[:64],
            analysis_seconds=round(seconds, 3),
        )


def _seg_name(image: ImageResult) -> str:
    """The SEG file name :func:`bac_node.results.write_results` gives an image."""
    mg = image.image
    return f"seg-{mg.laterality}-{mg.view or 'image'}-{mg.sop_instance_uid}.dcm"
