"""``mmformer serve``: the real server in a subprocess on a free port, driven by the official ``openai`` client and
httpx; every answer compared with the library called in this process (the shipped digits model, a random LM)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import mmformer  # noqa: E402
from mmformer.preprocess.processor import Processor  # noqa: E402
from mmformer.preprocess.tokenizer import Tokenizer  # noqa: E402
from mmformer.serve.batching import Abandoned, Batcher  # noqa: E402
from mmformer.serve.metrics import Metrics  # noqa: E402
from mmformer.zeroshot import ZeroShotClassifier  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits"
MODEL = "data/digits_model"
KEY = "sk-test-key"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_samples(n: int) -> list[dict]:
    rows = [json.loads(line) for line in (DIGITS / "test.jsonl").read_text().splitlines()]
    return rows[:n]


test_samples.__test__ = False  # a helper, not a test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, *args: str, startup_s: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mmformer serve`` in a subprocess on a free port, from the repository root; SIGTERM at the end."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mmformer.cli", "serve", "--model", model, "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mmformer serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mmformer serve did not answer /health within {startup_s} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def digits():
    model = mmformer.load_pretrained(str(ROOT / MODEL))
    torch.manual_seed(0)
    return model


@pytest.fixture(scope="module")
def padding_leaks(digits) -> float:
    """Max abs change of a clip's audio embedding when it is zero-padded in a batch (issue #24: > 1e-5 until fixed)."""
    from mmformer.data.collate import pad_audio

    rows = test_samples(3)
    waves = [digits.processor.load_audio(str(DIGITS / rows[i]["audio_filepath"])) for i in (0, 2)]
    with torch.no_grad():
        batch = digits.encode_audio(*pad_audio(waves))
        alone = digits.encode_audio(waves[0][None], torch.tensor([waves[0].shape[-1]]))
    return float((batch[0] - alone[0]).abs().max())


def same_as_alone(got: list, alone: list, leaks: float, what: str) -> None:
    """Batched answers equal one-by-one answers; while issue #24 (padding leaks into the audio encoder) is open, a
    difference is reported as that known failure (an expected failure naming the count), never hidden."""
    differ = [(i, g, e) for i, (g, e) in enumerate(zip(got, alone)) if g != e]
    if differ and leaks > 1e-5:
        pytest.xfail(f"issue #24 (padding changes an audio embedding by {leaks:.3g}): {len(differ)} of {len(got)} "
                     f"batched {what} differ from one-by-one, e.g. {differ[:3]}")  # fmt: skip
    assert not differ, f"{len(differ)} of {len(got)} batched {what} differ from one-by-one: {differ[:5]}"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_server(MODEL, "--api-key", KEY, "--max-upload-mb", "8", "--max-batch-size", "32") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text."""
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if found == labels:
                return float(match.group(3))
    raise KeyError(f"{name}{labels} not in the metrics")


# ---------------------------------------------------------------------------------------------- batching, in process
def test_batcher_batches_concurrent_inputs_and_a_failing_input_fails_only_itself():
    calls: list[list[int]] = []

    def run(key, payloads):
        calls.append(list(payloads))
        if any(p < 0 for p in payloads):
            raise ValueError(f"x: expected >= 0, got {min(payloads)}")
        return [key * p for p in payloads]

    async def main():
        batcher = Batcher("t", run, ThreadPoolExecutor(1), Metrics(), max_batch_size=8, timeout_s=0.05)
        batcher.start()
        jobs = [batcher.submit(p, key=10) for p in (1, 2, -3, 4)] + [batcher.submit(5, key=100)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert results[:2] == [10, 20] and results[3:] == [40, 500]
    assert isinstance(results[2], ValueError) and "x: expected >= 0, got -3" in str(results[2])
    assert calls[0] == [1, 2, -3, 4]  # one batch per key, then the failed batch input by input
    assert calls[1:5] == [[1], [2], [-3], [4]] and calls[5] == [5]


def test_work_stops_once_every_request_of_its_call_is_given_up_and_is_not_run_again():
    """A call on the model thread asks :meth:`Batcher.abandoned` between its steps: still False while one of its two
    requests waits for it, True once both are cancelled (their clients went away); the :class:`Abandoned` it then
    raises is not run again input by input."""
    calls, seen, ended = [], [], threading.Event()
    batcher = Batcher("t", lambda key, payloads: run(payloads), ThreadPoolExecutor(1), Metrics(), max_batch_size=8,
                      timeout_s=0.05)  # fmt: skip

    def run(payloads):
        calls.append(list(payloads))
        try:
            for _ in range(2000):  # 20 s of steps unless abandoned
                seen.append(batcher.abandoned())
                if seen[-1]:
                    raise Abandoned("t: every request went away")
                time.sleep(0.01)
            return list(payloads)
        finally:
            ended.set()

    async def main() -> float:
        batcher.start()
        first, second = (asyncio.ensure_future(batcher.submit(p)) for p in (1, 2))
        await asyncio.sleep(0.2)
        first.cancel()
        await asyncio.sleep(0.2)
        assert not ended.is_set()  # the second request still waits for the call
        start = time.perf_counter()
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, ended.wait, 30)
        stopped = time.perf_counter() - start
        await batcher.stop()
        return stopped

    stopped = asyncio.run(main())
    assert calls == [[1, 2]] and seen[-1] and not any(seen[:-1])  # one call, not run again input by input
    assert stopped < 5, f"the call went on {stopped:.1f} s after its requests were given up"


def test_a_transcription_stops_between_windows_when_asked(digits, long_file):
    """``Engine.transcribe(stop=...)``: the long-form path asks ``stop`` after each window and ends there."""
    from mmformer.serve.engine import Engine

    _, wave, expected = long_file
    engine, asked = Engine(digits, MODEL), []
    (full,) = engine.transcribe((None, 0.0, False, None), [wave], stop=lambda: asked.append(1) and False)
    assert full["text"] == expected["text"] and len(asked) >= len(expected["segments"]) > 1
    asked.clear()
    with pytest.raises(Abandoned):
        engine.transcribe((None, 0.0, False, None), [wave], stop=lambda: asked.append(1) or True)
    assert len(asked) == 1  # the first window, not the rest


# ---------------------------------------------------------------------------------------------- the command
def test_serve_refuses_a_bad_or_busy_port_and_a_mistyped_folder_before_loading_the_model(capsys, monkeypatch):
    from mmformer.cli.main import main

    for port in ("99999", "-1", "http"):  # 99999 listened on 34463 (mod 65536) while the banner said 99999
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", "nowhere/at-all", "--port", port])
        expected = f"argument --port: expected a TCP port 0-65535 (0: any free one), got {port!r}"
        assert e.value.code == 2 and expected in capsys.readouterr().err
    with socket.socket() as busy:  # in use: refused before the model loads (this one does not exist)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port, start = busy.getsockname()[1], time.perf_counter()
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", "nowhere/at-all", "--port", str(port)])
    expected = f"mmformer serve: error: --port: cannot listen on 127.0.0.1:{port}: the port is in use (another server?)"
    assert str(e.value) == expected
    assert time.perf_counter() - start < 2 and "mmformer serve:" not in capsys.readouterr().out  # no banner
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as e:  # a typo of data/digits_model, not a Hub id 'data/digits_modelx'
        main(["serve", "--model", "data/digits_modelx", "--port", "0"])
    assert str(e.value).startswith(
        "mmformer serve: error: name_or_path: no such folder 'data/digits_modelx' (the folder 'data' "
        "has no 'digits_modelx'), and no Hugging Face Hub model of that name could be loaded"
    ), e.value


# ---------------------------------------------------------------------------------------------- OpenAI routes
def test_models_health_and_page(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("whisper-1")
    health = httpx.get(server + "/health").json()
    assert health["routes"] == ["/v1/embeddings", "/v1/audio/transcriptions", "/v1/classify", "/v1/captions"]
    assert health["modalities"] == ["image", "audio", "text"]
    # idle: the probes do not count themselves (/metrics said 1)
    assert health["in_flight"] == 0 == metric(httpx.get(server + "/metrics").text, "mmformer_requests_in_flight")
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server}/static/{name}").status_code == 200
    assert "https://" not in page.text + httpx.get(server + "/static/app.js").text  # nothing from a CDN


def test_text_embeddings_float_and_base64_equal_encode_text(client, digits):
    texts = ["four two nine", "one", "seven seven seven three"]
    batch = digits.processor(text=texts)
    with torch.no_grad():
        expected = [digits.encode_text(**{k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(len(texts))]
    for fmt in ("float", "base64"):
        response = client.embeddings.create(model=MODEL, input=texts, encoding_format=fmt)
        got = response.data
        if fmt == "base64":  # the client hands base64 back as the string it received
            got = [np.frombuffer(base64.b64decode(d.embedding), dtype=np.float32) for d in got]
        else:
            got = [np.asarray(d.embedding, dtype=np.float32) for d in got]
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e.numpy(), rtol=0, atol=1e-5)
        assert response.usage.prompt_tokens == sum(len(digits.processor.tokenizer.encode(t)) for t in texts)
    default = client.embeddings.create(model=MODEL, input="one")  # the client asks for base64 and decodes it
    np.testing.assert_allclose(default.data[0].embedding, expected[1].numpy(), atol=1e-5)


def test_image_and_audio_embeddings(server, digits, padding_leaks):
    rows = test_samples(3)
    items = [{"image": b64(DIGITS / r["image"])} for r in rows] + [{"audio": b64(DIGITS / r["audio_filepath"])}
                                                                  for r in rows]  # fmt: skip
    items[1] = {"image": "data:image/png;base64," + items[1]["image"]}  # a data URL works too
    body = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": items}, headers=auth(), timeout=60)
    assert body.status_code == 200, body.text
    got = torch.tensor([d["embedding"] for d in body.json()["data"]])
    with torch.no_grad():
        images = [digits.encode_image(digits.processor.load_image(str(DIGITS / r["image"]))[None])[0] for r in rows]
        audio = [digits.processor.load_audio(str(DIGITS / r["audio_filepath"])) for r in rows]
        sounds = [digits.encode_audio(a[None], torch.tensor([a.shape[-1]]))[0] for a in audio]
    for i in range(3):
        torch.testing.assert_close(got[i], images[i], rtol=0, atol=1e-5)
    for i, item in enumerate(items[3:]):  # each clip alone in its request (and batch): exactly the library's
        alone = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": [item]}, headers=auth())
        torch.testing.assert_close(torch.tensor(alone.json()["data"][0]["embedding"]), sounds[i], rtol=0, atol=1e-5)
    close = [bool((got[3 + i] - sounds[i]).abs().max() <= 1e-5) for i in range(3)]
    same_as_alone(close, [True] * 3, padding_leaks, "audio embeddings (within 1e-5)")


def test_transcriptions_in_every_format_and_streamed(client, digits):
    import srt
    import webvtt

    row = test_samples(3)[2]
    path = DIGITS / row["audio_filepath"]
    expected = digits.transcribe([str(path)])[0]
    duration = digits.processor.load_audio(str(path)).shape[-1] / 16000

    def create(**kw):
        with open(path, "rb") as f:
            return client.audio.transcriptions.create(model=MODEL, file=f, **kw)

    assert create().text == expected
    assert create(response_format="text").strip() == expected
    verbose = create(response_format="verbose_json", timestamp_granularities=["segment"])
    assert verbose.text == expected and verbose.duration == pytest.approx(duration, abs=1e-3)
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, pytest.approx(duration, abs=1e-3), expected)]
    # OpenAI's segment fields: the zlib ratio openai-whisper computes; no log-probs from generate, no no-speech token
    data = expected.encode()
    (segment,) = create(response_format="verbose_json").model_dump()["segments"]
    assert segment["compression_ratio"] == len(data) / len(zlib.compress(data))
    assert segment["avg_logprob"] is None and segment["no_speech_prob"] is None and verbose.language is None
    (cue,) = list(srt.parse(create(response_format="srt")))
    assert cue.content == expected and cue.start.total_seconds() == 0
    assert cue.end.total_seconds() == pytest.approx(duration, abs=1e-3)
    (caption,) = webvtt.from_string(create(response_format="vtt")).captions
    assert caption.text == expected and caption.start_in_seconds == 0
    h, m, s = caption.end.split(":")
    assert int(h) * 3600 + int(m) * 60 + float(s) == pytest.approx(duration, abs=1e-3)
    events = list(create(stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert "".join(deltas) == done.text == expected and events[-1] is done


def test_classify_equals_zero_shot_classifier_and_captions_equal_model_caption(server, digits):
    rows = test_samples(4)
    labels, templates = WORDS, ["{}", "the digit {}"]
    for kind, field in (("image", "image"), ("audio", "audio_filepath")):
        paths = [str(DIGITS / r[field]) for r in rows]
        clf = ZeroShotClassifier(digits, digits.processor, classnames=labels, templates=templates, modality=kind)
        expected = clf.predict_proba(paths)
        items = [{kind: b64(Path(p))} for p in paths]
        body = {"model": MODEL, "labels": labels, "templates": templates, "input": items}
        answer = httpx.post(server + "/v1/classify", json=body, headers=auth(), timeout=60)
        assert answer.status_code == 200, answer.text
        got = torch.tensor([d["scores"] for d in answer.json()["data"]])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert [d["label"] for d in answer.json()["data"]] == clf.predict(paths)
    paths = [str(DIGITS / r["image"]) for r in rows]
    body = {"model": MODEL, "input": [{"image": b64(Path(p))} for p in paths]}
    answer = httpx.post(server + "/v1/captions", json=body, headers=auth(), timeout=60)
    assert [d["caption"] for d in answer.json()["data"]] == digits.caption(paths)


def test_64_concurrent_transcriptions_are_batched_and_equal_one_by_one(server, digits, padding_leaks):
    rows = test_samples(64)
    paths = [DIGITS / r["audio_filepath"] for r in rows]
    alone = [digits.transcribe([str(p)])[0] for p in paths]
    before = httpx.get(server + "/metrics").text

    def post(path: Path) -> httpx.Response:
        files = {"file": (path.name, path.read_bytes(), "audio/flac")}
        return httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL}, files=files, headers=auth(),
                          timeout=300)  # fmt: skip

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(post, paths))
    assert [a.status_code for a in answers] == [200] * 64
    got = [a.json()["text"] for a in answers]
    after = httpx.get(server + "/metrics").text
    route = "audio/transcriptions"

    def batches(text: str, le: str) -> float:
        try:
            return metric(text, "mmformer_batch_size_bucket", route=route, le=le)
        except KeyError:
            return 0.0

    multi = (batches(after, "+Inf") - batches(after, "1")) - (batches(before, "+Inf") - batches(before, "1"))
    assert multi >= 1, "no transcription batch held more than one request"
    calls = batches(after, "+Inf") - batches(before, "+Inf")
    differ = sum(g != e for g, e in zip(got, alone))
    print(f"64 concurrent transcriptions: {int(calls)} model calls, {int(multi)} with more than one request; "
          f"{differ} differ from one-by-one")  # fmt: skip
    assert calls < 64
    same_as_alone(got, alone, padding_leaks, "transcripts")


def whisper_and_speech(tmp_path: Path, seed: int, seconds: float) -> tuple[Path, object, Path]:
    """A random openai-whisper checkpoint converted and saved (its folder and the loaded model), and ``seconds`` of
    digits speech written as a 16 kHz WAV."""
    import soundfile

    pytest.importorskip("whisper")
    from test_longform_whisper import digits_speech
    from test_openai_whisper_convert import random_whisper, save_pt

    from mmformer.convert.openai_whisper import from_openai_whisper

    folder = tmp_path / "whisper"
    from_openai_whisper(save_pt(random_whisper(seed=seed), tmp_path / "random.pt")).save_pretrained(folder)
    audio = tmp_path / "speech.wav"
    soundfile.write(audio, digits_speech(seconds), 16000)
    return folder, mmformer.load_pretrained(str(folder)), audio


def test_a_whisper_checkpoint_answers_with_word_timestamps_and_a_prompt_as_transcribe_files(tmp_path):
    """A Whisper checkpoint (openai-whisper's random weights, converted): ``timestamp_granularities[]=word`` and
    ``prompt`` reach openai-whisper's algorithm (word alignment, the previous-text prompt) — the answer is
    :func:`mmformer.longform.transcribe_files`'s with those options, words and times included."""
    from mmformer.longform import transcribe_files
    from mmformer.longform.options import TranscribeOptions

    folder, model, audio = whisper_and_speech(tmp_path, seed=0, seconds=8.0)
    prompt = "seven eight nine"

    def library(**kw) -> dict:
        options = TranscribeOptions(temperature=0.0, language="en", **kw)
        (result,) = transcribe_files(model, [str(audio)], options)
        return result

    expected, unprompted = library(word_timestamps=True, initial_prompt=prompt), library(word_timestamps=True)
    assert expected["text"] != unprompted["text"]  # the prompt changes this model's answer: it must reach it
    words = [(w["word"], w["start"], w["end"]) for s in expected["segments"] for w in s["words"]]
    assert words, "the model said no words: nothing to compare"
    with running_server(str(folder)) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        with open(audio, "rb") as f:
            verbose = client.audio.transcriptions.create(
                model=str(folder), file=f, language="en", prompt=prompt, temperature=0.0,
                response_format="verbose_json", timestamp_granularities=["word", "segment"],
            )  # fmt: skip
        with open(audio, "rb") as f:  # the code in any case, as the server's check reads it ("EN" was a late 400)
            shouted = client.audio.transcriptions.create(
                model=str(folder), file=f, language="EN", prompt=prompt, temperature=0.0,
                response_format="verbose_json", timestamp_granularities=["word"],
            )  # fmt: skip
        with open(audio, "rb") as f:  # streamed: the deltas put together are the text, as OpenAI's are
            events = list(client.audio.transcriptions.create(model=str(folder), file=f, language="en", prompt=prompt,
                                                             temperature=0.0, stream=True))  # fmt: skip
        r = httpx.post(url + "/v1/audio/transcriptions", data={"model": str(folder), "language": "xx"},
                       files={"file": ("a.flac", audio.read_bytes())}, timeout=120)  # fmt: skip
    assert verbose.text == expected["text"] == shouted.text and verbose.language == "english"  # OpenAI's name
    assert [(w.word, w.start, w.end) for w in verbose.words] == words
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [
        (s["start"], s["end"], s["text"]) for s in expected["segments"]
    ]
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == events[-1].text, (deltas, events[-1].text)
    assert r.status_code == 400 and r.json()["error"]["param"] == "language", r.text  # not a code of this checkpoint
    assert r.json()["error"]["message"].startswith("language: expected one of this checkpoint's codes [")  # once


@pytest.mark.slow  # quantizes twice (here and in the server), and the server compiles the encoder: ~20 s
def test_int8_serving_transcribes_as_transcribe_files_with_the_int8_encoder(tmp_path):
    """``serve --compute-type int8``: a Whisper checkpoint's transcriptions run its PT2E int8 audio encoder (what
    ``transcribe --compute-type int8`` runs): the answer is transcribe_files' of that int8 model; a model trained
    here is refused at start. (This process runs the int8 graph uncompiled, its reference graph, which the server's
    compiled graph answers within float rounding — avg_logprob 1.5e-7 apart relatively, measured — so that the
    graph is compiled once, in the server.)"""
    from mmformer.compress import pt2e
    from mmformer.longform import transcribe_files
    from mmformer.serve.server import load_engine

    folder, model, audio = whisper_and_speech(tmp_path, seed=2, seconds=6.0)
    int8 = pt2e.quantize(model, "dynamic", towers=["audio"], compile=False)
    options = mmformer.longform.TranscribeOptions(temperature=0.0, language="en")
    (expected,) = transcribe_files(int8, [str(audio)], options)
    (float32,) = transcribe_files(model, [str(audio)], options)
    with running_server(str(folder), "--compute-type", "int8", startup_s=240) as (url, proc):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=240)
        with open(audio, "rb") as f:
            verbose = client.audio.transcriptions.create(model=str(folder), file=f, language="en", temperature=0.0,
                                                         response_format="verbose_json")  # fmt: skip

    def scores(segments) -> list[float]:  # the encoder's precision shows in them even where the texts agree
        return [s["avg_logprob"] if isinstance(s, dict) else s.avg_logprob for s in segments]

    assert scores(expected["segments"]) != scores(float32["segments"])  # so the check below can tell them apart
    assert verbose.text == expected["text"]
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [
        (s["start"], s["end"], s["text"]) for s in expected["segments"]
    ]
    served, int8_scores = scores(verbose.segments), scores(expected["segments"])
    float_scores = scores(float32["segments"])
    assert served == pytest.approx(int8_scores, rel=1e-5)
    if len(int8_scores) == len(float_scores):  # and nearer the int8 encoder's than float32's: rel=1e-5 alone is about
        # the size of their gap (1.2e-5 relatively, measured), where the compiled graph answers within 1.5e-7
        gap = max(abs(a - b) for a, b in zip(int8_scores, float_scores))
        assert max(abs(a - b) for a, b in zip(served, int8_scores)) < gap / 2, (served, int8_scores, float_scores)
    with pytest.raises(ValueError, match=r"--compute-type int8: another audio encoder runs only under a Whisper"):
        load_engine(MODEL, compute_type="int8")


def test_bf16_serving_transcribes_as_transcribe_files_with_the_bf16_encoder(tmp_path):
    """``serve --compute-type bfloat16`` (``auto`` where the CPU has AMX): transcriptions read the audio encoder
    under bf16 autocast, as ``transcribe_files(..., bf16_encoder=True)``; the engine's batched call answers that."""
    from mmformer.longform import transcribe_files
    from mmformer.serve.server import load_engine

    folder, model, audio = whisper_and_speech(tmp_path, seed=2, seconds=6.0)
    engine = load_engine(str(folder), compute_type="bfloat16")
    assert engine.bf16_encoder and engine.compute.startswith("bf16 autocast on")
    wave = engine.load_recording(audio.read_bytes(), "file")
    options = mmformer.longform.TranscribeOptions(temperature=0.0, language="en")
    (expected,) = transcribe_files(model, [wave], options, bf16_encoder=True)
    (float32,) = transcribe_files(model, [wave], options)
    (got,) = engine.transcribe(("en", 0.0, False, None), [wave])
    scores = [[s["avg_logprob"] for s in r["segments"]] for r in (got, expected, float32)]
    assert got["text"] == expected["text"] and scores[0] == scores[1] != scores[2]
    with pytest.raises(ValueError, match=r"--compute-type: expected one of"):
        load_engine(str(folder), compute_type="fp8")


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_get_their_status_and_error_json_and_the_server_keeps_serving(server, client):
    good = {"model": MODEL, "input": "one two"}

    def ok() -> None:
        assert httpx.post(server + "/v1/embeddings", json=good, headers=auth()).status_code == 200

    def error(response: httpx.Response, status: int, param: str | None, text: str) -> None:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
        assert text in body["message"], body["message"]
        ok()

    garbage = base64.b64encode(b"this is not a picture").decode()
    r = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": [{"image": garbage}]}, headers=auth())
    error(r, 400, "input[0].image", "input[0].image")
    r = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": [{"image": "%%%"}]}, headers=auth())
    error(r, 400, "input[0].image", "not base64")
    r = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": [{"image": ""}]}, headers=auth())
    error(r, 400, "input[0].image", "got an empty string")
    png = (DIGITS / test_samples(1)[0]["image"]).read_bytes()
    wrapped = base64.encodebytes(png).decode()  # base64's own line breaks, every 76 characters
    r = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": [{"image": wrapped}]}, headers=auth())
    assert r.status_code == 200, r.text
    # texts: the failing input named, with its own length (the model's batch named text[0] and a truncated count)
    for text, message in (("\ud800", "unpaired surrogate"), ("two " * 15, "tokens; this model reads at most 16"),
                          ("x" * 100_000, "100,000 characters")):  # fmt: skip
        body = json.dumps({"model": MODEL, "input": ["two", "seven", text]})  # ASCII: a lone surrogate as \ud800
        r = httpx.post(server + "/v1/embeddings", content=body, headers={**auth(), "Content-Type": "application/json"})
        error(r, 400, "input[2]", message)
    for dimensions in (8, -1, "x"):  # these embeddings are not trained to be cut short
        r = httpx.post(server + "/v1/embeddings", json={**good, "dimensions": dimensions}, headers=auth())
        error(r, 400, "dimensions", "cannot be shortened")
    assert httpx.post(server + "/v1/embeddings", json={**good, "dimensions": 128}, headers=auth()).status_code == 200
    # the key before the body: a malformed body without it is a 401; the scheme in any case
    r = httpx.post(server + "/v1/embeddings", content=b"garbage", headers={"Content-Type": "application/json"})
    error(r, 401, None, "Authorization")
    assert httpx.post(server + "/v1/embeddings", json=good, headers={"Authorization": f"bearer {KEY}"}).is_success
    files = {"file": ("broken.flac", b"fLaC-but-not-really", "audio/flac")}
    r = httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL}, files=files, headers=auth())
    error(r, 400, "file", "broken.flac")
    assert "object at 0x" not in r.json()["error"]["message"]  # soundfile's name for in-memory data: not the user's
    clip = {"file": ("clip.flac", (DIGITS / test_samples(1)[0]["audio_filepath"]).read_bytes(), "audio/flac")}
    words = {"model": MODEL, "response_format": "verbose_json", "timestamp_granularities[]": "word"}
    r = httpx.post(server + "/v1/audio/transcriptions", data=words, files=clip, headers=auth())
    error(r, 400, "timestamp_granularities[]", "need a Whisper checkpoint")  # this model has no alignment heads
    r = httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL, "prompt": "one"}, files=clip,
                   headers=auth())  # fmt: skip
    error(r, 400, "prompt", "needs a Whisper checkpoint")
    for stream in ("false", "true"):  # a language this model has no token for: named, before any decoding
        r = httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL, "language": "en", "stream": stream},
                       files=clip, headers=auth())  # fmt: skip
        error(r, 400, "language", "no language tokens")
        assert r.json()["error"]["message"].startswith("language: this model has no language tokens")  # once
    for fmt in ("json", "text", "srt"):  # as OpenAI: timestamp granularities only with verbose_json
        r = httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL, "response_format": fmt,
                       "timestamp_granularities[]": "segment"}, files=clip, headers=auth())  # fmt: skip
        error(r, 400, "timestamp_granularities[]", f"only with response_format 'verbose_json', got '{fmt}'")
    # model is required, as in OpenAI's API
    error(httpx.post(server + "/v1/embeddings", json={"input": "one"}, headers=auth()), 400, "model", "required")
    r = httpx.post(server + "/v1/audio/transcriptions", files=clip, headers=auth())
    error(r, 400, "model", f"required (OpenAI's API requires it): expected {MODEL!r}")
    r = httpx.post(server + "/v1/embeddings", json={**good, "model": "gpt-4"}, headers=auth())
    error(r, 404, "model", "'gpt-4'")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="whisper-1", input="one")
    r = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "one"}, headers=auth())
    error(r, 400, "model", "/v1/audio/transcriptions")  # the routes it does serve are listed
    error(httpx.post(server + "/v1/embeddings", json=good), 401, None, "no Authorization header")
    error(httpx.get(server + "/v1/models/" + MODEL), 401, None, "no Authorization header")  # every /v1 route
    clip = {"file": ("clip.flac", b"not read", "audio/flac")}
    error(httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL}, files=clip), 401, None, "no Author")
    r = httpx.post(server + "/v1/embeddings", json=good, headers={"Authorization": "Bearer nope"})
    error(r, 401, None, "a wrong key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(server + "/v1/embeddings", json={**good, "encoding_format": "int8"}, headers=auth())
    error(r, 400, "encoding_format", "'int8'")
    big = {"file": ("big.flac", os.urandom(9 * 2**20), "audio/flac")}  # over --max-upload-mb 8
    error(httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL}, files=big, headers=auth()), 413,
          None, "at most 8 MB")  # fmt: skip
    chunks = (b"x" * 2**18 for _ in range(36))  # 9 MB without a Content-Length (chunked): cut off at the limit
    r = httpx.post(server + "/v1/embeddings", content=chunks, headers={**auth(), "Content-Type": "application/json"})
    error(r, 413, None, "at most 8 MB")
    # 413 from the Content-Length alone: the server answers before any of the claimed 100 MB is sent
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Authorization: Bearer {KEY}\r\nContent-Length: {100 * 2**20}\r\n\r\n".encode())  # fmt: skip
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head
    ok()


def test_a_corrupt_file_among_concurrent_requests_fails_alone(server, digits, padding_leaks):
    rows = test_samples(8)
    uploads = [(r["audio_filepath"], (DIGITS / r["audio_filepath"]).read_bytes()) for r in rows]
    uploads.insert(3, ("corrupt.wav", b"RIFF\x00\x00\x00\x00WAVEfmt garbage"))

    def post(upload):
        files = {"file": (Path(upload[0]).name, upload[1], "application/octet-stream")}
        return httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL, "response_format": "text"},
                          files=files, headers=auth(), timeout=120)  # fmt: skip

    with ThreadPoolExecutor(len(uploads)) as pool:
        answers = list(pool.map(post, uploads))
    assert answers[3].status_code == 400 and "corrupt.wav" in answers[3].json()["error"]["message"]
    good = answers[:3] + answers[4:]
    assert [a.status_code for a in good] == [200] * 8
    alone = [digits.transcribe([str(DIGITS / r["audio_filepath"])])[0] for r in rows]
    same_as_alone([a.text.strip() for a in good], alone, padding_leaks, "transcripts")


# ---------------------------------------------------------------------------------------------- a language model
@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    from tests.test_text_generation import language_model

    texts = ["the cat sat on the mat.", "a dog ran in the park!", "once upon a time there was a king.\n"] * 4
    tokenizer = Tokenizer.train(texts, vocab_size=300, max_length=48)
    torch.manual_seed(0)
    model = language_model("rope-gqa", vocab_size=tokenizer.vocab_size)
    path = tmp_path_factory.mktemp("serve") / "lm"
    model.save_pretrained(path, processor=Processor(tokenizer))
    return path


def test_completions_equal_model_complete_streamed_or_not(lm_dir):
    model = mmformer.load_pretrained(str(lm_dir))
    prompts = ["the cat", "once upon a time", "a dog ran"]
    expected = model.complete(prompts, max_new_tokens=10, do_sample=False)
    stopped = model.complete(prompts, max_new_tokens=10, do_sample=False, stop_strings=["a"])
    with running_server(str(lm_dir)) as (url, proc):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        answer = client.completions.create(model=str(lm_dir), prompt=prompts, max_tokens=10, temperature=0)
        assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == expected
        assert answer.usage.completion_tokens > 0 and answer.object == "text_completion"
        answer = client.completions.create(model=str(lm_dir), prompt=prompts, max_tokens=10, temperature=0, stop="a")
        assert [c.text for c in answer.choices] == stopped
        pieces: dict[int, str] = {}
        finished = {}
        for chunk in client.completions.create(model=str(lm_dir), prompt=prompts, max_tokens=10, temperature=0,
                                               stream=True):  # fmt: skip
            for c in chunk.choices:
                pieces[c.index] = pieces.get(c.index, "") + c.text
                if c.finish_reason:
                    finished[c.index] = c.finish_reason
        assert [pieces[i] for i in range(3)] == expected and set(finished) == {0, 1, 2}
        files = {"file": ("a.flac", (DIGITS / test_samples(1)[0]["audio_filepath"]).read_bytes(), "audio/flac")}
        r = httpx.post(url + "/v1/audio/transcriptions", data={"model": str(lm_dir)}, files=files)
        assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]


@pytest.mark.slow
def test_sigterm_lets_the_requests_in_flight_finish(lm_dir):
    """One input per model call (--max-batch-size 1) keeps 32 requests in flight long enough to signal the server
    while it holds them all; every one is answered, then the process exits."""
    prompts = ["the cat", "once upon a time", "a dog ran", "the park"]
    body = {"model": str(lm_dir), "prompt": prompts, "max_tokens": 40, "temperature": 0}

    async def load(url: str, proc: subprocess.Popen) -> tuple[int, list]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            jobs = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(32)]
            in_flight, deadline = 0, time.monotonic() + 30
            while in_flight < 32 and time.monotonic() < deadline and not all(j.done() for j in jobs):
                in_flight = (await client.get("/health")).json()["in_flight"]
            proc.send_signal(signal.SIGTERM)
            return in_flight, await asyncio.gather(*jobs, return_exceptions=True)

    with running_server(str(lm_dir), "--max-batch-size", "1") as (url, proc):
        in_flight, answers = asyncio.run(load(url, proc))
        returncode = proc.wait(timeout=60)
    assert in_flight == 32, f"only {in_flight} of 32 requests were in the server when it was signalled"
    assert [getattr(a, "status_code", a) for a in answers] == [200] * 32
    assert returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained


@pytest.fixture(scope="module")
def long_file(digits, tmp_path_factory) -> tuple[Path, torch.Tensor, dict]:
    """A recording longer than the model's window (and than the processor's max_seconds) as FLAC, its waveform as
    the server reads it back, and its long-form transcript."""
    import soundfile

    from mmformer.generation.options import DecodingOptions
    from mmformer.longform import transcribe_files
    from tests.test_streaming import long_recording

    path = tmp_path_factory.mktemp("long") / "long.flac"
    soundfile.write(path, long_recording(digits).numpy(), digits.config.audio.sample_rate)
    wave = torch.from_numpy(soundfile.read(path, dtype="float32")[0])
    (expected,) = transcribe_files(digits, [wave], DecodingOptions(do_sample=False))
    return path, wave, expected


def test_a_recording_longer_than_the_model_window_goes_through_the_long_form_path(server, digits, long_file):
    path, wave, expected = long_file
    rate = digits.config.audio.sample_rate
    files = {"file": ("long.flac", path.read_bytes(), "audio/flac")}
    data = {"model": MODEL, "response_format": "verbose_json"}
    answer = httpx.post(server + "/v1/audio/transcriptions", data=data, files=files, headers=auth(), timeout=300)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["duration"] == pytest.approx(wave.shape[0] / rate, abs=1e-3)
    assert len(body["segments"]) == len(expected["segments"]) > 1
    assert [(s["start"], s["end"], s["text"]) for s in body["segments"]] == [
        (s["start"], s["end"], s["text"]) for s in expected["segments"]
    ]
    assert body["segments"][-1]["end"] > 16


def test_a_client_that_goes_away_stops_its_non_streamed_transcription(server, digits):
    """A non-streamed transcription of a 21-minute recording whose client gives up after a second (a client's
    timeout; the openai client would then send it again): the request ends as a 499, not a 200, and its model call
    stops at its next window, so that a one-word embeddings request sent next waits a fraction of what it waits
    behind the same transcription whose client stays (13-21 s behind a 21-minute one until fixed)."""
    import soundfile

    from tests.test_streaming import long_recording

    buffer = io.BytesIO()  # 4.3 minutes of digits five times: 21.5 minutes, 6.4 MB
    soundfile.write(
        buffer, long_recording(digits, n_clips=100).repeat(5).numpy(), digits.config.audio.sample_rate, format="FLAC"
    )
    files = {"file": ("long.flac", buffer.getvalue(), "audio/flac")}

    def transcribe(read_timeout: float) -> httpx.Response:
        return httpx.post(server + "/v1/audio/transcriptions", data={"model": MODEL}, files=files, headers=auth(),
                          timeout=httpx.Timeout(120, read=read_timeout))  # fmt: skip

    def embeddings_wait() -> float:
        start = time.perf_counter()
        answer = httpx.post(server + "/v1/embeddings", json={"model": MODEL, "input": "one"}, headers=auth(),
                            timeout=120)  # fmt: skip
        assert answer.status_code == 200
        return time.perf_counter() - start

    def requests_total(status: str) -> float:
        text = httpx.get(server + "/metrics").text
        try:
            return metric(text, "mmformer_requests_total", route="/v1/audio/transcriptions", status=status)
        except KeyError:
            return 0.0

    with ThreadPoolExecutor(1) as pool:  # its client stays: the embeddings wait for the whole transcription
        kept = pool.submit(transcribe, 120)
        time.sleep(1.5)
        behind_kept = embeddings_wait()
        assert kept.result().status_code == 200
    closed = requests_total("499")
    with pytest.raises(httpx.ReadTimeout):  # the client leaves after a second without an answer
        transcribe(1.0)
    behind_abandoned = embeddings_wait()
    print(f"embeddings behind a 21-minute transcription: {behind_kept:.2f} s; behind the same one abandoned: "
          f"{behind_abandoned:.2f} s")  # fmt: skip
    assert behind_abandoned < behind_kept / 2, "the model went on with the abandoned transcription"
    assert requests_total("499") == closed + 1


# ---------------------------------------------------------------------------------------------- real streams
def test_a_streamed_transcription_sends_each_segment_as_it_is_decoded(client, long_file):
    """The official client's stream of a long recording: a delta per long-form segment, the first long before the
    end, concatenating to the done event's text and the non-streamed transcript."""
    path, _, expected = long_file
    with open(path, "rb") as f:
        assert client.audio.transcriptions.create(model=MODEL, file=f).text == expected["text"]
    arrivals = []
    start = time.perf_counter()
    with open(path, "rb") as f:
        for event in client.audio.transcriptions.create(model=MODEL, file=f, stream=True):
            arrivals.append((time.perf_counter() - start, event))
    deltas = [(t, e.delta) for t, e in arrivals if e.type == "transcript.text.delta"]
    end, done = arrivals[-1]
    assert done.type == "transcript.text.done" and len(deltas) == len(expected["segments"]) > 1
    assert "".join(d for _, d in deltas) == done.text == expected["text"]
    # streamed, not sent at once at the end: the first delta came before most of the decoding was done
    assert deltas[0][0] < 0.8 * end, [t for t, _ in arrivals]  # here ~0.45: reading, VAD, then 24 windows


@pytest.fixture(scope="module")
def endless_lm(tmp_path_factory) -> Iterator[tuple[str, str, object]]:
    """A random LM that never ends a text by itself (its end-of-text logit is 0 against unit-variance others) and
    takes RoPE positions (no length limit but max_tokens), served; (url, model dir, model)."""
    from tests.test_text_generation import language_model

    texts = ["the cat sat on the mat.", "a dog ran in the park!", "once upon a time there was a king.\n"] * 4
    tokenizer = Tokenizer.train(texts, vocab_size=300, max_length=48)
    torch.manual_seed(1)
    model = language_model("rope-gqa", vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] = 0
    path = tmp_path_factory.mktemp("serve") / "endless"
    model.save_pretrained(path, processor=Processor(tokenizer))
    model = mmformer.load_pretrained(str(path))
    with running_server(str(path)) as (url, _):
        yield url, str(path), model


N_STREAMED = 100  # tokens whose text is checked piece by piece
N_TIMED = 1500  # tokens of the stream whose first piece is timed: ~1.3 s of decoding here


def test_a_streamed_completion_sends_pieces_while_it_is_decoded(endless_lm):
    url, name, model = endless_lm
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    expected = model.complete("the cat", max_new_tokens=N_STREAMED, do_sample=False)[0]
    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]
    stopped = model.complete("the cat", max_new_tokens=N_STREAMED, do_sample=False, stop_strings=[stop])[0]
    assert stopped != expected  # the stop string really cuts the text
    for kw, text in (({}, expected), ({"stop": stop}, stopped)):
        answer = client.completions.create(model=name, prompt="the cat", max_tokens=N_STREAMED, temperature=0, **kw)
        assert answer.choices[0].text == text
        arrivals = streamed(client, name, N_STREAMED, **kw)
        pieces = [c.text for _, c in arrivals if c.text]
        last = arrivals[-1][1]
        assert "".join(pieces) == text and len(pieces) > 1
        assert last.finish_reason == ("length" if not kw else "stop") and last.text == ""
    # sent as decoded: the first piece long before the generation ended. A long stream (~1-2 s of decoding), so that
    # the tens of milliseconds a busy CPU may starve the HTTP process for (CI runs two test workers on two cores: a
    # 100-token stream arrived there in one burst at its end) cannot pass for "sent at the end"
    arrivals = streamed(client, name, N_TIMED)
    first = next(t for t, c in arrivals if c.text)
    assert first < 0.25 * arrivals[-1][0], (first, arrivals[-1][0])  # here ~0.01


def streamed(client, name: str, max_tokens: int, **kw) -> list[tuple[float, object]]:
    """Each chunk's choice of a streamed completion with the seconds since the request."""
    start, arrivals = time.perf_counter(), []
    for chunk in client.completions.create(model=name, prompt="the cat", max_tokens=max_tokens, temperature=0,
                                           stream=True, **kw):  # fmt: skip
        assert chunk.object == "text_completion" and len(chunk.choices) == 1
        arrivals.append((time.perf_counter() - start, chunk.choices[0]))
    return arrivals


def test_a_client_that_goes_away_stops_its_generation(endless_lm):
    """A stream of 4000 tokens read for one piece and closed: the server's model call ends (its batch count goes up)
    in less than twice the time 400 tokens take, and the server answers the next request."""
    url, name, _ = endless_lm

    def streamed_calls() -> float:
        return metric(httpx.get(url + "/metrics").text, "mmformer_batch_size_count", route="completions")

    start = time.perf_counter()  # a tenth of the stream's tokens, not streamed: how long a 10th of it takes at least
    body = {"model": name, "prompt": "the cat", "max_tokens": 400, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 200
    tenth = time.perf_counter() - start
    before = streamed_calls()
    body = {**body, "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break
    closed = time.perf_counter()
    while streamed_calls() == before:
        assert time.perf_counter() - closed < 60, "the generation went on after its client went away"
        time.sleep(0.02)
    stopped = time.perf_counter() - closed
    print(f"400 tokens took {tenth:.3f} s; the 4000-token stream stopped {stopped:.3f} s after its client left")
    assert stopped < 2 * tenth + 0.2  # all 4000 tokens would take over 10 tenths
    short = {"model": name, "prompt": "a dog", "max_tokens": 3, "temperature": 0}
    assert httpx.post(url + "/v1/completions", json=short, timeout=60).status_code == 200
