"""MultimodalTransformer end to end on tiny configs: KV-cache decoding equals the full forward, causality, padding
invariance, every parameter learns, float32 and bfloat16 autocast, and clear errors for bad input.

Shape legend: B batch, T text tokens, S memory tokens, D width, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmformer.config import ModelConfig
from mmformer.model import MultimodalTransformer

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-5
V, D = 32, 16  # the tiny vocabulary and width from conftest


def _decoder_model(make_model_config, **stack) -> MultimodalTransformer:
    return MultimodalTransformer(make_model_config(image=None, audio=None, stack=stack)).eval()


def _right_padded(lengths: list[int], length: int) -> torch.Tensor:
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


# ---------------------------------------------------------------- KV cache
@pytest.mark.parametrize("stack_position", ["none", "rope", "alibi"])
@pytest.mark.parametrize("text_position", ["learned", "sinusoidal", "none"])
def test_cached_decoding_equals_the_full_forward(make_model_config, text_position, stack_position):
    extra = dict(n_kv_heads=2, qk_norm=True) if stack_position == "rope" else {}
    stack = dict(position=stack_position, **extra)
    cfg = make_model_config(image=None, audio=None, text=dict(position=text_position), stack=stack)
    model = MultimodalTransformer(cfg).eval()
    B, T, S = 2, 7, 5
    ids = torch.randint(0, V, (B, T))
    memory, memory_mask = torch.randn(B, S, D), _right_padded([5, 3], S)
    full = model.decode(ids, memory, memory_mask)
    assert full.shape == (B, T, V)

    cache = model.make_cache(B)
    steps = [model.decode(ids[:, t : t + 1], memory, memory_mask, cache=cache) for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=ATOL)
    assert cache.length == T

    cache = model.make_cache(B)  # prefill 3, then chunks of 2; memory only on the first call
    chunks = [model.decode(ids[:, :3], memory, memory_mask, cache=cache)]
    chunks += [model.decode(ids[:, t : t + 2], None, memory_mask, cache=cache) for t in (3, 5)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=ATOL)


def test_cached_decoding_reads_encoder_memory(tiny_model):
    """The memory an encoder really produces (image tokens, no mask) and audio tokens with their padding mask."""
    model = tiny_model
    ids = torch.randint(0, V, (2, 5))
    image_memory, _ = model.encode_image_tokens(torch.randn(2, 3, 16, 16))
    audio_memory, audio_mask = model.encode_audio_tokens(torch.randn(2, 600), torch.tensor([600, 350]))
    for memory, mask in [(image_memory, None), (audio_memory, audio_mask)]:
        full = model.decode(ids, memory, mask)
        cache = model.make_cache(2)
        steps = [model.decode(ids[:, t : t + 1], memory, mask, cache=cache) for t in range(5)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=ATOL)


def test_memory_shared_by_groups_of_rows_equals_repeated_memory(make_model_config):
    """Memory (B, S, D) read by K consecutive id rows each (beams) == the memory repeated per row, with and without
    a cache, padding mask included; the cache then holds one set of cross-attention keys per sample."""
    model = _decoder_model(make_model_config, position="rope")
    B, K, T, S = 2, 3, 5, 4
    ids, memory, mask = torch.randint(0, V, (B * K, T)), torch.randn(B, S, D), _right_padded([4, 2], S)
    repeated = model.decode(ids, memory.repeat_interleave(K, 0), mask.repeat_interleave(K, 0))
    torch.testing.assert_close(model.decode(ids, memory, mask), repeated, rtol=0, atol=ATOL)
    cache = model.make_cache(B * K)
    steps = [model.decode(ids[:, t : t + 1], memory if t == 0 else None, mask, cache=cache) for t in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), repeated, rtol=0, atol=ATOL)
    assert cache.cross(0)[0].shape[0] == B
    with pytest.raises(ValueError, match=r"memory: expected encoder token states \(B=6, S, D=16\).*got \(4, 4, 16\)"):
        model.decode(ids, torch.randn(4, S, D))


def test_cache_reorder_follows_beams(make_model_config):
    model = _decoder_model(make_model_config, position="rope")
    ids, memory = torch.randint(0, V, (2, 6)), torch.randn(2, 4, D)
    cache = model.make_cache(2)
    model.decode(ids[:, :3], memory, cache=cache)
    index = torch.tensor([1, 1, 0])  # three hypotheses: two continue row 1, one row 0
    cache.reorder(index)
    new = torch.randint(0, V, (3, 3))
    stepped = torch.cat([model.decode(new[:, t : t + 1], None, cache=cache) for t in range(3)], dim=1)
    full = model.decode(torch.cat([ids[index, :3], new], dim=1), memory[index])[:, 3:]
    torch.testing.assert_close(stepped, full, rtol=0, atol=ATOL)


def test_cache_overflow_is_a_clear_error(make_model_config):
    model = _decoder_model(make_model_config)
    cache = model.make_cache(1, max_length=4)
    model.decode(torch.randint(0, V, (1, 3)), torch.randn(1, 2, D), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 4 positions; decoding needs 5"):
        model.decode(torch.randint(0, V, (1, 2)), None, cache=cache)


# ---------------------------------------------------------------- causality
@pytest.mark.parametrize("position", ["none", "rope", "alibi"])
def test_decoder_is_causal(make_model_config, position):
    model = _decoder_model(make_model_config, position=position)
    ids, memory = torch.randint(0, V, (2, 8)), torch.randn(2, 3, D)
    base = model.decode(ids, memory)
    for t in (0, 3, 6):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, V, changed[:, t + 1 :].shape)
        out = model.decode(changed, memory)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("causal", [True, False])
def test_text_encoder_causality_follows_the_config(make_model_config, causal):
    model = MultimodalTransformer(make_model_config(image=None, audio=None, text=dict(causal=causal))).eval()
    ids = torch.randint(3, V, (2, 8))
    base, _ = model.encode_text_tokens(ids)
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % V
    out, _ = model.encode_text_tokens(changed)
    if causal:
        torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=1e-6)
    else:  # bidirectional: earlier tokens see the change
        assert not torch.allclose(out[:, :5], base[:, :5])


# ---------------------------------------------------------------- padding
@pytest.mark.parametrize("pool", ["eot", "mean", "cls"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("position", ["none", "alibi"])
def test_text_padding_content_is_ignored(make_model_config, causal, pool, position):
    cfg = make_model_config(image=None, audio=None, text=dict(causal=causal, pool=pool), stack=dict(position=position))
    model = MultimodalTransformer(cfg).eval()
    ids = torch.randint(3, V, (3, 8))  # no eos among the real tokens: eot pooling takes the last real token
    ids[2, 4] = 2  # …except row 2, which ends with eos
    mask = _right_padded([8, 5, 5], 8)
    ids = ids.masked_fill(~mask, 0)
    tokens, _ = model.encode_text_tokens(ids, mask)
    pooled = model.encode_text(ids, mask)
    changed = ids.clone()
    changed[~mask] = torch.randint(0, V, (int((~mask).sum()),))
    changed[1, 6] = 2  # an eos id in the padding must not be pooled
    changed_tokens, _ = model.encode_text_tokens(changed, mask)
    torch.testing.assert_close(changed_tokens[mask], tokens[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.encode_text(changed, mask), pooled, rtol=0, atol=1e-6)


def test_eot_pooling_takes_the_first_real_eos_else_the_last_real_token(tiny_model):
    ids = torch.tensor([[1, 5, 2, 7, 2], [1, 5, 6, 0, 2], [1, 5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    assert tiny_model.eot_positions(ids, mask).tolist() == [2, 2, 4]
    assert tiny_model.eot_positions(ids, None).tolist() == [2, 4, 4]


def test_decoder_padding_and_masked_memory_are_ignored(make_model_config):
    model = _decoder_model(make_model_config, position="alibi")
    ids, memory = torch.randint(0, V, (2, 6)), torch.randn(2, 5, D)
    mask, memory_mask = _right_padded([6, 4], 6), _right_padded([5, 2], 5)
    memory_mask[0, 1] = False  # not only right padding in the memory
    base = model.decode(ids, memory, memory_mask, attention_mask=mask)
    changed_ids = ids.clone()
    changed_ids[~mask] = torch.randint(0, V, (int((~mask).sum()),))
    changed_memory = memory.clone()
    changed_memory[~memory_mask] = 10 * torch.randn(int((~memory_mask).sum()), D)
    out = model.decode(changed_ids, changed_memory, memory_mask, attention_mask=mask)
    torch.testing.assert_close(out[mask], base[mask], rtol=0, atol=1e-6)
    cache = model.make_cache(2)  # the cached path too
    steps = [model.decode(changed_ids[:, t : t + 1], changed_memory, memory_mask, cache=cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask], base[mask], rtol=0, atol=ATOL)


def test_audio_padding_samples_are_ignored(tiny_model):
    """Samples past ``audio_lengths`` change nothing: not the real frame tokens (the STFT windows of the last real
    frames reach into the padding, so the embedder zeroes it first), not the pooled embedding."""
    model = tiny_model
    audio, lengths = torch.randn(3, 900), torch.tensor([900, 500, 333])
    tokens, mask = model.encode_audio_tokens(audio, lengths)
    frames = lengths // 16 + 1  # centred STFT, hop 16
    assert mask.sum(dim=1).tolist() == ((frames - 1) // 2 + 1).tolist()  # conv stride 2
    pooled = model.encode_audio(audio, lengths)
    changed = audio.clone()
    padding = torch.arange(900)[None, :] >= lengths[:, None]
    changed[padding] = 5 * torch.randn(int(padding.sum()))
    changed_tokens, changed_mask = model.encode_audio_tokens(changed, lengths)
    assert torch.equal(changed_mask, mask)
    torch.testing.assert_close(changed_tokens[mask], tokens[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.encode_audio(changed, lengths), pooled, rtol=0, atol=1e-5)
    # padding with zeros is what the lengths mean: a zero-padded row equals its unpadded self up to STFT edges
    alone = model.encode_audio(audio[2:, :333].clone(), torch.tensor([333]))
    assert torch.nn.functional.cosine_similarity(alone, pooled[2:]).item() > 0.999


def test_decoder_memory_padding_from_audio_is_ignored(tiny_model):
    model = tiny_model
    audio, lengths = torch.randn(2, 800), torch.tensor([800, 400])
    ids = torch.randint(0, V, (2, 4))
    memory, memory_mask = model.encode_audio_tokens(audio, lengths)
    changed = audio.clone()
    changed[1, 400:] = torch.randn(400)
    memory2, _ = model.encode_audio_tokens(changed, lengths)
    torch.testing.assert_close(
        model.decode(ids, memory2, memory_mask), model.decode(ids, memory, memory_mask), rtol=0, atol=1e-5
    )


# ---------------------------------------------------------------- every parameter learns
def _all_inputs(cfg: ModelConfig, B: int = 2) -> dict:
    image = cfg.image
    samples = cfg.audio.hop_length * 100  # 101 mel frames (1 s at 16 kHz)
    return dict(
        pixel_values=torch.randn(B, image.channels, *image.image_size),
        audio=torch.randn(B, samples),
        audio_lengths=torch.tensor([samples, samples * 2 // 3][:B]),
        input_ids=torch.randint(3, cfg.text.vocab_size, (B, 6)),
        attention_mask=_right_padded([6, 4][:B], 6),
    )


def _loss_over_everything(model: MultimodalTransformer, inputs: dict) -> torch.Tensor:
    """Sum of every output: the contrastive features and logit scale/bias, and decoder logits reading image memory
    and (masked) audio memory."""
    out = model(**inputs)
    loss = sum(v.float().sum() for v in out.values())
    image_memory, _ = model.encode_image_tokens(inputs["pixel_values"])
    audio_memory, audio_mask = model.encode_audio_tokens(inputs["audio"], inputs["audio_lengths"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    loss = loss + model.decode(ids, image_memory, attention_mask=mask).float().sum()
    loss = loss + model.decode(ids, audio_memory, audio_mask, attention_mask=mask).float().sum()
    aux = model.pop_aux_loss()
    return loss + (aux if aux is not None else 0)


def _assert_every_parameter_has_a_finite_grad(model: torch.nn.Module, unused: set[str] = frozenset()) -> None:
    missing, bad = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name in unused:
            continue
        if p.grad is None:
            missing.append(name)
        elif not torch.isfinite(p.grad).all():
            bad.append(name)
    assert not missing, f"parameters without a gradient: {missing}"
    assert not bad, f"parameters with non-finite gradients: {bad}"


def test_every_parameter_of_the_default_model_gets_a_gradient():
    """timm's test on the full default model: three modalities + decoder on one shared stack. Nothing is exempt:
    the cross-attention sublayers learn through the decoder, the tied LM head through the token embedding."""
    cfg = ModelConfig()
    model = MultimodalTransformer(cfg).train()
    inputs = _all_inputs(cfg, B=1)
    # small inputs keep it fast: a 64² image (4×4 patches, the 14×14 position table resampled, so it still learns)
    # and 0.25 s of audio
    inputs["pixel_values"] = torch.randn(1, 3, 64, 64)
    inputs["audio"], inputs["audio_lengths"] = inputs["audio"][:, :4000], torch.tensor([3000])
    _loss_over_everything(model, inputs).backward()
    _assert_every_parameter_has_a_finite_grad(model)
    assert model.lm_head.weight is model.text_embed.tokens.weight


def test_every_parameter_of_a_fully_loaded_model_gets_a_gradient(make_model_config):
    """Every optional part switched on. Exempt, with reason: ``ctc_head`` — no model method calls it; the
    speech-to-text task applies it to the audio tokens (done by hand here, so it is checked too)."""
    cfg = make_model_config(
        stack=dict(
            qk_norm=True,
            n_kv_heads=2,
            position="rope",
            mlp="swiglu",
            n_experts=2,
            experts_top_k=2,
            multiway=["image", "audio"],
            norm="rmsnorm",
            norm_placement="sandwich",
        ),
        image=dict(pre_norm=True, pool="mean"),
        audio=dict(position="learned"),
        text=dict(n_segments=2, embed_norm=True, position="sinusoidal"),
        projection_bias=True,
        logit_bias_init=-10.0,
        tie_lm_head=False,
        ctc_head=True,
    )
    model = MultimodalTransformer(cfg).train()
    inputs = _all_inputs(cfg)
    loss = _loss_over_everything(model, inputs)
    audio_tokens, _ = model.encode_audio_tokens(inputs["audio"], inputs["audio_lengths"])
    loss = loss + model.ctc_head(audio_tokens).sum()
    loss.backward()
    _assert_every_parameter_has_a_finite_grad(model)


# ---------------------------------------------------------------- float32 and bfloat16 autocast
ROUTES = ["image", "audio", "text", "decoder"]
STACKS = {"default": {}, "exotic": dict(position="alibi", n_kv_heads=1, mlp="swiglu", n_experts=2, norm="rmsnorm")}


def _run(model: MultimodalTransformer, route: str, inputs: dict) -> torch.Tensor:
    if route == "image":
        return model.encode_image(inputs["pixel_values"])
    if route == "audio":
        return model.encode_audio(inputs["audio"], inputs["audio_lengths"])
    if route == "text":
        return model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    memory, memory_mask = model.encode_audio_tokens(inputs["audio"], inputs["audio_lengths"])
    return model.decode(inputs["input_ids"], memory, memory_mask, attention_mask=inputs["attention_mask"])


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's RMSNorm: fp32 weight, bf16 x
@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("route", ROUTES)
def test_forward_backward_in_float32_and_bfloat16_autocast(make_model_config, route, stack):
    cfg = make_model_config(stack=STACKS[stack])
    model = MultimodalTransformer(cfg).train()
    inputs = _all_inputs(cfg)
    reference = _run(model, route, inputs)
    reference.float().pow(2).sum().backward()
    assert reference.dtype == torch.float32 and torch.isfinite(reference).all()
    _assert_every_finite(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(model, route, inputs)
        loss = out.float().pow(2).sum()
    loss.backward()
    assert out.dtype == torch.bfloat16  # autocast really ran the matmuls in bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    _assert_every_finite(model)
    assert any(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(out.float(), reference.detach(), rtol=0.1, atol=0.1)  # bf16 ≈ fp32


def _assert_every_finite(model: torch.nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


# ---------------------------------------------------------------- bad input
def test_bad_pixel_values(tiny_model):
    m = tiny_model
    with pytest.raises(ValueError, match=r"pixel_values: expected 4 dims \(B, C, H, W\), got shape \(3, 16, 16\)"):
        m.encode_image(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"pixel_values: expected 3 channels, got shape \(1, 1, 16, 16\)"):
        m.encode_image(torch.randn(1, 1, 16, 16))
    with pytest.raises(TypeError, match=r"pixel_values: expected a float tensor .*torch.uint8"):
        m.encode_image(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="pixel_values: expected a tensor"):
        m.encode_image([[0.0]])
    with pytest.raises(ValueError, match="pixel_values: height and width must be multiples of the patch size 4"):
        m.encode_image(torch.randn(1, 3, 16, 18))


def test_bad_text(tiny_model):
    m = tiny_model
    with pytest.raises(ValueError, match=r"input_ids: expected at most 16 tokens .*got 17"):
        m.encode_text(torch.randint(0, V, (1, 17)))
    with pytest.raises(ValueError, match=r"input_ids: expected at most 16 tokens .*got 17"):
        m.decode(torch.randint(0, V, (1, 17)), torch.randn(1, 2, D))
    for empty in (torch.zeros(0, 5, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(ValueError, match="input_ids: expected at least one token per row"):
            m.encode_text(empty)
        with pytest.raises(ValueError, match="input_ids: expected at least one token per row"):
            m.decode(empty, torch.randn(empty.shape[0], 2, D))
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 32\), got min 0, max 32"):
        m.encode_text(torch.tensor([[0, 32]]))
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 32\), got min -1"):
        m.decode(torch.tensor([[-1, 3]]), torch.randn(1, 2, D))
    with pytest.raises(TypeError, match="input_ids: expected integer token ids"):
        m.encode_text(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(B, T\)"):
        m.encode_text(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"attention_mask: expected the shape of input_ids \(2, 4\), got \(2, 3\)"):
        m.encode_text(torch.randint(0, V, (2, 4)), torch.ones(2, 3))


def test_text_longer_than_the_table_after_a_cache_prefix(tiny_model):
    cache = tiny_model.make_cache(1, max_length=32)
    tiny_model.decode(torch.randint(0, V, (1, 15)), torch.randn(1, 2, D), cache=cache)
    with pytest.raises(ValueError, match=r"text length 17 exceeds the position table \(16 positions\)"):
        tiny_model.decode(torch.randint(0, V, (1, 2)), None, cache=cache)


def test_audio_shorter_than_the_stft_centring_encodes_as_in_a_batch(tiny_model):
    """A waveform of fewer samples than the STFT's centring (n_fft / 2: 32 here) is encoded alone as it is beside a
    longer one (it was refused alone and accepted in a batch, so a long recording's short last window or a short file
    failed a whole transcription run, or not, by how the files were batched)."""
    g = torch.Generator().manual_seed(0)
    for n in (1, 20, 33):
        short, long = torch.randn(1, n, generator=g), torch.randn(1, 700, generator=g)
        batch = torch.cat([long, F.pad(short, (0, 700 - n))])
        with torch.no_grad():
            alone, together = tiny_model.encode_audio(short), tiny_model.encode_audio(batch, torch.tensor([700, n]))
        assert torch.isfinite(alone).all()
        torch.testing.assert_close(alone[0], together[1], rtol=0, atol=1e-5, msg=f"{n} samples")


def test_bad_audio(tiny_model):
    m = tiny_model
    with pytest.raises(ValueError, match=r"audio: expected at least one sample per waveform, got shape \(1, 0\)"):
        m.encode_audio(torch.randn(1, 0))
    with pytest.raises(ValueError, match=r"audio: expected shape \(B, S\) of mono waveforms, got \(1, 2, 800\)"):
        m.encode_audio(torch.randn(1, 2, 800))
    with pytest.raises(TypeError, match="audio: expected a float waveform tensor, got torch.int16"):
        m.encode_audio(torch.zeros(1, 800, dtype=torch.int16))
    with pytest.raises(TypeError, match="audio: expected a float tensor"):
        m.encode_audio([0.0] * 800)
    # 128 mel frames (hop 16) is the table: 2048 samples → 129 frames
    m.encode_audio(torch.randn(1, 2047))
    with pytest.raises(ValueError, match=r"audio: expected at most 128 mel frames .*got 129"):
        m.encode_audio(torch.randn(1, 2048))
    with pytest.raises(ValueError, match=r"audio_features: expected at most 128 mel frames .*got 130"):
        m.encode_audio(audio_features=torch.randn(1, 8, 130))
    with pytest.raises(ValueError, match=r"audio_features: expected log-mel \(B, 8, frames\), got \(1, 7, 20\)"):
        m.encode_audio(audio_features=torch.randn(1, 7, 20))
    with pytest.raises(ValueError, match=r"audio_lengths: expected shape \(2,\)"):
        m.encode_audio(torch.randn(2, 800), torch.tensor([800]))
    with pytest.raises(ValueError, match=r"audio_lengths: expected values in \[1, 800\], got \[900, 10\]"):
        m.encode_audio(torch.randn(2, 800), torch.tensor([900, 10]))
    with pytest.raises(ValueError, match="exactly one of `audio`"):
        m.encode_audio(torch.randn(1, 800), audio_features=torch.randn(1, 8, 20))
    with pytest.raises(ValueError, match="exactly one of `audio`"):
        m.encode_audio()


def test_bad_decoder_memory(tiny_model):
    m, ids = tiny_model, torch.randint(0, V, (2, 3))
    with pytest.raises(ValueError, match=r"memory: expected encoder token states \(B=2, S, D=16\).*got \(2, 4, 8\)"):
        m.decode(ids, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"memory: expected encoder token states .*got \(3, 4, 16\)"):
        m.decode(ids, torch.randn(3, 4, 16))
    with pytest.raises(ValueError, match=r"memory: expected encoder token states .*got \(4, 16\)"):
        m.decode(ids, torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"memory_mask: expected shape \(2, 4\) \(B, S\) of memory, got \(2, 5\)"):
        m.decode(ids, torch.randn(2, 4, 16), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache: expected one made for batch size 2"):
        m.decode(ids, torch.randn(2, 4, 16), cache=m.make_cache(3))
    m.decode(ids, torch.randn(2, 4, 16), attention_mask=torch.ones(2, 3), cache=m.make_cache(2))  # nothing padded
    # padding with a cache: the cache keeps the key mask, so padded rows decode as without one
    memory, mask = torch.randn(2, 4, 16), _right_padded([3, 2], 3)
    cached = m.decode(ids, memory, attention_mask=mask, cache=m.make_cache(2))
    torch.testing.assert_close(cached[mask], m.decode(ids, memory, attention_mask=mask)[mask])


def test_missing_routes_are_clear_errors(make_model_config):
    model = MultimodalTransformer(make_model_config(image=None, audio=None, routes={"text": "shared"}))
    with pytest.raises(ValueError, match="no image encoder"):
        model.encode_image(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="no decoder"):
        model.decode(torch.ones(1, 2, dtype=torch.long), torch.randn(1, 2, D))
    with pytest.raises(TypeError, match="config: expected mmformer.ModelConfig"):
        MultimodalTransformer({"stacks": {}})
