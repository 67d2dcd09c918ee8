"""Coded concepts for mammography views and anatomy: the one place they are defined.

Values are from DICOM PS3.16 CID 4014 (View for Mammography), CID 4015 (View Modifier
for Mammography) and SNOMED CT.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    value: str
    scheme: str
    meaning: str


SCT = "SCT"

VIEW_CC = Code("399162004", SCT, "cranio-caudal")
VIEW_MLO = Code("399368009", SCT, "medio-lateral oblique")
VIEW_ML = Code("399260004", SCT, "medio-lateral")
VIEW_LM = Code("399352003", SCT, "latero-medial")
VIEW_XCCL = Code("399192003", SCT, "cranio-caudal exaggerated laterally")
VIEW_XCCM = Code("399101009", SCT, "cranio-caudal exaggerated medially")

#: ViewPosition (0018,5101) value for each screening view name.
SCREENING_VIEW_CODES: dict[str, Code] = {"CC": VIEW_CC, "MLO": VIEW_MLO}

#: Every mammography view this project recognises, by ViewPosition abbreviation.
VIEW_CODES_BY_POSITION: dict[str, Code] = {
    "CC": VIEW_CC,
    "MLO": VIEW_MLO,
    "ML": VIEW_ML,
    "LM": VIEW_LM,
    "XCCL": VIEW_XCCL,
    "XCCM": VIEW_XCCM,
}

BREAST = Code("76752008", SCT, "Breast")
RIGHT_BREAST = Code("73056007", SCT, "Right breast")
LEFT_BREAST = Code("80248007", SCT, "Left breast")

# View modifiers (CID 4015): views carrying these are not screening views.
MODIFIER_SPOT_COMPRESSION = Code("399055006", SCT, "spot compression")
MODIFIER_MAGNIFICATION = Code("399163009", SCT, "magnification")
MODIFIER_IMPLANT_DISPLACED = Code("399124002", SCT, "implant displaced")

# Laterality qualifiers (SNOMED CT, CID 244) that some vendors put in the view or
# anatomic region sequences instead of (or besides) Image Laterality.
RIGHT = Code("24028007", SCT, "Right")
LEFT = Code("7771000", SCT, "Left")

#: The laterality ("R"/"L") each laterality-bearing code value stands for.
LATERALITY_BY_CODE_VALUE: dict[str, str] = {
    RIGHT.value: "R",
    LEFT.value: "L",
    RIGHT_BREAST.value: "R",
    LEFT_BREAST.value: "L",
}

#: ViewPosition abbreviation of each view code value, SNOMED CT and the SNOMED RT
#: values (scheme SRT/SNM3) that older modalities still send (CID 4014).
VIEW_POSITION_BY_CODE_VALUE: dict[str, str] = {
    **{code.value: position for position, code in VIEW_CODES_BY_POSITION.items()},
    "R-10242": "CC",
    "R-10226": "MLO",
    "R-10224": "ML",
    "R-10228": "LM",
    "R-1024A": "XCCL",
    "R-1024B": "XCCM",
}
