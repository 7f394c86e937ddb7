"""Reading back a ``torch.export`` program (``.pt2``) that :func:`mmformer.ship.export.export` wrote, safely:
``torch.export.load`` unpickles some payloads with torch's full unpickler, so an archive is checked first
(:func:`check_program_payloads`) and refused where loading it would run a pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    """A ``.pt2`` program written by :func:`~mmformer.ship.export.export` (``torch.export.load``), once
    :func:`check_program_payloads` has found nothing in it that loading would unpickle unsafely.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a ``.pt2`` archive, or one with a payload that only an unsafe unpickler reads.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no .pt2 program at {path}")
    check_program_payloads(path)
    return torch.export.load(str(path))


def check_program_payloads(path: Path) -> None:
    """Refuse a ``.pt2`` archive whose loading would run a pickle: ``torch.export.load`` reads weights and constants
    that the archive marks as pickled with torch's full (unsafe) unpickler, custom and opaque objects with
    ``pickle``, and falls back to the full unpickler where a pickled artifact (the sample inputs, a legacy constants
    file) fails the safe one — any of which runs code a crafted file holds. The programs
    :func:`~mmformer.ship.export.export` writes hold raw tensors only (weights, tensor constants, sample inputs the
    safe unpickler reads)."""
    import io
    import zipfile

    from torch.export.pt2_archive import constants as pt2

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"path: {path} is not a .pt2 archive ({e})") from None
    with archive:
        for name in archive.namelist():
            inner = name.split("/", 1)[-1]  # below the archive's top folder
            if not inner.startswith(("data/", pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)):
                continue
            if inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and inner.endswith("_config.json"):
                entries = json.loads(archive.read(name)).get("config", {})
                for fqn, meta in entries.items():
                    raw = not meta.get("use_pickle") and (
                        inner.startswith(pt2.WEIGHTS_DIR)
                        or str(meta.get("path_name", "")).startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
                    )
                    if not raw:
                        raise ValueError(f"path: {path} holds {fqn!r} as a pickled object ({inner}), which loading "
                                         "would unpickle unsafely; refused (export the model again with mmformer "
                                         "export)")  # fmt: skip
            elif inner.endswith(".pt"):  # a pickled artifact: the sample inputs, or a legacy constants file
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as e:  # whatever the safe unpickler refuses, torch would retry unsafely
                    raise ValueError(f"path: {path}: {inner} is not readable by the safe unpickler "
                                     f"({type(e).__name__}); refused") from None  # fmt: skip
