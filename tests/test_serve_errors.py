"""The server's answers to requests it cannot serve as asked: a 400 naming the field, before any work and before a
stream begins, and a bug's 500 that leaves the client's connection usable.

Found by a user loading the server: a JSON body nested 5,000 deep and a transcription whose ``temperature`` was a
file part were 500s with a traceback, and each 500 reset the kept-alive connection (the client's next request on it
failed); a completion's too-long prompt was named ``prompts[0]`` whichever it was, and was an error event in a 200
stream; ``max_tokens`` past the context was cut silently; ``logprobs``, ``echo``, ``seed`` and the rest of OpenAI's
fields were ignored. In this process: the app through FastAPI's ``TestClient`` (the ``openai`` client on it), and
uvicorn on a free port for the kept-alive connection.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from mmformer.generation.token_choice import row_generators  # noqa: E402
from mmformer.preprocess.processor import Processor  # noqa: E402
from mmformer.preprocess.tokenizer import Tokenizer  # noqa: E402
from mmformer.serve.app import create_app  # noqa: E402
from mmformer.serve.engine import Engine  # noqa: E402
from mmformer.serve.server import bind  # noqa: E402
from tests.test_serve_app import audio_file, speech_model  # noqa: E402
from tests.test_text_generation import language_model  # noqa: E402

TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "once upon a time there was a king.\n"] * 4
CONTEXT = 48
LONG = "the cat sat on the mat " * 30  # 182 tokens


@pytest.fixture(scope="module")
def lm():
    """A random LM with a learned position table of ``CONTEXT`` positions (decoding stops where it ends)."""
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300, max_length=CONTEXT)
    torch.manual_seed(0)
    model = language_model("learned", vocab_size=tokenizer.vocab_size)
    model.processor = Processor(tokenizer)
    return model


@pytest.fixture(scope="module")
def client(lm):
    with TestClient(create_app(Engine(lm, "lm"))) as client:
        yield client


def complete(client, **body):
    return client.post("/v1/completions", json={"model": "lm", "prompt": "the cat", "max_tokens": 4, **body})


def refused(response, param: str) -> str:
    """The message of a 400 naming ``param``."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    return error["message"]


def test_a_body_python_cannot_parse_is_a_400_naming_body(client):
    """JSON nested 5,000 deep (10 KB; json.loads raises RecursionError) and an integer of 5,000 digits (ValueError):
    400s naming ``body``, as a body that is not JSON is; both were 500s."""
    deep = b'{"model": "lm", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    digits = b'{"model": "lm", "prompt": "the cat", "max_tokens": ' + b"1" * 5000 + b"}"
    for body, why in ((deep, "nested too deeply"), (digits, "4300 digits")):
        response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert why in refused(response, "body")


def test_a_file_part_where_a_transcription_reads_a_value_is_a_400_naming_it(make_model_config):
    """Each form field the transcription route reads as text, sent as a file part: a 400 naming it (``temperature``:
    ``float(UploadFile)`` was a TypeError, a 500)."""
    wav = audio_file(0.3)
    fields = {"model": "asr", "response_format": "json", "timestamp_granularities[]": "segment", "prompt": "a",
              "temperature": "0.5", "stream": "false", "language": "en"}  # fmt: skip
    with TestClient(create_app(Engine(speech_model(make_model_config), "asr"))) as client:
        for name, value in fields.items():
            data = {"model": "asr"} if name != "model" else {}
            files = {"file": ("a.wav", wav, "audio/wav"), name: ("t.txt", value.encode(), "text/plain")}
            response = client.post("/v1/audio/transcriptions", data=data, files=files)
            assert refused(response, name) == f"{name}: expected a value, got a file part (t.txt)"
        assert client.post("/v1/audio/transcriptions", data={"model": "asr", "temperature": "0.5"},
                           files={"file": ("a.wav", wav, "audio/wav")}).status_code == 200  # fmt: skip


def test_a_bug_is_a_500_after_which_the_kept_alive_connection_serves_the_next_request(lm, caplog):
    """An unexpected exception in a handler is answered inside the app: OpenAI's 500 JSON naming a request id, one
    log line with that id, the route and where it was raised, and the connection stays open. Answered by Starlette's
    catch-all, the exception was raised again and uvicorn closed the connection unannounced: the next request on it
    was reset."""
    app = create_app(Engine(lm, "lm"))

    @app.get("/bug")
    async def bug() -> dict:
        raise RuntimeError("a bug")

    sock = bind("127.0.0.1", 0)
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with caplog.at_level(logging.INFO):
            connection.request("GET", "/bug")
            answer = connection.getresponse()
            status, error = answer.status, json.loads(answer.read())["error"]
        kept = connection.sock
        body = json.dumps({"model": "lm", "prompt": "the cat", "max_tokens": 2})
        connection.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
        answer = connection.getresponse()  # ConnectionResetError before
        assert answer.status == 200, answer.read()
        assert json.loads(answer.read())["object"] == "text_completion"
        assert connection.sock is kept  # the same connection, not one opened again
        connection.close()
        message = error["message"]
        assert status == 500 and error["type"] == "server_error", error
        assert message.startswith("internal server error (request req_") and message.endswith("RuntimeError: a bug")
        ident = message.split("(request ")[1].split(")")[0]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
            f"mmformer serve: 500 on GET /bug (request {ident}): RuntimeError: a bug (at {__file__}:"
            f"{bug.__code__.co_firstlineno + 2})"
        ]
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_prompt_too_long_is_named_by_its_index_in_the_request_before_a_stream_begins(client):
    """The third prompt too long: a 400 naming ``prompt`` with "prompt[2]" in the message (it was "prompts[0]", param
    "prompts[0]": each prompt runs as its own batch input), streamed or not (streamed, it was an error event in a
    200 stream, which the openai client raised as an APIError with no status)."""
    for stream in (False, True):
        response = complete(client, prompt=["the cat", "a dog", LONG], stream=stream)
        message = refused(response, "prompt")
        assert message == (
            f"prompt[2]: 182 tokens exceed the model's context (config.text.max_length={CONTEXT}); shorten the prompt"
        )
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        list(sdk.completions.create(model="lm", prompt=LONG, max_tokens=4, stream=True))


def test_max_tokens_past_the_context_is_a_400_naming_it(client, lm):
    """A prompt and ``max_tokens`` that do not fit the context: a 400 naming ``max_tokens``, the longest prompt's
    length and the context, as OpenAI answers (it was cut short silently, finish_reason "length"). What fits runs."""
    n = len(lm.processor.tokenizer.encode("once upon a time")) - 1  # its trailing end-of-text is left off
    message = refused(complete(client, prompt=["the cat", "once upon a time"], max_tokens=CONTEXT), "max_tokens")
    assert message == (
        f"max_tokens: prompt and max_tokens must fit the model's context of {CONTEXT} tokens (config.text.max_length):"
        f" prompt[1] has {n} tokens and max_tokens is {CONTEXT}; ask for at most {CONTEXT - n} or shorten it"
    )
    refused(complete(client, prompt=["once upon a time"], max_tokens=CONTEXT - n + 1, stream=True), "max_tokens")
    fits = complete(client, prompt="once upon a time", max_tokens=CONTEXT - n, temperature=0)
    assert fits.status_code == 200 and fits.json()["usage"]["total_tokens"] <= CONTEXT


@pytest.mark.parametrize(
    "field, value",
    [("n", 2), ("best_of", 3), ("echo", True), ("logprobs", 0), ("logprobs", 2), ("suffix", "!"),
     ("logit_bias", {"5": -100}), ("presence_penalty", 2.0), ("frequency_penalty", -1), ("n", True)],
)  # fmt: skip
def test_a_completion_field_the_server_does_not_honour_is_a_400_naming_it(client, field, value):
    """OpenAI's fields the server does not honour, set to ask for something: a 400 naming the field (all but ``n``
    were answered as if absent)."""
    assert refused(complete(client, **{field: value}), field).startswith(f"{field}: this server does not support it")


def test_a_completion_field_at_its_default_is_accepted(client):
    defaults = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "logit_bias": {},
                "presence_penalty": 0, "frequency_penalty": 0.0}  # fmt: skip
    assert complete(client, **defaults).status_code == 200


def test_a_seed_samples_as_the_complete_command_seeds_each_prompt(client, lm):
    """``seed`` at temperature 1: the same texts each time, each prompt's those of ``complete`` with the generator
    of its row (``mmformer complete --seed``), streamed or not; another seed other texts (it was ignored)."""
    prompts = ["the cat", "a dog ran", "once upon a time"]

    def texts(seed: int, **body) -> list[str]:
        response = complete(client, prompt=prompts, max_tokens=12, temperature=1.0, seed=seed, **body)
        assert response.status_code == 200, response.text
        if not body.get("stream"):
            return [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]
        pieces = ["", "", ""]
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: ") :])["choices"]:
                    pieces[choice["index"]] += choice["text"]
        return pieces

    expected = lm.complete(prompts, max_new_tokens=12, temperature=1.0, do_sample=True,
                           generator=row_generators(7, len(prompts)))  # fmt: skip
    assert texts(7) == texts(7) == texts(7, stream=True) == expected
    assert texts(8) != expected
    assert "seed: expected an integer" in refused(complete(client, seed="7"), "seed")


def test_stream_options_include_usage_sends_the_usage_last(client):
    """``stream_options.include_usage``: every chunk has ``usage`` null and a last chunk, with no choice, the usage
    the answer in one piece reports (it was ignored); without ``stream``, a 400 naming ``stream_options``."""
    prompts = ["the cat", "a dog ran"]
    whole = complete(client, prompt=prompts, temperature=0).json()
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=client, max_retries=0)
    chunks = list(sdk.completions.create(model="lm", prompt=prompts, max_tokens=4, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))  # fmt: skip
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1) and chunks[-1].choices == []
    usage = chunks[-1].usage
    assert [usage.prompt_tokens, usage.completion_tokens, usage.total_tokens] == list(whole["usage"].values())
    plain = complete(client, prompt=prompts, temperature=0, stream=True)
    assert '"usage"' not in plain.text
    refused(complete(client, stream_options={"include_usage": True}), "stream_options")
    refused(complete(client, stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage")
