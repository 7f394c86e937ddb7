"""Interrupted ``mmformer fit`` runs resume exactly: stopped mid-epoch, or killed with SIGKILL mid-training or in the
middle of writing a checkpoint, ``fit --ckpt_path last`` ends with the weights of an uninterrupted run (1e-6,
float32, CPU), and ``last.ckpt`` is always a complete checkpoint.

The run: 10 image–caption pairs in batches of 4 (3 batches an epoch, the last one of 2), 8 steps, a checkpoint every
2 steps; step 4 is batch 1 of epoch 1, so every resume below starts mid-epoch.
"""

from __future__ import annotations

import csv
import re
import signal
import time

import pytest
import torch
from cli_helpers import (
    checkpoint,
    fit_in_process,
    max_diff,
    merge,
    model_weights,
    start_cli,
    tiny_config,
    write_config,
    write_pairs,
)
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import Dataset

from mmformer.cli.training import ConfigError
from mmformer.data.datamodule import GlobalBatchSampler, ResumableLoader
from mmformer.io.checkpointing import AtomicCheckpointIO

STEPS, EVERY, TOL = 8, 2, 1e-6
DROPOUT = {"model": {"model": {"stacks": {"shared": {"dropout": 0.1}}}}}  # the random state must resume too


def config(root, train, **overrides) -> dict:
    return tiny_config(root, train, **merge(DROPOUT, overrides))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the uninterrupted 8-step run."""
    root = tmp_path_factory.mktemp("reference")
    cli = fit_in_process(write_config(root / "config.yaml", config(root, data)))
    assert cli.trainer.global_step == STEPS
    return model_weights(cli.model)


def loader_state(path) -> dict:
    (state,) = checkpoint(path)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    return state


def test_stopped_mid_epoch_resumes_exactly(data, reference, tmp_path):
    """Stop after 4 steps (mid-epoch), resume with ``--ckpt_path last`` to 8, with 2 loader workers this time."""
    path = write_config(tmp_path / "config.yaml", config(tmp_path, data, data={"num_workers": 2}))
    fit_in_process(path, "--trainer.max_steps", "4")
    last = tmp_path / "ckpt" / "last.ckpt"
    assert checkpoint(last)["global_step"] == 4
    assert loader_state(last) | {"epoch": 1, "batches": 1} == loader_state(last)  # batch 1 of epoch 1 done

    cli = fit_in_process(path, "--ckpt_path", "last")
    assert cli.trainer.global_step == STEPS
    diff = max_diff(model_weights(cli.model), reference)
    assert diff <= TOL, diff

    # The same checkpoint without the loader's position (the epoch restarts its order), or without the random
    # state (other dropout masks), ends elsewhere: the comparison can tell.
    for name, strip in (
        ("position", lambda ckpt: ckpt["loops"]["fit_loop"]["state_dict"].pop("combined_loader")),
        ("random", lambda ckpt: ckpt["callbacks"].pop("RandomStateCallback")),
    ):
        blind = checkpoint(tmp_path / "ckpt" / "epoch=1-step=4.ckpt")
        strip(blind)
        torch.save(blind, tmp_path / f"{name}.ckpt")
        path = write_config(tmp_path / f"{name}.yaml", config(tmp_path / name, data))
        cli = fit_in_process(path, "--ckpt_path", str(tmp_path / f"{name}.ckpt"))
        assert max_diff(model_weights(cli.model), reference) > 1e-4, name


def logged_steps(root) -> int:
    """Optimizer steps the run had logged as done (CSVLogger, flushed every step)."""
    rows = [row for f in root.glob("logs/version_*/metrics.csv") for row in csv.DictReader(f.read_text().splitlines())]
    steps = [int(row["step"]) for row in rows]
    return max(steps) + 1 if steps else 0


def killed_run(data, root, *, kill_when, write_delay: float | None = None) -> None:
    """Start ``mmformer fit`` as a subprocess and SIGKILL it as soon as ``kill_when()`` is true."""
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(root), "name": "logs", "flush_logs_every_n_steps": 1},
    }
    settings = config(root, data, trainer={"logger": logger, "log_every_n_steps": 1})
    # last.ckpt only: the kills are about it, and with write_delay each other checkpoint written (epoch=E-step=S.ckpt,
    # before every last.ckpt) would add its pause to the run
    settings["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = 0
    path = write_config(root / "config.yaml", settings)
    proc = start_cli("fit", "--config", str(path), log=root / "output.txt", write_delay=write_delay)
    deadline = time.monotonic() + 200
    try:
        while not kill_when():
            assert proc.poll() is None, (root / "output.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the point to kill it"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def resume_and_compare(root, reference) -> None:
    cli = fit_in_process(root / "config.yaml", "--ckpt_path", "last")
    assert cli.trainer.global_step == STEPS
    diff = max_diff(model_weights(cli.model), reference)
    assert diff <= TOL, diff
    assert not list((root / "ckpt").glob(".*.tmp"))  # the killed writer's partial file is gone


@pytest.mark.slow
def test_sigkill_mid_training_resumes_exactly(data, reference, tmp_path):
    """Kill between checkpoint writes, just after the first last.ckpt (writes pause 0.5 s, so that the run cannot
    finish before the kill)."""
    folder = tmp_path / "ckpt"

    def training() -> bool:
        return (folder / "last.ckpt").exists() and not any(folder.glob(".*.tmp"))

    killed_run(data, tmp_path, kill_when=training, write_delay=0.5)
    saved = checkpoint(folder / "last.ckpt")["global_step"]  # loads: a complete file
    done = logged_steps(tmp_path)
    assert EVERY <= saved < STEPS and done - saved <= EVERY, (saved, done)  # at most one interval lost
    resume_and_compare(tmp_path, reference)


def test_a_second_run_stops_while_the_first_writes_to_its_folders(data, reference, tmp_path):
    """Two runs on one checkpoint folder would overwrite each other's last.ckpt: while a run trains, a second one
    on its config stops before training, naming the folder and the process writing there; the first ends with the
    weights it has alone. (Writes pause 1 s: after its first last.ckpt the first run trains for 3 s more; the lock
    going with a run that ended is shown by the tests that resume in this process.)"""
    settings = config(tmp_path, data)
    settings["trainer"]["callbacks"][0]["init_args"]["save_top_k"] = 0
    path = write_config(tmp_path / "config.yaml", settings)
    second = fit_in_process(path, run=False)  # built (data read, tokenizer trained) before the first run starts
    proc = start_cli("fit", "--config", str(path), log=tmp_path / "output.txt", write_delay=1)
    try:
        deadline = time.monotonic() + 200
        while not (tmp_path / "ckpt" / "last.ckpt").exists():
            assert proc.poll() is None, (tmp_path / "output.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never wrote a checkpoint"
            time.sleep(0.02)
        with pytest.raises(
            ConfigError, match=re.escape(f"folder '{tmp_path / 'ckpt'}': mmformer fit (pid {proc.pid})")
        ):
            second.fit(model=second.model, datamodule=second.datamodule)
        assert second.trainer.global_step == 0
        assert proc.wait(timeout=200) == 0, (tmp_path / "output.txt").read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    assert max_diff(model_weights(tmp_path / "ckpt" / "last.ckpt"), reference) <= TOL


def test_a_run_that_ended_mid_epoch_continues_that_epoch(data, reference, tmp_path):
    """Stopped by max_steps at step 4 (batch 1 of epoch 1), with last.ckpt written only when fit ended: Lightning had
    counted epoch 1 as done, and the continued run started epoch 2, skipping the rest of epoch 1 (2e-3 off the
    uninterrupted run). The schedule's length is the config's (8) in both runs."""
    settings = config(tmp_path, data)
    settings["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 100  # last.ckpt at the end only
    path = write_config(tmp_path / "config.yaml", settings)
    fit_in_process(path, "--trainer.max_steps", "4")
    assert checkpoint(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 4
    cli = fit_in_process(path, "--ckpt_path", "last")
    assert cli.trainer.global_step == STEPS
    assert max_diff(model_weights(cli.model), reference) <= TOL


def test_a_finished_run_continued_with_more_steps_follows_the_longer_curve(data, tmp_path):
    """Its checkpoint's schedule ended at 4 steps with the rate at its floor (0): continued to 8, the saved curve
    came back over the configured one and steps 5-8 changed nothing. Now the configured curve applies, with a
    warning naming the change."""
    settings = config(tmp_path, data, model={"schedule": {"max_steps": None}})  # the trainer's max_steps
    path = write_config(tmp_path / "config.yaml", settings)
    fit_in_process(path, "--trainer.max_steps", "4")
    before = model_weights(tmp_path / "ckpt" / "last.ckpt")
    with pytest.warns(UserWarning, match=r"schedule: .*max_steps 4 -> 8\); the learning rate follows the new one"):
        cli = fit_in_process(path, "--trainer.max_steps", "8", "--ckpt_path", "last")
    assert cli.trainer.global_step == 8
    (scheduler,) = cli.trainer.lr_scheduler_configs
    assert scheduler.scheduler.lr_lambdas[0].max_steps == 8
    assert max_diff(model_weights(cli.model), before) > 1e-4


@pytest.mark.slow
def test_sigkill_while_writing_last_ckpt_leaves_the_previous_one(data, reference, tmp_path):
    """Every checkpoint write pauses half-way (tests/slow_checkpoint_writes.py); kill while last.ckpt is being
    replaced."""
    last = tmp_path / "ckpt" / "last.ckpt"

    def writing_last() -> bool:
        return last.exists() and any((tmp_path / "ckpt").glob(".last.ckpt.*.tmp"))

    killed_run(data, tmp_path, kill_when=writing_last, write_delay=2)
    (partial,) = (tmp_path / "ckpt").glob(".last.ckpt.*.tmp")
    with pytest.raises(Exception):  # noqa: B017, PT011 (any error: it is half a zip file)
        checkpoint(partial)
    saved = checkpoint(last)["global_step"]  # the previous last.ckpt, complete
    assert EVERY <= saved < STEPS and logged_steps(tmp_path) - saved <= EVERY
    resume_and_compare(tmp_path, reference)


# ---------------------------------------------------------------------- the loader alone
class Indices(Dataset):
    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int) -> int:
        return i


def epoch_batches(loader: ResumableLoader, epoch: int, stop: int | None = None) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    out = []
    for batch in loader:  # Lightning too calls set_epoch before the first next()
        out.append(batch.tolist())
        if len(out) == stop:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_at_the_next_batch_of_the_saved_epoch(num_workers):
    def loader(batch_size: int = 3, world: int = 1, rank: int = 0) -> ResumableLoader:
        sampler = GlobalBatchSampler(Indices(), batch_size, world, rank, seed=7)
        return ResumableLoader(Indices(), sampler=sampler, num_workers=num_workers)

    full = epoch_batches(loader(), 2)
    assert len(full) == 4 and sorted(sum(full, [])) == list(range(11)) and full != epoch_batches(loader(), 3)

    first = loader()
    head = epoch_batches(first, 2, stop=2)
    state = first.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 2
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + epoch_batches(resumed, 2) == full
    assert epoch_batches(resumed, 3) == epoch_batches(loader(), 3)  # the next epoch starts from its beginning

    end = loader()
    end.load_state_dict({**state, "batches": 4})  # saved at the end of epoch 2: epoch 3 is untouched
    assert epoch_batches(end, 3) == epoch_batches(loader(), 3)

    # two processes with half the batch: rank r takes block r of each global batch, so the concatenation is the
    # one-process batch, and a position saved by one process count resumes under the other
    halves = [loader(batch_size=3, world=2, rank=r) for r in range(2)]
    wide = epoch_batches(loader(batch_size=6), 2)
    ranks = [epoch_batches(h, 2) for h in halves]
    assert len(ranks[0]) == len(ranks[1]) == len(wide)
    for step, batch in enumerate(wide):
        assert (ranks[0][step] + ranks[1][step])[: len(batch)] == batch
    single = loader(batch_size=6)
    epoch_batches(single, 2, stop=1)
    for rank, half in enumerate(halves):
        half.load_state_dict(single.state_dict())
        assert epoch_batches(half, 2) == ranks[rank][1:]


# ---------------------------------------------------------------------- the checkpoint writer alone
def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    with pytest.raises(Exception):  # noqa: B017, PT011 (whatever torch.save raises for an unpicklable object)
        io.save_checkpoint({"step": 2, "bad": lambda: None}, target)
    assert checkpoint(target)["step"] == 1 and sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    stale = target.with_name(".last.ckpt.999999999.tmp")  # left by a killed writer (no such process)
    stale.write_bytes(b"PK\x03\x04 half")
    io.save_checkpoint({"step": 3}, target)
    assert checkpoint(target)["step"] == 3 and not stale.exists()


def test_the_cli_installs_atomic_checkpoints_unless_given_a_checkpoint_io(data, tmp_path):
    path = write_config(tmp_path / "config.yaml", config(tmp_path, data))
    assert isinstance(fit_in_process(path, run=False).trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    own = "lightning.fabric.plugins.io.torch_io.TorchCheckpointIO"
    io = fit_in_process(path, "--trainer.plugins", own, run=False).trainer.strategy.checkpoint_io
    assert type(io) is TorchCheckpointIO
