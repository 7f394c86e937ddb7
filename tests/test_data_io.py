"""Reading one media file: which modality a file holds (mmformer.preprocess.media), images the way up their EXIF tag
says, audio decoded block by block (mixed and resampled as it arrives: memory the result's size, the result that of
the whole waveform), the ONNX runner reading files by the Processor's rules, which suffixes are images, and reading a
list of files past the ones that cannot be read (mmformer.data.io)."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional as AF
from helpers import time_limit
from PIL import Image

from mmformer.data import ImageFolder, ShardDataset
from mmformer.data.io import read_audio, read_each, read_image, sinc_resampler, truncate_audio
from mmformer.preprocess import media
from mmformer.preprocess.media import MissingSampleError, SampleError, StreamResampler, audio_suffixes, file_modality
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.ship import audio_features, onnx_runner

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
    """The runner must run without torch: what it imports of mmformer is the media module and its audio front end
    (audio_features), which imports no torch and nothing of mmformer but the media module, which imports none."""
    root = Path(__file__).resolve().parents[1] / "mmformer"

    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        return {name for name in names if name.startswith(("mmformer", "torch"))}

    assert imported(root / "ship/onnx_runner.py") == {"mmformer.preprocess.media", "mmformer.ship.audio_features"}
    assert imported(root / "ship/audio_features.py") <= {"mmformer.preprocess.media"}
    assert not imported(root / "preprocess/media.py")


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


# ---------------------------------------------------------------------------------------------------- audio in blocks
RATE_PAIRS = [(48000, 16000), (44100, 16000), (22050, 16000), (8000, 16000)]


def noise(channels: int, length: int, seed: int = 0) -> np.ndarray:
    """(channels, length) float32 noise at a speech-like level."""
    return (np.random.default_rng(seed).standard_normal((channels, length)) * 0.3).astype(np.float32)


@pytest.mark.parametrize("orig, new", RATE_PAIRS, ids=[f"{o}-{n}" for o, n in RATE_PAIRS])
def test_resampling_block_by_block_equals_resampling_the_whole_waveform(orig, new):
    """Audio is resampled as its blocks are decoded (:class:`StreamResampler`), with torchaudio's kernel (read_audio)
    and with the ONNX runner's numpy one: for odd lengths and blocks of one sample, of a few, around the filter's
    reach and larger, the result is the whole waveform's resampling to 1e-6."""
    whole = {sinc_resampler: lambda x: AF.resample(torch.from_numpy(x), orig, new).numpy(),
             audio_features.sinc_resampler: lambda x: audio_features.resample(x, orig, new)}  # fmt: skip
    for make, reference in whole.items():
        for length in (1, 9, 1001, 4411):
            x = noise(2, length, seed=length)
            expected = reference(x)
            for block in (1, 7, 160, 441, 1000, 5000):
                if block == 1 and length > 1001:
                    continue
                stream = StreamResampler(make(orig, new), orig, new)
                parts = [stream.push(x[:, i : i + block]) for i in range(0, length, block)]
                got = np.concatenate([*parts, stream.finish()], axis=1)
                assert got.shape == expected.shape, (make, length, block)
                np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=f"{length=}, {block=}")


@pytest.mark.parametrize("orig", [48000, 44100, 22050, 8000])
def test_a_stereo_file_read_in_many_blocks_is_its_whole_waveform_mixed_and_resampled(tmp_path, monkeypatch, orig):
    """read_audio mixes each decoded block to mono and resamples it as it arrives (before: every block at the file's
    rate and channels, concatenated, transposed, averaged, then resampled): with blocks far smaller than the file,
    of an odd size, the result equals the whole waveform averaged and resampled."""
    x = noise(2, int(orig * 0.3) + 7)
    path = tmp_path / f"stereo_{orig}.wav"
    soundfile.write(path, x.T, orig, subtype="FLOAT")  # float samples: read back exactly
    monkeypatch.setattr(media, "AUDIO_BLOCK", 2 * 997)  # 997 frames a block
    wave, rate = read_audio(path, 16000)
    expected = AF.resample(torch.from_numpy(x).mean(dim=0), orig, 16000)
    assert rate == 16000 and wave.shape == expected.shape
    torch.testing.assert_close(wave, expected, atol=1e-6, rtol=0)
    channels, _ = read_audio(path, 16000, mono=False)  # (C, S): each channel resampled alike
    torch.testing.assert_close(channels, AF.resample(torch.from_numpy(x), orig, 16000), atol=1e-6, rtol=0)


def test_reading_long_audio_takes_memory_the_size_of_the_result(tmp_path):
    """2.5 min of 48 kHz stereo FLAC read at 16 kHz mono, in a child process: its peak resident memory grows by less
    than the file's mono samples at the file's rate (28.8 MB; the result is 9.6 MB). Reading kept every block at the
    file's rate and channels, concatenated, transposed, averaged and only then resampled: ~340 MB here, 4.5 GB for
    30 minutes. openai-whisper's ffmpeg pipe yields 16 kHz mono directly: the bar."""
    seconds, rate = 150, 48000
    path = tmp_path / "long.flac"
    t = np.arange(rate * 10) / rate
    ten = (0.1 * np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], axis=1)).astype(np.float32)
    with soundfile.SoundFile(path, "w", rate, 2, format="FLAC") as f:
        for _ in range(seconds // 10):
            f.write(ten)
    warm = tmp_path / "warm.flac"  # read first: what a first read sets up (libsndfile, the resampler's workspace)
    soundfile.write(warm, ten[: rate * 3], rate)
    script = (
        "import resource, sys\n"
        "from mmformer.data.io import read_audio\n"
        "read_audio(sys.argv[2], 16000)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "wave, rate = read_audio(sys.argv[1], 16000)\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(wave.shape[0], rate, grown * 1024)\n"
    )
    command = [sys.executable, "-c", script, str(path), str(warm)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    samples, out_rate, grown = map(int, done.stdout.split()[-3:])
    assert (samples, out_rate) == (seconds * 16000, 16000)
    file_rate_mono = seconds * rate * 4  # bytes of float32
    assert grown < file_rate_mono, f"peak memory grew by {grown / 2**20:.0f} MB reading {seconds} s"


def streamed_flac(seconds: float, rate: int = 8000) -> bytes:
    """FLAC as a streaming encoder writes it: the total samples in its header 0, the length left open."""
    data = io.BytesIO()
    soundfile.write(data, noise(1, round(seconds * rate))[0], rate, format="FLAC")
    head = bytearray(data.getvalue())
    head[18:26] = (int.from_bytes(head[18:26], "big") & ~(2**36 - 1)).to_bytes(8, "big")  # STREAMINFO's 36 bits
    return bytes(head)


def test_audio_longer_than_refuse_longer_than_is_refused_unless_cut_first():
    """``refuse_longer_than`` (the server's limit) refuses what would be read: from the header's length at once, or
    once decoding passes it where the header does not say; a ``max_seconds`` cut within the limit reads no further,
    so nothing is refused."""
    long = io.BytesIO()
    soundfile.write(long, noise(1, 8000 * 3)[0], 8000, format="FLAC")
    for data, held in ((long.getvalue(), r"\(3\.0 s\)"), (streamed_flac(3.0), r"\(more than that\)")):
        with pytest.raises(media.AudioTooLongError, match=rf"^x\.flac: audio is longer than the limit of 2 s {held}$"):
            read_audio(data, 8000, name="x.flac", refuse_longer_than=2.0)
        with pytest.warns(UserWarning, match=r"x\.flac: .* s of audio is longer than max_seconds=1\.0"):
            wave, _ = read_audio(data, 8000, name="x.flac", max_seconds=1.0, refuse_longer_than=2.0)
        assert wave.shape == (8000,)
    assert read_audio(long.getvalue(), 8000, refuse_longer_than=3.0)[0].shape == (24000,)  # not longer: read


# ---------------------------------------------------------------------------------------------------- the ONNX runner
def runner_reading_as(processor: Processor) -> onnx_runner.OnnxModel:
    """An OnnxModel with only its preprocessing (no graphs), set as ``processor``: what an export of its model has."""
    runner = object.__new__(onnx_runner.OnnxModel)
    runner.preprocessor = {key: processor.to_dict()[key] for key in ("image", "audio")}
    runner.config = {"audio": {"sample_rate": processor.audio.sample_rate}}
    return runner


def test_the_onnx_runner_reads_files_by_the_processors_rules(tmp_path, png_bytes):
    """The torch-free runner reads with the Processor's rules (mmformer.preprocess.media): a 16-bit PNG gives the
    same pixels (it clipped them white with PIL's convert), a stereo 44.1 kHz file the same samples, and bad files
    the same errors, type and message naming the file: NaN audio (it transcribed it), a missing file (LibsndfileError),
    audio and a PNG cut short (raw library errors), a rate that needs a gigabyte filter (it built 2.6 GiB of one)."""
    processor = Processor(image=ImageProcessorConfig(image_size=8), audio=AudioProcessorConfig(sample_rate=16000))
    runner = runner_reading_as(processor)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10)).astype(np.uint16) * 257).save(gray16)
    with Image.open(gray16) as img:
        assert img.mode.startswith("I;16")
        np.testing.assert_allclose(runner.preprocess_images([img]), processor(images=[img])["pixel_values"].numpy(),
                                   atol=1e-6, rtol=0)  # fmt: skip
    expected = processor(images=[gray16])["pixel_values"].numpy()
    np.testing.assert_allclose(runner.preprocess_images([gray16]), expected, atol=1e-6, rtol=0)
    stereo = tmp_path / "stereo.flac"
    soundfile.write(stereo, noise(2, 44100 // 3).T, 44100)
    np.testing.assert_allclose(runner.load_audio([stereo])[0], processor.load_audio(stereo).numpy(), atol=1e-5)

    flac = io.BytesIO()
    soundfile.write(flac, noise(1, 8000)[0], 16000, format="FLAC")
    bad = {"nan.wav": None, "cut.flac": flac.getvalue()[: len(flac.getvalue()) // 2], "cut.png": png_bytes[:40]}
    soundfile.write(tmp_path / "nan.wav", np.array([0.0, np.nan] * 100, np.float32), 16000, subtype="FLOAT")
    soundfile.write(tmp_path / "odd.wav", np.zeros(22051, np.float32), 22051)
    for name, data in bad.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    for name in ("nan.wav", "cut.flac", "odd.wav", "missing.flac", "cut.png"):
        path, image = tmp_path / name, name.endswith(".png")
        with pytest.raises(SampleError) as expected_error:
            processor(images=[path]) if image else processor(audio=[path])
        with time_limit(10), pytest.raises(SampleError) as error:
            runner.preprocess_images([path]) if image else runner.load_audio([path])
        assert type(error.value) is type(expected_error.value) and str(error.value) == str(expected_error.value)
        assert str(error.value).startswith(f"{path}: "), error.value
    with pytest.raises(FileNotFoundError, match=r"missing\.flac: file not found"):  # a MissingSampleError
        runner.load_audio([tmp_path / "missing.flac"])


def test_the_onnx_runner_resizes_for_a_square_output_as_the_processor_does():
    """For a square output the Processor resizes the short side with torchvision's ``Resize(int)``, the long side
    rounded down (12×10 → 9×8, then the crop); the runner rounded it (10×8), a pixel off: other pixels."""
    for config in (ImageProcessorConfig(image_size=8), ImageProcessorConfig(image_size=(8, 6))):
        processor = Processor(image=config)
        runner = runner_reading_as(processor)
        for shape in ((12, 10, 3), (10, 12, 3), (7, 30, 3)):
            img = Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
            expected = processor(images=[img])["pixel_values"].numpy()
            np.testing.assert_allclose(runner.preprocess_images([img]), expected, atol=1e-5, rtol=0, err_msg=str(shape))


# ---------------------------------------------------------------------------------------------------- which files
def test_pnm_images_are_image_files_for_image_folders_and_shards(tmp_path):
    """GTSRB ships .ppm: ImageFolder left out .ppm/.pgm/.pbm/.pnm without a word (torchvision's reads them), and a
    shard's members follow the same list."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    files = {"a.ppm": picture, "b.pgm": picture.convert("L"), "c.pbm": picture.convert("1"), "d.pnm": picture}
    for label in ("stop", "yield"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for name, img in files.items():
            img.save(tmp_path / "folder" / label / name)
    processor = Processor(image=ImageProcessorConfig(image_size=8))
    folder = ImageFolder(tmp_path / "folder", processor=processor)
    assert sorted(Path(r.source).name for r in folder.records) == sorted([*files] * 2)
    assert all(folder[i]["image"].shape == (3, 8, 8) for i in range(len(folder)))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in (("s.ppm", (tmp_path / "folder/stop/a.ppm").read_bytes()), ("s.txt", b"a stop sign")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (sample,) = list(ShardDataset(str(tmp_path / "shard.tar"), processor=processor))
    assert sample["text"] == "a stop sign" and sample["image"].shape == (3, 8, 8)
