"""Export a model for serving: every tower as its own graph (:mod:`mmformer.ship.exportable`), in ONNX
(``torch.onnx.export(dynamo=True)``) or as a ``torch.export`` program (``.pt2``), with dynamic batch and sequence axes.

The folder, as Hugging Face Optimum lays out an encoder–decoder export (``mmformer export --format onnx``)::

    out/
      image_encoder.onnx, audio_encoder.onnx, text_encoder.onnx, decoder_model.onnx, decoder_with_past_model.onnx
                                  the graphs of the towers exported (``.pt2`` with ``--format torch-export``); their
                                  inputs and outputs: :mod:`mmformer.ship.exportable`
      export_config.json          the graphs, their inputs/outputs and dynamic axes, the zero-shot logit scale and
                                  bias (SigLIP's: scores read through a sigmoid), the special token ids (end ids
                                  included), the decoder's length limit, the audio window and every step of the
                                  log-mel front end (``audio.log_mel``), where the decoder's image memory starts and
                                  the checkpoint's decoding rules (``generation``: Whisper's prompt tokens and
                                  suppressed tokens); every key: docs/export.md
      mel_filters.npy             the log-mel filter bank (n_fft/2 + 1, M), for feature extraction without torch
      config.json, tokenizer.json, preprocessor_config.json

The graphs' key-padding masks are real tokens first (:mod:`mmformer.ship.exportable`): from opset 24 the ONNX graphs
pass them to attention as lengths (:func:`_lengths_for_masks`), and from opset 23 every attention mask gets one row
per query for onnxruntime (:func:`_mask_per_query`).

Every folder is written through :func:`mmformer.io.pretrained.atomic_directory`: a failed export leaves the target as
it was (no half-written folder), and a failed write (a full disk) is a :class:`~mmformer.io.atomic.WriteError` naming
the file (:func:`~mmformer.io.atomic.writing`). A ``.pt2`` program is read back by
:func:`mmformer.ship.programs.load_program`.

Shape legend: B batch, T queries, S keys (memory tokens), nh heads, hs head size, M mel bins.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmformer.embedders.audio import DECADES, POWER_FLOOR
from mmformer.io.atomic import write_json, writing
from mmformer.io.pretrained import EXPORT_CONFIG, MEL_FILTERS
from mmformer.model import MultimodalTransformer
from mmformer.ship.audio_features import LOG_MEL
from mmformer.ship.exportable import Graph, graphs, image_memory_start
from mmformer.ship.onnx_runner import EXPORT_FORMAT_VERSION

FORMATS = ("onnx", "torch-export")
SUFFIX = {"onnx": ".onnx", "torch-export": ".pt2"}
# 23: scaled_dot_product_attention exports as ONNX's Attention operator instead of MatMul/Softmax around a Transpose
# of the keys, which onnxruntime materialised at every decoding step (the cached cross-attention keys: 4 ms a layer at
# whisper-tiny dimensions, batch 8, 30 s of memory). 24: Attention takes a key-padding mask as lengths
# (``nonpad_kv_seqlen``), which onnxruntime (>= 1.24) runs on its fast kernel; see _lengths_for_masks.
OPSET = 24
MIN_OPSET = 18


# ---------------------------------------------------------------------------------------------- writing
def export(
    model: MultimodalTransformer,
    directory: str | os.PathLike,
    *,
    format: str = "onnx",
    towers: Sequence[str] | None = None,
    processor: Any = None,
    opset: int = OPSET,
    overwrite: bool = True,
) -> Path:
    """Write the graphs of ``towers`` (default: all the model has) into ``directory``, atomically.

    Args:
        model: the model to export (eval mode; float weights).
        directory: the output folder; replaced as a whole on success, untouched on failure.
        format: ``onnx`` (``torch.onnx.export(dynamo=True)``, opset ``opset``) or ``torch-export`` (``.pt2``
            programs written by ``torch.export.save``).
        towers: some of ``image``, ``audio``, ``text``, ``decoder``.
        processor: saved beside the graphs (default ``model.processor``), so that a runner finds the tokenizer and
            the preprocessing settings.
        overwrite: False refuses to replace a folder that already holds an export or a saved model.

    Raises:
        ValueError: an unknown format or tower, a tower the model lacks, or a quantized model.
    """
    from mmformer.io import pretrained

    if format not in FORMATS:
        raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")
    if format == "onnx" and (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET):
        # torch.onnx's exporter writes opset 18 or later (asked for less, it converted down, failed, and wrote 18)
        raise ValueError(f"opset: expected an int >= {MIN_OPSET} (torch.onnx.export(dynamo=True)), got {opset!r}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(
            "model: a torchao-quantized model cannot be exported to ONNX or torch.export here; export the float "
            "model (its tensor subclasses have no ONNX lowering) and quantize with onnxruntime's tools if needed"
        )
    model = model.eval()
    todo = graphs(model, towers)  # refuses bad towers before anything is written
    # the decoder's memory is image_states[:, memory_start:], all real tokens (see image_memory_start)
    image = {"memory_start": image_memory_start(model)} if any(g.name == "image_encoder" for g in todo) else None
    processor = processor if processor is not None else getattr(model, "processor", None)
    with (
        pretrained.atomic_directory(
            directory,
            overwrite=overwrite,
            marker_files=(EXPORT_CONFIG, pretrained.CONFIG_NAME, pretrained.WEIGHTS_NAME),
        ) as staging,
        _torchlib_registry_built_once(),
    ):
        records = {}
        for graph in todo:
            path = staging / f"{graph.name}{SUFFIX[format]}"
            (_write_onnx if format == "onnx" else _write_program)(graph, path, opset)
            records[graph.name] = {
                "file": path.name,
                "inputs": list(graph.inputs),
                "outputs": graph.outputs,
                "dynamic_axes": graph.dynamic,
            }
        pretrained.write_config(staging, model.config)
        if processor is not None:
            processor.save_pretrained(staging)
        if "audio_encoder" in records:
            _save_mel_filters(model, staging / MEL_FILTERS)
        text, audio, generation = model.config.text, model.config.audio, model.config.generation
        config = {
            "format_version": EXPORT_FORMAT_VERSION,
            "format": format,
            "opset": opset if format == "onnx" else None,
            "torch_version": torch.__version__,
            "graphs": records,
            "logit_scale": float(model.logit_scale.detach().exp()),  # zero-shot logits = scale * cosine similarity
            # + bias, read through a sigmoid (SigLIP; zero_shot_logits, ZeroShotClassifier.predict_proba); None: softmax
            "logit_bias": None if model.logit_bias is None else float(model.logit_bias.detach()),
            "text": {"bos_id": text.bos_id, "eos_id": text.eos_id, "pad_id": text.pad_id,
                     "max_length": text.max_length if text.position != "none" else None,
                     # where generate stops: the position table less CoCa's class-token slot; every end id
                     "max_tokens": text.max_tokens if text.position != "none" else None,
                     "extra_eos_ids": list(text.extra_eos_ids)},
            "image": image,
            "audio": None if audio is None else {
                "sample_rate": audio.sample_rate, "n_fft": audio.n_fft, "hop_length": audio.hop_length,
                "n_mels": audio.n_mels, "mel_filters": MEL_FILTERS if "audio_encoder" in records else None,
                "pad_to_seconds": audio.pad_to_seconds,  # Whisper's fixed window (LogMel)
                "log_mel": log_mel_steps()},
            # the checkpoint's prompt and suppressed tokens (GenerationConfig; the runner builds the prompt with them)
            "generation": None if generation is None else dataclasses.asdict(generation),
        }  # fmt: skip
        write_json(staging / EXPORT_CONFIG, config)
    return Path(directory)


def log_mel_steps() -> dict[str, Any]:
    """The ``audio.log_mel`` block: every step of :class:`~mmformer.embedders.audio.LogMel` from waveforms to the audio
    graph's input beside the sizes and the filter bank, so that a runner without mmformer's Python computes it from
    the folder alone (docs/export.md); :class:`~mmformer.ship.onnx_runner.OnnxModel` reads it. The power floor and
    the dynamic range are LogMel's constants; its other steps are code (``torch.hann_window``'s periodic window,
    ``centre_pad``'s reflection, the power spectrum, ``(x + 4) / 4``, the dropped frame) that the runner's defaults
    state, which the parity tests hold to LogMel's features."""
    return {**LOG_MEL, "floor": POWER_FLOOR, "decades": DECADES}


def _masked_attention(model: Any) -> list[tuple[Any, Any]]:
    """The ONNX ``Attention`` nodes of ``model``'s graph that take a mask (input 3), with that mask."""
    return [(node, node.inputs[3]) for node in model.graph
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx") and len(node.inputs) >= 4
            and node.inputs[3] is not None]  # fmt: skip


def _lengths_for_masks(model: Any) -> None:
    """Pass every ``Attention`` node's key-padding mask (B, 1, 1, S) as lengths (``nonpad_kv_seqlen``, opset 24).

    Only for graphs whose masks are real tokens first (:attr:`Graph.prefix_masks`: the audio encoder's, from its
    lengths, and the decoder's cross-attention, from ``memory_mask``): the lengths are the mask's sum.
    onnxruntime runs Attention with a mask on a path that is 1.8× slower than its kernel without one (one layer of
    whisper-tiny's encoder, 8 × 1,500 tokens, 2 threads: 280 vs 157 ms); with the lengths, 183 ms and equal outputs.
    Masks of any other shape (causal, windows, relative-position biases) are left as they are."""
    import numpy as np
    from onnxscript import ir

    lengths: dict[Any, Any] = {}  # mask value → its (B,) lengths, computed once per graph
    for node, mask in _masked_attention(model):
        shape = mask.shape
        if len(node.inputs) != 4 or mask.dtype != ir.DataType.BOOL or shape is None or len(shape) != 4:
            continue  # past key/value inputs, or a float bias
        if shape[1:3] != (1, 1):
            continue  # not a key-padding mask
        if mask not in lengths:
            cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT64})
            axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1, 2, 3], dtype=np.int64))})
            total = ir.node("ReduceSum", [cast.outputs[0], axes.outputs[0]], attributes={"keepdims": 0})  # (B,)
            model.graph.insert_before(node, [cast, axes, total])
            lengths[mask] = total.outputs[0]
        attention = ir.node("Attention", [*node.inputs[:3], None, None, None, lengths[mask]],
                            attributes=dict(node.attributes), num_outputs=len(node.outputs))  # fmt: skip
        model.graph.insert_before(node, attention)
        ir.convenience.replace_all_uses_with(node.outputs, attention.outputs, replace_graph_outputs=True)
        described = [(old.name, old.shape, old.type) for old in node.outputs]
        model.graph.remove(node, safe=True)
        for new, (name, shape, type_) in zip(attention.outputs, described):
            new.name, new.shape, new.type = name, shape, type_


def _mask_per_query(model: Any) -> None:
    """Give every ONNX ``Attention`` node's mask one row per query (an ``Expand`` to (…, T, S)).

    onnxruntime 1.32's ``Attention`` (opset 23) refuses a mask broadcast over the queries (``attention_helper.h:70``:
    "inconsistent q_sequence_length"), which the ONNX spec allows and which attention passes as a key-padding mask
    (B, 1, 1, S). The ONNX graph alone gets the expansion: in the torch graphs (PT2E, ``torch.export``) inductor would
    materialise an expanded mask as a float (B, 1, T, S) one (measured: PT2E whisper-tiny encode 1.74× → 1.40×)."""
    import numpy as np
    from onnxscript import ir  # onnx_ir, the exporter's graph API

    for node, mask in _masked_attention(model):
        ones = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1, 1], dtype=np.int64))})
        one = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1], dtype=np.int64))})
        queries = ir.node("Shape", [node.inputs[0]], attributes={"start": -2, "end": -1})  # T of (B, nh, T, hs)
        shape = ir.node("Concat", [ones.outputs[0], queries.outputs[0], one.outputs[0]], attributes={"axis": 0})
        expand = ir.node("Expand", [mask, shape.outputs[0]])  # (…, 1, S) → (…, T, S); a no-op where T is there
        model.graph.insert_before(node, [ones, one, queries, shape, expand])
        node.replace_input_with(3, expand.outputs[0])


@contextlib.contextmanager
def _torchlib_registry_built_once() -> Iterator[None]:
    """While inside, ``torch.onnx.export`` builds its table of ONNX translations (torchlib's) once per opset.

    ``torch.onnx.export(dynamo=True)`` (torch 2.14) builds ``ONNXRegistry.from_torchlib`` at every call, reading and
    parsing the source of ~500 onnxscript functions again (``inspect.getsource``, ``ast``): 0.5–0.75 s of CPU a call
    on the shared 2-core EPYC, a sixth of a graph of the tests' tiny model. Its five graphs spent 2.6 s of CPU in it,
    0.5 s with this (the export 17.9 → 15.6 s of CPU; text and decoder, three graphs: 11.1 → 9.5 s; medians of four,
    the same ONNX files). The table is a function of the opset alone, so the first call inside builds it and every
    call (the first included) gets its own copy, the table's lists copied: a call's ``custom_translation_table`` stays
    in that call's copy. Nothing outlives the block (one :func:`export`): the original classmethod is back afterwards,
    and a torch without it (or with another registry layout) builds its table at every call as before. A block
    entered while another is open (a nested export, or one on another thread) leaves the builder to that one, so
    the last to leave never puts back the other's replacement instead of torch's."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        yield
        return
    registry_class = getattr(_registration, "ONNXRegistry", None)
    original = vars(registry_class).get("from_torchlib") if isinstance(registry_class, type) else None
    if not isinstance(original, classmethod) or getattr(original.__func__, "builds_once", False):
        yield
        return
    built: dict[tuple, Any] = {}  # (class, arguments) → the registry built for them

    def from_torchlib(cls: type, *args: Any, **kwargs: Any) -> Any:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = original.__func__(cls, *args, **kwargs)
        table = getattr(built[key], "functions", None)
        if not isinstance(table, dict):  # a layout this copy does not know: build as torch does
            return original.__func__(cls, *args, **kwargs)
        registry = copy.copy(built[key])
        registry.functions = {target: list(translations) for target, translations in table.items()}
        return registry

    from_torchlib.builds_once = True  # marks the replacement (see above)
    registry_class.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_class.from_torchlib = original


def _write_onnx(graph: Graph, path: Path, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's progress notes and deprecations
        program = torch.onnx.export(
            graph.module,
            tuple(graph.inputs.values()),
            input_names=list(graph.inputs),
            output_names=graph.outputs,
            dynamic_shapes=graph.dynamic_shapes(),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
        if opset >= 24 and graph.prefix_masks:
            _lengths_for_masks(program.model)
        if opset >= 23:
            _mask_per_query(program.model)
        with writing(path):  # a full disk: a WriteError naming the graph's file, not a bare OSError
            program.save(str(path))


def _write_program(graph: Graph, path: Path, opset: int) -> None:
    """The ``.pt2`` archive is built in memory and then written: torch's archive writer, writing a file (by path or
    file object) on a full disk, raises and later aborts the process (its destructor throws again: "terminate called
    after throwing an instance of 'c10::Error'")."""
    del opset
    with torch.no_grad():
        program = torch.export.export(graph.module, tuple(graph.inputs.values()), dynamic_shapes=graph.dynamic_shapes())
    archive = io.BytesIO()
    torch.export.save(program, archive)
    with writing(path):
        path.write_bytes(archive.getbuffer())


def _save_mel_filters(model: MultimodalTransformer, path: Path) -> None:
    """The ``.npy`` is built in memory and then written: ``np.save`` of a path on a full disk raised an ``OSError``
    without the OS's reason ("26400 requested and 32 written"), or, for a bank under its 4 KiB buffer, nothing at all,
    leaving a cut file."""
    import numpy as np

    bank = model.audio_embed.features.filters(torch.device("cpu"))  # (n_fft/2 + 1, M)
    data = io.BytesIO()
    np.save(data, bank.numpy().astype(np.float32), allow_pickle=False)
    with writing(path):
        path.write_bytes(data.getbuffer())
