"""Generation: the KV cache changes nothing (token for token), beam search and sampling behave, rows stop on their
own, position tables end cleanly, and bad options fail with clear errors.

Tiny random models decode degenerate text with a tied head (each token predicts itself), so the models here untie
the LM head and give it and the token embedding unit-variance weights: logits then differ by wide margins and the
cached and uncached paths cannot disagree through float rounding.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers
from torch._dynamo.utils import counters

from mmformer.config import GenerationConfig
from mmformer.generation.decoding import _memory, generate
from mmformer.generation.options import DecodingOptions
from mmformer.generation.search import BeamSearch, DecoderRunner
from mmformer.model import MultimodalTransformer
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer

B = 3
SCHEMES = {  # decoder position scheme: absolute (text embedder) or relative (inside attention)
    "learned": dict(text={"position": "learned"}),
    "sinusoidal": dict(text={"position": "sinusoidal"}),
    "rope": dict(text={"position": "none"}, stack={"position": "rope"}),
    "alibi": dict(text={"position": "none"}, stack={"position": "alibi"}),
    "gqa": dict(stack={"n_kv_heads": 2}),
}


@pytest.fixture
def build(make_model_config):
    def make(scheme: str = "learned") -> MultimodalTransformer:
        model = MultimodalTransformer(make_model_config(**SCHEMES[scheme], tie_lm_head=False)).eval()
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 1.0)
            model.text_embed.tokens.weight.normal_(0, 1.0)
        return model

    return make


def memory_inputs(kind: str) -> dict[str, torch.Tensor]:
    """Decoder memory sources: images, or waveforms of different lengths (so the memory has a padding mask)."""
    if kind == "image":
        return {"image": torch.randn(B, 3, 16, 16)}
    return {"audio": torch.randn(B, 800) * 0.1, "audio_lengths": torch.tensor([800, 500, 650])}


def cut_at_eos(ids: torch.Tensor, n_prompt: int, eos: int, pad: int) -> tuple[torch.Tensor, list[int]]:
    """What per-row stopping should make of a run without eos: each row cut after its first generated ``eos``,
    right-padded to the longest; and each row's length."""
    rows, ends = [], []
    for row in ids.tolist():
        gen = row[n_prompt:]
        end = n_prompt + (gen.index(eos) + 1 if eos in gen else len(gen))
        rows.append(row[:end])
        ends.append(end)
    width = max(ends)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows]), ends


def test_a_large_head_times_its_layouts_once_and_every_layout_gives_the_heads_logits(make_model_config):
    """Decoding rows through an LM head of at least 2**22 weights take the GEMM layout that ran fastest here (timed
    once per row and thread count, then remembered): every layout equals the head's own call, and a batch's rows are
    each what they are alone."""
    from mmformer.generation import lm_head

    vocab = lm_head._LARGE_HEAD // 16 + 7  # width 16: just over the threshold
    model = MultimodalTransformer(make_model_config(text={"vocab_size": vocab}, tie_lm_head=False)).eval()
    hidden = torch.randn(3, 5, 16)
    weight = model.lm_head.weight
    lm_head._HEAD_LAYOUTS.clear()
    packed = ("mkl-packed",) if lm_head._MKL_PACKED else ()
    with torch.no_grad():
        expected = model.lm_head(hidden[:, -1])
        for rows in (1, 3):
            for layout in ("linear", "weight-major", *packed, "two-columns")[: None if rows == 1 else -1]:
                got = lm_head.project(weight, hidden[:rows, -1], layout)
                torch.testing.assert_close(got, expected[:rows], atol=1e-4, rtol=1e-4, msg=layout)
        one = lm_head.last_logits(model, hidden[:1], lm_head.head_layout(model, hidden[:1, -1]))
        many = lm_head.last_logits(model, hidden, lm_head.head_layout(model, hidden[:, -1]))
    threads = torch.get_num_threads()
    chosen = {key[2]: layout for key, layout in lm_head._HEAD_LAYOUTS.items() if key[0] == (vocab, 16)}
    assert set(chosen) == {1, 3} and all(key[3] == threads for key in lm_head._HEAD_LAYOUTS)
    assert chosen[3] in ("linear", "weight-major", *packed)
    assert one.shape == (1, vocab) and many.shape == (3, vocab)
    torch.testing.assert_close(one, expected[:1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(many, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one, many[:1], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch._C.has_mkl, reason="MKL's packed GEMM is in x86 builds of torch only")
def test_a_packed_head_follows_its_weight_when_the_weight_changes():
    """The packed copy of a head is made once per row count and made again when the weight changes in place (a
    load_state_dict, an optimizer step): never a stale product."""
    from mmformer.generation import lm_head

    weight, h = torch.randn(300, 16), torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(lm_head.project(weight, h, "mkl-packed"), h @ weight.T, atol=1e-5, rtol=1e-5)
        first = lm_head._packed_weight(weight, 4)
        assert lm_head._packed_weight(weight, 4) is first  # kept
        weight.mul_(-2.0)  # in place: the version counter moves
        torch.testing.assert_close(lm_head.project(weight, h, "mkl-packed"), h @ weight.T, atol=1e-5, rtol=1e-5)
        assert lm_head._packed_weight(weight, 4) is not first
        for rows in range(1, 2 + lm_head._PACKS_PER_WEIGHT):
            lm_head.project(weight, h[:1].expand(rows, -1), "mkl-packed")
        assert len(lm_head._packed[id(weight)]) == lm_head._PACKS_PER_WEIGHT  # a bounded number of copies
    key = id(weight)
    del weight
    assert key not in lm_head._packed  # freed with the weight


# ---------------------------------------------------------------- the cache changes nothing
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("memory", ["image", "audio"])
def test_cache_equals_recompute(build, scheme, memory):
    model = build(scheme)
    inputs = memory_inputs(memory)
    for num_beams in (1, 3):
        cached = generate(model, **inputs, max_new_tokens=8, num_beams=num_beams)
        uncached = generate(model, **inputs, max_new_tokens=8, num_beams=num_beams, use_cache=False)
        assert cached.shape == (B, 9)
        assert torch.equal(cached, uncached), (scheme, memory, num_beams)


def test_cache_equals_recompute_with_prompt_and_stops(build):
    model = build()
    inputs = memory_inputs("image")
    prompt = torch.tensor([[1, 5, 6], [1, 7, 8], [1, 9, 10]])
    free = generate(model, **inputs, prompt_ids=prompt, max_new_tokens=8)
    model.config.text.eos_id = int(free[0, 5])  # a token row 0 emits: rows now stop on their own
    for num_beams in (1, 2):
        kw = dict(prompt_ids=prompt, max_new_tokens=8, num_beams=num_beams)
        assert torch.equal(generate(model, **inputs, **kw), generate(model, **inputs, **kw, use_cache=False))


@pytest.mark.slow
def test_compiled_step_equals_eager(build):
    """generate(compile=True) runs the cached step through torch.compile: the same ids for greedy, beam search and
    sampling, over a padded audio memory (the mask stays in the graph); greedy's 80 tokens also outgrow the first
    cache (65 positions), which is replaced by a larger one mid-decode (sampling may stop at an end-of-sequence token
    first: with this seed every row does after 19 tokens; beam search, 12 tokens, stays within it). One graph per row
    layout, whatever the cache's size and the tokens' strides. (Learned absolute positions through inductor:
    tests/test_static_cache.py::test_compiled_static_step_equals_eager_with_inductor.)"""
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    model = build("rope")
    inputs = memory_inputs("audio")
    for new_tokens, kw in ((80, dict()), (12, dict(num_beams=3)), (80, dict(top_k=5))):
        options = dict(max_new_tokens=new_tokens, **kw)
        eager = generate(model, **inputs, **options, generator=torch.Generator().manual_seed(0))
        compiled = generate(model, **inputs, **options, compile=True, generator=torch.Generator().manual_seed(0))
        assert compiled.shape[1] == 1 + new_tokens or model.config.text.eos_id in compiled
        assert torch.equal(compiled, eager), kw
    # greedy's and sampling's rows one graph, through both caches; the beams, which share memory rows, another (a full
    # cache and the strides of a beam's tokens each compiled another: six graphs in all)
    assert counters["stats"]["unique_graphs"] - graphs == 2


# ---------------------------------------------------------------- search strategies
def test_prompt_is_kept_and_defaults_to_bos(build):
    model = build()
    inputs = memory_inputs("image")
    ids = generate(model, **inputs, max_new_tokens=4)
    assert ids.dtype == torch.long and (ids[:, 0] == model.config.text.bos_id).all()
    prompt = torch.tensor([1, 4, 5])  # one prompt for every row
    ids = generate(model, **inputs, prompt_ids=prompt, max_new_tokens=4)
    assert ids.shape == (B, 7) and (ids[:, :3] == prompt).all()


@pytest.mark.parametrize("memory", ["image", "audio"])
def test_one_beam_equals_greedy(build, memory):
    """Beam search itself (not generate's greedy route for num_beams=1) with one beam keeps the most likely token
    each step; with length_penalty=0 a finished hypothesis can never be beaten, so it also stops where greedy does."""
    model = build()
    inputs = memory_inputs(memory)

    def one_beam(max_new_tokens: int = 10) -> torch.Tensor:
        memory_states, memory_mask = _memory(model, inputs.get("image"), inputs.get("audio"),
                                             inputs.get("audio_lengths"), None)  # fmt: skip
        prompt = torch.full((memory_states.shape[0], 1), model.config.text.bos_id)
        text = model.config.text
        runner = DecoderRunner(model, memory_states, memory_mask, 1 + max_new_tokens, use_cache=True)
        with torch.inference_mode():
            return BeamSearch(1, 0.0, text.eos_id, text.pad_id).run(runner, prompt, 1 + max_new_tokens)

    greedy = free_run(model, inputs, max_new_tokens=10)  # no row stops: every step compared
    assert torch.equal(one_beam(), greedy)
    model.config.text.eos_id = int(greedy[1, 4])  # with rows that stop, too
    greedy = generate(model, **inputs, max_new_tokens=10)
    assert torch.equal(one_beam(), greedy)


def test_beam_search_scores_at_least_greedy(build):
    """Without eos and with length_penalty=0, beam search maximises the summed log-probability: never below greedy."""
    model = build()
    inputs = memory_inputs("image")
    memory, mask = model.encode_image_tokens(inputs["image"])

    def logprob(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logp = model.decode(ids[:, :-1], memory, mask).log_softmax(-1)
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)

    greedy = generate(model, **inputs, max_new_tokens=6)
    beam = generate(model, **inputs, max_new_tokens=6, num_beams=4, length_penalty=0.0)
    assert (logprob(beam) >= logprob(greedy) - 1e-5).all()


def test_sampling_is_reproducible_and_top_k_1_is_greedy(build):
    model = build()
    inputs = memory_inputs("image")
    a = generate(model, **inputs, max_new_tokens=10, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = generate(model, **inputs, max_new_tokens=10, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = generate(model, **inputs, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)  # 30 draws from a 32-token vocabulary at temperature 1.5: never all equal
    greedy = generate(model, **inputs, max_new_tokens=10)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, **inputs, max_new_tokens=10, top_k=1, temperature=0.7, generator=gen), greedy)
    assert torch.equal(generate(model, **inputs, max_new_tokens=10, top_p=1e-6, generator=gen), greedy)
    # uncached sampling draws the same tokens from the same generator state
    d = generate(model, **inputs, max_new_tokens=10, temperature=1.5, generator=torch.Generator().manual_seed(7))
    e = generate(
        model, **inputs, max_new_tokens=10, temperature=1.5, use_cache=False, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(d, e)


def test_options_resolve_do_sample():
    assert DecodingOptions().sample is False
    assert DecodingOptions(top_k=5).sample is True
    assert DecodingOptions(top_p=0.9).sample is True
    assert DecodingOptions(temperature=0.5).sample is True
    assert DecodingOptions(temperature=0.5, do_sample=False).sample is False
    with pytest.raises(AttributeError):
        DecodingOptions().num_beams = 2  # frozen
    # options are written once: built from defaults plus changes, and replace() re-derives sampling
    assert DecodingOptions.build(top_k=5).sample is True
    assert DecodingOptions.build(DecodingOptions(top_k=5), top_k=None).sample is False
    with pytest.raises(ValueError, match="num_beams"):
        DecodingOptions.build(DecodingOptions(top_k=5), num_beams=2)
    with pytest.raises(TypeError, match=r"unknown decoding option\(s\) \['beams'\]; expected some of"):
        DecodingOptions.build(beams=2)


# ---------------------------------------------------------------- stopping
def free_run(model, inputs, **options):
    """Generate with eos and pad set to ids the model does not emit for these inputs, so no row stops early."""
    text = model.config.text
    for _ in range(5):
        ids = generate(model, **inputs, **options)
        emitted = set(ids[:, 1:].flatten().tolist())
        if text.eos_id not in emitted and text.pad_id not in emitted:
            return ids
        unused = [i for i in range(text.vocab_size - 1, 2, -1) if i not in emitted]
        text.eos_id, text.pad_id = unused[0], unused[1]
    raise AssertionError("every id is emitted: no free eos/pad for this seed")


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_stop_at_eos_and_are_padded(build, use_cache):
    model = build()
    # a different prompt per row, so that the rows' continuations differ whatever the random weights make of the
    # images (a tiny random decoder may continue every image alike)
    inputs = {**memory_inputs("image"), "prompt_ids": torch.tensor([[1, 3], [1, 4], [1, 5]])}
    text = model.config.text
    free = free_run(model, inputs, max_new_tokens=10)
    # an eos id that ends the rows at different steps: a token some row emits before another row does
    for eos in free[:, 2:].flatten().tolist():
        expected, ends = cut_at_eos(free, 2, eos, text.pad_id)
        if len(set(ends)) > 1:
            break
    assert len(set(ends)) > 1, "no token of the free run ends the rows at different steps"
    text.eos_id = eos
    ids = generate(model, **inputs, max_new_tokens=10, use_cache=use_cache)
    assert torch.equal(ids, expected)  # each row is the free run up to its first eos, then padding
    beams = generate(model, **inputs, max_new_tokens=10, num_beams=2, use_cache=use_cache)
    for row in beams.tolist():  # beam hypotheses: eos at most once, then only padding
        if eos in row[2:]:
            end = row.index(eos, 2)
            assert all(t == text.pad_id for t in row[end + 1 :])
        else:
            assert len(row) == 12


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("use_cache", [True, False])
def test_position_table_end_stops_cleanly(build, num_beams, use_cache):
    model = build("learned")  # 16 text positions
    inputs = memory_inputs("image")
    model.config.text.eos_id = 31
    ids = generate(model, **inputs, max_new_tokens=100, num_beams=num_beams, use_cache=use_cache)
    assert ids.shape[1] <= 16
    full = generate(model, **inputs, prompt_ids=torch.ones(B, 16, dtype=torch.long), max_new_tokens=5)
    assert full.shape == (B, 16)  # no room left: the prompt comes back
    with pytest.raises(ValueError, match=r"prompt_ids: 17 tokens exceed .*max_length=16"):
        generate(model, **inputs, prompt_ids=torch.ones(B, 17, dtype=torch.long))


def test_relative_positions_decode_past_the_text_table(build):
    model = build("rope")  # no absolute text positions: nothing ends at 16
    ids = free_run(model, memory_inputs("image"), max_new_tokens=20)
    assert ids.shape == (B, 21)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_beams=0), r"num_beams: expected an int >= 1, got 0"),
        (dict(num_beams=2.0), r"num_beams: expected an int >= 1, got 2.0"),
        (dict(top_p=0.0), r"top_p: expected None or a number in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p: expected None or a number in \(0, 1\], got 1.5"),
        (dict(top_k=0), r"top_k: expected None or an int >= 1, got 0"),
        (dict(temperature=0.0), r"temperature: expected a number > 0"),
        (dict(temperature=-1.0), r"temperature: expected a number > 0.*got -1.0"),
        (dict(max_new_tokens=0), r"max_new_tokens: expected an int >= 1, got 0"),
        (dict(length_penalty=float("nan")), r"length_penalty: expected a finite number"),
        (dict(num_beams=3, top_k=5), r"num_beams=3 with sampling .* is not supported"),
        (dict(compile="yes"), r"compile: expected True or False, got 'yes'"),
        (dict(compile=True, use_cache=False), r"compile=True .* needs use_cache=True"),
        (dict(min_new_tokens=50, max_new_tokens=3), r"min_new_tokens: expected at most max_new_tokens \(3\), got 50"),
    ],
)
def test_bad_options_raise(build, options, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**options)
    with pytest.raises(ValueError, match=message):  # before any model work
        generate(build(), **memory_inputs("image"), **options)


def test_bad_inputs_raise(build, make_model_config):
    model = build()
    image, audio = memory_inputs("image")["image"], memory_inputs("audio")["audio"]
    with pytest.raises(ValueError, match=r"at most one of image=, audio=, audio_features=.*got \['image', 'audio'\]"):
        generate(model, image=image, audio=audio)
    with pytest.raises(ValueError, match=r"expected prompt_ids=.* or one of image=, audio=.*got none"):
        generate(model)
    with pytest.raises(ValueError, match=r"prompt_ids: expected 3 rows .* got shape \(2, 2\)"):
        generate(model, image=image, prompt_ids=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prompt_ids: expected ids in \[0, 32\), got min 1, max 99"):
        generate(model, image=image, prompt_ids=torch.tensor([1, 99]))
    with pytest.raises(ValueError, match=r"prompt_ids: expected integer ids"):
        generate(model, image=image, prompt_ids=torch.ones(B, 2))
    text_only = MultimodalTransformer(make_model_config(routes={"image": "shared", "text": "shared"}, audio=None))
    with pytest.raises(ValueError, match=r"generate: this model has no decoder"):
        generate(text_only, image=image)


def test_language_and_task_are_checked_and_never_silently_ignored(build, make_model_config):
    """``language=`` / ``task=`` choose tokens of the default prompt (Whisper's): a bad one is named even with a
    prompt, and a prompt with them is refused — it replaced them, and they were ignored without a word."""
    gen = GenerationConfig(language_ids={"en": 5, "fr": 6}, task_ids={"transcribe": 7, "translate": 8})
    model = MultimodalTransformer(make_model_config(generation=gen)).eval()
    image = memory_inputs("image")["image"]
    ids = generate(model, image=image, language="fr", task="translate", max_new_tokens=2)
    assert ids[:, 1:3].tolist() == [[6, 8]] * B
    prompt = torch.tensor([1, 5, 7])
    for choice, message in [
        (dict(language="xx"), r"language: expected one of this checkpoint's codes \['en', 'fr'\], got 'xx'"),
        (dict(task="dance"), r"task: expected one of this checkpoint's tasks \['transcribe', 'translate'\], got "
                             r"'dance'"),
        (dict(language="fr"), r"language='fr', task=None: they choose tokens of the default decoder prompt, which "
                              r"prompt_ids= replaces \(they would be ignored\); put their tokens in prompt_ids"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            generate(model, image=image, prompt_ids=prompt, **choice)
    with pytest.raises(ValueError, match=r"language / task: this model has no such tokens; got language='en'"):
        generate(build(), image=image, prompt_ids=prompt, language="en")


# ---------------------------------------------------------------- caption / transcribe
@pytest.fixture
def processor() -> Processor:
    """A word-level tokenizer over the tiny 32-token vocabulary: <pad>, <bos>, <eos>, then w3 … w31."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 32)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tokenizer = Tokenizer(backend, max_length=16, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    return Processor(tokenizer, image=ImageProcessorConfig(image_size=16), audio=AudioProcessorConfig(sample_rate=8000))


def test_caption_and_transcribe(build, processor):
    model = build()
    pixels = torch.randn(2, 3, 16, 16)
    ids = generate(model, image=pixels, max_new_tokens=5)
    expected = [" ".join(f"w{t}" for t in row[1:] if t > 2) for row in ids.tolist()]
    assert model.caption(pixels, processor=processor, max_new_tokens=5) == expected
    model.processor = processor  # the default processor
    images = [torch.rand(3, 20, 20), torch.rand(3, 16, 24)]  # raw images in [0, 1]: the processor resizes them
    assert len(model.caption(images, max_new_tokens=5)) == 2

    waves = [torch.randn(800) * 0.1, torch.randn(400) * 0.1]
    batch = processor(audio=waves, sampling_rate=8000)
    ids = generate(model, audio=batch["audio"], audio_lengths=batch["audio_lengths"], max_new_tokens=5, num_beams=2)
    expected = [" ".join(f"w{t}" for t in row[1:] if t > 2) for row in ids.tolist()]
    assert model.transcribe(waves, sample_rate=8000, max_new_tokens=5, num_beams=2) == expected
    prompt = torch.tensor([1, 5])  # the prompt is not part of the text
    ids = generate(model, **dict(zip(("audio", "audio_lengths"), batch.values())), prompt_ids=prompt, max_new_tokens=3)
    expected = [" ".join(f"w{t}" for t in row[2:] if t > 2) for row in ids.tolist()]
    assert model.transcribe(waves, sample_rate=8000, prompt_ids=prompt, max_new_tokens=3) == expected


def test_caption_needs_a_tokenizer(build):
    with pytest.raises(ValueError, match=r"caption: turning ids into text needs a Processor with a tokenizer"):
        build().caption(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"transcribe: turning ids into text needs a Processor with a tokenizer"):
        build().transcribe([torch.randn(800)], sample_rate=8000, processor=Processor())


def test_a_decoder_without_cross_attention_refuses_a_memory(make_model_config):
    """Its decode drops the memory: two different images were captioned with the same ids."""
    model = MultimodalTransformer(make_model_config(stack={"cross_attention": False})).eval()
    for kind in ("image", "audio"):
        with pytest.raises(ValueError, match=rf"generate: got {kind}=, .* has no cross-attention"):
            generate(model, **memory_inputs(kind), max_new_tokens=2)
    bos = model.config.text.bos_id
    assert generate(model, prompt_ids=torch.tensor([[bos]]), max_new_tokens=2).shape[1] >= 1  # a prompt alone is fine
