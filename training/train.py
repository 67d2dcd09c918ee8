"""Baseline U-Net training and progressive entropy-selected pseudo-labelling.

``bac-node train --config training/configs/ci.toml`` (or ``python -m training``):

1. Data: a labelled folder and an unlabelled one (``path = ...``), or phantom sets
   made on the spot (``studies``, ``seed``, ``scale``); both are turned into
   bilateral canvases by the analysis's own code and cached.
2. Baseline: Adam, binary cross-entropy, early stopping on the validation loss,
   a checkpoint every epoch (a run resumes from it), a per-epoch log.
3. Pseudo-labelling rounds (method.md): the current model predicts every unlabelled
   patch; each is scored by the mean binary entropy of its probabilities; of the
   patches whose predicted BAC fraction exceeds ``min_bac_fraction``, the
   ``keep_fraction`` lowest-entropy ones (of all candidates) join the training set
   with their thresholded prediction as label; the model is retrained with BCE +
   Jaccard. Each round logs how many were kept and the validation Jaccard.
4. Export: the threshold that maximises the validation Jaccard, test metrics (pooled,
   per vendor), timings, into a ``.safetensors`` with its model card.

Seeded and reproducible on CPU; runs on CUDA when present.
"""

from __future__ import annotations

import csv
import json
import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from bac_node import __version__
from bac_node.errors import ConfigError
from bac_node.model.factory import ModelConfig, build_model, resolve_device
from bac_node.model.weights import ModelCard, save_model
from training.datasets import (
    CanvasRecord,
    PatchDataset,
    build_canvas_cache,
    records_in,
)

#: Probabilities are clipped this far from 0 and 1 before taking logs (entropy).
_EPS = 1e-6


@dataclass(frozen=True)
class DataSource:
    path: str = ""
    studies: int = 0
    seed: int = 0
    scale: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    labelled: DataSource
    unlabelled: DataSource
    spacing_mm: float = 0.2
    patch_size: int = 512
    patch_overlap: int = 386
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 4
    learning_rate: float = 1e-3
    baseline_epochs: int = 50
    patience: int = 5
    rounds: int = 10
    round_epochs: int = 20
    keep_fraction: float = 0.03
    min_bac_fraction: float = 0.007
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    name: str = "bac-node-unet"
    version: str = "0.1.0"


#: Optional config keys: (TOML table, key, TrainConfig field, type). Absent keys keep
#: TrainConfig's defaults, so each default is written once, in the dataclass.
_OPTIONAL: tuple[tuple[str, str, str, type], ...] = (
    ("data", "patch_size", "patch_size", int),
    ("data", "patch_overlap", "patch_overlap", int),
    ("train", "batch_size", "batch_size", int),
    ("train", "learning_rate", "learning_rate", float),
    ("train", "patience", "patience", int),
    ("train", "workers", "workers", int),
    ("pseudo", "keep_fraction", "keep_fraction", float),
    ("pseudo", "min_bac_fraction", "min_bac_fraction", float),
    ("", "seed", "seed", int),
    ("", "device", "device", str),
    ("", "name", "name", str),
    ("", "version", "version", str),
)


def load_config(path: Path) -> TrainConfig:
    """A training config from TOML (see training/configs/)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the training config ({exc})") from None
    try:
        data, train, pseudo = doc["data"], doc["train"], doc["pseudo"]
        optional: dict[str, Any] = {}
        for table, key, name, kind in _OPTIONAL:
            section = doc.get(table, {}) if table else doc
            if key in section:
                optional[name] = kind(section[key])
        return TrainConfig(
            labelled=DataSource(**data["labelled"]),
            unlabelled=DataSource(**data["unlabelled"]),
            spacing_mm=float(data["spacing_mm"]),
            model=ModelConfig.from_dict({**ModelConfig().to_dict(), **doc.get("model", {})}),
            baseline_epochs=int(train["epochs"]),
            rounds=int(pseudo["rounds"]),
            round_epochs=int(pseudo["epochs"]),
            **optional,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: training config is incomplete or wrong ({exc})") from None


def _folder(source: DataSource, run_dir: Path, name: str) -> Path:
    if source.path:
        return Path(source.path)
    from training.phantom.study import plan_studies, synthesize

    folder = run_dir / "data" / name
    if not (folder / "manifest.json").is_file():
        plans = plan_studies(source.studies, source.seed)
        synthesize(plans, folder, scale=source.scale, progress=True)
    return folder


def soft_jaccard_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Jaccard over the batch (pooled)."""
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    union = prob.sum() + target.sum() - inter
    return 1.0 - (inter + 1.0) / (union + 1.0)


def _loss(logits: torch.Tensor, target: torch.Tensor, with_jaccard: bool) -> torch.Tensor:
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    return bce + soft_jaccard_loss(logits, target) if with_jaccard else bce


@dataclass
class Counts:
    """Pooled pixel counts at several thresholds."""

    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    tp: np.ndarray = field(init=False)
    fp: np.ndarray = field(init=False)
    fn: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.tp, self.fp, self.fn = (np.zeros(len(self.thresholds)) for _ in range(3))

    def add(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        t = target > 0.5
        for i, thr in enumerate(self.thresholds):
            p = prob >= thr
            self.tp[i] += float((p & t).sum())
            self.fp[i] += float((p & ~t).sum())
            self.fn[i] += float((~p & t).sum())

    def jaccard(self) -> np.ndarray:
        return np.asarray(self.tp / np.maximum(self.tp + self.fp + self.fn, 1))

    def dice(self) -> np.ndarray:
        return np.asarray(2 * self.tp / np.maximum(2 * self.tp + self.fp + self.fn, 1))

    def at(self, values: np.ndarray, threshold: float = 0.5) -> float:
        """One of ``jaccard()``/``dice()`` at ``threshold`` (one of ``thresholds``)."""
        return float(values[self.thresholds.index(threshold)])


def _evaluate(
    model: torch.nn.Module, loader: DataLoader[Any], device: torch.device, with_jaccard: bool
) -> tuple[float, Counts]:
    model.eval()
    total, batches = 0.0, 0
    counts = Counts()
    with torch.inference_mode():
        for image, target in loader:
            image, target = image.to(device), target.to(device)
            logits = model(image)
            total += float(_loss(logits, target, with_jaccard))
            batches += 1
            counts.add(torch.sigmoid(logits).cpu(), target.cpu())
    return total / max(batches, 1), counts


class Trainer:
    """Runs the stages of a config in ``run_dir``; everything it writes lives there."""

    def __init__(self, config: TrainConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        self.model = build_model(config.model).to(self.device)
        # A resumed run keeps the log of the epochs it already ran.
        log_file = run_dir / "log.json"
        self.log: list[dict[str, Any]] = (
            list(json.loads(log_file.read_text())) if log_file.is_file() else []
        )
        self.timings: dict[str, float] = {}

    # --- data ----------------------------------------------------------------------------

    def prepare(self) -> None:
        c = self.config
        labelled = _folder(c.labelled, self.run_dir, "labelled")
        unlabelled = _folder(c.unlabelled, self.run_dir, "unlabelled")
        self.cache = self.run_dir / "cache"
        self.records = build_canvas_cache(
            labelled, self.cache / "labelled", c.spacing_mm, progress=True
        )
        self.unlabelled = build_canvas_cache(
            unlabelled, self.cache / "unlabelled", c.spacing_mm, progress=True
        )
        self.train_set = self._patches(records_in(self.records, "train"), augment=True)
        self.val_set = self._patches(records_in(self.records, "validation"))
        self.test_records = records_in(self.records, "test")
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise ConfigError(
                "the labelled set needs studies in both the train and validation splits"
            )

    def _patches(self, records: list[CanvasRecord], *, augment: bool = False) -> PatchDataset:
        """Patches of labelled canvases (the unlabelled set is read only for pseudo-labels)."""
        return PatchDataset(
            self.cache / "labelled", records, size=self.config.patch_size,
            overlap=self.config.patch_overlap, augment=augment, seed=self.config.seed,
        )  # fmt: skip

    def _loader(self, dataset: Dataset[Any], *, shuffle: bool) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(
            dataset, batch_size=self.config.batch_size, shuffle=shuffle,
            num_workers=self.config.workers, generator=generator,
        )  # fmt: skip

    # --- training ------------------------------------------------------------------------

    def fit(
        self,
        stage: str,
        train: PatchDataset | ConcatDataset[Any],
        epochs: int,
        *,
        with_jaccard: bool,
    ) -> None:
        """Train with early stopping on the validation loss; keep the best weights."""
        from tqdm import tqdm

        c = self.config
        optimizer = torch.optim.Adam(self.model.parameters(), lr=c.learning_rate)
        checkpoint = self.run_dir / "checkpoints" / f"{stage}.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        start_epoch, best, best_state, waited = 0, math.inf, None, 0
        if checkpoint.is_file():  # resume an interrupted stage
            state = torch.load(checkpoint, map_location=self.device, weights_only=False)
            self.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, best, waited = state["epoch"] + 1, state["best"], state["waited"]
            best_state = state["best_state"]
        loader = self._loader(train, shuffle=True)
        val_loader = self._loader(self.val_set, shuffle=False)
        for epoch in range(start_epoch, epochs):
            for ds in (train, self.val_set):
                for part in getattr(ds, "datasets", [ds]):
                    if hasattr(part, "epoch"):
                        part.epoch = epoch
            started = time.perf_counter()
            self.model.train()
            total, batches = 0.0, 0
            for image, target in tqdm(
                loader, desc=f"{stage} {epoch + 1}/{epochs}", leave=False, disable=None
            ):
                image, target = image.to(self.device), target.to(self.device)
                optimizer.zero_grad()
                loss = _loss(self.model(image), target, with_jaccard)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                total += loss.item()
                batches += 1
            val_loss, counts = _evaluate(self.model, val_loader, self.device, with_jaccard)
            seconds = time.perf_counter() - started
            self.log.append(
                {
                    "stage": stage, "epoch": epoch + 1, "train_loss": total / max(batches, 1),
                    "val_loss": val_loss, "val_jaccard": counts.at(counts.jaccard()),
                    "val_dice": counts.at(counts.dice()), "seconds": seconds,
                    "train_patches": len(train),
                }
            )  # fmt: skip
            self._write_log()
            if val_loss < best:
                best, waited = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                waited += 1
            torch.save(
                {"model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "best": best, "waited": waited, "best_state": best_state},
                checkpoint,
            )  # fmt: skip
            if waited >= c.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)

    def pseudo_labels(self) -> tuple[TensorDataset, int]:
        """The lowest-entropy confident unlabelled patches with their predicted masks.

        Patches are predicted in batches; only each patch's entropy, predicted BAC
        fraction and (for candidates) its binary mask are kept, so memory grows with
        the candidates, not with the unlabelled set.
        """
        c = self.config
        dataset = PatchDataset(
            self.cache / "unlabelled", self.unlabelled, size=c.patch_size, overlap=c.patch_overlap
        )
        scores: list[tuple[float, int]] = []
        masks: dict[int, torch.Tensor] = {}
        self.model.eval()
        loader = self._loader(dataset, shuffle=False)
        index = 0
        with torch.inference_mode():
            for image, _ in loader:  # the unlabelled set's masks are never read
                prob = torch.sigmoid(self.model(image.to(self.device))).cpu()
                p = prob.clamp(_EPS, 1 - _EPS)
                entropy = (-(p * p.log() + (1 - p) * (1 - p).log())).mean(dim=(1, 2, 3))
                fraction = (prob >= 0.5).float().mean(dim=(1, 2, 3))
                for k in range(prob.shape[0]):
                    if float(fraction[k]) > c.min_bac_fraction:
                        scores.append((float(entropy[k]), index + k))
                        masks[index + k] = (prob[k] >= 0.5).to(torch.uint8)
                index += prob.shape[0]
        dataset.forget()
        keep = max(1, math.ceil(c.keep_fraction * len(dataset))) if scores else 0
        chosen = [i for _, i in sorted(scores)[:keep]]
        if not chosen:
            empty = torch.zeros((0, 1, c.patch_size, c.patch_size))
            return TensorDataset(empty, empty), 0
        images = torch.stack([dataset[i][0] for i in chosen])
        labels = torch.stack([masks[i].float() for i in chosen])
        dataset.forget()
        return TensorDataset(images, labels), len(chosen)

    def run(self) -> Path:
        c = self.config
        self.prepare()
        started = time.perf_counter()
        self.fit("baseline", self.train_set, c.baseline_epochs, with_jaccard=False)
        self.timings["baseline_seconds"] = time.perf_counter() - started
        baseline_path = self.export("baseline")
        pseudo_sets: list[Dataset[Any]] = []
        for round_number in range(1, c.rounds + 1):
            started = time.perf_counter()
            new, kept = self.pseudo_labels()
            pseudo_sets.append(new)
            train: ConcatDataset[Any] = ConcatDataset([self.train_set, *pseudo_sets])
            self.fit(f"round{round_number}", train, c.round_epochs, with_jaccard=True)
            val_loss, counts = _evaluate(self.model, self._loader(self.val_set, shuffle=False),
                                         self.device, True)  # fmt: skip
            self.log.append(
                {"stage": f"round{round_number}", "epoch": 0, "kept": kept,
                 "val_loss": val_loss, "val_jaccard": counts.at(counts.jaccard()),
                 "seconds": time.perf_counter() - started}
            )  # fmt: skip
            self._write_log()
        self.timings["total_seconds"] = sum(float(r.get("seconds", 0)) for r in self.log)
        final = self.export("final")
        (self.run_dir / "exports.json").write_text(
            json.dumps({"baseline": str(baseline_path), "final": str(final)}, indent=1)
        )
        return final

    # --- export and logs -----------------------------------------------------------------

    def _test_metrics(self, best: int) -> dict[str, float]:
        """Pooled test Jaccard/Dice at the chosen threshold: all, per vendor, per grade."""
        groups: dict[str, Counts] = {}
        for record in self.test_records:
            _, counts = _evaluate(
                self.model, self._loader(self._patches([record]), shuffle=False),
                self.device, False,
            )  # fmt: skip
            for key in ("", f"_vendor_{record.vendor}", f"_grade_{record.grade}"):
                total = groups.setdefault(key, Counts())
                total.tp, total.fp, total.fn = (
                    total.tp + counts.tp,
                    total.fp + counts.fp,
                    total.fn + counts.fn,
                )
        metrics: dict[str, float] = {}
        for key, counts in sorted(groups.items()):
            metrics[f"test_jaccard{key}"] = float(counts.jaccard()[best])
            metrics[f"test_dice{key}"] = float(counts.dice()[best])
        return metrics

    def export(self, label: str) -> Path:
        c = self.config
        _, val_counts = _evaluate(
            self.model, self._loader(self.val_set, shuffle=False), self.device, False
        )
        best = int(np.argmax(val_counts.jaccard()))
        threshold = val_counts.thresholds[best]
        metrics: dict[str, float] = {
            "validation_jaccard": float(val_counts.jaccard()[best]),
            "validation_dice": float(val_counts.dice()[best]),
        }
        metrics.update(self._test_metrics(best))
        epochs = [r for r in self.log if r.get("epoch", 0) > 0]
        if epochs:
            metrics["seconds_per_epoch"] = float(np.mean([r["seconds"] for r in epochs]))
        rounds = [r for r in self.log if r.get("epoch") == 0]
        if rounds:
            metrics["seconds_per_round"] = float(np.mean([r["seconds"] for r in rounds]))
        metrics["training_seconds"] = float(sum(float(r.get("seconds", 0)) for r in self.log))
        card = ModelCard(
            name=c.name,
            version=c.version if label == "final" else f"{c.version}+baseline",
            architecture=c.model,
            input_spacing_mm=c.spacing_mm,
            threshold=float(threshold),
            tile_size=max(c.patch_size, c.model.output_stride * 2),
            tile_overlap=min(c.patch_overlap, c.patch_size // 2),
            training_data=(
                f"bac-node synthetic phantoms (bac-node synth {__version__}): "
                f"{len(self.records)} labelled canvases, "
                f"{len(self.unlabelled)} unlabelled; "
                + (
                    "baseline model (before pseudo-labelling)"
                    if label == "baseline"
                    else f"after {c.rounds} pseudo-label round(s)"
                )
            ),
            metrics=metrics,
        )
        path = self.run_dir / f"{label}.safetensors"
        save_model(path, self.model.to("cpu"), card)
        self.model.to(self.device)
        return path

    def _write_log(self) -> None:
        (self.run_dir / "log.json").write_text(json.dumps(self.log, indent=1))
        plot_log(self.log, self.run_dir / "curves.png")
        keys = sorted({k for row in self.log for k in row})
        with (self.run_dir / "log.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.log)


def plot_log(log: list[dict[str, Any]], path: Path) -> None:
    """Loss and validation Jaccard per epoch across the stages, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r for r in log if r.get("epoch", 0) > 0]
    if not epochs:
        return
    x = np.arange(1, len(epochs) + 1)
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    loss_ax.plot(x, [r["train_loss"] for r in epochs], label="train loss")
    loss_ax.plot(x, [r["val_loss"] for r in epochs], label="validation loss")
    metric_ax.plot(x, [r["val_jaccard"] for r in epochs], label="validation Jaccard")
    metric_ax.plot(x, [r["val_dice"] for r in epochs], label="validation Dice")
    starts = [i + 1 for i, r in enumerate(epochs) if i == 0 or r["stage"] != epochs[i - 1]["stage"]]
    for ax in (loss_ax, metric_ax):
        for start in starts:
            ax.axvline(start - 0.5, color="0.8", lw=0.8)
            ax.text(start - 0.4, 1.0, epochs[start - 1]["stage"], fontsize=7, va="top",
                    transform=ax.get_xaxis_transform())  # fmt: skip
        ax.set_xlabel("epoch (all stages)")
        ax.legend(fontsize=8)
    loss_ax.set_yscale("log")
    metric_ax.set_ylim(0, 1)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def train(config_path: Path, run_dir: Path) -> Path:
    """Run a training config end to end; the exported final model's path."""
    return Trainer(load_config(config_path), run_dir).run()
