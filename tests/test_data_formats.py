"""Data formats read as their users write them: text from manifests and shards, per-sample shard fields, empty
shards, optional labels, TSV without quoting, Common Voice's ``path`` column, shard members as manifests accept,
JSON captions, bad JSONL lines, warnings naming file and line, closed files; augmentation settings checked."""

from __future__ import annotations

import gc
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmformer.data import (
    Collator,
    ManifestDataset,
    ShardDataset,
    SkippedSampleWarning,
    TextDocuments,
    TooManyBadSamplesError,
    dataset_texts,
    detect_format,
    open_dataset,
)
from mmformer.data.augment import AugmentConfig, Augmenter
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor

RATE = 16000


@pytest.fixture
def processor() -> Processor:
    return Processor(image=ImageProcessorConfig(image_size=8), audio=AudioProcessorConfig(sample_rate=RATE))


def image_bytes(seed: int = 0, format: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=format)
    return buf.getvalue()


def audio_bytes(seed: int = 0, format: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    wave = np.random.default_rng(seed).normal(0, 0.1, 800).astype(np.float32)
    soundfile.write(buf, wave, RATE, format=format, **({"subtype": "OPUS"} if format == "OGG" else {}))
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def av_samples(keys: range, skip_audio: tuple[int, ...] = ()) -> dict[str, bytes]:
    members = {}
    for k in keys:
        members[f"{k:04d}.png"] = image_bytes(k)
        if k not in skip_audio:
            members[f"{k:04d}.flac"] = audio_bytes(k)
        members[f"{k:04d}.txt"] = f"sample {k}".encode()
    return members


def skipped(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, SkippedSampleWarning)]


# ---------------------------------------------------------------------- 1. format: text
def test_format_text_reads_a_manifests_text_column_and_a_shards_text_members(tmp_path):
    rows = [{"text": "first document", "id": 1}, {"text": "  "}, {"text": "second document"}]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "corpus.csv").write_text('caption,id\n"first, with a comma",1\nsecond,2\n')
    docs = open_dataset(str(tmp_path / "corpus.jsonl"), format="text")
    assert [docs[i]["text"] for i in range(len(docs))] == ["first document", "second document"]  # not the JSON
    assert docs[1]["source"] == f"{tmp_path / 'corpus.jsonl'}:3"
    assert dataset_texts(open_dataset(str(tmp_path / "corpus.csv"), format="text")) == ["first, with a comma", "second"]

    shard = write_tar(tmp_path / "text-000000.tar", {"a.txt": b"one document", "b.txt": b"another", "b.cls": b"1"})
    stream = open_dataset(shard, format="text")
    assert [s["text"] for s in stream] == ["one document", "another"]  # not tar headers
    assert dataset_texts(stream) == ["one document", "another"]
    with pytest.raises(ValueError, match="format text reads shards or files, not both"):
        open_dataset([shard, str(tmp_path / "corpus.jsonl")], format="text")
    (tmp_path / "captions.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match=r"captions\.json'?: a JSON file is not plain text; .* \.jsonl"):
        open_dataset(str(tmp_path / "captions.json"), format="text")
    with pytest.raises(ValueError, match="a WebDataset shard: open it with open_dataset"):
        TextDocuments(shard)
    (tmp_path / "numbers.jsonl").write_text('{"n": 1}\n')
    with pytest.raises(ValueError, match="numbers.jsonl'?: the manifest has no text/caption"):
        open_dataset(str(tmp_path / "numbers.jsonl"), format="text")


def test_a_text_file_that_is_not_utf8_is_a_skipped_sample_counted_toward_the_limit(tmp_path):
    for i in range(19):
        (tmp_path / f"a{i:02d}.txt").write_text(f"document {i}")
    (tmp_path / "b-latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.warns(SkippedSampleWarning, match=r"b-latin1\.txt: cannot read text \(UnicodeDecodeError"):
        docs = open_dataset(str(tmp_path), format="text")
    assert dataset_texts(docs) == [f"document {i}" for i in range(19)]  # the run goes on without it
    for i in range(2):  # 3 bad files of 22 (> 10%): the data set looks broken
        (tmp_path / f"c{i}.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    with pytest.warns(SkippedSampleWarning), pytest.raises(TooManyBadSamplesError, match=r"3 of 22 samples"):
        open_dataset(str(tmp_path), format="text", text_documents="line")
    with pytest.warns(SkippedSampleWarning):
        assert len(open_dataset(str(tmp_path), format="text", max_bad_fraction=0.2)) == 19


def test_a_folder_of_audio_without_transcripts_says_so_instead_of_holding_images(tmp_path):
    flat = tmp_path / "flac_only" / "19" / "198"
    flat.mkdir(parents=True)
    (flat / "19-198-0000.flac").write_bytes(audio_bytes())
    with pytest.raises(ValueError, match=r"flac_only: no \*\.trans\.txt transcripts found within 4 levels under it, "
                       r"though it holds audio files \(.*19-198-0000\.flac\)") as caught:  # fmt: skip
        open_dataset(str(tmp_path / "flac_only"), modalities=["audio"])
    assert "image" not in str(caught.value)
    deep = tmp_path / "deep" / "a" / "b" / "c" / "19" / "198"  # transcripts 5 levels down: beyond the search
    deep.mkdir(parents=True)
    (deep / "19-198-0000.flac").write_bytes(audio_bytes())
    (deep / "19-198.trans.txt").write_text("19-198-0000 HELLO\n")
    with pytest.raises(ValueError, match=r"one lies deeper \(.*19-198\.trans\.txt\).* or set format: librispeech"):
        open_dataset(str(tmp_path / "deep"), modalities=["audio"])
    assert dataset_texts(open_dataset(str(tmp_path / "deep"), format="librispeech")) == ["hello"]
    (flat.parent / "cover.png").write_bytes(image_bytes())  # images too: an ImageFolder, as before
    assert detect_format(tmp_path / "flac_only") == "imagefolder"


# ---------------------------------------------------------------------- 2, 3. shards: per-sample fields, empty shards
@pytest.mark.parametrize("modalities", [["image", "audio"], ["audio"]])
def test_a_shard_sample_missing_a_medium_is_a_bad_sample_not_the_end_of_the_medium(tmp_path, processor, modalities):
    shard = write_tar(tmp_path / "s-000000.tar", av_samples(range(4), skip_audio=(0,)))
    ds = ShardDataset(shard, modalities=modalities, processor=processor)
    assert "audio" in ds.fields
    with pytest.warns(SkippedSampleWarning, match=r"s-000000\.tar:0000: no audio member"):
        samples = list(ds)
    assert [s["text"] for s in samples] == ["sample 1", "sample 2", "sample 3"]
    assert all(s["audio"].shape == (800,) for s in samples)
    # image-text shards asked for [image, audio]: they hold no audio at all, so images are loaded (as manifests do)
    images = write_tar(tmp_path / "i-000000.tar", {"a.png": image_bytes(), "a.txt": b"x"})
    assert ShardDataset(images, processor=processor).fields == ("image", "text")


def test_empty_shards_are_skipped_with_a_warning_and_only_all_empty_is_an_error(tmp_path, processor):
    write_tar(tmp_path / "d-000000.tar", {})
    write_tar(tmp_path / "d-000001.tar", av_samples(range(2)))
    write_tar(tmp_path / "d-000002.tar", {})
    write_tar(tmp_path / "d-000003.tar", av_samples(range(2, 3)))
    with pytest.warns(SkippedSampleWarning, match=r"skipping shard .*d-000000\.tar: it holds no samples"):
        ds = ShardDataset(str(tmp_path / "d-{000000..000003}.tar"), processor=processor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [s["text"] for s in ds] == ["sample 0", "sample 1", "sample 2"]
    assert any("d-000002.tar: it holds no samples" in m for m in skipped(caught))
    with pytest.raises(ValueError, match=r"shards: all 2 shards hold no samples"), pytest.warns(SkippedSampleWarning):
        ShardDataset([str(tmp_path / "d-000000.tar"), str(tmp_path / "d-000002.tar")])


# ---------------------------------------------------------------------- 4. optional labels
def test_an_optional_label_on_some_rows_leaves_the_others_good_with_label_none(tmp_path, processor):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(image_bytes(i))
    rows = [{"image": "0.png", "text": "a", "label": "cat"}, {"image": "1.png", "text": "b"}, {"image": "2.png"}]
    rows[2]["text"], rows[2]["category"] = "c", None
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset(tmp_path / "m.jsonl", modalities=["image"], processor=processor)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedSampleWarning)
        samples = [ds[i] for i in range(3)]
    assert [s["label"] for s in samples] == [0, None, None] and ds.num_bad == 0
    batch = Collator()(samples)
    assert batch["text"] == ["a", "b", "c"] and "label" not in batch
    # shards: a .cls on some samples only
    members = {"a.png": image_bytes(), "a.txt": b"a", "a.cls": b"2", "b.png": image_bytes(), "b.txt": b"b"}
    shard = ShardDataset(write_tar(tmp_path / "l.tar", members), processor=processor)
    assert [s["label"] for s in shard] == [2, None]


# ---------------------------------------------------------------------- 5. TSV quoting
def test_tsv_is_read_without_quoting(tmp_path, processor):
    lines = ["image\tcaption", 'a.png\t"five" he said', 'a.png\t"unbalanced quote'] + [
        f"a.png\trow {i}" for i in range(3)
    ]
    (tmp_path / "a.png").write_bytes(image_bytes())
    (tmp_path / "m.tsv").write_text("\n".join(lines) + "\n")
    ds = ManifestDataset(tmp_path / "m.tsv", modalities=["image"], processor=processor)
    assert ds.texts() == ['"five" he said', '"unbalanced quote', "row 0", "row 1", "row 2"]
    assert ds.records[4].row == f"{tmp_path / 'm.tsv'}:6"


# ---------------------------------------------------------------------- 7. the path column
def test_a_path_column_holds_audio_or_images_by_extension_or_modalities(tmp_path, processor):
    (tmp_path / "clip.flac").write_bytes(audio_bytes())
    (tmp_path / "clip.dat").write_bytes(audio_bytes())
    (tmp_path / "pic.png").write_bytes(image_bytes())
    (tmp_path / "cv.tsv").write_text("client_id\tpath\tsentence\n7\tclip.flac\thello there\n")  # Common Voice
    speech = ManifestDataset(tmp_path / "cv.tsv", modalities=["audio"], processor=processor)
    assert speech.fields == ("audio", "text") and speech[0]["audio"].shape == (800,)
    assert open_dataset(str(tmp_path / "cv.tsv"), processor=processor).fields == ("audio", "text")  # [image, audio]
    (tmp_path / "images.csv").write_text("path,caption\npic.png,a picture\n")
    assert ManifestDataset(tmp_path / "images.csv", processor=processor).fields == ("image", "text")
    (tmp_path / "odd.csv").write_text("path,caption\nclip.dat,hello\n")  # no telling extension: the one asked for
    assert ManifestDataset(tmp_path / "odd.csv", modalities=["audio"], processor=processor)[0]["audio"].shape == (800,)
    with pytest.raises(ValueError, match=r"none of modalities=\['image', 'audio'\] is available"):
        ManifestDataset(tmp_path / "odd.csv", processor=processor)


# ---------------------------------------------------------------------- smaller: shard members, JSON captions
def test_shards_accept_the_media_manifests_accept_and_json_captions(tmp_path, processor):
    members = {
        "a.bmp": image_bytes(0, "BMP"),
        "a.txt": b"bitmap",
        "b.gif": image_bytes(1, "GIF"),
        "b.json": json.dumps({"caption": "from json", "url": "x"}).encode(),
        "c.tif": image_bytes(2, "TIFF"),
        "c.json": json.dumps({"text": "from text key"}).encode(),
        "d.png": image_bytes(3),
        "d.json": json.dumps({"url": "no caption"}).encode(),
    }
    with pytest.warns(SkippedSampleWarning, match=r"x\.tar:d: no text member \(expected \.txt, \.text, \.caption or"):
        samples = list(ShardDataset(write_tar(tmp_path / "x.tar", members), processor=processor))
    assert [s["text"] for s in samples] == ["bitmap", "from json", "from text key"]
    assert all(s["image"].shape == (3, 8, 8) for s in samples)
    opus = write_tar(tmp_path / "o.tar", {"a.opus": audio_bytes(0, "OGG"), "a.txt": b"speech"})
    assert next(iter(ShardDataset(opus, modalities=["audio"], processor=processor)))["text"] == "speech"
    # image-label shards whose .json is metadata (timm's ImageNet shards): no text is asked of them
    labelled = write_tar(tmp_path / "n.tar", {"a.png": image_bytes(), "a.cls": b"3", "a.json": b'{"label": 3}'})
    ds = ShardDataset(labelled, modalities=["image"], processor=processor)
    assert ds.fields == ("image", "label") and next(iter(ds))["label"] == 3


# ---------------------------------------------------------------------- smaller: bad JSONL lines, messages
def test_a_truncated_jsonl_line_is_one_bad_sample_named_by_its_line(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(image_bytes())
    good = json.dumps({"image": "a.png", "text": "fine"})
    (tmp_path / "m.jsonl").write_text(f"{good}\n{good}\n\n[1, 2]\n{good}\n" + '{"image": "a.png", "te')
    ds = ManifestDataset(tmp_path / "m.jsonl", processor=processor)
    assert len(ds) == 5 and ds.texts() == ["fine"] * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = [ds[i] for i in range(len(ds))]
    assert [s is None for s in samples] == [False, False, True, False, True] and ds.num_bad == 2
    messages = skipped(caught)
    assert any(f"{tmp_path / 'm.jsonl'}:4: not a JSON object (list)" in m for m in messages), messages
    assert any(f"{tmp_path / 'm.jsonl'}:6: not valid JSON" in m for m in messages), messages


def test_text_faults_name_the_file_and_the_manifest_line(tmp_path, processor):
    (tmp_path / "a.png").write_bytes(image_bytes())
    rows = [{"image": "a.png", "text": "ok"}, {"image": "a.png"}, {"image": "a.png", "text": " "}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ManifestDataset(tmp_path / "m.jsonl", processor=processor)
    image, manifest = tmp_path / "a.png", tmp_path / "m.jsonl"
    with pytest.warns(SkippedSampleWarning, match=rf"{image} \({manifest}:2\): missing text"):
        assert ds[1] is None
    with pytest.warns(SkippedSampleWarning, match=rf"{image} \({manifest}:3\): empty text"):
        assert ds[2] is None


def test_reading_shards_leaves_no_file_open(tmp_path, processor):
    shard = write_tar(tmp_path / "s.tar", av_samples(range(3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ShardDataset(shard, processor=processor)
        next(iter(ds))  # a reader stopped early, too
        list(ds)
        ds.texts()
        del ds
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# ---------------------------------------------------------------------- 6, smaller: augmentation settings
def test_translate_is_a_width_height_pair_of_fractions():
    assert AugmentConfig(image={"translate": [0.2, 0.0]}).image.translate == (0.2, 0.0)
    for bad in ([0.1, 1.5], [-0.1, 0.0], [0.1]):
        with pytest.raises(ValueError, match=r"augment.image.translate: expected .*\(width, height\)"):
            AugmentConfig(image={"translate": bad})


def test_a_blur_kernel_larger_than_the_image_is_refused_by_name(processor):
    config = AugmentConfig(image={"blur_prob": 1.0, "blur_kernel": 9})
    with pytest.raises(ValueError, match=r"augment.image.blur_kernel: .* image's smaller side \(image_size=\[8, 8\]\)"):
        Augmenter(config, processor)
    Augmenter(AugmentConfig(image={"blur_prob": 1.0, "blur_kernel": 7}), processor)
