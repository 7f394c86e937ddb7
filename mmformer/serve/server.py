"""``mmformer serve``: load the model once, build the app, run uvicorn. SIGTERM (or Ctrl-C) stops accepting new
connections and lets the requests in flight finish (up to ``graceful_s``) before the batchers stop."""

from __future__ import annotations

import errno
import logging
import os
import socket

from mmformer.serve.engine import Engine

log = logging.getLogger("mmformer.serve")


def load_engine(
    model: str, *, adapter: str | None = None, device: str = "cpu", compute_type: str = "float32"
) -> Engine:
    """The model at ``model`` (any name ``load_pretrained`` takes, or a PT2E int8 folder: see
    :func:`mmformer.io.auto.load_for_inference`), loaded once, with its processor; ``compute_type``
    (:func:`mmformer.longform.with_compute_type`): what a Whisper checkpoint's transcriptions read their audio
    with — its PT2E dynamic int8 encoder (x86 CPUs), or its own under bf16 autocast (``auto``: where the CPU has
    AMX)."""
    from mmformer.io.auto import load_for_inference

    loaded = load_for_inference(model, device=device, adapter=adapter)  # a PT2E int8 folder: its graphs
    return Engine(loaded, model_id=model, compute_type=compute_type)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (with SO_REUSEADDR, as uvicorn binds), for uvicorn to serve on: bound before
    the model loads, so that a port in use or out of range is refused at once, not after loading (it listens once the
    model is loaded, before the banner: :func:`serve`)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port: expected a TCP port 0-65535 (0: any free one), got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise OSError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = "the port is in use (another server?)" if e.errno == errno.EADDRINUSE else os.strerror(e.errno or 0)
        raise OSError(f"--port: cannot listen on {host}:{port}: {why}") from None
    return sock


def serve(
    model: str,
    *,
    adapter: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 32,
    batch_timeout_ms: float = 5.0,
    api_key: str | None = None,
    max_upload_mb: float = 25.0,
    max_audio_seconds: float = 10800.0,
    device: str = "cpu",
    graceful_s: float = 30.0,
    compute_type: str = "float32",
) -> None:
    """Serve ``model`` over HTTP until SIGTERM / SIGINT. After the graceful shutdown, SIGTERM ends the process by
    that signal (uvicorn raises it again) and SIGINT (Ctrl-C) raises a KeyboardInterrupt."""
    import uvicorn

    from mmformer.serve.app import create_app

    if not max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb: expected a size > 0, got {max_upload_mb}")
    if not max_audio_seconds > 0:
        raise ValueError(f"--max-audio-seconds: expected seconds > 0, got {max_audio_seconds}")
    if not batch_timeout_ms >= 0:
        raise ValueError(f"--batch-timeout-ms: expected milliseconds >= 0, got {batch_timeout_ms}")
    sock = bind(host, port)
    try:
        engine = load_engine(model, adapter=adapter, device=device, compute_type=compute_type)
        app = create_app(engine, max_batch_size=max_batch_size, batch_timeout_ms=batch_timeout_ms, api_key=api_key,
                         max_upload_mb=max_upload_mb, max_audio_seconds=max_audio_seconds)  # fmt: skip
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=graceful_s)
        # listening before the banner, which scripts wait for: a connection made once it prints waits in the backlog
        # until uvicorn accepts it (asyncio's create_server listens on the socket again, with the same backlog)
        sock.listen(config.backlog)
    except BaseException:
        sock.close()
        raise
    compute = "" if engine.compute == "float32" else f" (transcriptions' audio encoder: {engine.compute})"
    where = f"[{host}]" if ":" in host else host
    print(f"mmformer serve: {model} on http://{where}:{sock.getsockname()[1]} — routes "
          f"{['/v1/' + r for r in engine.routes]}{compute}", flush=True)  # fmt: skip
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # Ctrl-C, after the graceful shutdown: uvicorn raises the signal again once it has drained, inside asyncio's
        # runner, whose KeyboardInterrupt carries the CancelledError of the server's task (two chained tracebacks);
        # the caller gets a plain one (`mmformer serve`: one line and exit status 130, as every command)
        raise KeyboardInterrupt from None
    finally:
        sock.close()  # uvicorn closes it once it has started; not if it failed before (a listening socket left open)
