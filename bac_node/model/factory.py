"""The U-Net factory: one function builds every model bac-node runs or trains.

A model is described by a few named settings (:class:`ModelConfig`); the same settings
are stored in the model card beside the weights, so a weights file always rebuilds the
network it was saved from. Encoders are built with ``encoder_weights=None``: nothing is
ever downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch

from bac_node.errors import ModelError

#: The only architecture bac-node builds (the source study's network).
ARCHITECTURES = ("unet",)


def encoder_names() -> list[str]:
    """The encoder names segmentation-models-pytorch can build, sorted."""
    return sorted(smp.encoders.get_encoder_names())


@dataclass(frozen=True)
class ModelConfig:
    """The named settings of a BAC segmentation network.

    ``decoder_channels`` keeps smp's U-Net widths: halving them makes a 512×512 tile
    about 2× faster on CPU (0.30 s → 0.16 s, 2 cores) but the accuracy cost on thin
    vessels is unmeasured, so the training issue decides; the card records the choice.
    """

    architecture: str = "unet"
    encoder: str = "mobilenet_v2"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    in_channels: int = 1
    classes: int = 1

    def __post_init__(self) -> None:
        # A list from JSON becomes a tuple, so configs compare and hash by value.
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        if self.architecture not in ARCHITECTURES:
            raise ModelError(
                f"architecture must be one of {', '.join(ARCHITECTURES)}, not {self.architecture!r}"
            )
        names = encoder_names()
        if self.encoder not in names:
            raise ModelError(
                f"unknown encoder {self.encoder!r}; valid encoders: {', '.join(names)}"
            )
        if not _is_int(self.encoder_depth) or not 1 <= self.encoder_depth <= 5:
            raise ModelError(
                f"encoder_depth must be an integer from 1 to 5, not {self.encoder_depth!r}"
            )
        if len(self.decoder_channels) != self.encoder_depth:
            raise ModelError(
                f"decoder_channels must have encoder_depth={self.encoder_depth} entries, "
                f"not {len(self.decoder_channels)}: {list(self.decoder_channels)}"
            )
        if not all(_is_int(c) and c > 0 for c in self.decoder_channels):
            raise ModelError(
                f"decoder_channels must be positive integers, not {list(self.decoder_channels)}"
            )
        for name in ("in_channels", "classes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ModelError(f"{name} must be a positive integer, not {value!r}")

    @property
    def output_stride(self) -> int:
        """The factor every input side must be a multiple of (``2 ** encoder_depth``)."""
        return int(2**self.encoder_depth)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON types (``decoder_channels`` as a list)."""
        data = asdict(self)
        data["decoder_channels"] = list(self.decoder_channels)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """The config of :meth:`to_dict`; an unknown or missing key is a :class:`ModelError`."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(
                f"unknown model setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**data)
        except TypeError as exc:  # a wrongly typed value, e.g. decoder_channels=5
            raise ModelError(f"malformed model settings {dict(data)!r}: {exc}") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_model(config: ModelConfig) -> torch.nn.Module:
    """A freshly initialised network for ``config`` (random weights, train mode).

    It maps a ``(N, in_channels, H, W)`` float tensor, ``H`` and ``W`` multiples of
    ``config.output_stride``, to ``(N, classes, H, W)`` logits.
    """
    try:
        model: torch.nn.Module = smp.Unet(
            encoder_name=config.encoder,
            encoder_depth=config.encoder_depth,
            encoder_weights=None,
            decoder_channels=config.decoder_channels,
            in_channels=config.in_channels,
            classes=config.classes,
            activation=None,
        )
    except (ValueError, KeyError, TypeError) as exc:
        # e.g. an encoder that does not support this depth.
        raise ModelError(f"cannot build {config.to_dict()}: {exc}") from exc
    return model


def fixed_seed_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """:func:`build_model` with weights determined by ``seed`` (train mode).

    The global torch RNG is left as it was. The weights depend on torch's initialisers,
    so another torch or smp version may give other weights for the same seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(config)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
        raise ModelError(f"device must be auto, cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for but no CUDA device is available; use cpu")
    return torch.device(device)
