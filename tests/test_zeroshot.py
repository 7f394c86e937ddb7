"""ZeroShotClassifier: prompt ensembling, probabilities, batching, audio, raw inputs, and its error messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmformer import MultimodalTransformer, ZeroShotClassifier
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.zeroshot import build_class_embeddings, zero_shot_logits

CLASSES = ["zero", "one", "two", "three"]
TEMPLATES = ["a photo of {}.", "the digit {}", "{}"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["a photo of zero one two three", "the digit four", "the sound of five"], vocab_size=290)


@pytest.fixture(scope="module")
def model(tokenizer) -> MultimodalTransformer:
    torch.manual_seed(0)
    config = ModelConfig(
        stacks={"shared": StackConfig(width=32, depth=1, n_heads=2, cross_attention=True)},
        image=ImageConfig(image_size=[16, 16], patch_size=8),
        audio=AudioConfig(sample_rate=8000, n_mels=16, n_fft=64, hop_length=32, max_frames=200),
        text=TextConfig(vocab_size=tokenizer.vocab_size, max_length=16),
        embed_dim=16,
    )
    return MultimodalTransformer(config).eval()


@pytest.fixture(scope="module")
def processor(tokenizer) -> Processor:
    return Processor(tokenizer, image=ImageProcessorConfig(image_size=16), audio=AudioProcessorConfig(sample_rate=8000))


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_prompt_ensembling_equals_the_hand_computed_mean(model, tokenizer, processor):
    clf = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES)
    assert clf._class_embeddings is None  # lazy
    with torch.no_grad():
        expected = []
        for name in CLASSES:
            batch = tokenizer([t.format(name) for t in TEMPLATES])
            per_template = model.encode_text(batch["input_ids"], batch["attention_mask"])  # (K, E), normalised
            expected.append(F.normalize(per_template.mean(dim=0), dim=-1))
    emb = clf.class_embeddings
    assert emb.shape == (len(CLASSES), 16)
    torch.testing.assert_close(emb, torch.stack(expected), atol=1e-6, rtol=0)
    assert clf.class_embeddings is emb  # cached
    assert not torch.is_inference(emb)
    # templates may be callables (open_clip style)
    from_callable = build_class_embeddings(model, tokenizer, CLASSES, [lambda c: f"a photo of {c}."])
    torch.testing.assert_close(from_callable, build_class_embeddings(model, tokenizer, CLASSES, ["a photo of {}."]))


def test_probabilities_predictions_and_topk(model, processor):
    clf = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES)
    x = pixels(5)
    with torch.no_grad():
        feats = model.encode_image(x)
    expected = model.logit_scale.exp().item() * feats @ clf.class_embeddings.T
    logits = clf.logits(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero_shot_logits(model, feats, clf.class_embeddings), logits)
    probs = clf.predict_proba(x)
    assert probs.shape == (5, len(CLASSES)) and not probs.requires_grad
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    assert clf.predict(x) == [CLASSES[i] for i in probs.argmax(dim=1).tolist()]
    top = clf.topk(x, k=2)
    assert [row[0][0] for row in top] == clf.predict(x)
    for row, p in zip(top, probs):
        assert len(row) == 2 and row[0][1] >= row[1][1]
        assert row[0][1] == pytest.approx(p.max().item())
    assert len(clf.topk(x, k=10)[0]) == len(CLASSES)  # k is capped at the number of classes


def test_batch_size_does_not_change_the_results(model, processor):
    x = pixels(7)
    small = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES, batch_size=2)
    large = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES, batch_size=64)
    torch.testing.assert_close(small.class_embeddings, large.class_embeddings, atol=1e-6, rtol=0)
    torch.testing.assert_close(small.predict_proba(x), large.predict_proba(x), atol=1e-6, rtol=0)
    assert small.predict(x) == large.predict(x)


def test_raw_images_go_through_the_processor(model, processor):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    images = [Image.fromarray(a) for a in arrays]
    clf = ZeroShotClassifier(model, processor, CLASSES, batch_size=2)
    expected = clf.predict_proba(processor(images=images)["pixel_values"])
    torch.testing.assert_close(clf.predict_proba(images), expected)
    torch.testing.assert_close(clf.predict_proba(arrays), expected)  # numpy arrays (H, W, C)
    torch.testing.assert_close(clf.predict_proba(processor(images=images)), expected)  # a processor batch
    torch.testing.assert_close(clf.predict_proba(images[0]), expected[:1])  # a single image


def test_model_processor_is_the_default_and_train_mode_is_restored(model, processor):
    model.processor = processor
    try:
        clf = ZeroShotClassifier(model, classnames=CLASSES)
        assert clf.processor is processor
        expected = clf.predict_proba(pixels(3))
        model.train()
        torch.testing.assert_close(clf.predict_proba(pixels(3)), expected)  # evaluated in eval mode ...
        assert model.training  # ... and the caller's mode restored
    finally:
        model.eval()
        del model.processor


def test_audio_modality(model, processor):
    g = torch.Generator().manual_seed(2)
    waves = torch.randn(5, 1200, generator=g)
    lengths = torch.tensor([1200, 900, 700, 1200, 400])
    clf = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES, modality="audio", batch_size=2)
    probs = clf.predict_proba(waves, lengths=lengths)
    assert probs.shape == (5, len(CLASSES))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    with torch.no_grad():
        feats = model.encode_audio(waves, lengths)
    expected = (model.logit_scale.exp() * feats @ clf.class_embeddings.T).softmax(dim=-1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    big = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES, modality="audio", batch_size=64)
    torch.testing.assert_close(big.predict_proba(waves, lengths=lengths), probs, atol=1e-6, rtol=0)
    # a list of 1-D arrays at the model's rate, padded like the tensor above (one batch: same padding)
    arrays = [waves[i, :n].numpy() for i, n in enumerate(lengths.tolist())]
    torch.testing.assert_close(big.predict_proba(arrays), probs, atol=1e-6, rtol=0)
    no_processor = ZeroShotClassifier(model, processor.tokenizer, CLASSES, TEMPLATES, modality="audio")
    torch.testing.assert_close(no_processor.predict_proba(arrays), probs, atol=1e-6, rtol=0)
    assert clf.predict(waves, lengths=lengths) == [CLASSES[i] for i in probs.argmax(dim=1).tolist()]


def test_the_cache_does_not_depend_on_where_it_was_first_built(model, processor):
    """First built under inference mode, the class embeddings were inference tensors that autograd-recording code
    (a linear probe initialised from them) could not use; first built under bf16 autocast, bf16-rounded for every
    later call, and the probabilities came out bf16."""
    reference = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES).class_embeddings
    x = pixels(3)
    expected = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES).predict_proba(x)

    clf = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES)
    with torch.inference_mode():
        clf.predict(x)
    assert not clf.class_embeddings.is_inference() and not clf.class_embeddings.requires_grad
    torch.testing.assert_close(clf.class_embeddings, reference, atol=0, rtol=0)
    probe = torch.zeros(16, 2, requires_grad=True)
    (clf.class_embeddings @ probe).sum().backward()  # refused for an inference tensor
    assert probe.grad is not None

    clf = ZeroShotClassifier(model, processor, CLASSES, TEMPLATES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = clf.predict_proba(x)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(clf.class_embeddings, reference, atol=0, rtol=0)  # float32, not bf16-rounded
    torch.testing.assert_close(clf.predict_proba(x), expected, atol=0, rtol=0)


def test_samples_by_channels_audio_is_refused(model, processor):
    clf = ZeroShotClassifier(model, processor, CLASSES, modality="audio")
    stereo = np.zeros((3000, 2), np.float32)  # soundfile's (S, C): not 3000 waveforms of 2 samples
    for inputs in (stereo, torch.from_numpy(stereo)):
        with pytest.raises(ValueError, match=r"inputs: .*shape \(3000, 2\).*\(samples, channels\).*x\.mean"):
            clf.predict_proba(inputs, sampling_rate=8000)


def test_clear_errors(model, processor):
    with pytest.raises(ValueError, match="classnames: expected at least one class name"):
        ZeroShotClassifier(model, processor, [])
    with pytest.raises(ValueError, match="classnames: expected a list of class names, got None"):
        ZeroShotClassifier(model, processor)
    with pytest.raises(TypeError, match="classnames: expected a list of class names .*got str"):
        ZeroShotClassifier(model, processor, "cat")
    with pytest.warns(UserWarning, match=r"classnames: repeated names 'cat' at \[0, 2\]"):
        ZeroShotClassifier(model, processor, ["cat", "dog", "cat"])  # accepted, as open_clip's ImageNet list
    with pytest.raises(ValueError, match=r"templates\[1\]: expected a template with '\{\}'.*'a photo'"):
        ZeroShotClassifier(model, processor, CLASSES, ["{}", "a photo"])
    with pytest.raises(ValueError, match="templates: expected a non-empty list"):
        ZeroShotClassifier(model, processor, CLASSES, [])
    with pytest.raises(ValueError, match=r"modality: expected one of \['image', 'audio'\], got 'video'"):
        ZeroShotClassifier(model, processor, CLASSES, modality="video")
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        ZeroShotClassifier(model, processor, CLASSES, batch_size=0)

    image_only = MultimodalTransformer(
        ModelConfig(
            stacks={"s": StackConfig(width=16, depth=1, n_heads=2)},
            routes={"image": "s", "text": "s"},
            image=ImageConfig(image_size=[16, 16], patch_size=8),
            audio=None,
            text=TextConfig(vocab_size=processor.tokenizer.vocab_size, max_length=16),
            embed_dim=8,
        )
    )
    with pytest.raises(ValueError, match="processor: its audio sample_rate 16000 differs from the model's 8000"):
        ZeroShotClassifier(model, Processor(processor.tokenizer), CLASSES, modality="audio")
    with pytest.raises(ValueError, match="modality='audio': this model has no audio encoder"):
        ZeroShotClassifier(image_only, processor, CLASSES, modality="audio")

    no_tokenizer = ZeroShotClassifier(model, None, CLASSES)
    with pytest.raises(ValueError, match="need a tokenizer"):
        no_tokenizer.predict(pixels(1))
    tokenizer_only = ZeroShotClassifier(model, processor.tokenizer, CLASSES)
    with pytest.raises(ValueError, match="raw images need a processor"):
        tokenizer_only.predict([Image.new("RGB", (16, 16))])
    clf = ZeroShotClassifier(model, processor, CLASSES)
    with pytest.raises(ValueError, match="inputs: expected at least one input"):
        clf.predict([])
    with pytest.raises(ValueError, match="k: expected a positive int, got 0"):
        clf.topk(pixels(1), k=0)
    audio = ZeroShotClassifier(model, processor, CLASSES, modality="audio")
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
        audio.predict(torch.randn(2, 800), lengths=torch.tensor([800]))
    with pytest.raises(ValueError, match="sampling_rate: a \\(B, S\\) waveform tensor must already be at"):
        audio.predict(torch.randn(2, 800), sampling_rate=16000)
