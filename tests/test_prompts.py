"""Soft prompts: CoOp context vectors for zero-shot classification (through the one class-embedding function) and a
learned decoder prefix; training moves only the prompt; files re-load exactly; a prompt for another width is
refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmformer import MultimodalTransformer, ZeroShotClassifier
from mmformer.adapt.prompts import PROMPT_FILE, ContextPrompt, DecoderPrefix, load_prompt
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.zeroshot import build_class_embeddings

CLASSES = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([f"a photo of {c}" for c in CLASSES] * 5, vocab_size=290, max_length=16)


@pytest.fixture
def model(make_model_config, tokenizer):
    return MultimodalTransformer(make_model_config(text={"vocab_size": tokenizer.vocab_size})).eval()


def test_context_prompt_trains_only_itself_and_reloads_to_the_same_class_embeddings(model, tokenizer, tmp_path):
    prompt = ContextPrompt.from_words(model, tokenizer, "a photo of")
    assert prompt.length >= 2 and prompt.width == 16
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    start = prompt.vectors.detach().clone()
    optimizer = torch.optim.AdamW(prompt.parameters(), lr=0.05)
    pixels, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        features = model.encode_image(pixels)
    losses = []
    for _ in range(5):
        classes = build_class_embeddings(model, tokenizer, CLASSES, prompt=prompt)  # (C, E), with gradients
        loss = F.cross_entropy(model.logit_scale.exp() * features @ classes.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and not torch.equal(prompt.vectors, start)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())

    path = tmp_path / "prompt.safetensors"
    prompt.save(path)
    with torch.no_grad():
        trained = build_class_embeddings(model, tokenizer, CLASSES, prompt=prompt)
    loaded = load_prompt(path, model)
    assert isinstance(loaded, ContextPrompt)
    reloaded = build_class_embeddings(model, tokenizer, CLASSES, prompt=loaded)
    assert (reloaded - trained).abs().max() < 1e-6
    hand = build_class_embeddings(model, tokenizer, CLASSES, ["a photo of {}"])
    assert not torch.allclose(hand, trained)

    clf = ZeroShotClassifier(model, tokenizer, CLASSES, prompt=path)
    assert (clf.class_embeddings - trained).abs().max() < 1e-6
    assert clf.predict(pixels) == [CLASSES[i] for i in clf.logits(pixels).argmax(-1).tolist()]


def test_prompt_files_that_do_not_fit_are_refused(model, make_model_config, tokenizer, tmp_path):
    wide = ContextPrompt(4, 32)
    wide.save(tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=r"wide.safetensors: a context prompt of width 32, but this model's text "
                                         r"encoder has width 16"):  # fmt: skip
        load_prompt(tmp_path / "wide.safetensors", model)
    with pytest.raises(ValueError, match="width 32"):
        ZeroShotClassifier(model, tokenizer, CLASSES, prompt=tmp_path / "wide.safetensors")
    DecoderPrefix(2, 16).save(tmp_path / "prefix.safetensors")
    with pytest.raises(ValueError, match="holds a decoder_prefix prompt, expected a context prompt"):
        ZeroShotClassifier(model, tokenizer, CLASSES, prompt=tmp_path / "prefix.safetensors")
    with pytest.raises(ValueError, match="replaces the templates"):
        ZeroShotClassifier(model, tokenizer, CLASSES, ["a {}"], prompt=ContextPrompt(2, 16))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompt(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"no such file {tmp_path}/{PROMPT_FILE}; .* a folder holding"):
        load_prompt(tmp_path)  # a folder without the prompt file
    with pytest.raises(ValueError, match="more than the text encoder's 16 positions"):
        build_class_embeddings(model, tokenizer, CLASSES, prompt=ContextPrompt(15, 16))


def test_decoder_prefix_trains_only_itself_and_generates_with_and_without_cache(model, tmp_path):
    prefix = DecoderPrefix(3, 16)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(3, 32, (2, 6))
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=0.05)
    memory, _ = model.encode_image_tokens(pixels)
    losses = []
    for _ in range(5):
        logits = model.decode(ids[:, :-1], memory, prefix_embeds=prefix.vectors)  # (B, T-1, V): the ids' positions
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters())

    with torch.no_grad():
        full = model.decode(ids, memory, prefix_embeds=prefix.vectors)
        tokens = [
            model.text_embed(None, inputs_embeds=prefix.vectors.expand(2, -1, -1)),
            model.text_embed(ids, offset=3),
        ]
        manual = model.stack("decoder")(torch.cat(tokens, dim=1), modality="text", causal=True, memory=memory)
        assert torch.allclose(full, model.lm_head(manual[:, 3:]), atol=1e-6)
    cached = model.generate(image=pixels, prefix_embeds=prefix.vectors, max_new_tokens=8)
    uncached = model.generate(image=pixels, prefix_embeds=prefix.vectors, max_new_tokens=8, use_cache=False)
    beams = model.generate(image=pixels, prefix_embeds=prefix.vectors, max_new_tokens=8, num_beams=2)
    assert torch.equal(cached, uncached) and beams.shape[0] == 2
    assert cached.shape[1] <= 16 - 3 + 1  # the prefix takes positions of the table
    with torch.no_grad():
        assert not torch.allclose(model.decode(ids, memory), full)  # the prefix changes what the decoder says
    prefix.save(tmp_path / "prefix.safetensors")
    assert torch.equal(load_prompt(tmp_path / "prefix.safetensors", model).vectors, prefix.vectors.detach())
    with pytest.raises(ValueError, match=r"prefix_embeds: expected learned decoder prefix vectors \(P, D=16\)"):
        model.generate(image=pixels, prefix_embeds=torch.zeros(3, 8))


def test_a_folder_holding_the_exported_prompt_file_is_accepted(model, tokenizer, tmp_path):
    # `mmformer export --out runs/coop/prompt` writes runs/coop/prompt/prompt.safetensors; --prompt runs/coop/prompt
    # said "no such file"
    prompt = ContextPrompt.from_words(model, tokenizer, "a photo of")
    (tmp_path / "prompt").mkdir()
    prompt.save(tmp_path / "prompt" / PROMPT_FILE)
    assert torch.equal(load_prompt(tmp_path / "prompt", model).vectors, prompt.vectors.detach())
    clf = ZeroShotClassifier(model, tokenizer, CLASSES, prompt=str(tmp_path / "prompt"))
    assert torch.equal(
        clf.class_embeddings, ZeroShotClassifier(model, tokenizer, CLASSES, prompt=prompt).class_embeddings
    )
