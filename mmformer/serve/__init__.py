"""Serving a model over HTTP with OpenAI-compatible routes (``mmformer serve``).

The package is the only place that knows HTTP: :mod:`engine` holds the model and its batched work,
:mod:`batching` the per-route queues, :mod:`app` the FastAPI routes, :mod:`server` start-up.

Why FastAPI + uvicorn and not LitServe (0.2.19, installed): a ``LitServer`` with several ``LitAPI`` routes starts
inference worker processes per route (``spawn``), each calling its own ``setup()`` — the model would be loaded once
per route, not once — and every request and result is pickled between the HTTP process and those workers; its
``MaxSizeMiddleware`` counts bytes as they are read (no refusal from ``Content-Length``) and its errors are
FastAPI's ``{"detail": ...}``, not OpenAI's error JSON. Here one process holds the model, one model thread runs every
route's batches, and each route has its own small queue (:class:`~mmformer.serve.batching.Batcher`).

Streams (``stream=true`` on completions and transcriptions) are real: each text piece
(:mod:`mmformer.generation.streaming`) or
long-form segment is sent as the model produces it. A streamed request is not batched: it runs alone on the model
thread between batches, so that its pieces follow its own decoding steps and a client that goes away stops its own
decoding only.
"""

from mmformer.serve.server import load_engine, serve

__all__ = ["load_engine", "serve"]
