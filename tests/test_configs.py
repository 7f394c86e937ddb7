"""Every shipped config parses and builds its model and data module; the GPU recipes build in dry-run mode,
which reads none of their data."""

from pathlib import Path

import pytest
import yaml

from mmformer.cli.training import build_cli

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
DEMOS = ("digits", "lm_shakespeare")  # configs whose data ships in the repository
DIGITS = [c for c in CONFIGS if c.name.startswith(DEMOS)]
RECIPES = [c for c in CONFIGS if not c.name.startswith(DEMOS)]


def test_configs_exist():
    assert len(DIGITS) >= 4 and len(RECIPES) >= 3, [c.name for c in CONFIGS]


def test_an_integer_val_check_interval_counts_across_epochs():
    """An integer ``val_check_interval`` counts training batches within one epoch unless ``check_val_every_n_epoch``
    is null, and Lightning refuses one longer than the epoch (LibriSpeech's train-clean-100 is ~892 batches of 32,
    the recipe validates every 5000): every shipped config with one sets it to null."""
    trainers = {c.name: yaml.safe_load(c.read_text())["trainer"] for c in CONFIGS}
    stepped = {name: t for name, t in trainers.items() if isinstance(t.get("val_check_interval"), int)}
    assert len(stepped) >= 3, sorted(stepped)  # lm_shakespeare, librispeech_speech, clip_vit_b16_webdataset
    wrong = [name for name, t in stepped.items() if t.get("check_val_every_n_epoch", 1) is not None]
    assert wrong == [], f"set check_val_every_n_epoch: null in {wrong}"


@pytest.mark.parametrize("config", DIGITS, ids=lambda p: p.name)
def test_digits_config_builds(config, tmp_path, monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)  # the configs name data/digits/..., data/shakespeare/... relative to the repository
    args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    cli = build_cli([*args, "--data.tokenizer_cache_dir", str(tmp_path)], run=False)
    model = cli.model.model
    assert model.config.text.vocab_size == cli.datamodule.vocab_size  # linked once, from the tokenizer
    assert sum(p.numel() for p in model.parameters()) > 100_000


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.name)
def test_recipe_builds_without_its_data(config, tmp_path):
    cache = tmp_path / "tokenizers"
    cli = build_cli(
        ["--config", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
         "--trainer.devices", "1", "--trainer.strategy", "auto", "--data.tokenizer_cache_dir", str(cache)],
        run=False,
        dry_run=True,
    )  # fmt: skip
    model = cli.model.model
    assert model.config.text.vocab_size == cli.datamodule.hparams.vocab_size
    assert sum(p.numel() for p in model.parameters()) > 10_000_000  # full size
    assert not cache.exists()  # no tokenizer was trained: nothing of the data was read
