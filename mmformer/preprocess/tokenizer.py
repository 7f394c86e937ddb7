"""Text ↔ token ids for mmformer models: a thin wrapper on Hugging Face `tokenizers`.

Everything a tokenizer needs travels in one `tokenizer.json`: the model (byte-level BPE, CLIP's BPE, WordPiece, ...),
the template that adds bos/eos (`TemplateProcessing`), the padding token and the default `max_length` (the backend's
padding and truncation settings). Loading infers bos/eos/pad back from those settings, so there are no side files.

Three families:
- our own byte-level BPE (`Tokenizer.train`), special tokens <pad>=0, <bos>=1, <eos>=2, <unk>=3;
- OpenAI CLIP's BPE (`Tokenizer.clip`), id for id equal to open_clip's `SimpleTokenizer`;
- any Hugging Face `tokenizer.json`, e.g. BERT's WordPiece ([CLS] plays bos, [SEP] eos).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmformer.io.atomic import write_text_atomic
from mmformer.preprocess.media import check_unicode, read_tokenizer_json
from mmformer.values import is_int

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 of every tokenizer trained here
DEFAULT_MAX_LENGTH = 77
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_SUFFIX = "</w>"  # end-of-word marker of CLIP's BPE; a BPE with it gets open_clip's text cleaning on load too
# open_clip's word pattern, `'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, compiled there with IGNORECASE.
# On its lowercased input that flag changes two things, spelled out here for Oniguruma: "ſ" (U+017F) matches the s
# of 's, and U+0345 (combining ypogegrammeni) matches no branch at all, so it is dropped like whitespace.
CLIP_SPLIT = r"""'[s\x{17f}]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+"""
HF_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # Hugging Face's CLIPTokenizer's
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>")


class Tokenizer:
    """Text ↔ token ids for mmformer models, backed by a `tokenizers.Tokenizer` saved as one tokenizer.json.

    Args:
        backend: the Hugging Face tokenizer. It is configured in place: its post-processor becomes the bos/eos
            template; its padding and truncation are switched off in memory (this class pads and truncates, so
            that `max_length` can change per call) and written into the file by `save`.
        max_length: default length `__call__` truncates to (and pads to with `padding="max_length"`).
        pad_token: token whose id fills padded positions.
        bos_token: token put before every text, or None.
        eos_token: the end-of-text token, or None; put after every text (truncation keeps it as the last token)
            unless ``append_eos`` is False.
        append_eos: False: ``eos_token`` ends generated text and decoding but is not added to encoded texts (GPT-2,
            as Hugging Face's tokenizer). The saved template then joins a pair of texts with it (GPT-2's document
            separator), which is where loading finds it again.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        pad_token: str,
        bos_token: str | None,
        eos_token: str | None,
        append_eos: bool = True,
    ) -> None:
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        vocab = backend.get_vocab(with_added_tokens=True)
        for name, token in (("pad_token", pad_token), ("bos_token", bos_token), ("eos_token", eos_token)):
            if (token is not None or name == "pad_token") and token not in vocab:
                raise ValueError(f"{name} must be a token in the backend's vocabulary, got {token!r}")
        self.pad_token, self.bos_token, self.eos_token = pad_token, bos_token, eos_token
        self._pad_id = vocab[pad_token]
        self._bos_id = None if bos_token is None else vocab[bos_token]
        self._eos_id = None if eos_token is None else vocab[eos_token]
        self._vocab_size = max(vocab.values()) + 1  # ids may have gaps; the embedding table needs max id + 1
        self._append_eos = bool(append_eos) and eos_token is not None
        self._n_special = (bos_token is not None) + self._append_eos
        self._max_length = self._check_max_length(max_length)
        # open_clip's cleaning for a CLIP BPE without a normalizer of its own (Hugging Face's CLIP has one)
        clip_bpe = getattr(backend.model, "end_of_word_suffix", None) == CLIP_SUFFIX
        self._clip_clean = clip_bpe and backend.normalizer is None

        specials = [(t, vocab[t]) for t in dict.fromkeys(t for t in (bos_token, eos_token) if t is not None)]
        single = " ".join([*([bos_token] if bos_token else []), "$A", *([eos_token] if self._append_eos else [])])
        if self._append_eos:
            pair = " ".join([single, "$B:1", f"{eos_token}:1"])
        else:  # eos between the texts only: it stays in the saved template without ending a single text
            pair = " ".join([single, *([eos_token] if eos_token else []), "$B:1"])
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self._verbatim = _mangled_added_tokens(backend)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 1000,
        *,
        min_frequency: int = 1,
        max_length: int = DEFAULT_MAX_LENGTH,
        lowercase: bool = True,
    ) -> Tokenizer:
        """Trains a byte-level BPE on `texts`: lossless (any text decodes back, lowercased if `lowercase`)."""
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, got a single str (wrap it in a list)")
        feed = lambda backend, trainer: backend.train_from_iterator(texts, trainer)
        return cls._train(feed, vocab_size, min_frequency, max_length, lowercase)

    @classmethod
    def train_from_files(cls, files: Sequence[str | os.PathLike], vocab_size: int = 1000, **kw) -> Tokenizer:
        """Like `train` (same keyword arguments), reading the text files in Rust instead of from Python."""
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        for i, f in enumerate(files):
            if not Path(f).is_file():
                raise FileNotFoundError(f"files[{i}] must be an existing text file, got {os.fspath(f)!r}")
        feed = lambda backend, trainer: backend.train([os.fspath(f) for f in files], trainer)
        return cls._train(feed, vocab_size, **kw)

    @classmethod
    def _train(
        cls,
        feed: Callable[[tokenizers.Tokenizer, trainers.Trainer], None],
        vocab_size: int,
        min_frequency: int = 1,
        max_length: int = DEFAULT_MAX_LENGTH,
        lowercase: bool = True,
    ) -> Tokenizer:
        floor = len(SPECIAL_TOKENS) + 256  # every byte is in the alphabet, so no text is ever <unk>
        if not is_int(vocab_size) or vocab_size <= floor:
            raise ValueError(f"vocab_size must be an int > {floor} (4 special tokens + 256 bytes), got {vocab_size!r}")
        if not is_int(min_frequency) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        backend.normalizer = normalizers.Lowercase() if lowercase else None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        kw = dict(special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False)
        feed(backend, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, **kw))
        return cls(backend, max_length=max_length, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a tokenizer.json (ours or any Hugging Face one), or the tokenizer.json inside directory `path`."""
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"path must be a tokenizer.json or a folder holding one, got {os.fspath(path)!r}")
        return cls.from_backend(read_tokenizer_json(file))

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        """Loads a tokenizer.json given as text (training checkpoints carry their tokenizer this way)."""
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
            raise ValueError(f"text is not a valid tokenizer.json: {e}") from e
        return cls.from_backend(backend)

    @classmethod
    def from_backend(cls, backend: tokenizers.Tokenizer) -> Tokenizer:
        """Wraps a Hugging Face tokenizer, inferring bos/eos from its post-processor and pad/max_length from its
        padding and truncation settings (pad falls back to a pad-like token name, then eos, then id 0)."""
        processor = backend.post_processor
        state = json.loads(processor.__getstate__()) if processor else None
        bos, eos = _template_tokens(state)
        separator = _pair_separator(state) if eos is None else None  # an eos the template does not append
        separator = None if separator == bos else separator  # Llama's pair template repeats its bos instead
        eos, append_eos = (eos, True) if separator is None else (separator, False)
        vocab = backend.get_vocab(with_added_tokens=True)
        if backend.padding:
            pad = backend.padding["pad_token"]
        else:
            pad = next((t for t in _PAD_NAMES if t in vocab), eos if eos is not None else backend.id_to_token(0))
        max_length = backend.truncation["max_length"] if backend.truncation else DEFAULT_MAX_LENGTH
        return cls(backend, max_length=max_length, pad_token=pad, bos_token=bos, eos_token=eos, append_eos=append_eos)

    def replace(self, **changes: Any) -> Tokenizer:
        """This tokenizer with other ``max_length``, ``pad_token``, ``bos_token``, ``eos_token`` or ``append_eos``
        (on a copy of the backend: this one is left as it is)."""
        settings = dict(
            max_length=self._max_length,
            pad_token=self.pad_token,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            append_eos=self._append_eos,
        )
        unknown = sorted(set(changes) - set(settings))
        if unknown:
            raise TypeError(f"replace: unknown settings {unknown}; expected some of {sorted(settings)}")
        return Tokenizer(tokenizers.Tokenizer.from_str(self._backend.to_str()), **{**settings, **changes})

    @classmethod
    def clip(
        cls,
        bpe_path: str | os.PathLike | None = None,
        context_length: int = DEFAULT_MAX_LENGTH,
        *,
        cleaning: Literal["open_clip", "hf"] = "open_clip",
    ) -> Tokenizer:
        """OpenAI CLIP's tokenizer, giving the same ids as open_clip's `SimpleTokenizer`.

        Args:
            bpe_path: CLIP's merges file (bpe_simple_vocab_16e6.txt.gz); None uses the copy open_clip ships.
            context_length: default `max_length`; CLIP models use 77.
            cleaning: "open_clip": its text cleaning (ftfy, HTML unescaping, whitespace, lowercase), run in Python;
                "hf": Hugging Face's `CLIPTokenizer` normalizer (NFC, whitespace runs to one space, lowercase; no ftfy,
                no HTML unescaping), kept in the backend and so in the saved tokenizer.json.
        """
        if cleaning not in ("open_clip", "hf"):
            raise ValueError(f"cleaning: expected 'open_clip' or 'hf', got {cleaning!r}")
        path = _clip_bpe_path(bpe_path)
        try:
            with gzip.open(path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"bpe_path must be CLIP's gzipped merges file, got {os.fspath(path)!r}: {e}") from e
        merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]  # exactly open_clip's slice
        byte_chars = list(bytes_to_unicode().values())
        specials = ["<start_of_text>", "<end_of_text>"]
        vocab = [*byte_chars, *(c + CLIP_SUFFIX for c in byte_chars), *("".join(m) for m in merges), *specials]
        # dict(zip(...)) as open_clip builds it, so that a duplicated merge would resolve to the same id.
        bpe = models.BPE(dict(zip(vocab, range(len(vocab)))), merges, end_of_word_suffix=CLIP_SUFFIX)
        backend = tokenizers.Tokenizer(bpe)
        # No normalizer: open_clip's cleaning (ftfy, html, whitespace, lower) runs in Python before the backend
        # (see `_clean_clip`); a second pass in Rust could only disagree with it (other Unicode tables, NFC).
        words = pre_tokenizers.Split(Regex(CLIP_SPLIT if cleaning == "open_clip" else HF_CLIP_SPLIT), "removed", True)
        if cleaning == "hf":  # a normalizer switches open_clip's Python cleaning off (see `_clip_clean`)
            whitespace = normalizers.Replace(Regex(r"\s+"), " ")
            backend.normalizer = normalizers.Sequence([normalizers.NFC(), whitespace, normalizers.Lowercase()])
        to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # words are already split
        backend.pre_tokenizer = pre_tokenizers.Sequence([words, to_bytes])
        # Bytes back to text, then each end-of-word marker becomes the space between words (the last one goes).
        unmark = [decoders.Replace(Regex(CLIP_SUFFIX + r"\z"), ""), decoders.Replace(CLIP_SUFFIX, " ")]
        backend.decoder = decoders.Sequence([decoders.ByteLevel(), *unmark])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        pad = byte_chars[0]  # open_clip pads with id 0 ("!")
        return cls(backend, max_length=context_length, pad_token=pad, bos_token=specials[0], eos_token=specials[1])

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json (to `path`, or into it if it is a directory) atomically: a reader never sees a
        half-written file, and a failed save leaves the previous file intact."""
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        stored = tokenizers.Tokenizer.from_str(self._backend.to_str())  # a copy: self stays unpadded/untruncated
        stored.enable_truncation(self._max_length)
        stored.enable_padding(pad_id=self._pad_id, pad_token=self.pad_token)
        write_text_atomic(file, stored.to_str())

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer (padding and truncation off; `save` writes them)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Rows the embedding table needs: largest id + 1."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def append_eos(self) -> bool:
        """Whether encoding puts ``eos_token`` after every text."""
        return self._append_eos

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, max_length={self.max_length}, pad={self.pad_token!r}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r})"
        )

    def encode(self, text: str, *, name: str = "text") -> list[int]:
        """Ids of one text, with the template's bos/eos, not truncated. ``name``: how errors name the text (the
        caller's argument, e.g. ``"prompts[2]"``)."""
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
        return self._encode_batch([text], lambda _: name)[0]

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding: Literal["longest", "max_length"] = "longest",
        return_tensors: bool = True,
        name: str = "texts",
    ) -> dict:
        """Tokenizes a batch for a model.

        Texts longer than `max_length` (default: `self.max_length`) are cut, keeping eos as the last token as
        open_clip does; rows are right-padded with `pad_id` to the longest row or to `max_length`. Errors name the
        texts `name` (the caller's argument: ``name[i]`` is the i-th text).

        Returns:
            {"input_ids": (B, T) long tensor, "attention_mask": (B, T) bool tensor, True = real token}; nested
            lists of the same values when `return_tensors` is False.
        """
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError("texts must hold at least one string, got an empty sequence")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts must hold only strings, got {type(t).__name__} at index {i}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        max_length = self._max_length if max_length is None else self._check_max_length(max_length)

        rows = [self._truncate(ids, max_length) for ids in self._encode_batch(list(texts), lambda i: f"{name}[{i}]")]
        width = max_length if padding == "max_length" else max(map(len, rows))
        input_ids = [row + [self._pad_id] * (width - len(row)) for row in rows]
        mask = [[True] * len(row) + [False] * (width - len(row)) for row in rows]
        if not return_tensors:
            return {"input_ids": input_ids, "attention_mask": mask}
        return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}

    def _encode_batch(self, texts: list[str], name: Callable[[int], str]) -> list[list[int]]:
        """Ids of each text. A text that is not valid Unicode is refused first, named ``name(i)``
        (:func:`~mmformer.preprocess.media.check_unicode`): every path that encodes text comes through here."""
        for i, t in enumerate(texts):
            check_unicode(t, name(i))
        if self._clip_clean:
            texts = [_clean_clip(t) for t in texts]
        return [e.ids for e in self._backend.encode_batch(texts)]

    def _truncate(self, ids: list[int], max_length: int) -> list[int]:
        if len(ids) <= max_length:
            return ids
        cut = ids[:max_length]
        if self._append_eos and ids[-1] == self._eos_id:
            cut[-1] = self._eos_id
        return cut

    def _check_max_length(self, value: int) -> int:
        least = max(1, self._n_special)
        if not is_int(value) or value < least:
            raise ValueError(f"max_length must be an int >= {least} (room for the bos/eos tokens), got {value!r}")
        return value

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence. With `skip_special_tokens` it ends at the first eos and drops padding and
        special tokens; without, every id is decoded."""
        row = self._to_rows(ids, ndim=1)[0]
        row = self._until_eos(row) if skip_special_tokens else row
        return self._decode_row(row, skip_special_tokens)

    def batch_decode(self, ids: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        """Texts of a batch of id rows (e.g. `generate` output): each row stops at its first eos, padding ignored."""
        rows = [self._until_eos(row) for row in self._to_rows(ids, ndim=2)]
        if self._verbatim and any(i in self._verbatim for row in rows for i in row):
            return [self._decode_row(row, skip_special_tokens) for row in rows]
        return self._backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def _decode_row(self, row: list[int], skip_special_tokens: bool) -> str:
        """One row; added tokens the backend's decoder would mangle (see :func:`_mangled_added_tokens`) are written as
        their content, the runs between them decoded by the backend."""
        if not self._verbatim or not any(i in self._verbatim for i in row):
            return self._backend.decode(row, skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for i in [*row, None]:
            if i is None or i in self._verbatim:
                if run:
                    parts.append(self._backend.decode(run, skip_special_tokens=skip_special_tokens))
                    run = []
                if i is not None:
                    parts.append(self._verbatim[i])
            else:
                run.append(i)
        return "".join(parts)

    def _until_eos(self, row: list[int]) -> list[int]:
        """The row up to and including its first eos (a leading bos equal to eos does not count), else the row
        without its trailing padding."""
        start = 1 if row and row[0] == self._bos_id else 0
        if self._eos_id is not None and self._eos_id in row[start:]:
            return row[: row.index(self._eos_id, start) + 1]
        end = len(row)
        while end > 0 and row[end - 1] == self._pad_id:
            end -= 1
        return row[:end]

    def _to_rows(self, ids: Sequence | torch.Tensor, ndim: int) -> list[list[int]]:
        """`ids` (tensor, array or nested sequence of ints) as `ndim`-D lists, every id checked against the vocab."""
        if isinstance(ids, torch.Tensor) and (ids.dim() != ndim or ids.is_floating_point() or ids.is_complex()):
            raise ValueError(f"ids must be a {ndim}-D integer tensor, got a {ids.dim()}-D {ids.dtype} tensor")
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        rows = [r.tolist() if hasattr(r, "tolist") else r for r in ([ids] if ndim == 1 else ids)]
        for r, row in enumerate(rows):
            for i, v in enumerate(row):
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < self._vocab_size:
                    where = f"position {i}" if ndim == 1 else f"row {r}, position {i}"
                    raise ValueError(f"ids must hold ints in [0, {self._vocab_size}), got {v!r} at {where}")
        return [[int(v) for v in row] for row in rows]


def _mangled_added_tokens(backend: tokenizers.Tokenizer) -> dict[int, str]:
    """Added, non-special tokens that the backend's decoder does not give back as written, by id → content. A
    byte-level decoder maps every character of an added token through its byte table, so an added "fünf" (whose
    "ü" is also a byte-table character) decodes as "f\ufffdnf" (huggingface/tokenizers#1392); such tokens are
    decoded as their content."""
    return {
        i: token.content
        for i, token in backend.get_added_tokens_decoder().items()
        if not token.special and backend.decode([i], skip_special_tokens=False) != token.content
    }


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]  # whitespace/control bytes move to 256, 257, ...
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def _template_tokens(processor: dict | None) -> tuple[str | None, str | None]:
    """(bos, eos) that a serialised post-processor puts around a single text: the special tokens right before and
    right after the text in a template; cls/sep of BERT/RoBERTa processors."""
    kind = (processor or {}).get("type")
    if kind == "Sequence":
        found = [_template_tokens(p) for p in processor["processors"]]
        return next((f for f in found if f != (None, None)), (None, None))
    if kind in ("BertProcessing", "RobertaProcessing"):
        return processor["cls"][0], processor["sep"][0]
    if kind != "TemplateProcessing":
        return None, None
    single = processor["single"]
    at = next(i for i, piece in enumerate(single) if "Sequence" in piece)
    tokens = {
        i: processor["special_tokens"][p["SpecialToken"]["id"]]["tokens"]
        for i, p in enumerate(single)
        if "SpecialToken" in p
    }
    bos, eos = tokens.get(at - 1), tokens.get(at + 1)
    return (bos[-1] if bos else None), (eos[0] if eos else None)


def _pair_separator(processor: dict | None) -> str | None:
    """The special token a serialised template puts between the two texts of a pair when it puts none after a
    single text: the end-of-text token of a tokenizer that does not append it (see ``Tokenizer(append_eos=False)``)."""
    if (processor or {}).get("type") != "TemplateProcessing":
        return None
    pair = processor["pair"]
    at = [i for i, piece in enumerate(pair) if "Sequence" in piece]
    if len(at) != 2 or at[1] != at[0] + 2 or "SpecialToken" not in pair[at[0] + 1]:
        return None
    tokens = processor["special_tokens"][pair[at[0] + 1]["SpecialToken"]["id"]]["tokens"]
    return tokens[0] if len(tokens) == 1 else None


def _clip_bpe_path(bpe_path: str | os.PathLike | None) -> Path:
    if bpe_path is not None:
        if not Path(bpe_path).is_file():
            raise FileNotFoundError(f"bpe_path must be CLIP's {CLIP_BPE_FILE}, no file at {os.fspath(bpe_path)!r}")
        return Path(bpe_path)
    # find_spec locates the package without importing it (open_clip's __init__ pulls in its models, timm, ...).
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / CLIP_BPE_FILE).is_file():
            return Path(folder) / CLIP_BPE_FILE
    raise FileNotFoundError(
        f"bpe_path=None looks for the {CLIP_BPE_FILE} that open_clip ships, but the open_clip package "
        "(pip install open_clip_torch) was not found; pass bpe_path= the file instead"
    )


def _clean_clip(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy repair, HTML unescaping twice, whitespace runs to one space, lowercase."""
    try:
        import ftfy  # only CLIP tokenizers need it; it is an open_clip dependency
    except ImportError as e:
        raise ImportError("CLIP tokenizers clean text with ftfy, as open_clip does: pip install ftfy") from e
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
