"""Run a block with a model in eval mode and give the model back exactly as it was, from any number of threads.

Inference (zero-shot classification, long-form transcription) runs without dropout, but the model it is handed may
be training: a training callback classifies or transcribes, then training goes on. :func:`eval_mode` switches the
model to eval mode for the block and afterwards restores the mode each submodule had (a frozen part may sit in eval
mode while the rest trains), as Lightning's evaluation loop does.

One model shared by several threads (a thread pool classifying with it) must not have its mode saved and restored by
each thread on its own: a thread would save the eval mode another one set, run while another restores train mode
(dropout on in its predictions), and leave the model in eval mode. So switches of one model are serialised by a
re-entrant lock of its own (held in a weak map: a model is not kept alive by it) for the switch, the block and the
restore. A model entirely in eval mode of its own (the serving case) is left alone and takes no lock: its threads run
their blocks together.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from torch import nn


class _Switches:
    """One model's switches to eval mode: the re-entrant lock the switching thread holds through its block, and how
    many switches began or ended so far (odd while one is on), so that the lock-free check of another thread sees a
    switch that begins or ends while it reads the modes."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.count = 0


_switches: weakref.WeakKeyDictionary[Any, _Switches] = weakref.WeakKeyDictionary()  # model → its switches
_new_switches = threading.Lock()  # one _Switches per model, however many threads ask for it first


def _modules(model: Any) -> list[Any]:
    """Every module whose mode counts: an ``nn.Module``'s own and all below it; another model (a PT2E int8 model,
    whose graphs have no dropout) is one object with a ``training`` flag."""
    return list(model.modules()) if isinstance(model, nn.Module) else [model]


def _switch_count(model: Any) -> int:
    switches = _switches.get(model)
    return 0 if switches is None else switches.count


def _in_eval_mode_of_its_own(model: Any) -> bool:
    """Whether every module of ``model`` is in eval mode and was put there by its owner, not by another thread's
    :func:`eval_mode` (no switch was on, began or ended while the modes were read)."""
    before = _switch_count(model)
    if before % 2:
        return False
    return not any(module.training for module in _modules(model)) and _switch_count(model) == before


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then restore the mode every submodule had before.

    A model in eval mode already changes nothing and takes no lock (threads run their blocks together); otherwise
    the model's lock serialises the switch, the block and the restore across threads (re-entrant: a nested block of
    the same thread runs on). The modes are restored by flag, as ``model.train(mode)`` would set them one module at
    a time; a module's own ``train()`` override runs on the switch (``model.eval()``), not on the restore.

    Args:
        model: an ``nn.Module``, or an object with its ``training`` flag and ``eval()`` (a PT2E int8 model).
    """
    if _in_eval_mode_of_its_own(model):
        yield
        return
    with _new_switches:
        switches = _switches.setdefault(model, _Switches())
    with switches.lock:
        if switches.count % 2:  # switched by this thread's enclosing block (the lock is ours): it stays switched
            yield
            return
        modes = [(module, module.training) for module in _modules(model)]
        switches.count += 1  # before the switch: a lock-free check that sees eval mode sees the count move
        try:
            model.eval()
            yield
        finally:
            for module, training in modes:
                module.training = training
            switches.count += 1  # after the restore
