"""Stop strings (:class:`~mmformer.generation.token_choice.StopStrings`): a row stops at the token that completes a
stop string in its generated text, as the whole continuation reads after its prompt — also where the string is
several tokens of one character (byte-level BPE: "€" is three) or begins with the space of a SentencePiece piece
("▁there" is " there" after a prompt) — and where Hugging Face's ``stop_strings`` stop."""

from __future__ import annotations

import pytest
import torch

from mmformer.generation.search import TokenSearch
from mmformer.generation.token_choice import Greedy, StopStrings
from mmformer.preprocess.tokenizer import Tokenizer
from tests.test_text_generation import sentencepiece_tokenizer

BYTE_TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "once upon a time there was a king.\n"] * 4


def byte_level() -> Tokenizer:
    """A byte-level BPE with few merges: "€" and "日" are three byte tokens each."""
    return Tokenizer.train(BYTE_TEXTS, vocab_size=280, max_length=48)


def split(tokenizer: Tokenizer, text: str, n_prompt: int) -> tuple[list[int], list[int]]:
    """``text``'s ids (without a trailing end-of-text) as a prompt of ``n_prompt`` ids and the generated rest."""
    ids = tokenizer.encode(text)
    ids = ids[:-1] if ids[-1] == tokenizer.eos_id else ids
    return ids[:n_prompt], ids[n_prompt:]


def first_stop(tokenizer: Tokenizer, prompt: list[int], generated: list[int], stop: str) -> int | None:
    """The reference: the number of generated tokens after which the continuation's text — the whole sequence decoded,
    less the decoded prompt (Hugging Face's text-generation pipeline) — first holds ``stop``."""
    head = tokenizer.decode(prompt)
    for k in range(1, len(generated) + 1):
        if stop in tokenizer.decode(prompt + generated[:k])[len(head) :]:
            return k
    return None


def stopped_after(stop: StopStrings, prompt: list[int], generated: list[int]) -> int | None:
    """The number of generated tokens after which ``stop``, asked as the search asks it at each step, says stop."""
    for k in range(1, len(generated) + 1):
        if bool(stop(torch.tensor([prompt + generated[:k]]))[0]):
            return k
    return None


@pytest.mark.parametrize(
    ("kind", "text", "n_prompt", "stops"),
    [
        ("byte-level", "ab €€ 日本 naïve x", 3, ["€€", "€", " €", "日本", "本 n", "ï", "€€ 日本 na"]),
        ("sentencepiece", "who lived in there was a king", 4, [" there", "there", " a k", "s a", " was a king"]),
    ],
)
def test_a_stop_string_ends_the_row_at_the_token_that_completes_it(kind, text, n_prompt, stops):
    tokenizer = byte_level() if kind == "byte-level" else sentencepiece_tokenizer()
    prompt, generated = split(tokenizer, text, n_prompt)
    if kind == "byte-level":  # what the window missed: a stop string of more tokens than characters
        assert len(tokenizer.encode("€")) - 2 == 3
    for s in stops:
        expected = first_stop(tokenizer, prompt, generated, s)
        assert expected is not None, s  # the text holds every string
        assert stopped_after(StopStrings(tokenizer, [s], len(prompt)), prompt, generated) == expected, s


def test_stop_strings_stop_where_hugging_faces_do():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.stopping_criteria import StopStringCriteria

    tokenizer = byte_level()
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
    prompt, generated = split(tokenizer, "ab €€ 日本 naïve x", 3)
    for s in ["€€", "日本", "€ 日", "ve x"]:
        hf = StopStringCriteria(hf_tokenizer, [s])
        hf_steps = next(
            k for k in range(1, len(generated) + 1) if bool(hf(torch.tensor([prompt + generated[:k]]), None)[0])
        )
        assert stopped_after(StopStrings(tokenizer, [s], len(prompt)), prompt, generated) == hf_steps, s


class Chain:
    """A decoder runner whose next token is ``chain[last token]``: the row "ab " then "€€€€..." one byte at a time."""

    def __init__(self, chain: dict[int, int], vocab_size: int):
        self.chain, self.vocab_size = chain, vocab_size

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(tokens.shape[0], self.vocab_size)
        logits[torch.arange(tokens.shape[0]), [self.chain[t] for t in tokens[:, -1].tolist()]] = 1.0
        return logits


def test_generation_stops_after_the_bytes_of_a_multibyte_stop_string():
    """Hugging Face's ``generate(stop_strings=["€€"])`` stops this chain after 6 tokens (two "€" of 3 bytes each);
    the character-sized window never saw both whole and ran to the length limit."""
    tokenizer = byte_level()
    prompt, _ = split(tokenizer, "ab ", 3)
    euro = tokenizer.encode("€")[1:-1]  # its three byte tokens
    chain = {prompt[-1]: euro[0], euro[0]: euro[1], euro[1]: euro[2], euro[2]: euro[0]}
    search = TokenSearch(Greedy(), tokenizer.eos_id, tokenizer.pad_id, stop=StopStrings(tokenizer, ["€€"], 3))
    ids = search.run(Chain(chain, tokenizer.vocab_size), torch.tensor([prompt]), max_length=3 + 12)
    assert ids[0, 3:].tolist() == euro * 2
