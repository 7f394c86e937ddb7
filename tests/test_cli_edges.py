"""The ``mmformer`` command at its edges: ``--version`` and usage errors, a stdout that cannot take the output
(closed, full), running out of memory, and warnings made errors (``-W error``, ``PYTHONWARNINGS=error``)."""

import os
import sys
import types
import warnings
from importlib.metadata import version

import numpy as np
import pytest
import torch
from cli_helpers import tiny_config, write_config, write_pairs

from mmformer.cli import main as cli
from mmformer.cli.parser import COMMANDS


@pytest.fixture
def no_torch(monkeypatch):
    """``import torch`` fails while the test runs: what it calls must not need torch (it may be loaded already)."""
    monkeypatch.setitem(sys.modules, "torch", None)


def test_version_prints_the_installed_version_without_torch(no_torch, capsys):
    cli.main(["--version"])  # was "usage: usage: mmformer <command> ..." and the whole help
    assert capsys.readouterr().out == f"mmformer {version('mmformer')}\n"


def test_usage_errors_print_one_usage_line_and_name_every_command(no_torch, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err == "usage: mmformer <command> [options]\nmmformer: error: unrecognized arguments: --bogus\n"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["nonsense"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("usage:") == 1 and "invalid choice: 'nonsense'" in err
    choices = err[err.index("(choose from ") :]
    assert all(f"'{name}'" in choices for name in [*cli.TRAIN_COMMANDS, *COMMANDS])  # fit ... predict were missing


@pytest.fixture
def run_cli(monkeypatch):
    """``run()`` (the console script) with ``argv``, in this process; its global settings undone afterwards."""
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(cli.gc, "freeze", lambda: None)  # the test process keeps collecting

    def run(*argv: str) -> None:
        monkeypatch.setattr(sys, "argv", ["mmformer", *argv])
        cli.run()

    return run


def prints(text: str, flush: bool = False):
    """A command handler that prints ``text`` to stdout."""
    return lambda args: print(text, flush=flush)


CAPTION = ("caption", "--model", "m", "a.png")


def test_a_closed_stdout_is_said_once_on_stderr(run_cli, monkeypatch):
    """``mmformer caption ... >&-``: Python leaves sys.stdout None, print() dropped the captions silently and the
    last flush raised "AttributeError: 'NoneType' object has no attribute 'flush'"."""
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(cli, "_caption", prints("a.png\tone two"))
    closed = "error: cannot write the output to stdout: it is closed (redirect it to a file, or to /dev/null"
    with pytest.raises(SystemExit) as exit_:
        run_cli(*CAPTION)
    assert str(exit_.value.code).startswith(f"mmformer caption: {closed}")
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(SystemExit) as exit_:
        run_cli("--help")
    assert str(exit_.value.code).startswith(f"mmformer: {closed}")
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(cli, "_caption", lambda args: print("a note", file=sys.stderr))
    run_cli(*CAPTION)  # nothing for stdout: nothing lost


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_stdout_is_named_in_the_error_line(run_cli, monkeypatch):
    """``mmformer transcribe ... > /dev/full`` ended with "error: [Errno 28] No space left on device": no word of
    what could not be written. The last flush (run()'s) and a flush inside the command say the same; after it, what
    is still buffered goes to os.devnull, so that the interpreter's own last flush cannot fail again."""
    full = "error: cannot write the output to stdout: No space left on device"
    for flush in (False, True):  # the line left buffered (flushed by run()), or flushed by the command
        with open("/dev/full", "w") as stdout:
            monkeypatch.setattr(sys, "stdout", stdout)
            monkeypatch.setattr(cli, "_transcribe", prints("a.flac\tone two", flush=flush))
            with pytest.raises(SystemExit) as exit_:
                run_cli("transcribe", "--model", "m", "a.flac")
            assert exit_.value.code == f"mmformer transcribe: {full}"
            sys.stdout.flush()
            assert os.path.samestat(os.fstat(stdout.fileno()), os.stat(os.devnull))


def raises(error: BaseException):
    def handler(args):
        raise error

    return handler


@pytest.mark.parametrize(
    ("handler", "detail"),
    [
        (raises(MemoryError()), "MemoryError"),
        (lambda args: np.empty(2**50), "Unable to allocate 8.00 PiB"),  # numpy's MemoryError: 8 PiB refused
        # torch's (a GPU's; a RuntimeError): the first line of its message
        (
            raises(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIf reserved ...")),
            "CUDA out of memory. Tried to allocate 2.00 GiB.)",
        ),
    ],
    ids=["MemoryError", "numpy", "torch-OutOfMemoryError"],
)
def test_out_of_memory_is_one_line_naming_the_command_and_what_to_lower(monkeypatch, handler, detail):
    monkeypatch.setattr(cli, "_transcribe", handler)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["transcribe", "--model", "m", "--batch-size", "4", "a.flac"])
    line = str(exit_.value.code)
    assert line.startswith(f"mmformer transcribe: error: out of memory ({detail}") and "\n" not in line
    assert line.endswith("); ask for less at once: a smaller --batch-size (it was 4) or shorter inputs")


def test_out_of_memory_in_training_names_its_batch_size_and_other_runtime_errors_stay_tracebacks(monkeypatch):
    training = types.ModuleType("mmformer.cli.training")  # the training run alone, without Lightning's import
    training.run_training_cli = raises(MemoryError())
    monkeypatch.setitem(sys.modules, "mmformer.cli.training", training)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--config", "c.yaml"])
    assert exit_.value.code == ("mmformer fit: error: out of memory (MemoryError); ask for less at once: a smaller "
                                "--data.batch_size or shorter samples")  # fmt: skip
    monkeypatch.setattr(cli, "_transcribe", raises(RuntimeError("a shape mismatch")))  # not every RuntimeError
    with pytest.raises(RuntimeError, match="a shape mismatch"):
        cli.main(["transcribe", "--model", "m", "a.flac"])


def test_a_warning_made_an_error_ends_a_command_in_one_line(monkeypatch):
    """Under ``-W error`` a warning of a command (a file skipped) was a traceback."""

    def skips(args):
        warnings.warn("caption: skipped a.png: file not found", stacklevel=1)

    monkeypatch.setattr(cli, "_caption", skips)
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("error")
        cli.main(list(CAPTION))
    assert exit_.value.code == ("mmformer caption: error: UserWarning: caption: skipped a.png: file not found (a "
                                "warning, made an error by the warning filter: -W error / PYTHONWARNINGS)")  # fmt: skip


def test_fit_runs_under_warnings_as_errors_and_mmformers_own_warnings_still_reach_the_user(
    tmp_path, monkeypatch, capsys
):
    """``PYTHONWARNINGS=error mmformer fit`` stopped with a traceback at jsonargparse's deprecation of a call
    LightningCLI makes (add_instantiator), then at torch's of LeafSpec in Lightning's loops: neither a user's to fix.
    They are silenced there alone: a warning mmformer gives on purpose (an old key) still stops the run, in one line."""
    import jsonargparse._deprecated

    # jsonargparse warns once per process: as in a fresh one
    monkeypatch.setattr(jsonargparse._deprecated, "shown_deprecation_warnings", set())
    monkeypatch.setattr(sys, "argv", ["mmformer"])  # LightningCLI warns when given args and pytest's argv
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, write_pairs(tmp_path, n=4), max_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli.main(["fit", "--config", str(config)])
        assert (tmp_path / "ckpt" / "last.ckpt").is_file()
        with pytest.raises(SystemExit) as exit_:
            cli.main(["fit", "--config", str(config), "--model.caption_weight", "0.5"])
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "mmformer fit: error: FutureWarning: model: deprecated flat options, now grouped: caption_weight → " in err
