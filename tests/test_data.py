"""Data: every format reads a tiny fixture; bad samples are skipped and counted; collation; the DataModule."""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from mmformer.data import (
    CocoCaptions,
    Collator,
    ImageFolder,
    LibriSpeech,
    ManifestDataset,
    MultimodalDataModule,
    ShardDataset,
    SkippedSampleWarning,
    TooManyBadSamplesError,
    detect_format,
    open_dataset,
)
from mmformer.data.augment import AugmentConfig
from mmformer.data.manifest import read_rows
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RATE = 16000


@pytest.fixture
def processor() -> Processor:
    return Processor(image=ImageProcessorConfig(image_size=8), audio=AudioProcessorConfig(sample_rate=RATE))


def png_bytes(seed: int, size: tuple[int, int] = (10, 14)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def flac_bytes(seed: int, seconds: float = 0.05) -> bytes:
    wave = np.random.default_rng(seed).normal(0, 0.1, int(RATE * seconds)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, RATE, format="FLAC")
    return buf.getvalue()


def caption(i: int) -> str:
    return " ".join(WORDS[int(d)] for d in str(i))


def write_digits(root: Path, n: int, split: str = "train") -> list[dict]:
    """A miniature of data/digits: images/ and audio/ folders and one row per sample carrying both."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "audio" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, audio = f"images/{split}/{i:06d}.png", f"audio/{split}/{i:06d}.flac"
        (root / image).write_bytes(png_bytes(i))
        (root / audio).write_bytes(flac_bytes(i, seconds=0.05 + 0.01 * (i % 3)))
        rows.append({"image": image, "audio_filepath": audio, "text": caption(i), "duration": 0.05 + 0.01 * (i % 3)})
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    return path


# ---------------------------------------------------------------------- manifests
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_image_text_manifest(tmp_path, processor, suffix):
    rows = write_digits(tmp_path, 3)
    rows = [{"filepath": r["image"], "caption": r["text"]} for r in rows]  # column aliases
    ds = ManifestDataset(write_manifest(tmp_path / f"train{suffix}", rows), processor=processor)
    assert len(ds) == 3 and ds.fields == ("image", "text")
    sample = ds[1]
    assert sample["image"].shape == (3, 8, 8) and sample["text"] == "one"
    assert sample["source"] == str(tmp_path / "images/train/000001.png")
    assert ds.texts() == ["zero", "one", "two"]


def test_manifest_with_both_media_and_modalities(tmp_path, processor):
    rows = write_digits(tmp_path / "data", 2)
    path = write_manifest(tmp_path / "data" / "train.jsonl", rows)
    both = ManifestDataset(path, processor=processor)
    assert set(both[0]) == {"image", "audio", "text", "source"}
    assert both[0]["audio"].shape == (int(0.05 * RATE),) and both[0]["audio"].dtype == torch.float32
    image_only = ManifestDataset(path, modalities=["image"], processor=processor)
    assert set(image_only[0]) == {"image", "text", "source"}
    audio_only = ManifestDataset(path, modalities=("audio",), processor=processor)
    assert set(audio_only[0]) == {"audio", "text", "source"} and audio_only[0]["source"].endswith("000000.flac")
    # the same manifest elsewhere, its relative paths resolved against root
    moved = write_manifest(tmp_path / "elsewhere.jsonl", rows)
    assert ManifestDataset(moved, root=tmp_path / "data", processor=processor)[1]["text"] == "one"
    with pytest.raises(ValueError, match="modalities: expected a non-empty subset"):
        ManifestDataset(path, modalities=["video"])
    text_only = write_manifest(tmp_path / "captions.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=r"none of modalities=\['image', 'audio'\] is available; it has \['text'\]"):
        ManifestDataset(text_only)


def test_audio_manifest_max_duration(tmp_path, processor):
    rows = write_digits(tmp_path, 6)
    rows = [{"audio_filepath": r["audio_filepath"], "text": r["text"], "duration": r["duration"]} for r in rows]
    path = write_manifest(tmp_path / "speech.jsonl", rows)
    ds = ManifestDataset(path, modalities=["audio"], max_duration=0.055, processor=processor)
    assert len(ds) == 2 and ds.num_filtered == 4  # only the 0.05 s rows (0 and 3) remain
    assert [ds[i]["text"] for i in range(2)] == ["zero", "three"]


def test_manifest_string_labels(tmp_path, processor):
    rows = write_digits(tmp_path, 3)
    rows = [{"image": r["image"], "label": name} for r, name in zip(rows, ["dog", "cat", "dog"])]
    ds = ManifestDataset(write_manifest(tmp_path / "labels.csv", rows), processor=processor)
    assert ds.classes == ["cat", "dog"] and [ds[i]["label"] for i in range(3)] == [1, 0, 1]


# ---------------------------------------------------------------------- COCO, LibriSpeech, ImageFolder
def test_coco_captions(tmp_path, processor):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in (7, 9):
        (tmp_path / "train2017" / f"{i:012d}.jpg").write_bytes(png_bytes(i))  # PIL reads by content
    coco = {
        "images": [{"id": 7, "file_name": f"{7:012d}.jpg"}, {"id": 9, "file_name": f"{9:012d}.jpg"}],
        "annotations": [
            {"image_id": 7, "id": 1, "caption": "a cat"},
            {"image_id": 9, "id": 2, "caption": "a dog"},
            {"image_id": 7, "id": 3, "caption": "a sleeping cat"},
        ],
    }
    path = tmp_path / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps(coco))
    ds = CocoCaptions(path, processor=processor)  # images found in ../train2017, the official layout
    assert len(ds) == 3 and [ds[i]["text"] for i in range(3)] == ["a cat", "a dog", "a sleeping cat"]
    assert ds[0]["image"].shape == (3, 8, 8) and ds[0]["source"].endswith("000000000007.jpg")
    per_image = CocoCaptions(path, processor=processor, one_per_image=True)
    assert len(per_image) == 2
    assert {per_image[0]["text"] for _ in range(20)} <= {"a cat", "a sleeping cat"}
    assert sorted(per_image.texts()) == ["a cat", "a dog", "a sleeping cat"]
    assert detect_format(path) == "coco"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="expected a JSON object with 'images'"):
        CocoCaptions(bad)


def test_librispeech(tmp_path, processor):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    for speaker, chapter, n in ((19, 198, 2), (26, 495, 1)):
        folder = root / str(speaker) / str(chapter)
        folder.mkdir(parents=True)
        lines = []
        for u in range(n):
            utt = f"{speaker}-{chapter}-{u:04d}"
            (folder / f"{utt}.flac").write_bytes(flac_bytes(u))
            lines.append(f"{utt} HELLO WORLD NUMBER {WORDS[u].upper()}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    ds = LibriSpeech(tmp_path / "LibriSpeech", processor=processor)
    assert len(ds) == 3
    assert ds[0]["text"] == "hello world number zero" and ds[0]["source"].endswith("19-198-0000.flac")
    assert ds[2]["audio"].shape == (int(0.05 * RATE),)
    assert LibriSpeech(root, lowercase=False, processor=processor)[1]["text"] == "HELLO WORLD NUMBER ONE"
    assert detect_format(tmp_path / "LibriSpeech") == "librispeech"


def test_imagefolder(tmp_path, processor):
    for name, n in (("two", 1), ("one", 2), ("zero", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            (tmp_path / name / f"{i}.png").write_bytes(png_bytes(i))
    (tmp_path / "one" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, processor=processor)
    assert ds.classes == ["one", "two", "zero"] and len(ds) == 4
    assert [ds[i]["label"] for i in range(4)] == [0, 0, 1, 2] and ds[0]["image"].shape == (3, 8, 8)
    prompted = ImageFolder(tmp_path, processor=processor, text_template="a photo of the digit {}.")
    assert prompted[3]["text"] == "a photo of the digit zero."
    assert detect_format(tmp_path) == "imagefolder"
    assert open_dataset(str(tmp_path), format="imagefolder", processor=processor).classes == ds.classes
    with pytest.raises(ValueError, match=r"modalities: imagefolder data .* holds images; got modalities=\['audio'\]"):
        open_dataset(str(tmp_path), modalities=["audio"])
    batch = Collator()([ds[i] for i in range(4)])
    assert batch["label"].tolist() == [0, 0, 1, 2] and batch["pixel_values"].shape == (4, 3, 8, 8)


# ---------------------------------------------------------------------- WebDataset shards
def write_shards(root: Path, shards: int = 2, per_shard: int = 5, audio: bool = False) -> str:
    for s in range(shards):
        with tarfile.open(root / f"data-{s:06d}.tar", "w") as tar:
            for k in range(per_shard):
                i = s * per_shard + k
                members = {"txt": caption(i).encode(), "cls": str(i % 3).encode()}
                members["flac" if audio else "png"] = flac_bytes(i) if audio else png_bytes(i)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"data-{{000000..{shards - 1:06d}}}.tar")


def test_shards_read_every_sample_once_split_by_worker(tmp_path, processor):
    pattern = write_shards(tmp_path)
    assert detect_format(pattern) == "webdataset"
    ds = ShardDataset(pattern, processor=processor)
    assert ds.fields == ("image", "text", "label") and len(ds.shards) == 2
    samples = list(ds)
    assert [s["text"] for s in samples] == [caption(i) for i in range(10)]
    assert samples[0]["image"].shape == (3, 8, 8) and samples[4]["label"] == 1

    def tag_worker(batch):  # runs in the worker process
        return get_worker_info().id, Collator()(batch)["text"]

    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=tag_worker)
    by_worker: dict[int, list[str]] = {0: [], 1: []}
    for worker, texts in loader:
        by_worker[worker] += texts
    assert by_worker == {0: [caption(i) for i in range(5)], 1: [caption(i) for i in range(5, 10)]}  # one shard each


def test_shards_split_by_rank_and_worker(tmp_path, processor):
    pattern = write_shards(tmp_path, audio=True)
    texts = Counter()
    for rank in range(2):  # 2 ranks × 2 workers = 4 readers > 2 shards: split by sample
        ds = ShardDataset(pattern, processor=processor, rank=rank, world_size=2, modalities=["audio"])
        loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator())
        for batch in loader:
            assert batch["audio"].shape[0] == batch["audio_lengths"].shape[0] == len(batch["text"])
            texts.update(batch["text"])
    assert texts == Counter(caption(i) for i in range(10))
    rank1 = [s["text"] for s in ShardDataset(pattern, rank=1, world_size=2, processor=processor, modalities=["audio"])]
    assert rank1 == [caption(i) for i in range(5, 10)]  # 2 readers, 2 shards: rank 1 reads the second shard
    with pytest.raises(ValueError, match="rank and world_size"):
        ShardDataset(pattern, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="1 of 3 shard files not found"):
        ShardDataset(str(tmp_path / "data-{000000..000002}.tar"))


def test_shards_shuffle_is_seeded_per_epoch(tmp_path, processor):
    ds = ShardDataset(write_shards(tmp_path, shards=3), processor=processor, shuffle=True, shuffle_buffer=8, seed=1)
    first = [s["text"] for s in ds]
    assert sorted(first) == sorted(caption(i) for i in range(15)) and first != [caption(i) for i in range(15)]
    assert [s["text"] for s in ds] == first  # same seed and epoch: same order
    ds.set_epoch(1)
    assert [s["text"] for s in ds] != first
    assert sorted(ds.texts()) == sorted(caption(i) for i in range(15))


# ---------------------------------------------------------------------- bad samples
def test_bad_samples_are_skipped_with_a_warning(tmp_path, processor):
    rows = write_digits(tmp_path, 4)
    (tmp_path / rows[1]["image"]).write_bytes(np.random.default_rng(0).bytes(300))  # random bytes named .png
    audio = (tmp_path / rows[2]["audio_filepath"]).read_bytes()
    (tmp_path / rows[2]["audio_filepath"]).write_bytes(audio[: len(audio) // 2])  # truncated FLAC
    rows[3]["text"] = "  "
    ds = ManifestDataset(write_manifest(tmp_path / "train.jsonl", rows), processor=processor)
    assert ds[0] is not None
    with pytest.warns(SkippedSampleWarning, match=r"000001\.png: cannot decode image"):
        assert ds[1] is None
    with pytest.warns(SkippedSampleWarning, match=r"000002\.flac: cannot decode audio"):
        assert ds[2] is None
    with pytest.warns(SkippedSampleWarning, match=r"000003\.png \(.*train\.jsonl:4\): empty text"):  # file and line
        assert ds[3] is None
    assert (ds.num_seen, ds.num_bad) == (4, 3)  # under 20 samples seen: no error yet
    batch = Collator()([ds[0], None, None])
    assert batch["pixel_values"].shape == (1, 3, 8, 8) and batch["text"] == ["zero"]
    assert Collator()([None, None]) is None


def test_missing_file_and_bad_shard_member_are_skipped(tmp_path, processor):
    rows = write_digits(tmp_path, 2)
    rows[1]["image"] = "images/train/gone.png"
    ds = ManifestDataset(write_manifest(tmp_path / "train.csv", rows), processor=processor, modalities=["image"])
    with pytest.warns(SkippedSampleWarning, match=r"gone\.png: file not found"):
        assert ds[1] is None
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in (("a.png", png_bytes(0)), ("a.txt", b"zero"), ("b.png", b"garbage"), ("b.txt", b"one")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.warns(SkippedSampleWarning, match=r"bad\.tar:b\.png: cannot decode image"):
        assert [s["text"] for s in ShardDataset(str(tmp_path / "bad.tar"), processor=processor)] == ["zero"]


def test_too_many_bad_samples_raise_a_clear_error(tmp_path, processor):
    rows = write_digits(tmp_path, 25)
    for r in rows[::4]:  # 7 of 25 images missing: 28% > 10%
        r["image"] = "images/train/missing.png"
    ds = ManifestDataset(write_manifest(tmp_path / "train.jsonl", rows), processor=processor, modalities=["image"])
    with (
        pytest.warns(SkippedSampleWarning),
        pytest.raises(
            TooManyBadSamplesError,
            match=r"6 of 21 samples read from .*train\.jsonl were bad \(29%, more than max_bad_fraction=0\.1\)",
        ),
    ):
        for i in range(len(ds)):
            ds[i]
    tolerant = ManifestDataset(
        tmp_path / "train.jsonl", processor=processor, modalities=["image"], max_bad_fraction=0.5
    )
    with pytest.warns(SkippedSampleWarning):
        assert sum(tolerant[i] is None for i in range(len(tolerant))) == 7


# ---------------------------------------------------------------------- collation
def test_collator_shapes_padding_and_masks():
    tokenizer = Tokenizer.train([caption(i) for i in range(100)], vocab_size=300, max_length=8)
    samples = [
        {"image": torch.rand(3, 8, 8), "audio": torch.ones(5), "text": "one two", "label": 1, "source": "a"},
        None,
        {"image": torch.rand(3, 8, 8), "audio": torch.ones(3), "text": "one two three four", "label": 0, "source": "b"},
    ]
    batch = Collator(tokenizer)(samples)
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["audio"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["audio_lengths"].tolist() == [5, 3] and batch["audio_lengths"].dtype == torch.long
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"][1].all() and not batch["attention_mask"][0].all()
    assert (batch["input_ids"][0][~batch["attention_mask"][0]] == tokenizer.pad_id).all()
    assert batch["text"] == ["one two", "one two three four"] and batch["label"].tolist() == [1, 0]
    assert batch["source"] == ["a", "b"]
    assert Collator(tokenizer, text_max_length=3)(samples)["input_ids"].shape == (2, 3)
    with pytest.raises(ValueError, match="samples of one batch must carry the same fields"):
        Collator()([{"text": "x", "source": "a"}, {"text": "y", "audio": torch.ones(2), "source": "b"}])
    # a label is optional: a batch with an unlabelled sample (label None, or none at all) has no label
    assert "label" not in Collator()([{"text": "x", "label": None, "source": "a"}, {"text": "y", "label": 1}])
    assert "label" not in Collator()([{"text": "x", "source": "a"}, {"text": "y", "label": 1, "source": "b"}])


# ---------------------------------------------------------------------- DataModule
def test_datamodule_trains_a_tokenizer_and_batches(tmp_path):
    root = tmp_path / "digits"
    train = write_manifest(root / "train.jsonl", write_digits(root, 12, "train"))
    val = write_manifest(root / "val.jsonl", write_digits(root, 5, "val"))
    kwargs = dict(train=str(train), val=str(val), batch_size=4, image_size=8, vocab_size=300, seed=3)
    dm = MultimodalDataModule(tokenizer_cache_dir=str(tmp_path / "cache"), **kwargs)
    vocab_size = dm.vocab_size  # before setup: trains (and caches) the tokenizer
    assert 260 < vocab_size <= 300 and len(list((tmp_path / "cache").glob("tokenizer-*.json"))) == 1
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["audio"].shape[0] == 4
    assert batch["input_ids"].max() < vocab_size and batch["attention_mask"].dtype == torch.bool
    order = [t for b in dm.train_dataloader() for t in b["text"]]
    assert sorted(order) == sorted(caption(i) for i in range(12))
    assert [b["text"] for b in dm.val_dataloader()][0] == [caption(i) for i in range(4)]  # not shuffled

    again = MultimodalDataModule(tokenizer_cache_dir=str(tmp_path / "cache"), **kwargs)
    again.setup("fit")
    assert [t for b in again.train_dataloader() for t in b["text"]] == order  # same seed, same order
    assert again.tokenizer.vocab_size == vocab_size  # loaded from the cache
    assert again.processor.tokenizer is again.tokenizer and again.processor.image.image_size == (8, 8)
    assert again.test_dataloader() == []  # no test data: Lightning skips the loop

    dm.processor.save_pretrained(tmp_path / "export")
    tokenizer_file = tmp_path / "export" / "tokenizer.json"
    assert Tokenizer.from_file(tokenizer_file).vocab_size == vocab_size
    fixed = MultimodalDataModule(val=str(val), tokenizer=str(tokenizer_file), modalities=["audio"], image_size=8)
    assert fixed.vocab_size == vocab_size
    fixed.setup("validate")
    assert set(next(iter(fixed.val_dataloader()))) == {
        "audio",
        "audio_lengths",
        "text",
        "input_ids",
        "attention_mask",
        "source",
    }


def test_predict_data_rows_without_text_are_predicted_like_the_others(tmp_path):
    root = tmp_path / "digits"
    rows = write_digits(root, 6, "test")
    partial = [{k: v for k, v in r.items() if k != "text" or i in (3, 5)} for i, r in enumerate(rows)]
    partial[1]["text"] = " "  # blank: no text either
    train = write_manifest(root / "train.jsonl", write_digits(root, 4, "train"))
    predict = write_manifest(root / "predict.jsonl", partial)
    kwargs = dict(batch_size=4, image_size=8, vocab_size=300, tokenizer_cache_dir=str(tmp_path / "cache"))
    dm = MultimodalDataModule(train=str(train), predict=str(predict), **kwargs)
    with pytest.warns(UserWarning, match=r"4 of 6 rows of .*predict\.jsonl have no text: every row is read without"):
        dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [s for b in batches for s in b["source"]] == [str(root / r["image"]) for r in rows]
    assert not any("text" in b or "input_ids" in b for b in batches)  # every row alike: features line up by row
    full = MultimodalDataModule(train=str(train), predict=str(train), **kwargs)
    full.setup("predict")
    assert [t for b in full.predict_dataloader() for t in b["text"]] == [caption(i) for i in range(4)]
    training = MultimodalDataModule(train=str(predict), **kwargs)  # training data needs its texts: skipped
    training.setup("fit")
    with pytest.warns(SkippedSampleWarning, match="(missing|empty) text"):
        texts = [t for b in training.train_dataloader() if b is not None for t in b["text"]]  # None: all bad
    assert sorted(texts) == sorted([caption(3), caption(5)])


class _Niceness(torch.utils.data.Dataset):
    """Each item is the niceness of the process that loads it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return os.nice(0)


def test_loader_workers_run_at_the_niceness_asked(tmp_path):
    from mmformer.data.loaders import niced

    base = os.nice(0)
    loader = torch.utils.data.DataLoader(_Niceness(), num_workers=1, worker_init_fn=niced(7))
    assert [int(x) for x in loader] == [min(19, base + 7)] * 2 and os.nice(0) == base  # the trainer's is unchanged
    assert niced(0) is None
    root = tmp_path / "digits"
    train = write_manifest(root / "train.jsonl", write_digits(root, 4, "train"))
    kwargs = dict(train=str(train), batch_size=2, image_size=8, vocab_size=300, tokenizer_cache_dir=str(tmp_path))
    dm = MultimodalDataModule(num_workers=1, worker_nice=19, **kwargs)
    dm.setup("fit")
    assert dm.train_dataloader().worker_init_fn.args == (19,)
    for bad in (-1, 20, 1.5, "19"):
        with pytest.raises(ValueError, match="worker_nice: expected an int from 0 to 19"):
            MultimodalDataModule(worker_nice=bad, **kwargs)


def test_datamodule_streams_shards(tmp_path):
    pattern = write_shards(tmp_path)
    dm = MultimodalDataModule(
        train=pattern, batch_size=4, image_size=8, vocab_size=300, tokenizer_cache_dir=str(tmp_path)
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[t for b in loader for t in b["text"]] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(caption(i) for i in range(10))
    assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_streamed_training_data_is_augmented_per_sample_and_epoch(tmp_path):
    pattern = write_shards(tmp_path)
    augment = AugmentConfig(image={"affine_prob": 1.0, "degrees": 20, "translate": (0.2, 0.2)})

    def passes(n: int, augment: AugmentConfig | None = augment) -> list[dict[str, torch.Tensor]]:
        """Each pass over the stream (without a trainer, pass k is epoch k): every sample's pixels."""
        cache = str(tmp_path)
        dm = MultimodalDataModule(train=pattern, batch_size=4, image_size=8, tokenizer_cache_dir=cache, augment=augment)
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [{s: b["pixel_values"][i] for b in loader for i, s in enumerate(b["source"])} for _ in range(n)]

    first, second = passes(2)
    (plain,) = passes(1, augment=None)
    assert first.keys() == second.keys() == plain.keys() and len(first) == 10
    assert not any(torch.equal(first[s], second[s]) or torch.equal(first[s], plain[s]) for s in first)
    assert all(torch.equal(first[s], again) for s, again in passes(1)[0].items())  # a pure function of the seed


def test_format_detection_and_errors(tmp_path):
    assert detect_format("x/train.tsv") == "manifest" and detect_format("s/shard-000001.tar") == "webdataset"
    assert detect_format("books/hamlet.txt") == "text"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(tmp_path / "nothing.xyz")
    with pytest.raises(ValueError, match="format: expected one of"):
        MultimodalDataModule(format="parquet")
    with pytest.raises(ValueError, match="tokenizer: expected a tokenizer.json path, or train data"):
        MultimodalDataModule().tokenizer  # noqa: B018
    with pytest.raises(ValueError, match="paths: expected paths of one format"):
        open_dataset([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")])


# ---------------------------------------------------------------------- the shipped data sets
DATA = Path(__file__).resolve().parent.parent / "data"
GERMAN = ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"]


def build_constant(name: str):
    """A constant of data/build_digits.py, read without importing it (its build-time imports are not mmformer's)."""
    tree = ast.parse((DATA / "build_digits.py").read_text(encoding="utf-8"))
    names = lambda n: [t.id for t in n.targets if isinstance(t, ast.Name)]
    values = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign) and name in names(n)]
    assert len(values) == 1, name
    return values[0]


def shipped(name: str, split: str) -> list[dict]:
    return read_rows(DATA / name / f"{split}.jsonl")


def families(rows: list[dict]) -> set[tuple[str, ...]]:
    """The espeak-ng variant families (variants that are edits of one another) the rows speak with."""
    groups = build_constant("FAMILIES")
    variants = {r["voice"].split("+", 1)[1] for r in rows}
    return {next((f for f in groups if v in f), (v,)) for v in variants}


def singles_per_class(rows: list[dict]) -> Counter:
    return Counter(r["digits"] for r in rows if len(r["digits"]) == 1)


def test_test_hard_lies_outside_the_training_distribution():
    train, val, test, hard = (shipped("digits", s) for s in ("train", "val", "test", "test_hard"))
    trained = train + val
    assert len(hard) == 300 and min(singles_per_class(hard).values()) >= 20 and len(singles_per_class(hard)) == 10
    assert not families(hard) & families(trained)  # no held-out variant, nor a near twin of one, is trained on
    assert not {r["voice"] for r in test} & {r["voice"] for r in trained}  # test: unheard accent+variant pairs
    for key in ("speed", "pitch"):
        low, high = min(r[key] for r in trained), max(r[key] for r in trained)
        values = [r[key] for r in hard]
        assert all(v < low or v > high for v in values), key  # outside training's whole range
        assert min(values) < low and max(values) > high, key  # on both sides of it
    for row in hard:  # per-digit distortions the training images never have, within the documented ranges
        assert len(row["affine"]) == len(row["digits"])
        for dx, dy, degrees, scale in row["affine"]:
            assert abs(dx) <= 2 and abs(dy) <= 2 and abs(degrees) <= 10 and 0.85 <= scale <= 1.15
    assert not any("affine" in r for r in trained + test)


def test_german_digits_test_voices_are_unheard_in_training():
    train, val, test = (shipped("digits_de", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (600, 100, 200)
    assert not families(test) & families(train + val + shipped("digits", "train"))
    assert {r["voice"].split("+")[0] for r in train + val + test} == {"de"}
    assert {w for r in train + val + test for w in r["text"].split()} == set(GERMAN)
    assert all(r["text"] == " ".join(GERMAN[int(d)] for d in r["digits"]) for r in train + val + test)
    assert not any("image" in r for r in train + val + test)  # speech and text only


def split_digest(root: Path, split: str) -> str:
    """As data/build_digits.py records it: sha256 of the manifest, then each file's path and bytes in order."""
    h = hashlib.sha256()
    manifest = (root / f"{split}.jsonl").read_bytes()
    h.update(manifest)
    for row in map(json.loads, manifest.decode().splitlines()):
        for key in ("image", "audio_filepath"):
            if key in row:
                h.update(row[key].encode() + b"\0" + (root / row[key]).read_bytes())
    return h.hexdigest()


def test_the_first_release_val_and_test_splits_are_unchanged():
    """Today's figures were measured on them: a rebuild must reproduce them bit for bit."""
    for split, digest in build_constant("FROZEN").items():
        assert split_digest(DATA / "digits", split) == digest, split


def test_the_shipped_data_sets_load_through_the_datamodule(tmp_path):
    images = dict(image_size=[16, 64], image_channels=1, image_mean=[0.5], image_std=[0.5], max_audio_seconds=8.0)
    english = MultimodalDataModule(
        train=str(DATA / "digits" / "train.jsonl"),
        val=str(DATA / "digits" / "val.jsonl"),
        test=str(DATA / "digits" / "test_hard.jsonl"),
        tokenizer=str(DATA / "digits_model" / "tokenizer.json"),
        batch_size=4,
        **images,
    )
    english.setup()
    assert [len(english.datasets[s]) for s in ("train", "val", "test")] == [2200, 400, 300]
    for loader in (english.train_dataloader(), english.val_dataloader(), english.test_dataloader()):
        batch = next(iter(loader))
        assert batch["pixel_values"].shape == (4, 1, 16, 64) and batch["audio"].shape[0] == 4
        assert batch["audio_lengths"].max() == batch["audio"].shape[1] and batch["input_ids"].shape[0] == 4
    german = MultimodalDataModule(
        train=str(DATA / "digits_de" / "train.jsonl"),
        test=str(DATA / "digits_de" / "test.jsonl"),
        vocab_size=300,
        tokenizer_cache_dir=str(tmp_path),
        batch_size=4,
    )
    german.setup()
    batch = next(iter(german.test_dataloader()))
    assert "pixel_values" not in batch and batch["audio"].shape[0] == 4
    assert german.tokenizer.batch_decode(batch["input_ids"]) == batch["text"]  # umlauts survive the tokenizer
