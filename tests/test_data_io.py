"""Reading one media file: which modality a file holds (mmformer.preprocess.media), images the way up their EXIF tag
says, and reading a list of files past the ones that cannot be read (mmformer.data.io)."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mmformer.data.io import read_each, read_image, truncate_audio
from mmformer.preprocess.media import MissingSampleError, SampleError, audio_suffixes, file_modality
from mmformer.preprocess.processor import ImageProcessorConfig, Processor

ORIENTATION = 0x0112  # the EXIF tag


@pytest.fixture
def wave_bytes() -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(1600, np.float32), 16000, format="WAV")
    return buffer.getvalue()


@pytest.fixture
def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_suffix_of_a_format_soundfile_reads_is_audio_and_one_pil_reads_an_image():
    """Decided by name alone (the files need not exist): every format soundfile lists, in any case — the CLI took
    all but five suffixes for images ("cannot decode image" for .aiff, .au, .caf, .w64)."""
    names = [f"x.{kind.lower()}" for kind in soundfile.available_formats() if kind != "RAW"]
    assert {".aiff", ".au", ".caf", ".w64", ".wav", ".flac", ".ogg", ".mp3", ".opus", ".aif"} <= audio_suffixes()
    for name in [*names, "x.AIFF", "x.Au", "x.opus", "x.m4a"]:
        assert file_modality(name) == "audio", name
    for name in ("x.png", "x.JPG", "x.jpeg", "x.webp", "x.tiff", "x.bmp", "x.gif"):
        assert file_modality(name) == "image", name


def test_a_file_without_a_known_suffix_is_decided_by_its_content(tmp_path, wave_bytes, png_bytes):
    for name, data, modality in (("speech", wave_bytes, "audio"), ("take.dat", wave_bytes, "audio"),
                                 ("photo", png_bytes, "image"), ("photo.bin", png_bytes, "image")):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        assert file_modality(tmp_path / name) == modality, name
    (tmp_path / "noise").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(SampleError, match=r"noise: neither audio soundfile reads nor an image PIL reads; pass -x$"):
        file_modality(tmp_path / "noise", hint="pass -x")
    with pytest.raises(MissingSampleError, match=r"nothere: file not found"):
        file_modality(tmp_path / "nothere")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SampleError, match=r"empty: empty file \(0 bytes\)"):
        file_modality(tmp_path / "empty")


def test_the_onnx_runner_decides_modality_with_torch_free_code_only():
    """The runner must run without torch: what it imports of mmformer is the media module, which imports none."""
    root = Path(__file__).resolve().parents[1] / "mmformer"

    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    runner = {name for name in imported(root / "ship/onnx_runner.py") if name.startswith(("mmformer", "torch"))}
    assert runner == {"mmformer.preprocess.media"}
    assert not {name for name in imported(root / "preprocess/media.py") if name.startswith(("mmformer", "torch"))}


def test_a_phone_photo_is_read_the_way_up_its_exif_orientation_says(tmp_path):
    """A JPEG whose pixels are stored sideways with orientation 6 (turn 90° clockwise to view), as phones write
    portraits, was read sideways: read_image (paths and bytes: the Processor and the server's uploads go through it)
    and the ONNX runner turn it upright, as transformers' load_image does."""
    from mmformer.ship.onnx_runner import OnnxModel

    stored = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)  # (H, W, C) as the sensor read
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:  # the decoded pixels, still sideways
        assert raw.getexif()[ORIENTATION] == 6
        upright = np.rot90(np.asarray(raw.convert("RGB")), k=-1)  # (60, 40, 3): turned 90° clockwise
    for source in (path, path.read_bytes()):
        np.testing.assert_array_equal(np.asarray(read_image(source)), upright)
    processor = Processor(image=ImageProcessorConfig(image_size=(24, 16)))
    expected = processor.image_transform()(Image.fromarray(upright))
    assert (processor.load_image(path.read_bytes()) == expected).all()  # serve's engine.load_image
    runner = object.__new__(OnnxModel)  # only its preprocessing: no graphs needed
    runner.preprocessor = {"image": processor.to_dict()["image"]}
    np.testing.assert_array_equal(
        runner.preprocess_images([path]), runner.preprocess_images([Image.fromarray(upright)])
    )


def test_read_each_skips_what_cannot_be_read_warning_and_naming_it(tmp_path, png_bytes):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(png_bytes)
    bad.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"caption: skipped .*bad\.png: cannot decode image"):
        values, errors = read_each([good, bad, good], read_image, "caption")
    assert [v is None for v in values] == [False, True, False] and values[0].size == (4, 3)
    assert list(errors) == [1] and errors[1].startswith(f"{bad}: cannot decode image")
    with pytest.raises(TypeError):  # only unreadable samples are skipped; other errors are the caller's
        read_each([good, 3], read_image, "caption")


def test_the_audio_truncation_warning_tells_a_cut_of_one_sample():
    """It read "1.0 s of audio is longer than max_seconds=1.0" (one decimal) for a file one sample too long."""
    with pytest.warns(UserWarning, match=r"a\.wav: 1\.0000\d+ s of audio is longer than max_seconds=1\.0 \(16001 "
                      r"samples at 16000 Hz, more than 16000\)"):  # fmt: skip
        assert truncate_audio(torch.zeros(16001), 16000, 1.0, "a.wav").shape == (16000,)
