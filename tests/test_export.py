"""Export: every tower and the decoder step as ONNX (run by onnxruntime) and torch.export programs equal PyTorch to
1e-4 at two batch sizes and lengths; greedy decoding through the exported decoder with its explicit KV cache gives
the model's own ids; the onnxruntime runner needs no torch; bad requests fail clearly and leave nothing behind.

One tiny model is exported once per format for the whole module (ONNX export is the slow part).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

ort = pytest.importorskip("onnxruntime")

from conftest import TINY_AUDIO, TINY_IMAGE, TINY_STACK, TINY_TEXT  # noqa: E402

import mmformer  # noqa: E402
from mmformer.compress import pt2e  # noqa: E402
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig  # noqa: E402
from mmformer.generation.decoding import generate  # noqa: E402
from mmformer.model import MultimodalTransformer  # noqa: E402
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor  # noqa: E402
from mmformer.preprocess.tokenizer import Tokenizer  # noqa: E402
from mmformer.ship import export, exportable  # noqa: E402
from mmformer.ship.programs import load_program  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ROOT = Path(__file__).resolve().parent.parent


def tiny(**overrides) -> MultimodalTransformer:
    """The module's tiny model (``overrides``: ModelConfig arguments), with a processor and a peaked LM head."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train([" ".join(WORDS)] * 4, vocab_size=300)
    config = ModelConfig(**{
        "stacks": {"shared": StackConfig(**{**TINY_STACK, "cross_attention": True})},
        "image": ImageConfig(**TINY_IMAGE),
        "audio": AudioConfig(**TINY_AUDIO),
        "text": TextConfig(**{**TINY_TEXT, "vocab_size": tokenizer.vocab_size}),
        "embed_dim": 8,
        **overrides,
    })  # fmt: skip
    model = MultimodalTransformer(config).eval()
    with torch.no_grad():  # a peaked LM head, so that greedy ids are far from ties
        model.text_embed.tokens.weight.mul_(20)
    model.processor = Processor(
        tokenizer, ImageProcessorConfig(image_size=16, channels=3), AudioProcessorConfig(sample_rate=8000)
    )
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {fmt: export.export(model, root / fmt, format=fmt) for fmt in export.FORMATS}


def inputs_at(model: MultimodalTransformer, batch: int, tokens: int, frames: int, past: int, memory: int) -> dict:
    """Inputs of every graph at one size (real cache tensors from the model for the decoder step)."""
    ex = exportable.examples(model, batch=batch, tokens=tokens, frames=frames)
    g = torch.Generator().manual_seed(batch * 100 + tokens)
    mem = torch.randn(batch, memory, model.config.width("decoder"), generator=g)
    mem_mask = torch.ones(batch, memory, dtype=torch.bool)
    mem_mask[-1, memory // 2 :] = False
    prefill_ids = ex["input_ids"][:, :past]
    with torch.no_grad():
        _, keys, values, cross_k, cross_v = exportable.DecoderPrefill(model)(prefill_ids, mem, mem_mask)
    return {
        "image_encoder": (ex["pixel_values"],),
        "audio_encoder": (ex["input_features"], ex["feature_lengths"]),
        "text_encoder": (ex["input_ids"], ex["attention_mask"]),
        "decoder_model": (ex["input_ids"], mem, mem_mask),
        "decoder_with_past_model": (ex["input_ids"][:, -1:], mem_mask, keys, values, *cross_k, *cross_v),
    }


SIZES = [dict(batch=1, tokens=4, frames=20, past=2, memory=3), dict(batch=3, tokens=7, frames=41, past=5, memory=9)]


def modules(model: MultimodalTransformer) -> dict[str, torch.nn.Module]:
    return {g.name: g.module for g in exportable.graphs(model)}


def assert_onnx_equals(folder: Path, name: str, module: torch.nn.Module, args: tuple) -> None:
    """Graph ``name`` of the ONNX export in ``folder``, run by onnxruntime on ``args`` (the module's arguments), gives
    the module's outputs: their names as the export config lists them, their shapes, and values within 1e-4."""
    graph = json.loads((folder / export.EXPORT_CONFIG).read_text())["graphs"][name]
    session = ort.InferenceSession(str(folder / graph["file"]))
    got = session.run(None, {n: t.numpy() for n, t in zip(graph["inputs"], args)})
    assert [o.name for o in session.get_outputs()] == graph["outputs"]
    with torch.no_grad():
        expected = module(*args)
    for i, ref in enumerate(expected):
        assert got[i].shape == tuple(ref.shape), (name, i)
        assert np.abs(got[i].astype(np.float64) - ref.double().numpy()).max() <= 1e-4, (name, i)


@pytest.fixture(scope="module")
def programs(model, exported) -> dict[str, torch.nn.Module]:
    """The torch.export programs of ``exported``, loaded once for both sizes (loading the five takes ~2.5 s)."""
    return {name: load_program(exported["torch-export"] / f"{name}.pt2").module() for name in modules(model)}


@pytest.mark.parametrize("size", SIZES, ids=["small", "large"])
def test_onnx_and_torch_export_equal_pytorch(model, exported, programs, size):
    inputs = inputs_at(model, **size)
    for name, module in modules(model).items():
        assert_onnx_equals(exported["onnx"], name, module, inputs[name])
        with torch.no_grad():
            expected = module(*inputs[name])
            from_program = programs[name](*inputs[name])
        for i, ref in enumerate(expected):
            assert float((from_program[i].double() - ref.double()).abs().max()) <= 1e-4, (name, i)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two images and three recordings (8 kHz, the model's rate; one at 16 kHz to exercise resampling)."""
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    images, audio = [], []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        images.append(str(folder / f"{i}.png"))
    for i, (rate, n) in enumerate([(8000, 1600), (8000, 1100), (16000, 2600)]):
        t = np.arange(n) / rate
        soundfile.write(folder / f"{i}.wav", 0.3 * np.sin(2 * np.pi * (300 + 120 * i) * t), rate)
        audio.append(str(folder / f"{i}.wav"))
    return images, audio


@pytest.mark.parametrize(
    "stack", [dict(position="rope", n_kv_heads=2), dict(position="t5")], ids=["rope-gqa", "t5-bias"]
)
def test_every_attention_kind_exports_as_onnx_attention_and_equals_pytorch(stack, tmp_path):
    """ONNX's Attention operator (opset 23+) with rotary positions and grouped keys, and with an additive bias as the
    mask (T5's learned one; ALiBi's enters attention the same way), on the towers whose stacks differ by them (plain
    multi-head attention: the module's export above)."""
    torch.manual_seed(0)
    config = ModelConfig(stacks={"shared": StackConfig(**{**TINY_STACK, **stack, "cross_attention": True})},
                         image=ImageConfig(**TINY_IMAGE), audio=AudioConfig(**TINY_AUDIO),
                         text=TextConfig(**TINY_TEXT), embed_dim=8)  # fmt: skip
    model = MultimodalTransformer(config).eval()
    out = export.export(model, tmp_path / "onnx", towers=["text", "decoder"])
    graphs = {g.name: g.module for g in exportable.graphs(model, ["text", "decoder"])}
    for size in SIZES:
        inputs = inputs_at(model, **size)
        for name, module in graphs.items():
            assert_onnx_equals(out, name, module, inputs[name])


def test_one_export_builds_the_onnx_exporters_translation_table_once(model, tmp_path, monkeypatch):
    """``torch.onnx.export`` builds its table of ONNX translations (torchlib's) at every call, ~1 s each: one export
    builds it once per opset and hands each graph its own copy (a custom translation stays in its graph's), and
    torch's builder is back afterwards."""
    from torch.onnx._internal.exporter import _registration

    builds, tables = [], []

    def build(cls, opset_version=18):  # stands in for torchlib's table
        builds.append(opset_version)
        registry = cls()
        registry.functions = {"aten::add.Tensor": ["add"]}
        return registry

    def write(graph, path, opset):  # asks for the table as torch.onnx.export(dynamo=True) does
        registry = _registration.ONNXRegistry().from_torchlib(opset_version=opset)
        registry.functions["aten::add.Tensor"].insert(0, f"custom for {graph.name}")
        tables.append(registry.functions)
        path.write_bytes(b"onnx")

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(build))
    monkeypatch.setattr(export, "_write_onnx", write)
    builder = vars(_registration.ONNXRegistry)["from_torchlib"]
    export.export(model, tmp_path / "onnx", towers=["text", "decoder"])
    assert builds == [export.OPSET]
    names = ["text_encoder", "decoder_model", "decoder_with_past_model"]
    assert tables == [{"aten::add.Tensor": [f"custom for {name}", "add"]} for name in names]
    assert vars(_registration.ONNXRegistry)["from_torchlib"] is builder
    # blocks that overlap (a nested export, or two threads' exports) put torch's builder back, whichever leaves last
    outer, inner = export._torchlib_registry_built_once(), export._torchlib_registry_built_once()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    assert vars(_registration.ONNXRegistry)["from_torchlib"] is builder


def test_the_exported_decoder_step_copies_none_of_its_cached_state(model, exported):
    """Each layer's cross-attention keys/values feed its Attention directly (a stacked input was split into copies at
    every step) and the self-attention cache is joined on, not scattered into."""
    import onnx

    step = onnx.load(str(exported["onnx"] / "decoder_with_past_model.onnx")).graph
    readers: dict[str, set[str]] = {}
    for node in step.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    cross = [i.name for i in step.input if i.name.startswith("cross_")]
    depth = model.config.stacks["shared"].depth
    assert len(cross) == 2 * depth
    assert {name: readers[name] for name in cross} == {name: {"Attention"} for name in cross}
    assert sum(node.op_type == "Attention" for node in step.node) == 2 * depth  # self + cross per layer
    assert not [node.name for node in step.node if node.op_type.startswith("Scatter")]


def test_the_audio_encoders_attention_reads_lengths_not_a_mask(model, exported):
    """The audio encoder's padding and the decoder's memory mask are real tokens first, so each of their Attention
    nodes takes the lengths (opset 24's ``nonpad_kv_seqlen``: onnxruntime's fast kernel) instead of a boolean mask;
    the text encoder, whose padding is the caller's, keeps its mask. Padded rows and memories equal PyTorch in
    ``test_onnx_and_torch_export_equal_pytorch``."""
    import onnx

    def attention_inputs(name: str) -> list[int]:
        graph = onnx.load(str(exported["onnx"] / f"{name}.onnx")).graph
        return [len(node.input) for node in graph.node if node.op_type == "Attention"]

    audio = onnx.load(str(exported["onnx"] / "audio_encoder.onnx"))
    assert {o.version for o in audio.opset_import if o.domain in ("", "ai.onnx")} == {24}
    attention = [node for node in audio.graph.node if node.op_type == "Attention"]
    assert len(attention) == model.config.stacks["shared"].depth
    assert all(list(node.input)[3:6] == ["", "", ""] and node.input[6] for node in attention)
    assert set(attention_inputs("text_encoder")) == {4}  # a mask: its padding is the caller's
    for decoder in ("decoder_model", "decoder_with_past_model"):  # self-attention: causal, no mask; cross: lengths
        assert sorted(set(attention_inputs(decoder))) == [3, 7], decoder


def test_an_onnxruntime_too_old_for_the_exports_opset_gets_a_clear_error(exported, monkeypatch):
    """onnxruntime 1.23 refuses opset 24 with a message about 'official support ... till opset 23': the runner says
    which opset the folder has, which onnxruntime runs it and how to export for the older one."""
    from mmformer.ship.onnx_runner import OnnxModel

    def too_old(*args, **kwargs):
        raise RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : Current official support for domain ai.onnx is till opset 23."
        )

    monkeypatch.setattr(ort, "InferenceSession", too_old)
    with pytest.raises(ValueError, match=r"opset 24.*onnxruntime >= 1.24.*--opset 23"):
        OnnxModel(exported["onnx"])


def test_an_opset_23_export_keeps_the_mask_and_equals_pytorch(model, tmp_path):
    """``--opset 23`` (onnxruntime 1.23, which refuses opset 24) still writes the mask form, expanded per query."""
    import onnx

    out = export.export(model, tmp_path / "onnx23", towers=["audio"], opset=23)
    graph = onnx.load(str(out / "audio_encoder.onnx"))
    assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {23}
    assert {len(node.input) for node in graph.graph.node if node.op_type == "Attention"} == {4}
    module = {g.name: g.module for g in exportable.graphs(model, ["audio"])}["audio_encoder"]
    for size in SIZES:
        assert_onnx_equals(out, "audio_encoder", module, inputs_at(model, **size)["audio_encoder"])


def test_greedy_decoding_through_the_onnx_kv_cache_gives_the_models_ids(model, exported, files):
    from mmformer.ship.onnx_runner import OnnxModel

    runner = OnnxModel(exported["onnx"])
    _, audio = files
    batch = model.processor(audio=audio)
    expected = generate(model, audio=batch["audio"], audio_lengths=batch["audio_lengths"], max_new_tokens=10)
    features, lengths = runner.log_mel(runner.load_audio(audio))
    reference = model.audio_embed.features(batch["audio"], batch["audio_lengths"])
    assert np.abs(features - reference.numpy()).max() < 1e-4  # the numpy front end is the model's LogMel
    _, states, mask = runner._run("audio_encoder", input_features=features, feature_lengths=lengths)
    ids = runner.generate(states, mask, max_new_tokens=10)
    assert ids.tolist() == expected.tolist()
    assert runner.transcribe(audio, max_new_tokens=10) == model.transcribe(audio, max_new_tokens=10)


def test_the_onnx_runner_still_decodes_an_export_of_the_earlier_stacked_layout(model, exported, files, tmp_path):
    """Exports written before opset 23 took each of the cross-attention keys and values as one stacked input
    (L, B, nkv, S, hs): the runner reads the step's input names and feeds such a folder as it was written."""
    import shutil

    class StackedStep(torch.nn.Module):  # the earlier step graph's signature, around today's step
        def __init__(self):
            super().__init__()
            self.step = exportable.DecoderStep(model)

        def forward(self, input_ids, memory_mask, past_keys, past_values, cross_keys, cross_values):
            return self.step(input_ids, memory_mask, past_keys, past_values, *cross_keys, *cross_values)

    old = tmp_path / "old"
    shutil.copytree(exported["onnx"], old)
    new = next(g for g in exportable.graphs(model, ["decoder"]) if g.name == "decoder_with_past_model")
    depth = model.config.stacks["shared"].depth
    names = list(new.inputs)[:4]
    inputs = {n: new.inputs[n] for n in names}
    inputs["cross_keys"] = torch.stack([new.inputs[f"cross_keys_{i}"] for i in range(depth)])
    inputs["cross_values"] = torch.stack([new.inputs[f"cross_values_{i}"] for i in range(depth)])
    dynamic = {n: new.dynamic[n] for n in names}
    dynamic.update(cross_keys={1: "batch", 3: "memory_tokens"}, cross_values={1: "batch", 3: "memory_tokens"})
    stacked = exportable.Graph(new.name, StackedStep(), inputs, new.outputs, dynamic, new.dims)
    export._write_onnx(stacked, old / "decoder_with_past_model.onnx", 18)
    config = json.loads((old / export.EXPORT_CONFIG).read_text())
    config["graphs"]["decoder_with_past_model"]["inputs"] = list(inputs)
    (old / export.EXPORT_CONFIG).write_text(json.dumps(config))
    _, audio = files
    from mmformer.ship.onnx_runner import OnnxModel

    assert OnnxModel(old).transcribe(audio, max_new_tokens=10) == model.transcribe(audio, max_new_tokens=10)


def runner_in_a_fresh_process(folder: Path, images: list[str], audio: list[str] | None = None) -> dict:
    """What the torch-free runner answers for an export ``folder`` in a process of its own, which has neither torch
    nor the process that wrote the export (only the repository on its path): zero-shot probabilities and labels over
    four classes and greedy captions of ``images``, and with ``audio``, its zero-shot probabilities and transcripts."""
    script = f"""
import json, sys
from mmformer.ship.onnx_runner import OnnxModel
m = OnnxModel({str(folder)!r})
probs, labels = m.zeroshot({images!r}, {WORDS[:4]!r}, modality="image")
out = {{"probs": probs.tolist(), "labels": labels, "captions": m.caption({images!r}, max_new_tokens=6)}}
audio = {audio!r}
if audio:
    out["audio_probs"] = m.zeroshot(audio, {WORDS[:4]!r}, modality="audio")[0].tolist()
    out["transcripts"] = m.transcribe(audio, max_new_tokens=6)
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    return out


def test_the_onnx_runner_classifies_and_transcribes_without_torch(model, exported, files):
    images, audio = files
    out = runner_in_a_fresh_process(exported["onnx"], images, audio)
    for modality, key, inputs in (("image", "probs", images), ("audio", "audio_probs", audio)):
        clf = mmformer.ZeroShotClassifier(model, classnames=WORDS[:4], modality=modality)
        assert np.abs(np.array(out[key]) - clf.predict_proba(inputs).numpy()).max() < 1e-4
    assert out["labels"] == mmformer.ZeroShotClassifier(model, classnames=WORDS[:4]).predict(images)
    assert out["captions"] == model.caption(images, max_new_tokens=6)
    assert out["transcripts"] == model.transcribe(audio, max_new_tokens=6)


def audio_only_copy(folder: Path, to: Path, **log_mel) -> Path:
    """The audio graph of the export ``folder`` copied to ``to`` with its front-end files, its ``audio.log_mel``
    block changed by ``log_mel`` (a value None deletes the block: an export written before it)."""
    to.mkdir()
    config = json.loads((folder / export.EXPORT_CONFIG).read_text())
    config["graphs"] = {"audio_encoder": config["graphs"]["audio_encoder"]}
    for name in ("audio_encoder.onnx", "mel_filters.npy", "preprocessor_config.json"):
        (to / name).write_bytes((folder / name).read_bytes())
    config["audio"]["log_mel"].update(log_mel)
    if None in log_mel.values():
        del config["audio"]["log_mel"]
    (to / export.EXPORT_CONFIG).write_text(json.dumps(config))
    return to


def test_the_runner_computes_the_features_the_export_config_states(model, exported, files, tmp_path):
    """``audio.log_mel`` states every step of LogMel that the sizes and the filter bank leave open (its power floor
    and dynamic range among them), and the runner reads it: features that equal the model's from its Processor; the
    same from an export without the block (written before it); another floor where the block says so; a block with a
    step the runner does not take refused by name."""
    from mmformer.embedders.audio import DECADES, POWER_FLOOR
    from mmformer.ship.audio_features import LOG_MEL
    from mmformer.ship.onnx_runner import OnnxModel

    block = json.loads((exported["onnx"] / export.EXPORT_CONFIG).read_text())["audio"]["log_mel"]
    assert block == {**LOG_MEL, "floor": POWER_FLOOR, "decades": DECADES}
    _, audio = files
    batch = model.processor(audio=audio)
    reference = model.audio_embed.features(batch["audio"], batch["audio_lengths"]).numpy()

    def features(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        runner = OnnxModel(folder)
        return runner.log_mel(runner.load_audio(audio))

    stated, frames = features(audio_only_copy(exported["onnx"], tmp_path / "stated"))
    real = np.arange(stated.shape[-1])[None, None, :] < frames[:, None, None]  # (B, 1, Nf): each clip's own frames
    assert np.abs(np.where(real, stated - reference, 0)).max() < 1e-4
    np.testing.assert_array_equal(features(audio_only_copy(exported["onnx"], tmp_path / "before", log_mel=None))[0],
                                  stated)  # fmt: skip
    floored, _ = features(audio_only_copy(exported["onnx"], tmp_path / "floor", floor=1e-3))
    assert np.abs(floored - stated).max() > 0.1
    assert floored[np.broadcast_to(real, floored.shape)].min() == pytest.approx((-3 + 4) / 4, abs=1e-6)  # log10(1e-3)
    with pytest.raises(ValueError, match=r"audio.log_mel.window: expected 'hann' \(the only one this runner "
                                         r"computes\), got 'hamming'"):  # fmt: skip
        OnnxModel(audio_only_copy(exported["onnx"], tmp_path / "hamming", window="hamming"))


def test_the_runner_reads_int16_pcm_as_the_processor_does(model, exported):
    """An int16 waveform array is PCM, scaled by 1/32768 as the Processor scales it (the runner read its raw values,
    32768 times louder: other features); samples of another integer type are refused as the Processor refuses them."""
    from mmformer.ship.onnx_runner import OnnxModel

    t = np.arange(1500) / 8000
    pcm = (12000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    runner = OnnxModel(exported["onnx"])
    batch = model.processor(audio=[pcm], sampling_rate=8000)
    wave = runner.load_audio([pcm], 8000)[0]
    np.testing.assert_array_equal(wave, batch["audio"][0].numpy())
    features, _ = runner.log_mel([wave])
    assert np.abs(features - model.audio_embed.features(batch["audio"], batch["audio_lengths"]).numpy()).max() < 1e-4
    for source in (lambda x: model.processor(audio=[x], sampling_rate=8000), lambda x: runner.load_audio([x], 8000)):
        with pytest.raises(TypeError, match=r"audio\[0\]: expected float \(or int16 PCM\) samples; got .*int32"):
            source(pcm.astype(np.int32))


def torch_free_env(tmp_path: Path) -> dict[str, str]:
    """A subprocess environment whose Python finds the repository and fails on any import of torch, torchvision,
    torchaudio or lightning (packages of those names that raise, ahead of the installed ones on the path)."""
    blocked = tmp_path / "blocked"
    for name in ("torch", "torchvision", "torchaudio", "lightning"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('the runner imported {name}')\n")
    return {"PYTHONPATH": f"{blocked}:{ROOT}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def test_the_runners_command_line_answers_the_usable_files_and_names_the_others(model, exported, files, tmp_path):
    """``python -m mmformer.ship.onnx_runner`` in a process that cannot import torch, with a corrupt, a missing and
    an empty file among good ones: the good ones answered (the model's labels, transcripts and captions), each bad
    one named on stderr, and exit status 1 — what ``mmformer transcribe`` gives when a file cannot be read."""
    from mmformer.cli.main import main

    images, audio = files
    (tmp_path / "junk.wav").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "empty.png").write_bytes(b"")
    bad = [str(tmp_path / "junk.wav"), str(tmp_path / "missing.flac"), str(tmp_path / "empty.png")]
    command = [sys.executable, "-m", "mmformer.ship.onnx_runner", str(exported["onnx"]), "--classes",
               ",".join(WORDS[:4]), "--transcribe", "--caption", "--max-new-tokens", "6",
               bad[0], *audio, bad[1], *images, bad[2]]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=torch_free_env(tmp_path),
                          timeout=120)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr
    labels = [*mmformer.ZeroShotClassifier(model, classnames=WORDS[:4]).predict(images),
              *mmformer.ZeroShotClassifier(model, classnames=WORDS[:4], modality="audio").predict(audio)]  # fmt: skip
    texts = [*model.transcribe(audio, max_new_tokens=6), *model.caption(images, max_new_tokens=6)]
    answers = [line.split("\t") for line in done.stdout.splitlines()]  # zero-shot: file, label, probability
    n = len(labels)
    assert [row[:2] for row in answers[:n]] == [[f, label] for f, label in zip(images + audio, labels)]
    assert answers[n:] == [[f, text] for f, text in zip(audio + images, texts)]
    prefix = "python -m mmformer.ship.onnx_runner: error: "
    assert sorted(done.stderr.splitlines()) == sorted([
        f"{prefix}{bad[0]}: cannot decode audio (LibsndfileError: Format not recognised.)",
        f"{prefix}{bad[1]}: file not found",
        f"{prefix}{bad[2]}: empty file (0 bytes)",
    ])  # fmt: skip
    model.save_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(SystemExit) as theirs:  # a message: status 1
        main(["transcribe", "--model", str(tmp_path / "model"), "--no-progress", bad[0], audio[0]])
    assert isinstance(theirs.value.code, str) and done.returncode == 1


def test_the_runner_extra_lists_what_the_runner_imports(tmp_path):
    """pyproject's ``runner`` extra names the distributions of every third-party module the runner's code imports
    (its module, its command line and the media rules they share), and README's torch-free install lists the
    extra's requirements."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    distributions = {"PIL": "pillow"}  # import name → distribution, where they differ
    imported = set()
    for path in (
        "mmformer/ship/onnx_runner.py",
        "mmformer/ship/audio_features.py",
        "mmformer/ship/runner_cli.py",
        "mmformer/preprocess/media.py",
    ):
        for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            imported |= {n.split(".")[0] for n in names}
    third_party = {distributions.get(n, n) for n in imported - set(sys.stdlib_module_names) - {"mmformer"}}
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["runner"]
    assert {requirement.split(">")[0] for requirement in extra} == third_party
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = next(line for line in readme.splitlines() if line.startswith("pip install") and "onnxruntime" in line)
    assert all(f'"{requirement}"' in install for requirement in extra), install


def test_bad_requests_are_clear_errors_and_leave_nothing_behind(model, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"format: expected one of \['onnx', 'torch-export'\], got 'tflite'"):
        export.export(model, tmp_path / "x", format="tflite")
    with pytest.raises(ValueError, match=r"opset: expected an int >= 18 .*got 5"):  # it wrote 18 and recorded 5
        export.export(model, tmp_path / "x", opset=5)

    def text_model(route: str) -> MultimodalTransformer:  # a text encoder, or a decoder-only language model
        embed_dim = 8 if route == "text" else None
        config = ModelConfig(stacks={"shared": StackConfig(**TINY_STACK)}, routes={route: "shared"}, image=None,
                             audio=None, text=TextConfig(**TINY_TEXT), embed_dim=embed_dim)  # fmt: skip
        return MultimodalTransformer(config)

    text_only = text_model("text")
    with pytest.raises(ValueError, match=r"towers: this model has no audio route to export; its routes are \['text'\]"):
        export.export(text_only, tmp_path / "x", towers=["audio"])
    with pytest.raises(ValueError, match=r"towers: expected some of .* got \['vision'\]"):
        export.export(model, tmp_path / "x", towers=["vision"])
    # a decoder-only language model: the decoder graphs read a memory its decoder has no cross-attention for (its
    # export used to stop deep inside, at the KV cache: "not every layer holds cross-attention keys/values yet")
    language_model = text_model("decoder")
    for call in (
        lambda: export.export(language_model, tmp_path / "x"),
        lambda: pt2e.quantize(language_model, "dynamic"),
    ):
        with pytest.raises(ValueError, match=r"towers: the decoder of a decoder-only language model is not exportable"):
            call()
    assert list(tmp_path.iterdir()) == []

    calls = []

    def fail_on_second(graph, path, opset):
        calls.append(graph.name)
        if len(calls) == 2:
            raise RuntimeError("exporter crashed")
        path.write_bytes(b"half")

    monkeypatch.setattr(export, "_write_program", fail_on_second)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export.export(model, tmp_path / "out", format="torch-export")
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder


def test_cli_exports_towers_and_still_writes_pretrained_folders(model, tmp_path, capsys):
    from mmformer.cli.main import main

    model.save_pretrained(tmp_path / "model")
    main(["export", "--model", str(tmp_path / "model"), "--format", "torch-export", "--towers", "image,text",
          "--out", str(tmp_path / "graphs")])  # fmt: skip
    config = json.loads((tmp_path / "graphs" / export.EXPORT_CONFIG).read_text())
    assert sorted(config["graphs"]) == ["image_encoder", "text_encoder"]
    main(["export", "--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "copy")])
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="no decoder route|exactly one of --ckpt"):
        main(["export", "--out", str(tmp_path / "y")])


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    """A CoCa-style model (an attentional pooler whose first query is pooled and hidden from the decoder) with a
    SigLIP logit bias, and its ONNX export (image, text, decoder)."""
    model = tiny(
        stacks={"shared": StackConfig(**{**TINY_STACK, "depth": 1, "cross_attention": True})},  # one block: faster
        image=ImageConfig(**TINY_IMAGE, resampler_queries=4, pool="cls"),
        audio=None,
        routes={"image": "shared", "text": "shared", "decoder": "shared"},
        logit_bias_init=-2.0,
    )
    return model, export.export(model, tmp_path_factory.mktemp("coca") / "onnx")


def test_a_coca_export_decodes_the_image_tokens_the_models_decoder_reads(coca, files, monkeypatch):
    """The decoder graphs read ``memory_mask`` as a count of real tokens first (opset 24), so the runner's caption
    decodes from the image tokens after the hidden pooled query (``image.memory_start``) with a mask of ones: the
    memory the model's decoder reads (its own mask hides the first query), its logits and its greedy ids."""
    from mmformer.ship.onnx_runner import OnnxModel

    model, folder = coca
    runner = OnnxModel(folder)
    calls = []

    def recorded(memory, memory_mask, *args, **kwargs):
        calls.append((memory, memory_mask, OnnxModel.generate(runner, memory, memory_mask, *args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(runner, "generate", recorded)
    images, _ = files
    assert runner.caption(images, max_new_tokens=6) == model.caption(images, max_new_tokens=6)
    memory, memory_mask, ids = calls[0]
    pixels = model.processor(images=images)["pixel_values"]
    with torch.no_grad():
        states, mask = model.encode_image_tokens(pixels)  # mask: False at the pooled query
        assert memory_mask.all() and np.abs(memory - states[:, mask[0]].numpy()).max() <= 1e-5
        assert ids.tolist() == generate(model, image=pixels, max_new_tokens=6).tolist()
        prompt = exportable.examples(model, batch=len(images), tokens=4)["input_ids"]
        expected = model.decode(prompt, states, mask)
    got = runner._run("decoder_model", input_ids=prompt.numpy(), memory=memory, memory_mask=memory_mask)[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-5


def test_the_onnx_runners_zero_shot_reads_a_logit_bias_through_a_sigmoid(coca, files):
    """A model with a logit bias (SigLIP): the runner's probabilities are the classifier's, sigmoid(scale × cosine +
    bias) per class, not a softmax over the classes."""
    from mmformer.ship.onnx_runner import OnnxModel

    model, folder = coca
    images, _ = files
    probs, labels = OnnxModel(folder).zeroshot(images, WORDS[:4])
    clf = mmformer.ZeroShotClassifier(model, classnames=WORDS[:4])
    assert np.abs(probs - clf.predict_proba(images).numpy()).max() <= 1e-5
    assert labels == clf.predict(images)


def test_a_coca_export_captions_and_scores_in_a_torch_free_process_as_the_model(coca, files):
    """What the export config carries for a CoCa/SigLIP model (``image.memory_start``, the logit bias) is read from
    the files by a fresh process without torch: the model's captions, and its sigmoid probabilities."""
    model, folder = coca
    images, _ = files
    out = runner_in_a_fresh_process(folder, images)
    assert out["captions"] == model.caption(images, max_new_tokens=6)
    clf = mmformer.ZeroShotClassifier(model, classnames=WORDS[:4])
    assert np.abs(np.array(out["probs"]) - clf.predict_proba(images).numpy()).max() <= 1e-5
    assert out["labels"] == clf.predict(images)


def test_pt2e_graphs_of_a_coca_model_decode_the_image_tokens_its_decoder_reads(coca):
    """PT2E's decoder graphs are the export's (a mask read as a count): its memory of a CoCa image drops the hidden
    pooled query, as the ONNX runner's does, instead of decoding from it with a mask of ones."""
    from mmformer.compress import pt2e

    model, _ = coca
    graphs = pt2e.PT2EModel(model, "dynamic", {g.name: g.module for g in exportable.graphs(model)}, {}, compile=False)
    pixels = exportable.examples(model)["pixel_values"]
    with torch.no_grad():
        states, mask = graphs.memory(image=pixels)
        expected, hidden = model.encode_image_tokens(pixels)
    assert bool(mask.all()) and not bool(hidden[:, 0].any()) and bool(hidden[:, 1:].all())
    torch.testing.assert_close(states, expected[:, 1:])
    assert torch.equal(graphs.generate(image=pixels, max_new_tokens=5), model.generate(image=pixels, max_new_tokens=5))
