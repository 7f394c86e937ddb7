"""``mmformer fit --trainer.strategy fsdp`` (FSDP2 through Lightning's ModelParallelStrategy) on CPU with gloo:
two processes train exactly as one process on the concatenated batch; the sharded checkpoint folder loads with
``load_pretrained`` and ``mmformer export`` consolidates it into our directory format, which a fresh process loads.

Which samples each rank gets, and why the contrastive loss is exact across ranks: see tests/test_cli_ddp.py.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import (
    REPO,
    WORDS,
    cli_env,
    fit_in_process,
    merge,
    model_weights,
    run_cli,
    tiny_config,
    write_config,
    write_pairs,
)

from mmformer.io.checkpointing import refuse_sharded_folder
from mmformer.io.pretrained import read_checkpoint
from mmformer.io.training_checkpoints import read_training_checkpoint
from mmformer.tasks.parallel import FSDP2Strategy, strategy_from_name, vectorize_scalars

STEPS = 3
RESUME_STEPS = 4  # a checkpoint at step 2, killed there, two steps after the resume
TOL = 1e-6


def fsdp_config(root, data, *, batch_size: int, devices: int, checkpointing: bool, val=None) -> dict:
    """With ``val``: a sanity check and a validation pass at the end, zero-shot classes included (the class
    embeddings are built by the sharded model's forward), metrics logged to ``root/logs``."""
    config = tiny_config(
        root,
        data,
        every=STEPS,
        max_steps=STEPS,
        trainer={
            "devices": devices,
            "strategy": "fsdp" if devices > 1 else "auto",
            "limit_train_batches": STEPS,
        },
        model={
            "model": {
                "stacks": {"shared": {"cross_attention": False, "depth": 2, "gradient_checkpointing": checkpointing}},
                "routes": {"decoder": None},  # image and text only: every loss term is exact across ranks
                "text": {"max_length": 16},
            },
            "objectives": {"caption": 0.0, "speech": 0.0},
            "schedule": {"warmup_steps": 0},
            # momentum: the optimizer holds a state per parameter, the scalar logit_scale's too (0-d in a file)
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}},
        },
        data={"batch_size": batch_size},
    )
    if val is None:
        return config
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root / "logs")}}
    return merge(
        config,
        {
            "trainer": {"limit_val_batches": 1, "num_sanity_val_steps": 1, "logger": logger},
            "model": {"zeroshot": {"classes": WORDS}},
            "data": {"val": str(val)},
        },
    )


def single_words(manifest, out):
    """``manifest``'s rows with their captions cut to the first word, a class name: zero-shot accuracy counts them."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    out.write_text("".join(json.dumps({**r, "text": r["text"].split()[0]}) + "\n" for r in rows))
    return out


def logged(root, name: str) -> list[float]:
    """The values of metric ``name`` in the CSV log under ``root/logs``."""
    (log,) = (root / "logs").rglob("metrics.csv")
    with open(log) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def sharded_weights(folder) -> dict[str, torch.Tensor]:
    checkpoint = read_checkpoint(folder)
    return {k: v.float() for k, v in checkpoint.read(sorted(checkpoint.specs)).items()}


@pytest.mark.slow
def test_two_process_fsdp_fit_equals_one_process_and_exports(tmp_path):
    """Two FSDP ranks with activation checkpointing (the wrapped blocks sharded) train as one process without it:
    one run shows both the sharding and the recomputation exact (each run starts two processes: ~20 s). The sharded
    model's sanity check and validation build zero-shot class embeddings; a single-file checkpoint (scalars 0-d)
    resumes under FSDP (scalars (1,)) as it does in one process."""
    data = write_pairs(tmp_path / "data", n=8 * STEPS)
    val = single_words(data, tmp_path / "data" / "val.jsonl")
    two = tmp_path / "two"
    config = fsdp_config(two, data, batch_size=4, devices=2, checkpointing=True, val=val)
    done = run_cli("fit", "--config", str(write_config(two / "config.yaml", config)), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = two / "ckpt" / "last.ckpt"
    assert folder.is_dir() and (folder / ".metadata").is_file()  # each rank wrote its own shards
    assert len(logged(two, "val/zeroshot_image_acc")) == 1  # the validation pass after training, zero-shot scored

    one = tmp_path / "one"
    config = fsdp_config(one, data, batch_size=8, devices=1, checkpointing=False, val=val)
    cli = fit_in_process(write_config(one / "config.yaml", config), run=False)
    before = model_weights(cli.model)  # the same seed: the initial weights of both runs
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    expected = {k.removeprefix("model."): v for k, v in model_weights(cli.model).items() if k.startswith("model.")}
    assert max(float((before[f"model.{k}"] - v).abs().max()) for k, v in expected.items()) > 1e-3  # it trained

    got = sharded_weights(folder)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value.reshape(got[name].shape), rtol=0, atol=TOL, msg=name)

    # consolidated into our directory format by `mmformer export`, loaded in the same fresh process (one start-up):
    # the unsharded model's outputs
    out = tmp_path / "exported"
    pixels = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, tmp_path / "pixels.pt")
    code = (
        "import sys, torch, mmformer\n"
        "from mmformer.cli.main import main\n"
        f"main(['export', '--ckpt', {str(folder)!r}, '--out', {str(out)!r}])\n"
        f"m = mmformer.from_pretrained({str(out)!r}).eval()\n"
        f"x = torch.load({str(tmp_path / 'pixels.pt')!r}, weights_only=True)\n"
        "with torch.no_grad(): e = m.encode_image(x)\n"
        f"torch.save({{'e': e, 'scale': m.logit_scale.detach()}}, {str(tmp_path / 'out.pt')!r})\n"
        "import gc; gc.freeze()\n"  # the exit skips the final collections, as the mmformer command's (cli.main.run)
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = torch.load(tmp_path / "out.pt", weights_only=True)
    model = cli.model.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh["e"], model.encode_image(pixels), rtol=0, atol=1e-5)
    assert fresh["scale"].shape == model.logit_scale.shape == ()  # the model's own scalar again

    # the one process's checkpoint file (logit_scale and its momentum 0-d) resumed for an epoch on two FSDP ranks
    # equals the one process resumed (the same global batches of 8; the next checkpoint at step 2 * STEPS)
    file, more = one / "ckpt" / "last.ckpt", ["--trainer.max_steps", str(2 * STEPS), "--model.schedule.max_steps", "9"]
    assert file.is_file()
    done = run_cli("fit", "--config", str(two / "config.yaml"), "--ckpt_path", str(file), *more, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = two / "ckpt" / f"epoch=1-step={2 * STEPS}.ckpt"
    assert read_training_checkpoint(resumed)["global_step"] == 2 * STEPS, done.stderr[-3000:]
    cli = fit_in_process(one / "config.yaml", "--ckpt_path", str(file), *more)
    expected = {k.removeprefix("model."): v for k, v in model_weights(cli.model).items() if k.startswith("model.")}
    got = sharded_weights(resumed)
    assert max(float((got[k] - v.reshape(got[k].shape)).abs().max()) for k, v in expected.items()) <= TOL
    with pytest.raises(IsADirectoryError, match="--trainer.strategy fsdp"):  # resumed without FSDP (mmformer fit's
        fit_in_process(one / "config.yaml", "--ckpt_path", str(folder), *more)  # checkpoint reader refuses it)


def test_a_sharded_checkpoint_folder_is_refused_with_the_ways_on(tmp_path):
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"")  # Lightning's metadata file in a sharded checkpoint folder
    with pytest.raises(IsADirectoryError) as error:
        refuse_sharded_folder(folder)
    message = str(error.value)
    assert str(folder) in message and "--trainer.strategy fsdp" in message and "mmformer export --ckpt" in message
    with pytest.raises(IsADirectoryError, match="expected a checkpoint file"):
        refuse_sharded_folder(tmp_path)
    refuse_sharded_folder(tmp_path / "run.ckpt")  # a file (or nothing yet): Lightning's reader says the rest


def test_fsdp_strategy_by_name_and_its_options():
    assert isinstance(strategy_from_name("fsdp"), FSDP2Strategy)
    assert strategy_from_name("ddp") == "ddp"
    with pytest.raises(ValueError, match="param_dtype"):
        FSDP2Strategy(param_dtype="int8")
    policy = FSDP2Strategy(param_dtype="bfloat16").mixed_precision()
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


def test_scalars_become_vectors_with_the_same_value(tiny_model):
    before = float(tiny_model.logit_scale)
    names = vectorize_scalars(tiny_model)
    assert "logit_scale" in names and tiny_model.logit_scale.shape == (1,) and float(tiny_model.logit_scale) == before


def run_until_killed(root, config: dict, kill_when) -> None:
    """``mmformer fit`` on two processes in a session of their own; SIGKILL the whole session once ``kill_when()``."""
    path = write_config(root / "config.yaml", config)
    with open(root / "output.txt", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmformer.cli", "fit", "--config", str(path)],
            cwd=REPO,
            env=cli_env(),
            stdout=log,
            stderr=log,
            start_new_session=True,  # the launcher and the rank it spawned: one process group to kill
        )
    deadline = time.monotonic() + 400
    try:
        while not kill_when():
            assert proc.poll() is None, (root / "output.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the point to kill it"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_fsdp_killed_mid_training_resumes_to_the_uninterrupted_weights(tmp_path):
    data = write_pairs(tmp_path / "data", n=8 * RESUME_STEPS)

    def config(root) -> dict:
        c = fsdp_config(root, data, batch_size=4, devices=2, checkpointing=False)
        c = merge(
            c,
            {"trainer": {"max_steps": RESUME_STEPS, "limit_train_batches": None}, "model": {"max_steps": RESUME_STEPS}},
        )
        c["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 2
        return merge(c, {"model": {"model": {"stacks": {"shared": {"dropout": 0.1}}}}})  # random state resumes too

    reference = tmp_path / "reference"
    done = run_cli("fit", "--config", str(write_config(reference / "config.yaml", config(reference))), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    killed = tmp_path / "killed"
    last = killed / "ckpt" / "last.ckpt"
    run_until_killed(killed, config(killed), kill_when=lambda: (last / ".metadata").is_file())
    saved = read_training_checkpoint(last)["global_step"]  # a complete checkpoint, mid-run
    assert 2 <= saved < RESUME_STEPS, saved

    done = run_cli("fit", "--config", str(killed / "config.yaml"), "--ckpt_path", "last", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert read_training_checkpoint(last)["global_step"] == RESUME_STEPS
    expected, got = sharded_weights(reference / "ckpt" / "last.ckpt"), sharded_weights(last)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=TOL, msg=name)
    assert not list((killed / "ckpt").glob(".last.ckpt.tmp-*"))  # the killed writer's staging folder is gone
