"""The LightningDataModule behind ``mmformer fit --config ...``: paths in, batches out.

Every argument is a plain type so LightningCLI/jsonargparse configures it from YAML:

    data:
      train: data/digits/train.jsonl        # or a list; COCO .json, shards-{000..009}.tar, LibriSpeech/ImageFolder dirs
      val: data/digits/val.jsonl
      modalities: [image, audio]
      batch_size: 32

The tokenizer is ``tokenizer`` (a tokenizer.json) or, without one, a byte-level BPE trained on the training
texts and cached under ``tokenizer_cache_dir`` by a hash of those texts and ``vocab_size`` (training is
deterministic, so every process of a multi-GPU run gets the same one). ``vocab_size`` (the property) is the
trained tokenizer's actual size, for ``link_arguments("data.vocab_size", ..., apply_on="instantiate")``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmformer.data.collate import Collator
from mmformer.data.formats import FORMATS, dataset_texts, open_dataset

if TYPE_CHECKING:
    from mmformer.processor import Processor
    from mmformer.tokenizer import Tokenizer

log = logging.getLogger(__name__)
STAGES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class _EpochLoader(DataLoader):
    """A DataLoader that tells a streaming data set the epoch before each pass (for its shuffle).

    Lightning calls ``set_epoch`` on samplers only, and an IterableDataset has none; the data set is copied
    into worker processes when iteration starts, so setting it here reaches them.
    """

    _epoch = 0

    def __iter__(self):
        self.dataset.set_epoch(self._epoch)
        self._epoch += 1
        return super().__iter__()


class MultimodalDataModule(L.LightningDataModule):
    """Training/evaluation data from manifests, COCO, WebDataset shards, LibriSpeech or ImageFolder.

    Args:
        train: path(s) of the training data; the format is detected from the path (see
            :func:`~mmformer.data.detect_format`) unless ``format`` is set.
        val: validation data.
        test: test data.
        predict: prediction data (texts optional).
        format: force one format for all paths: manifest, coco, webdataset, librispeech, imagefolder.
        modalities: media to load where the data has them (text is loaded whenever present).
        tokenizer: a tokenizer.json (or a folder holding one); None trains one on the training texts.
        vocab_size: target vocabulary size when training a tokenizer.
        tokenizer_cache_dir: where trained tokenizers are cached.
        batch_size: samples per batch (per process).
        num_workers: DataLoader worker processes.
        image_size: output image side (or [H, W]).
        image_mean: per-channel normalisation mean (default: CLIP's).
        image_std: per-channel normalisation std (default: CLIP's).
        image_channels: 3 (RGB) or 1 (grayscale).
        sample_rate: audio is resampled to this rate (Hz).
        max_audio_seconds: longer audio is truncated; None = no limit.
        max_duration: drop manifest rows whose ``duration`` exceeds this (seconds).
        text_max_length: truncate texts to this many tokens (default: the tokenizer's max_length).
        max_bad_fraction: the tolerated fraction of unreadable samples before an error.
        seed: seed of the training order (same seed, same order, so a resumed run continues in place).
        shuffle: shuffle the training data.
        shuffle_buffer: shuffle buffer of WebDataset shards (samples per reader).
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        predict: str | list[str] | None = None,
        format: str | None = None,
        modalities: tuple[str, ...] = ("image", "audio"),
        tokenizer: str | None = None,
        vocab_size: int = 512,
        tokenizer_cache_dir: str = "runs/tokenizers",
        batch_size: int = 32,
        num_workers: int = 0,
        image_size: int | tuple[int, int] = 224,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        image_channels: int = 3,
        sample_rate: int = 16000,
        max_audio_seconds: float | None = 30.0,
        max_duration: float | None = None,
        text_max_length: int | None = None,
        max_bad_fraction: float = 0.1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
    ):
        super().__init__()
        from mmformer.processor import AudioProcessorConfig, ImageProcessorConfig, Processor

        if format is not None and format not in FORMATS:
            raise ValueError(f"format: expected one of {list(FORMATS)} or None; got {format!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int; got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers: expected an int >= 0; got {num_workers!r}")
        self.save_hyperparameters()
        self.paths = {"train": train, "val": val, "test": test, "predict": predict}
        self.format, self.modalities = format, tuple(modalities)
        self.tokenizer_path = tokenizer
        self.target_vocab_size = vocab_size  # `vocab_size` (the property) is the tokenizer's actual size
        self.tokenizer_cache_dir = tokenizer_cache_dir
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.max_duration, self.text_max_length, self.max_bad_fraction = max_duration, text_max_length, max_bad_fraction
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        stats = {k: tuple(v) for k, v in (("mean", image_mean), ("std", image_std)) if v is not None}
        image = ImageProcessorConfig(image_size=image_size, channels=image_channels, **stats)
        audio = AudioProcessorConfig(sample_rate=sample_rate, max_seconds=max_audio_seconds)
        self._processor = Processor(None, image, audio)  # the tokenizer is attached on first use (see .tokenizer)
        self.datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ tokenizer / processor
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (loaded, or trained on the training texts, on first access)."""
        if self._processor.tokenizer is None:
            self._processor.tokenizer = self._load_or_train_tokenizer()
        return self._processor.tokenizer

    @property
    def processor(self) -> Processor:
        """The :class:`~mmformer.Processor` (tokenizer + image/audio settings) to save next to the model."""
        self.tokenizer  # noqa: B018  (attaches it)
        return self._processor

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (may be below the ``vocab_size`` target for a small corpus)."""
        return self.tokenizer.vocab_size

    def _load_or_train_tokenizer(self):
        from mmformer.tokenizer import Tokenizer

        if self.tokenizer_path is not None:
            return Tokenizer.from_file(self.tokenizer_path)
        if self.paths["train"] is None:
            raise ValueError("tokenizer: expected a tokenizer.json path, or train data to learn one from; got neither")
        texts = dataset_texts(self._dataset("train"))
        if not texts:
            raise ValueError(f"tokenizer: train data {self.paths['train']} has no texts to learn a tokenizer from")
        digest = hashlib.sha256(f"bpe-{self.target_vocab_size}\n".encode())
        for t in texts:
            digest.update(t.encode("utf-8") + b"\n")
        cache = Path(self.tokenizer_cache_dir) / f"tokenizer-{digest.hexdigest()[:16]}.json"
        if cache.is_file():
            log.info("using the cached tokenizer %s", cache)
            return Tokenizer.from_file(cache)
        tokenizer = Tokenizer.train(texts, vocab_size=self.target_vocab_size)
        tokenizer.save(cache)
        log.info(
            "trained a %d-token BPE tokenizer on %d training texts; cached as %s",
            tokenizer.vocab_size,
            len(texts),
            cache,
        )
        return tokenizer

    # ------------------------------------------------------------------ data sets
    def _dataset(self, split: str) -> Dataset | None:
        if split not in self.datasets and self.paths[split] is not None:
            self.datasets[split] = open_dataset(
                self.paths[split],
                format=self.format,
                modalities=self.modalities,
                processor=self._processor,
                max_duration=self.max_duration,
                max_bad_fraction=self.max_bad_fraction,
                shuffle=self.shuffle and split == "train",
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed,
            )
        return self.datasets.get(split)

    def setup(self, stage: str | None = None) -> None:
        """Open the data sets of ``stage`` (all given ones when None)."""
        for split in STAGES.get(stage, tuple(self.paths)):
            self._dataset(split)
        self.tokenizer  # noqa: B018  (load or train it now rather than inside the first batch)

    def _loader(self, split: str, train: bool = False) -> DataLoader | list:
        dataset = self._dataset(split)
        if dataset is None:
            if split in ("train", "predict"):
                raise ValueError(f"{split}: no {split} data was given (set data.{split} to a path)")
            return []  # Lightning skips the loop
        kwargs = dict(batch_size=self.batch_size, num_workers=self.num_workers, drop_last=train and self.drop_last)
        kwargs["collate_fn"] = Collator(self.tokenizer, self.text_max_length)
        if isinstance(dataset, IterableDataset):
            return _EpochLoader(dataset, **kwargs)
        if train and self.shuffle:
            # a plain RandomSampler with its own seeded generator: the order depends only on the seed, and
            # Lightning can restore its position when resuming
            return DataLoader(dataset, shuffle=True, generator=torch.Generator().manual_seed(self.seed), **kwargs)
        return DataLoader(dataset, shuffle=False, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
