"""Input checks shared by the embedders and the decoder, so that a bad argument fails with its name."""

from __future__ import annotations

import torch


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
