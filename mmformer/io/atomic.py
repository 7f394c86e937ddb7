"""Atomic file writes: a temporary file beside the target, fsynced, then renamed over it — a reader never sees a
half-written file, and a failed write leaves the previous file intact. Files get the mode a plain ``open`` would
give (0666 less the umask), not ``mkstemp``'s private 0600."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


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
    """Delete the folders beside ``target`` that saves of processes no longer running left (killed by SIGTERM or
    SIGKILL, which skip the clean-up): every unfinished ``.NAME.PID.tmp-*``, and a previous version
    ``.NAME.PID.old-*`` where ``target`` exists — where it does not, the writer died between its two renames and that
    folder is the only copy of the previous version, which is kept."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.(tmp|old)-")
    for candidate in target.parent.iterdir():
        match = pattern.match(candidate.name)
        if not match or not candidate.is_dir() or int(match[1]) == os.getpid() or pid_alive(int(match[1])):
            continue
        if match[2] == "tmp" or target.exists():
            shutil.rmtree(candidate, ignore_errors=True)


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
    durable; a failed write leaves the previous file and no temporary one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
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
