"""Text families against Hugging Face: tiny random GPT-2, Llama (MHA, GQA, Llama 3 rope scaling; Qwen2), T5 (v1.0 and
v1.1) and BERT's masked-LM head, converted with the converters the product ships. Logits agree to 1e-4 on padded
batches; greedy and beam ids equal ``generate``'s for 32 new tokens from 3 left-padded prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from mmformer import from_pretrained  # noqa: E402
from mmformer.cli.main import main  # noqa: E402
from mmformer.convert import from_hf_bert, from_hf_gpt2, from_hf_llama, from_hf_t5  # noqa: E402
from mmformer.convert.common import UnsupportedModelError  # noqa: E402
from mmformer.generation.decoding import left_pad  # noqa: E402

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-4
V, PAD, BOS, EOS = 100, 0, 1, 2
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
NEW = 32
LLAMA_3_SCALING = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # with head size 8: low, medium and high frequencies all occur
}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight random (HF starts norms at 1 and biases at 0, which would hide a mapping error); norm gains
    near 1 and embeddings larger, so that logits are well separated and argmax / beams have no near-ties."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.normal_(1.0, 0.1) if name.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.3 if any(k in name for k in ("wte", "wpe", "embed", "shared", "lm_head")) else 0.1)
    return model.eval()


def gpt2(**overrides) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=BOS,
                        eos_token_id=EOS, pad_token_id=PAD, **overrides)  # fmt: skip
    return randomize(GPT2LMHeadModel(config))


LLAMAS = {
    "mha": (LlamaConfig, LlamaForCausalLM, {}),
    "gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
    "gqa-llama3-scaling": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, rope_parameters=LLAMA_3_SCALING)),
    "mqa-linear-scaling-tied": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
        ),  # fmt: skip
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
}


def llama(kind: str):
    config_cls, model_cls, overrides = LLAMAS[kind]
    sizes = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    ids = dict(max_position_embeddings=128, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    config = config_cls(**sizes, **ids, **overrides)
    return randomize(model_cls(config))


def t5(version: str) -> T5ForConditionalGeneration:
    ff = {"v1.0": "relu", "v1.1": "gated-gelu"}[version]
    # d_kv * num_heads (24) != d_model (32), as in T5 v1.1; decoder layers as many as encoder layers (transformers
    # 5.24's generate sizes its cache by num_layers)
    config = T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=3, feed_forward_proj=ff,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, pad_token_id=PAD,
                      eos_token_id=BOS, decoder_start_token_id=PAD, tie_word_embeddings=version == "v1.0")  # fmt: skip
    model = randomize(T5ForConditionalGeneration(config))
    if version == "v1.1":  # its own LM head (transformers 5 ties it at construction)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 0.3)
    return model


@pytest.fixture(scope="module")
def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad(PROMPTS, PAD)


def hf_generate(hf, num_beams: int, eos: int, repetition_penalty: float = 1.0, **inputs) -> torch.Tensor:
    config = GenerationConfig(do_sample=False, num_beams=num_beams, max_new_tokens=NEW, pad_token_id=PAD,
                              eos_token_id=eos, bos_token_id=BOS, decoder_start_token_id=PAD,
                              repetition_penalty=repetition_penalty)  # fmt: skip
    return hf.generate(**inputs, generation_config=config)


def after_eos_padded(ids: torch.Tensor, start: int, eos: int) -> torch.Tensor:
    """Ids with every token after a row's first generated eos set to PAD. Hugging Face's beam search fills finished
    rows with ``pad_token_id or eos_token_id``, i.e. with eos when the pad id is 0 (T5's); mmformer pads with pad_id."""
    ids = ids.clone()
    for row in ids:
        ends = (row[start:] == eos).nonzero()
        if len(ends):
            row[start + int(ends[0]) + 1 :] = PAD
    return ids


def decoder_only_logits(hf, model, ids, mask) -> float:
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)  # Hugging Face generate's position ids for left padding
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long(), position_ids=positions).logits
        got = model.decode(ids, attention_mask=mask)
    return (expected - got)[mask].abs().max().item()


# ---------------------------------------------------------------- GPT-2
@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    return gpt2()


def test_gpt2_logits_match(hf_gpt2, prompts):
    model = from_hf_gpt2(hf_gpt2)
    assert model.config.routes == {"decoder": "decoder"} and model.lm_head.weight is model.text_embed.tokens.weight
    assert not model.config.stacks["decoder"].cross_attention
    assert decoder_only_logits(hf_gpt2, model, *prompts) < ATOL
    right = torch.randint(3, V, (3, 9)), torch.arange(9).expand(3, 9) < torch.tensor([[9], [4], [6]])  # right-padded
    assert decoder_only_logits(hf_gpt2, model, *right) < ATOL


@pytest.mark.parametrize("num_beams", [1, 3])
def test_gpt2_generate_matches_hf(hf_gpt2, prompts, num_beams):
    model = from_hf_gpt2(hf_gpt2)
    ids, mask = prompts
    free = hf_generate(hf_gpt2, num_beams, EOS, input_ids=ids, attention_mask=mask.long())
    assert free.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(model.generate(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW, num_beams=num_beams), free)
    # an eos the rows do emit, at different steps: per-row stopping and padding agree too
    eos = int(free[0, ids.shape[1] + 5])
    model.config.text.eos_id = eos
    expected = hf_generate(hf_gpt2, num_beams, eos, input_ids=ids, attention_mask=mask.long())
    got = model.generate(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW, num_beams=num_beams)
    assert num_beams > 1 or (got == eos).any()  # beams may rank other hypotheses first
    assert torch.equal(after_eos_padded(got, ids.shape[1], eos), after_eos_padded(expected, ids.shape[1], eos))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_gpt2_repetition_penalty_matches_hf(hf_gpt2, prompts, num_beams):
    model = from_hf_gpt2(hf_gpt2)
    ids, mask = prompts
    expected = hf_generate(hf_gpt2, num_beams, EOS, repetition_penalty=1.8, input_ids=ids, attention_mask=mask.long())
    options = dict(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW, num_beams=num_beams)
    got = model.generate(**options, repetition_penalty=1.8)
    assert not torch.equal(got, model.generate(**options))
    assert torch.equal(after_eos_padded(got, ids.shape[1], EOS), after_eos_padded(expected, ids.shape[1], EOS))


def test_gpt2_from_a_folder_and_the_convert_command(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path / "hf")  # safetensors without the tied lm_head copy
    model = from_hf_gpt2(tmp_path / "hf")
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        expected = hf_gpt2(ids).logits
        assert (model.decode(ids) - expected).abs().max() < ATOL
    main(["convert", "--from", "hf_gpt2", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])
    with torch.no_grad():
        assert (from_pretrained(tmp_path / "ours").decode(ids) - expected).abs().max() < ATOL
        # the folder's model_type picks the converter (mmformer.io.auto.HF_CONVERTERS)
        assert (from_pretrained(tmp_path / "hf").decode(ids) - expected).abs().max() < ATOL


# ---------------------------------------------------------------- Llama / Qwen2
@pytest.fixture(scope="module")
def hf_llamas() -> dict:
    torch.manual_seed(0)
    return {kind: llama(kind) for kind in LLAMAS}


@pytest.mark.parametrize("kind", list(LLAMAS))
def test_llama_logits_match(hf_llamas, prompts, kind):
    hf = hf_llamas[kind]
    model = from_hf_llama(hf)
    stack = model.config.stacks["decoder"]
    assert stack.n_kv_heads == hf.config.num_key_value_heads and stack.norm == "rmsnorm" and stack.mlp == "swiglu"
    assert (stack.rope_scaling is not None) == ("scaling" in kind)
    assert model.config.tie_lm_head == ("tied" in kind)
    assert (stack.attention_bias == (True, False)) == (kind == "qwen2")
    assert decoder_only_logits(hf, model, *prompts) < ATOL


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kind", ["mha", "gqa", "gqa-llama3-scaling"])
def test_llama_generate_matches_hf(hf_llamas, prompts, kind, num_beams):
    hf = hf_llamas[kind]
    model = from_hf_llama(hf)
    ids, mask = prompts
    expected = hf_generate(hf, num_beams, EOS, input_ids=ids, attention_mask=mask.long())
    got = model.generate(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW, num_beams=num_beams)
    assert got.shape == expected.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(after_eos_padded(got, ids.shape[1], EOS), after_eos_padded(expected, ids.shape[1], EOS))


# ---------------------------------------------------------------- Hugging Face's decoder-only call
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kind", ["gpt2", "llama-gqa"])
def test_decoder_only_input_ids_are_the_prompt_as_in_hf(hf_gpt2, hf_llamas, prompts, kind, num_beams):
    """``generate(input_ids=, attention_mask=)`` on a decoder-only LM, as Hugging Face users call it: the same ids as
    ``prompt_ids=`` / ``prompt_mask=`` and as HF's ``generate``, for left-padded prompts of different lengths (the
    mask given as HF's integer mask, and ``input_ids`` also positionally, as HF's first argument)."""
    hf = hf_gpt2 if kind == "gpt2" else hf_llamas["gqa"]
    model = from_hf_gpt2(hf) if kind == "gpt2" else from_hf_llama(hf)
    ids, mask = prompts
    expected = hf_generate(hf, num_beams, EOS, input_ids=ids, attention_mask=mask.long())
    as_hf = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=NEW, num_beams=num_beams)
    positional = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=num_beams)
    ours = model.generate(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW, num_beams=num_beams)
    assert torch.equal(as_hf, ours) and torch.equal(positional, ours)
    assert as_hf.shape == expected.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(after_eos_padded(as_hf, ids.shape[1], EOS), after_eos_padded(expected, ids.shape[1], EOS))
    with pytest.raises(ValueError, match=r"input_ids: on a model without a text encoder it is the prompt .* got both"):
        model.generate(input_ids=ids, prompt_ids=ids)


# ---------------------------------------------------------------- T5
@pytest.fixture(scope="module", params=["v1.0", "v1.1"])
def hf_t5(request):
    torch.manual_seed(0)
    return request.param, t5(request.param)


def test_t5_logits_match(hf_t5, prompts):
    version, hf = hf_t5
    model = from_hf_t5(hf)
    assert model.config.routes == {"text": "encoder", "decoder": "decoder"}
    assert model.config.stacks["encoder"].position == "t5" and model.config.stacks["decoder"].head_dim == 8
    assert model.config.tie_lm_head == (version == "v1.0")
    ids, mask = prompts
    decoder_ids = torch.randint(0, V, (3, 12))
    decoder_mask = torch.arange(12).expand(3, 12) < torch.tensor([[12], [7], [9]])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=decoder_ids,
                      decoder_attention_mask=decoder_mask.long()).logits  # fmt: skip
        memory, memory_mask = model.encode_text_tokens(ids, mask)
        got = model.decode(decoder_ids, memory, memory_mask, decoder_mask)
    assert (expected - got)[decoder_mask].abs().max() < ATOL


@pytest.mark.parametrize("num_beams", [1, 3])
def test_t5_generate_matches_hf(hf_t5, prompts, num_beams):
    _, hf = hf_t5
    model = from_hf_t5(hf)
    ids, mask = prompts  # the encoder's inputs, left-padded
    expected = hf_generate(hf, num_beams, BOS, input_ids=ids, attention_mask=mask.long())
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, num_beams=num_beams)
    assert got.shape == expected.shape == (3, 1 + NEW)
    assert torch.equal(after_eos_padded(got, 1, BOS), after_eos_padded(expected, 1, BOS))


# ---------------------------------------------------------------- BERT masked LM
def test_bert_mlm_logits_match(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=40)  # fmt: skip
    hf = randomize(BertForMaskedLM(config))
    model = from_hf_bert(hf)
    assert model.config.mlm_head and model.mlm_head.decoder.weight is model.text_embed.tokens.weight
    ids = torch.randint(0, V, (3, 9))
    mask = torch.arange(9).expand(3, 9) < torch.tensor([[9], [6], [3]])
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long()).logits
        got = model.mlm_logits(ids, mask)
    assert (expected - got)[mask].abs().max() < ATOL
    model.save_pretrained(tmp_path)  # the tied head is stored once and tied again on loading
    loaded = from_pretrained(tmp_path)
    assert loaded.mlm_head.decoder.weight is loaded.text_embed.tokens.weight
    with torch.no_grad():
        assert (loaded.mlm_logits(ids, mask) - got).abs().max() == 0


# ---------------------------------------------------------------- refusals
def test_other_model_types_are_refused_by_name(hf_gpt2, tmp_path):
    hf_gpt2.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"expected a Llama model \(model_type 'llama' or 'qwen2'\), got "
                                                     r"model_type='gpt2'"):  # fmt: skip
        from_hf_llama(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"expected a T5 model .* got model_type='gpt2'"):
        from_hf_t5(hf_gpt2)
    with pytest.raises(UnsupportedModelError, match=r"hf_gpt2: scale_attn_by_inverse_layer_idx=True"):
        from_hf_gpt2(gpt2(scale_attn_by_inverse_layer_idx=True))
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0})  # fmt: skip
    with pytest.raises(UnsupportedModelError, match=r"hf_llama: rope_type='yarn'"):
        from_hf_llama(LlamaForCausalLM(config))


# ---------------------------------------------------------------- prompts, end ids and heads as users give them
def test_right_padded_prompts_continue_as_alone(hf_gpt2, prompts):
    """A right-padded batch (a tokenizer's usual layout, mmformer's processor's too) gives each row the continuation
    it has alone: it is left-padded before decoding. A mask with a gap inside a row is refused."""
    model = from_hf_gpt2(hf_gpt2)
    left_ids, left_mask = prompts
    right_ids = torch.full_like(left_ids, PAD)
    for row, prompt in enumerate(PROMPTS):
        right_ids[row, : len(prompt)] = torch.tensor(prompt)
    right_mask = right_ids != PAD
    expected = model.generate(prompt_ids=left_ids, prompt_mask=left_mask, max_new_tokens=8)
    assert torch.equal(model.generate(right_ids, attention_mask=right_mask.long(), max_new_tokens=8), expected)
    alone = [model.generate(prompt_ids=[p], max_new_tokens=8)[0, len(p) :] for p in PROMPTS]
    assert torch.equal(expected[:, left_ids.shape[1] :], torch.stack(alone))
    gap = right_mask.clone()
    gap[0, 1] = False
    with pytest.raises(ValueError, match=r"attention_mask: .* padding between its tokens"):
        model.generate(right_ids, attention_mask=gap, max_new_tokens=2)


def test_every_eos_id_of_the_checkpoint_ends_a_row(hf_llamas, prompts, tmp_path):
    """Llama 3 lists several end ids (generation_config.json ``eos_token_id: [...]``): a row ends at any of them, as
    in Hugging Face's generate."""
    hf = hf_llamas["gqa"]
    ids, mask = prompts
    free = hf_generate(hf, 1, EOS, input_ids=ids, attention_mask=mask.long())
    second = int(free[1, ids.shape[1] + 3])  # a token row 1 emits early: the checkpoint's second end id
    assert second != EOS
    hf.generation_config.eos_token_id = [EOS, second]
    try:
        hf.save_pretrained(tmp_path)
    finally:
        hf.generation_config.eos_token_id = EOS
    model = from_hf_llama(tmp_path)
    assert model.config.text.eos_id == EOS and model.config.text.extra_eos_ids == [second]
    expected = hf.generate(input_ids=ids, attention_mask=mask.long(), generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=[EOS, second]))  # fmt: skip
    got = model.generate(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW)
    assert (got[1, ids.shape[1] + 4 :] == PAD).all()
    assert torch.equal(got, expected)
    got = model.generate(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW, min_new_tokens=6)
    assert not (got[:, ids.shape[1] : ids.shape[1] + 6] == second).any()  # min_new_tokens holds back every end id
    model.save_pretrained(tmp_path / "saved")  # the end ids are the config's: a saved model keeps them
    reloaded = from_pretrained(tmp_path / "saved")
    assert reloaded.config.text.extra_eos_ids == [second]
    assert torch.equal(reloaded.generate(prompt_ids=ids, prompt_mask=mask, max_new_tokens=NEW), expected)


def test_a_missing_untied_lm_head_is_refused(tmp_path):
    """A bare LlamaModel folder (no lm_head) whose config says tie_word_embeddings=false has a head the file lacks:
    tying it to the embeddings would give another model."""
    from transformers import LlamaModel

    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         tie_word_embeddings=False)  # fmt: skip
    LlamaModel(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"no LM head \('lm_head.weight'\).* tie_word_embeddings=false"):
        from_pretrained(tmp_path)


def test_gpt2_relu_and_the_tokenizer_add_no_end_token(tmp_path):
    """GPT-2 with ``activation_function='relu'`` converts exactly; its tokenizer adds nothing to a text, as Hugging
    Face's GPT2TokenizerFast, and keeps <|endoftext|> as its end of text through save_pretrained."""
    import tokenizers
    from transformers import GPT2TokenizerFast

    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=alphabet)  # fmt: skip
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 5, trainer)
    end = "<|endoftext|>"
    reference = GPT2TokenizerFast(tokenizer_object=backend, bos_token=end, eos_token=end, unk_token=end)
    eos = reference.eos_token_id
    config = GPT2Config(vocab_size=backend.get_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=eos, eos_token_id=eos, activation_function="relu")  # fmt: skip
    hf = randomize(GPT2LMHeadModel(config))
    hf.save_pretrained(tmp_path / "hf")
    reference.save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    assert model.config.stacks["decoder"].mlp == "relu"
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (model.decode(ids) - hf(ids).logits).abs().max() < ATOL
    text = "the quick brown fox"
    tokenizer = model.processor.tokenizer
    assert tokenizer.encode(text) == reference(text).input_ids and eos not in tokenizer.encode(text)
    assert tokenizer.eos_id == eos and not tokenizer.append_eos
    model.save_pretrained(tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours").processor.tokenizer
    assert (again.eos_id, again.append_eos, again.encode(text)) == (eos, False, reference(text).input_ids)


def test_t5_needs_its_encoder_input(hf_t5, prompts):
    model = from_hf_t5(hf_t5[1])
    with pytest.raises(ValueError, match=r"text-to-text model's decoder reads its text encoder's states; pass input"):
        model.generate(prompt_ids=prompts[0], max_new_tokens=2)
