"""Shared fixtures: tiny seeded configs and models, so every test runs in milliseconds on a CPU.

The factories take keyword overrides, so a test states only what it is about::

    def test_x(make_stack_config, make_model_config):
        stack = make_stack_config(position="rope", n_kv_heads=2)
        model = MultimodalTransformer(make_model_config(stack=stack))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig

# Tiny tensors gain nothing from intra-op threads, and on a shared or busy machine the threads' spin-waiting makes a
# test many times slower; MMFORMER_TEST_THREADS overrides (e.g. for the GPU-less benchmarks).
torch.set_num_threads(int(os.environ.get("MMFORMER_TEST_THREADS", "1")))

# Tiny shapes used across the suite: 16×16 images in 4×4 patches (16 patches + cls), 8 kHz audio with 8 mel bins and
# 2 ms hops, a 32-token vocabulary and 16 text positions.
TINY_STACK = dict(width=16, depth=2, n_heads=4, mlp_ratio=2.0)
TINY_IMAGE = dict(image_size=[16, 16], patch_size=4, channels=3)
TINY_AUDIO = dict(sample_rate=8000, n_mels=8, n_fft=64, hop_length=16, max_frames=128)
TINY_TEXT = dict(vocab_size=32, max_length=16, pad_id=0, bos_id=1, eos_id=2)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Every test starts from the same random state and thread count, so failures reproduce whatever ran before in
    the same worker (a benchmark run in-process sets its own threads; a different count changes float reductions,
    and a run that must match a subprocess bit for bit would drift)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_stack_config() -> Callable[..., StackConfig]:
    """StackConfig factory: a 2-block, width-16, 4-head stack; keyword arguments override fields."""

    def make(**overrides: Any) -> StackConfig:
        return StackConfig(**{**TINY_STACK, **overrides})

    return make


@pytest.fixture
def make_model_config() -> Callable[..., ModelConfig]:
    """ModelConfig factory: tiny image/audio/text configs and one shared stack with cross-attention (all routes).

    Keyword arguments: ``stack`` (a StackConfig or a dict of overrides for the shared stack), ``image``/``audio``/
    ``text`` (dicts of overrides, or None to drop the modality and its route), ``routes``; anything else goes to
    ModelConfig.
    """

    def make(
        stack: StackConfig | dict | None = None,
        image: dict | None | bool = True,
        audio: dict | None | bool = True,
        text: dict | None = None,
        routes: dict[str, str] | None = None,
        **overrides: Any,
    ) -> ModelConfig:
        if not isinstance(stack, StackConfig):
            stack = StackConfig(**{**TINY_STACK, "cross_attention": True, **(stack or {})})
        overrides_of = lambda part: part if isinstance(part, dict) else {}  # noqa: E731
        image_cfg = None if image is None else ImageConfig(**{**TINY_IMAGE, **overrides_of(image)})
        audio_cfg = None if audio is None else AudioConfig(**{**TINY_AUDIO, **overrides_of(audio)})
        if routes is None:
            routes = {r: "shared" for r in ("image", "audio", "text", "decoder")}
            routes = {r: s for r, s in routes.items() if not (r == "image" and image is None)}
            routes = {r: s for r, s in routes.items() if not (r == "audio" and audio is None)}
        return ModelConfig(
            stacks={"shared": stack},
            routes=routes,
            image=image_cfg,
            audio=audio_cfg,
            text=TextConfig(**{**TINY_TEXT, **(text or {})}),
            **{"embed_dim": 8, **overrides},
        )

    return make


@pytest.fixture
def tiny_model(make_model_config):
    """A tiny MultimodalTransformer (image + audio + text + decoder on one shared stack) in eval mode."""
    from mmformer.model import MultimodalTransformer

    return MultimodalTransformer(make_model_config()).eval()
