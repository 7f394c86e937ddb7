"""Fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning.

``--trainer.strategy fsdp`` names :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` with every process
in one data-parallel mesh dimension (no tensor parallelism), on CPU (gloo) and GPU (nccl) alike — Lightning's own
``FSDPStrategy`` wraps the older FSDP1 and refuses a CPU accelerator. The task's ``configure_model`` calls
:func:`shard` on the mesh this strategy builds:

- one FSDP unit per transformer block (its parameters are gathered for its forward and backward only), and the
  root unit (embedders, norms, heads, projections) over the whole model;
- FSDP2 refuses 0-d parameters, so the model's scalars (``logit_scale``, ``logit_bias``) become ``(1,)``-shaped
  before sharding, as open_clip does around ``fully_shard``; loading accepts either shape for them
  (``weights.same_shape``), so checkpoints of sharded training load into an unsharded model and back;
- a mixed-precision policy (``param_dtype: bfloat16`` with float32 gradient reductions), and
  ``StackConfig.gradient_checkpointing`` for activation checkpointing per block (it works with and without FSDP).

Lightning saves each rank's shards as a distributed checkpoint (a ``.ckpt`` folder); ``load_pretrained`` and
``mmformer export --ckpt FOLDER`` consolidate it in one process (``training_checkpoints.read_distributed``).
"""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from mmformer.io.atomic import fsync_path
from mmformer.io.pretrained import swap_in
from mmformer.io.training_checkpoints import read_torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process of every node: a 1-D data-parallel mesh, the task shards its model itself.

    Args:
        param_dtype: the dtype parameters are gathered in for compute (``bfloat16`` for mixed precision); None keeps
            their own dtype.
        reduce_dtype: the dtype gradients are reduced (averaged across processes) in.
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3, less memory) or
            keep them for the backward (ZeRO-2, less communication).
        save_distributed_checkpoint: each rank writes its own shards (a folder) instead of one gathered file.
    """

    def __init__(
        self,
        param_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        reduce_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ):
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name}: expected one of {sorted(DTYPES)} or None, got {value!r}")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout or timedelta(minutes=30),
        )
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # every process is one data-parallel replica: ModelParallelStrategy's "auto" would give one per node
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Each rank writes its shards into a staging folder beside the target; once all have, rank 0 swaps it in
        (``pretrained.swap_in``): a run killed while writing leaves the previous checkpoint whole."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        staging = target.parent / self.broadcast(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        if self.global_rank == 0:
            for stale in target.parent.glob(f".{target.name}.tmp-*"):  # a killed run's partial folder
                shutil.rmtree(stale, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            swap_in(staging, target)
            fsync_path(target.parent)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded folder loads as Lightning loads it. A single file (a single-process or DDP run's) loads as
        Lightning's ``ModelParallelStrategy`` loads one (every rank reads it, the full tensors are broadcast from rank
        0 and sharded), with the model's scalars and their optimizer state reshaped from the file's ``()`` to the
        sharded model's ``(1,)`` (:func:`vectorize_scalars`): Lightning's loader refuses the 0-d tensors ("size
        mismatch for logit_scale"), and an optimizer state left 0-d would not match its sharded parameter."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not path.is_file():
            return super().load_checkpoint(path, weights_only=weights_only)
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        checkpoint = read_torch(path)  # weights only, whatever the caller asks: a checkpoint never runs code
        module, strict = self.model, self.lightning_module.strict_loading
        scalars = {name for name, param in module.named_parameters() if tuple(param.shape) == (1,)}
        state_dict = {k: _vector(v) if k in scalars else v for k, v in checkpoint.pop("state_dict").items()}
        _load_raw_module_state(state_dict, module, strict=strict)
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        for optimizer, saved in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            saved = _by_name(saved, optimizer, module)
            for name in scalars & saved["state"].keys():  # AdamW's moments, SGD's momentum of a scalar: (1,) too
                saved["state"][name] = {k: v if k == "step" else _vector(v) for k, v in saved["state"][name].items()}
            set_optimizer_state_dict(module, optimizer, optim_state_dict=saved, options=options)
        return checkpoint

    def mixed_precision(self) -> Any:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param = DTYPES[self.param_dtype] if self.param_dtype else None
        return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=DTYPES[self.reduce_dtype])


def strategy_from_name(strategy: Any) -> Any:
    """``"fsdp"`` (and ``"fsdp2"``) → :class:`FSDP2Strategy`; anything else unchanged."""
    if isinstance(strategy, str) and strategy.lower() in ("fsdp", "fsdp2"):
        return FSDP2Strategy()
    return strategy


def _vector(value: Any) -> Any:
    """A 0-d tensor as ``(1,)``; anything else as it is."""
    return value.reshape(1) if torch.is_tensor(value) and value.ndim == 0 else value


def _by_name(saved: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
    """A plain ``optimizer.state_dict()`` (parameters numbered in the order of its groups) keyed by parameter name,
    as ``set_optimizer_state_dict`` reads a full one. The numbers are matched to ``optimizer``'s own groups, which the
    same configuration builds alike; Lightning's re-keying numbers ``module.named_parameters()`` instead, and gave
    each parameter another's state where the groups order them otherwise (weight decay or not)."""
    if not all(isinstance(i, int) for g in saved["param_groups"] for i in g["params"]):
        return saved  # keyed by name already (written under FSDP as one file)
    names = {id(param): name for name, param in module.named_parameters()}
    groups = optimizer.param_groups
    sizes = [len(g["params"]) for g in saved["param_groups"]], [len(g["params"]) for g in groups]
    if sizes[0] != sizes[1]:
        raise ValueError(
            f"ckpt_path: the checkpoint's optimizer has parameter groups of {sizes[0]} parameters, this run's "
            f"{sizes[1]}; resume with the model and optimizer configuration the run was trained with"
        )
    number = {
        i: names[id(p)] for g, own in zip(saved["param_groups"], groups) for i, p in zip(g["params"], own["params"])
    }
    return {
        "state": {number[i]: values for i, values in saved["state"].items()},
        "param_groups": [{**g, "params": [number[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


def vectorize_scalars(module: nn.Module) -> list[str]:
    """Replace every 0-d parameter by a ``(1,)``-shaped one holding the same value (FSDP2 shards along dim 0 and
    refuses scalars). Broadcasting keeps every use the same. Returns the parameters' names."""
    names = []
    for owner_name, owner in module.named_modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param is not None and param.ndim == 0:
                setattr(owner, name, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
                names.append(f"{owner_name}.{name}" if owner_name else name)
    return names


# The model's entry points the task calls instead of forward(). FSDP2 gathers the root unit's parameters (embedders,
# norms, heads, scalars) only around forward() unless a method is registered as a forward; a registered method that
# calls another (encode_text → encode_text_tokens) must not run FSDP's hooks twice (the inner exit would reshard), so
# only the outermost registered call of a step's call chain runs them (:func:`_register_outermost`). The root keeps
# its parameters gathered after a forward until the backward (FSDP2's default for the root), so what the task reads
# between calls (logit_scale, the CTC head) is gathered too.
FORWARD_METHODS = (
    "encode_image_tokens",
    "encode_audio_tokens",
    "encode_audio_documents",
    "encode_text_tokens",
    "encode_image",
    "encode_audio",
    "encode_text",
    "pool_image",
    "pool_audio",
    "pool_text",
    "mlm_logits",
    "decode",
    "decode_step",
)


def _register_outermost(model: nn.Module, names: tuple[str, ...]) -> None:
    """Register ``names`` as FSDP forward methods of ``model``; calls nested in one of them run the plain method."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    depth = [0]  # registered calls in progress on this model

    def outermost(plain: Any, with_hooks: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return plain(*args, **kwargs)
            depth[0] += 1
            try:
                return with_hooks(*args, **kwargs)
            finally:
                depth[0] -= 1

        return call

    for name in names:
        plain = getattr(model, name)
        register_fsdp_forward_method(model, name)  # sets an instance attribute that runs FSDP's hooks
        setattr(model, name, outermost(plain, getattr(model, name)))


def shard(model: nn.Module, mesh: Any, strategy: FSDP2Strategy) -> None:
    """Apply FSDP2 to ``model``: one unit per transformer block, then the root. Idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    vectorize_scalars(model)
    options = dict(mesh=mesh, mp_policy=strategy.mixed_precision())
    for stack in model.stacks.values():
        for block in stack.blocks:
            fully_shard(block, reshard_after_forward=strategy.reshard_after_forward, **options)
    fully_shard(model, **options)  # the root keeps its parameters gathered from forward to backward (FSDP2's default)
    _register_outermost(model, FORWARD_METHODS)
