"""The data module's options that describe the model's input (image size and channels, audio sample rate) follow the
model in ``mmformer fit`` where a config leaves them out, and stop the run by name where they differ from it."""

from __future__ import annotations

import pytest
from cli_helpers import fit_in_process, tiny_config, write_config, write_pairs

from mmformer.cli.training import ConfigError
from mmformer.data import MultimodalDataModule
from mmformer.preprocess.tokenizer import Tokenizer

# tiny_config's model, with an 8 kHz audio part (unrouted: it is only read for its sample rate)
AUDIO = {"model": {"model": {"audio": {"sample_rate": 8000, "max_frames": 100}}}}


@pytest.mark.parametrize(
    "key, value, model_key, model_value",
    [
        ("sample_rate", 16000, "model.model.audio.sample_rate", "8000"),
        ("image_size", 32, "model.model.image.image_size", r"\[16, 16\]"),
        ("image_channels", 3, "model.model.image.channels", "1"),
    ],
)
def test_data_input_options_that_differ_from_the_model_stop_before_any_data_is_read(
    tmp_path, key, value, model_key, model_value
):
    missing = tmp_path / "not-there.jsonl"  # nothing is read: the configuration is refused first
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, missing, **AUDIO))
    with pytest.raises(ConfigError, match=rf"data\.{key}: {value} differs from the model's {model_key}: {model_value}"):
        fit_in_process(config, f"--data.{key}", str(value), run=False)


def test_data_input_options_left_out_follow_the_model(tmp_path):
    train = write_pairs(tmp_path / "pairs", n=4)
    left_out = {"data": {"image_size": None, "image_channels": None}}
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train, **AUDIO, **left_out))
    processor = fit_in_process(config, run=False).datamodule.processor
    assert (processor.image.image_size, processor.image.channels) == ((16, 16), 1)
    assert processor.audio.sample_rate == 8000
    # the same values given explicitly are accepted (the shipped configs give both sides)
    fit_in_process(config, "--data.image_size", "16", "--data.sample_rate", "8000", run=False)


def test_outside_the_cli_left_out_input_options_are_the_processor_defaults(tmp_path):
    tokenizer = tmp_path / "tokenizer.json"
    Tokenizer.train(["one two", "three four"], vocab_size=270).save(tokenizer)
    processor = MultimodalDataModule(tokenizer=str(tokenizer)).processor
    assert (processor.image.image_size, processor.image.channels, processor.audio.sample_rate) == ((224, 224), 3, 16000)
    given = MultimodalDataModule(tokenizer=str(tokenizer), image_size=8, image_channels=1, sample_rate=8000).processor
    assert (given.image.image_size, given.image.channels, given.audio.sample_rate) == ((8, 8), 1, 8000)


def test_a_text_max_length_longer_than_the_models_table_stops_the_run(tmp_path):
    """tiny_config's model has text.max_length 8: data.text_max_length 32 trained anyway, every text cut to 8."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tmp_path / "not-there.jsonl"))
    with pytest.raises(
        ConfigError, match=r"data\.text_max_length: 32 is longer than .*model\.model\.text\.max_length: 8"
    ):
        fit_in_process(config, "--data.text_max_length", "32", run=False)


def test_a_text_max_length_left_out_follows_the_model_and_a_shorter_one_stays(tmp_path):
    train = write_pairs(tmp_path / "pairs", n=4)
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, train))
    assert fit_in_process(config, run=False).datamodule.text_max_length == 8
    assert fit_in_process(config, "--data.text_max_length", "6", run=False).datamodule.text_max_length == 6


def test_a_model_vocab_size_that_differs_from_the_tokenizers_stops_the_run(tmp_path):
    """The tokenizer's size is linked into the model: a model.model.text.vocab_size of 400 became 280, silently."""
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tmp_path / "not-there.jsonl"))
    with pytest.raises(ConfigError, match=r"model\.model\.text\.vocab_size: 400 differs from data\.vocab_size: 280"):
        fit_in_process(config, "--model.model.text.vocab_size", "400", run=False)


def test_a_hand_set_vocab_size_replaced_by_the_tokenizers_is_named_outside_the_cli(make_model_config):
    from mmformer.tasks import MultimodalTask

    with pytest.warns(
        UserWarning, match=r"model\.text\.vocab_size: 400 is replaced by the tokenizer's size, vocab_size=300"
    ):
        task = MultimodalTask(make_model_config(text={"vocab_size": 400}), vocab_size=300)
    assert task.model.config.text.vocab_size == 300
