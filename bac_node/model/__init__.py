"""The BAC segmentation network: factory, weights with their model card, tiled inference.

* :mod:`~bac_node.model.factory`: :class:`ModelConfig` and :func:`build_model`, an smp
  U-Net from a few named settings, never with downloaded encoder weights.
* :mod:`~bac_node.model.weights`: :func:`save_model` / :func:`load_model`, one
  ``.safetensors`` file holding the weights and the :class:`ModelCard` (version,
  architecture, input spacing, canvas layout, threshold, tiling, training data,
  metrics, "not for clinical use").
* :mod:`~bac_node.model.inference`: the :class:`Predictor` protocol the analysis takes,
  and :class:`UNetPredictor`, batched tiled inference with blended overlaps.

Research use only. Not for clinical use.
"""

from bac_node.model.factory import (
    ModelConfig,
    build_model,
    encoder_names,
    fixed_seed_model,
    resolve_device,
)
from bac_node.model.inference import Predictor, UNetPredictor, blend_window, tile_starts
from bac_node.model.weights import (
    CARD_METADATA_KEY,
    INTENDED_USE,
    ModelCard,
    default_model_path,
    load_model,
    markdown_card_path,
    read_card,
    save_model,
    state_dict_sha256,
    untrained_model,
)

__all__ = [
    "CARD_METADATA_KEY",
    "INTENDED_USE",
    "ModelCard",
    "ModelConfig",
    "Predictor",
    "UNetPredictor",
    "blend_window",
    "build_model",
    "default_model_path",
    "encoder_names",
    "fixed_seed_model",
    "load_model",
    "markdown_card_path",
    "read_card",
    "resolve_device",
    "save_model",
    "state_dict_sha256",
    "tile_starts",
    "untrained_model",
]
