"""Text that is not valid Unicode, paths whose names are not UTF-8 (or not ASCII under a non-UTF-8 locale), inputs
that are pipes, and a tokenizer cache that cannot be written: each is read, or refused with a message naming the
argument and the true reason — never tokenizers' bare TypeError, a "file not found" for a file that is there, or a
training run stopped by an optimisation.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from test_data import write_digits, write_manifest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from mmformer.data.datamodule import MultimodalDataModule
from mmformer.data.io import read_text
from mmformer.preprocess.media import MissingSampleError, SampleError, decode_audio, file_modality, read_image
from mmformer.preprocess.processor import ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.zeroshot import ZeroShotClassifier

NOT_UNICODE = r"expected valid Unicode text; got 'z\\udce9ro', with an unpaired surrogate '\\udce9' at character 1"


@pytest.fixture
def tokenizer() -> Tokenizer:
    """A word-level tokenizer over the tiny model's 32 ids (<pad> <bos> <eos> zero one w5 … w31)."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "zero": 3, "one": 4, **{f"w{i}": i for i in range(5, 32)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    return Tokenizer(backend, max_length=16, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def latin1_folder(parent: Path) -> Path:
    """A folder named "modèle" in Latin-1 (byte E8): Python holds its name with a surrogate escape ("mod\\udce8le"),
    as it holds any non-ASCII name under a non-UTF-8 locale."""
    folder = os.fsencode(parent) + b"/mod\xe8le"
    os.mkdir(folder)
    return Path(os.fsdecode(folder))


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pipe_holding() -> Iterator[Callable[[bytes], str]]:
    """``pipe_holding(data)``: the /dev/fd path of a pipe holding ``data`` (small: it fits the pipe's buffer), as
    bash's ``<(cat x.png)`` gives; the pipes are closed after the test."""
    opened = []

    def make(data: bytes) -> str:
        read_end, write_end = os.pipe()
        os.write(write_end, data)
        os.close(write_end)
        opened.append(read_end)
        return f"/dev/fd/{read_end}"

    yield make
    for fd in opened:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- text
def test_text_that_is_not_unicode_is_refused_naming_the_callers_argument(tokenizer, tiny_model):
    """An unpaired surrogate (argv's undecodable bytes) reached tokenizers' encoders, whose bare TypeError named
    nothing; every path that encodes text now refuses it under the name of what the caller passed."""
    with pytest.raises(ValueError, match="^text: " + NOT_UNICODE):
        tokenizer.encode("z\udce9ro")
    with pytest.raises(ValueError, match=r"^prompts\[2\]: " + NOT_UNICODE):
        tokenizer.encode("z\udce9ro", name="prompts[2]")
    with pytest.raises(ValueError, match=r"^texts\[1\]: " + NOT_UNICODE):
        tokenizer(["one", "z\udce9ro"])
    processor = Processor(tokenizer, image=ImageProcessorConfig(image_size=16))
    for kwargs in ({}, {"text_max_length": 8}):  # warned truncation, or the caller's length
        with pytest.raises(ValueError, match=r"^text\[1\]: " + NOT_UNICODE):
            processor(text=["one", "z\udce9ro"], **kwargs)
    with pytest.raises(ValueError, match=r"^classnames\[1\]: " + NOT_UNICODE):
        ZeroShotClassifier(tiny_model, processor, ["one", "z\udce9ro"], ["{}"]).predict_proba(np.zeros((1, 16, 16, 3)))
    long = r"got 'w5 w5 [w5 ]*\.\.\.', with an unpaired surrogate '\\ud800' at character 60 \(undecodable bytes\?\)$"
    with pytest.raises(ValueError, match=long):
        tokenizer(["w5 " * 20 + "\ud800"])  # a long text is shown cut; the position still names the character
    assert tokenizer.encode("zero one") == [1, 3, 4, 2]


def test_the_onnx_runner_refuses_such_class_names_and_reads_its_tokenizer_from_any_folder(tokenizer, tmp_path):
    """The torch-free runner refuses such text by the same rule, naming the class, and reads a tokenizer.json in a
    folder whose name is not UTF-8 (tokenizers' from_file could not open it). An export of only its text settings
    and tokenizer is enough to tokenize."""
    pytest.importorskip("onnxruntime")
    from mmformer.ship.onnx_runner import OnnxModel

    folder = latin1_folder(tmp_path)
    tokenizer.save(folder)
    text = {"max_length": 16, "bos_id": 1, "eos_id": 2, "pad_id": 0}
    (folder / "export_config.json").write_text(json.dumps({"format": "onnx", "graphs": {}, "text": text}))
    runner = OnnxModel(folder)
    ids, mask = runner.tokenize(["zero one", "one"])
    assert ids.tolist() == [[1, 3, 4, 2], [1, 4, 2, 0]] and mask.sum(axis=1).tolist() == [4, 3]
    with pytest.raises(ValueError, match=r"^classnames\[1\]: " + NOT_UNICODE):
        runner.class_embeddings(["one", "z\udce9ro"])
    with pytest.raises(ValueError, match=r"^texts\[0\]: " + NOT_UNICODE):
        runner.tokenize(["z\udce9ro"])


# ---------------------------------------------------------------------------------------------------- paths
def test_a_tokenizer_and_processor_in_a_folder_whose_name_is_not_utf8_load(tokenizer, tmp_path):
    """tokenizers' from_file takes the path as UTF-8 and failed on a surrogate-escaped name, blaming the file ("is not
    a valid tokenizer.json: 'utf-8' codec can't encode ... surrogates not allowed")."""
    folder = latin1_folder(tmp_path)
    Processor(tokenizer, image=ImageProcessorConfig(image_size=16)).save_pretrained(folder)
    assert Tokenizer.from_file(folder).encode("zero one") == [1, 3, 4, 2]
    assert Processor.from_pretrained(folder).tokenizer.encode("one") == [1, 4, 2]
    (folder / "tokenizer.json").write_bytes(b"\xff{")
    with pytest.raises(ValueError, match=r"mod\\udce8le/tokenizer.json' is not a valid tokenizer.json: 'utf-8' codec"):
        Tokenizer.from_file(folder)


def test_under_a_non_utf8_locale_non_ascii_paths_load_or_say_why(tokenizer, tmp_path):
    """Under the C locale (UTF-8 mode and locale coercion off) a folder "modèle" given on the command line arrives
    surrogate-escaped and its tokenizer.json loads; a manifest's "é.png" (text read as UTF-8) cannot be spelled in
    ASCII, which the message says — Path.is_file() swallowed that and every such row was "file not found"."""
    (tmp_path / "modèle").mkdir()
    tokenizer.save(tmp_path / "modèle")
    (tmp_path / "é.png").write_bytes(png_bytes())
    child = """
import json, sys
from mmformer.preprocess.media import SampleError, read_image, read_tokenizer_json
out = {"vocab": read_tokenizer_json(sys.argv[1] + "/tokenizer.json").get_vocab_size()}
try:
    read_image(sys.argv[2] + "/\\u00e9.png")  # as a manifest's UTF-8 text holds it
except SampleError as e:
    out["image"] = e.reason
print(json.dumps(out))
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    args = [sys.executable, "-c", child, str(tmp_path / "modèle"), str(tmp_path)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["vocab"] == tokenizer.vocab_size
    assert out["image"] == (
        "the path cannot be spelled in the file system encoding 'ascii' ('é' at character "
        f"{len(str(tmp_path)) + 1}); use a UTF-8 locale or set PYTHONUTF8=1"
    )


def test_pipes_are_read_and_folders_and_missing_paths_say_so(pipe_holding, tmp_path):
    """A pipe (/dev/stdin fed by a pipe, bash's <(...)) exists but is no regular file: it was "file not found"; it is
    read (into memory: PIL and libsndfile seek), as are images and audio from files."""
    image = read_image(pipe_holding(png_bytes()))
    assert np.array_equal(np.asarray(image), np.asarray(read_image(png_bytes())))
    buf = io.BytesIO()
    soundfile.write(buf, np.linspace(-0.5, 0.5, 800, dtype=np.float32), 8000, format="WAV", subtype="FLOAT")
    wave, rate = decode_audio(pipe_holding(buf.getvalue()))
    assert rate == 8000 and np.array_equal(wave, np.linspace(-0.5, 0.5, 800, dtype=np.float32))
    empty = pipe_holding(b"")
    with pytest.raises(SampleError, match=rf"^{empty}: empty file \(0 bytes\)$"):
        read_image(empty)
    piped = pipe_holding(png_bytes())
    with pytest.raises(SampleError, match=r"not a regular file \(a pipe\?\), so its kind is not guessed .*; pass -m"):
        file_modality(piped, "pass -m")  # sniffing would use up what the reader needs
    assert read_image(piped).size == (16, 16)  # still whole
    assert read_text(pipe_holding(b"  a caption\n")) == "a caption"  # a manifest's text from a pipe too
    with pytest.raises(MissingSampleError, match=r"gone\.png: file not found$"):
        read_image(tmp_path / "gone.png")
    with pytest.raises(MissingSampleError, match=r": a folder, not a file$"):
        read_image(tmp_path)
    with pytest.raises(SampleError, match=r"cannot be spelled in the file system encoding 'utf-8' \('\\ud800'"):
        read_image(str(tmp_path / "\ud800.png"))  # no bytes stand for this surrogate: not "file not found" either


# ---------------------------------------------------------------------------------------------------- the cache
def test_an_unwritable_tokenizer_cache_is_skipped_with_a_warning(tmp_path):
    """``mmformer fit`` from a read-only folder stopped at the default cwd-relative cache ("[Errno 30] Read-only file
    system: 'runs'"); a cache only saves time, so the run goes on without it. (A file where the folder should be
    stands in for the read-only disk: root writes anywhere.)"""
    train = write_manifest(tmp_path / "train.jsonl", write_digits(tmp_path, 4))
    (tmp_path / "blocked").write_text("a file, not a folder")
    cache = tmp_path / "blocked" / "tok"
    dm = MultimodalDataModule(train=str(train), image_size=8, vocab_size=300, tokenizer_cache_dir=str(cache))
    warned = f"tokenizer_cache_dir: cannot cache the trained tokenizer in {re.escape(str(cache))} \\(Not a directory\\)"
    with pytest.warns(UserWarning, match=warned):
        assert 260 < dm.vocab_size <= 300
    assert dm.tokenizer.encode("one two")[0] == dm.tokenizer.bos_id
