"""``mmformer fit --trainer.devices 2 --trainer.strategy ddp`` on CPU (gloo) trains the contrastive task exactly as
one process on the concatenated batch: the same logged loss and the same gradient (one plain-SGD step with lr 1,
so the weight change is the gradient), to 1e-5.

Which samples each rank gets: the data module's training sampler cuts each epoch's permutation into global batches
of ``batch_size * processes`` and gives rank r the r-th block of ``batch_size`` (see
:class:`~mmformer.data.datamodule.GlobalBatchSampler`), so ranks 0 and 1 with 4 samples each hold exactly the
8-sample batch of one process, shuffled by the same seed. The contrastive loss gathers every rank's features with
gradients, so each rank computes the loss of the whole batch.
"""

from __future__ import annotations

import csv

import pytest
import torch
from cli_helpers import checkpoint, fit_in_process, model_weights, run_cli, tiny_config, write_config, write_pairs

TOL = 1e-5


def contrastive_config(root, data, batch_size: int, devices: int) -> dict:
    return tiny_config(
        root,
        data,
        every=1,
        max_steps=1,
        trainer={
            "devices": devices,
            "strategy": "ddp" if devices > 1 else "auto",
            "limit_train_batches": 1,
            "log_every_n_steps": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
        },
        model={
            "model": {
                "stacks": {"shared": {"cross_attention": False}},
                "routes": {"decoder": None},  # image and text only
            },
            "objectives": {"caption": 0.0, "speech": 0.0},
            "schedule": {"warmup_steps": 0},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}},
        },
        data={"batch_size": batch_size},
    )


def logged_loss(root) -> float:
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    (value,) = [float(row["train/loss"]) for row in csv.DictReader(metrics.open()) if row.get("train/loss")]
    return value


@pytest.mark.slow
def test_two_process_ddp_step_equals_one_process_on_the_whole_batch(tmp_path):
    data = write_pairs(tmp_path / "data", n=8)
    two = tmp_path / "two"
    config = write_config(two / "config.yaml", contrastive_config(two, data, batch_size=4, devices=2))
    done = run_cli("fit", "--config", str(config), timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    one = tmp_path / "one"
    config = write_config(one / "config.yaml", contrastive_config(one, data, batch_size=8, devices=1))
    cli = fit_in_process(config, run=False)
    before = model_weights(cli.model)  # the same seed: the initial weights of both runs
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after_one = model_weights(cli.model)

    last = checkpoint(two / "ckpt" / "last.ckpt")
    assert last["global_step"] == 1
    (state,) = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state["global_batch_size"] == 8 and state["batches"] == 1  # two processes of 4
    after_two = model_weights(two / "ckpt" / "last.ckpt")
    grads = {k: before[k] - after_one[k] for k in before}  # SGD, lr 1: the weight change is the gradient
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3
    for name, grad in grads.items():
        torch.testing.assert_close(before[name] - after_two[name], grad, rtol=0, atol=TOL, msg=name)
    assert abs(logged_loss(two) - logged_loss(one)) <= TOL
