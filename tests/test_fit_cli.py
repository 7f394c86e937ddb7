"""``mmformer fit`` / ``test`` on the tiny image–caption config, as a new user ran them: a small data set with a
logger, ``--trainer.max_steps 0``, a missing validation manifest, no test data, a contrastive-only run."""

from __future__ import annotations

import pytest
from cli_helpers import fit_in_process, run_cli, tiny_config, write_config, write_pairs
from lightning.pytorch import Callback

CSV = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "", "name": "logs"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def test_a_corpus_smaller_than_the_vocabulary_trains_with_a_logger(data, tmp_path):
    """The tokenizer of 10 captions stops below data.vocab_size (1000): the task's vocab_size (the tokenizer's) and the
    data module's (the target) differed, and Lightning refused to log them ("Error while merging hparams")."""
    logger = {**CSV, "init_args": {"save_dir": str(tmp_path), "name": "logs"}}
    settings = tiny_config(tmp_path, data, max_steps=2, trainer={"logger": logger}, data={"vocab_size": 1000})
    cli = fit_in_process(write_config(tmp_path / "c.yaml", settings))
    assert cli.trainer.global_step == 2 and cli.datamodule.vocab_size < 1000
    assert cli.datamodule.hparams.vocab_size == 1000  # the target, kept in checkpoints
    assert list((tmp_path / "logs").glob("version_0/hparams.yaml"))


def test_max_steps_0_builds_and_steps_nothing(data, tmp_path):
    """With the schedule's length taken from the trainer (0 steps), the schedule refused a length of 0."""
    settings = tiny_config(tmp_path, data, model={"schedule": {"max_steps": None}})
    cli = fit_in_process(write_config(tmp_path / "c.yaml", settings), "--trainer.max_steps", "0")
    assert cli.trainer.global_step == 0


def test_a_contrastive_only_run_generates_no_captions_in_validation(data, tmp_path):
    """Caption weight 0: validation greedy-decoded every batch and logged an untrained decoder's CER."""
    model = {"objectives": {"caption": 0.0}, "generation": {"evaluate": True}}
    settings = tiny_config(tmp_path, data, max_steps=3, model=model, trainer={"limit_val_batches": 1},
                           data={"val": str(data)})  # fmt: skip
    cli = fit_in_process(write_config(tmp_path / "c.yaml", settings))
    logged = set(cli.trainer.logged_metrics)
    assert any(k.startswith("val/") for k in logged), logged  # validation ran
    assert not any("caption" in k for k in logged), logged


def test_errors_met_once_the_run_started_are_one_line(data, tmp_path, capsys):
    """A missing validation manifest (read when fitting starts, after the configuration is checked) was a traceback;
    so was ``mmformer test`` without test data, which otherwise ran 0 batches and reported nothing."""
    from mmformer.cli.training import run_training_cli

    settings = tiny_config(tmp_path, data, max_steps=1, data={"val": str(tmp_path / "gone.jsonl")})
    with pytest.raises(SystemExit) as exit_:  # the command's entry point, in this process
        run_training_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", settings))])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and errors[0].startswith("mmformer fit: error: ") and "gone.jsonl" in errors[0], err
    cli = fit_in_process(write_config(tmp_path / "t.yaml", tiny_config(tmp_path, data, max_steps=1)), run=False)
    with pytest.raises(ValueError, match=r"test: no test data was given \(set data.test"):
        cli.trainer.test(cli.model, datamodule=cli.datamodule)


def test_predict_writes_a_line_and_the_embeddings_of_each_sample(data, tmp_path):
    """``mmformer predict`` computed embeddings and captions and wrote nothing."""
    import json

    from safetensors.torch import load_file

    settings = tiny_config(tmp_path, data, max_steps=1, data={"predict": str(data)})
    done = run_cli("predict", "--config", str(write_config(tmp_path / "c.yaml", settings)), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "run" / "predictions"  # the trainer's default_root_dir / predictions
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    captions = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(10)) and [r["text"] for r in rows] == captions
    features = load_file(out / "embeddings.safetensors")  # read here, written by the command's process
    assert features["image_features"].shape == features["text_features"].shape == (10, 16)


def test_a_run_bounded_by_max_steps_shows_its_epoch_without_minus_2(data, tmp_path):
    """Lightning's rich bar read "Epoch 0/-2" (max_epochs -1) in every ``fit`` of a config with max_steps."""
    from mmformer.cli.training import StepsProgressBar

    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, data, max_steps=1))
    cli = fit_in_process(config, "--trainer.enable_progress_bar", "true", run=False)
    (bar,) = [c for c in cli.trainer.callbacks if isinstance(c, StepsProgressBar)]
    bar._trainer = cli.trainer  # what Lightning's setup sets
    assert bar._get_train_description(0).strip() == "Epoch 0"
    cli = fit_in_process(config, "--trainer.enable_progress_bar", "true", "--trainer.max_epochs", "3", run=False)
    (bar,) = [c for c in cli.trainer.callbacks if isinstance(c, StepsProgressBar)]
    bar._trainer = cli.trainer
    assert bar._get_train_description(1).strip() == "Epoch 1/2"  # Lightning's own, with an epoch bound
    cli = fit_in_process(config, run=False)  # enable_progress_bar false (the tiny config): no bar added
    assert not [c for c in cli.trainer.callbacks if isinstance(c, StepsProgressBar)]


def test_a_checkpoint_that_cannot_be_written_is_one_error_line(data, tmp_path, capsys, monkeypatch):
    """A full disk at a checkpoint: 78 lines, two chained tracebacks ending in torch's "[enforce fail at
    inline_container.cc:672] . unexpected pos", the OS's "File too large" buried between them."""
    import errno

    import torch

    from mmformer.cli.training import run_training_cli

    def full_disk(*args, **kwargs):  # torch.save to a file object under `ulimit -f`
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 302912 vs 302800") from None

    monkeypatch.setattr(torch, "save", full_disk)
    settings = tiny_config(tmp_path, data, every=1, max_steps=2)
    with pytest.raises(SystemExit) as exit_:
        run_training_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", settings))])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "Traceback" not in err, err
    (error,) = [line for line in err.splitlines() if "error" in line.lower()]
    written = tmp_path / "ckpt" / "epoch=0-step=1.ckpt"  # the first checkpoint, at step 1
    assert error == f"mmformer fit: error: could not write {written}: File too large (EFBIG)"


class CtrlCAtStep1(Callback):
    """Ctrl-C in the middle of training, as the terminal delivers it: a KeyboardInterrupt at the first step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            raise KeyboardInterrupt


def test_ctrl_c_stops_fit_with_status_130_after_the_graceful_shutdown(data, tmp_path, capsys, caplog):
    """Lightning shut the run down gracefully and then exited with status 1, a failure's: a script could not tell an
    aborted run from a failed one. It exits with 130 (128 + SIGINT), as a shell reports a command Ctrl-C stopped."""
    import signal

    from mmformer.cli.training import run_training_cli

    interrupt = {"class_path": f"{__name__}.CtrlCAtStep1"}
    settings = tiny_config(tmp_path, data, max_steps=4)
    settings["trainer"]["callbacks"].append(interrupt)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as exit_:
            run_training_cli(["fit", "--config", str(write_config(tmp_path / "c.yaml", settings))])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert exit_.value.code == 130
    assert "Detected KeyboardInterrupt, attempting graceful shutdown" in caplog.text  # Lightning's, logged
    assert "Traceback" not in capsys.readouterr().err
