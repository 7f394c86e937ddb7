"""The HTTP side: a FastAPI app with OpenAI's routes (``/v1/embeddings``, ``/v1/audio/transcriptions``,
``/v1/completions``, ``/v1/models``), ours (``/v1/classify``, ``/v1/captions``), ``/health``, ``/metrics`` and the
page at ``/``. Every model call goes through a per-route :class:`~mmformer.serve.batching.Batcher`; every error is
OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import re
import secrets
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmformer.generation.completion import Completion
from mmformer.generation.streaming import AsyncTextIteratorStreamer, StreamCancelled
from mmformer.preprocess.media import AudioTooLongError
from mmformer.serve.batching import Batcher, Deferred, decoding
from mmformer.serve.engine import CompletionKey, Engine, decode_base64
from mmformer.serve.errors import APIError, bad_request
from mmformer.serve.metrics import Metrics
from mmformer.serve.transcripts import FORMATS, GRANULARITIES, render
from mmformer.zeroshot import check_classnames, check_templates

STATIC = resources.files("mmformer.serve") / "static"
KNOWN_PATHS = ("/v1/embeddings", "/v1/audio/transcriptions", "/v1/completions", "/v1/classify", "/v1/captions",
               "/v1/models", "/health", "/metrics", "/")  # fmt: skip
PROBES = ("/health", "/metrics")  # not requests being answered: left out of the in-flight count
CLIENT_CLOSED = 499  # nginx's "client closed request": the client went away before its answer
# a streamed transcription is OpenAI's transcript.text.delta / .done events, text only: the formats whose content
# they carry (OpenAI streams gpt-4o-transcribe, whose formats are json, and text for its diarizing model)
STREAMED_FORMATS = ("json", "text")
# OpenAI's /v1/completions fields the server does not honour: (the values that ask for nothing, null besides; what
# the server does instead). Another value is a 400 naming the field, not an answer as if it were absent.
UNHONOURED = {
    "n": ((1,), "one completion per prompt"),
    "best_of": ((1,), "one completion per prompt, none ranked"),
    "echo": ((False,), "the prompt is not echoed"),
    "logprobs": ((), "no log probabilities"),
    "suffix": (("",), "no insertion before a suffix"),
    "logit_bias": (({},), "no logit bias"),
    "presence_penalty": ((0,), "no presence penalty"),
    "frequency_penalty": ((0,), "no frequency penalty"),
}
T = TypeVar("T")
log = logging.getLogger("mmformer.serve")


class PayloadTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: refuses a body over ``max_bytes`` with 413 (from its Content-Length before reading any of
    it, or as soon as a chunked body passes the limit) and records each request's route, status and latency."""

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        route = scope["path"] if scope["path"] in KNOWN_PATHS else "other"
        counted = route not in PROBES
        self.metrics.in_flight += counted

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise PayloadTooLarge(int(length))
            received = 0

            async def limited() -> dict:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(received)
                return message

            await self.app(scope, limited, send_status)
        except PayloadTooLarge as e:
            limit_mb = self.max_bytes / 2**20
            error = APIError(413, f"request body: expected at most {limit_mb:g} MB (--max-upload-mb), got "
                                  f"{e.args[0] / 2**20:.2f} MB or more", code="request_too_large")  # fmt: skip
            await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)
            status[0] = 413
        finally:
            self.metrics.in_flight -= counted
            self.metrics.request(route, status[0], time.perf_counter() - start)


class ServerErrors:
    """ASGI middleware: an unexpected exception of a handler (a bug) is answered here, inside the app, as OpenAI's
    500 error JSON naming a request id, and logged as one line with that id, the route and where it was raised.
    Starlette's own catch-all (``exception_handler(Exception)``) answers from its outermost middleware and raises the
    exception again, and uvicorn then drops the connection: a client's next request on it, kept alive, was reset.
    A response already begun (a stream) cannot be answered again: its exception goes on, and the connection ends."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_started(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_started)
        except Exception as e:
            if started:
                raise
            ident = f"req_{secrets.token_hex(8)}"
            frame = traceback.extract_tb(e.__traceback__)[-1]
            log.error("mmformer serve: 500 on %s %s (request %s): %s: %s (at %s:%d)", scope["method"], scope["path"],
                      ident, type(e).__name__, e, frame.filename, frame.lineno)  # fmt: skip
            error = APIError(500, f"internal server error (request {ident}): {type(e).__name__}: {e}")
            await _error_response(error)(scope, receive, send)


def _param(message: str) -> str | None:
    match = re.match(r"([\w\[\].]+): ", message)
    return match.group(1) if match else None


def _too_long(e: AudioTooLongError) -> APIError:
    """A 413 for a recording over ``--max-audio-seconds`` (as a body over ``--max-upload-mb`` is one)."""
    held = "decoding passed the limit" if e.seconds is None else f"it holds {e.seconds:,.1f} s"
    return APIError(413, f"{e.path}: audio longer than the server's --max-audio-seconds={e.limit_seconds:g} ({held}); "
                         "send a shorter recording, or serve with a larger --max-audio-seconds",
                    param="file", code="audio_too_long")  # fmt: skip


def _as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, AudioTooLongError):
        return _too_long(e)
    if isinstance(e, (ValueError, TypeError, FileNotFoundError)):  # the user's input (SampleError is a ValueError)
        return APIError(400, str(e), param=_param(str(e)))
    return APIError(500, f"{type(e).__name__}: {e}")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _form_texts(form: FormData, name: str) -> list[str]:
    """The values of a form field (none where absent); a 400 naming it where a file part stands for a value."""
    values = form.getlist(name)
    for value in values:
        if isinstance(value, UploadFile):
            raise bad_request(name, f"expected a value, got a file part ({value.filename or 'no file name'})")
    return values


def _refuse_unhonoured(body: dict) -> None:
    """A 400 naming the first of :data:`UNHONOURED`'s fields that ``body`` sets to a value asking for something."""
    for name, (fine, instead) in UNHONOURED.items():
        value = body.get(name)  # 1.0 asks what 1 does; true is not 1, nor false 0
        if value is None or any(value == f and isinstance(value, bool) == isinstance(f, bool) for f in fine):
            continue
        expected = " or ".join(["null", *(json.dumps(f) for f in fine)])
        raise bad_request(name, f"this server does not support it ({instead}): expected {expected}, got "
                                f"{json.dumps(value)[:80]}")  # fmt: skip


def _streaming(body: dict) -> tuple[bool, bool]:
    """(``stream``, ``stream_options.include_usage``) of a request, as OpenAI checks them."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream", f"expected true or false, got {stream!r:.80}")
    if options is None:
        return bool(stream), False
    if not stream:
        raise bad_request("stream_options", "only allowed with stream: true")
    if not isinstance(options, dict):
        raise bad_request("stream_options", f"expected an object ({{'include_usage': true}}), got {options!r:.80}")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise bad_request("stream_options.include_usage", f"expected true or false, got {include_usage!r:.80}")
    return True, bool(include_usage)


def _usage(done: list[Completion]) -> dict[str, int]:
    """OpenAI's usage of completions: the ids the model read and generated (the text encoded again counts other
    tokens: a byte token of a character cut short decodes to U+FFFD, three tokens when encoded)."""
    prompt_tokens, generated = sum(len(c.prompt_ids) for c in done), sum(len(c.ids) for c in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise bad_request(name, f"expected a number in [{low}, {high}], got {value!r}")
    return float(value)


async def _disconnect(request: Request) -> None:
    """Returns once the client has disconnected (the ASGI ``http.disconnect`` message); the body is read already."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first (a reloaded page, a client's timeout: the openai client
    then sends the request again): ``work`` is cancelled — its inputs leave their batch queue, a transcription
    already running stops at its next window (:meth:`Batcher.abandoned`) — and the request ends as a 499."""
    job, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait((job, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():
            job.cancel()
            job.add_done_callback(lambda f: f.cancelled() or f.exception())  # its CancelledError, retrieved
    if job in done:
        return job.result()
    raise APIError(CLIENT_CLOSED, "the client closed the request before its answer", code="client_closed_request")


def create_app(
    engine: Engine,
    *,
    max_batch_size: int = 32,
    batch_timeout_ms: float = 5.0,
    api_key: str | None = None,
    max_upload_mb: float = 25.0,
    max_audio_seconds: float | None = 10800.0,
) -> FastAPI:
    """The server's app around a loaded model: one model thread, one batching queue per route it serves.

    Args:
        max_upload_mb: larger request bodies get 413 (``--max-upload-mb``).
        max_audio_seconds: a transcription's recording longer than this gets 413, decoded no further
            (``--max-audio-seconds``; None: any length).
    """
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmformer-model")

    def transcribe(key: Any, waves: list[Any]) -> list[Any]:  # stops between windows once all its clients are gone
        return engine.transcribe(key, waves, stop=batchers["audio/transcriptions"].abandoned)

    work = {"embeddings": engine.embed, "audio/transcriptions": transcribe, "completions": engine.complete,
            "classify": engine.classify, "captions": engine.caption}  # fmt: skip
    batchers = {route: Batcher(route, decoding(work[route]), executor, metrics, max_batch_size, batch_timeout_ms / 1000)
                for route in engine.routes}  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for batcher in batchers.values():
            batcher.start()
        yield
        for batcher in batchers.values():
            await batcher.stop()
        executor.shutdown(wait=True)

    app = FastAPI(title="mmformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, max_bytes=int(max_upload_mb * 2**20), metrics=metrics)
    app.add_middleware(ServerErrors)  # outside Guard, which counts the 500 of an exception that passes it
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        message = f"{request.method} {path}: no such route" if e.status_code == 404 else str(e.detail)
        return _error_response(APIError(e.status_code, message, code="unknown_url" if e.status_code == 404 else None))

    def authorize(request: Request) -> None:
        """401 without the API key (``Bearer KEY``, the scheme in any case), before the body is read."""
        if api_key is not None:
            given = request.headers.get("authorization", "")
            scheme, _, key = given.strip().partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), api_key.encode()):
                what = "no Authorization header" if not given else "a wrong key"
                raise APIError(401, f"Authorization: expected 'Bearer <the server's --api-key>', got {what}",
                               code="invalid_api_key")  # fmt: skip

    def check(route: str | None, model: Any = None) -> None:
        """400 for a model route's request without ``model`` (OpenAI's API requires it), 404 for another model's
        name, 400 for a route this model cannot serve (after :func:`authorize`)."""
        if route is not None and (model is None or model == ""):
            raise bad_request("model", f"required (OpenAI's API requires it): expected {engine.model_id!r}, the "
                                       "model this server serves")  # fmt: skip
        if model is not None and model != engine.model_id:
            raise APIError(404, f"model: expected {engine.model_id!r} (the model this server serves), got {model!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if route is not None and route not in engine.routes:
            raise bad_request("model", f"{engine.model_id} cannot serve /v1/{route}; it serves "
                                       f"{['/v1/' + r for r in engine.routes]}", code="unsupported_route")  # fmt: skip

    async def json_body(request: Request) -> dict:
        authorize(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("body", "expected a JSON object") from None
        except RecursionError:  # a few KB of brackets: [[[[...
            raise bad_request("body", "expected a JSON object, got JSON nested too deeply to read") from None
        except ValueError as e:  # an integer of more than 4,300 digits
            raise bad_request("body", f"expected a JSON object, got JSON this server cannot read ({e})") from None
        if not isinstance(body, dict):
            raise bad_request("body", f"expected a JSON object, got {type(body).__name__}")
        return body

    def as_file_error(e: BaseException) -> APIError:
        """A transcription's failure as OpenAI's error naming the upload (``param`` "file") when it is the input's: a
        400 that names no other form field (the recording's decoding, the model's audio checks)."""
        error = _as_api_error(e)
        if error.status == 400 and error.param in (None, "audio"):
            error.param = "file"
        return error

    def arriving(route: str) -> contextlib.AbstractContextManager:
        """Announce a request to its route's batcher while it is read (see :meth:`Batcher.arriving`)."""
        batcher = batchers.get(route)
        return batcher.arriving() if batcher is not None else contextlib.nullcontext()

    async def run_all(request: Request, route: str, items: list[tuple[Any, Any]]) -> list[Any]:
        """Submit (key, payload) items to the route's batcher; the first failure answers the request. A client that
        disconnects first gives its items up (:func:`unless_gone`)."""
        submitted = asyncio.gather(*(batchers[route].submit(p, key=k) for k, p in items), return_exceptions=True)
        results = await unless_gone(request, submitted)
        for r in results:
            if isinstance(r, BaseException):
                raise _as_api_error(r)
        return results

    def decode_media(items: list[Any], param: str) -> list[tuple[str, Any]]:
        """(modality, payload) per ``{"image": b64}`` / ``{"audio": b64}`` item (a str is text when allowed); the
        image or audio file is decoded on the model thread with its batch (a :class:`Deferred` payload)."""

        def one(i: int, item: Any) -> tuple[str, Any]:
            where = f"{param}[{i}]"
            if isinstance(item, str):
                if not item:
                    raise bad_request(where, "expected a non-empty string")
                engine.check_text(item, where)
                return "text", item
            if isinstance(item, dict) and len(item) == 1 and next(iter(item)) in ("image", "audio"):
                kind, value = next(iter(item.items()))
                data = decode_base64(value, f"{where}.{kind}")
                load = engine.load_image if kind == "image" else engine.load_audio
                return kind, Deferred(load, data, f"{where}.{kind}")
            expected = "a string or {'image': base64} / {'audio': base64}"
            raise bad_request(where, f"expected {expected}, got {item!r:.80}")

        try:
            return [one(i, item) for i, item in enumerate(items)]
        except Exception as e:
            raise _as_api_error(e) from None

    # ---------------------------------------------------------------------------------------------- streams
    # A streamed request runs alone on the model thread (between other routes' batches), not batched: its pieces
    # follow its own decoding steps (a batch would pace them by its longest member and need a streamer per row), and
    # a client that goes away stops only its own decoding (the streamer's next step raises StreamCancelled).
    def run_streamed(route: str, work: Callable[[], Any], on_done: Callable[[BaseException | None], None]) -> Any:
        """Start ``work`` on the model thread; ``on_done(error or None)`` runs in the event loop when it ends."""
        queued = time.perf_counter()
        started = [queued]

        def timed() -> Any:
            started[0] = time.perf_counter()
            return work()

        job = asyncio.get_running_loop().run_in_executor(executor, timed)

        def done(future: asyncio.Future) -> None:
            metrics.batch_ran(route, 1, [started[0] - queued])
            on_done(asyncio.CancelledError() if future.cancelled() else future.exception())

        job.add_done_callback(done)
        return job

    def finish_reason(done: Completion) -> str:
        """OpenAI's: "stop" where an end id or a stop string ended the continuation, "length" where a limit cut it."""
        return "stop" if done.ended else "length"

    async def completion_events(head: dict, items: list[tuple[CompletionKey, list[int]]]) -> AsyncIterator[str]:
        """OpenAI's streamed completion: a ``text_completion`` chunk per piece as it is decoded, a last chunk per
        choice with its ``finish_reason``, with ``head["usage"]`` (``stream_options.include_usage``: null) a last one
        with the usage and no choice, then ``[DONE]``; an error after the stream began is an error event."""

        def chunk(text: str, index: int, reason: str | None) -> str:
            return _sse(
                {**head, "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": reason}]}
            )

        finished = []
        for index, (key, prompt) in enumerate(items):
            streamer = AsyncTextIteratorStreamer(engine.processor.tokenizer)

            def failed(error: BaseException | None, streamer: AsyncTextIteratorStreamer = streamer) -> None:
                if error is not None:
                    streamer.fail(error)

            job = run_streamed("completions", functools.partial(engine.complete, key, [prompt], streamer), failed)
            try:
                async for piece in streamer:
                    yield chunk(piece, index, None)
                (done,) = await job
            except Exception as e:
                yield _sse(_as_api_error(e).body())
                return
            finally:
                streamer.cancel()  # the client went away (this generator closed mid-stream): stop decoding
            finished.append(done)
            yield chunk("", index, finish_reason(done))
        if "usage" in head:
            yield _sse({**head, "choices": [], "usage": _usage(finished)})
        yield _sse("[DONE]")

    async def transcript_events(key: tuple, wave: Any) -> AsyncIterator[str]:
        """OpenAI's streamed transcription: a ``transcript.text.delta`` per segment as it is decoded, then
        ``transcript.text.done`` with the whole text; an error after the stream began is an error event."""
        loop, segments = asyncio.get_running_loop(), asyncio.Queue()
        gone = threading.Event()

        def on_segment(segment: dict) -> None:  # on the model thread
            if gone.is_set():
                raise StreamCancelled("transcription: the client went away")
            loop.call_soon_threadsafe(segments.put_nowait, segment)

        job = run_streamed("audio/transcriptions", functools.partial(engine.transcribe, key, [wave], on_segment),
                           lambda error: segments.put_nowait(None))  # fmt: skip
        try:
            sent = 0
            while (segment := await segments.get()) is not None:
                # the deltas concatenate to the done event's text: a Whisper checkpoint's is its segments' texts back
                # to back (openai-whisper's: each starts with its own space, or none inside a word or a CJK text),
                # another model's their words joined by spaces
                text = segment["text"] if engine.whisper else segment["text"].strip()
                if text:
                    yield _sse({"type": "transcript.text.delta", "delta": text if engine.whisper or not sent
                                else " " + text})  # fmt: skip
                    sent += 1
            (result,) = await job
        except Exception as e:
            yield _sse(_as_api_error(e).body())
            return
        finally:
            gone.set()  # the client went away (this generator closed mid-stream): stop decoding
        yield _sse({"type": "transcript.text.done", "text": result["text"]})

    # ---------------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> dict:
        routes = ["/v1/" + r for r in engine.routes]
        return {"status": "ok", "model": engine.model_id, "routes": routes, "modalities": engine.modalities,
                "in_flight": metrics.in_flight}  # fmt: skip

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    card = {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "mmformer",
            "routes": ["/v1/" + r for r in engine.routes]}  # fmt: skip

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model_card(request: Request, model: str) -> dict:
        authorize(request)
        check(None, model)
        return card

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        with arriving("embeddings"):
            body = await json_body(request)
            check("embeddings", body.get("model"))
            raw, encoding = body.get("input"), body.get("encoding_format", "float") or "float"
            if encoding not in ("float", "base64"):
                raise bad_request("encoding_format", f"expected 'float' or 'base64', got {encoding!r}")
            config, dimensions = engine.model.config, body.get("dimensions")
            # without a projection (a BERT / sentence-transformers encoder) an embedding is its tower's pooled state:
            # every encoder's width is the same then (ModelConfig checks it)
            size = config.embed_dim or config.feature_width(
                next(m for m in ("text", "image", "audio") if m in config.routes)
            )
            if dimensions is not None and (isinstance(dimensions, bool) or dimensions != size):
                # OpenAI's text-embedding-3 models are trained to be cut short; these are not
                raise bad_request("dimensions", f"this model's embeddings have {size} dimensions and cannot be "
                                                f"shortened; omit it or pass {size}, got {dimensions!r}")  # fmt: skip
            items = [raw] if isinstance(raw, (str, dict)) else raw
            if not isinstance(items, list) or not items:
                raise bad_request(
                    "input", f"expected a string, a list of strings or image/audio items, got {raw!r:.80}"
                )
            if all(isinstance(x, int) for x in items) or any(isinstance(x, list) for x in items):
                raise bad_request("input", "token id arrays are not accepted; send the text")
            decoded = decode_media(items, "input")
        vectors = await run_all(request, "embeddings", decoded)
        data = []
        for i, v in enumerate(vectors):
            values = v.numpy().astype(np.float32)
            embedding = base64.b64encode(values.tobytes()).decode() if encoding == "base64" else values.tolist()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(engine.text_tokens(p) for kind, p in decoded if kind == "text")
        return {"object": "list", "data": data, "model": engine.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict:
        with arriving("classify"):
            body = await json_body(request)
            check("classify", body.get("model"))
            # a label may come twice (open_clip's ImageNet list has two): its columns get the same score, and "label"
            # names it either way; the classifier's warning about it stays in the server's log
            labels, templates = body.get("labels"), body.get("templates")
            if not isinstance(labels, list):
                raise bad_request("labels", f"expected a non-empty list of class names, got {labels!r:.80}")
            if templates is None:  # absent or null: as OpenAI's optional fields
                templates = ["{}"]
            elif not isinstance(templates, list):
                raise bad_request("templates", f"expected a non-empty list of strings with '{{}}' where the label "
                                               f"goes, got {templates!r:.80}")  # fmt: skip
            for i, t in enumerate(templates):
                if not isinstance(t, str):
                    raise bad_request(f"templates[{i}]", f"expected a string with '{{}}', got {type(t).__name__}")
            try:  # the classifier's own checks (blank, invalid Unicode, no '{}'), under the request's names
                check_classnames(labels, distinct=False)
                check_templates(templates)
            except (TypeError, ValueError) as e:
                raise _as_api_error(ValueError(str(e).replace("classnames", "labels", 1))) from None
            raw = body.get("input")
            items = [raw] if isinstance(raw, dict) else raw
            if not isinstance(items, list) or not items:
                raise bad_request(
                    "input", f"expected a list of {{'image': base64}} / {{'audio': base64}}, got {raw!r:.80}"
                )
            decoded = decode_media(items, "input")
            for i, (kind, _) in enumerate(decoded):
                if kind == "text":
                    raise bad_request(f"input[{i}]", "expected {'image': base64} or {'audio': base64}, got a string")
            key = (tuple(labels), tuple(templates))
        probs = await run_all(request, "classify", [((kind, *key), p) for kind, p in decoded])
        data = []
        for i, row in enumerate(probs):
            best = max(range(len(labels)), key=row.__getitem__)
            data.append({"index": i, "label": labels[best], "scores": row})
        return {"object": "list", "model": engine.model_id, "labels": labels, "data": data}

    @app.post("/v1/captions")
    async def captions(request: Request) -> dict:
        with arriving("captions"):
            body = await json_body(request)
            check("captions", body.get("model"))
            raw = body.get("input")
            items = [raw] if isinstance(raw, dict) else raw
            if not isinstance(items, list) or not items:
                raise bad_request("input", f"expected a list of {{'image': base64}} items, got {raw!r:.80}")
            decoded = decode_media(items, "input")
            for i, (kind, _) in enumerate(decoded):
                if kind != "image":
                    raise bad_request(f"input[{i}]", f"expected {{'image': base64}}, got a {kind} item")
        texts = await run_all(request, "captions", [(None, p) for _, p in decoded])
        data = [{"index": i, "caption": t} for i, t in enumerate(texts)]
        return {"object": "list", "model": engine.model_id, "data": data}

    @app.post("/v1/audio/transcriptions", response_model=None)
    async def transcriptions(request: Request) -> Response:
        with arriving("audio/transcriptions"):
            authorize(request)
            try:
                form = await request.form()
            except PayloadTooLarge:
                raise
            except Exception as e:
                raise bad_request("body", f"expected multipart/form-data with a 'file' field ({e})") from None

            def value(name: str) -> str | None:  # a form field's text (the last, if sent twice), as form.get reads it
                return (_form_texts(form, name) or [None])[-1]

            check("audio/transcriptions", value("model"))
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise bad_request("file", "expected an audio file upload (multipart field 'file')")
            response_format = value("response_format") or "json"
            if response_format not in FORMATS:
                raise bad_request("response_format", f"expected one of {list(FORMATS)}, got {response_format!r}")
            granularities = _form_texts(form, "timestamp_granularities[]")
            granularities = granularities or _form_texts(form, "timestamp_granularities")
            for g in granularities:
                if g not in GRANULARITIES:
                    raise bad_request(
                        "timestamp_granularities[]", f"expected items of {list(GRANULARITIES)}, got {g!r}"
                    )
            if granularities and response_format != "verbose_json":  # as OpenAI: the times are verbose_json's
                raise bad_request("timestamp_granularities[]", f"only with response_format 'verbose_json', got "
                                  f"{response_format!r}")  # fmt: skip
            words, prompt = "word" in granularities, value("prompt") or None
            # openai-whisper's word alignment and previous-text prompt: a Whisper checkpoint's (alignment heads,
            # timestamp and <|startofprev|> tokens); a model trained here has neither
            if words and not engine.whisper:
                raise bad_request("timestamp_granularities[]", f"word timestamps need a Whisper checkpoint (its "
                                  f"alignment heads and timestamp tokens); {engine.model_id} is not one: ask for "
                                  f"'segment'")  # fmt: skip
            if prompt and not engine.whisper:
                raise bad_request("prompt", f"conditioning on a text prompt needs a Whisper checkpoint (its "
                                            f"<|startofprev|> token); {engine.model_id} is not one")  # fmt: skip
            try:
                temperature = float(value("temperature") or 0)
            except ValueError:
                raise bad_request("temperature", f"expected a number, got {value('temperature')!r}") from None
            if not 0 <= temperature <= 1:
                raise bad_request("temperature", f"expected a number in [0, 1], got {temperature}")
            stream = value("stream")
            stream = "false" if stream is None else stream.lower()
            if stream not in ("true", "false"):
                raise bad_request("stream", f"expected true or false, got {stream!r}")
            if stream == "true" and response_format not in STREAMED_FORMATS:  # its times would be lost unsaid
                raise bad_request("response_format", f"a streamed transcription sends text deltas: expected one of "
                                  f"{list(STREAMED_FORMATS)} with stream=true, got {response_format!r} (ask for it "
                                  f"without stream)")  # fmt: skip
            language = value("language") or None
            try:  # before anything is decoded, as the other fields (a model without language tokens refuses any)
                language = engine.check_language(language)
            except ValueError as e:  # its message names "language: " already
                raise APIError(400, str(e), param="language") from None
            name = f"file ({upload.filename or 'file'})"
            wave = Deferred(engine.load_recording, await upload.read(), name, max_audio_seconds)
            if stream == "true":  # decoded before the stream begins, so that a bad file is still a 400
                try:
                    wave = await asyncio.get_running_loop().run_in_executor(None, wave)
                except Exception as e:
                    raise as_file_error(e) from None
                return StreamingResponse(
                    transcript_events((language, temperature, words, prompt), wave), media_type="text/event-stream"
                )
        try:
            (result,) = await run_all(request, "audio/transcriptions", [((language, temperature, words, prompt), wave)])
        except APIError as e:
            raise as_file_error(e) from None
        content, media_type = render({**result, "language": engine.language_name(result["language"])},
                                     response_format, granularities)  # fmt: skip
        if isinstance(content, dict):
            return JSONResponse(content)
        return Response(content, media_type=media_type)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        with arriving("completions"):
            body = await json_body(request)
            check("completions", body.get("model"))
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
                raise bad_request("prompt", f"expected a non-empty string or list of strings, got {prompt!r:.80}")
            max_tokens = body.get("max_tokens", 16)
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
                raise bad_request("max_tokens", f"expected an int in [1, 4096], got {max_tokens!r}")
            temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
            top_p = body.get("top_p")
            top_p = None if top_p is None or top_p == 1 else _number(body, "top_p", 1.0, 0.0, 1.0)
            stop = body.get("stop")
            stop = [stop] if isinstance(stop, str) else (stop or [])
            if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
                raise bad_request(
                    "stop", f"expected a string or up to 4 non-empty strings, got {body.get('stop')!r:.80}"
                )
            _refuse_unhonoured(body)
            seed = body.get("seed")
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise bad_request("seed", f"expected an integer, got {seed!r:.80}")
            stream, include_usage = _streaming(body)
            # each prompt checked here, where a message can name its index (in a batch it is one of many requests')
            ids = []
            for i, text in enumerate(prompts):
                try:
                    ids.append(engine.prompt_ids(text, f"prompt[{i}]"))
                except ValueError as e:  # its message names the prompt
                    raise APIError(400, str(e), param="prompt") from None
            context, longest = engine.completion_context, max(range(len(ids)), key=lambda i: len(ids[i]))
            if context is not None and len(ids[longest]) + max_tokens > context:  # decoding would stop short
                n = len(ids[longest])
                fix = f"ask for at most {context - n} or shorten it" if n < context else "shorten it"
                raise bad_request("max_tokens", f"prompt and max_tokens must fit the model's context of {context} "
                                  f"tokens (config.text.max_length): prompt[{longest}] has {n} tokens and max_tokens "
                                  f"is {max_tokens}; {fix}")  # fmt: skip
            seeded = seed is not None and temperature > 0  # greedy decoding draws nothing
            keys = [CompletionKey(max_tokens, temperature, top_p, tuple(stop), seed if seeded else None,
                                  i if seeded else 0) for i in range(len(ids))]  # fmt: skip
            ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
            head = {"id": ident, "object": "text_completion", "created": created, "model": engine.model_id}
            if stream:
                head = {**head, "usage": None} if include_usage else head
                return StreamingResponse(completion_events(head, list(zip(keys, ids))), media_type="text/event-stream")
        done = await run_all(request, "completions", list(zip(keys, ids)))
        choices = [{"text": c.text, "index": i, "logprobs": None, "finish_reason": finish_reason(c)}
                   for i, c in enumerate(done)]  # fmt: skip
        return JSONResponse({**head, "choices": choices, "usage": _usage(done)})

    @app.get("/", response_model=None)
    async def page() -> Response:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    @app.get("/static/{name}", response_model=None)
    async def static(name: str) -> Response:
        kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        suffix = name[name.rfind(".") :] if "." in name else ""
        if "/" in name or suffix not in kinds or not (STATIC / name).is_file():
            raise APIError(404, f"GET /static/{name}: no such file", code="unknown_url")
        return FileResponse(str(STATIC / name), media_type=kinds[suffix])

    return app
