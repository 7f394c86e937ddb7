"""Serving throughput and latency: ``mmformer serve`` (dynamic batching across requests) side by side with a plain
FastAPI server that calls the model once per request (sync endpoints in FastAPI's thread pool, the usual first
server), on the shipped digits model, in one run. Workloads: audio zero-shot (``/v1/classify``, ten digit labels)
and transcription; 1, 8 and 64 concurrent clients each sending requests back to back; requests/s and p50/p99
latency per server. Both servers run as subprocesses with the same thread settings, measured alternately (``--rounds``
times each per row, ABBA...; the figures pool the rounds).

    python -m benchmarks.serve [--requests 256] [--rounds 3] [--threads 2]

``--tiny`` (the test suite's smoke run): 1 and 8 clients, one request per client, one round.
"""

import argparse  # no `from __future__ import annotations`: FastAPI reads the baseline's endpoint annotations
import asyncio
import base64
import json
import os
import ssl
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import base_parser, parse_args, record, table

ROOT = Path(__file__).resolve().parent.parent
MODEL = "data/digits_model"
DIGITS = ROOT / "data" / "digits"
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLIENTS = (1, 8, 64)


def plain_app(model_dir: str):
    """The baseline: a FastAPI app whose endpoints each call the model on their one request."""
    import torch
    from fastapi import FastAPI, File, Form, UploadFile
    from pydantic import BaseModel

    import mmformer

    model = mmformer.load_pretrained(model_dir)
    processor = model.processor
    app = FastAPI()
    classifiers: dict[tuple, mmformer.ZeroShotClassifier] = {}

    class Classify(BaseModel):
        labels: list[str]
        audio: str

    @app.post("/classify")
    def classify(body: Classify) -> dict:
        key = tuple(body.labels)
        if key not in classifiers:
            classifiers[key] = mmformer.ZeroShotClassifier(model, processor, list(key), modality="audio")
        wave = processor.load_audio(base64.b64decode(body.audio), name="audio")
        with torch.inference_mode():
            return {"scores": classifiers[key].predict_proba([wave], sampling_rate=16000)[0].tolist()}

    @app.post("/transcribe")
    def transcribe(file: UploadFile = File(...), model_name: str = Form("", alias="model")) -> dict:  # noqa: B008
        wave = processor.load_audio(file.file.read(), name=file.filename or "file")
        with torch.inference_mode():
            return {"text": model.transcribe([wave])[0]}

    return app


def start(cmd: list[str], url: str, env: dict) -> object:
    import subprocess

    import httpx

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited: {proc.stderr.read()}")
        try:
            httpx.get(url + "/", timeout=2)  # any answer: uvicorn listens once the app has started
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not start")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests_for(server: str, workload: str, clips: list[Path]) -> list[dict]:
    """httpx request arguments, one per clip."""
    out = []
    for clip in clips:
        data = clip.read_bytes()
        if workload == "zero-shot":
            audio = base64.b64encode(data).decode()
            body = ({"model": MODEL, "labels": LABELS, "input": [{"audio": audio}]} if server == "mmformer"
                    else {"labels": LABELS, "audio": audio})  # fmt: skip
            out.append({"url": "/v1/classify" if server == "mmformer" else "/classify", "json": body})
        else:
            out.append({"url": "/v1/audio/transcriptions" if server == "mmformer" else "/transcribe",
                        "data": {"model": MODEL}, "files": {"file": (clip.name, data, "audio/flac")}})  # fmt: skip
    return out


async def load(url: str, requests: list[dict], clients: int) -> dict:
    """``clients`` workers sending ``requests`` back to back: each request's latency (s) and the wall time.

    Each worker has its own one-connection ``httpx.AsyncClient``: one client shared by 64 workers spends most of the
    load generator's CPU in httpcore's connection-pool bookkeeping (it scans every connection for every request
    event: ~2M ``is_idle`` calls, ~10 ms of CPU per request at 64 clients), and the generator shares the servers'
    cores, so it throttled both servers alike and hid their difference.
    """
    import httpx

    latencies: list[float] = []
    queue = list(reversed(requests))
    tls = ssl.create_default_context()  # unused over http, but each client would load the CA store (~40 ms) without

    async def worker() -> None:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, verify=tls) as client:
            await started.wait()
            while queue:
                request = queue.pop()
                start = time.perf_counter()
                response = await client.post(**request)
                response.raise_for_status()
                latencies.append(time.perf_counter() - start)

    started = asyncio.Event()
    workers = [asyncio.create_task(worker()) for _ in range(clients)]
    await asyncio.sleep(0)  # every client is built before the clock starts
    start = time.perf_counter()
    started.set()
    await asyncio.gather(*workers)
    wall = time.perf_counter() - start
    return {"latencies": latencies, "wall": wall}


def summary(runs: list[dict]) -> dict:
    """requests/s over all rounds (their requests over their summed wall time) and latency percentiles (ms) of all
    their requests."""
    latencies = sorted(x for run in runs for x in run["latencies"])
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    rps = len(latencies) / sum(run["wall"] for run in runs)
    return {"rps": rps, "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * p99}


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256, help="requests per workload and client count (>= clients)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="measurements per server and row, alternating ABBA...: on a "
                   "busy machine load bursts then fall on both servers alike")  # fmt: skip
    p.add_argument("--plain-server", type=int, default=None, help=argparse.SUPPRESS)  # internal: run the baseline
    args = parse_args(p, argv)
    if args.plain_server is not None:
        import uvicorn

        uvicorn.run(plain_app(MODEL), host="127.0.0.1", port=args.plain_server, log_level="warning")
        return
    rows = [json.loads(line) for line in (DIGITS / "test.jsonl").read_text().splitlines()]
    clips = [DIGITS / r["audio_filepath"] for r in rows]
    env = {**os.environ}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    ports = {"mmformer": free_port(), "plain": free_port()}
    commands = {
        "mmformer": [sys.executable, "-m", "mmformer.cli", "serve", "--model", MODEL, "--port", str(ports["mmformer"]),
                     "--max-batch-size", str(args.max_batch_size)],
        "plain": [sys.executable, "-m", "benchmarks.serve", "--plain-server", str(ports["plain"])],
    }  # fmt: skip
    procs: dict[str, object] = {}
    results = []
    try:
        for name, cmd in commands.items():
            procs[name] = start(cmd, f"http://127.0.0.1:{ports[name]}", env)
        for workload in ("zero-shot", "transcription"):
            for clients in CLIENTS[:2] if args.tiny else CLIENTS:  # the smoke run: 1 and 8 clients
                n = clients if args.tiny else max(args.requests, clients)
                row = {"workload": workload, "clients": clients, "requests": n}
                runs: dict[str, list[dict]] = {"mmformer": [], "plain": []}
                for server in runs:  # warm up
                    asyncio.run(load(f"http://127.0.0.1:{ports[server]}", requests_for(server, workload, clips[:2]), 1))
                for r in range(1 if args.tiny else args.rounds):  # measure alternately: AB, BA, AB, ...
                    for server in ("mmformer", "plain")[:: 1 if r % 2 == 0 else -1]:
                        requests = requests_for(server, workload, clips[:n])
                        runs[server].append(asyncio.run(load(f"http://127.0.0.1:{ports[server]}", requests, clients)))
                for server, measured in runs.items():
                    row.update({f"{server}_{k}": v for k, v in summary(measured).items()})
                row["rps_vs_plain"] = row["mmformer_rps"] / row["plain_rps"]
                results.append(row)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    columns = ["workload", "clients", "requests", "mmformer_rps", "plain_rps", "rps_vs_plain", "mmformer_p50_ms",
               "mmformer_p99_ms", "plain_p50_ms", "plain_p99_ms"]  # fmt: skip
    print(table(results, columns))
    record("serve", results, args)


if __name__ == "__main__":
    main()
