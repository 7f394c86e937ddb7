"""int8 ONNX graphs for the torch-free runner: onnxruntime's quantization (``onnxruntime.quantization``) of the
graphs :func:`mmformer.ship.export.export` wrote, into a new export folder that
:class:`mmformer.ship.onnx_runner.OnnxModel`
reads as any other.

Methods (``mmformer quantize --backend onnxruntime --method dynamic|static``):

=========  ==============================================================================================
dynamic    ``quantize_dynamic``: int8 weights per output channel, uint8 activations quantized at run time
           (``DynamicQuantizeLinear`` + ``MatMulInteger``)
static     ``quantize_static`` in the QDQ format, on the matrix products: int8 activations with scales
           calibrated over the batches (``MinMax``), int8 weights per output channel
=========  ==============================================================================================

``export_config.json`` gains ``quantization`` (``{"backend": "onnxruntime", "method": ..., "onnxruntime_version":
...}``); the graphs keep their file names, inputs and outputs.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mmformer.io.atomic import write_json
from mmformer.io.pretrained import EXPORT_CONFIG

METHODS = ("dynamic", "static")
BACKEND = "onnxruntime"
# static: the matrix products only (as onnxruntime's transformer examples do); quantizing the convolutions, norms and
# softmax inputs as well costs the digits model's audio tower most of its accuracy (measured, benchmarks/compress.py)
STATIC_OPS = ["MatMul", "Gemm"]


def _dynamic_ops() -> list[str]:
    """The operators ``quantize_dynamic`` quantizes by default, less two:

    - ``Attention``: the registry means the com.microsoft operator of that name and rewrites ONNX's own Attention
      (opset 23 and 24, what the export writes) into a QAttention that onnxruntime then refuses to load;
    - ``Conv``: onnxruntime's ``ConvInteger`` is slower than its float ``Conv`` (whisper-tiny's two-convolution stem
      on 8 × 30 s, 2 threads: 241 ms against 80 ms, a sixth of the int8 encoder), as static int8 leaves it too."""
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    return [op for op in IntegerOpsRegistry if op not in ("Attention", "Conv")]


def _calibration_feeds(model: Any, batches: Iterable[dict[str, Any]], config: dict) -> dict[str, list[dict]]:
    """Graph name → its calibration inputs (input name → array), the towers' inputs of every batch as the torch
    model computes them (:func:`mmformer.compress.pt2e._calibration_inputs`, the decoder step included)."""
    import torch

    from mmformer.compress.pt2e import _calibration_inputs

    feeds: dict[str, list[dict]] = {name: [] for name in config["graphs"]}
    with torch.no_grad():
        for name, inputs in _calibration_inputs(model.eval(), batches):
            if name in feeds:
                names = config["graphs"][name]["inputs"]
                feeds[name].append({n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})
    return feeds


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_export(
    source: str | os.PathLike,
    directory: str | os.PathLike,
    method: str = "dynamic",
    *,
    model: Any = None,
    calibration: Iterable[dict[str, Any]] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the int8 version of the ONNX export ``source`` into ``directory`` (atomically).

    Args:
        source: a folder written by ``mmformer export --format onnx``.
        directory: the output folder.
        method: ``dynamic`` or ``static``.
        model: the float model the export came from (static: it turns the calibration batches into each graph's
            inputs, the decoder's memory and cache included).
        calibration: batches as :func:`mmformer.compress.quantization.calibration_batches` gives them (static).

    Raises:
        FileNotFoundError: ``source`` is not an export folder.
        ValueError: an unknown method, an export that is not ONNX or is quantized already, static without a model
            and calibration batches, or batches that reach no input of a graph.
    """
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from mmformer.io import pretrained

    if method not in METHODS:
        raise ValueError(f"method: the onnxruntime backend supports {list(METHODS)}, got {method!r}")
    source = Path(source)
    path = source / EXPORT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"source: no {EXPORT_CONFIG} in {source}; expected an `mmformer export` folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("format") != "onnx":
        raise ValueError(f"source: {path}: expected an ONNX export (--format onnx), got {config.get('format')!r}")
    if config.get("quantization"):
        raise ValueError(f"source: {source} is quantized already ({config['quantization']}); use the float export")
    feeds = None
    if method == "static":
        if model is None or calibration is None:
            raise ValueError("calibration: static int8 needs the float model and calibration batches (--calib)")
        feeds = _calibration_feeds(model, calibration, config)
        empty = sorted(name for name, f in feeds.items() if not f)
        if empty:
            raise ValueError(f"calibration: the batches reached no input of the graphs {empty}")
    with pretrained.atomic_directory(
        directory, overwrite=overwrite, marker_files=(EXPORT_CONFIG, pretrained.CONFIG_NAME, pretrained.WEIGHTS_NAME)
    ) as staging:
        graphs = {g["file"] for g in config["graphs"].values()}
        for item in source.iterdir():
            if item.is_file() and item.name not in graphs and item.name != EXPORT_CONFIG:
                shutil.copy2(item, staging / item.name)
        for name, graph in config["graphs"].items():
            src, dst = staging / f"{graph['file']}.folded", staging / graph["file"]
            # onnxruntime's pre-processing (its basic graph optimizations, constant folding among them) first: the
            # exporter writes a linear layer's weight as Transpose(weight), and a product whose weight is not an
            # initializer is not quantized — the LM head stayed float behind a dequantization of its whole int8
            # table at every decoding step (10 + 15 ms of a 44-ms whisper-tiny step at batch 8; 2 ms once folded)
            quant_pre_process(source / graph["file"], src, skip_symbolic_shape=True)
            if method == "dynamic":
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=_dynamic_ops())  # fmt: skip
            else:
                # int8 activations (onnxruntime's default, "S8S8"): the same outputs as uint8 ones at whisper-tiny's
                # audio encoder (max diff 0.058 both) in 0.80x the time (914 vs 1,141 ms, Intel Xeon, 2 threads);
                # the products' outputs stay float (what reads them is float): onnxruntime then runs each as one
                # int8 product with a float result instead of QLinearMatMul + DequantizeLinear — 895 -> 772 ms,
                # max diff 0.058 -> 0.042
                quantize_static(src, dst, _Reader(feeds[name]), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=STATIC_OPS,
                                extra_options={"OpTypesToExcludeOutputQuantization": STATIC_OPS})  # fmt: skip
            src.unlink()
        config["quantization"] = {"backend": BACKEND, "method": method, "onnxruntime_version": ort_version}
        write_json(staging / EXPORT_CONFIG, config)
    return Path(directory)
