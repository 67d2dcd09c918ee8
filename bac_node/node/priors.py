"""Priors: the patient's most recent earlier MG study, from the PACS, for comparison.

When ``priors_pacs`` is set, the worker calls :func:`lookup_prior` after measuring a
study and before building its SR. Over one association with that PACS (the node's
``ae_title`` calling) it:

1. C-FINDs at STUDY level (Study Root) on the current study's PatientID, with
   ModalitiesInStudy ``MG`` and a StudyDate range ending the day before the current
   Study Date; the most recent answer (StudyDate, then StudyTime) is the prior;
2. C-FINDs the prior's series (SERIES level): a bac-node BAC report (Modality SR,
   SeriesDescription :data:`~bac_node.outputs.sr.SR_SERIES_DESCRIPTION`; Manufacturer
   checked on the file) is C-GET alone and its study area %, grade and calcified length
   are read back (:func:`~bac_node.outputs.sr.read_study_values`);
3. otherwise C-GETs the prior's MG series into a temporary folder and analyses them
   in-process with the worker's predictor, the same code path as the current study
   (:func:`~bac_node.analysis.measure_study`); nothing is stored, queued or exported
   for the prior, and the folder is deleted.

Decisions a next engineer needs:

- **C-GET, not C-MOVE.** C-GET returns the instances on the same association (the node
  takes the Storage SCP role for MG and SR classes), so the PACS needs no address for
  the node, and the received prior never enters the node's own store (a C-MOVE to the
  node's listening port would queue the prior as a new study and export results for
  it). The PACS must allow C-FIND and C-GET from ``ae_title`` (Orthanc: a
  ``DicomModalities`` entry with ``AllowFind``/``AllowGet``, or
  ``DicomAlwaysAllowFind``/``DicomAlwaysAllowGet``). A PACS without C-GET gets no
  priors ("C-GET not accepted"), which the SR says.
- **One deadline.** Everything runs in a daemon thread; the caller waits at most
  ``priors_timeout`` seconds, then aborts the association and reports without a prior
  ("timed out while ..."). The thread stops at its next check: the predictor it uses
  raises once the deadline has passed, so at most one canvas runs on after it.
- **Never an exception.** Every failure (refused, rejected, a failed status, nothing
  earlier, an unreadable prior) becomes a :class:`~bac_node.outputs.sr.PriorLookup`
  with a one-line reason naming studies by UID: no patient identifier is logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicTextSRStorage,
    ComprehensiveSRStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    EnhancedSRStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from bac_node.analysis import CanvasModel, Predictor, measure_study
from bac_node.config import Destination, Settings, parse_priors_pacs
from bac_node.dicom.selection import read_paths, select_studies
from bac_node.node.scp import TRANSFER_SYNTAXES
from bac_node.outputs.seg import MANUFACTURER
from bac_node.outputs.sr import (
    SR_SERIES_DESCRIPTION,
    PriorLookup,
    PriorStudy,
    is_bac_node_report,
    read_study_values,
)

log = logging.getLogger(__name__)

#: Storage classes the node accepts on a C-GET (SCP role): MG images and SR documents.
RETRIEVED_SOP_CLASSES = (
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    BasicTextSRStorage,
)
_UID = re.compile(r"[0-9][0-9.]{0,63}")


@dataclass(frozen=True)
class CurrentStudy:
    """What the lookup needs of the study being analysed (the PatientID stays here)."""

    study_instance_uid: str
    patient_id: str
    study_date: dt.date | None


class _CancelledError(Exception):
    """The deadline passed: the lookup thread stops at its next check."""


class _NoPriorError(Exception):
    """A reason to report without a prior (the message is the one-line reason)."""


@dataclass
class _Lookup:
    """State shared between the lookup thread and the caller waiting for it."""

    pacs: Destination
    calling: str
    """The node's AE title (the calling AE)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = "connecting"
    association: Association | None = None
    receiving: Path | None = None
    """Folder the running C-GET writes its instances into."""
    outcome: PriorLookup | None = None


def current_study(study_instance_uid: str, dataset: Dataset) -> CurrentStudy:
    """The current study's identity, from any of its images (``dataset``)."""
    text = str(dataset.get("StudyDate", "") or "").strip()
    try:
        date: dt.date | None = dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        date = None
    return CurrentStudy(study_instance_uid, str(dataset.get("PatientID", "") or ""), date)


def lookup_prior(
    settings: Settings, current: CurrentStudy, predictor: Predictor, model: CanvasModel
) -> PriorLookup:
    """The most recent earlier MG study of ``current``'s patient, or why there is none.

    Returns within ``settings.priors_timeout`` seconds (plus a moment to abort the
    association); never raises for anything the PACS does.
    """
    if not settings.priors_pacs:
        raise ValueError("priors are off: priors_pacs is empty")
    if not current.patient_id.strip():
        return PriorLookup(None, "the current study has no Patient ID to look priors up by")
    if current.study_date is None:
        return PriorLookup(None, "the current study has no valid Study Date")
    state = _Lookup(parse_priors_pacs(settings.priors_pacs), settings.ae_title)
    deadline = time.monotonic() + settings.priors_timeout
    thread = threading.Thread(
        target=_run, args=(state, settings, current, predictor, model, deadline),
        name=f"prior-{current.study_instance_uid[-12:]}", daemon=True,
    )  # fmt: skip
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive() or state.outcome is None:
        state.cancel.set()
        association = state.association
        if association is not None and association.is_alive():
            association.abort()
        return PriorLookup(
            None,
            f"prior lookup on PACS {state.pacs} timed out after {settings.priors_timeout} s "
            f"while {state.stage}",
        )
    return state.outcome


def _run(
    state: _Lookup,
    settings: Settings,
    current: CurrentStudy,
    predictor: Predictor,
    model: CanvasModel,
    deadline: float,
) -> None:
    try:
        state.outcome = _lookup(state, settings, current, predictor, model, deadline)
    except _NoPriorError as reason:
        state.outcome = PriorLookup(None, str(reason))
    except _CancelledError:
        pass  # the caller has already reported the timeout
    except Exception as exc:  # a bug or a broken PACS answer: never the current result's
        log.exception("prior lookup for study %s failed", current.study_instance_uid)
        state.outcome = PriorLookup(None, f"prior lookup failed ({type(exc).__name__})")


def _lookup(
    state: _Lookup,
    settings: Settings,
    current: CurrentStudy,
    predictor: Predictor,
    model: CanvasModel,
    deadline: float,
) -> PriorLookup:
    assert current.study_date is not None
    with tempfile.TemporaryDirectory(prefix="bac-node-prior-") as folder:
        received = Path(folder)
        with _PacsAssociation(state, settings, deadline) as assoc:
            state.stage = "querying studies"
            prior = _most_recent_prior(state, assoc, current)
            prior_uid = str(prior.StudyInstanceUID)
            prior_date = dt.datetime.strptime(str(prior.StudyDate), "%Y%m%d").date()
            state.stage = f"querying the series of prior study {prior_uid}"
            series = _find(state, assoc, _series_query(prior_uid))
            reports = [s for s in series if _looks_like_report(s)]
            for report_series in reports:
                state.stage = f"retrieving the bac-node SR of prior study {prior_uid}"
                try:
                    files = _get_series(state, assoc, prior_uid, report_series, received / "sr")
                except _NoPriorError as exc:  # the images may still come: try them
                    log.warning("prior SR not retrieved: %s", exc)
                    continue
                found = _from_report(files, prior_uid, prior_date)
                if found is not None:
                    return PriorLookup(found)
            mg = [s for s in series if str(s.get("Modality", "")) == "MG"]
            if not mg:
                raise _NoPriorError(
                    f"prior study {prior_uid} has no MG series on PACS {state.pacs}"
                )
            state.stage = f"retrieving the images of prior study {prior_uid}"
            for mg_series in mg:
                _get_series(state, assoc, prior_uid, mg_series, received / "mg")
        state.stage = f"analysing prior study {prior_uid}"
        return PriorLookup(
            _analyse(state, received / "mg", prior_uid, prior_date, predictor, model, deadline)
        )


class _PacsAssociation:
    """The association with the PACS (Find, Get and the storage SCP role), released."""

    def __init__(self, state: _Lookup, settings: Settings, deadline: float) -> None:
        self.state, self.settings, self.deadline = state, settings, deadline

    def __enter__(self) -> Association:
        state, pacs = self.state, self.state.pacs
        ae = AE(ae_title=self.settings.ae_title)
        timeout = max(1.0, self.deadline - time.monotonic())
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.connection_timeout = timeout
        ae.add_requested_context(
            StudyRootQueryRetrieveInformationModelFind,
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        )
        ae.add_requested_context(
            StudyRootQueryRetrieveInformationModelGet,
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        )
        for sop_class in RETRIEVED_SOP_CLASSES:
            ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
        connected = threading.Event()
        assoc = ae.associate(
            pacs.host, pacs.port, ae_title=pacs.ae_title, max_pdu=self.settings.max_pdu,
            ext_neg=[build_role(uid, scp_role=True) for uid in RETRIEVED_SOP_CLASSES],
            evt_handlers=[
                (evt.EVT_CONN_OPEN, lambda _event: connected.set()),
                (evt.EVT_C_STORE, self._store),
            ],
        )  # fmt: skip
        state.association = assoc
        if state.cancel.is_set():
            raise _CancelledError
        if not assoc.is_established:
            if not connected.is_set():
                raise _NoPriorError(
                    f"PACS {pacs} not reachable (connection refused, unreachable or timed out)"
                )
            if assoc.is_rejected:
                raise _NoPriorError(
                    f"PACS {pacs} rejected the association (is AE {self.settings.ae_title} "
                    "known to it?)"
                )
            raise _NoPriorError(f"PACS {pacs} aborted the association")
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for needed, what in (
            (StudyRootQueryRetrieveInformationModelFind, "C-FIND"),
            (StudyRootQueryRetrieveInformationModelGet, "C-GET"),
        ):
            if needed not in accepted:
                assoc.release()
                raise _NoPriorError(f"PACS {pacs} did not accept Study Root {what}")
        return assoc

    def __exit__(self, *exc: object) -> None:
        assoc = self.state.association
        if assoc is not None and assoc.is_established:
            assoc.release()

    def _store(self, event: Event) -> int:
        """C-STORE sub-operation of a C-GET: write the instance under the temporary folder."""
        if self.state.cancel.is_set():
            return 0xA700
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_uid = str(ds.SOPInstanceUID)
            if not _UID.fullmatch(sop_uid):
                return 0xC000
            target = self.state.receiving
            if target is None:  # a C-STORE outside our C-GET
                return 0xA900
            target.mkdir(parents=True, exist_ok=True)
            ds.save_as(target / f"{sop_uid}.dcm", enforce_file_format=True)
        except Exception:
            log.exception("prior instance received from %s could not be written", self.state.pacs)
            return 0xA700
        return 0x0000


def _find(state: _Lookup, assoc: Association, query: Dataset) -> list[Dataset]:
    """The identifiers a C-FIND answers (Pending responses); _NoPriorError on a failure."""
    found: list[Dataset] = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if state.cancel.is_set():
            raise _CancelledError
        code = getattr(status, "Status", None)
        if code is None:
            raise _NoPriorError(_no_response(state, "C-FIND"))
        if code in (0xFF00, 0xFF01):
            if identifier is not None:
                found.append(identifier)
        elif code != 0x0000:
            raise _NoPriorError(f"PACS {state.pacs}: C-FIND failed with status 0x{code:04X}")
    return found


def _no_response(state: _Lookup, what: str) -> str:
    if state.cancel.is_set():
        raise _CancelledError
    # Orthanc answers a C-FIND/C-GET from an AE it does not allow with an abort.
    return (
        f"PACS {state.pacs} gave no {what} response (aborted or timed out: does it allow "
        f"{what} from AE {state.calling}?)"
    )


def _study_query(current: CurrentStudy) -> Dataset:
    assert current.study_date is not None
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = current.patient_id
    query.ModalitiesInStudy = "MG"
    before = current.study_date - dt.timedelta(days=1)
    query.StudyDate = f"-{before.strftime('%Y%m%d')}"
    query.StudyTime = ""
    query.StudyInstanceUID = ""
    return query


def _most_recent_prior(state: _Lookup, assoc: Association, current: CurrentStudy) -> Dataset:
    assert current.study_date is not None
    candidates = []
    for answer in _find(state, assoc, _study_query(current)):
        uid = str(answer.get("StudyInstanceUID", "") or "")
        text = str(answer.get("StudyDate", "") or "")
        try:
            date = dt.datetime.strptime(text, "%Y%m%d").date()
        except ValueError:
            continue
        # The PACS's date matching is trusted no further than needed: strictly earlier.
        if uid and uid != current.study_instance_uid and date < current.study_date:
            candidates.append((date, str(answer.get("StudyTime", "") or ""), answer))
    if not candidates:
        raise _NoPriorError(f"no earlier MG study of the patient on PACS {state.pacs}")
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def _series_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesDescription = ""
    query.Manufacturer = ""
    query.SeriesDate = ""
    query.SeriesTime = ""
    return query


def _looks_like_report(series: Dataset) -> bool:
    """An SR series described as bac-node's report (Manufacturer is checked on the file:
    not every PACS returns it at SERIES level)."""
    return (
        str(series.get("Modality", "")) == "SR"
        and str(series.get("SeriesDescription", "")) == SR_SERIES_DESCRIPTION
        and str(series.get("Manufacturer", "") or MANUFACTURER) == MANUFACTURER
    )


def _get_series(
    state: _Lookup, assoc: Association, study_uid: str, series: Dataset, folder: Path
) -> list[Path]:
    """C-GET one series into ``folder``; the files received (_NoPriorError when none)."""
    series_uid = str(series.SeriesInstanceUID)
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    state.receiving = folder
    try:
        last = None
        for status, _identifier in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet
        ):
            if state.cancel.is_set():
                raise _CancelledError
            last = getattr(status, "Status", None)
            if last is None:
                raise _NoPriorError(_no_response(state, "C-GET"))
    finally:
        state.receiving = None
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if last not in (0x0000, 0xB000) or not files:
        code = "none" if last is None else f"0x{last:04X}"
        raise _NoPriorError(
            f"PACS {state.pacs}: C-GET of series {series_uid} of prior study {study_uid} "
            f"failed (status {code}, {len(files)} instance(s) received)"
        )
    return files


def _from_report(files: list[Path], prior_uid: str, prior_date: dt.date) -> PriorStudy | None:
    """The prior's values from a retrieved bac-node SR (None when none of the files is one)."""
    for path in files:
        try:
            report = pydicom.dcmread(path)
            if not is_bac_node_report(report) or str(report.StudyInstanceUID) != prior_uid:
                continue
            area_percent, grade, length_mm = read_study_values(report)
        except Exception as exc:  # a report of another shape: analyse the images instead
            log.warning("prior SR %s cannot be read (%s); analysing images", path.stem, exc)
            continue
        return PriorStudy(
            study_instance_uid=prior_uid,
            study_date=prior_date,
            area_percent=area_percent,
            grade=grade,
            source=f"bac-node SR {report.SOPInstanceUID} of the prior study",
            length_mm=length_mm,
        )
    return None


def _analyse(
    state: _Lookup,
    folder: Path,
    prior_uid: str,
    prior_date: dt.date,
    predictor: Predictor,
    model: CanvasModel,
    deadline: float,
) -> PriorStudy:
    """Measure the retrieved prior images exactly as the current study is measured."""

    def until_deadline(canvas: NDArray[np.float32]) -> NDArray[np.float32]:
        if state.cancel.is_set() or time.monotonic() > deadline:
            raise _CancelledError
        return predictor(canvas)

    images, rejected = read_paths([folder])
    selection = next(
        (s for s in select_studies(images, rejected) if s.study_instance_uid == prior_uid), None
    )
    if selection is None:
        raise _NoPriorError(f"prior study {prior_uid}: no analysable MG image retrieved")
    result = measure_study(selection, until_deadline, model)
    if not result.images:
        raise _NoPriorError(f"prior study {prior_uid}: no image could be analysed")
    sides = [burden.area_percent for burden in result.sides.values()]
    return PriorStudy(
        study_instance_uid=prior_uid,
        study_date=prior_date,
        area_percent=max(sides),
        grade=result.grade,
        source=f"{len(result.images)} image(s) of the prior study analysed by this node",
        length_mm=result.vessels.length_mm,
    )
