"""Fixtures every node test shares: one torch thread, and the tiny test model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _processing_helpers import save_tiny_model

from bac_node.model.inference import Predictor, load_predictor
from bac_node.model.weights import ModelCard


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the machine is shared, and the canvases are tiny."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Predictor, ModelCard]:
    """The tiny test model, loaded once per module."""
    path = save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")
    predictor, card, _ = load_predictor(str(path), device="cpu")
    return predictor, card
