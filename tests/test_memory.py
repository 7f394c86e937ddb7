"""Memory under load: long runs keep memory flat.

- Zero-shot classification of 10,000 images, batch by batch, holds no more memory after the last batch than after
  the first thousand images (raw images through the Processor, and a pixel tensor); a control that keeps each batch
  shows the measurement would see a leak of that size. Memory is glibc's count of heap bytes in use (``mallinfo2``:
  every torch CPU tensor, numpy array and PIL image lives there), not RSS: in a long pytest process the allocator
  reuses memory freed by earlier tests, so RSS would show neither growth nor a leak.
- Generation with ``max_new_tokens`` far beyond any position limit stops cleanly: absolute position tables end the
  text; relative positions (RoPE, ALiBi) have no table, so the KV cache and the beam buffers grow with the tokens
  actually decoded instead of being allocated for ``max_new_tokens`` (10**9 used to ask for 256 GB), and a cache
  that grows gives exactly the tokens of decoding without one. (``test_generation.py`` covers the position-table
  stop for a 100-token request.)
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from helpers import time_limit
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from mmformer.generation.decoding import generate
from mmformer.model import MultimodalTransformer
from mmformer.preprocess.processor import ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.zeroshot import ZeroShotClassifier

N_IMAGES, BATCH = 10_000, 200
WINDOW = 1_000  # images: memory after the first WINDOW is compared with memory over the last WINDOW
# Bytes. Over a run the heap grows by the logits it returns (10,000 × 10 floats, 0.4 MB, kept batch by batch);
# keeping a copy of every batch would add ~27 MB more (the control below).
GROWTH_BOUND = 4 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None  # not glibc >= 2.33
    fn.restype = _MallInfo2
    return fn


MALLINFO2 = _mallinfo2()
needs_glibc = pytest.mark.skipif(MALLINFO2 is None, reason="heap accounting needs glibc's mallinfo2")


def heap_in_use() -> int:
    """Bytes the C heap holds for live allocations now: small blocks in arenas plus mmap'd large blocks."""
    info = MALLINFO2()
    return info.uordblks + info.hblkhd


@pytest.fixture
def classifier(tiny_model) -> ZeroShotClassifier:
    """The tiny 16×16 image model with a word-level tokenizer over its 32 ids, 10 classes."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, 32)}}
    backend = Backend(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tokenizer = Tokenizer(backend, max_length=16, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    processor = Processor(tokenizer, image=ImageProcessorConfig(image_size=16))
    classes = [f"w{i}" for i in range(3, 13)]
    return ZeroShotClassifier(tiny_model, processor, classes, ["w20 {}", "w21 {} w22"], batch_size=BATCH)


def measure(clf: ZeroShotClassifier, inputs, keep: list | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Logits of ``inputs`` and (images done, heap bytes in use) after every batch; ``keep`` collects a copy of each
    batch."""
    samples, done = [], [0]
    encode = clf.model.encode_image

    def watched(pixel_values, *args, **kwargs):
        out = encode(pixel_values, *args, **kwargs)
        if keep is not None:
            keep.append(pixel_values.clone())
        done[0] += len(pixel_values)
        samples.append((done[0], heap_in_use()))
        return out

    clf.model.encode_image = watched
    try:
        logits = clf.logits(inputs)
    finally:
        del clf.model.encode_image
    return logits, samples


def growth(samples: list[tuple[int, int]]) -> int:
    """Largest heap use over the last WINDOW images minus heap use once the first WINDOW were done."""
    start = next(r for n, r in samples if n >= WINDOW)
    return max(r for n, r in samples if n > N_IMAGES - WINDOW) - start


@needs_glibc
def test_zero_shot_over_10000_images_keeps_memory_flat(classifier):
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8))  # raw images: the Processor path
    with time_limit(120):
        assert classifier.class_embeddings.shape == (10, 8)  # built once, before the measurement
        logits, samples = measure(classifier, images)
    assert logits.shape == (N_IMAGES, 10) and torch.isfinite(logits).all()
    assert samples[-1][0] == N_IMAGES and len(samples) == N_IMAGES // BATCH
    assert growth(samples) < GROWTH_BOUND, f"the heap grew by {growth(samples) / 2**20:.1f} MB over the run"


@needs_glibc
def test_zero_shot_over_a_pixel_tensor_keeps_memory_flat_and_a_leak_would_show(classifier):
    pixels = torch.randn(N_IMAGES, 3, 16, 16)
    assert classifier.class_embeddings.shape == (10, 8)
    logits, samples = measure(classifier, pixels)
    assert logits.shape == (N_IMAGES, 10)
    torch.testing.assert_close(logits[:BATCH], classifier.logits(pixels[:BATCH]))  # batching changes nothing
    assert growth(samples) < GROWTH_BOUND, f"the heap grew by {growth(samples) / 2**20:.1f} MB over the run"
    kept: list[torch.Tensor] = []
    _, leaky = measure(classifier, pixels, keep=kept)  # control: keep every batch (30 MB in all)
    assert growth(leaky) > GROWTH_BOUND, "the measurement cannot see a leak of one batch per batch"


# ---------------------------------------------------------------------------------------------------- generation
SCHEMES = {
    "learned": dict(text={"position": "learned"}),
    "rope": dict(text={"position": "none"}, stack={"position": "rope"}),
    "alibi": dict(text={"position": "none"}, stack={"position": "alibi"}),
}


def decoder(make_model_config, scheme: str) -> MultimodalTransformer:
    """Untied LM head and unit-variance token embeddings, so that greedy and beam paths differ by wide margins."""
    model = MultimodalTransformer(make_model_config(**SCHEMES[scheme], tie_lm_head=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        model.text_embed.tokens.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("num_beams", [1, 2])
def test_huge_max_new_tokens_stops_cleanly_without_preallocating(make_model_config, scheme, num_beams):
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # not the global stream: the seed
    # search below must not depend on which tests ran before in this process
    for seed in range(20):  # a random model whose rows (and beams) do end: some cycle forever without an eos
        torch.manual_seed(seed)
        model = decoder(make_model_config, scheme)
        first = generate(model, image=image, max_new_tokens=8)
        model.config.text.eos_id = int(first[0, 3])  # a token this model does emit
        probe = generate(model, image=image, max_new_tokens=64, num_beams=num_beams)
        if (probe[:, 1:] == model.config.text.eos_id).any(dim=1).all() or probe.shape[1] <= 16:
            break
    else:
        pytest.fail("no seed gives a model whose every row ends within 64 tokens")
    caches = []
    make_cache = model.make_cache
    model.make_cache = lambda rows, length=None, **kw: caches.append(length) or make_cache(rows, length, **kw)
    with time_limit(60):
        ids = generate(model, image=image, max_new_tokens=10**9, num_beams=num_beams)
    assert caches and max(caches) <= 128, f"KV caches of {caches} positions for a few tokens"
    assert ids.shape[0] == 2 and ids.shape[1] <= (16 if scheme == "learned" else 64)
    assert (ids[:, 1:] == model.config.text.eos_id).any(dim=1).all() or ids.shape[1] == 16  # ended by eos or table


@pytest.mark.parametrize("scheme", ["rope", "alibi"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_a_growing_cache_decodes_exactly_like_no_cache(make_model_config, scheme, num_beams):
    model = decoder(make_model_config, scheme)
    model.config.text.eos_id = 99  # never emitted (vocabulary of 32): every row runs the full length
    inputs = dict(image=torch.randn(2, 3, 16, 16), prompt_ids=torch.tensor([1, 5, 6]), num_beams=num_beams)
    cached = generate(model, **inputs, max_new_tokens=150, use_cache=True)  # the cache grows 67 → 134 → 153
    assert cached.shape == (2, 153)
    torch.testing.assert_close(cached, generate(model, **inputs, max_new_tokens=150, use_cache=False), rtol=0, atol=0)
