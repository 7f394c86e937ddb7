"""Helpers for tests that resolve models by name without a network: a Hugging Face Hub cache built on disk from
locally created random-weight models, and a guard that fails a test which opens a socket.

Import the fixtures into a test module (``from hub_helpers import hf_cache, no_network``) to use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest


class NetworkUsed(AssertionError):
    """A test tried to reach the network."""


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if anything in the test opens a network connection (or looks up a host name)."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise NetworkUsed(f"a test opened a network connection: {args[:2]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts
    assert not attempts, f"network used: {attempts}"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, selected through ``HF_HUB_CACHE``, in offline mode (``HF_HUB_OFFLINE=1``)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return cache


def put_in_cache(cache: Path, repo_id: str, folder: Path, *, revision: str = "main", commit: str | None = None) -> str:
    """Store ``folder``'s files as ``repo_id`` at ``revision`` in the cache layout ``huggingface_hub`` writes:
    ``models--org--name/blobs/<hash>``, ``snapshots/<commit>/<file>`` linking to the blob, ``refs/<revision>``
    holding the commit. Returns the commit hash."""
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(file.relative_to(folder).parts) + 1)) / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


# ---------------------------------------------------------------------------------------------------- reads
_OPENED: list[str] | None = None  # config.json files opened while a test counts (None: not counting)


def _count_opens(event: str, args: tuple) -> None:
    path = args[0] if event == "open" and _OPENED is not None else None
    if isinstance(path, (str, bytes, os.PathLike)) and os.path.basename(os.fsdecode(path)) == "config.json":
        _OPENED.append(os.fsdecode(path))


sys.addaudithook(_count_opens)  # every open(), Path.read_text and os.open in this process raises "open"


@contextlib.contextmanager
def config_reads():
    """The config.json files opened (by any means) while the block runs."""
    global _OPENED
    _OPENED = opened = []
    try:
        yield opened
    finally:
        _OPENED = None
