"""Every shipped config parses and builds its model and data module; the GPU recipes build in dry-run mode,
which reads none of their data."""

from pathlib import Path

import pytest

from mmformer.cli.training import build_cli

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
DEMOS = ("digits", "lm_shakespeare")  # configs whose data ships in the repository
DIGITS = [c for c in CONFIGS if c.name.startswith(DEMOS)]
RECIPES = [c for c in CONFIGS if not c.name.startswith(DEMOS)]


def test_configs_exist():
    assert len(DIGITS) >= 4 and len(RECIPES) >= 3, [c.name for c in CONFIGS]


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
