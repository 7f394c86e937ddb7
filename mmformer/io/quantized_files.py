"""torchao-quantized weights as files: the ``quantization_config`` record and the safetensors layout that stores a
quantized model's tensor subclasses as plain tensors plus JSON, never pickled. :mod:`mmformer.io.pretrained` writes and
reads it, :mod:`mmformer.compress.quantization` (which quantizes models) produces it; it lives below both, with the
files.

Files, following Hugging Face's torchao integration and torchao's own safetensors support: ``config.json`` gains
``quantization_config`` (``{"quant_method": "torchao", "method": ..., ...}``); ``model.safetensors`` holds each
quantized tensor's parts (``…qkv._weight_qdata``, ``…qkv._weight_scale``, …) and, in its metadata, the JSON that
rebuilds the tensor subclass (``tensor_names`` and one record per tensor: ``_type``, ``_data``,
``_tensor_data_names``). Loading reads that header, rebuilds the tensors on the meta device to learn their shapes,
checks them against the model built on the meta device (:mod:`mmformer.io.weights`) before anything is allocated, then
reads the parts and assigns the rebuilt tensors. Only the tensor classes listed in :data:`TENSOR_CLASSES` are
rebuilt (torchao's allow-list plus the CPU int4 tensor); nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from mmformer.io.weights import TensorSpec, is_plain_tensor, listed

if TYPE_CHECKING:
    from mmformer.io.pretrained import Checkpoint

METHODS = ("dynamic", "int8-weight", "int4-weight", "static")
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
