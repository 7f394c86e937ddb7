"""Peers in child processes that take turns: each engine in a process of its own (no other engine's runtime, threads
or weights beside it), timed call by call in alternation with the other processes' engines, so that the machine's
speed — which on the benchmark VM drifts by 10-30 % over minutes — moves every engine alike.

Why not one process: CTranslate2's OpenMP runtime beside torch's made torch's threads sleep and wake at every
parallel region (:mod:`benchmarks.ct2`), and engines sharing a process take turns in the CPU's caches. Why not one
child per engine, run one after the other: the ratios then measure the drift too (CTranslate2 float32 at batch 8 ran
at 835–1,502 tokens/s in five such runs within an hour).

A child calls :func:`serve` with its peers; the parent starts it with :class:`Child` and alternates the calls with
:func:`interleaved`. Between two calls the parent waits ``rest`` seconds, so that the OpenMP threads of the engine
that just ran have stopped spinning (CTranslate2's Intel runtime spins for 200 ms by default) before the next one
starts.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MARK = "@turn "  # the prefix of the child's answers on its stdout (anything else there is passed through)


def serve(peers: dict[str, Callable[[], torch.Tensor]]) -> None:
    """The child's loop: a peer's name per line on stdin → one timed call → ``@turn {"s": seconds, "ids": ...}`` on
    stdout; an empty line or the end of stdin ends it."""
    print(MARK + json.dumps({"ready": list(peers)}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            break
        start = time.perf_counter()
        ids = peers[name]()
        seconds = time.perf_counter() - start
        print(MARK + json.dumps({"s": seconds, "ids": ids.tolist()}), flush=True)


class Child:
    """A child process running :func:`serve` (``command``, in ``cwd``); its peers' names are :attr:`peers`."""

    def __init__(self, command: Sequence[str], cwd: str | Path | None = None):
        self.command = list(command)
        self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=cwd)  # fmt: skip
        self.peers: list[str] = self._answer()["ready"]

    def _answer(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            sys.stdout.write(line)
        raise RuntimeError(f"{' '.join(self.command)}: ended (exit {self.process.wait()}) without answering")

    def call(self, name: str) -> dict:
        """One timed call of peer ``name``: ``{"s": seconds, "ids": [...]}``."""
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.process.kill()
        self.close()


def interleaved(
    children: Sequence[Child], *, warmup: int = 2, repeats: int = 5, rest: float = 0.3
) -> dict[str, tuple[float, list]]:
    """Every child's peers called in turn, ``warmup`` untimed rounds then ``repeats`` timed ones, ``rest`` seconds
    apart: ``{name: (median seconds, the last call's ids)}`` (peer names must differ across children)."""
    turns = [(child, name) for child in children for name in child.peers]
    names = [name for _, name in turns]
    if len(set(names)) != len(names):
        raise ValueError(f"children: expected distinct peer names across children, got {names}")
    times: dict[str, list[float]] = {name: [] for name in names}
    ids: dict[str, list] = {}
    for round_ in range(warmup + repeats):
        for child, name in turns:
            time.sleep(rest)
            answer = child.call(name)
            ids[name] = answer["ids"]
            if round_ >= warmup:
                times[name].append(answer["s"])
    return {name: (statistics.median(times[name]), ids[name]) for name in names}
