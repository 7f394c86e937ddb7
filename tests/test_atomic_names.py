"""The names and bytes of what :mod:`mmformer.io.atomic` writes.

- A valid name of 230–255 bytes is written: the temporary names beside it (``.NAME.XXXXXXXX.tmp``, a save's
  ``.NAME.PID.tmp-*`` / ``.old-*``) added 14–30 bytes to it and passed the file system's limit ("File name too
  long", naming the staging folder); they now cut the copied name and mark it with a hash, and the stale-staging sweep
  still finds a killed writer's leftovers by them. A name that is itself too long is refused before anything is
  written, naming it.
- An export on a full disk names the file it could not write (the ONNX writer's, ``np.save``'s bare
  ``OSError``), and a ``.pt2`` program's failed write no longer aborts the process (torch's archive writer throws
  again in its destructor).
- Saving the same tensors and metadata twice gives the same bytes: safetensors wrote the metadata in a random order.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from test_write_errors import file_size_limit, folder_state, hidden_entries

from mmformer.io import atomic
from mmformer.io.atomic import (
    WriteError,
    name_max,
    ordered_header,
    remove_stale_staging,
    safetensors_bytes,
    save_safetensors,
    staging_prefix,
    write_bytes_atomic,
    write_text_atomic,
)


@pytest.fixture
def replaced_names(monkeypatch) -> list[str]:
    """The names of the temporary files and folders renamed onto their targets or their targets renamed to
    (``os.replace``, ``os.rename``), the target's own name left out."""
    names: list[str] = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def spy(src, dst, *args, real=real, **kwargs):
            names.extend(Path(p).name for p in (src, dst) if Path(p).name.startswith("."))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    return names


def longest_name(folder: Path, char: str = "a", suffix: str = "") -> str:
    """The longest name of ``char``s (then ``suffix``) the file system of ``folder`` holds."""
    room = name_max(folder) - len(suffix.encode())
    return char * (room // len(char.encode())) + suffix


# ------------------------------------------------------------------------------------------------ long names
def test_a_file_with_the_longest_valid_name_is_written_and_a_short_names_temporary_name_is_as_before(
    tmp_path, replaced_names
):
    long = tmp_path / longest_name(tmp_path, suffix=".txt")
    write_text_atomic(long, "one two\n")
    assert long.read_text() == "one two\n" and sorted(p.name for p in tmp_path.iterdir()) == [long.name]
    (temporary,) = replaced_names
    assert len(temporary.encode()) <= name_max(tmp_path)
    assert re.fullmatch(r"\.a+~[0-9a-f]{8}\.\w{8}\.tmp", temporary), temporary
    # a multi-byte name is cut between characters, never inside one
    wide = tmp_path / longest_name(tmp_path, char="é")
    write_bytes_atomic(wide, b"x")
    assert wide.read_bytes() == b"x" and re.fullmatch(r"\.é+~[0-9a-f]{8}\.\w{8}\.tmp", replaced_names[1])

    write_text_atomic(tmp_path / "out.txt", "short")
    assert re.fullmatch(r"\.out\.txt\.\w{8}\.tmp", replaced_names[2]), replaced_names[2]


def test_a_name_longer_than_the_file_system_holds_is_refused_naming_it_before_anything_is_written(tiny_model, tmp_path):
    too_long = tmp_path / ("a" * name_max(tmp_path) + ".txt")
    with pytest.raises(WriteError) as e:
        write_text_atomic(too_long, "x")
    assert e.value.errno == errno.ENAMETOOLONG and e.value.filename == str(too_long)
    assert str(e.value) == f"could not write {too_long}: {os.strerror(errno.ENAMETOOLONG)} (ENAMETOOLONG)"
    with pytest.raises(WriteError, match=rf"^could not write {re.escape(str(too_long))}: File name too long"):
        staging_prefix(too_long, "tmp")
    with pytest.raises(OSError, match="File name too long") as saved:
        tiny_model.save_pretrained(tmp_path / ("m" * (name_max(tmp_path) + 1)))
    assert saved.value.filename == str(tmp_path / ("m" * (name_max(tmp_path) + 1)))
    assert list(tmp_path.iterdir()) == []


def test_a_model_saved_into_a_folder_with_the_longest_valid_name_loads_back(tiny_model, tmp_path, replaced_names):
    """``mmformer export --out`` a folder of 240 bytes failed naming its staging folder ``.mmm….PID.tmp-XXXXXXXX``."""
    import mmformer

    target = tmp_path / longest_name(tmp_path, char="m")
    tiny_model.save_pretrained(target)
    tiny_model.save_pretrained(target)  # over a saved one: the previous version goes aside (.NAME.PID.old-*)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    staging = [name for name in replaced_names if name.startswith(".m")]
    assert any(".tmp-" in name for name in staging) and any(".old-" in name for name in staging), staging
    assert all(len(name.encode()) <= name_max(tmp_path) for name in staging)
    loaded = mmformer.load_pretrained(target)
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_the_sweep_finds_a_killed_writers_cut_names_and_no_other_targets(tmp_path):
    """The sweep recognises a dead writer's leftovers by the cut name that writer got, with its pid — not those of
    another long name beginning alike, nor those of a live writer."""
    gone = 999_999_999  # no such process (a pid beyond Linux's limit)
    assert not atomic.pid_alive(gone)
    target = tmp_path / longest_name(tmp_path, char="m")
    target.mkdir()
    sibling = tmp_path / (target.name[:-1] + "n")  # the same first characters: another target
    names = {
        f".{atomic._staging_name(target, gone, 'tmp')}.{gone}.tmp-a1b2c3d4": False,  # deleted
        f".{atomic._staging_name(target, gone, 'old')}.{gone}.old-{'e' * 12}": False,  # target exists: deleted
        f".{atomic._staging_name(target, os.getppid(), 'tmp')}.{os.getppid()}.tmp-f5f5f5f5": True,  # a live writer's
        f".{atomic._staging_name(sibling, gone, 'tmp')}.{gone}.tmp-a6a6a6a6": True,  # another target's
    }
    for name in names:
        assert len(name.encode()) <= name_max(tmp_path), name
        (tmp_path / name).mkdir()
    prefix = staging_prefix(target, "tmp")  # what this process's save would use
    assert prefix == f".{atomic._staging_name(target, os.getpid(), 'tmp')}.{os.getpid()}.tmp-"
    assert len(prefix.encode()) + atomic.STAGING_TAIL <= name_max(tmp_path)

    remove_stale_staging(target)
    assert {name: (tmp_path / name).exists() for name in names} == names


# ---------------------------------------------------------------------------------- export on a full disk
def test_a_pt2_export_on_a_full_disk_names_the_file_and_the_process_goes_on(tiny_model, tmp_path):
    """torch's archive writer raised "[enforce fail at inline_container.cc] unexpected pos" and, once collected,
    aborted the process ("terminate called after throwing an instance of 'c10::Error'")."""
    from mmformer.ship import export

    target = tmp_path / "out"
    target.mkdir()
    (target / "README.md").write_text("mine\n")
    with file_size_limit(4096), pytest.raises(WriteError) as e:
        export.export(tiny_model, target, format="torch-export", towers=["text"])
    gc.collect()  # where the archive writer of a failed write aborted
    assert str(e.value) == f"could not write {target / 'text_encoder.pt2'}: File too large (EFBIG)"
    assert folder_state(target) == {"README.md": b"mine\n"} and hidden_entries(tmp_path) == []


def onnx_program_of(nbytes: int):
    """A real ``torch.onnx.ONNXProgram`` (an Identity of an ``nbytes`` initializer) without running the exporter."""
    import numpy as np
    from onnxscript import ir

    weight = ir.Value(name="w", shape=ir.Shape([nbytes // 4]), type=ir.TensorType(ir.DataType.FLOAT))
    weight.const_value = ir.tensor(np.zeros(nbytes // 4, dtype=np.float32), name="w")
    node = ir.node("Identity", [weight])
    node.outputs[0].name, node.outputs[0].shape = "y", weight.shape
    node.outputs[0].type = weight.type
    graph = ir.Graph([], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 18})
    return torch.onnx.ONNXProgram(ir.Model(graph, ir_version=10), None)


def test_an_onnx_export_on_a_full_disk_names_the_file(tiny_model, tmp_path, monkeypatch):
    """The ONNX writer raised a bare "[Errno 28] No space left on device" (the exporter is replaced by a real
    program, so that the real ONNX writer fails under the file size limit, without the exporter's seconds)."""
    from mmformer.ship import export

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: onnx_program_of(64_000))
    target = tmp_path / "out"
    with file_size_limit(16 * 1024), pytest.raises(WriteError) as e:
        export.export(tiny_model, target, format="onnx", towers=["text"], opset=18)
    assert str(e.value) == f"could not write {target / 'text_encoder.onnx'}: File too large (EFBIG)"
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.filename is None  # what the writer raised
    assert list(tmp_path.iterdir()) == []


def test_the_mel_filters_on_a_full_disk_name_their_file(tiny_model, tmp_path):
    from mmformer.ship import export

    path = tmp_path / "mel_filters.npy"
    with file_size_limit(256), pytest.raises(WriteError) as e:
        export._save_mel_filters(tiny_model, path)
    assert str(e.value) == f"could not write {path}: File too large (EFBIG)"


# ------------------------------------------------------------------------------------- reproducible bytes
METADATA = {
    "format": "pt",
    "format_version": "2",
    "mmformer_config": json.dumps({"width": 16, "name": "é 中 😀"}),
    'quote " and \\ back': "line\nbreak\ttab\x01\x7f\u2028",
    **{f"key{i}": str(i) for i in range(8)},
}
TENSORS = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64), "c": torch.ones(2, dtype=torch.float16)}


def test_saving_the_same_tensors_and_metadata_gives_the_same_bytes(tmp_path):
    """safetensors writes the metadata in a random order (a Rust HashMap, seeded anew for each): five saves in one
    process gave five different files."""
    for i in range(5):
        save_safetensors(TENSORS, tmp_path / f"{i}.safetensors", metadata=dict(reversed(METADATA.items())))
    files = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(5)}
    assert len(files) == 1 and {safetensors_bytes(TENSORS, METADATA) for _ in range(3)} == files
    (data,) = files
    length = int.from_bytes(data[:8], "little")
    assert length % 8 == 0  # safetensors' alignment of the data
    assert list(json.loads(data[8 : 8 + length])["__metadata__"]) == sorted(METADATA)
    with safetensors.safe_open(tmp_path / "0.safetensors", "pt") as f:  # the offsets still valid: every tensor equal
        assert f.metadata() == METADATA and sorted(f.keys()) == sorted(TENSORS)
        for name, tensor in TENSORS.items():
            assert f.get_tensor(name).dtype == tensor.dtype and torch.equal(f.get_tensor(name), tensor), name
    assert safetensors.torch.load(data).keys() == TENSORS.keys()


def test_the_sorted_header_is_as_long_as_the_one_safetensors_wrote():
    """The header is rewritten in place: for any metadata (escapes, non-ASCII), its sorted form is as long."""
    raw = safetensors.torch.save(TENSORS, metadata=METADATA)
    header = raw[8 : 8 + int.from_bytes(raw[:8], "little")]
    ordered = ordered_header(header)
    assert len(ordered) == len(header) and json.loads(ordered) == json.loads(header)
    # a float (no safetensors header has one) may grow when written again: 1E5 is 100000.0
    with pytest.raises(ValueError, match=r"header: expected safetensors' compact JSON, got 27 bytes for 32 of it"):
        ordered_header(b'{"__metadata__":{},"x":1E5}')


def test_a_model_saved_twice_has_the_same_weights_file_and_loads_back(tiny_model, tmp_path):
    import mmformer

    tiny_model.save_pretrained(tmp_path / "a")
    tiny_model.save_pretrained(tmp_path / "b")
    first = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert first == (tmp_path / "b" / "model.safetensors").read_bytes()
    loaded = mmformer.load_pretrained(tmp_path / "b")
    assert loaded.config == tiny_model.config
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_prompt_saved_again_is_the_same_file(tmp_path):
    """A soft prompt's file (two metadata keys) was written by safetensors' own save, in a random key order."""
    from mmformer.adapt.prompts import ContextPrompt

    prompt = ContextPrompt(4, 8, init=torch.arange(32, dtype=torch.float32).reshape(4, 8))
    files = []
    for i in range(8):  # two keys: a random order matches the first save's one time in two
        prompt.save(tmp_path / f"{i}.safetensors")
        files.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert all(f == files[0] for f in files)
