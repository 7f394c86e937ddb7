"""The static KV cache (``generate(cache="static")``): preallocated to its full length, fixed-shape decoding steps
that read no host value, so that one compiled graph (a CUDA graph with ``mode="reduce-overhead"`` on a GPU) serves
every step. Token-identical to the growing cache for greedy decoding, beam search and sampling, eager and compiled;
on CPU the compiled step runs inductor's default mode, on a GPU (``gpu`` marker) reduce-overhead.

The models untie the LM head and give it and the token embedding unit-variance weights, as in test_generation.py,
so that logits differ by wide margins.
"""

from __future__ import annotations

import functools
import gc
import weakref

import pytest
import torch
from helpers import frozen_tensors
from torch._dynamo.utils import counters

from mmformer.generation import search
from mmformer.generation.decoding import generate
from mmformer.generation.options import DecodingOptions
from mmformer.layers.cache import StaticKVCache
from mmformer.layers.freezing import FrozenCompile
from mmformer.model import MultimodalTransformer

B = 3
SCHEMES = {
    "learned": dict(),
    "sinusoidal": dict(text={"position": "sinusoidal"}),
    "rope": dict(text={"position": "none"}, stack={"position": "rope"}),
    "gqa": dict(stack={"n_kv_heads": 2}),
}
SEARCHES = {"greedy": dict(), "beam": dict(num_beams=3), "sampling": dict(top_k=5, temperature=0.9)}


@pytest.fixture
def build(make_model_config):
    def make(scheme: str = "learned", device: str = "cpu") -> MultimodalTransformer:
        model = MultimodalTransformer(make_model_config(**SCHEMES[scheme], tie_lm_head=False)).eval()
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 1.0)
            model.text_embed.tokens.weight.normal_(0, 1.0)
        return model.to(device)

    return make


def audio(device: str = "cpu") -> dict[str, torch.Tensor]:
    """Waveforms of different lengths: the memory has a padding mask."""
    g = torch.Generator().manual_seed(1)
    return {
        "audio": (torch.randn(B, 800, generator=g) * 0.1).to(device),
        "audio_lengths": torch.tensor([800, 500, 650], device=device),
    }


def decode(model, search_kw: dict, **kw) -> torch.Tensor:
    device = model.lm_head.weight.device
    return generate(model, **audio(device), max_new_tokens=10, generator=torch.Generator(device).manual_seed(0),
                    **search_kw, **kw)  # fmt: skip


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("kind", list(SEARCHES))
def test_static_cache_equals_the_growing_cache(build, scheme, kind):
    model = build(scheme)
    dynamic = decode(model, SEARCHES[kind])
    static = decode(model, SEARCHES[kind], cache="static")
    assert static.shape[1] > 1 and torch.equal(static, dynamic), (scheme, kind)


def test_static_cache_with_left_padded_prompts_and_a_stop(build):
    """Prompts of different lengths (left-padded: the cache masks the padding and numbers each row's tokens) and
    rows ending on their own at end-of-text."""
    model = build("rope")
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4]]
    free = decode(model, {}, prompt_ids=prompts)
    model.config.text.eos_id = int(free[0, 6])  # a token row 0 emits: rows now stop on their own
    for kind in SEARCHES:
        dynamic = decode(model, SEARCHES[kind], prompt_ids=prompts)
        assert torch.equal(decode(model, SEARCHES[kind], prompt_ids=prompts, cache="static"), dynamic), kind


def test_static_cache_protocol():
    """Fixed buffers: a step returns the whole buffers and a per-query mask over them; reorder copies in place;
    the cache never grows."""
    cache = StaticKVCache(2, 2, 1, 4, 6)
    buffers = [t.data_ptr() for t in cache._layers[0]]
    mask, positions = cache.track(torch.tensor([[False, True, True], [True, True, True]]), 3)
    assert mask.shape == (2, 3, 6) and positions.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert mask[0].tolist()[2] == [False, True, True, False, False, False]  # real, written and not after itself
    k = torch.randn(2, 1, 3, 4)
    for layer in range(2):
        keys, _ = cache.append(layer, k, k)
        assert keys.shape == (2, 1, 6, 4) and torch.equal(keys[:, :, :3], k)
    cache.advance(3)
    assert cache.length == 3
    cache.reorder(torch.tensor([1, 1]), cross=False)
    assert [t.data_ptr() for t in cache._layers[0]] == buffers
    mask, positions = cache.track(None, 1)
    assert positions.tolist() == [[3], [3]] and mask[:, 0].tolist() == [[True] * 4 + [False] * 2] * 2
    with pytest.raises(ValueError, match="static KV cache holds 6 positions; decoding needs 7"):
        cache.ensure(7)


def test_static_cache_options_are_checked(build, make_model_config):
    with pytest.raises(ValueError, match=r"cache: expected 'dynamic' or 'static', got 'fixed'"):
        DecodingOptions(cache="fixed")
    with pytest.raises(ValueError, match=r"cache='static' .* needs use_cache=True"):
        DecodingOptions(cache="static", use_cache=False)
    alibi = MultimodalTransformer(make_model_config(text={"position": "none"}, stack={"position": "alibi"})).eval()
    with pytest.raises(ValueError, match=r"cache='static': a decoder with 'alibi' positions"):
        decode(alibi, {}, cache="static")


def test_a_static_cache_beyond_the_device_memory_is_refused_before_allocating(build):
    """With relative positions (RoPE) nothing but ``max_new_tokens`` bounds a static cache, which is allocated whole:
    a "no limit" one is refused, naming it and the memory it would take, where the allocator's bare error came (a
    Llama asked for 10**9 tokens tried 256 GB)."""
    model = build("rope")
    refused = (r"max_new_tokens: a static KV cache of 1000000000001 positions \(prompt \+ max_new_tokens\) for 3 rows "
               r"needs [\d,.]+ GiB .*cache='dynamic'")  # fmt: skip
    with pytest.raises(ValueError, match=refused):
        generate(model, **audio(), max_new_tokens=10**12, cache="static")


@pytest.fixture
def compiled_with(monkeypatch):
    """The static step compiled afresh with the given backend (dynamo's counters cleared)."""

    def use(backend: str | None) -> None:
        if backend is not None:
            monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
            # the CPU step's own inductor call (FrozenCompile) too
            chosen = torch._dynamo.lookup_backend(backend)
            monkeypatch.setattr(FrozenCompile, "_inductor", lambda self, gm, inputs: chosen(gm, inputs))
        monkeypatch.setattr(search, "_compiled_static", {})
        monkeypatch.setattr(search, "_frozen_steps", weakref.WeakKeyDictionary())
        monkeypatch.setattr(search, "_static_caches", weakref.WeakKeyDictionary())
        torch._dynamo.reset()
        counters.clear()

    yield use
    torch._dynamo.reset()


def test_compiled_static_step_is_one_graph(build, compiled_with):
    """Every step of a decoding reads no host value and keeps its shapes: no graph break and one graph for all
    of greedy's steps, one for beam search's (more rows), none more for sampling at greedy's shapes."""
    compiled_with("aot_eager")
    model = build("rope")
    for kind in SEARCHES:
        assert torch.equal(decode(model, SEARCHES[kind], cache="static", compile=True), decode(model, SEARCHES[kind]))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    # the next decoding of the same layout reuses the emptied cache (a captured CUDA graph replays on its buffers)
    cache = search._static_caches[model]
    buffers = [t.data_ptr() for t in cache._layers[0]]
    again = decode(model, SEARCHES["greedy"], cache="static", compile=True)  # the layout of the last one (sampling)
    assert torch.equal(again, decode(model, SEARCHES["greedy"]))
    assert search._static_caches[model] is cache and [t.data_ptr() for t in cache._layers[0]] == buffers
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_compiled_static_step_equals_eager_with_inductor(build, compiled_with):
    """The static step through inductor (on CPU with the weights frozen into the graph): the same ids for greedy,
    beam search and sampling; a second model of the same architecture decodes with its own weights, and a model whose
    weights changed in place since its step was compiled (an optimizer step) with the new ones — never the frozen
    copy of other or older weights."""
    compiled_with(None)
    gc.collect()
    earlier = len(frozen_tensors())  # what other tests in this process still hold
    model = build("learned")
    for kind in SEARCHES:
        assert torch.equal(decode(model, SEARCHES[kind], cache="static", compile=True), decode(model, SEARCHES[kind]))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # greedy's, which sampling runs too, and beam search's
    frozen = len(frozen_tensors())  # and the model's graphs' constants (greedy's, beam search's)
    greedy = SEARCHES["greedy"]
    other = build("learned")
    assert not torch.equal(decode(other, greedy), decode(model, greedy))
    assert torch.equal(decode(other, greedy, cache="static", compile=True), decode(other, greedy))
    one_graph = len(frozen_tensors()) - frozen  # other's greedy graph
    before = decode(model, greedy)
    nudge(model)
    after = decode(model, greedy)
    assert not torch.equal(after, before)
    assert torch.equal(decode(model, greedy, cache="static", compile=True), after)
    assert counters["stats"]["unique_graphs"] == 4  # other's greedy graph and the nudged model's: one compile each
    # frozen copies go with their step: the replaced one's at once (torch keeps the generated code's constants for the
    # process's life otherwise: ~110 MB per recompile at whisper-tiny size), a deleted model's with the model
    assert (held := len(frozen_tensors())) == earlier + 2 * one_graph, (held, earlier, one_graph)
    parameters = [weakref.ref(p) for m in (model, other) for p in m.parameters()]
    del model, other
    gc.collect()
    assert sum(p() is not None for p in parameters) == 0
    assert len(frozen_tensors()) == earlier


def scaled_by_length(x: torch.Tensor) -> torch.Tensor:
    return x * x.shape[0]  # a static graph folds the length in: another length's graph answers wrongly


@pytest.mark.slow
def test_frozen_compile_again_never_runs_another_inputs_graph():
    """``FrozenCompile.again`` (a decoding's later steps, called without the settings only a compile reads) answers
    like a plain call: after a call of the same signature, before any compile, past the graph limit (where a call
    runs uncompiled: skipping dynamo's guards there ran the length-2 graph on length 3), and under ``force_eager``."""
    torch._dynamo.reset()
    fn = FrozenCompile(scaled_by_length, graphs=1)
    two, three = torch.ones(2), torch.ones(3)
    assert torch.equal(fn.again(two), two * 2)  # no graph yet: a plain call, which compiles
    assert torch.equal(fn.again(two), two * 2)
    assert torch.equal(fn(three), three * 3)  # past the limit of one graph: uncompiled
    assert torch.equal(fn.again(three), three * 3)
    with torch.compiler.set_stance("force_eager"):
        assert torch.equal(fn.again(two), two * 2)
    fn.release()
    torch._dynamo.reset()


def test_a_graph_that_frozen_compile_again_needs_is_compiled_with_its_settings(monkeypatch):
    """A call through ``again`` whose inputs need a new graph (here a new length) gets it compiled with the settings
    — frozen, as every other graph of the function — never traced and compiled without them (a PT2E int8 graph would
    lose its int8 kernels: 7x slower)."""
    import torch._inductor.compile_fx as compile_fx_module

    real, settings = compile_fx_module.compile_fx, []

    def recording(gm, example_inputs, **kwargs):
        settings.append(torch._inductor.config.freezing)
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording)
    torch._dynamo.reset()
    fn = FrozenCompile(scaled_by_length)
    two, three = torch.ones(2), torch.ones(3)
    assert torch.equal(fn(two), two * 2)
    assert torch.equal(fn.again(three), three * 3)  # a new length: a new graph
    assert torch.equal(fn.again(three), three * 3)  # and then that graph, not compiled again
    assert settings == [True, True]
    fn.release()
    torch._dynamo.reset()


def nudge(model: MultimodalTransformer) -> None:
    """An optimizer-like in-place change of every weight."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_equals_eager_on_gpu(build, compiled_with):
    """On a GPU the static step runs as a CUDA graph (torch.compile mode="reduce-overhead"): token-identical."""
    compiled_with(None)
    model = build("rope", device="cuda")
    for kind in SEARCHES:
        for _ in range(2):  # the second decoding replays the captured graph
            got = decode(model, SEARCHES[kind], cache="static", compile=True)
            assert torch.equal(got, decode(model, SEARCHES[kind])), kind
