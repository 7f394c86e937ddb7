"""Helpers of the ``mmformer fit`` end-to-end tests: a tiny image–caption manifest, a tiny YAML config, and running
the CLI in this process or as a subprocess (one intra-op thread everywhere, so the numbers are the same)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_pairs(root: Path, n: int = 10) -> Path:
    """``n`` random 16×16 grayscale PNGs with two-word captions, listed in ``root/train.jsonl``."""
    import json

    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "text": f"{WORDS[i % 10]} {WORDS[(3 * i + 1) % 10]}"})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in recursively (a None value deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_config(root: Path, train: Path | str, *, every: int = 2, max_steps: int = 8, **overrides: Any) -> dict:
    """A config that trains a width-32, one-block image–text model (contrastive + captioning) in a few seconds,
    checkpointing (``last.ckpt`` too) every ``every`` steps into ``root/ckpt``."""
    base = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": 32,
            "max_steps": max_steps,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "default_root_dir": str(root / "run"),  # where LightningCLI saves the parsed config
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(root / "ckpt"),
                        "save_last": True,
                        "every_n_train_steps": every,
                        "save_top_k": -1,
                    },
                }
            ],
        },
        "model": {
            "model": {
                "stacks": {"shared": {"width": 32, "depth": 1, "n_heads": 2, "cross_attention": True}},
                "routes": {"image": "shared", "text": "shared", "decoder": "shared"},
                "image": {"image_size": [16, 16], "patch_size": 8, "channels": 1},
                "audio": None,
                "text": {"max_length": 8},
                "embed_dim": 16,
            },
            "schedule": {"warmup_steps": 2, "max_steps": max_steps},  # its length: the same for a run stopped half-way
            "generation": {"evaluate": False},
        },
        "data": {
            "train": str(train),
            "modalities": ["image"],
            "vocab_size": 280,
            "tokenizer_cache_dir": str(root / "tokenizer"),
            "batch_size": 4,
            "image_size": [16, 16],
            "image_mean": [0.5],
            "image_std": [0.5],
            "image_channels": 1,
        },
    }
    return merge(base, overrides)


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_in_process(config: Path, *args: str, run: bool = True):
    """``mmformer fit --config CONFIG ARGS`` in this process; returns the LightningCLI (model, trainer). With
    ``run=False`` it stops before fitting."""
    from mmformer.cli.training import build_cli

    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when args are given and sys.argv carries pytest's
    try:
        return build_cli(["fit"] * run + ["--config", str(config), *args], run=run)
    finally:
        sys.argv = argv


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def start_cli(*args: str, log: Path, write_delay: float | None = None, **env: str) -> subprocess.Popen:
    """``python -m mmformer.cli ARGS`` as a subprocess, its output in ``log``; with ``write_delay``, every checkpoint
    write pauses half-way for that many seconds (tests/slow_checkpoint_writes.py)."""
    if write_delay is None:
        command = [sys.executable, "-m", "mmformer.cli", *args]
    else:
        command = [sys.executable, str(REPO / "tests" / "slow_checkpoint_writes.py"), str(write_delay), *args]
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=cli_env(**env), stdout=out, stderr=out)


def run_cli(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmformer.cli", *args],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def checkpoint(path: Path) -> dict:
    """A checkpoint loaded the safe way (no code can run)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_weights(source: Any) -> dict[str, torch.Tensor]:
    """The task's weights from a checkpoint path or a LightningModule."""
    state = checkpoint(source)["state_dict"] if isinstance(source, (str, Path)) else source.state_dict()
    return {k: v.detach().clone().float() for k, v in state.items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
