"""int8 inference on x86 CPUs through PT2E: each tower's exported graph (:mod:`mmformer.ship.exportable`) is
quantized with PyTorch's ``X86InductorQuantizer`` (``prepare_pt2e`` → calibration → ``convert_pt2e``) and compiled
with ``torch.compile`` (inductor with freezing, which lowers the quantize/dequantize patterns to oneDNN int8 kernels).

Modes (``mmformer quantize --backend pt2e --method static|dynamic``):

=========  ==============================================================================================
static     uint8 activations with one scale and zero point per tensor, chosen by histogram observers over
           calibration batches; int8 weights per output channel
dynamic    int8 weights per output channel; activations quantized per tensor at run time
=========  ==============================================================================================

The linear layers are quantized (the matrix work); convolutions, norms and attention stay float.

Files (never pickled): the float model as ``save_pretrained`` writes it, plus ``pt2e_qparams.safetensors`` (every
observer's scale and zero point, keyed ``{graph}.{observer}.scale`` / ``.zero_point``, and in its metadata the
mode, the graphs and the torch version). Loading builds the float model, exports and prepares each graph again
(the observers come out with the same names), gives every observer its saved parameters and converts: the
quantized graphs equal the saved model's exactly, and the weights stay one float copy on disk.

The graphs run on x86-64 CPUs only (the quantizer's kernels); another device or CPU gets a ValueError naming both.
The quantized model at run time, :class:`PT2EModel`, is :mod:`mmformer.compress.pt2e_model`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmformer.compress.pt2e_model import (
    BACKEND,
    POOLED_PROJECTIONS,
    QPARAMS_FILE,
    PT2EModel,
    check_device,
    pad_frames,
)

MODES = ("static", "dynamic")
STEP_POSITIONS = 16  # decoder-step calibration: the first positions of each text


def _quantizer(mode: str) -> Any:
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    # the linear layers only: they hold the matrix work, and inductor's quantized-convolution lowering (the patch
    # embedding) fails its output-stride check under dynamic shapes (torch 2.14, measured). Not the pooled
    # projections either (one row per input, no work to speak of): compiled with freezing, an int8 image_proj on the
    # class token of a CLIP image tower answered 0.73 away from its own reference graph (torch 2.14, measured)
    config = get_default_x86_inductor_quantization_config(is_dynamic=mode == "dynamic")
    quantizer = X86InductorQuantizer().set_module_type_qconfig(nn.Linear, config)
    for name in POOLED_PROJECTIONS:  # the graphs' wrappers (mmformer.ship.exportable) hold the model as `model`
        quantizer.set_module_name_qconfig(f"model.{name}", None)
    return quantizer


def _prepare(graph: Any, mode: str) -> torch.fx.GraphModule:
    """The tower's exported graph with PT2E observers (``prepare_pt2e``)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    with torch.no_grad():
        program = torch.export.export(graph.module, tuple(graph.inputs.values()), dynamic_shapes=graph.dynamic_shapes())
    return prepare_pt2e(program.module(), _quantizer(mode))


def _observers(gm: torch.fx.GraphModule) -> dict[str, nn.Module]:
    """Observer name → observer, for the observers whose parameters are fixed at convert (not run-time dynamic)."""
    return {
        name: m
        for name, m in gm.named_modules()
        if hasattr(m, "calculate_qparams") and not getattr(m, "is_dynamic", False)
    }


def _convert(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return convert_pt2e(gm)


def _calibration_inputs(model: nn.Module, batches: Iterable[dict[str, Any]]) -> Iterable[tuple[str, tuple]]:
    """(graph name, inputs) of every graph a calibration batch runs through: the encoders and the decoder's prefill
    as :func:`mmformer.compress.quantization._tower_inputs` gives them, and the decoder step at each position of the
    teacher-
    forced texts, its cache made by the float model's prefill of the positions before."""
    from mmformer.compress.quantization import _tower_inputs
    from mmformer.ship.exportable import DecoderPrefill

    prefill = DecoderPrefill(model)
    for batch in batches:
        for name, inputs in _tower_inputs(model, batch):
            if name == "audio_encoder":
                inputs = (pad_frames(model, inputs[0]), inputs[1])
            yield name, inputs
            if name != "decoder_model":
                continue
            ids, memory, memory_mask = inputs  # (B, T), (B, S, D), (B, S)
            for k in range(1, min(ids.shape[1], STEP_POSITIONS + 1)):
                _, keys, values, cross_keys, cross_values = prefill(ids[:, :k], memory, memory_mask)
                yield "decoder_with_past_model", (ids[:, k : k + 1], memory_mask, keys, values, *cross_keys,
                                                  *cross_values)  # fmt: skip


def quantize(
    model: nn.Module,
    mode: str,
    *,
    calibration: Iterable[dict[str, Any]] | None = None,
    towers: Sequence[str] | None = None,
    compile: bool = True,
) -> PT2EModel:
    """The int8 graphs of ``model``'s towers (default: every tower it has); ``model`` itself stays float.

    Args:
        model: a float :class:`~mmformer.model.MultimodalTransformer` on the CPU.
        mode: ``static`` (needs ``calibration``) or ``dynamic``.
        calibration: batches as :func:`mmformer.compress.quantization.calibration_batches` gives them (static).
        towers: some of ``image``, ``audio``, ``text``, ``decoder``.
        compile: compile each graph on first use (``torch.compile``, inductor); False runs the reference graphs.

    Raises:
        ValueError: an unknown mode, static without calibration (or with batches that reach no graph), a model
            that is quantized already, a device or CPU the x86 kernels cannot serve.
    """
    from mmformer.ship import exportable

    if mode not in MODES:
        raise ValueError(f"method: the pt2e backend supports {list(MODES)}, got {mode!r}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"model: already quantized ({model.quantization.method}); quantize the float model")
    from mmformer.io.weights import model_device

    check_device(model_device(model))
    model.eval()
    graphs = {g.name: g for g in exportable.graphs(model, towers)}
    prepared = {name: _prepare(g, mode) for name, g in graphs.items()}
    with torch.no_grad():
        if mode == "static":
            if calibration is None:
                raise ValueError("calibration: static int8 needs calibration batches (mmformer quantize --calib ...)")
            reached = set()
            for name, inputs in _calibration_inputs(model, calibration):
                if name in prepared:
                    prepared[name](*inputs)
                    reached.add(name)
            if name_missing := sorted(set(prepared) - reached):
                raise ValueError(f"calibration: the batches reached no input of the graphs {name_missing}")
        else:  # the weight observers only need one pass; the activations are measured at run time
            for name, gm in prepared.items():
                gm(*graphs[name].inputs.values())
    qparams = {}
    for name, gm in prepared.items():
        for obs_name, obs in _observers(gm).items():
            scale, zero_point = obs.calculate_qparams()
            qparams[f"{name}.{obs_name}.scale"] = scale.detach().float().reshape(-1)
            qparams[f"{name}.{obs_name}.zero_point"] = zero_point.detach().to(torch.int64).reshape(-1)
    converted = {name: _convert(gm) for name, gm in prepared.items()}
    return PT2EModel(model, mode, converted, qparams, compile=compile)


def as_quantized(model: PT2EModel, compute_type: str, name: str) -> str:
    """What ``--compute-type`` means for a PT2E model (the commands and the server): its graphs run as they were
    quantized, so ``auto`` (and float32) keeps them so — the returned line says it — and ``bfloat16`` / ``int8``
    (autocast or another quantization around int8 graphs) are refused naming ``name``."""
    if compute_type in ("bfloat16", "int8"):
        raise ValueError(f"--compute-type {compute_type}: {name} holds PT2E int8 graphs, which run as they were "
                         "quantized; pass --compute-type float32 or auto")  # fmt: skip
    return f"int8 ({name}: PT2E {model.mode} graphs, as quantized)"


def is_pt2e(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a model saved by :meth:`PT2EModel.save_pretrained`."""
    return (Path(directory) / QPARAMS_FILE).is_file()


def load(directory: str | os.PathLike, *, device: torch.device | str | None = None, compile: bool = True) -> PT2EModel:
    """A PT2E int8 model saved by :meth:`PT2EModel.save_pretrained`, its graphs rebuilt from the float weights and
    the saved observer parameters.

    Raises:
        FileNotFoundError: the folder has no :data:`QPARAMS_FILE`.
        ValueError: a device or CPU the backend cannot serve, or a file whose observers do not match the graphs
            this torch prepares (another torch version, or an edited file).
    """
    from safetensors import safe_open

    from mmformer.model import MultimodalTransformer
    from mmformer.ship import exportable

    directory = Path(directory)
    path = directory / QPARAMS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"directory: no {QPARAMS_FILE} in {directory}; expected a pt2e-quantized model")
    check_device(device)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        qparams = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)
    try:
        config = json.loads(metadata["quantization_config"])
        mode, names = config["method"], config["graphs"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: no valid quantization_config in its metadata ({e})") from e
    if config.get("quant_method") != BACKEND or mode not in MODES:
        raise ValueError(f"{path}: expected quant_method {BACKEND!r} with a method in {list(MODES)}, got {config}")
    model = MultimodalTransformer.from_pretrained(directory, device="cpu").eval()  # our own folder format
    graphs = {g.name: g for g in exportable.graphs(model, _towers(names))}
    converted = {}
    for name in names:
        gm = _prepare(graphs[name], mode)
        observers = _observers(gm)
        saved = {k.removeprefix(f"{name}.").rsplit(".", 1)[0] for k in qparams if k.startswith(f"{name}.")}
        if saved != set(observers):
            raise ValueError(
                f"{path}: the {name} graph's observers ({len(observers)}) differ from the file's ({len(saved)}); "
                f"it was written by torch {metadata.get('torch_version')}, this is torch {torch.__version__}: "
                "quantize the float model again"
            )
        for obs_name, obs in observers.items():
            scale, zero_point = qparams[f"{name}.{obs_name}.scale"], qparams[f"{name}.{obs_name}.zero_point"]
            if scale.numel() == 1:
                scale, zero_point = scale.reshape(()), zero_point.reshape(())
            obs.calculate_qparams = lambda s=scale, z=zero_point: (s, z)  # the saved choice, not a new one
        converted[name] = _convert(gm)
    return PT2EModel(model, mode, converted, qparams, compile=compile)


def _towers(graph_names: Iterable[str]) -> list[str]:
    from mmformer.ship.exportable import TOWERS

    by_graph = {"image_encoder": "image", "audio_encoder": "audio", "text_encoder": "text",
                "decoder_model": "decoder", "decoder_with_past_model": "decoder"}  # fmt: skip
    towers = {by_graph.get(n) for n in graph_names}
    if None in towers:
        raise ValueError(f"graphs: expected names among {sorted(by_graph)}, got {sorted(graph_names)}")
    return [t for t in TOWERS if t in towers]
