"""The U-Net factory, weights with their model card, and tiled inference.

Tensors stay tiny (64×64 tiles, canvases of a few hundred pixels) so the module runs in
seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from numpy.typing import NDArray
from safetensors.torch import save_file

from bac_node.errors import ModelError
from bac_node.model import (
    CARD_METADATA_KEY,
    INTENDED_USE,
    ModelCard,
    ModelConfig,
    Predictor,
    UNetPredictor,
    blend_window,
    build_model,
    default_model_path,
    encoder_names,
    fixed_seed_model,
    load_model,
    markdown_card_path,
    read_card,
    save_model,
    state_dict_sha256,
    tile_starts,
    untrained_model,
)

#: A small U-Net that keeps these tests fast (2.3 M parameters, stride 8).
SMALL = ModelConfig(encoder_depth=3, decoder_channels=(32, 16, 8))


def smooth_canvas(rows: int, cols: int, seed: int = 0) -> NDArray[np.float32]:
    """A deterministic canvas in [0, 1] with structure at several scales."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    noise = np.random.default_rng(seed).random((rows, cols))
    canvas: NDArray[np.float32] = (
        0.5 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + 0.1 * noise
    ).astype(np.float32)
    return canvas


def card_for(config: ModelConfig = SMALL, **fields: Any) -> ModelCard:
    """A card for ``config``; 64 px tiles with 32 px overlap unless ``fields`` say else."""
    defaults = {"name": "test", "version": "0", "tile_size": 64, "tile_overlap": 32}
    return ModelCard(architecture=config, **{**defaults, **fields})


class ConstantLogit(torch.nn.Module):
    """Returns the same logit at every pixel, whatever the input."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.logit)


class ScaledLogits(torch.nn.Module):
    """Multiplies a network's logits, so an untrained net's probabilities span (0, 1)."""

    def __init__(self, model: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.model = model
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x) * self.factor
        return out


def identity_conv() -> torch.nn.Conv2d:
    """A 1×1 conv with weight 1 and bias 0: the logit is the input."""
    conv = torch.nn.Conv2d(1, 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(0.0)  # type: ignore[union-attr]
    return conv


# --- factory -----------------------------------------------------------------------


@pytest.mark.parametrize("config", [ModelConfig(), SMALL], ids=["default", "small"])
def test_build_model_maps_a_64px_image_to_logits_of_its_shape(config: ModelConfig) -> None:
    model = build_model(config).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 1, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    assert torch.isfinite(out).all()


def test_unknown_encoder_lists_the_valid_names() -> None:
    with pytest.raises(ModelError, match="unknown encoder 'resnet9000'") as info:
        ModelConfig(encoder="resnet9000")
    message = str(info.value)
    assert "mobilenet_v2" in message and "resnet34" in message
    assert all(name in message for name in encoder_names())


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"encoder_depth": 6, "decoder_channels": (8,) * 6}, "encoder_depth"),
        ({"encoder_depth": 0, "decoder_channels": ()}, "encoder_depth"),
        ({"decoder_channels": (32, 16, 8)}, "decoder_channels"),
        ({"encoder_depth": 3, "decoder_channels": (32, 0, 8)}, "decoder_channels"),
        ({"in_channels": 0}, "in_channels"),
        ({"classes": 0}, "classes"),
        ({"architecture": "fpn"}, "architecture"),
    ],
)
def test_bad_settings_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ModelError, match=field):
        ModelConfig(**settings)  # type: ignore[arg-type]


def test_config_round_trips_through_json() -> None:
    data = json.loads(json.dumps(SMALL.to_dict()))
    assert ModelConfig.from_dict(data) == SMALL
    with pytest.raises(ModelError, match="unknown model setting"):
        ModelConfig.from_dict({**data, "encoder_weights": "imagenet"})


def test_fixed_seed_model_is_deterministic_and_leaves_the_global_rng() -> None:
    before = torch.random.get_rng_state()
    a, b = fixed_seed_model(SMALL, seed=0), fixed_seed_model(SMALL, seed=0)
    c = fixed_seed_model(SMALL, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert state_dict_sha256(a.state_dict()) == state_dict_sha256(b.state_dict())
    assert state_dict_sha256(a.state_dict()) != state_dict_sha256(c.state_dict())


#: Logits of fixed_seed_model(SMALL, seed=0) in eval mode on pinned_input(), pinned
#: with torch 2.14.1 and segmentation-models-pytorch 0.6.0. The weights come from
#: torch's initialisers, so another torch or smp version may need these re-pinned
#: (re-run the snippet in the test's docstring); any other change is a regression.
PINNED_LOGITS = {
    (0, 0): -0.003789797890931368,
    (10, 20): 0.020801031962037086,
    (31, 32): 0.028462104499340057,
    (40, 5): 0.02820010855793953,
    (63, 63): 0.01999904215335846,
}


def pinned_input() -> torch.Tensor:
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    image = 0.5 + 0.5 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    return torch.from_numpy(image.astype(np.float32))[None, None]


def test_fixed_seed_logits_are_pinned() -> None:
    """``fixed_seed_model(SMALL, 0).eval()(pinned_input())[0, 0]`` at PINNED_LOGITS."""
    model = fixed_seed_model(SMALL, seed=0).eval()
    with torch.inference_mode():
        logits = model(pinned_input())[0, 0]
    for (row, col), expected in PINNED_LOGITS.items():
        assert float(logits[row, col]) == pytest.approx(expected, abs=1e-5), (row, col)


# --- weights and card --------------------------------------------------------------


def test_save_then_load_gives_identical_outputs_and_card(tmp_path: Path) -> None:
    model = fixed_seed_model(SMALL, seed=3).eval()
    card = card_for(metrics={"jaccard": 0.6}, tile_overlap=48, training_data="phantoms v1")
    path = tmp_path / "bac.safetensors"
    saved = save_model(path, model, card)
    assert saved.sha256 == state_dict_sha256(model.state_dict())
    loaded, loaded_card = load_model(path)
    assert loaded_card == saved == read_card(path)
    assert not loaded.training
    x = pinned_input()
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    markdown = markdown_card_path(path).read_text()
    assert INTENDED_USE in markdown and saved.sha256 in markdown


def test_the_source_studys_patch_regime_is_a_valid_card() -> None:
    card = card_for(ModelConfig(), tile_size=512, tile_overlap=386)
    assert card.tile_size - card.tile_overlap == 126
    assert ModelCard.from_json(card.to_json()) == card


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"threshold": 1.0}, "threshold"),
        ({"tile_size": 100}, "tile_size"),
        ({"tile_overlap": 64}, "tile_overlap"),
        ({"input_spacing_mm": 0.0}, "input_spacing_mm"),
        ({"created": "yesterday"}, "created"),
        ({"version": ""}, "version"),
    ],
)
def test_bad_card_fields_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelError, match=field):
        card_for(**fields)


def test_untrained_model_says_so() -> None:
    model, card = untrained_model(SMALL)
    assert card.intended_use == INTENDED_USE
    assert "random weights" in card.training_data
    assert card.sha256 == state_dict_sha256(model.state_dict())


def _assert_one_line_model_error(path: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_load_errors_are_one_actionable_line(tmp_path: Path) -> None:
    model = fixed_seed_model(SMALL, seed=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    good = tmp_path / "good.safetensors"
    card = save_model(good, model, card_for(), write_markdown=False)

    _assert_one_line_model_error(tmp_path / "absent.safetensors", "not found")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a weights file")
    _assert_one_line_model_error(garbage, "not a readable")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    _assert_one_line_model_error(truncated, "not a readable")

    no_card = tmp_path / "no_card.safetensors"
    save_file(state, str(no_card))
    _assert_one_line_model_error(no_card, "no bac-node model card")

    other = replace(card, architecture=ModelConfig(encoder_depth=3, decoder_channels=(64, 16, 8)))
    mismatch = tmp_path / "mismatch.safetensors"
    save_file(state, str(mismatch), metadata={CARD_METADATA_KEY: other.to_json()})
    _assert_one_line_model_error(mismatch, "do not fit the card's architecture")

    tampered_state = dict(state)
    key = next(k for k, v in state.items() if v.is_floating_point())
    tampered_state[key] = state[key] + 1.0
    tampered = tmp_path / "tampered.safetensors"
    save_file(tampered_state, str(tampered), metadata={CARD_METADATA_KEY: card.to_json()})
    _assert_one_line_model_error(tampered, "corrupt or was modified")


def test_save_refuses_a_card_that_does_not_fit_the_model(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(ModelError, match="do not fit"):
        save_model(path, fixed_seed_model(SMALL), card_for(ModelConfig()))
    assert not path.exists()


def test_default_model_path_is_the_packaged_file_or_says_it_is_missing() -> None:
    try:
        path = default_model_path()
    except ModelError as exc:
        assert "default.safetensors" in str(exc) and "--model" in str(exc)
    else:
        assert path.name == "default.safetensors" and path.is_file()


# --- tiled inference ---------------------------------------------------------------


def test_tile_starts_cover_the_extent_and_end_flush() -> None:
    assert tile_starts(64, 64, 32) == [0]
    assert tile_starts(40, 64, 32) == [0]
    assert tile_starts(100, 64, 40) == [0, 36]
    assert tile_starts(200, 64, 32) == [0, 32, 64, 96, 128, 136]


def test_blend_window_is_positive_and_flat_on_untapered_sides() -> None:
    window = blend_window(64, 24, taper_start=True, taper_end=False)
    assert (window > 0).all() and (window <= 1).all()
    assert window[0] < 1e-2 and (window[24:] == 1).all()
    assert np.allclose(window[:24], np.sort(window[:24]))
    assert (blend_window(64, 24, taper_start=False, taper_end=False) == 1).all()
    both = blend_window(64, 48, taper_start=True, taper_end=True)  # overlap > length / 2
    assert (both > 0).all() and np.allclose(both, both[::-1])


@pytest.mark.parametrize("overlap", [0, 24, 48])
def test_a_constant_logit_gives_one_probability_everywhere_no_seams(overlap: int) -> None:
    """Many tiles (9 × 14 at overlap 24) on an odd-sized canvas, bit-for-bit constant."""
    predictor = UNetPredictor(
        ConstantLogit(0.7), card_for(tile_size=64, tile_overlap=overlap), device="cpu"
    )
    probabilities = predictor(smooth_canvas(333, 517))
    expected = np.float32(torch.sigmoid(torch.tensor(0.7)).item())
    assert probabilities.shape == (333, 517) and probabilities.dtype == np.float32
    assert np.unique(probabilities).tolist() == [expected]


@pytest.mark.parametrize(("rows", "cols"), [(333, 517), (5, 7), (64, 100)])
def test_identity_logits_are_blended_without_darkening(rows: int, cols: int) -> None:
    """The blend weights sum to the whole at tile corners, borders and edges."""
    canvas = smooth_canvas(rows, cols, seed=1)
    predictor = UNetPredictor(identity_conv(), card_for(tile_size=64, tile_overlap=24), "cpu")
    expected = torch.sigmoid(torch.from_numpy(canvas)).numpy()
    np.testing.assert_allclose(predictor(canvas), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(predictor.predict_whole(canvas), expected, rtol=0, atol=1e-5)


def test_tiled_matches_whole_for_a_3x3_conv() -> None:
    """A 3×3 conv sees zero padding at a tile's edge, where that tile's weight is ~6e-4.

    Measured max |tiled - whole| with 64 px tiles, 32 px overlap: 9.4e-4, anywhere (the
    outer border agrees exactly: both zero-pad there). The bound allows for the flush
    last tile, whose neighbour covers the seam with a lower weight.
    """
    conv = torch.nn.Conv2d(1, 1, kernel_size=3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.linspace(-6.0, 6.0, 9).reshape(1, 1, 3, 3))
        conv.bias.fill_(-1.0)  # type: ignore[union-attr]
    predictor = UNetPredictor(conv, card_for(tile_size=64, tile_overlap=32), device="cpu")
    canvas = smooth_canvas(200, 232)
    whole = predictor.predict_whole(canvas)
    assert whole.max() - whole.min() > 0.5  # the outputs span the probability range
    assert np.abs(predictor(canvas) - whole).max() < 2e-3


@pytest.mark.parametrize(
    ("config", "tile", "overlap", "max_tol", "mean_tol"),
    [(SMALL, 64, 32, 0.05, 0.005), (ModelConfig(), 128, 64, 0.02, 0.001)],
    ids=["small-64/32", "default-128/64"],
)
def test_tiled_matches_whole_for_the_unet(
    config: ModelConfig, tile: int, overlap: int, max_tol: float, mean_tol: float
) -> None:
    """A U-Net sees less context near tile borders than in the whole image.

    Untrained fixed-seed nets with logits ×60 (small) / ×100 (default) so probabilities
    span 0.12-0.99 on a 200×232 canvas. Measured max / mean |tiled - whole| (the max is
    inside, not at the outer border):
    small, 64 px tiles, 32 overlap: 0.034 / 0.0035; default architecture, 128 px tiles,
    64 overlap: 0.011 / 0.0005. More overlap (relative to the tile) means less error.
    """
    factor = 60.0 if config == SMALL else 100.0
    model = ScaledLogits(fixed_seed_model(config, seed=0), factor)
    predictor = UNetPredictor(
        model, card_for(config, tile_size=tile, tile_overlap=overlap), device="cpu", batch_size=3
    )
    canvas = smooth_canvas(200, 232)
    whole = predictor.predict_whole(canvas)
    assert whole.max() - whole.min() > 0.5
    difference = np.abs(predictor(canvas) - whole)
    assert difference.max() < max_tol
    assert difference.mean() < mean_tol


def test_predictor_protocol_and_settings() -> None:
    model, card = untrained_model(SMALL)
    predictor: Predictor = UNetPredictor(model, card, device="cpu", threads=1)
    assert torch.get_num_threads() == 1
    out = predictor(smooth_canvas(40, 48))
    assert out.shape == (40, 48) and out.dtype == np.float32
    assert ((out > 0) & (out < 1)).all()


def test_bad_inputs_are_refused() -> None:
    predictor = UNetPredictor(identity_conv(), card_for(tile_size=64), device="cpu")
    with pytest.raises(ValueError, match="2D"):
        predictor(np.zeros((2, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        predictor(np.full((8, 8), np.nan, dtype=np.float32))
    two_class = UNetPredictor(torch.nn.Conv2d(1, 2, 1), card_for(tile_size=64), device="cpu")
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        two_class(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="tile_size"):
        UNetPredictor(identity_conv(), card_for(), device="cpu", tile_size=100)
    with pytest.raises(ValueError, match="tile_overlap"):
        UNetPredictor(identity_conv(), card_for(), device="cpu", tile_overlap=64)
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA"):
            UNetPredictor(identity_conv(), card_for(), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_autocast_matches_cpu() -> None:
    model, card = untrained_model(SMALL)
    canvas = smooth_canvas(200, 232)
    cpu = UNetPredictor(model, card, device="cpu", tile_size=64, tile_overlap=32)(canvas)
    cuda = UNetPredictor(model, card, device="cuda", tile_size=64, tile_overlap=32)(canvas)
    assert cuda.dtype == np.float32
    assert math.isclose(float(np.abs(cuda - cpu).max()), 0.0, abs_tol=5e-3)
