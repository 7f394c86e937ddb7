"""The server's app in this process (FastAPI's ``TestClient``, no server process): what ``/v1/completions`` reports
about the ids behind a completion — ``usage`` and ``finish_reason`` — equals what ``generate`` gives each prompt
decoded alone (a row alone is never padded: its generated ids are the row's columns); the transcription formats a
stream cannot carry, refused; recordings over ``--max-audio-seconds`` refused undecoded, and an empty upload refused
as the commands refuse an empty file."""

from __future__ import annotations

import io
import json

import httpx
import pytest
import soundfile as sf
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from mmformer.model import MultimodalTransformer  # noqa: E402
from mmformer.preprocess.media import SampleError  # noqa: E402
from mmformer.preprocess.processor import AudioProcessorConfig, Processor  # noqa: E402
from mmformer.preprocess.tokenizer import Tokenizer  # noqa: E402
from mmformer.serve.app import create_app  # noqa: E402
from mmformer.serve.engine import Engine  # noqa: E402
from tests.test_text_generation import language_model  # noqa: E402

TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "once upon a time there was a king.\n"] * 4
PROMPTS = ["the cat", "once upon a time", "a dog ran", "the", "a king"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served():
    """A random byte-level LM padded with its end-of-text (as Llama is: a row that a stop string ends in a batch is
    followed by end ids), its end-of-text made likelier so that some prompts end before ``MAX_TOKENS`` and others run
    to it; its random byte tokens include pieces of characters, which decode to U+FFFD."""
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300, max_length=48)
    torch.manual_seed(0)
    model = language_model("rope-gqa", vocab_size=tokenizer.vocab_size, pad_id=tokenizer.eos_id)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] *= 2
    model.processor = Processor(tokenizer)
    with TestClient(create_app(Engine(model, "lm"))) as client:
        yield client, model


def alone(model, prompt: str, stop: list[str]) -> tuple[list[int], list[int], str]:
    """(prompt ids, generated ids, finish_reason) of ``prompt`` decoded alone, greedily."""
    tokenizer = model.processor.tokenizer
    ids = tokenizer.encode(prompt)
    ids = ids[:-1] if ids[-1] == tokenizer.eos_id else ids  # complete continues the text, not its end
    row = model.generate(prompt_ids=[ids], max_new_tokens=MAX_TOKENS, stop_strings=stop)[0]
    generated = row[len(ids) :].tolist()
    ended = generated[-1] == tokenizer.eos_id or any(s in tokenizer.decode(generated) for s in stop)
    return ids, generated, "stop" if ended else "length"


def complete(client, prompts: list[str], **body) -> httpx.Response:
    request = {"model": "lm", "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0, **body}
    response = client.post("/v1/completions", json=request)
    assert response.status_code == 200, response.text
    return response


def test_completion_usage_and_finish_reason_count_the_generated_ids(served):
    """The usage counts the ids the prompts read and the model generated, and ``finish_reason`` is "length" where
    ``max_tokens`` cut a continuation. Before, both came from the text encoded again: a byte token that decodes to
    U+FFFD encodes as three, and an end-of-text before ``max_tokens`` read as "length" (issue 9 of the bug hunt)."""
    client, model = served
    tokenizer = model.processor.tokenizer
    answer = complete(client, PROMPTS).json()
    expected = [alone(model, p, []) for p in PROMPTS]
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    assert [c["finish_reason"] for c in choices] == [f for _, _, f in expected]
    prompt_tokens, generated = sum(len(p) for p, _, _ in expected), sum(len(g) for _, g, _ in expected)
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                               "total_tokens": prompt_tokens + generated}  # fmt: skip
    # the case this checks: texts that encode again to other counts, continuations that end and that are cut
    assert sum(len(tokenizer.encode(c["text"])) for c in choices) != generated
    assert {f for _, _, f in expected} == {"stop", "length"}


def test_a_continuation_ended_by_a_stop_string_in_a_batch_counts_its_own_ids(served):
    """A stop string ends one row of a batch while the others decode on: the end ids that pad it afterwards are not
    its tokens (counting to the first end id counted one more), and it finished with "stop"."""
    client, model = served
    text = complete(client, ["once upon a time"]).json()["choices"][0]["text"]
    stop = [text[3:5]]  # within the continuation: it ends this row early while the batch's others run on
    expected = [alone(model, p, stop) for p in PROMPTS]
    answer = complete(client, PROMPTS, stop=stop).json()
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    assert [c["finish_reason"] for c in choices] == [f for _, _, f in expected]
    assert answer["usage"]["completion_tokens"] == sum(len(g) for _, g, _ in expected)
    # decoded in one batch for certain (the app's batcher groups what arrives together, most likely all of them)
    batch = client.app.state.engine.complete((MAX_TOKENS, 0.0, None, tuple(stop)), PROMPTS)
    assert [c.ids for c in batch] == [g for _, g, _ in expected]
    assert [c.prompt_ids for c in batch] == [p for p, _, _ in expected]
    stopped = len(expected[1][1])
    assert stopped < max(len(g) for _, g, _ in expected) and expected[1][1][-1] != model.config.text.eos_id


def test_a_streamed_completion_finishes_as_its_ids_say(served):
    """Each streamed choice's last chunk carries the ``finish_reason`` of its ids, as the answer in one piece."""
    client, model = served
    expected = [alone(model, p, [])[2] for p in PROMPTS]
    finished = {}
    for line in complete(client, PROMPTS, stream=True).text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: ") :])["choices"]:
                if choice["finish_reason"] is not None:
                    finished[choice["index"]] = choice["finish_reason"]
    assert [finished[i] for i in range(len(PROMPTS))] == expected


def speech_model(make_model_config) -> MultimodalTransformer:
    """A random speech-to-text model: 8-kHz audio into a shared decoder."""
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300, max_length=16)
    model = MultimodalTransformer(make_model_config(image=None, text={"vocab_size": tokenizer.vocab_size})).eval()
    model.processor = Processor(tokenizer, audio=AudioProcessorConfig(sample_rate=8000))
    return model


def audio_file(seconds: float, fmt: str = "WAV") -> bytes:
    """Noise of ``seconds`` at 8 kHz, encoded."""
    upload = io.BytesIO()
    sf.write(upload, torch.randn(round(8000 * seconds)).mul(0.1).numpy(), 8000, format=fmt)
    return upload.getvalue()


@pytest.fixture
def transcriber(make_model_config):
    """The speech model, served, and a second of noise to upload."""
    with TestClient(create_app(Engine(speech_model(make_model_config), "asr"))) as client:
        yield client, audio_file(1.0)


def test_a_streamed_transcription_is_refused_in_a_format_its_text_deltas_cannot_carry(transcriber):
    """A stream is OpenAI's transcript.text.delta events: text only (OpenAI streams json). srt, vtt and verbose_json
    asked for with stream=true are a 400 naming response_format; before, the times were dropped and a 200 of text
    deltas came back (issue 2 of the bug hunt)."""
    client, wav = transcriber

    def post(**form) -> httpx.Response:
        data = {"model": "asr", "stream": "true", **form}
        return client.post("/v1/audio/transcriptions", data=data, files={"file": ("noise.wav", wav, "audio/wav")})

    for response_format in ("srt", "vtt", "verbose_json"):
        refused = post(response_format=response_format)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "response_format" and response_format in refused.text
    words = post(response_format="verbose_json", **{"timestamp_granularities[]": "segment"})
    assert words.status_code == 400 and words.json()["error"]["param"] == "response_format"
    for response_format in ("json", "text"):  # the text the deltas carry: streamed
        streamed = post(response_format=response_format)
        assert streamed.status_code == 200 and "transcript.text.done" in streamed.text, streamed.text


def transcribe(client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/audio/transcriptions", data={"model": "asr"}, files={"file": (name, data, "audio/wav")})


def test_a_recording_longer_than_max_audio_seconds_is_refused_decoded_no_further(make_model_config, monkeypatch):
    """A few hundred KB of FLAC silence can claim hours, and the server decoded all of it (1 h: 8.5 GB and 49 s of
    the model thread). Longer than ``--max-audio-seconds``: a 413 (as a body over ``--max-upload-mb``) naming the flag,
    its limit and the recording's length; one whose header leaves its length open (a streamed FLAC) is decoded only
    up to the limit, then refused alike."""
    app = create_app(Engine(speech_model(make_model_config), "asr"), max_audio_seconds=0.5)
    streamed = bytearray(audio_file(5.0, "FLAC"))
    streamed[18:26] = (int.from_bytes(streamed[18:26], "big") & ~(2**36 - 1)).to_bytes(8, "big")  # total samples: 0
    decoded = []
    read = sf.SoundFile.read

    def counted(self, *args, **kwargs):
        block = read(self, *args, **kwargs)
        decoded.append(len(block))
        return block

    monkeypatch.setattr(sf.SoundFile, "read", counted)
    with TestClient(app) as client:
        assert transcribe(client, "short.wav", audio_file(0.4)).status_code == 200
        refused = transcribe(client, "long.wav", audio_file(1.0))
        assert refused.status_code == 413, refused.text
        error = refused.json()["error"]
        assert error["message"].startswith("file (long.wav): audio longer than the server's --max-audio-seconds=0.5 ")
        assert "it holds 1.0 s" in error["message"] and (error["param"], error["code"]) == ("file", "audio_too_long")
        decoded.clear()
        refused = transcribe(client, "streamed.flac", bytes(streamed))
        assert refused.status_code == 413 and "decoding passed the limit" in refused.json()["error"]["message"]
        assert sum(decoded) <= 0.5 * 8000 + 1  # the limit and one frame: 4 more seconds never decoded


def test_an_empty_upload_is_refused_with_the_commands_message(transcriber, tmp_path):
    """A 0-byte upload got "cannot decode audio (LibsndfileError: Format not recognised.)" where the commands and the
    API say "empty file (0 bytes)": one check, for a path and for bytes."""
    client, _ = transcriber
    refused = transcribe(client, "empty.wav", b"")
    assert refused.status_code == 400, refused.text
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(SampleError) as error:
        Processor().load_audio(tmp_path / "empty.wav")
    assert (
        refused.json()["error"]["message"]
        == f"file (empty.wav): {error.value.reason}"
        == ("file (empty.wav): empty file (0 bytes)")
    )
