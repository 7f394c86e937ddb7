"""A config with an unknown key, a value of the wrong type or an impossible model fails before any data is read,
naming the key; ``mmformer fit`` prints one ``mmformer: error: ...`` and exits with status 2.

"No data read": ``data.train`` is a manifest that cannot be parsed (reading it raises an error naming it), and the
tokenizer cache folder (created when a tokenizer is trained on the training texts) must not appear.
"""

from __future__ import annotations

import pytest
from cli_helpers import fit_in_process, run_cli, tiny_config, write_config

from mmformer.cli.training import ConfigError


@pytest.fixture
def poison(tmp_path):
    path = tmp_path / "poison.jsonl"
    path.write_text("this is not a manifest\n")
    return path


CASES = {
    "unknown key": ({"data": {"batch_sise": 4}}, ["batch_sise"]),
    "unknown nested key": ({"model": {"model": {"stacks": {"shared": {"widht": 32}}}}}, ["widht"]),
    "wrong type": ({"data": {"batch_size": "four"}}, ["data.batch_size", "four"]),
    "wrong nested type": ({"model": {"model": {"image": {"patch_size": 2.5}}}}, ["model.model.image", "patch_size"]),
    "wrong type in a named stack": (  # jsonargparse's report skips the stack's name (a dict key)
        {
            "model": {
                "model": {"stacks": {"other": {"width": 32, "depth": 1, "n_heads": 2}, "shared": {"width": "abc"}}}
            }
        },
        ["model.model.stacks.shared.width: Expected a <class 'int'>. Got value: abc"],
    ),
    "heads not dividing width": (
        {"model": {"model": {"stacks": {"shared": {"n_heads": 3}}}}},
        ["model.model.stacks.shared", "n_heads (3) must divide", "width (32)"],
    ),
    "route to a missing stack": (
        {"model": {"model": {"routes": {"text": "nope"}}}},
        ["model.model", "routes['text'] = 'nope'"],
    ),
    "image tower wider than the cross-attention decoder": (  # failed in the first training step
        {"model": {"model": {"stacks": {"img": {"width": 48, "depth": 1, "n_heads": 2}}, "routes": {"image": "img"}}}},
        ["model.model", "stacks['shared'].width (32), the decoder's", "{'image': 48}"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_names_the_key_before_reading_data(case, tmp_path, poison):
    overrides, expected = CASES[case]
    config = write_config(tmp_path / "config.yaml", tiny_config(tmp_path, poison, **overrides))
    with pytest.raises(ConfigError) as info:
        fit_in_process(config)
    message = str(info.value)
    for text in expected:
        assert text in message, message
    assert "poison" not in message and not (tmp_path / "tokenizer").exists()


def test_a_valid_config_does_read_the_data(tmp_path, poison):
    """The check above can tell: with a valid config the poisoned manifest is read (and refused, by name)."""
    config = write_config(tmp_path / "config.yaml", tiny_config(tmp_path, poison))
    with pytest.raises(ConfigError, match=r"poison\.jsonl, line 1: not valid JSON"):
        fit_in_process(config)


def test_mmformer_fit_prints_one_error_and_exits_2(tmp_path, poison):
    config = write_config(
        tmp_path / "config.yaml", tiny_config(tmp_path, poison, model={"model": {"text": {"max_lenght": 8}}})
    )
    done = run_cli("fit", "--config", str(config), timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors[0].startswith("mmformer: error:") and "max_lenght" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(errors) <= 4, done.stderr
    assert not (tmp_path / "tokenizer").exists()


def test_a_bad_value_a_class_refuses_under_an_optional_section_is_one_line(tmp_path):
    """``--data.augment '{audio: {speed_prob: 1.5}}'``: AugmentConfig's own check, under ``AugmentConfig | None``,
    came as jsonargparse's union report with every subtype and the whole namespace dumped after it."""
    from cli_helpers import write_pairs

    config = write_config(tmp_path / "config.yaml", tiny_config(tmp_path, write_pairs(tmp_path / "data", n=4)))
    with pytest.raises(ConfigError) as info:
        fit_in_process(config, "--data.augment", "{audio: {speed_prob: 1.5}}")
    assert str(info.value) == "augment.audio.speed_prob: expected a probability in [0, 1]; got 1.5"


def test_a_bad_value_of_a_named_stack_on_the_command_line_names_the_stack(tmp_path, poison):
    config = write_config(tmp_path / "config.yaml", tiny_config(tmp_path, poison))
    with pytest.raises(ConfigError) as info:
        fit_in_process(config, "--model.model.stacks.shared.depth", "deep")
    assert str(info.value).startswith("model.model.stacks.shared.depth: Expected a <class 'int'>"), info.value
