"""Decoder-only language models: left-padded batched prompts continue exactly as each prompt alone (every position
scheme, greedy and beams, with and without the KV cache), sampling is reproducible, repetition penalty and stop
strings behave as Hugging Face's, ``complete`` and ``mmformer complete`` work on text, T5's relative bias is its
bucketing formula, and bad prompts fail with errors that name them.

As in test_generation.py, the tiny models untie the LM head and give it and the token table unit-variance weights, so
logits differ by wide margins and no path can disagree with another through float rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmformer.cli.main import main
from mmformer.config import GenerationConfig, ModelConfig, StackConfig, TextConfig
from mmformer.generation.decoding import generate, left_pad
from mmformer.generation.options import DecodingOptions
from mmformer.generation.score_processing import RepetitionPenalty
from mmformer.layers.positions import RelativePositionBias, t5_buckets
from mmformer.model import MultimodalTransformer
from mmformer.preprocess.processor import Processor
from mmformer.preprocess.tokenizer import Tokenizer

V = 300
SCHEMES = {  # text embedder positions, stack positions
    "learned": ({"position": "learned"}, {}),
    "sinusoidal": ({"position": "sinusoidal"}, {}),
    "rope-gqa": ({"position": "none"}, {"position": "rope", "n_kv_heads": 2}),
    "alibi": ({"position": "none"}, {"position": "alibi"}),
    "t5": ({"position": "none"}, {"position": "t5", "relative_buckets": 8, "relative_max_distance": 16}),
}
PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]


def language_model(scheme: str = "learned", vocab_size: int = V, **text) -> MultimodalTransformer:
    text_overrides, stack_overrides = SCHEMES[scheme]
    stack = StackConfig(width=16, depth=2, n_heads=4, mlp_ratio=2.0, **stack_overrides)
    config = ModelConfig(
        stacks={"decoder": stack},
        routes={"decoder": "decoder"},
        image=None,
        audio=None,
        text=TextConfig(vocab_size=vocab_size, max_length=48, **{**text_overrides, **text}),
        embed_dim=None,
        tie_lm_head=False,
    )
    model = MultimodalTransformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        model.text_embed.tokens.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = ["the cat sat on the mat.", "a dog ran in the park!", "once upon a time there was a king.\n"] * 4
    return Tokenizer.train(texts, vocab_size=V, max_length=48)


def sentencepiece_tokenizer() -> Tokenizer:
    """A Llama-style tokenizer (ids 0-2: <unk>, <s>, </s>): SentencePiece BPE, spaces as "▁" (Metaspace), byte
    fallback, and a decoder that strips the space the first piece of a text begins with ("▁there" alone → "there")."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["once upon a time there was a king who lived in a castle"] * 5, trainer)
    return Tokenizer(backend, max_length=48, pad_token="<unk>", bos_token="<s>", eos_token="</s>", append_eos=False)


# ---------------------------------------------------------------- left padding
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_left_padded_prompts_continue_as_each_alone(scheme):
    model = language_model(scheme)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    width = ids.shape[1]
    for num_beams in (1, 3):
        batch = generate(model, prompt_ids=ids, prompt_mask=mask, max_new_tokens=12, num_beams=num_beams)
        assert batch.shape == (3, width + 12)
        uncached = generate(model, prompt_ids=ids, prompt_mask=mask, max_new_tokens=12, num_beams=num_beams,
                            use_cache=False)  # fmt: skip
        assert torch.equal(batch, uncached), (scheme, num_beams)
        for row, prompt in zip(batch, PROMPTS):
            alone = generate(model, prompt_ids=[prompt], max_new_tokens=12, num_beams=num_beams)[0]
            assert torch.equal(row[width - len(prompt) :], alone), (scheme, num_beams)
    ragged = generate(model, prompt_ids=PROMPTS, max_new_tokens=12)  # a ragged list is left-padded the same way
    assert torch.equal(ragged, generate(model, prompt_ids=ids, prompt_mask=mask, max_new_tokens=12))


@pytest.mark.parametrize("scheme", ["learned", "rope-gqa"])
def test_a_learned_decoder_prefix_with_left_padded_prompts(scheme):
    model = language_model(scheme)
    prefix = torch.randn(3, 16)  # prompt tuning's vectors, read before every prompt
    ids, mask = left_pad(PROMPTS, pad_id=0)
    batch = generate(model, prompt_ids=ids, prompt_mask=mask, prefix_embeds=prefix, max_new_tokens=8)
    assert torch.equal(batch, generate(model, prompt_ids=ids, prompt_mask=mask, prefix_embeds=prefix,
                                       max_new_tokens=8, use_cache=False))  # fmt: skip
    for row, prompt in zip(batch, PROMPTS):
        alone = generate(model, prompt_ids=[prompt], prefix_embeds=prefix, max_new_tokens=8)[0]
        assert torch.equal(row[ids.shape[1] - len(prompt) :], alone)


def test_padded_decode_logits_equal_each_row_alone():
    model = language_model("rope-gqa")
    ids, mask = left_pad(PROMPTS, pad_id=0)
    cache = model.make_cache(3)
    batch = model.decode(ids, attention_mask=mask, cache=cache)
    step = model.decode(torch.tensor([[20], [21], [22]]), cache=cache)  # one more token after the padded prompts
    for i, prompt in enumerate(PROMPTS):
        alone = model.decode(torch.tensor([prompt + [20 + i]]))
        torch.testing.assert_close(batch[i, mask[i]], alone[0, :-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- sampling, penalties, stop strings
def test_sampling_is_reproducible_and_cached_equals_uncached():
    model = language_model("rope-gqa")
    ids, mask = left_pad(PROMPTS, pad_id=0)
    options = dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=16, top_k=50, top_p=0.9, temperature=1.3)
    first = generate(model, **options, generator=torch.Generator().manual_seed(7))
    again = generate(model, **options, generator=torch.Generator().manual_seed(7))
    uncached = generate(model, **options, use_cache=False, generator=torch.Generator().manual_seed(7))
    other = generate(model, **options, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and torch.equal(first, uncached)
    assert not torch.equal(first, other)


def test_repetition_penalty_is_hugging_faces():
    transformers = pytest.importorskip("transformers")
    scores, tokens = torch.randn(4, 50), torch.randint(0, 50, (4, 9))
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.7)(tokens, scores.clone())
    torch.testing.assert_close(RepetitionPenalty(1.7)(scores, tokens, step=0), expected)
    model = language_model("learned")
    plain = generate(model, prompt_ids=PROMPTS, max_new_tokens=20)
    penalised = generate(model, prompt_ids=PROMPTS, max_new_tokens=20, repetition_penalty=50.0)
    assert not torch.equal(plain, penalised)
    for row in penalised[:, 7:].tolist():  # a huge penalty leaves no token twice while unseen ones remain
        row = row[: row.index(2) + 1] if 2 in row else row  # up to its eos (padding after it)
        assert len(set(row)) == len(row)


def test_stop_strings_end_rows_and_complete_cuts_them(tokenizer):
    model = language_model("learned", vocab_size=tokenizer.vocab_size)
    model.processor = Processor(tokenizer)
    prompts = ["the cat", "once upon a time"]
    free = model.complete(prompts, max_new_tokens=12)
    stop = free[0][3:6]  # a string the first row produces
    assert stop and stop in free[0]
    prompt_ids, prompt_mask = left_pad([tokenizer.encode(p)[:-1] for p in prompts], tokenizer.pad_id)
    ids = generate(model, prompt_ids=prompt_ids, prompt_mask=prompt_mask, max_new_tokens=12, stop_strings=[stop],
                   tokenizer=tokenizer)  # fmt: skip
    generated = ids[0, prompt_ids.shape[1] :].tolist()
    while generated[-1] == tokenizer.pad_id:  # the row ended: padded from its stop on
        generated.pop()
    assert stop in tokenizer.decode(generated) and stop not in tokenizer.decode(generated[:-1])
    stopped = model.complete(prompts, max_new_tokens=12, stop_strings=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)]  # the text before the stop string (OpenAI's `stop`)
    assert stopped[1] == free[1].split(stop)[0]
    with pytest.raises(ValueError, match=r"stop_strings: expected a list of non-empty strings, got \[''\]"):
        DecodingOptions(stop_strings=[""])
    bare = language_model("learned", vocab_size=tokenizer.vocab_size)
    with pytest.raises(ValueError, match=r"stop_strings: finding them needs a tokenizer"):
        generate(bare, prompt_ids=[1, 5], stop_strings=["x"])


# ---------------------------------------------------------------- complete
def test_a_sentencepiece_continuation_keeps_its_space_as_hugging_faces_pipeline_cuts_it(tokenizer):
    """The text of a continuation is what it adds to the prompt's text (Hugging Face's text-generation pipeline:
    the prompt and continuation decoded together, less the decoded prompt): a Llama tokenizer's decoder strips the
    space of a text's first piece, so the continuation decoded alone lost it ("who lived in" + "there"). A byte-level
    BPE (GPT-2) keeps every space: its text is its tokens decoded, as before."""
    sentencepiece = sentencepiece_tokenizer()
    for tok, prompts in [
        (sentencepiece, ["once upon", "who lived in", "a king", "there was", "time"]),
        (tokenizer, ["the cat", "once upon a time", "a dog"]),
    ]:
        model = language_model("rope-gqa", vocab_size=tok.vocab_size)
        model.processor = Processor(tok)
        if tok is sentencepiece:  # the case that lost its space: each continuation begins with a "▁" piece
            unspaced = [i for piece, i in tok.backend.get_vocab().items() if not piece.startswith("▁")]
            model.config.generation = GenerationConfig(begin_suppress_tokens=unspaced)
        texts = model.complete(prompts, max_new_tokens=8)
        for prompt, text in zip(prompts, texts):
            ids = tok.encode(prompt)
            ids = ids[:-1] if ids[-1] == tok.eos_id else ids
            new = generate(model, prompt_ids=[ids], max_new_tokens=8)[0, len(ids) :].tolist()
            whole = tok.backend.decode(ids + new)  # skips the special tokens
            assert text == whole[len(tok.backend.decode(ids)) :], (prompt, text, whole)
            assert text.startswith(" ") if tok is sentencepiece else text == tok.decode(new)


def test_complete_texts_of_different_lengths(tokenizer):
    model = language_model("rope-gqa", vocab_size=tokenizer.vocab_size)
    model.processor = Processor(tokenizer)
    prompts = ["the cat sat on", "a dog", "once upon a time there"]
    batch = model.complete(prompts, max_new_tokens=10)
    assert [model.complete(p, max_new_tokens=10)[0] for p in prompts] == batch
    beams = model.complete(prompts, max_new_tokens=10, num_beams=2)
    assert len(beams) == 3 and all(isinstance(t, str) for t in beams)
    ids = [tokenizer.encode(p)[:-1] for p in prompts]  # ids without the template's eos work too
    assert model.complete(ids, max_new_tokens=10) == batch


def test_bad_prompts_are_named(tokenizer):
    model = language_model("learned", vocab_size=tokenizer.vocab_size)
    model.processor = Processor(tokenizer)
    with pytest.raises(ValueError, match=r"prompts: expected a str, a list of str or prompt ids, got an empty list"):
        model.complete([])
    with pytest.raises(ValueError, match=r"prompt_ids: expected at least one prompt, got an empty list"):
        generate(model, prompt_ids=[])
    with pytest.raises(ValueError, match=r"prompts\[1\]: \d+ tokens exceed the model's context .*max_length=48"):
        model.complete(["the cat", "the cat sat on the mat. " * 12])
    with pytest.raises(ValueError, match=r"prompt_ids: 49 tokens exceed the model's context .*max_length=48"):
        generate(model, prompt_ids=torch.ones(2, 49, dtype=torch.long))
    with pytest.raises(ValueError, match=r"prompt_mask: every prompt needs at least one real token"):
        generate(model, prompt_ids=torch.ones(2, 3, dtype=torch.long), prompt_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"generate: expected prompt_ids= .* got none"):
        generate(model)
    with pytest.raises(ValueError, match=r"complete: turning ids into text needs a Processor with a tokenizer"):
        language_model("learned").complete("the cat")


def test_only_a_language_model_completes_bare_prompts(tokenizer):
    """A decoder that reads an encoder's states (a captioner / speech model, a text-to-text model with its own
    encoder stack) continues no bare prompt: ``complete`` says what to call instead (the digits model answered
    "hello" with digits before), and the server offers no /v1/completions for it; a language model — also one that
    shares a cross-attention stack with its text tower (trained here with ``lm``) — completes."""
    from mmformer.config import ImageConfig
    from mmformer.generation.completion import continues_prompts
    from mmformer.serve.engine import served_routes

    shared = StackConfig(width=16, depth=2, n_heads=4, mlp_ratio=2.0, cross_attention=True)
    text = TextConfig(vocab_size=tokenizer.vocab_size, max_length=48)
    image = ImageConfig(image_size=16, patch_size=8, channels=3)
    cases = {
        "captioner": ({"shared": shared}, {"image": "shared", "text": "shared", "decoder": "shared"}, image, False),
        "text-to-text": (
            {"encoder": shared, "decoder": shared},
            {"text": "encoder", "decoder": "decoder"},
            None,
            False,
        ),
        "lm, shared cross-attention stack": ({"shared": shared}, {"text": "shared", "decoder": "shared"}, None, True),
        "lm": ({"decoder": StackConfig(width=16, depth=2, n_heads=4)}, {"decoder": "decoder"}, None, True),
    }
    for name, (stacks, routes, img, completes) in cases.items():
        config = ModelConfig(stacks=stacks, routes=routes, image=img, audio=None, text=text, embed_dim=16)
        model = MultimodalTransformer(config).eval()
        model.processor = Processor(tokenizer)
        assert continues_prompts(model) is completes, name
        assert ("completions" in served_routes(model)) is completes, name
        if completes:
            assert len(model.complete("the cat", max_new_tokens=3)) == 1
        else:
            with pytest.raises(ValueError, match=r"complete: this model's decoder reads an encoder's states"):
                model.complete("the cat", max_new_tokens=3)


def test_input_ids_is_the_prompt_of_every_model_that_completes():
    """Hugging Face's ``generate(input_ids=...)`` is a language model's prompt — also one whose text route shares the
    decoder's cross-attention stack (trained here with ``lm``), which ``complete`` continues: ``generate`` took its
    input_ids for an encoder's. Only a text-to-text model's (T5's) are its encoder's input."""
    from mmformer.generation.completion import continues_prompts

    shared = StackConfig(width=16, depth=2, n_heads=4, mlp_ratio=2.0, cross_attention=True)
    text = TextConfig(vocab_size=V, max_length=48)
    config = ModelConfig(stacks={"shared": shared}, routes={"text": "shared", "decoder": "shared"}, image=None,
                         audio=None, text=text, embed_dim=16)  # fmt: skip
    model = MultimodalTransformer(config).eval()
    assert continues_prompts(model)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    expected = generate(model, prompt_ids=ids, prompt_mask=mask, max_new_tokens=6)
    assert torch.equal(generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=6), expected)


def test_a_prompt_samples_the_same_text_in_any_batch_with_a_generator_of_its_own(tokenizer):
    """One generator per prompt (``row_generators``: the ``complete`` command's ``--seed``): a prompt's samples do
    not depend on the prompts decoded with it; greedy decoding draws nothing and is unchanged."""
    from mmformer.generation.token_choice import row_generators

    model = language_model("rope-gqa", vocab_size=tokenizer.vocab_size)
    model.processor = Processor(tokenizer)
    prompts = ["the cat", "a dog", "once upon a time"]
    sampling = dict(max_new_tokens=10, do_sample=True, temperature=1.5)
    together = model.complete(prompts, generator=row_generators(3, 3), **sampling)
    alone = [model.complete([p], generator=row_generators(3, 1, first=i), **sampling)[0] for i, p in enumerate(prompts)]
    assert together == alone
    assert model.complete(prompts[1:], generator=row_generators(3, 2, first=1), **sampling) == together[1:]
    assert together != model.complete(prompts, generator=row_generators(4, 3), **sampling)  # the seed matters
    greedy = model.complete(prompts, max_new_tokens=10)
    assert model.complete(prompts, generator=row_generators(3, 3), max_new_tokens=10) == greedy
    with pytest.raises(ValueError, match=r"generator: expected one torch.Generator per prompt \(3\), got 2"):
        model.complete(prompts, generator=row_generators(3, 2), **sampling)
    with pytest.raises(TypeError, match=r"generator: expected a torch.Generator or a list of one per prompt, got 3"):
        model.complete(prompts, generator=3, **sampling)


def test_complete_command(tokenizer, tmp_path, capsys):
    model = language_model("learned", vocab_size=tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "lm", processor=Processor(tokenizer))
    main(["complete", "--model", str(tmp_path / "lm"), "the cat", "a dog", "--max-new-tokens", "6",
          "--top-k", "5", "--seed", "3", "--stop-strings", "zzz"])  # fmt: skip
    out = capsys.readouterr().out
    main(["complete", "--model", str(tmp_path / "lm"), "the cat", "a dog", "--max-new-tokens", "6",
          "--top-k", "5", "--seed", "3", "--stop-strings", "zzz"])  # fmt: skip
    assert out == capsys.readouterr().out  # the seed makes samples reproducible
    first, second = out.split("\n\n")
    assert first.startswith("the cat") and second.startswith("a dog")
    with pytest.raises(SystemExit, match=r"mmformer complete: error: prompts\[0\]: \d+ tokens exceed"):
        main(["complete", "--model", str(tmp_path / "lm"), "the cat sat on the mat. " * 12])


def test_complete_command_streams_what_it_prints_whole(tokenizer, tmp_path, capsys, monkeypatch):
    """``--stream`` prints each continuation piece by piece as it is decoded: the same text as without it."""
    from mmformer.generation import streaming

    model = language_model("learned", vocab_size=tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "lm", processor=Processor(tokenizer))
    command = ["complete", "--model", str(tmp_path / "lm"), "--max-new-tokens", "6"]
    whole = []
    for prompt in ("the cat", "a dog"):  # one row each, as the stream decodes them
        main([*command, prompt])
        whole.append(capsys.readouterr().out)
    pieces = []
    on_text = streaming.TextStreamer.on_text
    monkeypatch.setattr(streaming.TextStreamer, "on_text", lambda self, text, stream_end=False: (
        pieces.append(text), on_text(self, text, stream_end)))  # fmt: skip
    main([*command, "the cat", "a dog", "--stream"])
    assert capsys.readouterr().out == "\n".join(whole)
    assert sum(bool(p) for p in pieces) >= 2  # more than one piece: streamed, not printed at the end
    with pytest.raises(SystemExit, match=r"--stream: streaming decodes greedily or by sampling; got --num-beams 3"):
        main([*command, "the cat", "--stream", "--num-beams", "3"])


def test_complete_command_samples_each_prompt_alike_in_any_batch_and_stream(tokenizer, tmp_path, capsys):
    """With ``--seed``, a prompt's sampled continuation is the same whatever ``--batch-size``, and ``--stream``
    prints it too (one generator shared by the batch made it depend on the batch's layout)."""
    model = language_model("learned", vocab_size=tokenizer.vocab_size)
    model.save_pretrained(tmp_path / "lm", processor=Processor(tokenizer))
    command = ["complete", "--model", str(tmp_path / "lm"), "the cat", "a dog", "once upon", "--max-new-tokens", "8",
               "--top-k", "20", "--temperature", "1.5", "--seed", "3"]  # fmt: skip
    outputs = []
    for layout in ([], ["--batch-size", "1"], ["--batch-size", "2"], ["--stream"]):
        main([*command, *layout])
        outputs.append(capsys.readouterr().out)
    assert outputs[1:] == outputs[:1] * 3, outputs


@pytest.mark.parametrize("command", ["complete", "caption", "transcribe"])
def test_a_batch_size_below_one_is_refused_by_the_parser(command, capsys):
    """--batch-size 0 printed nothing (caption) or "range() arg 3 must not be zero" (complete)."""
    with pytest.raises(SystemExit):
        main([command, "--model", "never-loaded", "--batch-size", "0", "input"])
    assert "argument --batch-size: expected an int >= 1, got '0'" in capsys.readouterr().err


# ---------------------------------------------------------------- T5 relative position bias
def t5_bucket_float64(relative: int, bidirectional: bool, n_buckets: int, max_distance: int) -> int:
    """Mesh TensorFlow's _relative_position_bucket for one relative position (key - query), in float64 Python."""
    bucket = 0
    if bidirectional:
        n_buckets //= 2
        bucket += n_buckets if relative > 0 else 0
        distance = abs(relative)
    else:
        distance = max(-relative, 0)
    exact = n_buckets // 2
    if distance < exact:
        return bucket + distance
    large = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (n_buckets - exact))
    return bucket + min(large, n_buckets - 1)


@pytest.mark.parametrize(("n_buckets", "max_distance"), [(32, 128), (8, 16), (16, 64), (6, 9)])
def test_t5_buckets_are_the_float64_formula(n_buckets, max_distance):
    relative = torch.arange(-300, 301)
    for bidirectional in (True, False):
        expected = [t5_bucket_float64(r, bidirectional, n_buckets, max_distance) for r in relative.tolist()]
        assert t5_buckets(relative, bidirectional, n_buckets, max_distance).tolist() == expected


def test_t5_bias_reads_its_table_and_the_decoders_is_causal():
    bias = RelativePositionBias(n_heads=3, n_buckets=8, max_distance=16)
    table = bias.weight.detach().double()
    for causal in (False, True):
        got = bias(q_len=4, k_len=10, causal=causal)  # queries are positions 6..9 of 10
        assert got.shape == (3, 4, 10)
        for i, q in enumerate(range(6, 10)):
            for k in range(10):
                bucket = t5_bucket_float64(k - q, not causal, 8, 16)
                assert torch.equal(got[:, i, k].double(), table[bucket])
    causal = bias(10, 10, causal=True)
    future = torch.ones(10, 10, dtype=torch.bool).triu(1)
    assert torch.equal(causal[:, future], table[0, :, None].float().expand(3, int(future.sum())))  # distance 0
    model = language_model("t5")  # and the decoder never reads a later token
    ids = torch.randint(3, V, (2, 9))
    changed = ids.clone()
    changed[:, 6:] = torch.randint(3, V, (2, 3))
    torch.testing.assert_close(model.decode(ids)[:, :6], model.decode(changed)[:, :6])
