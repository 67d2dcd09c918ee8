"""Fixtures every test shares: one torch thread, and the tiny test model of the node tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from _processing_helpers import save_tiny_model
from pg import db_location, postgres_server, postgres_url  # noqa: F401 (shared fixtures)

from bac_node.model.inference import Predictor, load_predictor
from bac_node.model.weights import ModelCard

# A heavy command run in this process (click's CliRunner) must never re-exec it with the
# tuned allocator (bac_node.cli.tune_allocator): that replaced the whole pytest run with
# `python -m bac_node synth …`, silently. Subprocesses inherit the guard too; the tests of
# the re-exec itself (tests/test_cli.py) start theirs from an environment without it.
os.environ.setdefault("BAC_NODE_ALLOCATOR_TUNED", "1")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Keep torch to one thread in every test and restore the setting afterwards.

    The test machines are shared 2-core boxes: with two threads each, torch's spinning
    OpenMP workers thrash under load (a tiny study took 28 s instead of 1.9 s), and the
    canvases of the tests are small enough that one thread loses nothing. (Subprocesses
    and ONNX Runtime sessions set their own threads.)
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, ModelCard]:
    """The tiny test model (tests/node/_processing_helpers.py), loaded once per module."""
    path = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    predictor, card, _ = load_predictor(str(path), device="cpu")
    return predictor, card
