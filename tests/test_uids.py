"""Derived UIDs: valid, deterministic, distinct."""

from __future__ import annotations

import re

import pytest
from pydicom.uid import UID

from bac_node.dicom.uids import derived_uid


def test_derived_uid_is_a_valid_2_25_uid() -> None:
    uid = derived_uid("a", 1, "b")
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid)
    assert len(uid) <= 64
    assert UID(uid).is_valid


def test_derived_uid_is_deterministic_and_separates_parts() -> None:
    assert derived_uid("x", 1) == derived_uid("x", 1)
    assert derived_uid("x", 1) != derived_uid("x", 2)
    assert derived_uid("1", "23") != derived_uid("12", "3")


def test_derived_uid_needs_parts() -> None:
    with pytest.raises(ValueError):
        derived_uid()
