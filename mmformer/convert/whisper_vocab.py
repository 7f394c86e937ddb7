"""Whisper's vocabulary as its decoders read it: the special token ids by name, and text ↔ ids exactly as
openai-whisper's ``Tokenizer`` (tiktoken decodes bytes with ``errors="replace"``), its non-speech tokens and its word
splitting. It serves openai-whisper's converted vocabulary and Hugging Face Whisper ``tokenizer.json`` alike.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from mmformer.preprocess.tokenizer import Tokenizer, bytes_to_unicode

_NON_SPACED = {"zh", "ja", "th", "lo", "my", "yue"}  # languages whose words are split at unicode boundaries
_TASKS = ("transcribe", "translate")


@dataclass(frozen=True, eq=False)
class WhisperTokens:
    """Whisper's special token ids read from a byte-level BPE tokenizer's vocabulary by their names, and text ↔ ids
    exactly as openai-whisper's ``Tokenizer`` (its tiktoken decodes bytes with ``errors="replace"``)."""

    tokenizer: Tokenizer
    eot: int
    sot: int
    sot_prev: int
    sot_lm: int
    no_speech: int | None
    no_timestamps: int
    transcribe: int
    translate: int
    timestamp_begin: int
    language_ids: dict[str, int]  # language code → its token, in id order
    id_bytes: list[bytes] = field(repr=False)  # the bytes each id stands for (a special token: its name)

    @staticmethod
    @lru_cache(maxsize=8)
    def from_tokenizer(tokenizer: Tokenizer) -> WhisperTokens:
        """The ids of a Whisper tokenizer (openai-whisper's converted vocabulary, or a Hugging Face Whisper
        ``tokenizer.json``); a ValueError names the special tokens it lacks."""
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        names = {
            "eot": "<|endoftext|>",
            "sot": "<|startoftranscript|>",
            "sot_prev": "<|startofprev|>",
            "sot_lm": "<|startoflm|>",
            "no_timestamps": "<|notimestamps|>",
            "transcribe": "<|transcribe|>",
            "translate": "<|translate|>",
            "timestamp_begin": "<|0.00|>",
        }
        missing = [token for token in names.values() if token not in vocab]
        if missing:
            raise ValueError(f"tokenizer: expected Whisper's special tokens, but it lacks {missing}")
        first, last = vocab[names["sot"]], vocab[names["translate"]]  # the language tokens lie between these two
        languages = {t[2:-2]: i for t, i in vocab.items() if first < i < last and t[:2] == "<|" and t[-2:] == "|>"}
        decoder = {c: b for b, c in bytes_to_unicode().items()}
        added = {token.content for token in tokenizer.backend.get_added_tokens_decoder().values()}
        id_bytes = [b""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            plain = token not in added and all(c in decoder for c in token)
            id_bytes[i] = bytes(decoder[c] for c in token) if plain else token.encode()
        return WhisperTokens(
            tokenizer=tokenizer,
            no_speech=vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>")),
            language_ids=dict(sorted(languages.items(), key=lambda item: item[1])),
            id_bytes=id_bytes,
            **{key: vocab[token] for key, token in names.items()},
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, timestamp tokens dropped (openai-whisper's ``Tokenizer.decode``)."""
        return self.decode_with_timestamps([i for i in ids if i < self.timestamp_begin])

    def decode_with_timestamps(self, ids: Sequence[int]) -> str:
        return b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def sot_sequence(self, language: str | None, task: str | None) -> list[int]:
        """``[sot, language, task]``; a model without language tokens (English-only) has ``[sot]``."""
        if not self.language_ids:
            return [self.sot]
        if task not in _TASKS:
            raise ValueError(f"task: expected one of {_TASKS}, got {task!r}")
        if language not in self.language_ids:
            raise ValueError(f"language: expected one of this model's codes {sorted(self.language_ids)}, got "
                             f"{language!r}")  # fmt: skip
        return [self.sot, self.language_ids[language], self.transcribe if task == "transcribe" else self.translate]

    def non_speech_tokens(self) -> tuple[int, ...]:
        """Tokens of speaker tags and non-speech annotations (♪, brackets, ...), as openai-whisper suppresses them
        (``Tokenizer.non_speech_tokens``), keeping ordinary punctuation."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()  # noqa: SIM905
        miscellaneous = set("♩♪♫♬♭♮♯")  # U+2640..U+267F: their first token is safe to suppress
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + sorted(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return tuple(sorted(result))

    def suppress_tokens(self) -> tuple[int, ...]:
        """openai-whisper's default ``suppress_tokens="-1"``: the non-speech tokens and the special tokens that
        are never sampled (the no-speech probability is read separately)."""
        ids = {*self.non_speech_tokens(), self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm}
        if self.no_speech is not None:
            ids.add(self.no_speech)
        return tuple(sorted(ids))

    def split_to_word_tokens(self, ids: list[int], language: str | None) -> tuple[list[str], list[list[int]]]:
        """Words and their ids: at spaces and punctuation, or at unicode boundaries for languages written without
        spaces (openai-whisper's ``split_to_word_tokens``)."""
        if language in _NON_SPACED:
            return self._split_on_unicode(ids)
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for subword, tokens in zip(*self._split_on_unicode(ids)):
            special = tokens[0] >= self.eot
            if special or subword.startswith(" ") or subword.strip() in string.punctuation or not words:
                words.append(subword)
                word_tokens.append(tokens)
            else:
                words[-1] += subword
                word_tokens[-1].extend(tokens)
        return words, word_tokens

    def _split_on_unicode(self, ids: list[int]) -> tuple[list[str], list[list[int]]]:
        full = self.decode_with_timestamps(ids)
        replacement = "\ufffd"
        words, word_tokens, current, offset = [], [], [], 0
        for token in ids:
            current.append(token)
            decoded = self.decode_with_timestamps(current)
            if replacement not in decoded or full[offset + decoded.index(replacement)] == replacement:
                words.append(decoded)
                word_tokens.append(current)
                current = []
                offset += len(decoded)
        return words, word_tokens
