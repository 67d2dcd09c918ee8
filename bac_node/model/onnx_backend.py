"""The ONNX Runtime backend: the same network, tiles and blending, a faster CPU forward pass.

:class:`OnnxPredictor` is a :class:`~bac_node.model.inference.UNetPredictor` whose
forward pass runs in ONNX Runtime instead of torch; the tiling, the blending and the
sigmoid are the torch predictor's own, so the two differ only in the network's
arithmetic. The ``backend`` setting chooses (``torch``, ``onnx`` or ``auto``: ONNX
Runtime when the model runs on the CPU, torch on CUDA); see
:func:`bac_node.model.inference.load_predictor`.

Decisions a next engineer needs:

- **Where the ONNX model comes from.** It is exported from the loaded torch network
  (itself loaded from the ``.safetensors`` weights and checked against the card's
  sha256) each time a predictor is made, at model load (:func:`export_onnx`, through a
  temporary file deleted at once): nothing is downloaded and nothing is cached, so an
  ONNX graph can never be stale against its weights. Measured on 2 shared cores: 0.7 s
  to export the shipped model (16 MB of graph), 0.06 s to open the session: once per
  worker start or ``analyze`` run, not worth a cache and its invalidation.
- **The exporter** is torch's legacy TorchScript exporter (``dynamo=False``, opset 17),
  with the batch, height and width dynamic, so one graph runs any tile size the card
  or a caller asks for. The dynamo exporter needs onnxscript and was not needed.
- **Parity** (tests/test_onnx.py): max |p_onnx - p_torch| ≤ 1e-3 on a fixed input is
  the contract; measured 1.6e-6 on the shipped model (batches of 256² tiles).
- **Threads**: ``threads`` sets ONNX Runtime's intra-op threads (``None``: its default,
  one per physical core); inter-op parallelism stays sequential (a U-Net is a chain);
  idle threads sleep rather than spin (a shared CPU, see :func:`onnx_session`).
- CPU only: the ``onnxruntime`` wheel bac-node depends on has no CUDA provider; on a
  GPU the torch backend (fp16 autocast) is the fast one.

Research use only. Not for clinical use.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from bac_node.errors import ModelError
from bac_node.model.inference import UNetPredictor
from bac_node.model.weights import ModelCard

#: The ONNX opset the export targets (ONNX Runtime 1.17+ runs it).
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(model: torch.nn.Module, card: ModelCard) -> bytes:
    """``model`` (eval mode, CPU) as an ONNX graph: ``(N, C, H, W)`` image in, logits out.

    ``N``, ``H`` and ``W`` are dynamic; ``H`` and ``W`` must be multiples of the card's
    output stride, as for the torch network.
    """
    arch = card.architecture
    sample = torch.zeros(1, arch.in_channels, card.tile_size, card.tile_size)
    model = model.to("cpu").eval()
    dynamic = {0: "batch", 2: "height", 3: "width"}
    # A temporary file rather than a buffer: torch types export's target as a path. It
    # lives only for the export; the graph is returned as bytes.
    with tempfile.TemporaryDirectory(prefix="bac-node-onnx-") as tmp, warnings.catch_warnings():
        # The legacy exporter announces its deprecation and traces with TracerWarnings.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (sample,),
            path,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic},
        )
        return path.read_bytes()


def onnx_session(graph: bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``graph`` (all graph optimisations on)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(
            "the onnx backend needs onnxruntime (pip install onnxruntime); or set backend = torch"
        ) from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    # Idle threads sleep instead of spinning: the node's SCP and the other cores' work
    # keep their CPU (measured 2.9 s vs 4.3 s per 1200 × 2000 canvas on 2 busy cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def onnx_available() -> bool:
    """Whether ONNX Runtime can be imported here."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxPredictor(UNetPredictor):
    """:class:`UNetPredictor` with the forward pass in ONNX Runtime, on the CPU.

    Takes the torch ``model`` (exported here, once) and the predictor's own arguments;
    ``threads`` is ONNX Runtime's intra-op thread count (torch's are left alone).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        batch_size: int = 4,
        threads: int | None = None,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> None:
        super().__init__(
            model, card, device="cpu", batch_size=batch_size, threads=None,
            tile_size=tile_size, tile_overlap=tile_overlap,
        )  # fmt: skip
        if threads is not None and not (isinstance(threads, int) and threads >= 1):
            raise ValueError(f"threads must be a positive integer or None, not {threads!r}")
        self.session = onnx_session(export_onnx(self.model, card), threads)

    def _forward(self, stack: NDArray[np.float32]) -> NDArray[np.float32]:
        """Probabilities of a ``(N, H, W)`` stack of tiles."""
        x = np.ascontiguousarray(stack, dtype=np.float32)[:, np.newaxis]
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        if logits.shape != x.shape:
            raise ValueError(
                f"the model must map (N, 1, H, W) to (N, 1, H, W) logits; "
                f"it mapped {tuple(x.shape)} to {tuple(logits.shape)}"
            )
        # torch's sigmoid, so that both backends share everything but the network.
        probs: NDArray[np.float32] = torch.sigmoid(torch.from_numpy(logits))[:, 0].numpy()
        return probs
