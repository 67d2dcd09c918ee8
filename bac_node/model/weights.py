"""Model weights and their model card, in one ``.safetensors`` file.

The card (what the model is, what it was trained on, how to feed it, how good it is,
and that it is not for clinical use) travels inside the weights file as JSON in the
safetensors metadata, under :data:`CARD_METADATA_KEY`; a file without a card is not
loaded. :func:`save_model` also writes the card as Markdown beside the weights
(``<stem>.card.md``) for people; the metadata is the one the code reads.

The card's ``sha256`` is a digest of the tensors (see :func:`state_dict_sha256`), not of
the file, because the file holds the card itself; :func:`load_model` checks it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bac_node.errors import ModelError
from bac_node.model.factory import ModelConfig, build_model, fixed_seed_model, resolve_device

#: The safetensors metadata key that holds the model card as JSON.
CARD_METADATA_KEY = "bac_node.model_card"

#: What every bac-node model is for, word for word in every card.
INTENDED_USE = "Research use only. Not for clinical use."

#: How the analysis lays out a bilateral pair on the model's input canvas.
BILATERAL_LAYOUT = (
    "bilateral: right breast then left breast side by side, chest wall on the left of each half"
)


@dataclass(frozen=True)
class ModelCard:
    """What a weights file is and how to run it; an instance is a valid card.

    ``input_spacing_mm`` is the physical pixel spacing of the model's input canvas;
    ``threshold`` turns probabilities into the BAC mask; ``tile_size`` and
    ``tile_overlap`` are the tiling the model is run with (512/128 by default; the source
    study's patch regime is 512/386). ``sha256`` is filled in by :func:`save_model`.
    """

    name: str
    version: str
    architecture: ModelConfig = field(default_factory=ModelConfig)
    input_spacing_mm: float = 0.2
    canvas_layout: str = BILATERAL_LAYOUT
    threshold: float = 0.5
    tile_size: int = 512
    tile_overlap: int = 128
    training_data: str = "unspecified"
    metrics: dict[str, float] = field(default_factory=dict)
    intended_use: str = INTENDED_USE
    created: str = field(default_factory=lambda: date.today().isoformat())
    sha256: str = ""

    def __post_init__(self) -> None:
        for name in ("name", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ModelError(f"model card {name} must be a non-empty string, not {value!r}")
        if not isinstance(self.architecture, ModelConfig):
            raise ModelError(
                f"model card architecture must be a ModelConfig, not {self.architecture!r}"
            )
        if not _positive_finite(self.input_spacing_mm):
            raise ModelError(
                f"model card input_spacing_mm must be a positive number of mm, "
                f"not {self.input_spacing_mm!r}"
            )
        if not (_finite(self.threshold) and 0.0 < self.threshold < 1.0):
            raise ModelError(
                f"model card threshold must be a probability in (0, 1), not {self.threshold!r}"
            )
        stride = self.architecture.output_stride
        if not (_is_int(self.tile_size) and self.tile_size > 0 and self.tile_size % stride == 0):
            raise ModelError(
                f"model card tile_size must be a positive multiple of {stride} "
                f"(2 ** encoder_depth), not {self.tile_size!r}"
            )
        if not (_is_int(self.tile_overlap) and 0 <= self.tile_overlap < self.tile_size):
            raise ModelError(
                f"model card tile_overlap must be an integer from 0 to tile_size - 1 "
                f"({self.tile_size - 1}), not {self.tile_overlap!r}"
            )
        if not all(isinstance(k, str) and _finite(v) for k, v in self.metrics.items()):
            raise ModelError(
                f"model card metrics must map names to finite numbers, not {self.metrics!r}"
            )
        try:
            date.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise ModelError(
                f"model card created must be an ISO date (YYYY-MM-DD), not {self.created!r}"
            ) from None
        if self.sha256 and not _is_sha256(self.sha256):
            raise ModelError(
                f"model card sha256 must be 64 lowercase hex digits, not {self.sha256!r}"
            )
        object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})
        object.__setattr__(self, "input_spacing_mm", float(self.input_spacing_mm))
        object.__setattr__(self, "threshold", float(self.threshold))

    def to_dict(self) -> dict[str, Any]:
        """The card as plain JSON types (architecture as a dict)."""
        data = asdict(self)
        data["architecture"] = self.architecture.to_dict()
        return data

    def to_json(self) -> str:
        """The card as one JSON object with sorted keys."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """The card of :meth:`to_dict`; unknown or missing fields are a :class:`ModelError`."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(
                f"unknown model card field(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        fields = dict(data)
        architecture = fields.get("architecture", {})
        if not isinstance(architecture, Mapping):
            raise ModelError(f"model card architecture must be an object, not {architecture!r}")
        fields["architecture"] = ModelConfig.from_dict(architecture)
        try:
            return cls(**fields)
        except TypeError as exc:  # a required field is missing
            raise ModelError(f"malformed model card: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        """The card of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelError("model card JSON must be an object")
        return cls.from_dict(data)

    def to_markdown(self, file_sha256: str | None = None) -> str:
        """The card for people: intended use first, then every field."""
        arch = self.architecture
        lines = [
            f"# Model card: {self.name} {self.version}",
            "",
            f"**{self.intended_use}**",
            "",
            "| field | value |",
            "|---|---|",
            f"| name | {self.name} |",
            f"| version | {self.version} |",
            f"| created | {self.created} |",
            f"| architecture | {arch.architecture}, encoder {arch.encoder} "
            f"(depth {arch.encoder_depth}, no pretrained weights), decoder channels "
            f"{list(arch.decoder_channels)}, {arch.in_channels} input channel(s), "
            f"{arch.classes} class(es) |",
            f"| input pixel spacing | {self.input_spacing_mm:g} mm |",
            f"| canvas layout | {self.canvas_layout} |",
            f"| tiling | {self.tile_size} px tiles, {self.tile_overlap} px overlap, blended |",
            f"| threshold | {self.threshold:g} (probability of BAC) |",
            f"| training data | {self.training_data} |",
            f"| weights sha256 (tensors) | `{self.sha256 or 'not yet saved'}` |",
        ]
        if file_sha256 is not None:
            lines.append(f"| file sha256 | `{file_sha256}` |")
        lines += ["", "## Metrics", ""]
        if self.metrics:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" for k, v in sorted(self.metrics.items())]
        else:
            lines.append("None recorded.")
        return "\n".join(lines) + "\n"


def untrained_model(
    config: ModelConfig | None = None, seed: int = 0
) -> tuple[torch.nn.Module, ModelCard]:
    """A fixed-seed untrained network (eval mode) and its card, as :func:`load_model` gives.

    For pipeline tests and demos until trained weights ship; its predictions mean nothing,
    and its card says so.
    """
    config = config or ModelConfig()
    model = fixed_seed_model(config, seed).eval()
    card = ModelCard(
        name="bac-node-unet-untrained",
        version=f"0.0.0+seed{seed}",
        architecture=config,
        training_data=f"none: fixed-seed (seed {seed}) random weights, for pipeline tests only",
        sha256=state_dict_sha256(model.state_dict()),
    )
    return model, card


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A digest of the tensors: name, dtype, shape and bytes of each, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        header = f"{name}\x00{tensor.dtype}\x00{tuple(tensor.shape)}\x00"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def markdown_card_path(path: Path | str) -> Path:
    """Where :func:`save_model` writes the Markdown card of the weights at ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.card.md")


def save_model(
    path: Path | str, model: torch.nn.Module, card: ModelCard, *, write_markdown: bool = True
) -> ModelCard:
    """Write ``model``'s weights and ``card`` to ``path`` (``.safetensors``).

    The card's ``sha256`` is computed here; the saved card is returned. The file is
    written to a temporary name and renamed, so a crash never leaves half a file.
    The architecture of ``card`` must build a network ``model``'s weights fit.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_fits(path, card.architecture, build_model(card.architecture).state_dict(), state)
    card = replace(card, sha256=state_dict_sha256(state))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt", CARD_METADATA_KEY: card.to_json()})
    os.replace(tmp, path)
    if write_markdown:
        file_digest = hashlib.sha256(path.read_bytes()).hexdigest()
        markdown_card_path(path).write_text(card.to_markdown(file_digest), encoding="utf-8")
    return card


def read_card(path: Path | str) -> ModelCard:
    """The card of the weights file at ``path``, without loading the weights."""
    card, _ = _read(Path(path), tensors=False)
    return card


def load_model(
    path: Path | str, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ModelCard]:
    """The network saved at ``path`` (eval mode, on ``device``) and its card.

    Every failure is a :class:`ModelError` with one line naming the file and what to
    do: a missing file, a file that is not safetensors, a file without a bac-node card,
    weights that do not fit the card's architecture, or weights whose digest is not the
    card's. ``device`` is ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.
    """
    path = Path(path)
    card, state = _read(path, tensors=True)
    digest = state_dict_sha256(state)
    if digest != card.sha256:
        raise ModelError(
            f"{path}: the weights' sha256 {digest[:12]}… is not the card's "
            f"{card.sha256[:12] or '(none)'}…; the file is corrupt or was modified, "
            "copy it again"
        )
    model = build_model(card.architecture)
    _check_fits(path, card.architecture, model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model.to(resolve_device(device)).eval(), card


def default_model_path() -> Path:
    """The weights shipped inside the package; a :class:`ModelError` when absent."""
    path = Path(__file__).resolve().parent / "weights" / "default.safetensors"
    if not path.is_file():
        raise ModelError(
            f"no trained weights are installed at {path}; pass --model FILE "
            "(a bac-node .safetensors file) or install a bac-node release that ships them"
        )
    return path


def _read(path: Path, *, tensors: bool) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ModelError(f"{path}: model file not found; check the path given with --model")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{path}: not a readable .safetensors weights file ({reason}); "
            "it is truncated or not a weights file, copy it again"
        ) from exc
    text = metadata.get(CARD_METADATA_KEY)
    if text is None:
        raise ModelError(
            f"{path}: no bac-node model card in its metadata; "
            "save weights with bac_node.model.save_model"
        )
    try:
        card = ModelCard.from_json(text)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    if not card.sha256:
        raise ModelError(f"{path}: its model card has no sha256; re-save it with save_model")
    return card, state


def _check_fits(
    path: Path,
    config: ModelConfig,
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
) -> None:
    """Raise a one-line :class:`ModelError` when ``state`` does not fit ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        parts.append(
            f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} "
            f"in the weights, {tuple(expected[k].shape)} in the network)"
        )
    raise ModelError(
        f"{path}: the weights do not fit the card's architecture {config.to_dict()}: "
        f"{', '.join(parts)}; save the weights with the card of the config they were "
        "trained with"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_finite(value: object) -> bool:
    return isinstance(value, int | float) and _finite(value) and value > 0


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
