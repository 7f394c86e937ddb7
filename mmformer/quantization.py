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

Files, following Hugging Face's torchao integration and torchao's own safetensors support: ``config.json`` gains
``quantization_config`` (``{"quant_method": "torchao", "method": ..., ...}``); ``model.safetensors`` holds each
quantized tensor's parts (``…qkv._weight_qdata``, ``…qkv._weight_scale``, …) and, in its metadata, the JSON that
rebuilds the tensor subclass (``tensor_names`` and one record per tensor: ``_type``, ``_data``,
``_tensor_data_names``). Loading reads that header, rebuilds the tensors on the meta device to learn their shapes,
checks them against the model built on the meta device (:mod:`mmformer.weights`) before anything is allocated, then
reads the parts and assigns the rebuilt tensors. Only the tensor classes listed in :data:`TENSOR_CLASSES` are
rebuilt (torchao's allow-list plus the CPU int4 tensor); nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmformer.weights import TensorSpec, is_plain_tensor, listed, model_device

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer
    from mmformer.pretrained import Checkpoint

METHODS = ("dynamic", "int8-weight", "int4-weight", "static")
QAT_METHODS = ("dynamic", "int8-weight", "int4-weight")
QUANT_METHOD = "torchao"
INT4_GROUP_SIZES = (32, 64, 128)
# torchao tensor classes a quantized file may hold (rebuilt from JSON, never unpickled)
TENSOR_CLASSES = ("Int8Tensor", "Int4Tensor", "Int4TilePackedTo4dTensor", "IntxUnpackedToInt8Tensor",
                  "Int4OpaqueTensor")  # fmt: skip
_INSTALL = "pip install 'torchao>=0.18'"


def require_torchao(what: str) -> Any:
    """``import torchao``, or an ImportError that names the package and what needed it."""
    try:
        import torchao
    except ImportError as e:
        raise ImportError(f"{what} needs the `torchao` package, which is not installed: {_INSTALL}") from e
    return torchao


# ---------------------------------------------------------------------------------------------- the config
@dataclass
class QuantizationConfig:
    """How a model was quantized; stored in config.json as ``quantization_config``.

    Attributes:
        method: one of :data:`METHODS`.
        group_size: input channels per int4 group (int4-weight).
        layout: how int4 weights are packed: ``cpu`` (Int4OpaqueTensor) or ``cuda`` (tile-packed); ``plain``
            for the int8 methods.
        act_mapping: ``symmetric`` or ``asymmetric`` int8 activations (dynamic; QAT trains asymmetric ones).
        modules: the linear modules that were quantized (the others stay float).
        dtype: the float dtype of the rest of the model (and of the activations): float32, or bfloat16 where the
            kernel needs it (int4 on CUDA); loading builds the model in it.
        embeddings: the token (and segment) embedding tables are int8 too, per row (torchao's
            ``IntxWeightOnlyConfig``, as its embedding quantization does), and with them an LM head tied to them.
        float_storage: the dtype the tensors left in float (norms, biases, convolutions, position tables) are stored
            in: ``float32``, or ``bfloat16`` for a smaller file (they are rounded in memory as well, so that a
            reloaded model equals the quantized one; computation stays in ``dtype``).
        torchao_version: the torchao that wrote it.
    """

    method: str
    group_size: int = 32
    layout: str = "plain"
    act_mapping: str = "symmetric"
    modules: list[str] = field(default_factory=list)
    dtype: str = "float32"
    embeddings: bool = False
    float_storage: str = "float32"
    torchao_version: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {list(METHODS)}, got {self.method!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size: expected one of {list(INT4_GROUP_SIZES)}, got {self.group_size!r}")
        if self.layout not in ("plain", "cpu", "cuda"):
            raise ValueError(f"layout: expected 'plain', 'cpu' or 'cuda', got {self.layout!r}")
        if self.act_mapping not in ("symmetric", "asymmetric"):
            raise ValueError(f"act_mapping: expected 'symmetric' or 'asymmetric', got {self.act_mapping!r}")
        for name in ("dtype", "float_storage"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}: expected float32, bfloat16 or float16, got {getattr(self, name)!r}")
        if not isinstance(self.embeddings, bool):
            raise ValueError(f"embeddings: expected True or False, got {self.embeddings!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "quantization_config") -> QuantizationConfig:
        if not isinstance(d, Mapping) or d.get("quant_method") != QUANT_METHOD:
            got = d.get("quant_method") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(
                f"{where}: expected quant_method {QUANT_METHOD!r} (written by mmformer quantize), got {got!r}"
            )
        fields = {k: v for k, v in d.items() if k != "quant_method"}
        try:
            return cls(**fields)
        except TypeError as e:
            raise ValueError(f"{where}: not a valid quantization config ({e})") from e


# ---------------------------------------------------------------------------------------------- what gets quantized
def quantizable(model: nn.Module, group_size: int | None = None) -> list[str]:
    """Names of the linear modules a method quantizes: every ``nn.Linear`` but an LM head whose weight is the token
    embedding's (and, for int4 groups, only those whose input width the group size divides and whose output width
    the CPU packing's 16 divides)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in tied:
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
) -> MultimodalTransformer:
    """Quantize ``model`` in place (torchao's ``quantize_`` convention) and return it, in eval mode.

    Args:
        model: a float model (not quantized yet).
        method: one of :data:`METHODS`.
        calibration: batches (``pixel_values`` / ``audio`` + ``audio_lengths`` / ``input_ids`` + ``attention_mask``,
            as :func:`calibration_batches` or the data module's loaders give them) for ``static``.
        group_size: int4 group size (32, 64 or 128).
        act_mapping: dynamic activations ``symmetric`` (default) or ``asymmetric``.
        embeddings: int8 embedding tables (and a tied LM head) as well; see :class:`QuantizationConfig`.
        float_storage: store the tensors left in float as ``bfloat16`` (or ``float16``) for a smaller file.

    Raises:
        ValueError: an unknown method, a model already quantized, ``static`` without calibration batches.
        ImportError: torchao is missing.
    """
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

    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None or processor.tokenizer is None:
        raise ValueError("calibration: needs the model's processor with its tokenizer (model.processor); got None")
    routes = model.config.routes
    modalities = [m for m in ("image", "audio") if m in routes]
    try:
        dataset = open_dataset(str(manifest), format="manifest", modalities=modalities, processor=processor,
                               max_bad_fraction=1.0)  # fmt: skip
    except ValueError as e:
        raise ValueError(f"calib: {manifest}: no usable samples for this model ({e})") from e
    samples = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-sample skip warnings: the count is reported below
        for i in range(len(dataset)):
            sample = dataset[i]
            if sample is not None and "text" in sample and any(m in sample for m in modalities):
                samples.append(sample)
            if len(samples) >= max_samples:
                break
    if not samples:
        raise ValueError(
            f"calib: {manifest}: no usable samples ({len(dataset)} rows, none with readable "
            f"{' or '.join(modalities)} and text); static int8 needs calibration data the model can read"
        )
    collate = Collator(processor.tokenizer, text_max_length=model.config.text.max_length)
    return [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]


def _tower_inputs(model: MultimodalTransformer, batch: dict[str, Any]) -> Iterator[tuple[str, tuple]]:
    """(graph name, inputs) of every exported graph one calibration batch runs through: the encoders, and the
    decoder reading each encoder's states with the batch's texts (teacher forcing)."""
    from mmformer.tasks.losses import teacher_forcing

    device, routes = model_device(model), model.config.routes
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    memories = []
    if "text" in routes:
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
    if "decoder" in routes:
        dec_ids, _, _ = teacher_forcing(ids, mask)
        for states, memory_mask in memories:
            yield "decoder_model", (dec_ids, states, memory_mask)


def static_configs(model: MultimodalTransformer, calibration: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Linear module name → torchao ``Int8StaticActivationInt8WeightConfig`` with its calibrated activation scale.

    Each tower is exported (:mod:`mmformer.export`) and prepared with PT2E's ``X86InductorQuantizer`` (static:
    per-tensor affine uint8 activations behind histogram observers); the calibration batches run through the
    prepared graphs. A linear used by several towers (a shared stack) keeps the union of the ranges its observers
    chose, re-expressed as int8 (zero point - 128).
    """
    from torchao.quantization import Int8StaticActivationInt8WeightConfig, MappingType, PerRow, PerTensor
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from mmformer import export

    wanted = set(quantizable(model))
    graphs = {g.name: g for g in export.graphs(model)}
    prepared: dict[str, torch.fx.GraphModule] = {}
    ran = False
    with torch.no_grad():
        for batch in calibration:
            for name, inputs in _tower_inputs(model, batch):
                if name not in prepared:
                    g = graphs[name]
                    program = torch.export.export(g.module, tuple(g.inputs.values()),
                                                  dynamic_shapes=export._dynamic_shapes(g))  # fmt: skip
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


# ---------------------------------------------------------------------------------------------- files
def flatten_state(
    state: Mapping[str, torch.Tensor], float_storage: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict with torchao tensors → plain tensors and safetensors metadata that rebuilds them (torchao's
    ``flatten_tensor_state_dict`` layout: ``module._weight_qdata`` etc., one JSON record per tensor name); plain
    floating-point tensors are stored in ``float_storage``."""
    from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for name, tensor in state.items():
        kind = type(tensor).__name__
        if is_plain_tensor(tensor):
            tensors[name] = tensor.detach().to(float_storage) if tensor.is_floating_point() else tensor.detach()
            metadata[name] = json.dumps({"_type": "Tensor"})
            continue
        if kind not in TENSOR_CLASSES:
            raise ValueError(f"{name}: cannot save a {kind}; expected a plain tensor or one of {list(TENSOR_CLASSES)}")
        names = [n for n in [*tensor.tensor_data_names, *getattr(tensor, "optional_tensor_data_names", [])]
                 if getattr(tensor, n) is not None]  # fmt: skip
        if kind == "Int4OpaqueTensor":  # not in torchao's encoder: the same record, written here
            record = {"_type": kind, "_data": {"block_size": list(tensor.block_size), "shape": list(tensor.shape),
                                                "act_mapping_type": tensor.act_mapping_type},
                      "_tensor_data_names": names}  # fmt: skip
        else:
            record = json.loads(json.dumps(tensor, cls=TensorSubclassAttributeJSONEncoder))
        module, _, attr = name.rpartition(".")
        for part in names:
            tensors[f"{module}._{attr}_{part}"] = getattr(tensor, part).detach()
        metadata[name] = json.dumps(record)
    metadata["tensor_names"] = json.dumps(list(state))
    return tensors, metadata


def _rebuild(name: str, record: dict[str, Any], parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """One tensor from its JSON record and its parts; only :data:`TENSOR_CLASSES`."""
    kind = record["_type"]
    if kind == "Int4OpaqueTensor":
        from torchao.prototype.quantization.int4 import Int4OpaqueTensor

        data = record["_data"]
        return Int4OpaqueTensor(**parts, block_size=list(data["block_size"]), shape=torch.Size(data["shape"]),
                                act_mapping_type=data.get("act_mapping_type"))  # fmt: skip
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    return object_from_dict({**record, "_data": {**record["_data"], **parts}})


def _records(metadata: Mapping[str, str], source: object) -> dict[str, dict[str, Any]]:
    """Tensor name → its JSON record, validated (the header of an untrusted file)."""
    try:
        names = json.loads(metadata["tensor_names"])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("tensor_names is not a list of names")
        records = {name: json.loads(metadata[name]) for name in names}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{source}: quantized weights without a valid torchao header in the safetensors metadata ({e}); "
            "expected a file written by mmformer quantize / save_pretrained"
        ) from e
    for name, record in records.items():
        kind = record.get("_type") if isinstance(record, dict) else None
        if kind != "Tensor" and kind not in TENSOR_CLASSES:
            raise ValueError(
                f"{source}: {name}: tensor type {kind!r} is not one mmformer rebuilds; expected a plain tensor or "
                f"one of {list(TENSOR_CLASSES)}"
            )
        parts = record.get("_tensor_data_names", [])
        if kind != "Tensor" and (not isinstance(parts, list) or not all(isinstance(p, str) for p in parts)):
            raise ValueError(f"{source}: {name}: _tensor_data_names must be a list of names, got {parts!r}")
    return records


def _part_keys(name: str, record: dict[str, Any]) -> dict[str, str]:
    """The file keys of one tensor's parts (part → key); a plain tensor is its own part."""
    if record["_type"] == "Tensor":
        return {"": name}
    module, _, attr = name.rpartition(".")
    return {part: f"{module}._{attr}_{part}" for part in record["_tensor_data_names"]}


def open_quantized(
    checkpoint: Checkpoint, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Checkpoint:
    """A quantized checkpoint as a loader sees any other: the header of its *logical* tensors (the shapes and dtypes
    the float model has), computed from the file's header alone, and a reader that rebuilds the torchao tensors.

    Raises:
        ImportError: torchao is missing (the message names the package).
        ValueError: the quantization config or the torchao header is invalid, or the model cannot load here
            (int4 packed for another device, a dtype other than the one it was quantized in).
    """
    from dataclasses import replace

    source = checkpoint.source
    config = QuantizationConfig.from_dict(checkpoint.quantization, f"{source}: quantization_config")
    require_torchao(f"{source}: this model holds torchao-quantized weights ({config.method}); loading it")
    device = torch.device(device or "cpu")
    if config.layout == "cpu" and device.type != "cpu":
        raise ValueError(
            f"{source}: its int4 weights are packed for the CPU kernel (Int4OpaqueTensor); load it with device='cpu', "
            "or quantize the float model on the GPU"
        )
    if dtype is not None and dtype != config.torch_dtype:
        raise ValueError(
            f"dtype: a quantized model keeps the float dtype it was quantized in ({config.dtype}); got dtype={dtype}"
        )
    records = _records(checkpoint.metadata, source)
    keys = {name: _part_keys(name, record) for name, record in records.items()}
    physical = {key for parts in keys.values() for key in parts.values()}
    missing = sorted(physical - set(checkpoint.specs))
    if missing:
        raise ValueError(f"{source}: the torchao header names tensors the file lacks: {listed(missing)}")
    extra = sorted(set(checkpoint.specs) - physical)
    if extra:
        raise ValueError(f"{source}: tensors the torchao header does not describe: {listed(extra)}")

    def rebuild(names: Iterable[str], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            record, parts = records[name], keys[name]
            if record["_type"] == "Tensor":
                out[name] = tensors[name]
                continue
            try:
                out[name] = _rebuild(name, record, {part: tensors[key] for part, key in parts.items()})
            except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
                raise ValueError(f"{source}: {name}: cannot rebuild its {record['_type']} ({e})") from e
        return out

    meta = {key: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for key, spec in checkpoint.specs.items()}
    logical = {name: TensorSpec.of(t) for name, t in rebuild(records, meta).items()}

    def read(names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        tensors = checkpoint.read(sorted({key for n in names for key in keys[n].values()}))
        return rebuild(names, tensors)

    return replace(checkpoint, specs=logical, read=read, quantization=config)
