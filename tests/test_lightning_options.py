"""Lightning's own options around ``mmformer fit``, as a Lightning user tries them: the top-level ``--optimizer`` and
``--lr_scheduler``, an optimizer config that a checkpoint must bring back, evaluation under several processes
(the sampler, with explicit ranks), and ``--ckpt_path best`` in a new process."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import checkpoint, fit_in_process, tiny_config, write_config, write_pairs

from mmformer.cli.training import ConfigError, build_cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def run_cli(*args: str):
    """``mmformer ARGS`` in this process (sys.argv without pytest's, which LightningCLI would warn about)."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return build_cli(list(args))
    finally:
        sys.argv = argv


# ---------------------------------------------------------------------- --optimizer / --lr_scheduler
@pytest.mark.parametrize(
    "args",
    [
        ["--optimizer", "Adam"],  # replaced the task's configure_optimizers: no decay groups, no warmup/cosine
        ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"],
        ["--lr_scheduler", "CosineAnnealingLR", "--lr_scheduler.T_max", "6"],  # ignored, yet recorded in config.yaml
    ],
)
def test_lightnings_top_level_optimizer_and_scheduler_are_refused_naming_the_tasks_keys(data, tmp_path, args):
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data, max_steps=1))
    key, fix = args[0][2:], {"--optimizer": "model.optimizer", "--lr_scheduler": "model.schedule"}[args[0]]
    with pytest.raises(ConfigError, match=rf"^{key}: .*{fix}"):
        fit_in_process(config, *args, run=False)


def test_a_top_level_optimizer_in_yaml_is_refused_and_a_null_one_accepted(data, tmp_path):
    """A config.yaml saved by an earlier release holds ``optimizer: null`` and ``lr_scheduler: null``: still read."""
    settings = tiny_config(tmp_path, data, max_steps=1)
    config = write_config(tmp_path / "c.yaml", {**settings, "optimizer": {"class_path": "torch.optim.Adam"}})
    with pytest.raises(ConfigError, match=r"^optimizer: .*model\.optimizer"):
        fit_in_process(config, run=False)
    config = write_config(tmp_path / "old.yaml", {**settings, "optimizer": None, "lr_scheduler": None})
    assert fit_in_process(config, run=False).model is not None


def test_help_lists_the_tasks_optimizer_and_not_lightnings(capsys):
    with pytest.raises(SystemExit) as done:
        run_cli("fit", "--help")
    shown = capsys.readouterr().out
    assert done.value.code == 0 and "--model.optimizer" in shown and "--model.schedule" in shown
    assert "--optimizer" not in shown and "--lr_scheduler" not in shown


# ---------------------------------------------------------------------- the optimizer in the checkpoint
def test_the_configured_optimizer_is_saved_and_a_checkpoint_rebuilds_it(data, tmp_path):
    """The CLI hands the task a callable, which was not saved: load_from_checkpoint built AdamW, a resume of an SGD
    run loaded SGD's state into it (KeyError 'step'), and hparams.yaml had no learning rate."""
    from mmformer.tasks import MultimodalTask

    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data, max_steps=2))
    sgd = ["--model.optimizer", "torch.optim.SGD", "--model.optimizer.lr", "0.1", "--model.optimizer.momentum", "0.9"]
    cli = fit_in_process(config, *sgd)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = checkpoint(last)["hyper_parameters"]["optimizer"]  # plain types: loaded with weights_only=True
    assert saved["class_path"] == "torch.optim.SGD" and saved["init_args"]["lr"] == 0.1
    assert cli.model.hparams_initial["optimizer"] == saved  # what the loggers write into hparams.yaml
    optimizer = MultimodalTask.load_from_checkpoint(last).configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.SGD and optimizer.param_groups[0]["momentum"] == 0.9
    resumed = fit_in_process(config, "--ckpt_path", str(last), "--trainer.max_steps", "3")  # no --model.optimizer
    assert resumed.trainer.global_step == 3 and type(resumed.trainer.optimizers[0]) is torch.optim.SGD


# ---------------------------------------------------------------------- evaluation on several processes
@pytest.mark.parametrize(("n", "batch_size", "world"), [(23, 16, 2), (23, 4, 2), (33, 16, 2), (17, 4, 2), (10, 1, 4)])
def test_evaluation_batches_hold_each_sample_once_and_as_many_batches_per_rank(n, batch_size, world):
    """Lightning's DistributedSampler pads with repeats (23 samples on 2 ranks scored 24); the ranks must still run
    the same number of steps (the contrastive loss gathers from every rank at each)."""
    from mmformer.data.loaders import EvaluationSampler

    ranks = [EvaluationSampler(range(n), batch_size, world, rank).batches() for rank in range(world)]
    assert sorted(i for batches in ranks for batch in batches for i in batch) == list(range(n))
    assert len({len(batches) for batches in ranks}) == 1
    sizes = [len(batch) for batches in ranks for batch in batches]
    assert min(sizes) >= 1 and max(sizes) <= max(batch_size, 2)


def test_fewer_evaluation_samples_than_ranks_repeat_one_with_a_warning():
    from mmformer.data.loaders import EvaluationSampler

    with pytest.warns(UserWarning, match="3 samples on 4 processes"):
        ranks = [EvaluationSampler(range(3), 8, 4, rank).batches() for rank in range(4)]
    assert ranks == [[[0]], [[1]], [[2]], [[0]]]


def test_the_data_modules_validation_loaders_split_the_samples_over_the_ranks(tmp_path):
    from mmformer.data import MultimodalDataModule

    val = write_pairs(tmp_path, n=23)
    sources = []
    for rank in (0, 1):
        dm = MultimodalDataModule(train=str(val), val=str(val), modalities=("image",), vocab_size=280,
                                  tokenizer_cache_dir=str(tmp_path / "tok"), batch_size=4, image_size=16,
                                  image_channels=1, image_mean=[0.5], image_std=[0.5])  # fmt: skip
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what the data module reads of the trainer
        dm.setup("validate")
        sources.append([s for batch in dm.val_dataloader() for s in batch["source"]])
    both = sources[0] + sources[1]
    assert len(both) == len(set(both)) == 23  # each sample once (Lightning's sampler: 24, one twice)


# ---------------------------------------------------------------------- --ckpt_path best in a new process
def test_ckpt_path_best_is_read_from_the_checkpoint_folder_outside_the_fit(data, tmp_path):
    """``mmformer test --ckpt_path best`` after the fit, in a new process: "ModelCheckpoint is not configured to save
    the best model" (Lightning's best is what its fit set on the callback). A new CLI has a new callback, as a new
    process would."""
    monitored = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "best"), "monitor": "val/loss", "save_top_k": 1,
                               "save_last": True, "filename": "epoch{epoch}-loss{val/loss:.4f}",
                               "auto_insert_metric_name": False}}  # fmt: skip
    trainer = {"callbacks": [monitored], "limit_val_batches": 1, "check_val_every_n_epoch": 1}
    settings = tiny_config(tmp_path, data, max_steps=6, trainer=trainer, data={"val": str(data), "test": str(data)})
    config = write_config(tmp_path / "c.yaml", settings)
    fitted = fit_in_process(config)
    best = fitted.trainer.checkpoint_callback.best_model_path
    assert best and best != str(tmp_path / "best" / "last.ckpt")
    cli = run_cli("test", "--config", str(config), "--ckpt_path", "best")
    assert cli.trainer.ckpt_path == best
    (tmp_path / "best" / "last.ckpt").unlink()  # the best one records itself too
    assert run_cli("validate", "--config", str(config), "--ckpt_path", "best").trainer.ckpt_path == best


def test_ckpt_path_best_without_a_record_names_the_folder(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmformer.cli.training import with_best_checkpoint

    callback = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss")
    torch.save({"callbacks": {"another callback": {"best_model_path": "x.ckpt"}}}, tmp_path / "other.ckpt")
    (tmp_path / "notes.ckpt").write_text(json.dumps({"not": "a checkpoint"}))
    trainer = SimpleNamespace(checkpoint_callback=callback)
    with pytest.raises(ValueError, match=rf"none in {tmp_path} records .* other.ckpt"):
        with_best_checkpoint(trainer, {"ckpt_path": "best"})
    assert with_best_checkpoint(trainer, {"ckpt_path": "last"}) == {"ckpt_path": "last"}
