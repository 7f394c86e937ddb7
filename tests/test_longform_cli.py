"""``mmformer transcribe`` on long recordings: run as a user runs it (a fresh process), its files reloaded and
compared with the API's result; flags generated from the options dataclasses."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from mmformer.cli.main import _temperatures
from mmformer.cli.parser import build as _parser
from mmformer.longform import TranscribeOptions, VadOptions

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.longform import digits_recording  # noqa: E402

MODEL = str(ROOT / "data" / "digits_model")
RATE = 16000


def _run(*args: str, model: str = MODEL, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "mmformer.cli", "transcribe", "--model", model, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def talks(tmp_path_factory):
    """Two recordings as FLAC files and their truth."""
    root = tmp_path_factory.mktemp("talks")
    truths = []
    for i in range(2):
        wave, truth = digits_recording(8, seed=20 + i, offset=40 * i)
        sf.write(root / f"talk{i}.flac", wave.numpy(), RATE)
        truths.append(truth)
    return root, truths


def test_transcribe_writes_every_format_and_they_reload(talks, tmp_path):
    import srt
    import webvtt

    from mmformer import load_pretrained
    from mmformer.longform import transcribe_files

    root, truths = talks
    files = [str(root / "talk0.flac"), str(root / "talk1.flac")]
    done = _run(*files, "--vad", "--batch-size", "16", "--temperature", "0", "--output-format", "all",
                "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "realtime" in done.stderr and "audio s" in done.stderr  # the progress bar
    expected = transcribe_files(load_pretrained(MODEL), files, vad=True, batch_size=16)
    for i, truth in enumerate(truths):
        out = tmp_path / "out" / f"talk{i}"
        result = json.loads(out.with_suffix(".json").read_text())
        assert result == expected[i] and len(result["segments"]) >= len(truth) - 1
        subs = list(srt.parse(out.with_suffix(".srt").read_text()))
        cues = list(webvtt.read(str(out.with_suffix(".vtt"))))
        tsv = out.with_suffix(".tsv").read_text().splitlines()
        assert tsv[0] == "start\tend\ttext" and len(tsv) == len(result["segments"]) + 1
        for segment, sub, cue, row in zip(result["segments"], subs, cues, tsv[1:], strict=True):
            assert sub.content == cue.text == segment["text"] == row.split("\t")[2]
            assert abs(sub.start.total_seconds() - segment["start"]) < 1e-3
            assert abs(sub.end.total_seconds() - segment["end"]) < 1e-3
            assert cue.start == srt.timedelta_to_srt_timestamp(sub.start).replace(",", ".")
            assert int(row.split("\t")[0]) == round(1000 * segment["start"])
        assert out.with_suffix(".txt").read_text().split() == result["text"].split()


def test_transcribe_reports_unreadable_files_and_transcribes_the_others(talks, tmp_path):
    root, _ = talks
    corrupt, empty = tmp_path / "corrupt.flac", tmp_path / "empty.wav"
    corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 4)
    sf.write(empty, [], RATE)
    done = _run(str(corrupt), str(root / "talk0.flac"), str(empty), "--vad", "--no-progress")
    assert done.returncode != 0
    assert "corrupt.flac" in done.stderr and "empty.wav" in done.stderr
    warned = [line for line in done.stderr.splitlines() if "Warning" in line]  # one line each, no source code line
    assert warned and all(line.startswith("mmformer: UserWarning: ") for line in warned), done.stderr
    assert "results = transcribe_files(" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(root / "talk0.flac") + "\t") and len(lines[0].split()) > 8


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], None),  # TranscribeOptions' schedule
        (["--temperature", "0"], (0.0,)),  # one value: no fallback
        (["--temperature", "0,0.2", "--temperature", "0.4"], (0.0, 0.2, 0.4)),
        (["--temperature-increment-on-fallback", "0.25"], (0.0, 0.25, 0.5, 0.75, 1.0)),
        (["--temperature", "0.5", "--temperature-increment-on-fallback", "0.2"], (0.5, 0.7, 0.9)),
    ],
)
def test_temperature_flags(flags, expected):
    args = _parser().parse_args(["transcribe", "--model", MODEL, *flags, "a.flac"])
    assert _temperatures(args) == expected
    options = TranscribeOptions(temperature=expected) if expected else TranscribeOptions()
    assert len(options.temperature) == (len(expected) if expected else 6)


def test_transcribe_flags_come_from_the_options_dataclasses():
    transcribe = _parser()._subparsers._group_actions[0].choices["transcribe"]
    flags = {option for action in transcribe._actions for option in action.option_strings}
    for cls, prefix in ((TranscribeOptions, ""), (VadOptions, "vad-")):
        for f in dataclasses.fields(cls):
            assert f"--{prefix}{f.name.replace('_', '-')}" in flags, f.name
    assert {"--vad", "--no-vad", "--output-format", "--output-dir", "--batch-size", "--max-new-tokens"} <= flags
    args = _parser().parse_args(["transcribe", "--model", MODEL, "--vad-trim-db", "30", "--vad-merge", "x.flac"])
    assert args.vad_trim_db == 30.0 and args.vad_merge is True and args.vad is None


@pytest.mark.parametrize("vad", ["--vad", "--no-vad"])
def test_transcribe_a_whisper_checkpoint(talks, tmp_path, vad):
    """An openai-whisper checkpoint (whisper:NAME from its cache): sequential (openai's algorithm) or VAD-batched;
    the srt parses and matches the json."""
    import srt

    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    root, _ = talks
    save_pt(random_whisper(seed=0), tmp_path / "cache" / "whisper" / "rand.pt")  # a name openai-whisper does not know
    flags = ["--temperature", "0", "--language", "en", "--output-format", "all", "--output-dir", str(tmp_path)]
    done = _run(str(root / "talk0.flac"), vad, *flags, model="whisper:rand", XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "talk0.json").read_text())
    assert result["language"] == "en"
    subs = list(srt.parse((tmp_path / "talk0.srt").read_text()))
    assert [s.content for s in subs] == [s["text"].strip() for s in result["segments"]]


def test_transcribe_reads_a_learned_decoder_prefix(tmp_path, capsys):
    """``--prompt`` (prompt tuning's decoder prefix) still applies to transcribe: the printed text is
    model.transcribe's with the same prefix."""
    import torch

    from mmformer import load_pretrained
    from mmformer.adapt.prompts import DecoderPrefix, load_prompt
    from mmformer.cli.main import main

    model = load_pretrained(MODEL)
    torch.manual_seed(0)
    DecoderPrefix(2, model.config.width("decoder")).save(tmp_path / "prefix.safetensors")
    clip = str(ROOT / "data" / "digits" / "audio" / "test" / "000002.flac")
    main(["transcribe", "--model", MODEL, "--prompt", str(tmp_path / "prefix.safetensors"), "--no-progress", clip])
    prefix = load_prompt(tmp_path / "prefix.safetensors", model, kind=DecoderPrefix.kind).vectors
    assert capsys.readouterr().out == f"{clip}\t{model.transcribe([clip], prefix_embeds=prefix)[0].strip()}\n"


def test_two_inputs_that_would_write_the_same_files_are_refused(tmp_path):
    from mmformer.cli.main import main

    with pytest.raises(SystemExit, match=r"files: .*a\.flac and .*a\.wav would both write"):
        main(["transcribe", "--model", MODEL, "--output-format", "txt", "--output-dir", str(tmp_path),
              str(tmp_path / "x" / "a.flac"), str(tmp_path / "a.wav")])  # fmt: skip


def test_an_output_dir_that_is_a_file_stops_the_run_before_any_work(tmp_path, monkeypatch):
    """It stopped only when the first transcript was written, after every file was transcribed."""
    from mmformer.cli import main as cli

    (tmp_path / "out").write_text("a file")
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="File exists"):
        cli.main(["transcribe", "--model", MODEL, "--output-format", "txt", "--output-dir", str(tmp_path / "out"),
                  str(tmp_path / "a.flac")])  # fmt: skip


@pytest.mark.parametrize(
    "flags",
    [
        ["--word-timestamps"],
        ["--clip-timestamps", "2,4"],
        ["--initial-prompt", "nine"],
        ["--temperature", "0,0.5,1.0"],  # a fallback schedule (one temperature is read)
        ["--logprob-threshold", "-0.5"],
        ["--compression-ratio-threshold", "1.5"],
        ["--no-speech-threshold", "none"],
        ["--no-condition-on-previous-text"],
    ],
)
def test_whisper_options_are_refused_for_a_model_trained_here(flags, tmp_path):
    """They were ignored: the transcript came back as without them."""
    from mmformer.cli.main import main

    name = flags[0][2:].replace("-", "_").removeprefix("no_")
    with pytest.raises(SystemExit, match=f"{name}: needs a Whisper checkpoint"):
        main(["transcribe", "--model", MODEL, *flags, "--no-progress", str(tmp_path / "a.flac")])


def test_a_fallback_increment_is_refused_for_a_model_trained_here(tmp_path):
    """Even where it leaves one temperature (1.0 by 0.5 up to 1.0): it was ignored as silently."""
    from mmformer.cli.main import main

    with pytest.raises(SystemExit, match="--temperature-increment-on-fallback: needs a Whisper checkpoint"):
        main(["transcribe", "--model", MODEL, "--temperature", "1.0", "--temperature-increment-on-fallback", "0.5",
              "--no-progress", str(tmp_path / "a.flac")])  # fmt: skip


@pytest.fixture(scope="module")
def whisper_cache(tmp_path_factory):
    """An XDG cache holding openai-whisper's checkpoint ``whisper:rand`` (random weights, small widths)."""
    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    cache = tmp_path_factory.mktemp("cache")
    save_pt(random_whisper(seed=0), cache / "whisper" / "rand.pt")
    return cache


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        (["--max-new-tokens", "3"], ""),
        (["--min-new-tokens", "50"], ""),  # was checked against max_new_tokens (30), a default Whisper never reads
        (["--num-beams", "3"], "; use --beam-size (openai-whisper's beam width)"),
        (["--repetition-penalty", "100"], ""),
        (["--top-k", "1"], ""),
        (["--stop-strings", "X"], ""),
        (["--do-sample"], "; a --temperature above 0 samples"),
    ],
)
def test_decoding_flags_a_whisper_checkpoint_ignores_are_refused_by_name(whisper_cache, monkeypatch, flags, hint):
    """openai-whisper's algorithm reads TranscribeOptions alone: these printed the same text as without them."""
    import re

    from mmformer.cli.main import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(whisper_cache))
    with pytest.raises(SystemExit, match=re.escape(f"{flags[0]}: a Whisper checkpoint decodes with openai-whisper's "
                                                   f"algorithm, which does not read it{hint}; got")):  # fmt: skip
        main(["transcribe", "--model", "whisper:rand", *flags, "--no-progress", "missing.flac"])


def test_a_whisper_checkpoints_beam_size_passes_to_the_files(whisper_cache, monkeypatch):
    from mmformer.cli.main import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(whisper_cache))
    with pytest.raises(SystemExit, match=r"transcribe: error: .*missing\.flac"):  # not refused: it reached the file
        main(["transcribe", "--model", "whisper:rand", "--beam-size", "2", "--no-progress", "missing.flac"])


def test_transcribe_int8_runs_a_whisper_checkpoints_int8_encoder_and_refuses_other_models(talks, tmp_path):
    """``--compute-type int8``: a Whisper checkpoint's audio encoder quantized at load (PT2E dynamic) transcribes
    (json written, English, segments); a model trained here is refused by name, nothing written. The int8 run has
    dynamo off (its graph runs uncompiled, as the reference graph): the compiled graph, quantized by the same
    ``with_compute_type``, is tests/test_serve.py's int8 server's, and a compile here took half of this test."""
    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    root, _ = talks
    save_pt(random_whisper(seed=0), tmp_path / "cache" / "whisper" / "rand.pt")
    flags = ["--vad", "--temperature", "0", "--language", "en", "--output-format", "json"]
    flags += ["--output-dir", str(tmp_path)]
    done = _run(str(root / "talk0.flac"), "--compute-type", "int8", *flags, model="whisper:rand",
                XDG_CACHE_HOME=str(tmp_path / "cache"), TORCHDYNAMO_DISABLE="1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "talk0.json").read_text())
    assert result["language"] == "en" and result["segments"]
    # auto: bf16 autocast for the encoder where the CPU has AMX, float32 elsewhere; the choice is printed
    from mmformer.compress.cpu_precision import bf16_choice

    done = _run(str(root / "talk0.flac"), "--compute-type", "auto", *flags, model="whisper:rand",
                XDG_CACHE_HOME=str(tmp_path / "cache"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"the audio encoder's {bf16_choice()[1]}" in done.stderr
    from mmformer import load_pretrained
    from mmformer.cli.main import main  # the refusal in this process: it comes before any work
    from mmformer.longform import with_compute_type

    digits = load_pretrained(MODEL)  # auto keeps float32 for a model trained here, and says why
    assert with_compute_type(digits, "auto", "digits")[:2] == (digits, False)
    for compute_type in ("int8", "bfloat16"):
        with pytest.raises(SystemExit, match="only under a Whisper checkpoint's decoder"):
            main(["transcribe", "--model", MODEL, str(root / "talk1.flac"), "--compute-type", compute_type,
                  "--output-format", "json", "--output-dir", str(tmp_path)])  # fmt: skip
    assert not (tmp_path / "talk1.json").exists()


def test_output_dir_without_output_format_is_refused_naming_both_flags(tmp_path, monkeypatch):
    """It was ignored silently: exit 0, nothing written, the transcripts on stdout."""
    from mmformer.cli import main as cli

    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"--output-dir: writes files only with --output-format \(one of txt, json"):
        cli.main(["transcribe", "--model", MODEL, "--output-dir", str(tmp_path / "subs"), str(tmp_path / "a.flac")])
    assert not (tmp_path / "subs").exists()


def test_a_folder_in_the_way_of_one_output_is_named_and_the_others_are_written(tmp_path):
    """Each file's outputs are written as it is done; one that cannot be written (a folder where b.txt goes) is
    named with its OS error and a non-zero exit, and every other output is still written (it stopped the run after
    all the work, with none written)."""
    from mmformer.cli.main import main

    clips = ROOT / "data" / "digits" / "audio" / "test"
    for i, name in enumerate("abc"):
        (tmp_path / f"{name}.flac").symlink_to(clips / f"00000{i}.flac")
    (tmp_path / "out" / "b.txt").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"cannot write .*b\.txt: Is a directory") as exit_:
        main(["transcribe", "--model", MODEL, "--output-format", "all", "--output-dir", str(tmp_path / "out"),
              "--batch-size", "1", "--no-progress", *(str(tmp_path / f"{n}.flac") for n in "abc")])  # fmt: skip
    assert "b.json" not in str(exit_.value)
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_file())
    assert written == sorted(f"{n}.{f}" for n in "abc" for f in ("txt", "json", "srt", "vtt", "tsv") if n + f != "btxt")


def test_ctrl_c_keeps_the_outputs_written_and_ends_with_one_line(tmp_path):
    """SIGINT (a terminal's Ctrl-C) in the middle of many files: exit status 130, one line on stderr after what was
    printed before (no traceback), and the transcripts of the files done by then on disk, whole."""
    import signal

    clip = ROOT / "data" / "digits" / "audio" / "test" / "000002.flac"
    files = []
    for i in range(400):
        files.append(tmp_path / f"c{i:03d}.flac")
        files[-1].symlink_to(clip)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mmformer.cli", "transcribe", "--model", MODEL, "--batch-size", "1", "--no-progress",
           "--output-format", "txt", "--output-dir", str(tmp_path / "out"), *map(str, files)]  # fmt: skip
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as p:
        first = p.stderr.readline()  # "wrote .../cNNN.txt": decoding is under way
        p.send_signal(signal.SIGINT)
        rest = p.stderr.read()
    assert first.startswith("wrote "), first + rest
    assert p.returncode == 130 and rest.splitlines()[-1] == "mmformer transcribe: interrupted", rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    written = list((tmp_path / "out").glob("*.txt"))
    assert 0 < len(written) < len(files)
    expected = written[0].read_text()
    assert expected.strip() and all(path.read_text() == expected for path in written)
