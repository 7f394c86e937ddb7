"""A write that fails (a full disk, a file size limit, a quota) is an ``OSError`` naming the file and the OS's reason,
from every writer of mmformer's files, and the commands print it as one ``mmformer CMD: error: ...`` line.

safetensors raised its own ``SafetensorError`` ("Error while serializing: I/O error: File too large (os error 27)"),
which is no ``OSError``, so ``export``, ``quantize`` and ``convert`` ended in a traceback; torch's checkpoint writer
raised ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...`` with the ``OSError`` only
chained behind it, and ``fit`` printed 78 lines. The failures below are what those libraries raise under
``ulimit -f`` (the real limit in :func:`test_the_writers_errors_under_a_real_file_size_limit`; monkeypatched
elsewhere, where a whole command runs).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from mmformer.cli.main import main
from mmformer.io.atomic import UNKNOWN_REASON, WriteError, save_safetensors, write_bytes_atomic, write_error
from mmformer.io.checkpointing import AtomicCheckpointIO

PACKAGE = Path(__file__).resolve().parents[1] / "mmformer"
SAFETENSORS_FULL = "Error while serializing: I/O error: File too large (os error 27)"  # as safetensors 0.8 says it


def safetensors_full_disk(*args, **kwargs):
    """``safetensors.torch.save_file`` on a disk that is full (under ``ulimit -f``)."""
    raise SafetensorError(SAFETENSORS_FULL)


def torch_save_full_disk(*args, **kwargs):
    """``torch.save`` into a file object on a full disk: the OSError of the short write, then the zip writer's
    RuntimeError with the OSError as its context."""
    try:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 302912 vs 302800") from None


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def hidden_entries(parent: Path) -> list[str]:
    """Staging folders or temporary files a save left beside its target (``.NAME.PID.tmp-*`` and the like)."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """``ulimit -f`` for this process: a write past ``nbytes`` fails with EFBIG (Python ignores SIGXFSZ)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_the_writers_errors_under_a_real_file_size_limit(tmp_path):
    """The real failures, under a 64 KiB file size limit: each writer's error becomes a WriteError naming the file,
    with the OS's errno where the writer kept it (safetensors' message, the OSError behind torch's RuntimeError)."""
    tensors = {"w": torch.zeros(64_000)}  # 256 kB
    with file_size_limit(64 * 1024):
        with pytest.raises(SafetensorError, match=r"I/O error: .*\(os error 27\)"):  # what safetensors raises
            safetensors.torch.save_file(tensors, str(tmp_path / "raw.safetensors"))
        with pytest.raises(WriteError) as saved:
            save_safetensors(tensors, tmp_path / "a.safetensors")
        with pytest.raises(WriteError) as written:
            write_bytes_atomic(tmp_path / "b.bin", bytes(200_000))
        with pytest.raises(WriteError) as checkpoint:
            AtomicCheckpointIO().save_checkpoint({"state_dict": tensors}, tmp_path / "last.ckpt")
    for error, name in ((saved, "a.safetensors"), (written, "b.bin"), (checkpoint, "last.ckpt")):
        assert isinstance(error.value, OSError) and error.value.errno == errno.EFBIG, error.value
        assert str(error.value) == f"could not write {tmp_path / name}: {os.strerror(errno.EFBIG)} (EFBIG)"
    assert hidden_entries(tmp_path) == [] and not (tmp_path / "b.bin").exists()  # no temporary file left
    assert not (tmp_path / "last.ckpt").exists()


def test_a_model_save_on_a_full_disk_names_the_file_and_keeps_the_previous_model(tiny_model, tmp_path, monkeypatch):
    """The error names the file as the user asked for it (not the staging folder's name); the folder saved before is
    left byte for byte and the staging folder is removed."""
    target = tmp_path / "model"
    tiny_model.save_pretrained(target)
    before = folder_state(target)
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full_disk)
    with pytest.raises(OSError) as e:
        tiny_model.save_pretrained(target)
    assert str(e.value) == f"could not write {target / 'model.safetensors'}: File too large (EFBIG)"
    assert e.value.errno == errno.EFBIG and e.value.filename == str(target / "model.safetensors")
    assert folder_state(target) == before and hidden_entries(tmp_path) == []


def test_the_pt2e_scales_file_names_itself_when_its_write_fails(tiny_model, tmp_path, monkeypatch):
    """PT2E's int8 scales are a second safetensors file in the folder: its failed write is named, not the model's."""
    from types import SimpleNamespace

    from mmformer.compress.pt2e import QPARAMS_FILE, PT2EModel

    real = safetensors.torch.save_file

    def full_at_scales(tensors, filename, *args, **kwargs):
        if Path(filename).name == QPARAMS_FILE:
            safetensors_full_disk()
        real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_at_scales)
    graphs = SimpleNamespace(model=tiny_model, quantization={"method": "dynamic"}, qparams={"s": torch.ones(2)})
    with pytest.raises(OSError, match=rf"^could not write {tmp_path / 'q' / QPARAMS_FILE}: File too large"):
        PT2EModel.save_pretrained(graphs, tmp_path / "q")  # the method's own code, on a stand-in for the graphs
    assert not (tmp_path / "q").exists() and hidden_entries(tmp_path) == []


@pytest.mark.parametrize(
    "command",
    [
        ["export", "--model", "{src}", "--out", "{out}"],
        ["convert", "{src}", "--out", "{out}"],
        ["quantize", "--model", "{src}", "--method", "int8-weight", "--out", "{out}"],
    ],
    ids=["export", "convert", "quantize"],
)
def test_commands_report_a_full_disk_in_one_line(command, tiny_model, tmp_path, monkeypatch, capsys):
    if command[0] == "quantize":
        pytest.importorskip("torchao")
    tiny_model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    monkeypatch.setattr(safetensors.torch, "save_file", safetensors_full_disk)
    with pytest.raises(SystemExit) as e:
        main([part.format(src=tmp_path / "src", out=out) for part in command])
    expected = f"mmformer {command[0]}: error: could not write {out / 'model.safetensors'}: File too large (EFBIG)"
    assert str(e.value) == expected  # main() prints it as the one line of a SystemExit: status 1
    assert "Traceback" not in capsys.readouterr().err and not out.exists()


def test_a_checkpoint_write_names_the_checkpoint_and_the_reason_torch_hid(tmp_path, monkeypatch):
    """torch's RuntimeError carries the OSError as its context (written to a file object), or nothing at all
    (written to a path: "basic_ios::clear: iostream error"); the previous checkpoint stays, no partial file."""
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(torch, "save", torch_save_full_disk)
    with pytest.raises(OSError) as e:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    assert str(e.value) == f"could not write {target}: File too large (EFBIG)"
    assert isinstance(e.value.__cause__, RuntimeError)  # the traceback (MMFORMER_DEBUG=1) still shows torch's
    assert target.read_bytes() == b"the previous checkpoint" and hidden_entries(tmp_path) == []
    hidden = write_error(target, RuntimeError("basic_ios::clear: iostream error"))
    assert str(hidden) == f"could not write {target}: {UNKNOWN_REASON}" and hidden.errno is None


def test_errors_that_are_not_write_failures_pass_unchanged(tmp_path):
    """A writer's own refusal (a bad argument) is not a full disk: it keeps its type and message."""
    assert write_error(tmp_path / "x", SafetensorError("You are trying to save a non contiguous tensor")) is None
    assert write_error(tmp_path / "x", RuntimeError("some other failure")) is None
    assert write_error(tmp_path / "x", PermissionError(13, "Permission denied", "/elsewhere")) is None  # named
    with pytest.raises(ValueError, match="contiguous"):
        save_safetensors({"w": torch.zeros(4, 4).t()}, tmp_path / "x.safetensors")


def test_every_safetensors_file_is_written_through_save_safetensors():
    """One owner: a ``save_file`` call elsewhere would raise safetensors' own error again on a full disk."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "atomic.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "save_file(" in line and not line.lstrip().startswith("#")
    ]
    assert not offenders, "write safetensors files with mmformer.io.atomic.save_safetensors:\n" + "\n".join(offenders)
