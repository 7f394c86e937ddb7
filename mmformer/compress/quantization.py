"""Quantization with torchao: post-training (dynamic int8, weight-only int8 / int4, static int8 calibrated through
PT2E), quantization-aware training, and quantized models saved and loaded as safetensors without pickle.

Methods (``mmformer quantize --method``), applied to every ``nn.Linear`` except an LM head tied to the token
embedding (the embedding lookup needs the float table):

=============  ==========================================================================================
dynamic        int8 weights (per output channel) and int8 activations quantized per token at run time
               (torchao ``Int8DynamicActivationInt8WeightConfig``)
int8-weight    int8 weights, float activations (``Int8WeightOnlyConfig``)
int4-weight    int4 weights in groups of ``group_size`` input channels, float activations. On CPU torchao's
               ``Int4OpaqueTensor`` (``PrototypeInt4WeightOnlyConfig``: packed for the CPU tinygemm kernel,
               any float dtype); on CUDA ``Int4WeightOnlyConfig`` with the tile-packed layout (bf16 model). The
               packing belongs to the device it was made on: a CPU-packed model loads on CPU only.
static         int8 weights and int8 activations with one scale and zero point per layer, calibrated over
               batches of a data manifest: PT2E (``prepare_pt2e`` with the ``X86InductorQuantizer``) places
               histogram observers on every linear input of every tower's exported graph, the ranges they find
               (their union where a shared stack serves several towers) become torchao's
               ``Int8StaticActivationInt8WeightConfig`` activation scales
=============  ==========================================================================================

Quantization-aware training (``qat: {method: dynamic}`` in the fit config) swaps the linears for torchao's
``FakeQuantizedLinear`` during training (int8 asymmetric per-token activations, int8 per-channel weights; int4
groups for ``int4-weight``), and converts at the end of fit: the fake quantizers go, the method above is applied.

The files a quantized model is saved as (``quantization_config``, tensor subclasses as safetensors + JSON) are
:mod:`mmformer.io.quantized_files`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmformer.io.pretrained import has_adapter
from mmformer.io.quantized_files import INT4_GROUP_SIZES, METHODS, TENSOR_CLASSES, QuantizationConfig, require_torchao
from mmformer.io.weights import is_plain_tensor, model_device
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer

QAT_METHODS = ("dynamic", "int8-weight", "int4-weight")


# ---------------------------------------------------------------------------------------------- what gets quantized
def quantizable(model: nn.Module, group_size: int | None = None) -> list[str]:
    """Names of the linear layers quantization replaces: the one rule torchao's methods (:func:`quantize`, QAT) and
    QLoRA's 4-bit base (:func:`mmformer.adapt.four_bit.quantize_4bit`) share.

    Every ``nn.Linear`` with a plain float weight (not one quantized already: a torchao tensor subclass, bitsandbytes'
    ``Params4bit``), except one whose weight another module also holds: an LM head or BERT's masked-LM decoder tied
    to the token table reads the table's values, and a quantized copy would break the tie. For int4 groups
    (``group_size``), only layers whose input width the group size divides and whose output width the CPU packing's
    16 divides."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not is_plain_tensor(module.weight) or holders[id(module.weight)] > 1:
            continue
        if group_size is None or (module.in_features % group_size == 0 and module.out_features % 16 == 0):
            names.append(name)
    return names


def _filter(names: Iterable[str]) -> Any:
    chosen = set(names)
    return lambda module, fqn: fqn in chosen


def _base_config(method: str, group_size: int, device: torch.device, act_mapping: str = "symmetric") -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, MappingType

    if method == "dynamic":
        mapping = MappingType.SYMMETRIC if act_mapping == "symmetric" else MappingType.ASYMMETRIC
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping)
    if method == "int8-weight":
        return Int8WeightOnlyConfig()
    if method == "int4-weight":
        if device.type == "cuda":
            from torchao.quantization import Int4WeightOnlyConfig

            return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        if device.type != "cpu":
            raise ValueError(f"int4-weight: runs on CPU (Int4OpaqueTensor) or CUDA (tile-packed), not on {device}")
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=group_size)
    raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")


def quantize(
    model: MultimodalTransformer,
    method: str,
    *,
    calibration: Iterable[dict[str, Any]] | None = None,
    group_size: int = 32,
    act_mapping: str = "symmetric",
    embeddings: bool = False,
    float_storage: str = "float32",
    backend: str = "torchao",
) -> Any:
    """Quantize ``model`` in place (torchao's ``quantize_`` convention) and return it, in eval mode; or, with
    ``backend="pt2e"``, return its x86 int8 graphs (:func:`mmformer.compress.pt2e.quantize`: ``dynamic`` / ``static``,
    compiled with inductor; ``model`` stays float).

    Args:
        model: a float model (not quantized yet).
        method: one of :data:`METHODS`.
        calibration: batches (``pixel_values`` / ``audio`` + ``audio_lengths`` / ``input_ids`` + ``attention_mask``,
            as :func:`calibration_batches` or the data module's loaders give them) for ``static``.
        group_size: int4 group size (32, 64 or 128).
        act_mapping: dynamic activations ``symmetric`` (default) or ``asymmetric``.
        embeddings: int8 embedding tables (and a tied LM head) as well; see :class:`QuantizationConfig`.
        float_storage: store the tensors left in float as ``bfloat16`` (or ``float16``) for a smaller file.
        backend: ``torchao`` (the methods above) or ``pt2e``; onnxruntime's int8 works on an export folder
            (:func:`mmformer.compress.onnx_quantization.quantize_export`).

    Raises:
        ValueError: an unknown method or backend, a model already quantized or carrying an adapter, ``static``
            without calibration batches.
        ImportError: torchao is missing.
    """
    _refuse_adapter(model)
    if backend == "pt2e":
        from mmformer.compress import pt2e

        return pt2e.quantize(model, method, calibration=calibration)
    if backend != "torchao":
        raise ValueError(
            "backend: expected 'torchao' or 'pt2e' (onnxruntime: mmformer.compress.onnx_quantization.quantize_export "
            f"on an ONNX export), got {backend!r}"
        )
    QuantizationConfig(
        method, group_size=group_size, act_mapping=act_mapping, embeddings=embeddings, float_storage=float_storage
    )  # validates the options; fmt: skip
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"model: already quantized ({model.quantization.method}); quantize the float model")
    torchao = require_torchao(f"mmformer quantize --method {method}")
    from torchao.quantization import quantize_

    model.eval()
    device = model_device(model)
    names = quantizable(model, group_size if method == "int4-weight" else None)
    layout = "plain"
    if method == "static":
        if calibration is None:
            raise ValueError("calibration: static int8 needs calibration batches (mmformer quantize --calib MANIFEST)")
        for name, config in static_configs(model, calibration).items():
            quantize_(model, config, filter_fn=_filter([name]))
        names = [n for n in names if _is_quantized(model.get_submodule(n).weight)]
    else:
        if method == "int4-weight":
            layout = "cuda" if device.type == "cuda" else "cpu"
            if layout == "cuda" and model.logit_scale.dtype != torch.bfloat16:
                model.to(torch.bfloat16)  # the tile-packed CUDA kernel takes bf16 weights and activations
        quantize_(model, _base_config(method, group_size, device, act_mapping), filter_fn=_filter(names))
    if embeddings:
        from torchao.quantization import IntxWeightOnlyConfig, PerAxis

        tables = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        quantize_(
            model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)), filter_fn=_filter(tables)
        )
        model.tie_weights()  # the LM head reads the quantized table
        names += tables
    if float_storage != "float32":
        with torch.no_grad():  # round what stays float as it will be stored, so that a reload is exact
            for p in model.parameters():
                if type(p) is nn.Parameter and p.is_floating_point():
                    p.copy_(p.to(getattr(torch, float_storage)))
    dtype = str(model.logit_scale.dtype).removeprefix("torch.")
    model.quantization = QuantizationConfig(
        method, group_size, layout, act_mapping, names, dtype, embeddings, float_storage,
        getattr(torchao, "__version__", None),
    )  # fmt: skip
    return model


def _refuse_adapter(model: nn.Module) -> None:
    """A model carrying a LoRA adapter is refused: its peft lora_A / lora_B layers are ``nn.Linear`` too and would be
    quantized with the base, after which the adapter can be neither saved nor merged. Merge first."""
    if has_adapter(model):
        raise ValueError(
            "model: carries a LoRA adapter, whose lora_A / lora_B layers would be quantized with the base (and the "
            "adapter could then be neither saved nor merged); fold it in first with "
            "mmformer.adapt.adapters.merge_and_unload(model) (or `mmformer merge --base DIR --adapter DIR --out DIR`) "
            "and quantize the merged model"
        )


def _is_quantized(t: torch.Tensor) -> bool:
    return type(t).__name__ in TENSOR_CLASSES


# ---------------------------------------------------------------------------------------------- static calibration
def calibration_batches(
    model: MultimodalTransformer,
    manifest: str | Path,
    *,
    processor: Any = None,
    max_samples: int = 128,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Batches of up to ``max_samples`` usable samples of a data manifest (CSV/TSV/JSONL), preprocessed as the
    model's processor does: the calibration set of static int8.

    Raises:
        ValueError: the manifest holds no sample this model can read (the message names it and why).
        FileNotFoundError: the manifest does not exist.
    """
    import warnings

    from mmformer.data import Collator
    from mmformer.data.formats import open_dataset

    for name, value in (("max_samples", max_samples), ("batch_size", batch_size)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    processor = processor if processor is not None else getattr(model, "processor", None)
    routes = model.config.routes
    reads_text = "text" in routes or "decoder" in routes  # an image or audio encoder alone needs no texts
    if processor is None:
        raise ValueError("calibration: needs the model's processor (model.processor, or processor=); got None")
    if reads_text and processor.tokenizer is None:
        raise ValueError(f"calibration: this model reads text (routes {sorted(routes)}) and needs its processor's "
                         f"tokenizer; the processor has none")  # fmt: skip
    modalities = [m for m in ("image", "audio") if m in routes]
    try:
        dataset = open_dataset(str(manifest), format="manifest", modalities=modalities or ["text"],
                               processor=processor, max_bad_fraction=1.0)  # fmt: skip
    except ValueError as e:
        raise ValueError(f"calib: cannot read the manifest {manifest} ({e})") from e
    samples = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-sample skip warnings: the count is reported below
        for i in range(len(dataset)):
            sample = dataset[i]
            if sample is None or ("text" not in sample and reads_text):
                continue
            if not modalities or any(m in sample for m in modalities):
                samples.append(sample)
            if len(samples) >= max_samples:
                break
    if not samples:
        wanted = " and ".join(filter(None, [" or ".join(modalities), "text" if reads_text else ""]))
        raise ValueError(
            f"calib: {manifest}: no usable samples ({len(dataset)} rows, none with readable {wanted}); static "
            f"int8 needs calibration data the model can read"
        )
    collate = Collator(processor.tokenizer if reads_text else None, text_max_length=model.config.text.max_length)
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def _tower_inputs(model: MultimodalTransformer, batch: dict[str, Any]) -> Iterator[tuple[str, tuple]]:
    """(graph name, inputs) of every exported graph one calibration batch runs through: the encoders, and the
    decoder reading each encoder's states (a text-to-text model's: the text encoder's) with the batch's texts
    (teacher forcing)."""
    device, routes = model_device(model), model.config.routes
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")  # none for an image or audio encoder alone
    # the graphs take the boolean mask (True = may attend); a tokenizer's 0/1 integers are converted here
    ids, mask = (None, None) if ids is None else (ids.to(device), mask.to(device, torch.bool))
    memories = []
    if "text" in routes and ids is not None:
        yield "text_encoder", (ids, mask)
    if "image" in routes and batch.get("pixel_values") is not None:
        pixels = batch["pixel_values"].to(device)
        yield "image_encoder", (pixels,)
        states, _ = model.encode_image_tokens(pixels)
        memories.append((states, torch.ones(states.shape[:2], dtype=torch.bool, device=device)))
    if "audio" in routes and batch.get("audio") is not None:
        audio, lengths = batch["audio"].to(device), batch["audio_lengths"].to(device)
        features, frames = model.audio_embed.features(audio, lengths), model.audio_embed.features.frames(lengths)
        yield "audio_encoder", (features, frames)
        states, token_mask = model.encode_audio_tokens(audio_features=features, feature_lengths=frames)
        memories.append((states, token_mask))
    if ids is None:
        return
    if "decoder" in routes and "text" in routes and "image" not in routes and "audio" not in routes:
        states, text_mask = model.encode_text_tokens(ids, mask)  # text-to-text (T5): the text encoder's states,
        memories.append((states, mask if text_mask is None else text_mask))  # the batch's texts on both sides
    if "decoder" in routes:
        dec_ids = ids[:, :-1]  # teacher forcing: the decoder reads every token but the last
        for states, memory_mask in memories:
            yield "decoder_model", (dec_ids, states, memory_mask)


def static_configs(model: MultimodalTransformer, calibration: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Linear module name → torchao ``Int8StaticActivationInt8WeightConfig`` with its calibrated activation scale.

    Each tower is exported (:mod:`mmformer.ship.exportable`) and prepared with PT2E's ``X86InductorQuantizer``
    (static: per-tensor affine uint8 activations behind histogram observers); the calibration batches run through the
    prepared graphs. A linear used by several towers (a shared stack) keeps the union of the ranges its observers
    chose, re-expressed as int8 (zero point - 128).
    """
    from torchao.quantization import Int8StaticActivationInt8WeightConfig, MappingType, PerRow, PerTensor
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from mmformer.ship import exportable

    wanted = set(quantizable(model))
    graphs = {g.name: g for g in exportable.graphs(model)}
    prepared: dict[str, torch.fx.GraphModule] = {}
    ran = False
    with torch.no_grad():
        for batch in calibration:
            for name, inputs in _tower_inputs(model, batch):
                if name not in prepared:
                    g = graphs[name]
                    program = torch.export.export(g.module, tuple(g.inputs.values()), dynamic_shapes=g.dynamic_shapes())
                    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
                    prepared[name] = prepare_pt2e(program.module(), quantizer)
                prepared[name](*inputs)
                ran = True
    if not ran:
        raise ValueError("calibration: no batches; static int8 needs at least one calibration batch")
    ranges: dict[str, tuple[float, float, int]] = {}
    for gm in prepared.values():
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
                continue
            source = node.args[0]
            stack = node.meta.get("nn_module_stack") or {}
            if source.op != "call_module" or not stack:
                continue
            fqn = list(stack.values())[-1][0].removeprefix("model.")
            observer = gm.get_submodule(source.target)
            if fqn not in wanted or not torch.isfinite(observer.min_val).all():
                continue  # not a quantized linear, or never reached by the calibration data
            scale, zero_point = observer.calculate_qparams()
            scale, zero_point = float(scale), int(zero_point)
            low, high = (observer.quant_min - zero_point) * scale, (observer.quant_max - zero_point) * scale
            ndim = node.meta["val"].ndim  # the linear's output has its input's rank
            if fqn in ranges:
                low, high = min(low, ranges[fqn][0]), max(high, ranges[fqn][1])
            ranges[fqn] = (low, high, ndim)
    configs = {}
    for fqn, (low, high, ndim) in sorted(ranges.items()):
        scale = max(high - low, 1e-8) / 255.0
        zero_point = int(min(127, max(-128, round(-128 - low / scale))))
        shape = (1,) * ndim
        configs[fqn] = Int8StaticActivationInt8WeightConfig(
            act_quant_scale=torch.full(shape, scale, dtype=torch.float32, device=model_device(model)),
            act_quant_zero_point=torch.full(shape, zero_point, dtype=torch.int8, device=model_device(model)),
            granularity=[PerTensor(), PerRow()],
            act_mapping_type=MappingType.ASYMMETRIC,
        )
    return configs


# ---------------------------------------------------------------------------------------------- QAT
@dataclass
class QATOptions:
    """``qat:`` in the fit config: which method the fake quantization simulates (and the model converts to at the end
    of fit), and the int4 group size."""

    method: str = "dynamic"
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in QAT_METHODS:
            raise ValueError(f"qat.method: expected one of {list(QAT_METHODS)}, got {self.method!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"qat.group_size: expected one of {list(INT4_GROUP_SIZES)}, got {self.group_size!r}")

    @classmethod
    def build(cls, options: Mapping[str, Any] | QATOptions) -> QATOptions:
        if isinstance(options, QATOptions):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"qat: expected a mapping such as {{method: dynamic}}, got {type(options).__name__}")
        unknown = sorted(set(options) - {"method", "group_size"})
        if unknown:
            raise ValueError(f"qat: unknown keys {unknown}; expected some of ['method', 'group_size']")
        return cls(**options)


def prepare_qat(model: nn.Module, options: QATOptions) -> list[str]:
    """Swap the linears a method quantizes for torchao's ``FakeQuantizedLinear`` (in place); their names."""
    require_torchao("qat (quantization-aware training)")
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = (
        IntxFakeQuantizeConfig(torch.int4, group_size=options.group_size, is_symmetric=False)
        if options.method == "int4-weight"
        else IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    )
    # torchao fake-quantizes per-token activations asymmetrically only; the converted model uses the same mapping
    activation = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    config = QATConfig(activation_config=activation if options.method == "dynamic" else None, weight_config=weight)
    names = quantizable(model, options.group_size if options.method == "int4-weight" else None)
    quantize_(model, config, filter_fn=_filter(names))
    return names


def fake_quantized(model: nn.Module) -> list[str]:
    """Names of the modules that fake-quantize (QAT's prepared linears)."""
    return [name for name, module in model.named_modules() if type(module).__name__ == "FakeQuantizedLinear"]


def convert_qat(model: MultimodalTransformer, options: QATOptions) -> MultimodalTransformer:
    """End of QAT: the fake quantizers go (torchao's convert step) and the method is applied for real."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    quantize_(model, QATConfig(step="convert"), filter_fn=_filter(fake_quantized(model)))
    mapping = "asymmetric" if options.method == "dynamic" else "symmetric"
    return quantize(model, options.method, group_size=options.group_size, act_mapping=mapping)
