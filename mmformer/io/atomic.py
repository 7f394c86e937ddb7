"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it — a reader never sees a
half-written file, and a failed write leaves the previous file intact. Files get the mode a plain ``open`` would
give (0666 less the umask), not ``mkstemp``'s private 0600.

Every writer of mmformer's files reports a failed write (a full disk, a file size limit, a quota) the same way, as a
:class:`WriteError` (an ``OSError``) naming the file and the OS's reason: :func:`writing` turns what the writers raise
(a bare ``OSError`` without the file's name, safetensors' ``SafetensorError``, torch's ``RuntimeError`` from its
zip writer) into one; :func:`save_safetensors` and :func:`write_bytes_atomic` write through it."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

# the reason given where a writer hides the OS's: torch's zip writer reports a short write as
# "[enforce fail at inline_container.cc:...] unexpected pos ..." (the OSError behind it only when it wrote to a Python
# file object), or "basic_ios::clear: iostream error" writing to a path
UNKNOWN_REASON = "disk full or file size limit"
_TORCH_WRITER_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "iostream error", "file write failed")


class WriteError(OSError):
    """A file could not be written: ``filename`` names it, ``strerror`` gives the OS's reason and ``errno`` its
    number (None where the writer did not tell it)."""

    def __str__(self) -> str:
        code = errno.errorcode.get(self.errno) if isinstance(self.errno, int) else None
        return f"could not write {self.filename}: {self.strerror}" + (f" ({code})" if code else "")


def write_error(path: str | os.PathLike, error: BaseException) -> WriteError | None:
    """The :class:`WriteError` for ``error`` raised while writing ``path``: an ``OSError`` without a file name (what
    ``write`` and ``flush`` raise), a ``SafetensorError`` of an I/O error (its "os error N" read back into an errno),
    torch's ``RuntimeError`` of a failed write (the ``OSError`` it chains, or :data:`UNKNOWN_REASON`); None for any
    other error, which is the writer's own (a bad argument) and goes on as it is."""
    if isinstance(error, OSError):
        return None if error.filename is not None else WriteError(error.errno, error.strerror or str(error), str(path))
    message = str(error)
    if isinstance(error, SafetensorError) and "I/O error" in message:
        found = re.search(r"\(os error (\d+)\)", message)
        if found:
            return WriteError(int(found[1]), os.strerror(int(found[1])), str(path))
        return WriteError(None, message.split("I/O error:", 1)[1].strip() or UNKNOWN_REASON, str(path))
    if isinstance(error, RuntimeError) and any(marker in message for marker in _TORCH_WRITER_FAILURES):
        cause = error.__cause__ or error.__context__
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None and cause.errno is not None:
            return WriteError(cause.errno, cause.strerror or os.strerror(cause.errno), str(path))
        return WriteError(None, UNKNOWN_REASON, str(path))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """``with writing(path): <write path>``: a failed write raises a :class:`WriteError` naming ``path`` and the OS's
    reason (:func:`write_error`), chained to the writer's own error; other errors pass unchanged."""
    try:
        yield
    except Exception as e:
        failure = write_error(path, e)
        if failure is None:
            raise
        raise failure from e


def save_safetensors(
    tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` reporting a failed write as a :class:`WriteError` (safetensors raises its own
    ``SafetensorError``, which is no ``OSError``). Every safetensors file mmformer writes goes through here."""
    import safetensors.torch

    with writing(path):
        safetensors.torch.save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))


def write_json(path: str | os.PathLike, value: Any) -> None:
    """``value`` as indented JSON in ``path`` (a file of a folder being saved: the folder's swap makes it atomic), a
    failed write raising a :class:`WriteError` naming it."""
    with writing(path):
        Path(path).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def umask_mode(base: int = 0o666) -> int:
    """The mode ``open`` (``base`` 0o666) or ``mkdir`` (0o777) would give a new file or folder: ``base`` less the
    process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_prefix(target: Path, kind: str) -> str:
    """The name prefix of a folder a save of ``target`` builds beside it (``kind`` ``"tmp"``: the new version being
    written; ``"old"``: the previous version moved aside for the swap): ``.NAME.PID.KIND-``, so that a later save can
    tell a killed writer's folders (:func:`remove_stale_staging`) from those of a save still running."""
    return f".{target.name}.{os.getpid()}.{kind}-"


def remove_stale_staging(target: Path) -> None:
    """Delete what writes of ``target`` by processes no longer running left beside it (killed by SIGTERM or SIGKILL,
    which skip the clean-up): a checkpoint's partial file ``.NAME.PID.tmp``, a save's unfinished folder
    ``.NAME.PID.tmp-*``, and a previous version ``.NAME.PID.old-*`` where ``target`` exists — where it does not, the
    writer died between its two renames and that folder is the only copy of the previous version, which is kept."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.(tmp|old)(-|$)")
    for candidate in target.parent.iterdir():
        match = pattern.match(candidate.name)
        if not match or int(match[1]) == os.getpid() or pid_alive(int(match[1])):
            continue
        if candidate.is_dir() and (match[2] == "tmp" or target.exists()):
            shutil.rmtree(candidate, ignore_errors=True)
        elif candidate.is_file() and match[2] == "tmp":
            candidate.unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries (a rename in it), to disk, so that a crash right after a rename cannot
    leave an empty or missing file. A no-op where the platform cannot open or fsync it (folders, on some)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsynced, renamed over it, the rename made
    durable; a failed write leaves the previous file and no temporary one, and raises a :class:`WriteError` naming
    ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` as UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))
