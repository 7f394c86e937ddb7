"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it — a reader never sees a
half-written file, and a failed write leaves the previous file intact. Files get the mode a plain ``open`` would
give (0666 less the umask), not ``mkstemp``'s private 0600.

Every writer of mmformer's files reports a failed write (a full disk, a file size limit, a quota) the same way, as a
:class:`WriteError` (an ``OSError``) naming the file and the OS's reason: :func:`writing` turns what the writers raise
(a bare ``OSError`` without the file's name, safetensors' ``SafetensorError``, torch's ``RuntimeError`` from its
zip writer) into one; :func:`save_safetensors` and :func:`write_bytes_atomic` write through it.

Temporary names copy the target's (``.NAME.…``), cut where that would pass the file system's limit on a name
(:func:`name_max`): the target's first characters then ``~`` and a hash of its whole name (:func:`copied_name`). A name
that is itself too long is refused before anything is written (:func:`check_name`).

Identical inputs give byte-identical safetensors files: safetensors writes the metadata in a random order (a Rust
``HashMap``), which :func:`ordered_header` sorts."""

from __future__ import annotations

import contextlib
import errno
import hashlib
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
    """``safetensors.torch.save_file`` writing the same bytes for the same tensors and metadata (the metadata's keys
    sorted: :func:`ordered_header`) and reporting a failed write as a :class:`WriteError` (safetensors raises its own
    ``SafetensorError``, which is no ``OSError``). Every safetensors file mmformer writes goes through here, or through
    :func:`safetensors_bytes` where the file is written from memory."""
    import safetensors.torch

    with writing(path):
        safetensors.torch.save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
        if metadata is not None and len(metadata) > 1:
            _order_header_in_place(Path(path))


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """``safetensors.torch.save``: a safetensors file in memory, the same bytes for the same tensors and metadata
    (:func:`ordered_header`)."""
    import safetensors.torch

    data = safetensors.torch.save(dict(tensors), metadata=None if metadata is None else dict(metadata))
    length = int.from_bytes(data[:8], "little")
    header = ordered_header(data[8 : 8 + length])
    return len(header).to_bytes(8, "little") + header + data[8 + length :]


def ordered_header(header: bytes) -> bytes:
    """A safetensors header (JSON, space-padded) with its ``__metadata__`` in sorted key order, padded to the length it
    had: every tensor's offsets (counted from the header's end) and safetensors' 8-byte alignment stay as they were.

    safetensors writes the tensors in a fixed order (by alignment, then name) but the metadata in a Rust ``HashMap``'s
    random one. The sorted header is JSON's shortest form of the same strings and integers (compact, only ``"``, ``\\``
    and control characters escaped), as safetensors' serde_json writes it, so it is never longer.

    Raises:
        ValueError: ``header`` is not JSON, or grows when written again (no safetensors header: a float's ``1E5``).
    """
    parsed = json.loads(header)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("__metadata__"), dict):
        return header
    ordered = {"__metadata__": dict(sorted(parsed["__metadata__"].items()))}
    ordered.update((key, value) for key, value in parsed.items() if key != "__metadata__")
    text = json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(text) > len(header):
        raise ValueError(f"header: expected safetensors' compact JSON, got {len(header)} bytes for {len(text)} of it")
    return text.ljust(len(header))


def _order_header_in_place(path: Path) -> None:
    """Sort the metadata of the safetensors file ``path`` in its header (:func:`ordered_header`), in place."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = f.read(length)
        ordered = ordered_header(header)
        if ordered != header:
            f.seek(8)
            f.write(ordered)


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


def name_max(folder: str | os.PathLike) -> int:
    """The longest name, in bytes, the file system of ``folder`` holds (``PC_NAME_MAX``); 255 where it does not say
    (no such folder, a platform without ``pathconf``)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255
    return limit if isinstance(limit, int) and limit > 0 else 255


def check_name(path: str | os.PathLike) -> None:
    """Refuse, before anything is written, a ``path`` whose name is longer than its folder's file system holds: a
    :class:`WriteError` naming it with the OS's reason (ENAMETOOLONG)."""
    path = Path(path)
    if len(os.fsencode(path.name)) > name_max(path.parent):
        raise WriteError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))


def copied_name(target: Path, overhead: int) -> str:
    """The part of a temporary name beside ``target`` that copies ``target``'s name, where the rest of that name takes
    ``overhead`` bytes: the whole name where the two fit in the folder's limit (:func:`name_max`); otherwise its
    first characters then ``~`` and 8 hex digits of its name's SHA-1, so that the temporary names of two long names
    that begin alike differ."""
    room = name_max(target.parent) - overhead
    encoded = os.fsencode(target.name)
    if len(encoded) <= room:
        return target.name
    mark = "~" + hashlib.sha1(encoded).hexdigest()[:8]
    cut = target.name
    while cut and len(os.fsencode(cut)) > room - len(mark):
        cut = cut[:-1]
    return cut + mark


# the most characters a caller puts after a staging_prefix (mkdtemp's 8, a uuid's first 12 hex digits)
STAGING_TAIL = 12


def _staging_name(target: Path, pid: int | str, kind: str) -> str:
    """The copy of ``target``'s name in ``.NAME.PID.KIND-`` + :data:`STAGING_TAIL` characters."""
    return copied_name(target, len(f"..{pid}.{kind}-") + STAGING_TAIL)


def staging_prefix(target: Path, kind: str) -> str:
    """The name prefix of a folder a save of ``target`` builds beside it (``kind`` ``"tmp"``: the new version being
    written; ``"old"``: the previous version moved aside for the swap): ``.NAME.PID.KIND-``, so that a later save can
    tell a killed writer's folders (:func:`remove_stale_staging`) from those of a save still running. NAME is cut
    (:func:`copied_name`) so that up to :data:`STAGING_TAIL` more characters fit in the file system's limit; a
    ``target`` whose own name does not fit is refused (:func:`check_name`)."""
    check_name(target)
    return f".{_staging_name(target, os.getpid(), kind)}.{os.getpid()}.{kind}-"


# a staging entry: .NAME.PID.tmp (a checkpoint's partial file), .NAME.PID.tmp-* or .NAME.PID.old-* (the tail after
# "-" holds no dot, so the last ".PID.KIND" is the one)
_STAGING = re.compile(r"\.(.+)\.(\d+)\.(tmp|old)(-|\Z)", re.DOTALL)


def remove_stale_staging(target: Path) -> None:
    """Delete what writes of ``target`` by processes no longer running left beside it (killed by SIGTERM or SIGKILL,
    which skip the clean-up): a checkpoint's partial file ``.NAME.PID.tmp``, a save's unfinished folder
    ``.NAME.PID.tmp-*``, and a previous version ``.NAME.PID.old-*`` where ``target`` exists — where it does not, the
    writer died between its two renames and that folder is the only copy of the previous version, which is kept.
    NAME is ``target``'s name, or the cut copy of it :func:`staging_prefix` gave that writer."""
    for candidate in target.parent.iterdir():
        match = _STAGING.match(candidate.name)
        if not match or (match[1] != target.name and match[1] != _staging_name(target, match[2], match[3])):
            continue
        if int(match[2]) == os.getpid() or pid_alive(int(match[2])):
            continue
        if candidate.is_dir() and (match[3] == "tmp" or target.exists()):
            shutil.rmtree(candidate, ignore_errors=True)
        elif candidate.is_file() and match[3] == "tmp":
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
    ``path``, as does a name too long for the file system (before anything is written). The temporary file is
    ``.NAME.XXXXXXXX.tmp``, NAME cut to fit (:func:`copied_name`)."""
    path = Path(path)
    check_name(path)
    overhead = len("..XXXXXXXX.tmp")  # mkstemp's 8 random characters between prefix and suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{copied_name(path, overhead)}.", suffix=".tmp")
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
