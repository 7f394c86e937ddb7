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
Constructing the module reads nothing: data sets open, and the tokenizer is loaded or trained, on first use.

Training order and resuming (map-style data): epoch e is a permutation seeded by ``seed + e``, cut into global
batches of ``batch_size`` times the number of processes, rank r taking the r-th block of each
(:class:`GlobalBatchSampler`), so a global step sees the same samples with 1 or N processes. The training loader
(:class:`ResumableLoader`) saves its position within the epoch in every checkpoint, and ``fit --ckpt_path ...``
continues at the next batch: the same samples in the same order as an uninterrupted run, on one process or
several (each rank skips the same number of its own batches). WebDataset shards stream: each epoch reshuffles
with the trainer's epoch (so a resumed run gets that epoch's order), but a mid-epoch resume replays the epoch's
stream from its beginning. Training augmentation (``augment``, see :mod:`mmformer.data.augment`) draws each sample's
randomness from ``(seed, epoch, index)``, so it resumes exactly too; evaluation data is never augmented.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from mmformer.data.augment import AugmentConfig, augment_training
from mmformer.data.collate import Collator
from mmformer.data.formats import FORMATS, dataset_texts, open_dataset
from mmformer.data.loaders import EpochLoader, EvaluationSampler, GlobalBatchSampler, ResumableLoader, niced
from mmformer.data.packing import BatchedDataset, TokenBudgetSampler, sample_costs
from mmformer.data.text import pack_documents
from mmformer.values import is_int, is_number

if TYPE_CHECKING:
    from mmformer.config import AudioConfig
    from mmformer.preprocess.processor import Processor
    from mmformer.preprocess.tokenizer import Tokenizer

log = logging.getLogger(__name__)
STAGES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class MultimodalDataModule(L.LightningDataModule):
    """Training/evaluation data from manifests, COCO, WebDataset shards, LibriSpeech or ImageFolder.

    Args:
        train: path(s) of the training data; the format is detected from the path (see
            :func:`~mmformer.data.detect_format`) unless ``format`` is set.
        val: validation data.
        test: test data.
        predict: prediction data, whose texts are optional: when some rows have none, every row is read without
            its text (with a warning), rather than those rows skipped as bad samples.
        format: force one format for all paths: manifest, coco, webdataset, librispeech, imagefolder.
        modalities: media to load where the data has them (text is loaded whenever present).
        tokenizer: a tokenizer.json (or a folder holding one); None trains one on the training texts (or takes
            ``processor_from``'s).
        vocab_size: target vocabulary size when training a tokenizer.
        tokenizer_cache_dir: where trained tokenizers are cached (a folder that cannot be written is warned about
            and skipped: the run goes on uncached).
        batch_size: samples per batch (per process).
        num_workers: DataLoader worker processes.
        worker_nice: added to the loader workers' niceness (0-19, Unix's ``nice``). At 19 a worker runs in the
            moments the training step leaves a core idle, so the step's threads can take every core without the
            worker taking time slices from them (``make demo`` on 2 cores: 2 threads + a worker at 19).
        image_size: output image side (or [H, W]); None: the model's. ``mmformer fit`` sets ``image_size``,
            ``image_channels`` and ``sample_rate`` to the model's where a config leaves them out and refuses values
            that differ from it (see :func:`mmformer.cli.training.follow_model`); outside it None is 224.
        image_mean: per-channel normalisation mean (default: CLIP's).
        image_std: per-channel normalisation std (default: CLIP's).
        image_channels: 3 (RGB) or 1 (grayscale); None: the model's (outside ``mmformer fit``: 3).
        sample_rate: audio is resampled to this rate (Hz); None: the model's (outside ``mmformer fit``: 16000).
        max_audio_seconds: longer audio is truncated; None = no limit.
        max_duration: drop manifest rows whose ``duration`` exceeds this (seconds).
        text_max_length: truncate texts to this many tokens (default: the tokenizer's max_length).
        max_bad_fraction: the tolerated fraction of unreadable samples before an error.
        seed: seed of the training order (epoch e is shuffled with ``seed + e``; see :class:`GlobalBatchSampler`)
            and of loader workers.
        shuffle: shuffle the training data (each epoch differently).
        shuffle_buffer: shuffle buffer of WebDataset shards (samples per reader).
        drop_last: drop the last incomplete (global) training batch.
        dry_run: build without reading anything (to check a config whose data is elsewhere): ``vocab_size`` is
            the ``vocab_size`` target and no tokenizer is loaded or trained. Data loaders still need the data.
        cache: keep every decoded sample in memory after its first load (map-style data sets only): for small
            data sets such as data/digits, where decoding and resampling cost more than the training step.
        packing: training batches are packed, padding-free (texts back to back, ``text_lengths`` instead of an
            attention mask; the task packs audio tokens likewise; see :class:`mmformer.layers.Documents`).
        max_tokens: with ``packing``, a training batch holds as many samples as fit this many text tokens,
            rather than ``batch_size`` (map-style data; see :class:`~mmformer.data.packing.TokenBudgetSampler`).
        max_batch_seconds: with ``packing``, also at most this many seconds of audio per training batch (needs the
            manifest's ``duration`` column).
        augment: training augmentation (audio, images; see :mod:`mmformer.data.augment`), applied in the loader
            workers to the training split only. SpecAugment masks the log-mel of the model the trainer fits.
        processor_from: a pretrained model (anything :func:`mmformer.from_pretrained` reads) whose processor —
            tokenizer, image and audio preprocessing — is used instead of one built from the arguments above (no
            tokenizer is trained; an explicit ``tokenizer`` still wins). ``mmformer fit`` links it to
            ``model.init_from``: the task loads that model once and this module takes its processor from the task
            attached to the trainer (outside a trainer, hand it over with :meth:`use_processor`). Until then
            :attr:`vocab_size` is None: the task takes the size of the model's own tokenizer.
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
        worker_nice: int = 0,
        image_size: int | tuple[int, int] | None = None,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        image_channels: int | None = None,
        sample_rate: int | None = None,
        max_audio_seconds: float | None = 30.0,
        max_duration: float | None = None,
        text_max_length: int | None = None,
        max_bad_fraction: float = 0.1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = False,
        dry_run: bool = False,
        cache: bool = False,
        packing: bool = False,
        max_tokens: int | None = None,
        max_batch_seconds: float | None = None,
        augment: AugmentConfig | None = None,
        processor_from: str | None = None,
        text_documents: str = "file",
        pack_documents: bool = False,
    ):
        super().__init__()
        from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor

        if format is not None and format not in FORMATS:
            raise ValueError(f"format: expected one of {list(FORMATS)} or None; got {format!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int; got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers: expected an int >= 0; got {num_workers!r}")
        if not is_int(worker_nice) or not 0 <= worker_nice <= 19:
            raise ValueError(f"worker_nice: expected an int from 0 to 19; got {worker_nice!r}")
        for name, value in (("max_tokens", max_tokens), ("max_batch_seconds", max_batch_seconds)):
            if value is not None and (not is_number(value) or value <= 0):
                raise ValueError(f"{name}: expected a number > 0 or None; got {value!r}")
            if value is not None and not packing:
                raise ValueError(f"{name}: a token budget needs packing: true (got packing={packing!r})")
        if isinstance(augment, dict):
            augment = AugmentConfig(**augment)
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment: expected an AugmentConfig, a dict or None; got {type(augment).__name__}")
        self.augment = augment or AugmentConfig()
        # vocab_size is a target: the logged hyper-parameters (hparams_initial) leave it out, because Lightning refuses
        # to log a data module and a task whose common keys differ, and the task's is the trained tokenizer's size,
        # smaller for a small corpus; the saved ones (hparams, in checkpoints) keep it for load_from_checkpoint
        self.save_hyperparameters(ignore=["vocab_size"])
        self.hparams["vocab_size"] = vocab_size
        self.hparams["augment"] = self.augment.to_dict()  # plain types: checkpoints load with weights_only=True
        self.paths = {"train": train, "val": val, "test": test, "predict": predict}
        self.format, self.modalities = format, tuple(modalities)
        self.tokenizer_path = tokenizer
        self.target_vocab_size = vocab_size  # `vocab_size` (the property) is the tokenizer's actual size
        self.tokenizer_cache_dir = tokenizer_cache_dir
        self.batch_size, self.num_workers, self.drop_last = batch_size, num_workers, drop_last
        self.worker_nice = worker_nice
        self.max_duration, self.text_max_length, self.max_bad_fraction = max_duration, text_max_length, max_bad_fraction
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.dry_run = dry_run
        if text_documents not in ("file", "line"):
            raise ValueError(f"text_documents: expected 'file' or 'line'; got {text_documents!r}")
        self.text_documents, self.pack_documents = text_documents, pack_documents
        self._packed: dict[str, Dataset] = {}
        stats = {k: tuple(v) for k, v in (("mean", image_mean), ("std", image_std)) if v is not None}
        sizes = {k: v for k, v in (("image_size", image_size), ("channels", image_channels)) if v is not None}
        image = ImageProcessorConfig(**sizes, **stats)  # None: the processor's defaults (a model config's too)
        rate = {} if sample_rate is None else {"sample_rate": sample_rate}
        audio = AudioProcessorConfig(max_seconds=max_audio_seconds, **rate)
        self._processor = Processor(None, image, audio)  # the tokenizer is attached on first use (see .tokenizer)
        self.processor_from = processor_from
        self._adopted = processor_from is None
        self.datasets: dict[str, Dataset] = {}

    def _adopt_processor(self) -> None:
        """Replace the processor built from the arguments by ``processor_from``'s (once, on first use), taken from the
        task the trainer runs, which loaded that model (``model.init_from``): nothing is loaded twice."""
        if self._adopted:
            return
        task = self.trainer.lightning_module if self.trainer is not None else None
        if task is None or str(getattr(task, "init_from", None)) != str(self.processor_from):
            raise ValueError(
                f"processor_from: {self.processor_from!r}: its processor comes from the task that loads that model "
                "(model.init_from) under the trainer, and no such task is attached; outside a trainer call "
                "use_processor(model.processor) first"
            )
        self.use_processor(getattr(task.model, "processor", None))

    def use_processor(self, processor: Processor | None) -> None:
        """Use ``processor`` — the one ``processor_from``'s model came with — instead of the one built from the
        arguments (an explicit ``tokenizer`` still wins); None keeps the built one (with a warning)."""
        self._adopted = True
        if processor is None:
            rank_zero_warn(f"processor_from: {self.processor_from} holds no processor; building one from data.*")
            return
        log.info("using the processor saved with %s (tokenizer, image and audio preprocessing)", self.processor_from)
        processor = copy.copy(processor)  # the model keeps its own
        if self.tokenizer_path is not None:
            processor.tokenizer = self._processor.tokenizer  # the explicit one (loaded on first use)
        self._processor = processor

    # ------------------------------------------------------------------ tokenizer / processor
    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (``processor_from``'s, else loaded, or trained on the training texts, on first access)."""
        if self._processor.tokenizer is None and self.tokenizer_path is None:
            self._adopt_processor()
        if self._processor.tokenizer is None:
            self._processor.tokenizer = self._load_or_train_tokenizer()
        return self._processor.tokenizer

    @property
    def processor(self) -> Processor:
        """The :class:`~mmformer.Processor` (tokenizer + image/audio settings) to save next to the model."""
        self._adopt_processor()
        self.tokenizer  # noqa: B018  (attaches it)
        return self._processor

    @property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary size (may be below the ``vocab_size`` target for a small corpus); the target
        itself in a dry run; None while ``processor_from``'s own tokenizer is still to come (the task sizes the
        model by it)."""
        if self._processor.tokenizer is None:
            if self.processor_from is not None and (self.tokenizer_path is None or self.dry_run):
                return None
            if self.dry_run:
                return self.target_vocab_size
        return self.tokenizer.vocab_size

    def _load_or_train_tokenizer(self):
        from mmformer.preprocess.tokenizer import Tokenizer

        if self.tokenizer_path is not None:
            return Tokenizer.from_file(self.tokenizer_path)
        if self.processor_from is not None:
            raise ValueError(
                f"tokenizer: processor_from {self.processor_from!r} comes without a tokenizer, and one trained here "
                "would not match its token table; give data.tokenizer (the tokenizer.json of that model)"
            )
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
        try:
            tokenizer.save(cache)  # atomic: processes of a multi-GPU run may train and cache it at the same time
        except OSError as e:  # a cache only saves time: a read-only or full disk must not stop the run
            rank_zero_warn(
                f"tokenizer_cache_dir: cannot cache the trained tokenizer in {self.tokenizer_cache_dir} "
                f"({e.strerror or e}); going on without the cache (set data.tokenizer_cache_dir to a writable folder "
                "to reuse it in later runs)"
            )
            return tokenizer
        log.info(
            "trained a %d-token BPE tokenizer on %d training texts; cached as %s",
            tokenizer.vocab_size,
            len(texts),
            cache,
        )
        return tokenizer

    # ------------------------------------------------------------------ data sets
    def _dataset(self, split: str) -> Dataset | None:
        self._adopt_processor()  # the data sets preprocess with it
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
                text_documents=self.text_documents,
                text_optional=split == "predict",
            )
            if self.hparams.cache:  # keep decoded samples: small data sets whose decoding outweighs the step
                for part in getattr(self.datasets[split], "datasets", [self.datasets[split]]):
                    if hasattr(part, "cache_in_memory"):
                        part.cache_in_memory()
                        if self.num_workers > 0:
                            # decode every sample here, once: each epoch's new workers then start with the decoded
                            # samples (inherited, or pickled with the data set) instead of decoding them again
                            for i in range(len(part)):
                                part[i]
        return self.datasets.get(split)

    def setup(self, stage: str | None = None) -> None:
        """Open the data sets of ``stage`` (all given ones when None); a stage without its data (``mmformer test``
        without ``data.test``, which ran 0 batches and reported nothing) is a ValueError naming the key. Raised here,
        not in the loader hooks: Lightning patches DataLoader classes around those and an exception there leaves
        them patched for the rest of the process."""
        needed = STAGES[stage][0] if stage in STAGES else None  # the split a stage cannot run without
        if needed is not None and self.paths[needed] is None:
            raise ValueError(f"{needed}: no {needed} data was given (set data.{needed} to a path)")
        for split in STAGES.get(stage, tuple(self.paths)):
            self._dataset(split)
        self.tokenizer  # noqa: B018  (load or train it now rather than inside the first batch)

    def _blocks(self, split: str, dataset: Dataset) -> Dataset:
        """``dataset``'s texts packed into blocks of ``text_max_length`` tokens (made once per split)."""
        if split not in self._packed:
            block_size = self.text_max_length or self.tokenizer.max_length
            self._packed[split] = pack_documents(dataset, self.tokenizer, block_size)
        return self._packed[split]

    def _loader(self, split: str, train: bool = False) -> DataLoader | list:
        dataset = self._dataset(split)
        if dataset is None:
            if split in ("train", "predict"):
                raise ValueError(f"{split}: no {split} data was given (set data.{split} to a path)")
            return []  # Lightning skips the loop
        if self.pack_documents:
            dataset = self._blocks(split, dataset)
        packing = train and self.hparams.packing
        collator = Collator(self.tokenizer, self.text_max_length, packing=packing)
        kwargs = dict(num_workers=self.num_workers, collate_fn=collator, worker_init_fn=niced(self.worker_nice))
        if train:  # augmentation (when configured) happens in the workers, seeded per sample: see augment_training
            dataset, kwargs["collate_fn"] = augment_training(
                dataset, kwargs["collate_fn"], self.augment, self._processor, self.seed, self._feature_config
            )
        if packing and (self.hparams.max_tokens or self.hparams.max_batch_seconds):
            return self._budget_loader(dataset, kwargs)
        if isinstance(dataset, IterableDataset):
            drop_last = train and self.drop_last
            return EpochLoader(dataset, batch_size=self.batch_size, drop_last=drop_last, epoch=self._epoch, **kwargs)
        if train:
            # the order depends only on (seed, epoch) and the global batch size, and the position within an epoch
            # travels in checkpoints: see GlobalBatchSampler and ResumableLoader
            world, rank = self._world()
            sampler = GlobalBatchSampler(
                dataset, self.batch_size, world, rank, shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last
            )
            return ResumableLoader(dataset, sampler=sampler, **kwargs)
        # evaluation: in order; a generator of its own, so that creating the iterator leaves the global random
        # state (which training draws dropout from) untouched, and a resumed run sees the same stream
        generator = torch.Generator().manual_seed(self.seed)
        world, rank = self._world()
        if world > 1 and split in ("val", "test"):  # each sample once across the ranks (Lightning's sampler repeats)
            sampler = EvaluationSampler(dataset, self.batch_size, world, rank)
            return DataLoader(BatchedDataset(dataset), sampler=sampler, batch_size=None, generator=generator, **kwargs)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, generator=generator, **kwargs)

    def _budget_loader(self, dataset: Dataset, kwargs: dict[str, Any]) -> DataLoader:
        """The training loader of token-budget batches (``max_tokens`` / ``max_batch_seconds``)."""
        if isinstance(dataset, IterableDataset):
            raise ValueError("max_tokens/max_batch_seconds: token budgets need map-style data, not WebDataset shards")
        seconds = self.hparams.max_batch_seconds is not None and "audio" in self.modalities
        costs = sample_costs(dataset, self.tokenizer, text_max_length=self.text_max_length, seconds=seconds)
        budgets = [self.hparams.max_tokens] + ([self.hparams.max_batch_seconds] if seconds else [])
        world, rank = self._world()
        sampler = TokenBudgetSampler(
            dataset, costs, budgets, world, rank, shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last
        )
        return ResumableLoader(BatchedDataset(dataset), sampler=sampler, **kwargs)

    def _feature_config(self) -> AudioConfig:
        """The log-mel settings of the model the trainer fits (SpecAugment masks the features it would compute)."""
        module = None if self.trainer is None else self.trainer.lightning_module
        config = getattr(getattr(getattr(module, "model", None), "config", None), "audio", None)
        if config is None:
            raise ValueError(
                "augment.audio: SpecAugment (freq_masks/time_masks) masks the log-mel of the model being trained, "
                "so the data module must be attached to a Trainer fitting a model with an audio config; got "
                f"{'no trainer' if self.trainer is None else type(module).__name__ + ' without one'}"
            )
        return config

    def _epoch(self) -> int | None:
        """The trainer's current epoch (None without a trainer)."""
        return None if self.trainer is None else self.trainer.current_epoch

    def _world(self) -> tuple[int, int]:
        """(processes, this process's rank) of the attached trainer; (1, 0) without one."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
