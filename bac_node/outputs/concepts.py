"""Every coded concept the SEG and SR use: the one place they are defined.

Each constant says where it comes from: SNOMED CT (``SCT``), the DICOM Controlled
Terminology (``DCM``, PS3.16 Annex D), UCUM units, the UMLS (one concept that TID 1500
itself names), or this project's private scheme ``99BACNODE`` (PS3.16 8.2: private
schemes start with ``99``), used only where no standard concept exists. View and breast
codes live in :mod:`bac_node.dicom.codes` and are re-exported here.
"""

from __future__ import annotations

import highdicom as hd

from bac_node.dicom.codes import BREAST, LEFT_BREAST, RIGHT_BREAST, SCT, Code
from bac_node.grading import BACGrade

__all__ = [
    "ABSENT",
    "ALGORITHM_FAMILY",
    "AREA",
    "BAC_AREA",
    "BAC_AREA_PERCENT",
    "BAC_GRADE_NUMBER",
    "BAC_GRADE_SEVERITY",
    "BAC_LENGTH",
    "BAC_LONGEST_VESSEL",
    "BAC_VESSEL_COUNT",
    "BREAST",
    "CARDIOVASCULAR_RISK_FLAG",
    "CARDIOVASCULAR_RISK_FLAG_NUMBER",
    "COMMENT",
    "DCM",
    "GRADE_CODES",
    "LEFT_BREAST",
    "MILD",
    "MODERATE",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "NO",
    "NOT_ANALYSED",
    "PRIVATE",
    "PRIVATE_SCHEME_NAME",
    "PRIVATE_SCHEME_ORGANIZATION",
    "QUALITATIVE_EVALUATIONS",
    "RESEARCH_USE_ONLY",
    "RIGHT_BREAST",
    "SCREENING_MAMMOGRAPHY",
    "SEVERE",
    "UCUM",
    "UNIT_GRADE",
    "UNIT_MM",
    "UNIT_MM2",
    "UNIT_NONE",
    "UNIT_PERCENT",
    "UNIT_VESSELS",
    "VASCULAR_CALCIFICATION",
    "YES",
    "Code",
    "breast_of",
    "coded",
]

DCM = "DCM"
UCUM = "UCUM"
UMLS = "UMLS"
#: This project's private coding scheme (PS3.16 8.2), for concepts DICOM and SNOMED lack.
PRIVATE = "99BACNODE"
PRIVATE_SCHEME_NAME = "bac-node private codes"
PRIVATE_SCHEME_ORGANIZATION = "bac-node developers"

# --- SEG: what the segment is (PS3.3 C.8.20.2: category CID 7150, type free) ---------
#: SNOMED CT; CID 7150 Segmentation Property Categories.
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", SCT, "Morphologically abnormal structure")
#: SNOMED CT; CID 6010 Breast Calcification Type: the BI-RADS "vascular" calcification,
#: which is breast arterial calcification. Also the SR's finding type.
VASCULAR_CALCIFICATION = Code("129759000", SCT, "Vascular calcification")
#: DCM; CID 7162 Surface Processing Algorithm Families: the family of the U-Net.
ALGORITHM_FAMILY = Code("123110", DCM, "Artificial Intelligence")

# --- SR: document, procedure and containers ------------------------------------------
#: SNOMED CT procedure; the TID 1500 "Procedure reported" value.
SCREENING_MAMMOGRAPHY = Code("24623002", SCT, "Screening mammography")
#: UMLS; TID 1500 row "Qualitative Evaluations" container at the report's root.
QUALITATIVE_EVALUATIONS = Code("C0034375", UMLS, "Qualitative Evaluations")
#: Private: TEXT item names for the disclaimer and for images that were not analysed.
RESEARCH_USE_ONLY = Code("BAC-RUO", PRIVATE, "Research use only")
#: DCM; the per-view group's one-line summary, which OHIF shows as its measurement label.
COMMENT = Code("121106", DCM, "Comment")
NOT_ANALYSED = Code("BAC-NOT-ANALYSED", PRIVATE, "Not analysed")

# --- SR: measurements (TID 300 concept names) ----------------------------------------
#: DCM; CID 6142 Calculated Value: area of vascular calcification (BAC area, mm2).
BAC_AREA = Code("112196", DCM, "Area of Vascular Calcification")
#: DCM; CID 6142: percentage of vascular calcification (BAC area / breast area).
BAC_AREA_PERCENT = Code("112198", DCM, "Percentage of Vascular Calcification")
#: SNOMED CT "Area" (CID 7469/7471), post-coordinated with the finding site breast:
#: the breast area.
AREA = Code("42798000", SCT, "Area")
#: Private: the grade 0-3 as a number, so that OHIF (which drops coded values) shows it.
BAC_GRADE_NUMBER = Code("BAC-GRADE", PRIVATE, "BAC grade (0-3)")
#: Private: the Grade 3 cardiovascular risk flag as a number 0/1, for the same reason.
CARDIOVASCULAR_RISK_FLAG_NUMBER = Code("BAC-CV-FLAG-NUM", PRIVATE, "Grade 3 flag (0/1)")
#: Private (no standard concept measures calcified vessel length; reported, not graded):
#: total calcified length along the vessels' centrelines (bac_node.imaging.vessels), mm.
BAC_LENGTH = Code("BAC-LENGTH", PRIVATE, "Calcified vessel length")
#: Private: how many distinct calcified vessels (small gaps along one vessel bridged).
BAC_VESSEL_COUNT = Code("BAC-VESSELS", PRIVATE, "Calcified vessel count")
#: Private: calcified length of the longest single vessel, mm.
BAC_LONGEST_VESSEL = Code("BAC-LONGEST", PRIVATE, "Longest calcified vessel length")

# --- SR: qualitative evaluations (CODE items) ----------------------------------------
#: DCM 122132 "Severity of Calcification": the BAC grade as a coded severity.
BAC_GRADE_SEVERITY = Code("122132", DCM, "Severity of Calcification")
#: SNOMED CT qualifier "Absent" and CID 3716 Severity (mild, moderate, severe).
ABSENT = Code("2667000", SCT, "Absent")
MILD = Code("255604002", SCT, "Mild")
MODERATE = Code("6736007", SCT, "Moderate")
SEVERE = Code("24484000", SCT, "Severe")
GRADE_CODES: dict[BACGrade, Code] = {
    BACGrade.ABSENT: ABSENT,
    BACGrade.MILD: MILD,
    BACGrade.MODERATE: MODERATE,
    BACGrade.SEVERE: SEVERE,
}
#: Private name: no standard concept is "BAC grade 3 raises cardiovascular risk"; its
#: values are the SNOMED CT Yes/No of CID 230.
CARDIOVASCULAR_RISK_FLAG = Code("BAC-CV-FLAG", PRIVATE, "Grade 3 BAC cardiovascular risk finding")
YES = Code("373066001", SCT, "Yes")
NO = Code("373067005", SCT, "No")

# --- UCUM units ----------------------------------------------------------------------
UNIT_MM2 = Code("mm2", UCUM, "square millimeter")
UNIT_MM = Code("mm", UCUM, "millimeter")
#: UCUM annotation ``{vessels}``: a count of vessels (dimensionless).
UNIT_VESSELS = Code("{vessels}", UCUM, "vessels")
UNIT_PERCENT = Code("%", UCUM, "Percent")
#: UCUM annotation ``{grade}``: a dimensionless grade.
UNIT_GRADE = Code("{grade}", UCUM, "grade")
#: UCUM ``1`` (CID 7181): dimensionless, for the 0/1 flag.
UNIT_NONE = Code("1", UCUM, "no units")


def coded(code: Code) -> hd.sr.CodedConcept:
    """``code`` as highdicom's coded concept (a Code Sequence item)."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def breast_of(laterality: str) -> Code:
    """SNOMED CT right/left breast for an ``R``/``L`` laterality."""
    if laterality == "R":
        return RIGHT_BREAST
    if laterality == "L":
        return LEFT_BREAST
    raise ValueError(f"laterality must be 'R' or 'L', got {laterality!r}")


# --- SR: comparison with the prior study (bac_node/node/priors.py) -------------------
#: DCM; CID 7001 report heading: the container of the comparison with the prior study.
PREVIOUS_FINDINGS = Code("121068", DCM, "Previous Findings")
#: DCM; Yes (SCT) when a prior study was compared, No with the reason when none was.
COMPARISON_WITH_PRIOR_STUDY_DONE = Code("122140", DCM, "Comparison with Prior Study Done")
#: DCM; TID 1005 Procedure Study Context: the prior's Study Instance UID, as the HAS OBS
#: CONTEXT of the container holding the prior's values (they are about that study).
PROCEDURE_STUDY_INSTANCE_UID = Code("121018", DCM, "Procedure Study Instance UID")
#: DCM; the prior's Study Date (HAS OBS CONTEXT beside its UID).
STUDY_DATE = Code("111060", DCM, "Study Date")
#: Private: the container of the prior study's values (area %, grade, length).
PRIOR_STUDY_VALUES = Code("BAC-PRIOR", PRIVATE, "BAC of the prior study")
#: Private: where the prior's values come from (bac-node's SR of it, or analysed here).
PRIOR_VALUES_SOURCE = Code("BAC-PRIOR-SOURCE", PRIVATE, "Source of the prior study values")
#: Private: months between the prior's and the current Study Date.
INTERVAL_SINCE_PRIOR = Code("BAC-PRIOR-MONTHS", PRIVATE, "Interval since prior study")
#: Private: the "progressed" finding, SCT Yes when the study grade rose since the prior.
BAC_PROGRESSED = Code("BAC-PROGRESSED", PRIVATE, "BAC grade progressed since prior study")
#: Private: why no prior study was compared (no prior, PACS not reachable, timed out...).
NO_PRIOR_REASON = Code("BAC-PRIOR-NONE", PRIVATE, "Why no prior study was compared")
#: UCUM ``mo``: the mean Julian month (30.4375 days).
UNIT_MONTH = Code("mo", UCUM, "month")

__all__ += [
    "BAC_PROGRESSED",
    "COMPARISON_WITH_PRIOR_STUDY_DONE",
    "INTERVAL_SINCE_PRIOR",
    "NO_PRIOR_REASON",
    "PREVIOUS_FINDINGS",
    "PRIOR_STUDY_VALUES",
    "PRIOR_VALUES_SOURCE",
    "PROCEDURE_STUDY_INSTANCE_UID",
    "STUDY_DATE",
    "UNIT_MONTH",
]
