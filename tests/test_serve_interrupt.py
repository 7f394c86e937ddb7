"""Ctrl-C on ``mmformer serve``: uvicorn drains the server, then raises the signal again inside asyncio's runner, whose
KeyboardInterrupt carried the CancelledError of the server's task — two chained tracebacks where the command's entry
point (``run``) prints one line and exits with status 130. In this process, without a subprocess: the signal is
raised in the server's own startup, once uvicorn's handlers are installed."""

from __future__ import annotations

import signal
import traceback
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from mmformer.serve import serve  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "data" / "digits_model"


def test_ctrl_c_stops_serve_with_one_plain_keyboard_interrupt(monkeypatch, capsys):
    started = uvicorn.Server.startup

    async def ctrl_c_once_started(self, sockets=None):
        await started(self, sockets=sockets)
        signal.raise_signal(signal.SIGINT)  # to uvicorn's handler: a graceful shutdown, then the signal again

    monkeypatch.setattr(uvicorn.Server, "startup", ctrl_c_once_started)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as info:
        serve(str(MODEL), port=0)
    assert signal.getsignal(signal.SIGINT) is handler  # uvicorn's and asyncio's handlers are gone
    printed = "".join(traceback.format_exception(info.value))
    assert printed.count("Traceback") == 1 and "CancelledError" not in printed, printed
    assert capsys.readouterr().out.startswith("mmformer serve: ")  # it served: the banner, then the shutdown
