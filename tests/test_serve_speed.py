"""The server's batching policy (issue #22): a batch waits only for requests on their way, FIFO order, and audio
batches split by length where padding costs more than a call; results stay those of one-by-one calls."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mmformer.serve.batching import Batcher, Deferred, decoding
from mmformer.serve.engine import length_groups
from mmformer.serve.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits"
MODEL = ROOT / "data" / "digits_model"
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def run_batcher(scenario, timeout_s: float = 2.0, max_batch_size: int = 8):
    """``scenario(batcher)`` run in an event loop; returns (its result, the model calls)."""
    calls: list[list[int]] = []

    def run(key, payloads):
        calls.append(list(payloads))
        return [10 * p for p in payloads]

    async def main():
        batcher = Batcher("t", run, ThreadPoolExecutor(1), Metrics(), max_batch_size, timeout_s)
        batcher.start()
        try:
            return await scenario(batcher)
        finally:
            await batcher.stop()

    return asyncio.run(main()), calls


def test_a_lone_request_does_not_wait_for_the_batch_timeout():
    async def alone(batcher):
        start = time.perf_counter()
        result = await batcher.submit(4)
        return result, time.perf_counter() - start

    (result, seconds), calls = run_batcher(alone, timeout_s=2.0)
    assert result == 40 and calls == [[4]]
    assert seconds < 1.0, f"a lone request waited {seconds:.2f} s for a 2 s batch timeout with nothing on its way"


def test_a_batch_waits_for_a_request_being_read_and_takes_it():
    async def two(batcher):
        async def slow_reader() -> int:
            with batcher.arriving():
                await asyncio.sleep(0.2)  # reading / decoding its upload
            return await batcher.submit(2)

        reader = asyncio.create_task(slow_reader())
        await asyncio.sleep(0.05)  # the reader has started reading
        return await asyncio.gather(batcher.submit(1), reader)

    results, calls = run_batcher(two, timeout_s=2.0)
    assert results == [10, 20] and calls == [[1, 2]]


def test_a_batch_stops_waiting_when_the_request_being_read_fails():
    async def failing(batcher):
        async def bad_reader() -> None:
            with batcher.arriving():
                await asyncio.sleep(0.1)
                raise ValueError("file: expected audio, got text")

        reader = asyncio.create_task(bad_reader())
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        result = await batcher.submit(3)
        with pytest.raises(ValueError):
            await reader
        return result, time.perf_counter() - start

    (result, seconds), calls = run_batcher(failing, timeout_s=2.0)
    assert result == 30 and calls == [[3]]
    assert seconds < 1.0, f"the batch waited {seconds:.2f} s for a request that had failed"


def test_inputs_queued_while_the_model_is_busy_run_first_in_first_out_in_full_batches():
    async def burst(batcher):
        return await asyncio.gather(*(batcher.submit(p) for p in range(20)))

    results, calls = run_batcher(burst, timeout_s=0.0, max_batch_size=8)
    assert results == [10 * p for p in range(20)]
    assert calls == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]


def test_uploads_are_decoded_on_the_model_thread_and_one_that_does_not_decode_fails_alone():
    threads: list[str] = []
    calls: list[list[int]] = []

    def load(data: bytes) -> int:
        threads.append(threading.current_thread().name)
        if not data.isdigit():
            raise ValueError(f"input[0].audio: expected digits, got {data!r}")
        return int(data)

    def run(key, payloads):
        calls.append(list(payloads))
        return [key * p for p in payloads]

    async def main():
        model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        batcher = Batcher("t", decoding(run), model_thread, Metrics(), max_batch_size=8, timeout_s=0.05)
        batcher.start()
        jobs = [batcher.submit(Deferred(load, d), key=10) for d in (b"1", b"x2", b"3")] + [batcher.submit(4, key=10)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert results[0] == 10 and results[2:] == [30, 40]
    assert isinstance(results[1], ValueError) and "input[0].audio: expected digits" in str(results[1])
    assert calls == [[1, 3, 4]]  # the bad upload left out, the others in one call
    assert threads and all(t.startswith("model") for t in threads), threads


def test_length_groups_is_the_cheapest_split_of_the_sorted_lengths():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 1 + trial % 7
        lengths = torch.randint(1, 100, (n,), generator=gen).tolist()
        overhead = [0, 10, 60, 1000][trial % 4]
        groups = length_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(n))

        def cost(gs: list[list[int]], lengths: list[int] = lengths, overhead: int = overhead) -> int:
            return sum(overhead + len(g) * max(lengths[i] for i in g) for g in gs)

        order = sorted(range(n), key=lengths.__getitem__)
        best = min(
            cost([order[a:b] for a, b in itertools.pairwise((0, *cuts, n))])
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
        )
        assert cost(groups) == best, (lengths, overhead, groups)
    assert length_groups([5, 100, 6, 101], overhead=1000) == [[0, 2, 1, 3]]  # calls dearer than padding: one call
    assert length_groups([5, 100, 6, 101], overhead=0) == [[0], [2], [1], [3]]  # free calls: no padding at all


@pytest.fixture(scope="module")
def engine():
    from mmformer.serve.server import load_engine

    torch.manual_seed(0)
    return load_engine(str(MODEL))


def test_a_batch_of_mixed_lengths_is_split_and_classifies_and_embeds_as_one_by_one(engine):
    rows = [json.loads(line) for line in (DIGITS / "test.jsonl").read_text().splitlines()][:24]
    waves = [engine.load_audio((DIGITS / r["audio_filepath"]).read_bytes(), "file") for r in rows]
    lengths = [w.shape[-1] for w in waves]
    rate = engine.model.config.audio.sample_rate
    assert max(lengths) > 2 * min(lengths)  # the clips differ enough for a split to pay
    key = ("audio", tuple(LABELS), ("{}",))
    calls: list[int] = []
    clf = engine.classifier(*key)
    predict = clf.predict_proba

    def counted(audio, **kwargs):
        calls.append(audio.shape[0])
        return predict(audio, **kwargs)

    clf.predict_proba = counted
    try:
        together = engine.classify(key, waves)
        split = list(calls)
        assert len(split) > 1 and sum(split) == len(waves), split
        alone = [engine.classify(key, [w])[0] for w in waves]
    finally:
        del clf.predict_proba
    print(f"{len(waves)} clips of {min(lengths) / rate:.2f}-{max(lengths) / rate:.2f} s: calls of {split}")
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), rtol=0, atol=1e-5)
    vectors = torch.stack(engine.embed("audio", waves))
    each = torch.stack([engine.embed("audio", [w])[0] for w in waves])
    torch.testing.assert_close(vectors, each, rtol=0, atol=1e-5 * each.abs().max().item())
