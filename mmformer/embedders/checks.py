"""Input checks shared by the embedders and the decoder, so that a bad argument fails with its name."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmformer.layers.cache import KVCache
    from mmformer.layers.documents import Documents


def check_device(name: str, x: torch.Tensor, reference: torch.Tensor) -> None:
    """Raise ValueError naming ``name`` unless ``x`` is on the device of ``reference`` (a model parameter).

    Without this, a model on one device and inputs on another fail inside a convolution or a matmul with a message
    that names neither the argument nor the fix.
    """
    if x.device != reference.device:
        raise ValueError(
            f"{name}: expected a tensor on the model's device ({reference.device}), got one on {x.device}; move the "
            f"inputs with .to({str(reference.device)!r}) (or the model to theirs)"
        )


def check_lengths(name: str, lengths: object, batch: int, most: int, reference: torch.Tensor) -> torch.Tensor:
    """Per-row lengths as an integer tensor of shape (batch,) with values in [1, most], or a clear error (the values
    are not checked while tracing, as in :func:`check_token_ids`)."""
    if not isinstance(lengths, torch.Tensor):
        try:
            lengths = torch.as_tensor(lengths, device=reference.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: expected an integer tensor ({batch},), got {type(lengths).__name__}") from e
    if lengths.device.type == "meta":
        check_device(name, lengths, reference)  # a meta tensor holds no counts to move
    lengths = lengths.to(reference.device)  # small metadata: moved, as a list would be
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer counts, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), one per row; got {tuple(lengths.shape)}")
    if not torch.compiler.is_compiling() and (bool((lengths < 1).any()) or bool((lengths > most).any())):
        raise ValueError(f"{name}: expected values in [1, {most}], got {lengths.tolist()}")
    return lengths


def check_token_ids(name: str, ids: torch.Tensor, n: int, *, what: str = "token ids", note: str = "") -> None:
    """Raise ValueError naming ``name`` unless every id is in [0, n) (an embedding lookup past the table crashes
    inside the kernel, or on CUDA reads garbage). Skipped while tracing (torch.compile, torch.export): a graph holds
    no values to check, and an exported graph's caller checks its inputs."""
    if torch.compiler.is_compiling():
        return
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"{name}: expected {what} in [0, {n}){note}, got min {int(ids.min())}, max {int(ids.max())}")


# ---------------------------------------------------------------------------------------------- the decoder's inputs
def check_memory(
    memory: torch.Tensor | None,
    memory_mask: torch.Tensor | None,
    rows: int,
    width: int,
    reference: torch.Tensor,
    cache: KVCache | None = None,
) -> None:
    """The encoder token states (B, S, D) a decoder of ``rows`` id rows reads — or (B / G, S, D) shared by each group
    of G consecutive rows (beams) — their (B, S) mask, and a cache made for ``rows``."""
    if cache is not None and cache.batch_size != rows:
        raise ValueError(f"cache: expected one made for batch size {rows} (input_ids), got {cache.batch_size}")
    if memory is None:
        return
    if (
        not isinstance(memory, torch.Tensor)
        or memory.ndim != 3
        or memory.shape[2] != width
        or memory.shape[0] == 0
        or rows % memory.shape[0]
    ):
        got = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
        raise ValueError(
            f"memory: expected encoder token states (B={rows}, S, D={width}), or (B / G, S, D) shared by each group "
            f"of G consecutive rows (beams), got {got}"
        )
    if not memory.is_floating_point():
        raise TypeError(f"memory: expected float encoder token states, got {memory.dtype}")
    check_device("memory", memory, reference)
    if memory_mask is not None and tuple(memory_mask.shape) != tuple(memory.shape[:2]):
        raise ValueError(
            f"memory_mask: expected shape {tuple(memory.shape[:2])} (B, S) of memory, got {tuple(memory_mask.shape)}"
        )
    if memory_mask is not None:
        check_device("memory_mask", memory_mask, reference)


def check_packed_memory(
    memory: torch.Tensor | None,
    memory_documents: Documents | None,
    documents: Documents,
    cache: KVCache | None,
    width: int,
) -> None:
    """The memory of packed (padding-free) documents: one row per document, or packed itself (1, M, D) with its own
    documents tiling it; packed batches are decoded without a cache."""
    if cache is not None:
        raise ValueError("documents: packed batches are decoded without a KV cache (teacher forcing)")
    if memory is None:
        return
    rows = 1 if memory_documents is not None else len(documents)
    shape = tuple(memory.shape) if isinstance(memory, torch.Tensor) else None
    if shape is None or len(shape) != 3 or shape[0] != rows or shape[2] != width:
        got = tuple(memory.shape) if isinstance(memory, torch.Tensor) else type(memory).__name__
        what = "a packed memory (1, M, D)" if memory_documents is not None else "one memory row per document"
        raise ValueError(f"memory: expected {what} with D={width} for {len(documents)} documents, got {got}")
    if memory_documents is not None and memory_documents.tokens != memory.shape[1]:
        raise ValueError(
            f"memory_documents: expected documents tiling the memory's {memory.shape[1]} tokens, got "
            f"{memory_documents.tokens}"
        )


def check_positions(positions: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Per-token position ids of the shape of ``input_ids``, integers >= 0."""
    if not isinstance(positions, torch.Tensor) or positions.shape != input_ids.shape:
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(
            f"positions: expected position ids of the shape of input_ids {tuple(input_ids.shape)}, got {got}"
        )
    if positions.is_floating_point() or positions.dtype == torch.bool or bool((positions < 0).any()):
        raise ValueError(f"positions: expected integer position ids >= 0, got {positions.dtype}")


def check_prefix(prefix: torch.Tensor, width: int, cache: KVCache | None = None) -> None:
    """Learned decoder prefix vectors (P, D), given before the cache holds any token."""
    if not isinstance(prefix, torch.Tensor) or prefix.ndim != 2 or prefix.shape[1] != width:
        got = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else type(prefix).__name__
        raise ValueError(f"prefix_embeds: expected learned decoder prefix vectors (P, D={width}), got {got}")
    if cache is not None and cache.length > 0:
        raise ValueError("prefix_embeds: the prefix goes before the first token; the cache already holds tokens")
