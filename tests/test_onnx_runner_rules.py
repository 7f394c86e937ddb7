"""The torch-free ONNX runner decodes as the model's greedy ``generate`` / ``transcribe`` does, with the rules an
export writes into ``export_config.json``: a Whisper checkpoint's fixed audio window (``pad_to_seconds``) and prompt
(start, language — given or detected —, task, no-timestamps), its suppressed tokens, every end id
(``extra_eos_ids``) and the decoder's length limit less an appended class token's slot (``max_tokens``, CoCa).
Audio longer than the window is refused by name; an export written before these keys still loads and decodes as it
did.

One tiny random model carries every rule (a Whisper-like audio encoder and decoder whose text config also reserves
CoCa's class-token slot); its two towers are exported to ONNX once for the module. The suppressed tokens and the
extra end id are picked from what the model decodes without them, so that each rule changes the ids.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from conftest import TINY_AUDIO  # noqa: E402
from helpers import randomize_  # noqa: E402

from mmformer.config import AudioConfig, GenerationConfig, ModelConfig, StackConfig, TextConfig  # noqa: E402
from mmformer.model import MultimodalTransformer  # noqa: E402
from mmformer.preprocess.processor import AudioProcessorConfig, Processor  # noqa: E402
from mmformer.preprocess.tokenizer import Tokenizer  # noqa: E402
from mmformer.ship import export  # noqa: E402
from mmformer.ship.onnx_runner import OnnxModel  # noqa: E402

RATE = 8000
WINDOW = 2000  # samples: pad_to_seconds=0.25 at 8 kHz, 125 mel frames of TINY_AUDIO's max 128
VOCAB = 64
EOS, PAD = 50, 49  # padding apart from end-of-text (Whisper's are one), so that a row's padding shows in its text
START, LANGUAGES, TASKS, NO_TIMESTAMPS = 51, {"en": 52, "de": 53, "fr": 54}, {"transcribe": 55, "translate": 56}, 57
MAX_LENGTH = 16  # decoder positions; pool="append_cls" leaves 15 tokens (TextConfig.max_tokens)


def whisper_like() -> MultimodalTransformer:
    """A tiny Whisper-shaped model (audio encoder → cross-attending decoder, 0.25 s window) with a generation
    config (languages, tasks, no-timestamps; nothing suppressed yet) and a word-level tokenizer (``t{id}``)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    torch.manual_seed(0)
    stack = dict(width=16, n_heads=4, mlp_ratio=2.0)
    config = ModelConfig(
        stacks={
            "encoder": StackConfig(depth=1, **stack),
            "decoder": StackConfig(depth=2, cross_attention=True, **stack),
        },
        routes={"audio": "encoder", "decoder": "decoder"},
        image=None,
        audio=AudioConfig(**TINY_AUDIO, pad_to_seconds=WINDOW / RATE),
        text=TextConfig(
            vocab_size=VOCAB, max_length=MAX_LENGTH, pad_id=PAD, bos_id=START, eos_id=EOS, pool="append_cls"
        ),  # fmt: skip
        embed_dim=None,
        generation=GenerationConfig(
            language_ids=LANGUAGES, task_ids=TASKS, task="transcribe", no_timestamps_id=NO_TIMESTAMPS
        ),  # fmt: skip
    )
    model = randomize_(MultimodalTransformer(config), scale=0.3)  # ids that follow the audio, far from ties
    backend = Backend(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, max_length=MAX_LENGTH, pad_token=f"t{PAD}", bos_token=None, eos_token=f"t{EOS}")
    model.processor = Processor(tokenizer, audio=AudioProcessorConfig(sample_rate=RATE, max_seconds=None))
    return model


def clips(*lengths: int) -> list[np.ndarray]:
    """Chirps of these sample counts at RATE, each its own pitch and level."""
    out = []
    for i, n in enumerate(lengths):
        t = np.arange(n) / RATE
        out.append((0.2 + 0.1 * i) * np.sin(2 * np.pi * (200 + 150 * i) * t * (1 + 2 * t)).astype(np.float32))
    return out


WAVES = clips(1200, 1700, WINDOW)  # shorter than the window, and the whole window


def torch_ids(model: MultimodalTransformer, waves: list[np.ndarray], **options) -> np.ndarray:
    batch = model.processor(audio=waves, sampling_rate=RATE)
    return model.generate(audio=batch["audio"], audio_lengths=batch["audio_lengths"], **options).numpy()


def runner_ids(runner: OnnxModel, waves: list[np.ndarray], **options) -> np.ndarray:
    _, states, mask = runner._audio_states(waves, RATE)
    return runner.generate(states, mask, **options)


@pytest.fixture(scope="module")
def model() -> MultimodalTransformer:
    """The model with its rules picked from its own greedy decoding, each in turn, so that each changes the ids: the
    most frequent new token of English transcripts suppressed; then the first row's first new token suppressed at
    the start; then a token in the middle of a row made an extra end id."""
    model = whisper_like()
    gen = model.config.generation
    english = dict(language="en", max_new_tokens=30)
    values, counts = np.unique(torch_ids(model, WAVES, **english)[:, 4:], return_counts=True)
    gen.suppress_tokens = [int(values[counts.argmax()])]
    gen.begin_suppress_tokens = [int(torch_ids(model, WAVES, **english)[0, 4])]
    new = torch_ids(model, WAVES, **english)[:, 4:]
    # a token in the middle of the longest row that no row has among its first three (so that others run on)
    row = max(range(len(new)), key=lambda r: int((new[r] != PAD).sum()))
    seen = set(new[:, :3].ravel().tolist()) | {EOS, PAD}
    model.config.text.extra_eos_ids = [next(int(t) for t in new[row, 3:-1] if int(t) not in seen)]
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export.export(model, tmp_path_factory.mktemp("export") / "onnx", towers=["audio", "decoder"])


@pytest.fixture(scope="module")
def runner(exported) -> OnnxModel:
    return OnnxModel(exported, threads=1)


def test_the_features_are_the_models_fixed_window(model, runner):
    features, frames = runner.log_mel(runner.load_audio(WAVES, RATE))
    batch = model.processor(audio=WAVES, sampling_rate=RATE)
    reference = model.audio_embed.features(batch["audio"], batch["audio_lengths"]).numpy()
    assert features.shape == reference.shape == (3, TINY_AUDIO["n_mels"], WINDOW // TINY_AUDIO["hop_length"])
    assert np.abs(features - reference).max() < 1e-4
    assert frames.tolist() == [WINDOW // TINY_AUDIO["hop_length"]] * 3


def test_the_windows_dropped_frame_is_a_step_the_export_config_states(runner, exported, tmp_path):
    """Whisper's dropped last frame is ``audio.log_mel.drop_last_frame``, which the runner reads: the window's frames
    less one as exported, and from an export written before the block (the model's then as now); all of them where
    the block keeps it."""
    frames = WINDOW // TINY_AUDIO["hop_length"]
    features, _ = runner.log_mel(runner.load_audio(WAVES, RATE))

    def copy_with(name: str, change) -> OnnxModel:
        folder = shutil.copytree(exported, tmp_path / name)
        config = json.loads((folder / export.EXPORT_CONFIG).read_text())
        change(config["audio"])
        (folder / export.EXPORT_CONFIG).write_text(json.dumps(config))
        return OnnxModel(folder, threads=1)

    before = copy_with("before", lambda audio: audio.pop("log_mel"))
    np.testing.assert_array_equal(before.log_mel(before.load_audio(WAVES, RATE))[0], features)
    kept = copy_with("kept", lambda audio: audio["log_mel"].update(drop_last_frame=False))
    all_frames, counts = kept.log_mel(kept.load_audio(WAVES, RATE))
    assert features.shape[-1] == frames and all_frames.shape[-1] == counts[0] == frames + 1


@pytest.mark.parametrize(
    "options",
    [{}, dict(language="en"), dict(language="<|FR|>", task="translate")],
    ids=["language-detected", "language-given", "language-and-task-given"],
)
def test_greedy_ids_and_texts_equal_the_models(model, runner, options):
    expected = torch_ids(model, WAVES, max_new_tokens=30, **options)
    got = runner_ids(runner, WAVES, max_new_tokens=30, **options)
    np.testing.assert_array_equal(got, expected)
    assert got[:, 0].tolist() == [START] * 3 and got[:, 3].tolist() == [NO_TIMESTAMPS] * 3
    gen = model.config.generation
    assert not np.isin(got[:, 4:], gen.suppress_tokens).any()
    assert not np.isin(got[:, 4], gen.begin_suppress_tokens).any()
    waves = list(WAVES)
    assert runner.transcribe(waves, RATE, 30, **options) == model.transcribe(waves, RATE, max_new_tokens=30, **options)


def test_a_row_ends_at_any_end_id(model, runner):
    """The checkpoint's extra end id ends a row (padded after it), as end-of-text does."""
    expected = torch_ids(model, WAVES, language="en", max_new_tokens=30)
    got = runner_ids(runner, WAVES, language="en", max_new_tokens=30)
    np.testing.assert_array_equal(got, expected)
    extra = model.config.text.extra_eos_ids[0]
    ended = [row for row in got[:, 4:].tolist() if extra in row[:-1]]  # before the length limit
    assert ended and all(set(row[row.index(extra) + 1 :]) == {PAD} for row in ended)


def test_decoding_stops_where_generate_does_before_a_class_token_slot(model, runner):
    """A row that does not end runs to the decoder's limit: its position table less the slot of an appended class
    token (``TextConfig.max_tokens``, CoCa's), not the whole table (``max_length``)."""
    expected = torch_ids(model, WAVES, max_new_tokens=30)
    got = runner_ids(runner, WAVES, max_new_tokens=30)
    np.testing.assert_array_equal(got, expected)
    assert got.shape[1] == model.config.text.max_tokens == MAX_LENGTH - 1
    assert not np.isin(got[:, -1], [EOS, PAD, *model.config.text.extra_eos_ids]).all()  # a row was still open


def test_audio_longer_than_the_window_is_refused_by_name(runner):
    with pytest.raises(ValueError, match=r"audio\[1\]: expected at most the model's 0.25 s window \(2000 samples at "
                                         r"8000 Hz\), got 0.26 s \(2100 samples\).*`mmformer transcribe`"):  # fmt: skip
        runner.transcribe(clips(800, WINDOW + 100), RATE)


def test_the_command_line_names_audio_longer_than_the_window_and_transcribes_the_rest(model, exported, tmp_path):
    """``python -m mmformer.ship.onnx_runner --transcribe``: a file longer than the window is named on stderr (exit
    status 1, as for a file that cannot be read), the others transcribed as the model transcribes them."""
    import soundfile

    paths = [str(tmp_path / f"{i}.wav") for i in range(3)]
    for path, wave in zip(paths, [WAVES[0], clips(800, WINDOW + 100)[1], WAVES[1]]):
        soundfile.write(path, wave, RATE)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "mmformer.ship.onnx_runner", str(exported), "--transcribe", *paths],
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          timeout=120)  # fmt: skip
    assert done.returncode == 1
    good = [paths[0], paths[2]]
    expected = model.transcribe(good, max_new_tokens=30)
    assert done.stdout.splitlines() == [f"{path}\t{text}" for path, text in zip(good, expected)]
    assert re.fullmatch(rf"python -m mmformer.ship.onnx_runner: error: {re.escape(paths[1])}: expected at most the "
                        r"model's 0.25 s window .*\n", done.stderr)  # fmt: skip


def test_bad_language_and_task_are_the_models_errors(model, runner):
    for options in (dict(language="xx"), dict(task="summarise")):
        with pytest.raises(ValueError) as theirs:
            model.transcribe(WAVES, RATE, **options)
        with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
            runner.transcribe(WAVES, RATE, **options)


def test_an_export_without_the_rules_keys_decodes_as_before(model, exported, tmp_path):
    """Written before the rules were exported: no window, [bos] alone, end-of-text only, the position table — and for
    a model without such rules that is the model's own decoding."""
    old = shutil.copytree(exported, tmp_path / "old")
    config = json.loads((old / export.EXPORT_CONFIG).read_text())
    del config["generation"], config["audio"]["pad_to_seconds"]
    del config["text"]["max_tokens"], config["text"]["extra_eos_ids"]
    (old / export.EXPORT_CONFIG).write_text(json.dumps(config))
    runner = OnnxModel(old, threads=1)
    assert (runner.window_samples, runner.prompt_length, runner.end_ids, runner.max_tokens) == (0, 1, [EOS], MAX_LENGTH)
    waves = runner.load_audio(clips(900, WINDOW + 30), RATE)  # longer than the window: not refused, as before
    features, frames = runner.log_mel(waves)
    assert frames.tolist() == [len(w) // TINY_AUDIO["hop_length"] + 1 for w in waves]
    _, states, mask = runner._run("audio_encoder", input_features=features, feature_lengths=frames)
    got = runner.generate(states, mask, max_new_tokens=8)
    plain = copy.deepcopy(model)
    plain.config.generation, plain.config.text.extra_eos_ids = None, []
    expected = plain.generate(
        audio_features=torch.from_numpy(features), feature_lengths=torch.from_numpy(frames), max_new_tokens=8
    )
    np.testing.assert_array_equal(got, expected.numpy())
    assert len(runner.transcribe(waves, RATE, 8)) == 2


def test_an_export_of_a_newer_format_is_refused_as_newer(tmp_path):
    """export_config.json carries its format's version: a runner meets a newer export with that, not by ignoring the
    keys it does not know (a runner before image.memory_start decoded a CoCa export from the wrong memory). An export
    without one (written before it was recorded) is of format 1."""
    from mmformer.ship.onnx_runner import EXPORT_FORMAT_VERSION

    text = {"max_length": 16, "bos_id": 1, "eos_id": 2, "pad_id": 0}
    config = {"format": "onnx", "graphs": {}, "text": text}
    (tmp_path / "export_config.json").write_text(json.dumps(config))
    OnnxModel(tmp_path)  # no format_version: an export from before it was written
    for version in (EXPORT_FORMAT_VERSION + 1, "2", True):
        (tmp_path / "export_config.json").write_text(json.dumps({**config, "format_version": version}))
        with pytest.raises(ValueError, match=rf"format_version {re.escape(repr(version))} was written by a newer"):
            OnnxModel(tmp_path)
