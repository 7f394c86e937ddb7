"""Checkpoints that survive a kill, and a resumed run that continues exactly where the interrupted one stopped.

- :class:`AtomicCheckpointIO` writes every checkpoint (``last.ckpt`` included) to a temporary file in the same
  folder, flushes it to disk and renames it over the target (``os.replace``, atomic on POSIX and Windows): a run
  killed at any moment leaves either the previous complete checkpoint or the new complete one, never a truncated
  file. Lightning's own writer goes through an fsspec transaction whose temporary file lives in the system temp
  folder, so on another file system its "rename" is a copy that a kill can cut short.
- :class:`RandomStateCallback` stores the random generators' states (torch CPU and CUDA, Python, NumPy) in each
  checkpoint and puts them back when a resumed run starts training, so that dropout, drop-path and anything else
  drawing from the global generators draw what the uninterrupted run drew. (Lightning saves the model, optimizer,
  schedulers, loops and the data loader's position — see :class:`~mmformer.data.datamodule.ResumableLoader` —
  but not the generators.)

``mmformer fit`` installs both (see :mod:`mmformer.cli.training`); with a plain ``Trainer`` pass
``plugins=[AtomicCheckpointIO()]`` and ``callbacks=[RandomStateCallback()]``.

- :func:`lock_folders` keeps a second run from writing into the folders of one still running: ``mmformer fit``
  holds an exclusive lock on its checkpoint folders and log folder while it trains (two runs sharing a folder
  would overwrite each other's ``last.ckpt`` and ``config.yaml``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.load import _METADATA_FILENAME

from mmformer.io.atomic import fsync_path, remove_stale_staging, writing


def _is_local(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def refuse_sharded_folder(path: str | Path) -> None:
    """Refuse a checkpoint folder where a single checkpoint file is read (resuming or validating without FSDP): name
    the folder and the two ways on. Lightning's own reader fails with a bare ``IsADirectoryError``.

    Raises:
        IsADirectoryError: ``path`` is a folder.
    """
    path = Path(path)
    if not path.is_dir():
        return
    if (path / _METADATA_FILENAME).is_file() or (path / ".metadata").is_file():
        raise IsADirectoryError(
            f"ckpt_path: {path} is a sharded checkpoint folder (each rank's shards, written under --trainer.strategy "
            "fsdp), which only an FSDP run reads; resume or validate with --trainer.strategy fsdp, or consolidate it "
            f"into one model folder with `mmformer export --ckpt {path} --out DIR` and start from that "
            "(--model.adapt.init_from DIR: the weights, without the optimizer state)"
        )
    raise IsADirectoryError(f"ckpt_path: expected a checkpoint file (.ckpt), got the folder {path}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with crash-safe writes of local checkpoints.

    The checkpoint is written to ``.NAME.PID.tmp`` next to its target, fsynced, renamed onto the target and the
    folder entry fsynced; a write that fails leaves the previous file untouched and raises a
    :class:`~mmformer.io.atomic.WriteError` (an ``OSError``) naming the checkpoint and the OS's reason (torch's own
    error, "[enforce fail at inline_container.cc] unexpected pos", names neither). Temporary files of writers that
    no longer run (killed mid-write) are removed at the next write of the same target. Remote paths (``s3://``
    etc.) go to Lightning's writer unchanged. Loading is Lightning's (``torch.load(weights_only=True)`` by
    default, so a checkpoint cannot run code).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with writing(target), open(partial, "wb") as f:  # a full disk: a WriteError naming the checkpoint
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_path(target.parent)  # make the rename durable

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None
    ) -> Any:
        if _is_local(path):
            refuse_sharded_folder(str(path).removeprefix("file://"))  # Lightning's reader: a bare IsADirectoryError
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


class FolderInUseError(RuntimeError):
    """Another process holds a folder's lock (:func:`lock_folders`)."""


def lock_path(folder: Path) -> Path:
    """The lock file of ``folder``: beside it, so that the folder stays as the run writes it (Lightning warns about a
    checkpoint folder that is not empty, and a logger about a version folder that exists). It is left there when
    released: removing it would let two runs lock two files of one name."""
    return folder.parent / f".{folder.name}.mmformer-fit.lock"


def lock_folders(folders: list[str | os.PathLike], what: str) -> list[Any]:
    """Lock each local folder for this process: an exclusive ``flock`` on its :func:`lock_path`, which the OS drops
    when the returned handles are closed or the process ends, killed or not. Raises :class:`FolderInUseError`
    naming the folder and the process holding it. Remote paths (``s3://``) and systems without ``fcntl`` are not
    locked."""
    try:
        import fcntl
    except ImportError:  # Windows
        return []
    handles: list[Any] = []
    for folder in dict.fromkeys(Path(f).resolve() for f in folders if _is_local(f)):
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path(folder), "a+")  # noqa: SIM115 - held open until release_folders
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            release_folders([handle, *handles])
            raise FolderInUseError(f"{what} {str(folder)!r}: {owner} is writing there now; give this run another "
                                   "folder or wait for that one to end") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"mmformer fit (pid {os.getpid()})")
        handle.flush()
        handles.append(handle)
    return handles


def release_folders(handles: list[Any]) -> None:
    for handle in handles:
        handle.close()


class RandomStateCallback(L.Callback):
    """Saves the global random generators' states in checkpoints; a resumed run restores them when training starts.

    They are restored in ``on_train_start`` rather than at load time: between loading and the first training
    batch Lightning runs the sanity check and builds the data loaders, and the state must be the one the
    interrupted run had when it continued, not one those steps have drawn from. With several processes (DDP, FSDP)
    the checkpoint holds every rank's states (gathered when it is written: the ranks' generators need not agree,
    e.g. dropout after FSDP's sharded initialisation) and each rank restores its own; a run resumed on another number
    of processes gets rank 0's.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = self._local_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, state)  # every rank writes its state dict: a collective
            return {"ranks": ranks}
        return state

    @staticmethod
    def _local_state() -> dict[str, Any]:
        numpy_state = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            # plain types only (the checkpoint loads with weights_only=True)
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *map(float, numpy_state[2:])],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        if "ranks" in state:  # one state per rank of the run that wrote it
            ranks = state["ranks"]
            state = ranks[trainer.global_rank] if len(ranks) == trainer.world_size else ranks[0]
        torch.set_rng_state(state["torch"])
        random.setstate(_as_tuple(state["python"]))
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
        if "cuda" in state and torch.cuda.is_available():
            cuda = list(state["cuda"])
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
