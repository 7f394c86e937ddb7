"""Decoding never computes with copies derived from weights that changed since: the LM head's MKL-packed and int8
screen copies (:mod:`mmformer.generation.lm_head`) and the compiled decoder step's frozen weights
(:func:`mmformer.generation.search.frozen_next_logits`), after weights changed in ways that leave the version counter
alone — ``torch.nn.utils.vector_to_parameters`` and ``p.data = other`` (a new storage), and for the head's copies
``p.data.copy_(q)`` and a swapped pair of rows through ``.data`` (its contents, read once per decoding). A copy is not
made again while nothing changed.

The head is just large enough (≥ 2**22 weights) for decoding to use its derived copies; the layout is forced rather
than timed, so that each test runs through the copy it is about.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mmformer.config import ModelConfig, StackConfig, TextConfig
from mmformer.generation import lm_head, search
from mmformer.generation.decoding import generate
from mmformer.model import MultimodalTransformer

VOCAB = lm_head._LARGE_HEAD // 16 + 7  # width 16: just over the size from which the head's layout is chosen
PROMPT = torch.tensor([[1, 5, 6, 7]])
LAYOUTS = [
    pytest.param("mkl-packed", marks=pytest.mark.skipif(not lm_head._MKL_PACKED, reason="no MKL packed GEMM")),
    pytest.param(lm_head.SCREEN, marks=pytest.mark.skipif(not lm_head._INT8_ROWS, reason="no int8 kernel")),
]


def decoder_model(seed: int, vocab: int = VOCAB) -> MultimodalTransformer:
    """A decoder-only model with a large untied head; unit-variance head and token table, so that the logits differ
    by wide margins and every layout picks the same tokens."""
    config = ModelConfig(
        stacks={"dec": StackConfig(width=16, depth=1, n_heads=4)},
        routes={"decoder": "dec"},
        image=None,
        audio=None,
        text=TextConfig(vocab_size=vocab, max_length=16, pad_id=0, bos_id=1, eos_id=2),
        embed_dim=None,
        tie_lm_head=False,
    )
    torch.manual_seed(seed)
    model = MultimodalTransformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        model.text_embed.tokens.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def models() -> tuple[MultimodalTransformer, MultimodalTransformer]:
    """The old model and a new one of other weights (tests copy them, never change them)."""
    return decoder_model(0), decoder_model(1)


@pytest.fixture
def forced(monkeypatch):
    """``forced(layout)``: decoding's head takes ``layout`` (for greedy search's ids; ``linear`` for logits)."""

    def force(layout: str) -> None:
        def choose(weight, h, repeats=3, ids_only=False):
            return layout if ids_only or layout != lm_head.SCREEN else "linear"

        monkeypatch.setattr(lm_head, "_head_layout", choose)

    return force


def decode(model: MultimodalTransformer, **options) -> torch.Tensor:
    return generate(model, prompt_ids=PROMPT, max_new_tokens=6, **options)


def derived_copies(weight: torch.Tensor, layout: str) -> dict:
    """The copies of ``weight`` kept for ``layout``: key → (the weight's stamp, the copy)."""
    return (lm_head._screens if layout == lm_head.SCREEN else lm_head._packed).get(id(weight), {})


def new_weights_by_vector(model: MultimodalTransformer, new: MultimodalTransformer) -> None:
    vector_to_parameters(parameters_to_vector(new.parameters()), model.parameters())  # param.data = a view of it


def new_weights_by_data(model: MultimodalTransformer, new: MultimodalTransformer) -> None:
    for p, q in zip(model.parameters(), new.parameters()):
        p.data = q.data.clone()  # a new storage, as module.to / _apply make


def new_weights_in_place_through_data(model: MultimodalTransformer, new: MultimodalTransformer) -> None:
    for p, q in zip(model.parameters(), new.parameters()):
        p.data.copy_(q.data)  # old-style EMA code: the version counter stays


CHANGES = [new_weights_by_vector, new_weights_by_data, new_weights_in_place_through_data]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_decoding_after_new_weights_makes_the_new_models_ids(models, forced, layout, change):
    """A model that decoded (its head's copy made) and then got the new model's weights decodes as the new model,
    whatever way the weights came: never the old head's tokens."""
    old, new = models
    forced(layout)
    model = copy.deepcopy(old)
    before = decode(model)
    assert derived_copies(model.lm_head.weight, layout)  # the copy this test is about was made and kept
    expected = decode(copy.deepcopy(new))  # a fresh model of the new weights: copies of its own
    assert not torch.equal(before, expected)
    change(model, new)
    assert torch.equal(decode(model), expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_swapped_pair_of_head_rows_is_seen(models, forced, layout):
    """Weight surgery through ``.data`` that swaps the rows of the first decoded token and another: the other token
    is decoded, as a fresh model with the swapped head decodes."""
    old, _ = models
    forced(layout)
    model = copy.deepcopy(old)
    first = int(decode(model)[0, PROMPT.shape[1]])
    other = 5 if first != 5 else 6
    fresh = copy.deepcopy(old)
    for m in (model, fresh):
        rows = m.lm_head.weight.data
        rows[[first, other]] = rows[[other, first]]
    got = decode(model)
    assert int(got[0, PROMPT.shape[1]]) == other
    assert torch.equal(got, decode(fresh))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_copy_is_kept_while_nothing_changed_and_the_head_is_read_once_per_decoding(
    models, forced, monkeypatch, layout
):
    """Decoding again with unchanged weights reuses the head's copy (made once), and reads the head's contents once
    per decoding — not at every step."""
    old, _ = models
    forced(layout)
    model = copy.deepcopy(old)
    decode(model)
    kept = {key: made for key, (_, made) in derived_copies(model.lm_head.weight, layout).items()}
    reads = []
    real_print = lm_head.content_print
    monkeypatch.setattr(lm_head, "content_print", lambda t: reads.append(t) or real_print(t))
    for _ in range(2):
        decode(model)
    now = {key: made for key, (_, made) in derived_copies(model.lm_head.weight, layout).items()}
    assert now.keys() == kept.keys() and all(now[key] is kept[key] for key in kept)
    assert len(reads) == 2 and all(t is model.lm_head.weight for t in reads)  # 6 tokens each, one read each


def test_the_weight_state_follows_storage_shape_dtype_and_in_place_writes():
    """:func:`~mmformer.generation.lm_head.weight_state` changes with a new storage, a dtype or device move and an
    in-place write autograd sees, and stays for a write through ``.data`` (the contents tell that one)."""
    p = torch.nn.Parameter(torch.randn(8, 4))
    state = lm_head.weight_state(p)
    p.data.copy_(torch.randn(8, 4))
    assert lm_head.weight_state(p) == state  # PyTorch's design: .data is untracked; content_print sees it
    p.data = torch.randn(8, 4)
    assert lm_head.weight_state(p) != state
    state = lm_head.weight_state(p)
    with torch.no_grad():
        p.mul_(2.0)
    assert lm_head.weight_state(p) != state
    state = lm_head.weight_state(p)
    p.data = p.data.double()
    assert lm_head.weight_state(p) != state


def test_the_content_print_sees_a_changed_row_and_a_swapped_pair():
    """The head's fingerprint changes for one changed element and for two swapped rows, and is the same for equal
    contents in other storage and at another thread count (where a threaded float sum would round differently: a
    copy made again at every decoding)."""
    weight = torch.randn(400_000, 16)
    reference = lm_head.content_print(weight)
    assert lm_head.content_print(weight.clone()) == reference
    torch.set_num_threads(2)  # the autouse fixture sets it back
    assert lm_head.content_print(weight) == reference
    changed = weight.clone()
    changed[37, 3] += 0.01
    swapped = weight.clone()
    swapped[[10, 90]] = weight[[90, 10]]
    assert lm_head.content_print(changed) != reference
    assert lm_head.content_print(swapped) != reference


@pytest.mark.parametrize("change", CHANGES[:2], ids=lambda f: f.__name__)
def test_the_frozen_step_is_made_again_for_weights_in_new_storage(change):
    """The compiled decoder step that froze a model's weights is replaced after ``vector_to_parameters`` or
    ``p.data = other``, and kept while nothing changed (it is not called here: no compile)."""
    old, new = decoder_model(0), decoder_model(1)
    model = copy.deepcopy(old)
    step = search.frozen_next_logits(model)
    assert search.frozen_next_logits(model) is step
    change(model, new)
    assert search.frozen_next_logits(model) is not step


@pytest.mark.slow
def test_compiled_static_decoding_after_vector_to_parameters_makes_the_new_models_ids():
    """Through inductor with the weights frozen into the graph (CPU): a model that decoded and then got the new
    model's weights through ``vector_to_parameters`` decodes as the new model does eagerly, not with its frozen old
    weights (``p.data = other``: the same rule, test_the_frozen_step_is_made_again_for_weights_in_new_storage)."""
    old, new = decoder_model(0, vocab=64), decoder_model(1, vocab=64)
    model = copy.deepcopy(old)
    before = decode(model, cache="static", compile=True)
    expected = decode(new)
    assert not torch.equal(before, expected)
    new_weights_by_vector(model, new)
    assert torch.equal(decode(model, cache="static", compile=True), expected)
