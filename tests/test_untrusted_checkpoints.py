"""Untrusted checkpoints: no loading entry point ever runs code from a file, lying safetensors headers are refused
with an error naming the file, and weights of the wrong shapes are refused with every offending tensor listed.

``tests/test_pretrained.py`` covers ``load_pretrained`` on ``.ckpt`` pickles and on a save_pretrained folder with a
lying ``model.safetensors``; this file covers the other entry points: a pickled ``pytorch_model.bin`` beside a
``config.json``, :func:`mmformer.convert.common.load_state_dict` (file, folder, sharded index) and every
``mmformer.convert.from_*`` given a path.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from mmformer import MultimodalTransformer, load_pretrained
from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.convert import from_hf_bert, from_hf_clip, from_hf_whisper, from_open_clip, from_timm_vit
from mmformer.convert.common import STATE_DICT_NAMES, load_state_dict


# ---------------------------------------------------------------------------------------------------- payloads
class OpenPayload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if the pickle is ever executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class ShellPayload:
    """Unpickling this runs a shell command (``os.system``) that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def write_pickles(folder: Path, marker: Path, tensors: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Malicious weight files in every pickle flavour torch reads: zip (torch.save), legacy torch.save, and a bare
    pickle; a payload hidden among real tensors, or standing in for the state dict."""
    tensors = tensors if tensors is not None else {"weight": torch.zeros(2, 2)}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "zip.bin": lambda p: torch.save({**tensors, "evil": OpenPayload(marker)}, p),
        "legacy.bin": lambda p: torch.save(
            {"state_dict": ShellPayload(marker)}, p, _use_new_zipfile_serialization=False
        ),
        "raw.bin": lambda p: p.write_bytes(pickle.dumps({"model": OpenPayload(marker)}, protocol=2)),
        "shell.pt": lambda p: torch.save({"state_dict": {**tensors, "x": ShellPayload(marker)}}, p),
    }
    out = []
    for name, write in paths.items():
        write(folder / name)
        out.append(folder / name)
    return out


@pytest.fixture
def marker(tmp_path) -> Path:
    """The file a payload would create; checked after every refusal. The payloads are live (checked once here)."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(OpenPayload(proof)))
    pickle.loads(pickle.dumps(ShellPayload(tmp_path / "proof2")))
    assert proof.exists() and (tmp_path / "proof2").exists(), (
        "the payloads must be able to run for this test to mean anything"
    )
    return tmp_path / "marker"


REFUSED = r"(never unpickles arbitrary objects|refused: this pickle is not weights-only)"


def tiny_config() -> ModelConfig:
    return ModelConfig(
        stacks={"shared": StackConfig(width=16, depth=1, n_heads=2)},
        routes={"image": "shared", "text": "shared"},
        image=ImageConfig(image_size=[8, 8], patch_size=4),
        audio=None,
        text=TextConfig(vocab_size=16, max_length=8),
        embed_dim=8,
    )


# ---------------------------------------------------------------------------------------------------- pickles
def test_load_pretrained_refuses_pickled_weights_beside_a_config(tmp_path, marker):
    model = MultimodalTransformer(tiny_config())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(model.config.to_json())
    for path in write_pickles(folder, marker, dict(model.state_dict())):
        named = folder / ("pytorch_model.bin" if path.suffix == ".bin" else "model.ckpt")
        path.replace(named)
        for load in (load_pretrained, MultimodalTransformer.from_pretrained):
            with pytest.raises(ValueError, match=REFUSED) as info:
                load(named)
            assert str(named) in str(info.value)
            assert not marker.exists()
        named.unlink()


def test_load_state_dict_refuses_pickles_from_files_folders_and_shards(tmp_path, marker):
    for path in write_pickles(tmp_path / "files", marker):
        with pytest.raises(ValueError, match=REFUSED) as info:
            load_state_dict(path)
        assert str(path) in str(info.value)
        assert not marker.exists()
    pickle_names = [n for n in STATE_DICT_NAMES if n.endswith(".bin")]
    for name in pickle_names:  # a folder is searched for these names
        folder = tmp_path / f"folder-{name}"
        evil = write_pickles(folder / "src", marker)[0]
        evil.replace(folder / name)
        with pytest.raises(ValueError, match=REFUSED):
            load_state_dict(folder)
        assert not marker.exists()
    # a sharded checkpoint whose second shard is a pickle payload
    shards = tmp_path / "sharded"
    shards.mkdir()
    safetensors.torch.save_file({"a": torch.zeros(2)}, shards / "model-00001.safetensors")
    write_pickles(shards / "src", marker)[0].replace(shards / "pytorch_model-00002.bin")
    index = {"weight_map": {"a": "model-00001.safetensors", "b": "pytorch_model-00002.bin"}}
    (shards / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=REFUSED):
        load_state_dict(shards)
    assert not marker.exists()


def _hf_folder(folder: Path, config: dict, evil: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    evil.replace(folder / "pytorch_model.bin")
    return folder


def test_every_converter_refuses_pickles(tmp_path, marker):
    evil = write_pickles(tmp_path / "evil", marker)
    calls = {
        "open_clip file": lambda: from_open_clip(evil[0]),
        "open_clip folder": lambda: from_open_clip(_hf_folder(tmp_path / "oc", {}, evil[1])),
        "timm file": lambda: from_timm_vit(evil[2], model_name="vit_tiny_patch16_224"),
        "hf_clip": lambda: from_hf_clip(_hf_folder(tmp_path / "clip", {"model_type": "clip"}, evil[3])),
        "hf_whisper": lambda: from_hf_whisper(
            _hf_folder(tmp_path / "whisper", {"model_type": "whisper"}, write_pickles(tmp_path / "w", marker)[0])
        ),
        "hf_bert": lambda: from_hf_bert(
            _hf_folder(tmp_path / "bert", {"model_type": "bert"}, write_pickles(tmp_path / "b", marker)[1])
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=REFUSED):
            call()
        assert not marker.exists(), name


# ---------------------------------------------------------------------------------------------------- lying headers
def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def lying_files(folder: Path) -> dict[str, Path]:
    """safetensors files whose header lies about the data: sizes, offsets, dtypes, the header's own length."""
    raw = safetensors.torch.save({"a": torch.zeros(4, 4), "b": torch.ones(3)})
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    a, b = header["a"], header["b"]
    variants = {
        "offsets past the end": _safetensors({**header, "a": {**a, "data_offsets": [0, 10**9]}}, data),
        "shape larger than its bytes": _safetensors({**header, "a": {**a, "shape": [4096, 4096]}}, data),
        "overlapping tensors": _safetensors({**header, "b": {**b, "data_offsets": [0, 12]}}, data),
        "reversed offsets": _safetensors({**header, "a": {**a, "data_offsets": [64, 0]}}, data),
        "size overflow": _safetensors({**header, "a": {**a, "shape": [2**62, 2**62]}}, data),
        "negative size": _safetensors({**header, "a": {**a, "shape": [-1, 4]}}, data),
        "unknown dtype": _safetensors({**header, "a": {**a, "dtype": "X99"}}, data),
        "header length beyond the file": struct.pack("<Q", 10**12) + raw[8:],
        "truncated": raw[: len(raw) // 2],
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, blob) in enumerate(variants.items()):
        paths[name] = folder / f"lie{i}.safetensors"
        paths[name].write_bytes(blob)
    return paths


def test_lying_safetensors_headers_are_refused_naming_the_file(tmp_path):
    for name, path in lying_files(tmp_path).items():
        with pytest.raises(ValueError, match="not a valid safetensors file") as info:
            load_state_dict(path)
        assert str(path) in str(info.value), name
        with pytest.raises(ValueError, match="not a valid safetensors file") as info:  # a bare file beside a config
            load_pretrained(path, config=tiny_config())
        assert str(path) in str(info.value), name


def test_converters_refuse_lying_safetensors(tmp_path):
    lie = lying_files(tmp_path / "lies")["offsets past the end"]
    folders = {}
    for kind in ("open_clip", "clip", "whisper", "bert"):
        folders[kind] = tmp_path / kind
        folders[kind].mkdir()
        (folders[kind] / "config.json").write_text(json.dumps({} if kind == "open_clip" else {"model_type": kind}))
        (folders[kind] / "model.safetensors").write_bytes(lie.read_bytes())
    calls = {
        "open_clip file": lambda: from_open_clip(lie),
        "open_clip folder": lambda: from_open_clip(folders["open_clip"]),
        "timm file": lambda: from_timm_vit(lie, model_name="vit_tiny_patch16_224"),
        "hf_clip": lambda: from_hf_clip(folders["clip"]),
        "hf_whisper": lambda: from_hf_whisper(folders["whisper"]),
        "hf_bert": lambda: from_hf_bert(folders["bert"]),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"\.safetensors.*not a valid safetensors file"):
            call()
            pytest.fail(f"{name}: loaded a lying safetensors file")


# ---------------------------------------------------------------------------------------------------- wrong shapes
def test_training_checkpoint_with_wrong_shapes_lists_every_one(tmp_path):
    model = MultimodalTransformer(tiny_config())
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.image_embed.patch.weight"] = torch.zeros(16, 3, 2, 2)
    state["model.stacks.shared.blocks.0.mlp.fn.fc1.weight"] = torch.zeros(7, 16)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "mmformer": {"model_config": model.config.to_dict()}}, path)
    with pytest.raises(ValueError, match=r"2 tensor\(s\) have a different shape") as info:
        load_pretrained(path)
    message = str(info.value)
    assert "image_embed.patch.weight: expected (16, 3, 4, 4), found (16, 3, 2, 2)" in message
    assert "stacks.shared.blocks.0.mlp.fn.fc1.weight: expected (64, 16), found (7, 16)" in message


def test_converter_files_with_wrong_shapes_list_them(tmp_path):
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3)
    state = dict(vit.state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 192)
    safetensors.torch.save_file(state, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight") as info:
        from_timm_vit(tmp_path / "vit.safetensors", model_name="vit_tiny_patch16_224", img_size=32, depth=1)
    assert "(5, 192)" in str(info.value) and "(768, 192)" in str(info.value)

    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    key = next(k for k in state if k.endswith("attention.self.value.weight"))
    state[key] = torch.zeros(3, 16)
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ValueError, match=r"attention\.self\.value\.weight \(3, 16\)") as info:
        from_hf_bert(tmp_path / "bert")
    assert "shape mismatch" in str(info.value)


# ---------------------------------------------------------------------------------------------------- .pt2 programs
def _rewritten(source: Path, target: Path, change) -> Path:
    """``source`` (a .pt2 zip) copied to ``target`` with ``change(inner_name, data) -> data`` applied to each entry."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename.split("/", 1)[-1], zin.read(item.filename)))
    return target


def test_load_program_refuses_archives_that_torch_export_load_would_unpickle(tmp_path, marker):
    """``torch.export.load`` unpickles with ``weights_only=False`` a weight or constant its archive marks as pickled,
    and retries a sample-inputs file the safe unpickler refuses without it: :func:`programs.load_program` refuses such
    archives before torch reads them, and still loads the programs ``export`` writes."""
    import io

    from mmformer.ship import export, programs

    torch.manual_seed(0)
    model = MultimodalTransformer(tiny_config()).eval()
    good = export.export(model, tmp_path / "graphs", format="torch-export", towers=["text"]) / "text_encoder.pt2"
    ids = torch.tensor([[1, 4, 5, 2]])
    torch.testing.assert_close(programs.load_program(good).module()(ids, ids > 0)[0], model.encode_text(ids))
    payload = io.BytesIO()
    torch.save(ShellPayload(marker), payload)

    import zipfile

    with zipfile.ZipFile(good) as archive:  # the first weight's entry and file (under the archive's root folder)
        (entry,) = [n for n in archive.namelist() if n.split("/", 1)[-1] == "data/weights/model_weights_config.json"]
        weights_config = json.loads(archive.read(entry))
    first = next(iter(weights_config["config"]))
    first_file = "data/weights/" + weights_config["config"][first]["path_name"]

    def pickled_weight(name: str, data: bytes) -> bytes:  # that weight marked as pickled, and a pickle in its place
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        return payload.getvalue() if name == first_file else data

    def opaque_constant(name: str, data: bytes) -> bytes:
        if name == "data/constants/model_constants_config.json":
            config = json.loads(data)
            config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False}
            return json.dumps(config).encode()
        return data

    def pickled_inputs(name: str, data: bytes) -> bytes:
        return payload.getvalue() if name.startswith("data/sample_inputs/") else data

    crafted_archives = [
        (pickled_weight, "as a pickled object"),
        (opaque_constant, "'evil' as a pickled object"),
        (pickled_inputs, "sample_inputs/model.pt is not readable by the safe unpickler"),
    ]
    for change, message in crafted_archives:
        crafted = _rewritten(good, tmp_path / f"{change.__name__}.pt2", change)
        with pytest.raises(ValueError, match=message):
            programs.load_program(crafted)
        assert not marker.exists(), change.__name__
    with pytest.raises(FileNotFoundError, match="no .pt2 program"):
        programs.load_program(tmp_path / "missing.pt2")
    (tmp_path / "not.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a .pt2 archive"):
        programs.load_program(tmp_path / "not.pt2")
