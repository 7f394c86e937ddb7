"""One score-processor protocol: ``processor(scores, tokens, step) -> scores``, defined once
(:mod:`mmformer.generation.score_processing`), built once per call, applied in one place per search.

- a source scan (as tests/test_house.py): one definition of the protocol, no class or function left with the old
  signatures (``(scores, generated, remaining)``, ``(scores, tokens)``, ``(logits)`` filters), each search applying
  the processors in one call; the scan catches planted old signatures;
- each processor equals Hugging Face's logits processor of the same rule on seeded scores;
- a processor plugged into greedy and beam search sees the whole sequence so far (prompt and left padding
  included) and the number of new tokens, and steers both searches as the same rule in a plain reference loop;
- an LM head that peft wraps (trainable tokens, modules to save) decodes: the search never reads its attributes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from mmformer.config import GenerationConfig, ModelConfig, StackConfig, TextConfig
from mmformer.generation.decoding import generate, left_pad
from mmformer.generation.options import DecodingOptions
from mmformer.generation.score_processing import (
    ForcedEos,
    MinNewTokens,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    apply_processors,
    build_score_processors,
)
from mmformer.generation.search import BeamSearch, DecoderRunner, TokenSearch
from mmformer.generation.token_choice import Greedy, most_likely
from mmformer.model import MultimodalTransformer

PACKAGE = Path(__file__).resolve().parents[1] / "mmformer"
PROTOCOL = ["scores", "tokens", "step"]
V, PAD, BOS, EOS = 40, 0, 1, 2
PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11]]


# ---------------------------------------------------------------- the source scan
def signature_offences(source: str, where: str = "<source>") -> list[str]:
    """Score adjustments in ``source`` that do not follow the protocol: a ``__call__`` whose first argument is scores
    or logits with other parameters than (scores, tokens, step), and any function taking (generated, remaining), the
    old rules' arguments."""
    offences = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        names = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
        if {"generated", "remaining"} <= set(names):
            offences.append(f"{where}:{node.lineno}: {node.name}({', '.join(names)})")
        if node.name == "__call__" and len(names) > 1 and names[1] in ("scores", "logits") and names[1:] != PROTOCOL:
            offences.append(f"{where}:{node.lineno}: __call__({', '.join(names)})")
    return offences


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_one_definition_of_the_protocol_and_no_old_signatures():
    sources = package_sources()
    protocols = [
        f"{path}:{node.lineno}"
        for path, text in sources.items()
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ClassDef) and node.name == "ScoreProcessor"
    ]
    assert len(protocols) == 1 and protocols[0].startswith("mmformer/generation/score_processing.py:"), protocols
    offences = [o for path, text in sources.items() for o in signature_offences(text, path)]
    assert not offences, "score adjustments off the protocol (scores, tokens, step):\n" + "\n".join(offences)


def test_the_scan_catches_the_old_signatures():
    assert signature_offences("class R:\n    def __call__(self, logits, generated, remaining): ...")
    assert signature_offences("class P:\n    def __call__(self, scores, tokens): ...")
    assert signature_offences("class F:\n    def __call__(self, logits): ...")
    assert signature_offences("def rule(scores, generated: int, remaining: int): ...")
    assert not signature_offences("class S:\n    def __call__(self, scores, tokens, step): ...")
    assert not signature_offences("class C:\n    def choose(self, scores): ...")


def test_each_search_applies_the_processors_in_one_call():
    tree = ast.parse((PACKAGE / "generation/search.py").read_text(encoding="utf-8"))
    runs = {
        cls.name: fn
        for cls in tree.body
        if isinstance(cls, ast.ClassDef)
        for fn in cls.body
        if isinstance(fn, ast.FunctionDef) and fn.name == "run"
    }
    assert set(runs) == {"TokenSearch", "BeamSearch"}
    for name, fn in runs.items():
        calls = [
            n for n in ast.walk(fn) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "apply_processors"
        ]
        loops = [n for n in ast.walk(fn) if isinstance(n, ast.For) and "processors" in ast.unparse(n.iter)]
        assert len(calls) == 1 and not loops, name
    # nothing in search.py reads an attribute of the LM head by name (peft may wrap it)
    text = (PACKAGE / "generation/search.py").read_text(encoding="utf-8")
    assert "lm_head.bias" not in text and "lm_head.weight" not in text


# ---------------------------------------------------------------- each processor is Hugging Face's
def test_processors_equal_hugging_faces():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    scores, tokens = torch.randn(4, V, generator=g) * 3, torch.randint(0, V, (4, 9), generator=g)
    # HF counts new tokens from a prompt length given at construction, ours from `step`: 9 tokens after a 5-token
    # prompt are step 4; a 9-token prompt makes it step 0
    hf = transformers.generation.logits_process
    cases = [  # (ours, HF's, step)
        (RepetitionPenalty(1.7), hf.RepetitionPenaltyLogitsProcessor(1.7), 4),
        (MinNewTokens(6, EOS), hf.MinNewTokensLengthLogitsProcessor(5, 6, EOS), 4),
        (MinNewTokens(4, EOS), hf.MinNewTokensLengthLogitsProcessor(5, 4, EOS), 4),
        (ForcedEos(EOS, 10), hf.ForcedEOSTokenLogitsProcessor(10, EOS), 4),
        (ForcedEos(EOS, 12), hf.ForcedEOSTokenLogitsProcessor(12, EOS), 4),
        (SuppressTokens([3, 17, 39]), hf.SuppressTokensLogitsProcessor([3, 17, 39]), 4),
        (SuppressTokens([3, 17], first_only=True), hf.SuppressTokensAtBeginLogitsProcessor([3, 17], 9), 0),
        (SuppressTokens([3, 17], first_only=True), hf.SuppressTokensAtBeginLogitsProcessor([3, 17], 5), 4),
        (Temperature(0.7), hf.TemperatureLogitsWarper(0.7), 4),
        (TopK(5), hf.TopKLogitsWarper(5), 4),
        (TopP(0.8), hf.TopPLogitsWarper(0.8), 4),
    ]
    changed = 0
    for ours, theirs, step in cases:
        expected = theirs(tokens, scores.clone())
        assert torch.equal(ours(scores.clone(), tokens, step), expected), (type(ours).__name__, step)
        changed += not torch.equal(expected, scores)
    assert changed == 8  # the rules that apply here change the scores (MinNewTokens(4), ForcedEos(12), begin@5 not)


def test_apply_processors_runs_them_in_order():
    scores, tokens = torch.zeros(2, 5), torch.zeros(2, 3, dtype=torch.long)
    calls = []

    def record(tag):
        def processor(scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
            calls.append((tag, tuple(tokens.shape), step))
            return scores + 1

        return processor

    out = apply_processors([record("a"), record("b")], scores, tokens, 4)
    assert calls == [("a", (2, 3), 4), ("b", (2, 3), 4)] and torch.equal(out, torch.full((2, 5), 2.0))


# ---------------------------------------------------------------- building the list
def language_model(generation: GenerationConfig | None = None) -> MultimodalTransformer:
    torch.manual_seed(0)
    config = ModelConfig(
        stacks={"decoder": StackConfig(width=16, depth=2, n_heads=4, mlp_ratio=2.0)},
        routes={"decoder": "decoder"},
        image=None,
        audio=None,
        text=TextConfig(vocab_size=V, max_length=32, pad_id=PAD, bos_id=BOS, eos_id=EOS),
        embed_dim=None,
        tie_lm_head=False,
        generation=generation,
    )
    model = MultimodalTransformer(config).eval()
    with torch.no_grad():  # logits well apart: no near-ties between paths
        model.lm_head.weight.normal_(0, 1.0)
        model.text_embed.tokens.weight.normal_(0, 1.0)
    return model


def test_built_once_from_the_options_and_the_checkpoints_rules_in_hugging_faces_order():
    model = language_model(GenerationConfig(suppress_tokens=[5, 6], begin_suppress_tokens=[7]))
    options = DecodingOptions(repetition_penalty=1.3, min_new_tokens=2, forced_eos=True, top_k=4, top_p=0.9,
                              temperature=0.8)  # fmt: skip
    mask = torch.tensor([[False, True], [True, True]])
    built = build_score_processors(model, options, max_length=12, prompt_mask=mask)
    kinds = [type(p) for p in built]
    assert kinds == [RepetitionPenalty, MinNewTokens, ForcedEos, SuppressTokens, SuppressTokens, Temperature, TopK,
                     TopP]  # fmt: skip
    assert built[2].max_length == 12 and torch.equal(built[0].padding, ~mask)
    assert built[3].ids == [5, 6] and not built[3].first_only and built[4].ids == [7] and built[4].first_only
    # greedy decoding builds no sampling filters; the defaults build nothing
    greedy = build_score_processors(model, DecodingOptions(top_k=4, do_sample=False), max_length=9)
    assert [type(p) for p in greedy] == [SuppressTokens, SuppressTokens]
    assert build_score_processors(language_model(), DecodingOptions(), max_length=9) == []


# ---------------------------------------------------------------- a processor inside the searches
class BanSeen:
    """A rule that reads the whole sequence: no token already in the row (prompt and padding included) comes again;
    records what it was given."""

    def __init__(self):
        self.seen: list[tuple[tuple[int, ...], int]] = []

    def __call__(self, scores: torch.Tensor, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.seen.append((tuple(tokens.shape), step))
        scores.scatter_(1, tokens, float("-inf"))
        return scores


def reference_greedy(
    model: MultimodalTransformer, prompt: torch.Tensor, mask: torch.Tensor, n: int, ban_seen: bool = False
) -> torch.Tensor:
    """Greedy decoding by full recomputation (no cache) in a plain loop, optionally banning the tokens already in
    each row; rows end at eos and are padded after it."""
    ids, done = prompt.clone(), torch.zeros(prompt.shape[0], dtype=torch.bool)
    for _ in range(n):
        full = torch.cat([mask, torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=torch.bool)], dim=1)
        logits = model.decode(ids, attention_mask=full)[:, -1].double()
        if ban_seen:
            logits.scatter_(1, ids, float("-inf"))
        nxt = logits.argmax(dim=-1).masked_fill(done, PAD)
        ids, done = torch.cat([ids, nxt[:, None]], dim=1), done | (nxt == EOS)
        if bool(done.all()):
            break
    return ids


def test_a_processor_sees_the_sequence_so_far_and_the_step_in_both_searches():
    model = language_model()
    prompt, mask = left_pad(PROMPTS, PAD)
    n = 8
    with torch.inference_mode():
        rule = BanSeen()
        runner = DecoderRunner(model, None, None, prompt.shape[1] + n, use_cache=True, prompt_mask=mask)
        got = TokenSearch(Greedy(), EOS, PAD, [rule]).run(runner, prompt, prompt.shape[1] + n)
        expected = reference_greedy(model, prompt, mask, n, ban_seen=True)
    assert not torch.equal(expected, reference_greedy(model, prompt, mask, n))  # the rule matters here
    assert torch.equal(got, expected)
    steps = len(rule.seen)
    assert rule.seen == [((3, prompt.shape[1] + i), i) for i in range(steps)] and steps == got.shape[1] - 5

    # beam search with one beam is greedy search on log-probabilities: the same rule gives the same ids
    with torch.inference_mode():
        rule = BanSeen()
        runner = DecoderRunner(model, None, None, prompt.shape[1] + n, use_cache=True, prompt_mask=mask)
        beams = BeamSearch(1, 1.0, EOS, PAD, [rule]).run(runner, prompt, prompt.shape[1] + n)
    assert rule.seen[0] == ((3, 5), 0) and rule.seen[1] == ((3, 6), 1)
    width = beams.shape[1]
    assert torch.equal(beams, expected[:, :width]) and (expected[:, width:] == PAD).all()


# ---------------------------------------------------------------- an LM head that peft wraps
@pytest.mark.parametrize(
    "settings",
    [dict(trainable_token_indices=[3, 7, 11]), dict(modules_to_save=["lm_head"])],
    ids=["trainable-tokens", "modules-to-save"],
)
def test_an_lm_head_peft_wraps_decodes(settings):
    pytest.importorskip("peft")
    from mmformer.adapt import adapter_state, adapters
    from mmformer.adapt.adapters import LoraSettings

    model = language_model()
    adapters.add_lora(model, LoraSettings(r=2, target_modules=["qkv"], **settings))
    assert type(model.lm_head) is not torch.nn.Linear  # wrapped: the fast path must not read its attributes
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_state.adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g))
    prompt, mask = left_pad(PROMPTS, PAD)
    base = generate(language_model(), prompt_ids=prompt, prompt_mask=mask, max_new_tokens=8)
    for beams in (1, 3):
        cached = generate(model, prompt_ids=prompt, prompt_mask=mask, max_new_tokens=8, num_beams=beams)
        uncached = generate(model, prompt_ids=prompt, prompt_mask=mask, max_new_tokens=8, num_beams=beams,
                            use_cache=False)  # fmt: skip
        assert torch.equal(cached, uncached)
    greedy = generate(model, prompt_ids=prompt, prompt_mask=mask, max_new_tokens=8)
    with torch.no_grad():
        assert torch.equal(greedy, reference_greedy(model, prompt, mask, 8))
    assert not torch.equal(greedy, base)  # the adapted head is the one decoding


def test_most_likely_is_argmax_with_ties_nan_and_minus_inf():
    """Greedy's choice (NumPy's argmax for float scores on CPU, ``max(dim).indices`` for the others: both faster)
    is ``argmax``'s: the first of tied maxima, a NaN's position, and a row of -inf's first id; in float32, float64 and
    bfloat16, for 1-D and 3-D scores and a non-contiguous view, at Whisper's vocabulary size too."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        scores = torch.randint(-3, 3, (4, 300), generator=g).float()  # many ties
        scores[1, torch.randint(0, 300, (2,), generator=g)] = float("nan")
        scores[2] = float("-inf")
        for x in (scores, scores.bfloat16(), scores.double(), scores[1], scores.view(2, 2, 300), scores.t()[:7]):
            assert torch.equal(most_likely(x), x.argmax(dim=-1)), trial
    wide = torch.randn(3, 51865, generator=g)
    assert torch.equal(most_likely(wide), wide.argmax(dim=-1))
    assert torch.equal(Greedy().choose(wide), wide.argmax(dim=-1))
