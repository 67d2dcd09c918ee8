"""The ONNX Runtime backend: parity with torch on a fixed input, and the setting that picks it.

The tiny test model (a real mobilenet_v2 U-Net, depth 3) is exported and run in ONNX
Runtime; its tiled, blended probabilities must match the torch predictor's within
1e-3 (measured: about 1e-6). A model with other weights must not (the check can fail).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _processing_helpers import save_tiny_model
from numpy.typing import NDArray

from bac_node.config import Settings, load_settings
from bac_node.errors import ConfigError, ModelError
from bac_node.model.factory import fixed_seed_model
from bac_node.model.inference import UNetPredictor, load_predictor, make_predictor
from bac_node.model.onnx_backend import OnnxPredictor, export_onnx
from bac_node.model.weights import load_model
from bac_node.node.db import open_database
from bac_node.node.worker import Worker

PARITY = 1e-3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def fixed_canvas() -> NDArray[np.float32]:
    """A fixed 200 × 330 canvas: smooth 'breasts' with bright specks, zero background.

    Not a multiple of the output stride and larger than a tile (128), so padding,
    several tiles and their blending are all exercised.
    """
    rng = np.random.default_rng(11)
    rows, cols = np.mgrid[0:200, 0:330].astype(np.float32)
    canvas = 0.6 * np.exp(-(((rows - 100) / 80) ** 2) - ((cols - 90) / 70) ** 2)
    canvas += 0.6 * np.exp(-(((rows - 100) / 80) ** 2) - ((cols - 250) / 70) ** 2)
    specks = rng.random(canvas.shape) > 0.995
    canvas[specks] = 1.0
    clipped: NDArray[np.float32] = np.clip(canvas, 0, 1).astype(np.float32)
    return clipped


def test_onnx_matches_torch_on_a_fixed_input(tiny: Path) -> None:
    model, card = load_model(tiny)
    canvas = fixed_canvas()
    torch_probs = UNetPredictor(model, card, device="cpu")(canvas)
    onnx = OnnxPredictor(model, card, threads=1)
    onnx_probs = onnx(canvas)
    assert onnx_probs.shape == canvas.shape and onnx_probs.dtype == np.float32
    # The input must make the network say something: probabilities that vary.
    assert float(torch_probs.max() - torch_probs.min()) > 0.01
    assert float(np.abs(onnx_probs - torch_probs).max()) <= PARITY
    # Whole-canvas passes agree too (one padded pass, no blending).
    whole = np.abs(
        onnx.predict_whole(canvas) - UNetPredictor(model, card, "cpu").predict_whole(canvas)
    )
    assert float(whole.max()) <= PARITY


def test_parity_check_catches_other_weights(tiny: Path) -> None:
    """Another network's ONNX export is far from this one's torch output."""
    model, card = load_model(tiny)
    other = fixed_seed_model(card.architecture, seed=1).eval()
    canvas = fixed_canvas()
    torch_probs = UNetPredictor(model, card, device="cpu")(canvas)
    other_probs = OnnxPredictor(other, card, threads=1)(canvas)
    assert float(np.abs(other_probs - torch_probs).max()) > PARITY


def test_export_has_dynamic_tile_size(tiny: Path) -> None:
    """One exported graph runs tiles of another size than the card's and any batch."""
    model, card = load_model(tiny)
    graph = export_onnx(model, card)
    proto = onnx.load_model_from_string(graph)
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "height", "width"]
    predictor = OnnxPredictor(model, card, batch_size=3, threads=1, tile_size=64, tile_overlap=16)
    reference = UNetPredictor(model, card, "cpu", batch_size=2, tile_size=64, tile_overlap=16)
    canvas = fixed_canvas()[:100, :150]
    assert float(np.abs(predictor(canvas) - reference(canvas)).max()) <= PARITY


@pytest.mark.parametrize(
    ("backend", "expected"),
    [("torch", UNetPredictor), ("onnx", OnnxPredictor), ("auto", OnnxPredictor)],
)
def test_backend_setting_selects_the_predictor(
    tiny: Path, tmp_path: Path, backend: str, expected: type[UNetPredictor]
) -> None:
    settings, sources = load_settings(environ={"BAC_NODE_BACKEND": backend})
    assert settings.backend == backend and sources["backend"] == "env"
    settings = Settings(data_dir=tmp_path / "data", model=str(tiny), device="cpu", backend=backend)
    db = open_database(settings.data_dir)
    try:
        worker = Worker.from_settings(settings, db)
    finally:
        db.dispose()
    assert type(worker.predictor) is expected
    predictor, _, untrained = load_predictor(str(tiny), device="cpu", backend=backend)
    assert type(predictor) is expected and not untrained


def test_backend_default_and_bad_values(tiny: Path) -> None:
    assert Settings().backend == "auto"
    with pytest.raises(ConfigError, match="backend must be torch, onnx or auto"):
        load_settings(environ={"BAC_NODE_BACKEND": "tensorrt"})
    model, card = load_model(tiny)
    with pytest.raises(ModelError, match="backend must be"):
        make_predictor(model, card, "cpu", "openvino")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            make_predictor(model, card, "cuda", "onnx")
