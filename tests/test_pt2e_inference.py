"""A PT2E int8 folder (``mmformer quantize --backend pt2e``) in use: ``generate`` runs its decoder graphs inside the
one decoding loop (every search and score processor of the float model), and the commands and the server run its
graphs — ``mmformer zeroshot`` / ``caption`` / ``transcribe`` and ``mmformer serve`` (a real server process, the
official ``openai`` client) answer as the int8 model loaded here, not as its float model."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest
import torch

import mmformer
from mmformer.cli.main import main
from mmformer.compress import pt2e
from mmformer.longform import with_compute_type
from mmformer.ship import exportable
from mmformer.zeroshot import ZeroShotClassifier

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGES = [str(DIGITS / "images" / "test" / f"00000{i}.png") for i in range(4)]
CLIPS = [str(DIGITS / "audio" / "test" / f"00000{i}.flac") for i in range(4)]


@pytest.fixture(scope="module")
def digits():
    return mmformer.load_pretrained(ROOT / "data" / "digits_model").eval()


@pytest.fixture(scope="module")
def int8_folder(digits, tmp_path_factory) -> Path:
    """The digits model's PT2E dynamic int8 folder, every tower, written by ``mmformer quantize``."""
    out = tmp_path_factory.mktemp("pt2e") / "int8"
    main(["quantize", "--model", str(ROOT / "data" / "digits_model"), "--backend", "pt2e", "--method", "dynamic",
          "--out", str(out)])  # fmt: skip
    return out


def float_graphs(model) -> pt2e.PT2EModel:
    """The model's own export graphs (float, not quantized) behind PT2E's interface: whatever decodes through them
    must give the float model's ids exactly."""
    return pt2e.PT2EModel(model, "dynamic", {g.name: g.module for g in exportable.graphs(model)}, {}, compile=False)


def test_generate_runs_the_decoder_graphs_in_the_one_decoding_loop(digits):
    """Greedy, beam search, sampling and the score processors (repetition penalty, a minimum length) through the
    graph runner equal the float model's decoding on the same graphs' float modules: one loop, two runners. Before,
    the int8 model had its own greedy-only loop and refused every other option."""
    graphs = float_graphs(digits)
    processor = digits.processor
    pixels = processor(images=IMAGES)["pixel_values"]
    audio = processor(audio=CLIPS, sampling_rate=16000)
    cases = [
        dict(image=pixels, max_new_tokens=8),
        dict(image=pixels, max_new_tokens=8, num_beams=3),
        dict(audio=audio["audio"], audio_lengths=audio["audio_lengths"], max_new_tokens=8, num_beams=2),
        dict(audio=audio["audio"], audio_lengths=audio["audio_lengths"], max_new_tokens=8, repetition_penalty=1.5,
             min_new_tokens=4),
    ]  # fmt: skip
    for case in cases:
        expected = digits.generate(**case)
        assert torch.equal(graphs.generate(**case), expected), case
    sampled = [
        m.generate(image=pixels, max_new_tokens=8, do_sample=True, temperature=1.5,
                   generator=torch.Generator().manual_seed(4))
        for m in (digits, graphs)
    ]  # fmt: skip
    assert torch.equal(*sampled)
    assert graphs.caption(IMAGES) == digits.caption(IMAGES)
    assert graphs.transcribe(CLIPS) == digits.transcribe(CLIPS)
    with pytest.raises(ValueError, match="prefix_embeds: a PT2E int8 model's decoder graphs take no learned prefix"):
        graphs.generate(image=pixels, prefix_embeds=torch.zeros(2, digits.config.width("decoder")))
    with pytest.raises(ValueError, match="prompts of one length"):
        graphs.generate(image=pixels[:2], prompt_ids=[[1], [1, 5]])
    with pytest.raises(ValueError, match="expected at most one of image=, audio="):
        graphs.generate(image=pixels, audio=audio["audio"])


def test_encoders_give_the_embeddings_before_their_norm_with_normalize_false(digits, make_model_config):
    """``encode_image`` / ``encode_audio`` / ``encode_text(normalize=False)`` as the float model's (a converted timm
    classifier's head logits): each graph's token states pooled and projected by the float model, no second graph —
    equal to the float model's through its own float graphs, also for a fixed-length text tower (its padding is not
    pooled). Before, none took ``normalize`` (a TypeError)."""
    from mmformer.model import MultimodalTransformer

    graphs, processor = float_graphs(digits), digits.processor
    audio, text = processor(audio=CLIPS, sampling_rate=16000), processor(text=["one two", "three"])
    cases = {"encode_image": (processor(images=IMAGES)["pixel_values"],),
             "encode_audio": (audio["audio"], audio["audio_lengths"]),
             "encode_text": (text["input_ids"], text["attention_mask"])}  # fmt: skip
    torch.manual_seed(0)
    config = make_model_config(image=None, audio=None, text={"fixed_length": True, "pool": "mean"})
    padded = MultimodalTransformer(config).eval()
    text_graph = {g.name: g.module for g in exportable.graphs(padded, ["text"])}
    padded_graphs = pt2e.PT2EModel(padded, "dynamic", text_graph, {}, compile=False)
    ids, mask = torch.randint(3, 32, (2, 5)), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        for name, inputs in cases.items():
            got = getattr(graphs, name)(*inputs, normalize=False)
            assert torch.equal(got, getattr(digits, name)(*inputs, normalize=False)), name
            assert not torch.allclose(got.norm(dim=-1), torch.ones(len(got))), name  # not normalised after all
            assert torch.equal(getattr(graphs, name)(*inputs), getattr(digits, name)(*inputs)), name
        torch.testing.assert_close(padded_graphs.encode_text(ids, mask, normalize=False),
                                   padded.encode_text(ids, mask, normalize=False))  # fmt: skip


def test_towers_left_unquantized_run_in_float(digits):
    """``quantize --towers image``: the image encoder runs its int8 graph, every other tower the float model (before:
    a missing graph was an error in every command that touched it), and the server offers the float model's
    routes."""
    from mmformer.serve.engine import served_routes

    q = pt2e.quantize(digits, "dynamic", towers=["image"], compile=False)
    assert q.transcribe(CLIPS) == digits.transcribe(CLIPS)  # audio encoder and decoder: float
    audio = {m: ZeroShotClassifier(m, classnames=WORDS, modality="audio").predict_proba(CLIPS) for m in (q, digits)}
    assert torch.equal(audio[q], audio[digits])
    pixels = digits.processor(images=IMAGES)["pixel_values"]
    assert torch.equal(q.encode_image(pixels), q.run("image_encoder", pixels)[0])
    assert not torch.equal(q.encode_image(pixels), digits.encode_image(pixels))  # int8: the check above can fail
    # normalize=False: the int8 graph's embeddings before its norm (a float tower: the float model's)
    head = q.encode_image(pixels, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(head, dim=-1), q.encode_image(pixels))
    assert not torch.allclose(head, digits.encode_image(pixels, normalize=False), atol=1e-4)
    audio = digits.processor(audio=CLIPS, sampling_rate=16000)
    floats = [m.encode_audio(audio["audio"], audio["audio_lengths"], normalize=False) for m in (q, digits)]
    assert torch.equal(*floats)
    # the int8 image memory read by the float decoder: the same ids as the float decoder's graphs over that memory
    mixed = float_graphs(digits)
    mixed.graphs["image_encoder"] = q.graphs["image_encoder"]
    assert q.decoder_runner(*q.memory(image=pixels)) is None
    assert torch.equal(q.generate(image=pixels, max_new_tokens=8), mixed.generate(image=pixels, max_new_tokens=8))
    assert served_routes(q) == served_routes(digits)


def test_the_commands_run_a_pt2e_folders_int8_graphs(digits, int8_folder, capsys, monkeypatch):
    """``mmformer zeroshot`` / ``caption`` / ``transcribe`` on the folder ``mmformer quantize --backend pt2e`` wrote
    print what its int8 graphs give (before: its float model, with a warning); the zero-shot scores differ from the
    float model's, so the check can tell them apart. (The folder is loaded once, uncompiled — the reference the
    compiled graphs are tested against in test_quantization_pt2e.py — and handed to each command where it asks
    ``pt2e.load`` for it; the server test below reloads a folder in its own process and compiles its graphs.)"""
    int8 = pt2e.load(int8_folder, compile=False)
    asked = []

    def load(path, device=None, compile=True):
        asked.append(Path(path))
        return int8

    monkeypatch.setattr(pt2e, "load", load)
    capsys.readouterr()
    main(["zeroshot", "--model", str(int8_folder), "--classes", ",".join(WORDS), "--templates", "{}", "--top", "10",
          *IMAGES[:2]])  # fmt: skip
    printed = capsys.readouterr()
    assert "PT2E dynamic int8 graphs" in printed.err
    scores: list[dict[str, str]] = []  # a path line, then "  name  probability" lines
    for line in printed.out.splitlines():
        if line.startswith(" "):
            name, probability = line.split()
            scores[-1][name] = probability
        else:
            scores.append({})

    def table(model) -> list[dict[str, str]]:
        clf = ZeroShotClassifier(model, classnames=WORDS, templates=["{}"], modality="image")
        return [{name: f"{p:.3f}" for name, p in zip(WORDS, row.tolist())} for row in clf.predict_proba(IMAGES[:2])]

    assert scores == table(int8)
    assert scores != table(digits)  # int8 graphs, not the float model
    # --compute-type auto keeps the graphs as quantized (no bf16 autocast around them, even where the CPU has AMX)
    main(["zeroshot", "--model", str(int8_folder), "--classes", ",".join(WORDS), "--templates", "{}", "--top", "10",
          "--compute-type", "auto", *IMAGES[:2]])  # fmt: skip
    again = capsys.readouterr()
    assert "PT2E dynamic graphs, as quantized" in again.err and again.out == printed.out
    with pytest.raises(SystemExit, match="--compute-type bfloat16: .* holds PT2E int8 graphs"):
        main(["zeroshot", "--model", str(int8_folder), "--classes", "one,two", "--compute-type", "bfloat16", IMAGES[0]])
    main(["caption", "--model", str(int8_folder), *IMAGES])
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == int8.caption(IMAGES)
    main(["transcribe", "--model", str(int8_folder), "--no-progress", *CLIPS])
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == int8.transcribe(CLIPS)
    assert asked == [int8_folder] * 5
    with pytest.raises(SystemExit, match="holds PT2E int8 graphs, which take no adapter"):
        main(["caption", "--model", str(int8_folder), "--adapter", str(int8_folder), IMAGES[0]])
    with pytest.raises(ValueError, match="--compute-type bfloat16: int8 holds PT2E int8 graphs"):
        with_compute_type(int8, "bfloat16", "int8")  # what transcribe and serve ask


@pytest.mark.slow  # quantizes, then the server compiles two graphs at their first calls (~25 s in all)
def test_serve_answers_from_a_pt2e_folders_compiled_int8_graphs(digits, tmp_path):
    """``mmformer serve --model INT8_FOLDER`` in its own process (the folder, the image and text encoders quantized,
    reloaded there and its graphs compiled): embeddings, zero-shot scores and captions equal the int8 model's loaded
    here, the embeddings and scores differ from the float model's, and the audio transcription — a tower left in
    float — equals the float model's (official ``openai`` client). Completions are not offered."""
    from test_serve import running_server

    openai = pytest.importorskip("openai")
    folder = tmp_path / "int8"
    main(["quantize", "--model", str(ROOT / "data" / "digits_model"), "--backend", "pt2e", "--method", "dynamic",
          "--towers", "image,text", "--out", str(folder)])  # fmt: skip
    int8 = pt2e.load(folder, compile=False)
    assert sorted(int8.graphs) == ["image_encoder", "text_encoder"]
    assert isinstance(mmformer.load_for_inference(folder), pt2e.PT2EModel)  # the public name the server uses
    name = str(folder)
    tokens = digits.processor(text=["one two", "three"])
    with running_server(name, startup_s=240) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=240)
        with open(CLIPS[2], "rb") as f:
            assert client.audio.transcriptions.create(model=name, file=f).text == digits.transcribe([CLIPS[2]])[0]
        embedded = torch.tensor(
            [e.embedding for e in client.embeddings.create(model=name, input=["one two", "three"]).data]
        )
        images = [{"image": base64.b64encode(Path(p).read_bytes()).decode()} for p in IMAGES]
        captions = httpx.post(url + "/v1/captions", json={"model": name, "input": images}, timeout=240).json()
        body = {"model": name, "labels": WORDS, "input": images}
        answer = httpx.post(url + "/v1/classify", json=body, timeout=240).json()
        routes = httpx.get(url + "/health", timeout=30).json()["routes"]
    expected = int8.encode_text(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(embedded, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(embedded, digits.encode_text(tokens["input_ids"], tokens["attention_mask"]), atol=1e-4)
    assert [d["caption"] for d in captions["data"]] == int8.caption(IMAGES)
    got = torch.tensor([d["scores"] for d in answer["data"]])
    classify = {name: ZeroShotClassifier(m, classnames=WORDS, modality="image") for name, m in
                (("int8", int8), ("float", digits))}  # fmt: skip
    # The server runs the graphs compiled (inductor's int8 kernels), this process the eager reference graphs: image
    # embeddings that differ by rounding, which the logit scale (~100) amplifies — up to 2.7e-4 in a probability on a
    # Zen 4 EPYC (within 1e-5 + 1e-4 relative on the Xeon), where int8 and float differ by 1.4e-2. So: within
    # `scores` of int8's, and further than that from float's.
    scores = 2e-3
    torch.testing.assert_close(got, classify["int8"].predict_proba(IMAGES), rtol=0, atol=scores)
    assert float((got - classify["float"].predict_proba(IMAGES)).abs().max()) > scores
    assert routes == ["/v1/embeddings", "/v1/audio/transcriptions", "/v1/classify", "/v1/captions"]
