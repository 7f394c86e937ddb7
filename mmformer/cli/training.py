"""``mmformer fit | validate | test | predict``: a LightningCLI over :class:`~mmformer.tasks.MultimodalTask` and
:class:`~mmformer.data.MultimodalDataModule`.

The vocabulary size is set once: the data module's tokenizer links it into the task (``model.vocab_size``), which
sets the model config's. The data module's image size and channels and audio sample rate follow the model's image
and audio config where a configuration leaves them out, and must equal them where it gives them
(:func:`follow_model`); its ``text_max_length`` follows the model's position table and may not exceed it
(:func:`follow_text_length`). With ``model.adapt.init_from`` the data module takes its processor (tokenizer, image
and audio preprocessing) from that checkpoint (``data.processor_from`` is linked to it) rather than training a
tokenizer, and the task checks that the tokenizer fits the checkpoint's token table.

What the CLI adds to LightningCLI:

- a run bounded by ``max_steps`` shows "Epoch N" in Lightning's rich progress bar (:class:`StepsProgressBar`), not
  "Epoch N/-2";
- ``predict`` writes its predictions (:class:`~mmformer.tasks.predictions.PredictionWriter`: a JSON line and the
  embeddings of each sample, under ``trainer.default_root_dir``/predictions) unless the config has a writer;
- crash-safe checkpoints and exact resumes by default: :class:`~mmformer.io.checkpointing.AtomicCheckpointIO`
  (unless the config passes a CheckpointIO plugin of its own) and
  :class:`~mmformer.io.checkpointing.RandomStateCallback`; the data module's training loader saves its position
  (``fit --ckpt_path last`` resumes mid-epoch at the next batch);
- the task's flat keys of earlier releases (``model.caption_weight``, ``model.init_from``, ...; in a YAML file, on the
  command line, or in the hyper-parameters of a checkpoint resumed with ``--ckpt_path``) are still accepted and moved
  to their groups (:data:`mmformer.tasks.settings.RENAMED`) with a ``FutureWarning`` naming the new key, so that the
  run and the config it saves use the new keys;
- a run does not write into the checkpoint folders (``ModelCheckpoint.dirpath``) or log folder of a run still
  training: ``fit`` holds a lock on them (:func:`~mmformer.io.checkpointing.lock_folders`) and stops with a
  :class:`ConfigError` naming the folder and the process writing there;
- the optimizer and the learning-rate schedule are the task's (``model.optimizer``, any torch optimizer, with weight
  decay on matrices only; ``model.schedule``, warmup then cosine per optimizer step): LightningCLI's top-level
  ``--optimizer`` and ``--lr_scheduler``, which replaced the task's (or were ignored), are refused with a
  :class:`ConfigError` naming them (:data:`LIGHTNING_OPTIMIZERS`). ``model.optimizer`` is saved as its plain
  ``class_path``/``init_args`` in the checkpoint's hyper-parameters: ``load_from_checkpoint`` and a resume rebuild it;
- ``validate|test|predict --ckpt_path best`` in a process that did not run ``fit`` takes the best checkpoint recorded
  in the ModelCheckpoint folder (:func:`best_checkpoint`);
- metric names carry their stage (``val/loss``, ``val/speech_wer``): in a ModelCheckpoint ``filename`` the ``/`` makes
  a subfolder (``{epoch}-{val/loss:.3f}`` writes ``epoch=3-val/loss=0.512.ckpt``); write
  ``filename: "epoch{epoch}-val_loss{val/loss:.3f}"`` with ``auto_insert_metric_name: false``;
- configuration errors stop the run before any data is read: an unknown key or a value of the wrong type
  (jsonargparse), and a model configuration that cannot be built (``ModelConfig`` and its parts validate
  themselves; they are checked before the data module trains a tokenizer for the vocabulary link). From the
  command line they print one ``mmformer: error: ...`` naming the key and exit with status 2; in Python
  :func:`build_cli` raises :class:`ConfigError`. ``MMFORMER_DEBUG=1`` shows the traceback instead. Errors the run
  meets once started that name their cause (a missing validation manifest or ``--ckpt_path``, too many unreadable
  samples, a checkpoint that cannot be written: the disk is full) print one ``mmformer fit: error: ...`` and exit
  with status 1;
- under ``-W error`` (``PYTHONWARNINGS=error``) a run stops at a warning with one ``mmformer fit: error: ...`` line
  naming it, except for the libraries' deprecations inside LightningCLI's and the Trainer's own calls, which are no
  user's to fix and are silenced there alone (:data:`LIBRARY_DEPRECATIONS`);
- Ctrl-C stops a run as Lightning does (its graceful shutdown), with exit status 130 rather than Lightning's 1
  (:func:`interrupted_exits_130`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import pickle
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_type_hints

import torch
from jsonargparse import ArgumentError, Namespace
from jsonargparse._deprecated import JsonargparseDeprecationWarning
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mmformer.cli.main import warning_as_error
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.data import MultimodalDataModule
from mmformer.data.skipping import TooManyBadSamplesError
from mmformer.io.checkpointing import (
    AtomicCheckpointIO,
    FolderInUseError,
    RandomStateCallback,
    lock_folders,
    release_folders,
)
from mmformer.tasks import MultimodalTask, adamw
from mmformer.tasks import settings as task_settings
from mmformer.tasks.parallel import FSDP2Strategy, strategy_from_name
from mmformer.tasks.predictions import PredictionWriter

MODEL_KEY = "model.model"  # where the ModelConfig sits in the CLI's configuration
INIT_FROM = "model.adapt.init_from"  # the pretrained model a run starts from (its processor goes to the data module)


# LightningCLI's top-level optimizer and scheduler keys (its auto_configure_optimizers), which replaced the task's
# configure_optimizers (no weight-decay groups, the schedule stepped per epoch) or were ignored; the parser takes them
# (hidden) only to refuse them with the keys to use
LIGHTNING_OPTIMIZERS = {
    "optimizer": "the task builds its optimizer (weight decay on matrices only): give it as model.optimizer "
    "(--model.optimizer Adam --model.optimizer.lr 3e-4; in YAML model: {optimizer: {class_path: ..., init_args: ...}})",
    "lr_scheduler": "the task's learning rate follows model.schedule, linear warmup then cosine decay per optimizer "
    "step (model.schedule.warmup_steps, max_steps, min_lr_ratio); another scheduler needs a MultimodalTask subclass "
    "whose configure_optimizers returns it",
}


# Deprecations that libraries raise inside the calls LightningCLI and the Trainer make, none of them a user's to fix:
# (category, message regex). Under `-W error` (PYTHONWARNINGS=error, common in CI) each stopped every `fit` with a
# traceback. Silenced around the CLI's run alone (MMFormerCLI.__init__); every other warning, mmformer's own included,
# still reaches the user, and under `-W error` stops the run with one line (run_training_cli).
LIBRARY_DEPRECATIONS = (
    (JsonargparseDeprecationWarning, ""),  # jsonargparse's add_instantiator and instantiate_classes, LightningCLI's
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch's LeafSpec, Lightning's _pytree
)


class ConfigError(ValueError):
    """The configuration cannot run: an unknown key, a value of the wrong type, an impossible model, an argument
    a class refuses or a data path that does not exist. The message names the key or argument."""


def _plain(value: Any) -> Any:
    """A parsed jsonargparse value as plain dicts/lists (``class_path``/``init_args`` wrappers unwrapped)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        if set(value) <= {"class_path", "init_args"} and "class_path" in value:
            return _plain(value.get("init_args") or {})
        return {k: _plain(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def check_model_config(config: Any, key: str = MODEL_KEY) -> ModelConfig:
    """Build the :class:`~mmformer.ModelConfig` of a parsed configuration, raising :class:`ConfigError` with the
    offending key (``model.model.stacks.NAME``, ``model.model.image``, ...) if it is impossible.

    ``text.vocab_size`` may be absent (the data module's tokenizer sets it later); the default is used to check.
    """
    d = _plain(config)
    if not isinstance(d, dict):
        raise ConfigError(f"{key}: expected a mapping of ModelConfig fields; got {type(d).__name__}")
    parts = {"image": ImageConfig, "audio": AudioConfig, "text": TextConfig}
    try:
        for name, stack in (d.get("stacks") or {}).items():
            where = f"{key}.stacks.{name}"
            if isinstance(stack, dict):
                StackConfig(**stack)
        for name, cls in parts.items():
            where = f"{key}.{name}"
            if isinstance(d.get(name), dict):
                cls(**d[name])
        where = key
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _pair(size: Any) -> tuple[int, int]:
    """An image size as (H, W): an int means square."""
    return (size, size) if isinstance(size, int) else tuple(size)


# data module options that describe the model's input, with the model config field each must equal:
# (data key, model part, field, how to compare)
MODEL_INPUT = (
    ("image_size", "image", "image_size", _pair),
    ("image_channels", "image", "channels", int),
    ("sample_rate", "audio", "sample_rate", int),
)


def follow_model(data: Namespace, config: ModelConfig) -> None:
    """Set the data module's image size, image channels and audio sample rate to the model's (``data.image_size``
    from ``model.model.image.image_size``, ...) where the configuration leaves them out, and raise
    :class:`ConfigError` naming both keys and values where it gives one that differs: the processor saved with the
    model must prepare inputs as the model was built for (8 kHz audio fed to a 16 kHz model trained silently, its mel
    filters reading every frequency at twice its height, and exported a preprocessor_config.json beside a
    config.json that disagreed). A model without an image or audio part leaves those options alone."""
    for key, part, field, same in MODEL_INPUT:
        section = getattr(config, part)
        if section is None:
            continue
        wanted, given = getattr(section, field), data.get(key)
        if given is None:
            data[key] = tuple(wanted) if isinstance(wanted, list) else wanted
        elif same(given) != same(wanted):
            raise ConfigError(
                f"data.{key}: {given!r} differs from the model's {MODEL_KEY}.{part}.{field}: {wanted!r}; leave "
                f"data.{key} out (it follows the model) or set both to the same value"
            )


def follow_text_length(data: Namespace, config: ModelConfig) -> None:
    """Cut the training texts to the model's position table: ``data.text_max_length`` follows
    ``model.model.text.max_length`` where the configuration leaves it out (the tokenizer's own limit, 77, let a long
    caption through, and the model stopped training at it), and a longer one is a :class:`ConfigError` naming both:
    the task cut every text to the table anyway, silently. A shorter one is a choice (shorter training texts, or
    language-model blocks shorter than the context) and stays. A model without a position table
    (``text.position: none``) takes any length."""
    text = config.text
    if text is None or text.position == "none":
        return
    given = data.get("text_max_length")
    if given is None:
        data["text_max_length"] = text.max_length
    elif given > text.max_length:
        raise ConfigError(
            f"data.text_max_length: {given!r} is longer than the model's position table, {MODEL_KEY}.text.max_length: "
            f"{text.max_length!r}; leave data.text_max_length out (it follows the model), set it to at most "
            f"{text.max_length}, or give the model a longer table"
        )


def check_vocab_size(data: Namespace, config: ModelConfig, init_from: str | None = None) -> None:
    """Refuse a ``model.model.text.vocab_size`` set in the configuration (not the default) that differs from
    ``data.vocab_size``, the size of the tokenizer the data module trains: the vocabulary size is set once, by the
    tokenizer (linked into the model), and the model's was replaced silently (400 given, 300 in config.json). With
    a tokenizer file or a pretrained processor the data's size is not known yet: the task warns there
    (:func:`mmformer.tasks.adapt.initial_model`)."""
    given, target = config.text.vocab_size if config.text is not None else None, data.get("vocab_size")
    trains_tokenizer = not (data.get("tokenizer") or data.get("processor_from") or init_from)
    if trains_tokenizer and given not in (None, TextConfig.vocab_size, target):
        raise ConfigError(
            f"{MODEL_KEY}.text.vocab_size: {given!r} differs from data.vocab_size: {target!r}, the size of the "
            f"tokenizer the data module trains (the model takes the tokenizer's); leave {MODEL_KEY}.text.vocab_size "
            "out, or set data.vocab_size instead"
        )


class MMFormerCLI(LightningCLI):
    """LightningCLI with mmformer's vocabulary link, early config checks, atomic checkpoints and exact resumes."""

    def __init__(self, *args: Any, **kwargs: Any):
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("exit_on_error", False)  # errors reach parse_arguments as exceptions
        parser_kwargs.setdefault("prog", "mmformer")
        kwargs.setdefault("parser_class", _Parser)
        kwargs.setdefault("auto_configure_optimizers", False)  # the task's own: see LIGHTNING_OPTIMIZERS
        for sub in self.subcommands():
            parser_kwargs[sub] = {"exit_on_error": False, **parser_kwargs.get(sub, {})}
        with warnings.catch_warnings():  # the run too (run=True): see LIBRARY_DEPRECATIONS
            for category, message in LIBRARY_DEPRECATIONS:
                warnings.filterwarnings("ignore", message=message, category=category)
            super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments(INIT_FROM, "data.processor_from", apply_on="parse")
        for old, (group, name) in task_settings.RENAMED.items():  # accepted; _Parser moves them as soon as read
            kind = get_type_hints(task_settings.GROUPS[group])[name]
            parser.add_argument(f"--model.{old}", type=kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        for key in LIGHTNING_OPTIMIZERS:  # hidden; refused with the key to use (before_instantiate_classes)
            parser.add_argument(f"--{key}", type=str | dict[str, Any] | None, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)  # fmt: skip

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            raise ConfigError(_named_key(str(e).strip())) from e

    def _section(self) -> Namespace:
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def before_instantiate_classes(self) -> None:
        section = self._section()
        for key, fix in LIGHTNING_OPTIMIZERS.items():
            if section.get(key) is not None:
                raise ConfigError(f"{key}: {fix}")
        # The vocabulary link makes jsonargparse build the data module (and train its tokenizer, reading the
        # training texts) before the model: check the model configuration first, so an impossible one fails fast.
        model = section.get("model")
        if isinstance(model, Namespace) and model.get("model") is not None:
            config = check_model_config(model["model"])
            data = section.get("data")
            if isinstance(data, Namespace):
                follow_model(data, config)
                follow_text_length(data, config)
                check_vocab_size(data, config, init_from=model.get("adapt.init_from"))
        elif isinstance(model, Namespace) and not model.get("adapt.init_from"):
            raise ConfigError(f"{MODEL_KEY}: expected a model configuration, or {INIT_FROM}: a model to start from")

    def instantiate_classes(self) -> None:
        # Errors of the classes' own argument checks (they name the argument), of a data path that does not exist,
        # or of Lightning's trainer options: the configuration cannot run, so report it as such.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, MisconfigurationException) as e:
            raise ConfigError(_named_key(str(e))) from e  # a class's own check under an optional section: one line
        model = self._section().get("model")
        record = optimizer_record(model.get("optimizer") if isinstance(model, Namespace) else None)
        if record is not None:  # the task received a callable: its plain config goes into checkpoints and hparams.yaml
            self.model.save_hyperparameters({"optimizer": record})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={}) or {}
        plugins = _as_list(kwargs.get("plugins", config.get("plugins")))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = _as_list(kwargs.get("callbacks", config.get("callbacks")))
        if not any(isinstance(c, RandomStateCallback) for c in callbacks):
            callbacks.append(RandomStateCallback())
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            callbacks.append(PredictionWriter())  # Lightning's predict writes nothing of itself
        shown = kwargs.get("enable_progress_bar", config.get("enable_progress_bar")) is not False
        if shown and _RICH_AVAILABLE and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepsProgressBar())  # Lightning's default, without "Epoch 0/-2"
        extra = {"callbacks": callbacks}
        strategy = strategy_from_name(kwargs.get("strategy", config.get("strategy")))
        if isinstance(strategy, FSDP2Strategy):
            extra["strategy"] = strategy  # it writes each rank's shards itself: no CheckpointIO plugin
        else:
            extra["plugins"] = plugins
        return super().instantiate_trainer(**{**kwargs, **extra})

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit`` holding the run's folders (on the first process: Lightning's other ranks write nothing
        there of their own), so that a second run started on them stops instead of overwriting this one's files."""
        folders = [c.dirpath for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        if self.trainer.log_dir:
            folders.append(self.trainer.log_dir)
        try:
            held = lock_folders(folders, "checkpoint/log folder") if rank_zero_only.rank == 0 else []
        except FolderInUseError as e:
            raise ConfigError(str(e)) from e
        try:
            with interrupted_exits_130(self.trainer):
                self.trainer.fit(**kwargs)
        finally:
            release_folders(held)

    def validate(self, **kwargs: Any) -> None:
        with interrupted_exits_130(self.trainer):
            self.trainer.validate(**with_best_checkpoint(self.trainer, kwargs))

    def test(self, **kwargs: Any) -> None:
        with interrupted_exits_130(self.trainer):
            self.trainer.test(**with_best_checkpoint(self.trainer, kwargs))

    def predict(self, **kwargs: Any) -> None:
        with interrupted_exits_130(self.trainer):
            self.trainer.predict(**with_best_checkpoint(self.trainer, kwargs))


INTERRUPTED_STATUS = 130  # 128 + SIGINT: what a shell reports for a command Ctrl-C stopped


@contextlib.contextmanager
def interrupted_exits_130(trainer: Trainer) -> Iterator[None]:
    """Exit with status 130 where Lightning ends a run Ctrl-C interrupted. Lightning catches the KeyboardInterrupt,
    shuts down gracefully ("Detected KeyboardInterrupt, attempting graceful shutdown ...": callbacks' and loggers'
    ``on_exception``, teardown) and then calls ``sys.exit(1)``, the status of a failure, so that a script could not
    tell "aborted" from "failed"."""
    try:
        yield
    except SystemExit as e:
        if e.code == 1 and trainer.interrupted and isinstance(e.__context__, KeyboardInterrupt):
            raise SystemExit(INTERRUPTED_STATUS) from None
        raise


class StepsProgressBar(RichProgressBar):
    """Lightning's default progress bar (rich), whose epoch read "Epoch 0/-2" in a run bounded by ``max_steps`` (its
    ``max_epochs`` is -1): there, the epoch alone."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # as Lightning pads it: no flicker


def _move_renamed(section: Namespace) -> None:
    """Move the task's flat keys of earlier releases (``model.caption_weight``) to their groups
    (``model.objectives.caption``), with the warning :func:`mmformer.tasks.settings.moved` gives."""
    model = section.get("model")
    if not isinstance(model, Namespace):
        return
    old = {key: model.pop(key) for key in list(task_settings.RENAMED) if key in model}
    for group, values in task_settings.moved(old, where="model", stacklevel=5).items():
        for name, value in values.items():
            model[f"{group}.{name}"] = value


class _Parser(LightningArgumentParser):
    """LightningCLI's parser, moving the task's renamed keys as soon as the sources of a configuration (files, flags,
    a resumed checkpoint's hyper-parameters) are merged, before jsonargparse applies the links (``init_from`` →
    ``data.processor_from``), prints ``--print_config`` or checks the values: everything after sees the new keys.
    ``_parse_common`` is the step of jsonargparse where that happens (tests/test_task_settings.py checks the link and
    ``--print_config`` with an old key, so a jsonargparse that renames it fails there)."""

    def _parse_common(self, cfg: Namespace, *args: Any, **kwargs: Any) -> Namespace:
        subcommand = cfg.get("subcommand")
        _move_renamed(cfg[subcommand] if subcommand and isinstance(cfg.get(subcommand), Namespace) else cfg)
        return super()._parse_common(cfg, *args, **kwargs)


_UNION_NOISE = ("Does not validate", "Subtypes:", "Errors:", "Problem with given class_path", "Given value",
                "Expected a <class 'NoneType'>")  # fmt: skip


def _named_key(message: str) -> str:
    """jsonargparse reports a bad value inside an optional section (``model.model`` is ``ModelConfig | None``) as
    nested "Parser key" blocks under a union, listing every subtype; say it in one line instead: the full dotted key
    and the innermost reason."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    keys = []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ")
        found = re.fullmatch(r'Parser key "([^"]+)":', text)
        if found:
            keys.append(found.group(1))
        elif text and not text.startswith(_UNION_NOISE):
            return f"{'.'.join(_with_mapping_names(keys, message, text))}: {text}" if keys else text
    return message


def _with_mapping_names(keys: list[str], message: str, reason: str) -> list[str]:
    """The parser keys of a bad value with the names of the mappings it sits in: jsonargparse's blocks skip a
    ``dict[str, Config]`` field's own keys (``stacks`` → ``width``, not ``stacks.shared.width``). They are read from
    the report's "Given value": the command line's dotted key, or the section's value (a literal) searched for the
    one entry with that field (the one holding the reported value when several have it)."""
    nested = re.search(r"Given value: NestedArg\(key='([^']+)'", message)
    if nested:
        return [keys[0], *nested.group(1).split(".")]
    given = re.search(r"^\s*Given value: (\{.*\})\s*$", message, re.MULTILINE)
    try:
        value = ast.literal_eval(given.group(1)) if given else None
    except (ValueError, SyntaxError):
        return keys
    got = re.search(r"Got value: (.*)$", reason)
    path = keys[:1]
    for key in keys[1:]:
        if isinstance(value, dict) and key not in value:
            names = [n for n, v in value.items() if isinstance(v, dict) and key in v]
            if len(names) > 1 and got:
                names = [n for n in names if str(value[n][key]) == got.group(1).strip()]
            if len(names) != 1:
                return keys
            path.append(names[0])
            value = value[names[0]]
        path.append(key)
        value = value.get(key) if isinstance(value, dict) else None
    return path


def optimizer_record(value: Any) -> dict[str, Any] | str | None:
    """``model.optimizer`` as parsed, in plain types for the task's hyper-parameters: a class's ``{class_path,
    init_args}``, or a module-level function's import path (the task rebuilds either); None for the task's default
    (rebuilt without a record) and anything else."""
    if isinstance(value, Namespace) and "class_path" in value:
        return value.as_dict()
    name = getattr(value, "__qualname__", "")  # a function's; a lambda's or a local one's holds "<"
    return f"{value.__module__}.{name}" if name and "<" not in name and value is not adamw else None


def with_best_checkpoint(trainer: Trainer, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``ckpt_path="best"`` made the path of the best checkpoint where the trainer's ModelCheckpoint
    has none: Lightning's ``best`` is the path its ``fit`` set on the callback, so a new process stopped with
    "ModelCheckpoint is not configured to save the best model"."""
    callback = trainer.checkpoint_callback
    if kwargs.get("ckpt_path") != "best" or not isinstance(callback, ModelCheckpoint) or callback.best_model_path:
        return kwargs
    return {**kwargs, "ckpt_path": best_checkpoint(callback)}


def best_checkpoint(callback: ModelCheckpoint) -> str:
    """The best checkpoint recorded by ``callback``'s run: the ``best_model_path`` in the callback's state of the
    newest checkpoint in its folder (or below: a ``/`` in a filename makes subfolders) holding it: ``last.ckpt``, or
    the best one itself. Raises ValueError naming the folder when there is none."""
    folder = Path(callback.dirpath) if callback.dirpath else None
    if folder is None or not folder.is_dir():
        raise ValueError(
            f"ckpt_path: `best` outside the process that ran fit is read from the ModelCheckpoint's folder "
            f"(dirpath), and {'none is set' if folder is None else f'{folder} does not exist'}; set the dirpath "
            "the fit used, or give a checkpoint's path"
        )
    files = sorted((p for p in folder.rglob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        best = Path(_callback_state(path, callback.state_key).get("best_model_path") or folder)
        for candidate in (best, folder / best.name):  # the folder may have moved since
            if candidate.is_file():
                return str(candidate)
    raise ValueError(
        f"ckpt_path: `best` outside the process that ran fit is read from the ModelCheckpoint's state in its "
        f"checkpoints, and none in {folder} records a best checkpoint for ModelCheckpoint(monitor="
        f"{callback.monitor!r}); give the path of one of: {', '.join(p.name for p in files) or 'none'}"
    )


def _callback_state(path: Path, key: str) -> dict[str, Any]:
    """The state a checkpoint holds for the callback of state key ``key`` (memory-mapped: the weights are not read);
    empty for a file that is not a checkpoint or has none."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, pickle.UnpicklingError):
        return {}
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    state = callbacks.get(key) if isinstance(callbacks, dict) else None
    return state if isinstance(state, dict) else {}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_cli(args: Sequence[str] | None = None, *, run: bool = True, dry_run: bool = False) -> MMFormerCLI:
    """Parse ``args`` (default: the command line) and build the task, data module and trainer; ``run=False`` stops
    there (and then ``args`` has no subcommand). ``dry_run=True`` reads no data (``--data.dry_run true``: the
    vocabulary size is the configured target), to check a recipe whose data is elsewhere. Raises
    :class:`ConfigError` for a configuration that cannot run."""
    if dry_run:
        args = [*(sys.argv[1:] if args is None else args), "--data.dry_run", "true"]
    return MMFormerCLI(
        MultimodalTask,
        MultimodalDataModule,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def run_training_cli(argv: Sequence[str]) -> None:
    """The ``mmformer fit|validate|test|predict`` entry point: configuration errors print one line and exit 2."""
    argv = list(argv)
    try:
        # args=None when they are the command line (LightningCLI warns when given both)
        build_cli(None if argv == sys.argv[1:] else argv)
    except ConfigError as e:
        if os.environ.get("MMFORMER_DEBUG"):
            raise
        command = argv[0] if argv else "fit"
        print(f"mmformer: error: {e}", file=sys.stderr)
        print(f"(`mmformer {command} --help` lists the options; MMFORMER_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, OSError, TooManyBadSamplesError, Warning) as e:
        # what the run met once started, each naming its cause: a validation manifest that is missing or empty, a
        # --ckpt_path that does not exist, too many unreadable samples, `predict` without data.predict, a checkpoint
        # that cannot be written (AtomicCheckpointIO's WriteError: a full disk), stdout that cannot be written
        # (mmformer.cli.main.StdoutError), a warning the user's filter makes an error (-W error)
        if os.environ.get("MMFORMER_DEBUG"):
            raise
        command = argv[0] if argv else "fit"
        print(f"mmformer {command}: error: {warning_as_error(e) if isinstance(e, Warning) else e}", file=sys.stderr)
        print("(MMFORMER_DEBUG=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
