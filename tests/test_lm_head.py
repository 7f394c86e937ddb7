"""The LM head's screen (:class:`mmformer.generation.lm_head.HeadScreen`): its bound holds against a float64
product, it picks the float32 head's argmax (ties, near-ties, non-finite rows), it follows its weight, and greedy
decoding through it makes the ids of decoding through the whole head, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from mmformer.generation import lm_head
from mmformer.generation.decoding import generate
from mmformer.model import MultimodalTransformer

pytestmark = pytest.mark.skipif(not lm_head._INT8_ROWS, reason="this torch has no torch._weight_int8pack_mm")


def heads() -> list[torch.Tensor]:
    """Float32 heads (V, D): Gaussian rows, rows of very different norms, and a trained-like head whose rows share
    a large common direction (logits close together)."""
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(5000, 64, generator=g) / 8
    uneven = torch.randn(3001, 32, generator=g) * torch.logspace(-3, 1, 3001)[:, None]
    shared = torch.randn(1, 128, generator=g) + 0.05 * torch.randn(4000, 128, generator=g)
    return [gaussian, uneven, shared]


@pytest.mark.parametrize("which", range(3))
def test_the_screens_logits_are_within_their_bound_of_float64(which):
    """|h·(Wᵢ − μ) − aᵢ| ≤ Eᵢ for every token of every row (measured here: at most 0.38 of the bound)."""
    weight = heads()[which]
    screen = lm_head.HeadScreen(weight)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, weight.shape[1], generator=g) * torch.logspace(-2, 2, 64)[:, None]  # (N, D)
    hb = h.to(torch.bfloat16)
    approx = torch._weight_int8pack_mm(hb, screen.q, screen.scale).double()  # (N, V)
    exact = h.double() @ (weight.double() - screen.center.double()).T  # the mean row left out, as the screen does
    h64, hb64 = h.double(), hb.double()
    base = h64.norm(dim=1) * screen.residual + ((h64 - hb64).norm(dim=1) + 2.0**-10 * hb64.norm(dim=1)) * screen.norm
    bound = base[:, None] + 2.0**-8 * approx.abs()
    assert float(((exact - approx).abs() / bound).max()) <= 1.0


@pytest.mark.parametrize("which", range(3))
def test_the_screen_picks_the_float32_heads_argmax(which):
    """Over many rows of states at every scale, the screen's token is ``argmax`` of the float32 logits, and the
    screen recomputed only a few tokens per row."""
    weight = heads()[which]
    g = torch.Generator().manual_seed(2)
    h = torch.randn(256, weight.shape[1], generator=g) * torch.logspace(-3, 3, 256)[:, None]
    expected = torch.nn.functional.linear(h, weight).argmax(dim=1)
    assert torch.equal(lm_head.screened_ids(weight, h), expected)
    screen = lm_head.head_screen(weight)
    hb = h.to(torch.bfloat16)
    approx = torch._weight_int8pack_mm(hb, screen.q, screen.scale).float()
    candidates = (approx >= screen.threshold(h, hb, approx.max(dim=1).values)[:, None]).sum(dim=1)
    assert int(candidates.min()) >= 1 and float(candidates.float().median()) < 0.01 * weight.shape[0]


def test_ties_near_ties_and_non_finite_rows_choose_as_argmax_does():
    """Equal rows tie exactly (the first wins, as argmax's); rows one float32 step apart, which int8 cannot tell
    apart, are told apart in float32; a row of NaN states gets what argmax of its NaN logits gives."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(2000, 32, generator=g)
    weight[1500] = weight[700]  # an exact tie: 700 first
    weight[1200] = weight[300] * (1 + 2.0**-20)  # a near-tie int8 cannot resolve
    h = torch.stack([weight[700], weight[300], torch.full((32,), float("nan")), torch.zeros(32)])  # (4, D)
    expected = torch.nn.functional.linear(h, weight).argmax(dim=1)
    got = lm_head.screened_ids(weight, h)
    assert torch.equal(got, expected) and got[0] == 700


def test_the_screen_follows_its_weight_and_is_freed_with_it():
    """Made once per weight version: an in-place change makes another (never a stale copy); gone with the weight."""
    weight = torch.randn(1000, 16)
    h = torch.randn(3, 16)
    first = lm_head.head_screen(weight)
    assert lm_head.head_screen(weight) is first
    with torch.no_grad():
        weight.mul_(-1.0)
    assert lm_head.head_screen(weight) is not first
    assert torch.equal(lm_head.screened_ids(weight, h), (h @ weight.T).argmax(dim=1))
    key = id(weight)
    del weight
    assert key not in lm_head._screens


def test_a_width_the_int8_kernel_cannot_serve_gets_no_screen():
    """torch 2.14's int8 kernel answers widths that are not multiples of 16 wrongly (or crashes): no screen there,
    and the ids come from the whole head."""
    weight, h = torch.randn(500, 20), torch.randn(3, 20)
    assert lm_head.head_screen(weight) is None
    assert torch.equal(lm_head.screened_ids(weight, h), (h @ weight.T).argmax(dim=1))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_greedy_decoding_through_the_screen_makes_the_whole_heads_ids(make_model_config, monkeypatch, compiled):
    """A large head (≥ 2**22 weights) whose layout is the screen: greedy decoding makes the ids of decoding through
    the whole float32 head eagerly — with processors that only forbid tokens too (min_new_tokens, forced_eos, a
    checkpoint's suppressed tokens), eager and compiled with a static cache (where the frozen step returns its rows);
    a processor that changes scores (the repetition penalty) gets every logit."""
    vocab = lm_head._LARGE_HEAD // 16 + 7  # width 16
    config = make_model_config(
        text={"vocab_size": vocab}, tie_lm_head=False, generation={"suppress_tokens": list(range(0, vocab, 3))}
    )
    model = MultimodalTransformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        model.text_embed.tokens.weight.normal_(0, 1.0)
        model.lm_head.weight[config.text.eos_id] *= 30  # end-of-text often the largest: the length rules matter
    options = dict(image=torch.randn(3, 3, 16, 16), max_new_tokens=6)
    rules = [{}, dict(min_new_tokens=6), dict(min_new_tokens=6, forced_eos=True)]  # 6 new tokens at most
    with monkeypatch.context() as patch:
        patch.setattr(lm_head, "_INT8_ROWS", False)  # no screen: the whole head (eager: one compile less)
        whole = [generate(model, **options, **rule) for rule in rules]
    if compiled:
        options |= dict(cache="static", compile=True)
    assert whole[0].shape != whole[1].shape or not torch.equal(whole[0], whole[1])  # the length rules bite
    assert whole[1].shape != whole[2].shape or not torch.equal(whole[1], whole[2])
    used = []
    real_head_layout = lm_head._head_layout

    def screen_for_ids(weight, h, repeats=3, ids_only=False):
        layout = lm_head.SCREEN if ids_only else real_head_layout(weight, h, repeats, ids_only)
        used.append(layout)
        return layout

    monkeypatch.setattr(lm_head, "_head_layout", screen_for_ids)
    for rule, expected in zip(rules, whole):
        assert torch.equal(generate(model, **options, **rule), expected), rule
    assert used == [lm_head.SCREEN] * len(rules)
    generate(model, **options, repetition_penalty=1.1)
    assert used[-1] != lm_head.SCREEN  # scores changed, not only forbidden: the whole head
