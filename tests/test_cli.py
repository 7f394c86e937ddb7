"""The inference subcommands of ``mmformer`` on a tiny saved model: help, zeroshot, caption, transcribe, export."""

import re

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmformer import AudioConfig, ImageConfig, ModelConfig, MultimodalTransformer, Processor, StackConfig, TextConfig
from mmformer.cli.main import USAGE, main
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig
from mmformer.preprocess.tokenizer import Tokenizer

WORDS = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORDS * 20, vocab_size=280, max_length=8)
    config = ModelConfig(
        stacks={"shared": StackConfig(width=32, depth=1, n_heads=2, cross_attention=True)},
        image=ImageConfig(image_size=[16, 16], patch_size=8, channels=1),
        audio=AudioConfig(n_mels=16, max_frames=200),
        text=TextConfig(vocab_size=tokenizer.vocab_size, max_length=8),
        embed_dim=16,
    )
    processor = Processor(
        tokenizer,
        ImageProcessorConfig(image_size=16, resize="exact", mean=(0.5,), std=(0.5,), channels=1),
        AudioProcessorConfig(sample_rate=16000),
    )
    model = MultimodalTransformer(config)
    model.save_pretrained(root / "model", processor=processor)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(root / "a.png")
    sf.write(root / "a.wav", np.random.default_rng(1).standard_normal(8000).astype("float32") * 0.1, 16000)
    return root


def test_help_prints_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert out.strip() == USAGE.strip()
    for command in ("fit", "validate", "test", "predict", "export", "zeroshot", "caption", "transcribe", "convert"):
        assert f"  {command} " in out


def test_python_dash_m_mmformer_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mmformer", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == USAGE.strip(), done.stderr[-2000:]


def test_every_sub_command_help_prints_one_usage_line(capsys):
    """``mmformer NAME --help`` starts with one ``usage: mmformer NAME`` line (not "usage: usage: ..."), for every
    sub-command the parser has and for the training commands (LightningCLI's own help)."""
    import argparse

    from mmformer.cli.main import TRAIN_COMMANDS
    from mmformer.cli.parser import build

    sub = next(a for a in build()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"export", "transcribe", "caption", "zeroshot", "merge", "convert"} <= set(sub.choices)
    for command in [*sub.choices, TRAIN_COMMANDS[0]]:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code in (0, None), command
        first = out.splitlines()[0]  # LightningCLI writes "usage: mmformer [options] fit ..."
        assert out.count("usage:") == 1 and first.startswith("usage: mmformer ") and f" {command} " in first, out[:200]


def test_help_and_usage_errors_import_no_torch():
    """``mmformer merge --help`` (and every other command's help and usage errors, ``fit`` aside: LightningCLI)
    imported torch (2–7 s): the parser built every command's options, and caption's, complete's and transcribe's come
    from DecodingOptions / TranscribeOptions / VadOptions, which lived in modules that import torch. The parser now
    builds only the command being run, from the torch-free option modules. In a fresh process (torch stays in
    ``sys.modules`` once imported)."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys\n"
        "from mmformer.cli.main import main\n"
        "for command in ('merge', 'export', 'quantize', 'serve', 'zeroshot', 'convert', 'caption', 'complete',\n"
        "                'transcribe'):\n"
        "    for argv in ([command, '--help'], [command, '--bogus']):\n"
        "        out, err = io.StringIO(), io.StringIO()\n"
        "        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "            try:\n"
        "                main(argv)\n"
        "            except SystemExit as e:\n"
        "                code = e.code\n"
        "        assert f'usage: mmformer {command}' in out.getvalue() + err.getvalue(), (argv, code, err.getvalue())\n"
        "        assert code == (2 if '--bogus' in argv else 0), (argv, code)\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", (done.stdout, done.stderr[-2000:])


def test_zeroshot_reads_class_names_from_a_file_one_a_line(saved, tmp_path, capsys):
    """ImageNet's names hold commas ("tench, Tinca tinca"): --classes split them into other classes silently;
    --classes-file takes one name a line."""
    names = tmp_path / "classes.txt"
    names.write_text("zero, nought\n\none\ntwo\n", encoding="utf-8")
    main(["zeroshot", "--model", str(saved / "model"), "--classes-file", str(names), "--top", "3",
          str(saved / "a.png")])  # fmt: skip
    shown = [line.split("  ")[1].strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert sorted(shown) == ["one", "two", "zero, nought"]
    names.write_text("\n \n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"--classes-file: expected class names, one a line; .*classes.txt has none"):
        main(["zeroshot", "--model", str(saved / "model"), "--classes-file", str(names), str(saved / "a.png")])
    with pytest.raises(SystemExit):  # one or the other
        main(["zeroshot", "--model", str(saved / "model"), "--classes", "a,b", "--classes-file", str(names), "x.png"])


def test_zeroshot_mixes_images_and_audio(saved, capsys):
    main(["zeroshot", "--model", str(saved / "model"), "--classes", ",".join(WORDS), "--top", "3",
          str(saved / "a.png"), str(saved / "a.wav")])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("a.png") and lines[4].endswith("a.wav")
    probs = [float(line.split()[-1]) for line in lines if line.startswith("  ")]
    # three classes of three printed at 3 decimals: each rounds by at most 5e-4
    assert len(probs) == 6 and abs(sum(probs[:3]) - 1) <= 1.5e-3 and abs(sum(probs[3:]) - 1) <= 1.5e-3
    # the encoders under bf16 autocast (asked for; `auto` where the CPU has AMX): the choice on stderr, the
    # probabilities near float32's
    main(["zeroshot", "--model", str(saved / "model"), "--classes", ",".join(WORDS), "--top", "3", "--compute-type",
          "bfloat16", str(saved / "a.png"), str(saved / "a.wav")])  # fmt: skip
    out = capsys.readouterr()
    assert "mmformer zeroshot: bf16 autocast on: asked for" in out.err
    bf16 = [float(line.split()[-1]) for line in out.out.splitlines() if line.startswith("  ")]
    assert len(bf16) == 6 and max(abs(a - b) for a, b in zip(bf16, probs)) <= 0.05


@pytest.mark.parametrize(
    ("command", "file", "extra"),
    [("caption", "a.png", []), ("transcribe", "a.wav", []), ("transcribe", "a.wav", ["--compile"])],
)
def test_caption_and_transcribe_print_one_line_per_file(saved, capsys, command, file, extra):
    args = [command, "--model", str(saved / "model"), "--max-new-tokens", "3", *extra]
    main([*args, str(saved / file), str(saved / file)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(str(saved / file) + "\t") for line in lines)
    if extra:  # the compiled decoder step prints what the eager one prints
        main([*args[:-1], str(saved / file), str(saved / file)])
        assert capsys.readouterr().out.splitlines() == lines


def test_zeroshot_prints_mixed_files_in_the_order_given(saved, tmp_path, capsys):
    """Images and audio mixed: one classifier per modality, the answers printed in the files' order (they came
    grouped by modality); a learned prompt and templates together are refused (the templates were ignored)."""
    files = [str(saved / "a.png"), str(saved / "a.wav"), str(tmp_path / "b.png")]
    Image.open(saved / "a.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(files[2])
    main(["zeroshot", "--model", str(saved / "model"), "--classes", ",".join(WORDS), *files])
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert printed == files
    with pytest.raises(SystemExit, match=r"--templates: a learned prompt \(--prompt\) replaces the templates"):
        main(["zeroshot", "--model", str(saved / "model"), "--classes", "zero,one", "--prompt", "p.safetensors",
              "--templates", "a {}", files[0]])  # fmt: skip
    with pytest.raises(SystemExit, match=r"mmformer export: error: .*nope\.ckpt: no such file$"):
        main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")])


def test_temperature_0_decodes_greedily_as_transcribe_and_the_server_take_it(saved, capsys):
    main(["caption", "--model", str(saved / "model"), "--max-new-tokens", "4", str(saved / "a.png")])
    greedy = capsys.readouterr().out
    main(["caption", "--model", str(saved / "model"), "--max-new-tokens", "4", "--temperature", "0",
          str(saved / "a.png")])  # fmt: skip
    assert capsys.readouterr().out == greedy  # was "temperature: expected a number > 0 (do_sample=False ...)"


def test_missing_file_is_a_clean_error(saved):
    with (
        pytest.warns(UserWarning, match=r"caption: skipped .*nothere\.png: file not found"),
        pytest.raises(SystemExit, match=r"mmformer caption: error: .*nothere\.png"),
    ):
        main(["caption", "--model", str(saved / "model"), str(saved / "nothere.png")])
    with pytest.raises(SystemExit, match=r"mmformer zeroshot: error: --classes: expected comma-separated class names, "
                                         r"got ' , '"):  # fmt: skip
        main(["zeroshot", "--model", str(saved / "model"), "--classes", " , ", str(saved / "a.png")])
    with pytest.raises(SystemExit, match=r"mmformer complete: error: complete: this model's decoder reads an encoder"):
        main(["complete", "--model", str(saved / "model"), "one"])  # a captioner: no bare prompts


def test_export_turns_a_checkpoint_into_a_pretrained_directory(saved, tmp_path, capsys):
    model = MultimodalTransformer.from_pretrained(saved / "model")
    processor = model.processor
    tokenizer_json = processor.tokenizer.backend.to_str()
    state = {"model." + k: v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"model": model.config.to_dict()},
                "mmformer": {"model_config": model.config.to_dict(), "tokenizer_json": tokenizer_json,
                             "preprocessor_config": processor.to_dict()}}, ckpt)  # fmt: skip
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    exported = MultimodalTransformer.from_pretrained(tmp_path / "out")
    assert exported.processor is not None and exported.processor.tokenizer.vocab_size == processor.tokenizer.vocab_size
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(exported.encode_image(x), model.encode_image(x))


def test_a_saved_out_folder_is_refused_before_any_work_and_replaced_whole_with_overwrite(saved, tmp_path, monkeypatch):
    """``--out`` holding a saved model (or export) is refused at once, naming --overwrite — the ONNX export wrote its
    config.json into a user's model folder without --overwrite, and quantizing refused only after its work, with a
    traceback; with --overwrite, the new artifact replaces the old one's files (a float export written over a PT2E
    folder kept its int8 scales and loaded as int8) and keeps the user's."""
    from mmformer.compress import pt2e
    from mmformer.io.auto import load_for_inference

    user = tmp_path / "user"
    MultimodalTransformer.from_pretrained(saved / "model").save_pretrained(user)
    (user / "notes.md").write_text("mine")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    called = []
    monkeypatch.setattr("mmformer.io.auto.load_pretrained", lambda *a, **k: called.append(a))  # no work may start
    for command in (["export", "--model", str(saved / "model"), "--format", "onnx"],
                    ["quantize", "--model", str(saved / "model"), "--method", "dynamic"],
                    ["convert", str(saved / "model")]):  # fmt: skip
        with pytest.raises(SystemExit, match=rf"mmformer {command[0]}: error: --out: .* already holds a saved model or "
                                             "export; pass --overwrite to replace it"):  # fmt: skip
            main([*command, "--out", str(user)])
    assert not called and {p.name: p.read_bytes() for p in user.iterdir()} == before
    with pytest.raises(SystemExit, match=r"mmformer quantize: error: --device: got 'cuda'.* sees no CUDA GPU"):
        main(["quantize", "--model", str(saved / "model"), "--method", "dynamic", "--device", "cuda",
              "--out", str(tmp_path / "x")])  # fmt: skip
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match=r"mmformer convert: error: .*afile"):  # a file where a folder must go
        main(["convert", str(saved / "model"), "--out", str(tmp_path / "afile" / "sub")])
    monkeypatch.undo()

    main(["quantize", "--model", str(saved / "model"), "--backend", "pt2e", "--method", "dynamic", "--towers", "image",
          "--out", str(user), "--overwrite"])  # fmt: skip
    assert isinstance(load_for_inference(user), pt2e.PT2EModel)
    main(["export", "--model", str(saved / "model"), "--format", "pretrained", "--out", str(user), "--overwrite"])
    assert isinstance(load_for_inference(user), MultimodalTransformer)  # the float model: no stale int8 scales
    assert not (user / pt2e.QPARAMS_FILE).exists() and (user / "notes.md").read_text() == "mine"
    main(["export", "--model", str(saved / "model"), "--format", "onnx", "--towers", "image", "--out", str(user),
          "--overwrite"])  # fmt: skip
    assert sorted(p.name for p in user.iterdir() if p.suffix in (".onnx", ".safetensors")) == ["image_encoder.onnx"]
    with pytest.raises(SystemExit, match=r"an `mmformer export` folder .* mmformer.ship.onnx_runner.OnnxModel"):
        main(["zeroshot", "--model", str(user), "--classes", "zero,one", str(saved / "a.png")])  # graphs, no weights


def test_the_artifact_files_a_save_replaces_are_the_owners_names():
    from mmformer.compress import pt2e
    from mmformer.io import pretrained
    from mmformer.ship import export

    assert {pt2e.QPARAMS_FILE, export.EXPORT_CONFIG, export.MEL_FILTERS} <= pretrained.ARTIFACT_FILES
    assert all(suffix in pretrained.ARTIFACT_SUFFIXES for suffix in export.SUFFIX.values())


def test_number_flags_that_may_be_none_take_none(capsys):
    """``float | None`` / ``int | None`` options take ``none`` (any case), as openai-whisper's optional_float does:
    the help of --vad-trim-db and --vad-pack-gap-ms names "none: ..." and the parser refused it; other text is still
    refused naming the flag, and a string option keeps "none" as its text."""
    from mmformer.cli.parser import build, dataclass_of
    from mmformer.longform import VadOptions

    def parse(*flags):
        return build().parse_args(["transcribe", "--model", "m", *flags, "a.flac"])

    args = parse("--vad-trim-db", "none", "--vad-pack-gap-ms", "None", "--no-speech-threshold", "NONE",
                 "--vad-max-window-s", "12.5", "--initial-prompt", "none")  # fmt: skip
    assert (args.vad_trim_db, args.vad_pack_gap_ms, args.no_speech_threshold) == (None, None, None)
    assert args.vad_max_window_s == 12.5 and args.initial_prompt == "none"
    vad = dataclass_of(VadOptions, args, prefix="vad_")
    assert (vad.trim_db, vad.pack_gap_ms) == (None, None) and VadOptions().trim_db is not None
    for flag, value, expected in (("--vad-trim-db", "loud", "a number"), ("--vad-pack-gap-ms", "1.5", "an int")):
        with pytest.raises(SystemExit):
            parse(flag, value)
        assert f"argument {flag}: expected {expected} or none, got '{value}'" in capsys.readouterr().err
    caption = build().parse_args(["caption", "--model", "m", "--top-k", "none", "--top-p", "0.9", "a.png"])
    assert (caption.top_k, caption.top_p) == (None, 0.9)


def test_zeroshot_auto_reads_every_audio_format_soundfile_reads_and_files_without_a_suffix(saved, tmp_path, capsys):
    """``--modality auto`` took every suffix but .wav/.flac/.ogg/.mp3/.opus for an image ("cannot decode image" for
    .aiff, .au, .caf, .w64 and files without a suffix): the suffixes of soundfile's formats are audio, PIL's images,
    and a file with neither is decided by its content; one that neither reads is skipped, named with the fix."""
    wave, rate = sf.read(saved / "a.wav", dtype="float32")
    audio = [tmp_path / name for name in ("a.aiff", "a.au", "a.caf", "a.w64")]
    for path, kind in zip(audio, ("AIFF", "AU", "CAF", "W64")):
        sf.write(path, wave, rate, format=kind, subtype="PCM_16")  # the samples a.wav holds (PCM_16 too)
    audio.append(tmp_path / "wave_without_suffix")
    (tmp_path / "wave_without_suffix").write_bytes((saved / "a.wav").read_bytes())
    (tmp_path / "png_without_suffix").write_bytes((saved / "a.png").read_bytes())
    (tmp_path / "noise").write_bytes(np.random.default_rng(0).bytes(300))
    files = [str(saved / "a.wav"), str(saved / "a.png"), *map(str, audio), str(tmp_path / "png_without_suffix")]
    neither = r"noise: neither audio soundfile reads nor an image PIL reads; pass --modality image or --modality audio"
    with pytest.warns(UserWarning, match=rf"zeroshot: skipped .*{neither}"), pytest.raises(SystemExit) as exit_:
        main(["zeroshot", "--model", str(saved / "model"), "--classes", ",".join(WORDS), "--top", "3", *files,
              str(tmp_path / "noise")])  # fmt: skip
    assert re.fullmatch(rf"mmformer zeroshot: error: .*{neither}", str(exit_.value.code))
    lines = capsys.readouterr().out.splitlines()
    answers = {}  # path → its printed classes and probabilities
    for line in lines:
        if line.startswith(" "):
            answers[path].append(line)
        else:
            path, answers[line] = line, []
    assert list(answers) == files
    assert all(answers[f] == answers[files[0]] for f in map(str, audio))  # read as the same audio as a.wav
    assert answers[files[-1]] == answers[files[1]] != answers[files[0]]  # the PNG, read as an image


def test_caption_and_zeroshot_skip_a_file_they_cannot_read_as_transcribe_does(saved, tmp_path, capsys):
    """A file that does not decode stopped caption and zeroshot there: the files after it got no result. Like
    transcribe, they warn naming it, give every other file's result and exit non-zero naming it."""
    (tmp_path / "bad.png").write_bytes(np.random.default_rng(0).bytes(300))
    good, bad = str(saved / "a.png"), str(tmp_path / "bad.png")
    runs = [("caption", ["--max-new-tokens", "3", "--batch-size", "2"], [bad, good, good]),
            ("zeroshot", ["--classes", ",".join(WORDS)], [good, bad, str(saved / "a.wav")])]  # fmt: skip
    for command, extra, files in runs:
        with (
            pytest.warns(UserWarning, match=rf"{command}: skipped .*bad\.png: cannot decode image"),
            pytest.raises(SystemExit, match=rf"^mmformer {command}: error: .*bad\.png: cannot decode image"),
        ):
            main([command, "--model", str(saved / "model"), *extra, *files])
        printed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
        assert printed == [f for f in files if f != bad], command


@pytest.mark.parametrize("top", ["0", "-1", "two"])
def test_zeroshot_top_below_one_is_refused_naming_the_flag(capsys, top):
    """The parser refuses it before the model loads: it named the classifier's ``k`` ("k: expected a positive int")."""
    from mmformer.cli.parser import build

    with pytest.raises(SystemExit):
        build("zeroshot").parse_args(["zeroshot", "--model", "m", "--classes", "a,b", "--top", top, "a.png"])
    assert f"argument --top: expected an int >= 1, got '{top}'" in capsys.readouterr().err
    assert build("zeroshot").parse_args(["zeroshot", "--model", "m", "--classes", "a", "--top", "2", "a.png"]).top == 2


def test_a_reader_closing_the_pipe_ends_the_command_quietly(saved):
    """``mmformer caption ... | head -1``: the reader gone is no error (it was "error: [Errno 32] Broken pipe" and
    exit 1): no message and exit status 141 (128 + SIGPIPE, as a tool that signal killed)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmformer", "caption", "--model", str(saved / "model"), str(saved / "a.png")]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        p.stdout.close()  # the reader goes before a line is written
        err = p.stderr.read()
    assert p.returncode == 141 and err == "", err[-2000:]


def test_ctrl_c_is_one_line_and_exit_status_130(monkeypatch, capsys):
    """A KeyboardInterrupt leaves main() (tests and callers see it) and run() turns it into one line, not a
    traceback through torch."""
    from mmformer.cli import main as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr("sys.argv", ["mmformer", "transcribe", "--model", "m", "a.flac"])
    with pytest.raises(SystemExit) as exit_:
        try:
            cli.run()
        except KeyboardInterrupt:
            pytest.fail("run() let the KeyboardInterrupt through (a traceback)")
    assert exit_.value.code == 130 and capsys.readouterr().err == "mmformer transcribe: interrupted\n"
