"""Whisper conversion: a tiny random ``transformers`` Whisper and its mmformer conversion agree — encoder states and
decoder logits to 1e-4, and greedy / beam search ids exactly (against ``GenerationMixin.generate`` set up as a plain
decode: same prompt, no forced or suppressed tokens)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig, GenerationMixin, WhisperConfig, WhisperForConditionalGeneration  # noqa: E402

from mmformer.convert.common import UnsupportedModelError  # noqa: E402
from mmformer.convert.hf_whisper import from_hf_whisper  # noqa: E402
from mmformer.layers.positions import sinusoids  # noqa: E402

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-4
IDS = dict(pad_token_id=4, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
FRAMES = 100  # Hugging Face's encoder takes exactly 2 * max_source_positions mel frames


def whisper(**overrides) -> WhisperForConditionalGeneration:
    """A tiny Whisper with every weight random (HF initialises biases to 0 and norms to 1, which would hide a
    mapping error), except the encoder's sinusoidal position table."""
    config = WhisperConfig(
        vocab_size=100,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=96,
        max_source_positions=FRAMES // 2,
        max_target_positions=64,
        **{"suppress_tokens": [], "begin_suppress_tokens": [], **IDS, **overrides},
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "model.encoder.embed_positions.weight":
                p.normal_(0, 0.3 if "embed_tokens" in name else 0.1)
    return model


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return whisper()


@pytest.fixture
def inputs():
    return torch.randn(3, 80, FRAMES), torch.tensor([[3, 5], [3, 7], [3, 9]])


def hf_generate(hf_model, features, prompt, **options) -> torch.Tensor:
    """Hugging Face's generic generate (not Whisper's override with its forced ids, timestamps and suppression)."""
    ids = dict(IDS)
    ids["eos_token_id"] = options.pop("eos_token_id", ids["eos_token_id"])
    config = GenerationConfig(**ids, do_sample=False, **options)
    return GenerationMixin.generate(
        hf_model, input_features=features, decoder_input_ids=prompt, generation_config=config
    )


def max_diffs(hf_model, model, features: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        hf_states = hf_model.model.encoder(features).last_hidden_state
        hf_logits = hf_model(input_features=features, decoder_input_ids=ids).logits
        states, mask = model.encode_audio_tokens(audio_features=features)
        logits = model.decode(ids, states, mask)
    assert states.shape == hf_states.shape and logits.shape == hf_logits.shape
    return (states - hf_states).abs().max().item(), (logits - hf_logits).abs().max().item()


def test_encoder_states_and_decoder_logits_match(hf, inputs):
    model = from_hf_whisper(hf)
    assert model.config.routes == {"audio": "encoder", "decoder": "decoder"}
    assert model.config.audio.position == "learned"  # HF's float32 table differs from mmformer's by ~1e-4
    assert model.config.tie_lm_head and model.lm_head.weight is model.text_embed.tokens.weight
    ids = torch.randint(0, 100, (3, 9))
    encoder_diff, logits_diff = max_diffs(hf, model, inputs[0], ids)
    assert encoder_diff < ATOL and logits_diff < ATOL


@pytest.mark.parametrize(("num_beams", "length_penalty"), [(1, 1.0), (3, 1.0), (4, 0.5), (2, 2.0)])
def test_generation_matches_hf(hf, inputs, num_beams, length_penalty):
    model = from_hf_whisper(hf)
    features, prompt = inputs
    options = dict(max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty)
    free = hf_generate(hf, features, prompt, **options)  # eos=2 never comes from this random model: full length
    assert free.shape == (3, 14)
    ours = model.generate(audio_features=features, prompt_ids=prompt, **options)
    assert torch.equal(ours, free)
    # an eos the rows do emit, at different steps: per-row stopping and padding agree too
    eos = int(free[1, 3])
    model.config.text.eos_id = eos
    expected = hf_generate(hf, features, prompt, eos_token_id=eos, **options)
    assert (expected == eos).any()
    assert torch.equal(model.generate(audio_features=features, prompt_ids=prompt, **options), expected)
    assert torch.equal(model.generate(audio_features=features, prompt_ids=prompt, use_cache=False, **options), expected)


def test_suppress_ids_beyond_the_vocabulary_are_dropped_naming_them_and_generation_is_hfs(inputs):
    """HF's default ``begin_suppress_tokens`` ([220, 50256]) on a 100-token model: converted with a warning naming
    the ids it drops, and greedy ids equal to ``WhisperForConditionalGeneration.generate`` (its own override, with
    its suppression), with an in-vocabulary id in each list as well so that suppression is seen to act."""
    torch.manual_seed(0)
    hf_model = whisper(begin_suppress_tokens=WhisperConfig().begin_suppress_tokens)  # HF's default: [220, 50256]
    features = inputs[0]
    gen = hf_model.generation_config
    assert gen.begin_suppress_tokens == [220, 50256]

    def hf_ids() -> torch.Tensor:  # Whisper's generate returns the new tokens only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hf_model.generate(input_features=features, max_new_tokens=8)

    top = int(hf_ids()[0, 0])  # the first token without suppression; suppressed everywhere from now on
    gen.suppress_tokens = [top, 500]
    first = int(hf_ids()[0, 0])  # the first token once `top` is gone; suppressed at the first step only
    gen.begin_suppress_tokens = [first, 220, 50256]
    expected = hf_ids()
    assert not (expected == top).any() and not (expected[:, 0] == first).any()
    with pytest.warns(UserWarning) as caught:
        model = from_hf_whisper(hf_model)
    messages = [str(w.message) for w in caught]
    assert any("begin_suppress_tokens" in m and "[220, 50256]" in m and "100 tokens" in m for m in messages), messages
    assert any(" suppress_tokens holds" in m and "[500]" in m for m in messages), messages
    assert model.config.generation.suppress_tokens == [top] and model.config.generation.begin_suppress_tokens == [first]
    ours = model.generate(audio_features=features, max_new_tokens=8)
    assert ours[:, 0].tolist() == [3, 3, 3]  # decoder_start_token_id, as HF's prompt
    assert torch.equal(ours[:, 1:], expected)


def test_directory_with_tokenizer(hf, inputs, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    hf.save_pretrained(tmp_path)
    without = from_hf_whisper(tmp_path)
    assert without.processor is not None and without.processor.tokenizer is None
    assert without.processor.audio.sample_rate == 16000
    vocab = {f"t{i}": i for i in range(100)}
    Backend(models.WordLevel(vocab, unk_token="t0")).save(str(tmp_path / "tokenizer.json"))
    model = from_hf_whisper(tmp_path)
    assert model.processor.tokenizer.vocab_size == 100
    ids = torch.randint(0, 100, (3, 5))
    encoder_diff, logits_diff = max_diffs(hf, model, inputs[0], ids)
    assert encoder_diff < ATOL and logits_diff < ATOL
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "whisper"


def test_sinusoidal_table_and_untied_head():
    hf_model = whisper(tie_word_embeddings=False)
    with torch.no_grad():
        hf_model.model.encoder.embed_positions.weight.copy_(sinusoids(FRAMES // 2, 64))
        hf_model.proj_out.weight.normal_(0, 0.3)
    model = from_hf_whisper(hf_model)
    assert model.config.audio.position == "sinusoidal" and not model.config.tie_lm_head
    encoder_diff, logits_diff = max_diffs(hf_model, model, torch.randn(2, 80, FRAMES), torch.randint(0, 100, (2, 6)))
    assert encoder_diff < ATOL and logits_diff < ATOL


def test_any_number_of_frames_up_to_the_table(hf):
    model = from_hf_whisper(hf)
    states, _ = model.encode_audio_tokens(audio_features=torch.randn(2, 80, 60))  # HF accepts exactly 100
    assert states.shape == (2, 30, 64)
    with pytest.raises(ValueError, match=r"audio_features: expected at most 100 mel frames"):
        model.encode_audio_tokens(audio_features=torch.randn(2, 80, FRAMES + 2))


def test_unsupported_sources_raise(hf, tmp_path):
    scaled = copy.deepcopy(hf)
    scaled.config.scale_embedding = True
    with pytest.raises(UnsupportedModelError, match="scale_embedding"):
        from_hf_whisper(scaled)
    with pytest.raises(TypeError, match="path_or_model: expected a transformers WhisperForConditionalGeneration"):
        from_hf_whisper(42)
    with pytest.raises(FileNotFoundError, match="path_or_model: expected a local Whisper directory"):
        from_hf_whisper(tmp_path)


def test_relu_activation(inputs):
    torch.manual_seed(1)
    ref = whisper(activation_function="relu")
    model = from_hf_whisper(ref)
    assert model.config.stacks["encoder"].mlp == model.config.stacks["decoder"].mlp == "relu"
    encoder_diff, logits_diff = max_diffs(ref, model, inputs[0], torch.randint(0, 100, (3, 9)))
    assert encoder_diff < ATOL and logits_diff < ATOL
