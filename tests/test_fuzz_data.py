"""Bad data never crashes, hangs or silently corrupts a run: every file and manifest row is either read correctly or
refused with a message naming the file (the Processor raises SampleError; the datasets skip the sample with a
SkippedSampleWarning naming it), in bounded time and memory, inside DataLoader workers too.

What "correctly" means where it is a choice:

- 16-bit grayscale images are scaled to 8 bits (``v >> 8``, as torchvision reads them), not clipped white by PIL.
- RGBA drops alpha and palette images take their colours (PIL's ``convert("RGB")``, as open_clip does).
- Images above ``PIL.Image.MAX_IMAGE_PIXELS`` (89M pixels; PIL itself only warns up to twice that) are refused
  before decoding: a 10000×10000 PNG of a few hundred KB is a decompression bomb until the user raises the limit.
- Images far more elongated than the output are center-cropped before resizing, so a 1×2,000,000 strip costs
  kilobytes rather than the gigabytes a short-side resize would make of it.
- A WAV cut short decodes to the samples it holds, as every WAV reader does (streamed WAVs carry placeholder
  lengths, so the header cannot flag truncation); a cut FLAC/OGG, a PNG/JPEG cut before its end, are refused.
- Captions with bytes that are not UTF-8 spoil only their own row (skipped, naming the file); empty or missing
  captions and missing files likewise.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import soundfile
import torch
from helpers import time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from mmformer.data import (
    Collator,
    LibriSpeech,
    ManifestDataset,
    SampleError,
    ShardDataset,
    SkippedSampleWarning,
    read_audio,
)
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor

RATE = 8000
FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def processor() -> Processor:
    return Processor(image=ImageProcessorConfig(image_size=8), audio=AudioProcessorConfig(sample_rate=RATE))


# ---------------------------------------------------------------------------------------------------- media
def encode_image(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def encode_audio(wave: np.ndarray, fmt: str = "FLAC", rate: int = RATE, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


PIXELS = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
WAVE = (np.random.default_rng(1).normal(0, 0.1, 400)).astype(np.float32)
GOOD = {
    "png": encode_image(Image.fromarray(PIXELS)),
    "jpg": encode_image(Image.fromarray(PIXELS), "JPEG"),
    "flac": encode_audio(WAVE),
    "wav": encode_audio(WAVE, "WAV", subtype="PCM_16"),
    "ogg": encode_audio(WAVE, "OGG", subtype="VORBIS"),
}
MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WAVEfmt ",
    b"fLaC",
    b"OggS",
]


def png_of(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of any size, all zeros, built row by row (a 10000×10000 one is ~100 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_of(10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:  # a genuine PNG of that size, not just a header
            assert img.size == (10_000, 10_000)
    return data


def outcome(load, data, name: str):
    """The tensor ``load`` returns, or None when it refused with a SampleError naming ``name``."""
    try:
        with time_limit(20), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL/libsndfile chatter about odd files
            return load(data, name=name)
    except SampleError as e:
        assert e.path == name and name in str(e), e
        assert "object at 0x" not in str(e), e  # the same bad input, the same message (warnings deduplicate)
        return None


# ---------------------------------------------------------------------------------------------------- fuzz the readers
@FUZZ
@given(magic=st.sampled_from(MAGIC), tail=st.binary(max_size=1500))
def test_random_bytes_are_decoded_or_refused_naming_the_file(magic, tail):
    p, data = processor(), magic + tail
    image = outcome(p.load_image, data, "random.png")
    assert image is None or (image.shape == (3, 8, 8) and torch.isfinite(image).all())
    audio = outcome(p.load_audio, data, "random.flac")
    assert audio is None or (audio.ndim == 1 and audio.numel() > 0 and torch.isfinite(audio).all())


def wav_header(rate: int, channels: int, bits: int, data_size: int) -> bytes:
    """A PCM WAV header claiming whatever it is given (fields wrap to their widths, as a corrupt file's would)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 1, channels, rate, (rate * block) % 2**32, block % 2**16, bits)
    riff = struct.pack("<I", min(36 + data_size, 2**32 - 1))
    return b"RIFF" + riff + b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_size)


@FUZZ
@given(
    rate=st.one_of(st.sampled_from([8000, 16000, 44100, 44101, 7919, 1]), st.integers(1, 400_000)),
    channels=st.integers(0, 1100),
    bits=st.sampled_from([0, 8, 16, 24, 32, 7]),
    data_size=st.one_of(st.integers(0, 4096), st.just(2**32 - 1)),
    payload=st.binary(max_size=2048),
)
def test_wav_headers_with_hostile_fields(rate, channels, bits, data_size, payload):
    """Any sample rate, channel count, sample width and data length a header can claim: decoded (finite, mono) or
    refused naming the file, quickly; never a resampling filter of gigabytes or an allocation the header asked for."""
    data = wav_header(rate, channels, bits, data_size) + payload
    start = time.perf_counter()
    audio = outcome(processor().load_audio, data, "hostile.wav")
    assert audio is None or (audio.ndim == 1 and audio.numel() > 0 and torch.isfinite(audio).all())
    assert time.perf_counter() - start < 15


@FUZZ
@given(kind=st.sampled_from(sorted(GOOD)), fraction=st.floats(0.0, 1.0))
def test_truncated_files_are_refused_or_exact(kind, fraction):
    p, data = processor(), GOOD[kind]
    cut = data[: int(len(data) * fraction)]
    if kind in ("png", "jpg"):
        full, got = p.load_image(data), outcome(p.load_image, cut, f"cut.{kind}")
        assert got is None or torch.equal(got, full)  # decoded only if nothing was lost
        return
    full, got = p.load_audio(data), outcome(p.load_audio, cut, f"cut.{kind}")
    if kind == "wav":  # the samples it holds (see the module notes)
        assert got is None or torch.equal(got, full[: len(got)])
    else:
        assert got is None or torch.equal(got, full)


def test_missing_files_and_empty_audio_name_the_file(tmp_path):
    p = processor()
    for call in (lambda: p(images=[tmp_path / "gone.png"]), lambda: p(audio=[tmp_path / "gone.flac"])):
        with pytest.raises(SampleError, match="gone.*: file not found"):
            call()
    (tmp_path / "empty.wav").write_bytes(encode_audio(np.zeros(0, np.float32), "WAV"))
    (tmp_path / "empty.flac").write_bytes(b"")
    with pytest.raises(SampleError, match=r"empty\.wav: audio has no samples"):
        p(audio=[tmp_path / "empty.wav"])
    with pytest.raises(SampleError, match=r"empty\.flac: empty file \(0 bytes\)"):
        p(audio=[tmp_path / "empty.flac"])
    (tmp_path / "nan.wav").write_bytes(encode_audio(np.array([0.0, np.nan], np.float32), "WAV", subtype="FLOAT"))
    with pytest.raises(SampleError, match=r"nan\.wav: audio contains NaN"):
        p(audio=[tmp_path / "nan.wav"])


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    """A Latin-1 name (``café.wav`` as bytes E9), which Python holds with a surrogate escape: soundfile encodes a str
    path strictly and refused it."""
    path = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.wav"))
    path.write_bytes(encode_audio(WAVE, "WAV"))
    wave, rate = read_audio(path, RATE)
    assert rate == RATE and torch.allclose(wave, torch.from_numpy(WAVE), atol=1e-4)


# ---------------------------------------------------------------------------------------------------- image kinds
def test_image_modes_are_converted_correctly():
    p = Processor(image=ImageProcessorConfig(image_size=8, resize="exact", interpolation="nearest"))
    rgb = Image.fromarray(PIXELS)
    expected = p.load_image(encode_image(rgb))
    rgba = Image.fromarray(np.concatenate([PIXELS, np.full((6, 5, 1), 7, np.uint8)], axis=-1), "RGBA")
    torch.testing.assert_close(p.load_image(encode_image(rgba)), expected)  # alpha dropped
    palette = rgb.quantize(16)
    torch.testing.assert_close(p.load_image(encode_image(palette)), p.load_image(encode_image(palette.convert("RGB"))))
    gray = PIXELS[..., 0]
    gray_rgb = p.load_image(encode_image(Image.fromarray(np.stack([gray] * 3, axis=-1))))
    torch.testing.assert_close(p.load_image(encode_image(Image.fromarray(gray))), gray_rgb)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 256 + 100)  # 16-bit grayscale ("I;16"), PNG keeps 16 bits
    data = encode_image(sixteen)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I;16")
    torch.testing.assert_close(p.load_image(data), gray_rgb)  # scaled to 8 bits (v >> 8), not clipped at 255
    torch.testing.assert_close(p(images=[sixteen])["pixel_values"][0], gray_rgb)  # the same for a PIL image
    one = p.load_image(encode_image(Image.new("RGB", (1, 1), (10, 200, 30))))
    assert one.shape == (3, 8, 8) and (one == one[:, :1, :1]).all()  # 1×1 scales to a flat image
    cmyk = p.load_image(encode_image(rgb.convert("CMYK"), "JPEG", quality=100))
    assert cmyk.shape == (3, 8, 8)
    bilevel = p.load_image(encode_image(rgb.convert("1")))
    assert bilevel.shape == (3, 8, 8) and len(bilevel.unique()) <= 6


def test_decompression_bomb_is_refused_before_decoding(bomb, tmp_path, monkeypatch):
    def decode(self, *args, **kwargs):
        raise AssertionError("the pixels of a refused image were decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", decode)
    (tmp_path / "bomb.png").write_bytes(bomb)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # PIL's own warning, at open
        for call in (lambda: processor()(images=[tmp_path / "bomb.png"]), lambda: processor().load_image(bomb)):
            with pytest.raises(SampleError, match=r"10000×10000 = 100000000 pixels is larger than PIL.Image.MAX_IM"):
                call()
    assert time.perf_counter() - start < 10
    monkeypatch.undo()
    # the limit is PIL's setting, so a user can move it
    small = encode_image(Image.new("RGB", (12, 12)))  # 144 pixels: over a limit of 100, where PIL only warns
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with (
        pytest.warns(PIL.Image.DecompressionBombWarning),
        pytest.raises(
            SampleError, match=r"small\.png: image of 12×12 = 144 pixels is larger than PIL.Image.MAX_IMAGE_PIX"
        ),
    ):
        processor().load_image(small, name="small.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    assert processor().load_image(small).shape == (3, 8, 8)


def test_extreme_aspect_ratios_stay_cheap_and_keep_the_center():
    p = processor()
    strip = np.zeros((1, 400), np.uint8)
    strip[0, 196:204] = 255  # a bright mark in the middle
    limited = p(images=[strip])["pixel_values"][0]
    unlimited_transform = p.image_transform()
    unlimited_transform.transforms.pop(1)  # the pipeline without the aspect limit: resize to 8×3200, then crop
    torch.testing.assert_close(limited, unlimited_transform(torch.from_numpy(strip)[None]), atol=0.05, rtol=0)
    assert limited.max() > 1.5  # the mark survived: it is the center the crop keeps
    with time_limit(20):
        long_strip = png_of(2_000_000, 1)  # 2 M pixels (under PIL's limit); a short-side resize would make 256 M
        assert p.load_image(long_strip).shape == (3, 8, 8)
        tall = p(images=[np.zeros((300_000, 1), np.uint8)])["pixel_values"]
        assert tall.shape == (1, 3, 8, 8)


# ---------------------------------------------------------------------------------------------------- audio kinds
def test_hostile_audio_headers_cost_nothing(tmp_path):
    p = processor()
    lying = bytearray(GOOD["flac"])
    total = int.from_bytes(lying[18:26], "big")  # STREAMINFO: ... 36-bit total samples in the low bits
    lying[18:26] = (total | (2**36 - 1)).to_bytes(8, "big")
    with soundfile.SoundFile(io.BytesIO(bytes(lying))) as f:
        assert f.frames == 2**36 - 1  # libsndfile believes it: reading it whole would allocate 256 GiB
    with time_limit(10), pytest.raises(SampleError, match=r"lying\.flac: cannot decode audio"):
        p.load_audio(bytes(lying), name="lying.flac")
    odd = encode_audio(WAVE, "WAV", rate=44101, subtype="PCM_16")  # would need a 353-million-phase filter
    with time_limit(10), pytest.raises(SampleError, match=r"odd\.wav: audio: cannot resample 44101 Hz to 8000 Hz"):
        p.load_audio(odd, name="odd.wav")
    silence = encode_audio(np.zeros(RATE * 600, np.float32), "FLAC")  # 10 minutes of silence: a few tens of KB
    short = Processor(audio=AudioProcessorConfig(sample_rate=RATE, max_seconds=1.0))
    with time_limit(10), pytest.warns(UserWarning, match=r"silence\.flac: 600\.0 s of audio is longer than max_sec"):
        assert short.load_audio(silence, name="silence.flac").shape == (RATE,)
    with pytest.warns(UserWarning, match=r"<bytes>: .* s of audio is longer than max_seconds=0\.01"):
        wave, rate = read_audio(encode_audio(WAVE, rate=16000), RATE, max_seconds=0.01)  # cut, then resampled
    full, _ = read_audio(encode_audio(WAVE, rate=16000), RATE)
    assert rate == RATE and torch.equal(wave, full[:80])  # decoding only the start changes nothing


# ---------------------------------------------------------------------------------------------------- manifests
MEDIA = {
    "good.png": GOOD["png"],
    "rgba.png": encode_image(Image.new("RGBA", (4, 3), (1, 2, 3, 0))),
    "gray16.png": encode_image(Image.fromarray(np.full((3, 4), 40000, np.uint16))),
    "palette.png": encode_image(Image.fromarray(PIXELS).quantize(8)),
    "tiny.png": encode_image(Image.new("L", (1, 1), 9)),
    "random.png": bytes(np.random.default_rng(2).integers(0, 256, 300, dtype=np.uint8)),
    "cut.png": GOOD["png"][:60],
    "empty.png": b"",
}
READABLE = {"good.png", "rgba.png", "gray16.png", "palette.png", "tiny.png"}


def write_media(root: Path) -> None:
    for name, data in MEDIA.items():
        (root / name).write_bytes(data)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """Rows as JSONL or CSV/TSV; str values may hold lone surrogates, written back as the raw bytes they stand for."""
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif path.suffix == ".tsv":  # as Common Voice writes it: no quoting, so a cell holds no tab or line break
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["image"]
        lines = [fields] + [[as_written(r.get(f), ".tsv") for f in fields] for r in rows]
        text = "".join("\t".join(cells) + "\n" for cells in lines)
    else:
        buf = io.StringIO()
        fields = list(dict.fromkeys(k for r in rows for k in r)) or ["image"]
        writer = csv.DictWriter(buf, fieldnames=fields, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


def as_written(value, suffix: str):
    """What a cell reads back as: JSON keeps types; CSV turns everything into text (None into ''); TSV too, with
    its tabs and line breaks as spaces (it cannot hold them)."""
    if suffix == ".jsonl":
        return value
    text = "" if value is None else str(value)
    return re.sub(r"[\t\r\n]", " ", text) if suffix == ".tsv" else text


def good_caption(value) -> bool:
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


captions = st.one_of(
    st.text(max_size=12),
    st.binary(max_size=10).map(lambda b: b.decode("utf-8", "surrogateescape")),  # raw bytes in the file
    st.sampled_from(["", "  ", "caf\udce9", "ok caption", "\ufeffbom"]),
    st.none(),
    st.integers(-5, 5),
)
images = st.sampled_from([*MEDIA, "missing.png", "", None, 7])
rows_strategy = st.lists(
    st.fixed_dictionaries({}, optional={"image": images, "caption": captions, "duration": st.sampled_from(["x", 1])}),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(rows=rows_strategy, suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]))
def test_manifest_rows_load_or_are_skipped_naming_the_file(tmp_path_factory, rows, suffix):
    root = tmp_path_factory.mktemp("manifest")
    write_media(root)
    path = write_manifest(root / f"data{suffix}", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = ManifestDataset(path, modalities=("image", "text"), processor=processor(), max_bad_fraction=1.0)
        except ValueError as e:  # the manifest as a whole: no caption column, no rows
            assert str(path) in str(e)
            return
        with time_limit(30):
            samples = [ds[i] for i in range(len(ds))]
    skipped = [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]
    assert len(skipped) == sum(s is None for s in samples)
    for record, sample, row in zip(ds.records, samples, rows):
        if sample is None:
            assert any(record.source in message for message in skipped), record.source
            continue
        assert good_caption(sample["text"]) and sample["text"] == sample["text"].strip()
        if "image" in sample:
            assert sample["image"].shape == (3, 8, 8) and torch.isfinite(sample["image"]).all()
        caption = as_written(row.get("caption"), suffix)
        image = as_written(row.get("image"), suffix)
        if good_caption(caption) and image in READABLE:  # a good row is never lost to its neighbours
            assert sample is not None
            assert sample["text"] == caption.strip()
    assert all(good_caption(t) for t in ds.texts())  # tokenizer training sees only valid captions


def test_manifest_encodings_and_missing_columns(tmp_path):
    write_media(tmp_path)
    bom = b"\xef\xbb\xbfimage,caption\r\ngood.png,a cat\r\ngood.png,caf\xe9\r\ngood.png\r\n,no image\r\n"
    (tmp_path / "excel.csv").write_bytes(bom)  # UTF-8 with a BOM (Excel), one latin-1 row, short rows
    with pytest.warns(SkippedSampleWarning) as caught:
        ds = ManifestDataset(tmp_path / "excel.csv", modalities=("image", "text"), processor=processor())
        samples = [ds[i] for i in range(len(ds))]
    assert samples[0]["text"] == "a cat" and samples[1:] == [None, None, None]
    messages = [str(w.message) for w in caught]
    # text faults name the file and the manifest line to fix; lines count the header (a row is its line in the file)
    assert any(
        r"good.png (" + str(tmp_path / "excel.csv:3") + r"): text is not valid UTF-8 (bytes b'\xe9'" in m
        for m in messages
    ), messages
    assert any("good.png (" + str(tmp_path / "excel.csv:4") + "): missing text" in m for m in messages)
    assert any("excel.csv:5: no image path" in m for m in messages)
    assert ds.texts() == ["a cat", "no image"]


# ---------------------------------------------------------------------------------------------------- other formats
def test_librispeech_and_shards_with_bad_transcripts(tmp_path):
    chapter = tmp_path / "ls" / "19" / "198"
    chapter.mkdir(parents=True)
    for utt in ("0000", "0001", "0002"):
        (chapter / f"19-198-{utt}.flac").write_bytes(GOOD["flac"])
    (chapter / "19-198.trans.txt").write_bytes(b"19-198-0000 HELLO\n19-198-0001 CAF\xc9\n19-198-0002\n")
    with pytest.warns(SkippedSampleWarning) as caught:
        ds = LibriSpeech(tmp_path / "ls", processor=processor())
        samples = [ds[i] for i in range(len(ds))]
    assert samples[0]["text"] == "hello" and samples[1:] == [None, None]
    assert any("19-198-0001.flac: text is not valid UTF-8" in str(w.message) for w in caught)
    assert any("19-198-0002.flac: empty text" in str(w.message) for w in caught)

    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        members = {
            "a.png": GOOD["png"],
            "a.txt": b"fine",
            "b.png": GOOD["png"],
            "b.txt": b"caf\xe9",
            "c.png": GOOD["png"],
            "c.txt": b"   ",
            "d.png": GOOD["png"],
        }
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.warns(SkippedSampleWarning) as caught:
        texts = [s["text"] for s in ShardDataset(str(tmp_path / "shard.tar"), processor=processor())]
    assert texts == ["fine"]
    messages = [str(w.message) for w in caught]
    assert any("shard.tar:b.txt: text is not UTF-8" in m for m in messages)
    assert any("shard.tar:c.txt: empty text" in m for m in messages)
    assert any(
        "shard.tar:d: no text member (expected .txt, .text, .caption or a .json with 'text'" in m for m in messages
    )


# ---------------------------------------------------------------------------------------------------- worker processes
def test_every_kind_of_bad_sample_in_dataloader_workers(tmp_path, bomb):
    """Two worker processes read a manifest mixing good files with every bad kind; nothing crashes or hangs, and
    exactly the good samples arrive."""
    write_media(tmp_path)
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "strip.png").write_bytes(png_of(100_000, 1))
    good = [
        ("good.png", "a"),
        ("rgba.png", "b"),
        ("gray16.png", "c"),
        ("palette.png", "d"),
        ("tiny.png", "e"),
        ("strip.png", "f"),
    ]
    bad = [
        ("random.png", "x"),
        ("cut.png", "x"),
        ("empty.png", "x"),
        ("bomb.png", "x"),
        ("missing.png", "x"),
        ("good.png", "  "),
        ("good.png", "caf\udce9"),
        ("good.png", None),
    ]
    rows = [{"image": image, "caption": caption} for image, caption in good + bad] * 2
    path = write_manifest(tmp_path / "mixed.jsonl", rows)
    ds = ManifestDataset(path, modalities=("image", "text"), processor=processor(), max_bad_fraction=0.6)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=Collator(), timeout=120)
    with time_limit(180), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = [b for b in loader if b is not None]
    texts = sorted(t for b in batches for t in b["text"])
    assert texts == sorted([caption for _, caption in good] * 2)
    for b in batches:
        assert b["pixel_values"].shape[1:] == (3, 8, 8) and torch.isfinite(b["pixel_values"]).all()
