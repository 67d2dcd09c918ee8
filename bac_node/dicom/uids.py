"""Deterministic DICOM UIDs.

A UID derived from names (source UIDs, a model version, a phantom seed) is the same on
every run, so a re-run or a re-send produces the same objects. The form is
``2.25.<uuid5 as an integer>`` (PS3.5 B.2): digits and dots only, at most 44 characters.
"""

from __future__ import annotations

import uuid

#: The namespace of every UID bac-node derives (a uuid5 of the project's name).
BAC_NODE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/bac-node/bac-node")


def derived_uid(*parts: object) -> str:
    """The ``2.25.`` UID of ``parts``; distinct part lists give distinct UIDs.

    Parts are joined with a unit separator, so ``("1", "23")`` and ``("12", "3")``
    do not collide.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(BAC_NODE_NAMESPACE, name).int}"
