"""A Hugging Face folder's tokenizer as a :class:`~mmformer.preprocess.tokenizer.Tokenizer`: its ``tokenizer.json``,
or, in older Hub folders, its vocabulary files, built with the ``tokenizers`` library as transformers' slow -> fast
converters build them, with the special and added tokens its ``tokenizer_config.json`` (or the older
``special_tokens_map.json`` / ``added_tokens.json``) names."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from mmformer.io.hub import read_json
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.preprocess.tokenizer import Tokenizer

__all__ = ["read_hf_tokenizer"]

# Older Hub folders hold their tokenizer as vocabulary files, not tokenizer.json. Two families are read, built as
# transformers' slow -> fast converters build them (convert_slow_tokenizer.py), by the ``tokenizer_class`` values
# that transformers converts with each: BertConverter (WordPiece, vocab.txt) and GPT2Converter (byte-level BPE,
# vocab.json + merges.txt).
WORDPIECE_TOKENIZERS = frozenset(
    {
        "BertTokenizer", "ConvBertTokenizer", "DistilBertTokenizer", "DPRContextEncoderTokenizer",
        "DPRQuestionEncoderTokenizer", "DPRReaderTokenizer", "ElectraTokenizer", "LayoutLMTokenizer",
        "LayoutLMv2Tokenizer", "LxmertTokenizer", "MobileBertTokenizer", "SqueezeBertTokenizer",
    }
)  # fmt: skip
BYTE_LEVEL_BPE_TOKENIZERS = frozenset({"GPT2Tokenizer"})
# The class transformers' AutoTokenizer takes for a config.json ``model_type`` where the folder names none.
_MODEL_TYPE_TOKENIZERS = {"bert": "BertTokenizer", "gpt2": "GPT2Tokenizer"}
# The named special tokens of a tokenizer config, in transformers' order (SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Vocabulary files of tokenizers in Hugging Face folders (sentencepiece and tiktoken models by their suffix).
_VOCAB_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tekken.json", "bpe.codes")
_VOCAB_SUFFIXES = (".model", ".spm", ".tiktoken")
# transformers' clean_up_tokenization (PreTrainedTokenizerBase), in its order
_CLEAN_UP_TOKENIZATION = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


def read_hf_tokenizer(directory: Path | None) -> Tokenizer | None:
    """The tokenizer of a directory :func:`read_hf_checkpoint` returned: its ``tokenizer.json``, else the vocabulary
    files of a BERT (``vocab.txt``) or GPT-2 (``vocab.json`` + ``merges.txt``) tokenizer; None without any (or
    without a directory), with a warning naming the files where the folder holds vocabulary files of another kind.

    Its padding token is the one ``tokenizer_config.json`` (or ``special_tokens_map.json``) names (``pad_token``), as
    Hugging Face's tokenizer pads: ``tokenizer.json`` alone does not say it, and a model that attends to padding
    (SigLIP pads with ``</s>``, not the vocabulary's ``<pad>``) gives another embedding for a text padded with another
    id."""
    if directory is None:
        return None
    from mmformer.preprocess.tokenizer import Tokenizer

    settings = _tokenizer_settings(directory)
    if (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    else:
        backend = _vocab_tokenizer(directory, settings)
        if backend is None:
            return None
        tokenizer = Tokenizer.from_backend(backend)
    pad = _token_content(settings.get("pad_token"))
    if isinstance(pad, str) and pad != tokenizer.pad_token:
        if pad not in tokenizer.backend.get_vocab(with_added_tokens=True):
            raise ValueError(
                f"{directory}: the pad_token of tokenizer_config.json / special_tokens_map.json, {pad!r}, is not in "
                "the tokenizer's vocabulary"
            )
        tokenizer = tokenizer.replace(pad_token=pad)
    return tokenizer


def _tokenizer_settings(directory: Path) -> dict[str, Any]:
    """``tokenizer_config.json``, with the tokens of ``special_tokens_map.json`` over it where the config lists no
    ``added_tokens_decoder`` (transformers' rule for the folders it saved before it wrote one)."""
    settings: dict[str, Any] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if name == "special_tokens_map.json" and "added_tokens_decoder" in settings:
            break
        content = read_json(directory / name)
        if content is not None and not isinstance(content, dict):
            raise ValueError(f"{directory / name}: expected a JSON object, got {type(content).__name__}")
        settings.update(content or {})
    return settings


def _token_content(value: Any) -> str | None:
    """The text of a token setting: a string, or transformers' serialised ``AddedToken`` (a dict with ``content``)."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _vocab_tokenizer(directory: Path, settings: Mapping[str, Any]) -> tokenizers.Tokenizer | None:
    """The BERT or GPT-2 tokenizer of a folder without ``tokenizer.json``, from its vocabulary files; None without
    vocabulary files, or with a warning naming them when they are of a kind mmformer does not read."""
    files = sorted(p.name for p in directory.iterdir() if p.name in _VOCAB_FILES or p.name.endswith(_VOCAB_SUFFIXES))
    if not files:
        return None
    kind = _tokenizer_class(directory, settings)
    if kind in WORDPIECE_TOKENIZERS and "vocab.txt" in files:
        return _wordpiece(directory, settings)
    if kind in BYTE_LEVEL_BPE_TOKENIZERS and {"vocab.json", "merges.txt"} <= set(files):
        return _byte_level_bpe(directory, settings)
    warnings.warn(
        f"{directory}: no tokenizer.json, and mmformer does not read its tokenizer files {files} (tokenizer class "
        f"{kind!r}; it reads tokenizer.json, a BERT vocab.txt or a GPT-2 vocab.json + merges.txt): the model loads "
        "without a tokenizer. transformers' AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes a "
        "tokenizer.json",
        stacklevel=3,
    )
    return None


def _tokenizer_class(directory: Path, settings: Mapping[str, Any]) -> str | None:
    """The tokenizer class transformers' AutoTokenizer loads a folder with: tokenizer_config.json's
    ``tokenizer_class``, else config.json's, else the one of config.json's ``model_type`` (None when unknown)."""
    name = settings.get("tokenizer_class")
    if not isinstance(name, str):
        config = read_json(directory / "config.json")
        config = config if isinstance(config, dict) else {}
        name = config.get("tokenizer_class") or _MODEL_TYPE_TOKENIZERS.get(config.get("model_type"))
    return name.removesuffix("Fast") if isinstance(name, str) else None


def _read_vocab(read: Callable[..., Any], *files: Path) -> Any:
    """A vocabulary read by ``tokenizers`` (``WordPiece.read_file``, ``BPE.read_file``); a ValueError naming the
    files when they are not a vocabulary of that kind."""
    try:
        return read(*map(str, files))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise ValueError(f"{', '.join(map(str, files))}: not a {read.__qualname__} vocabulary ({e})") from e


def _wordpiece(directory: Path, settings: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """BERT's WordPiece tokenizer from ``vocab.txt``, as transformers' ``BertConverter`` builds it."""
    specials = _special_tokens(settings, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                               mask_token="[MASK]")  # fmt: skip
    unk, cls, sep = (_token_content(specials[name]) for name in ("unk_token", "cls_token", "sep_token"))
    vocab = _read_vocab(models.WordPiece.read_file, directory / "vocab.txt")
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"),
        lowercase=settings.get("do_lower_case", True),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    if settings.get("clean_up_tokenization_spaces", True):  # on unless the config says otherwise, as in BertTokenizer
        # transformers' clean_up_tokenization, on the whole text as its decode runs it (the WordPiece decoder's own
        # clean-up sees one token at a time, so it leaves "don ' t" and "it ' s")
        cleanup = [decoders.Replace(dirty, clean) for dirty, clean in _CLEAN_UP_TOKENIZATION]
        backend.decoder = decoders.Sequence([backend.decoder, decoders.Fuse(), *cleanup])
    _add_tokens(backend, directory, settings, specials)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))],
    )
    return backend


def _byte_level_bpe(directory: Path, settings: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2's byte-level BPE from ``vocab.json`` + ``merges.txt``, as transformers' ``GPT2Converter`` builds it:
    nothing added to a text unless the config says ``add_bos_token`` (or ``add_eos_token``, which transformers'
    tokenizers honour too)."""
    end = "<|endoftext|>"
    specials = _special_tokens(settings, unk_token=end, bos_token=end, eos_token=end, pad_token=None)
    vocab, merges = _read_vocab(models.BPE.read_file, directory / "vocab.json", directory / "merges.txt")
    bpe = models.BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=settings.get("add_prefix_space", False))
    backend.decoder = decoders.ByteLevel()
    _add_tokens(backend, directory, settings, specials)
    bos, eos = (
        _token_content(specials[name]) if settings.get(f"add_{name}") else None for name in ("bos_token", "eos_token")
    )
    if bos is None and eos is None:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        return backend
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    backend.post_processor = processors.TemplateProcessing(
        single=single,
        pair=" ".join([single, "$B:1", *([f"{eos}:1"] if eos else [])]),
        special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)],
    )
    return backend


def _special_tokens(settings: Mapping[str, Any], **defaults: str | None) -> dict[str, Any]:
    """The named special tokens of a tokenizer family (``unk_token=...``: its defaults), each as the settings give it
    (a string or a serialised AddedToken), else its default."""
    return {name: settings.get(name) or defaults[name] for name in _SPECIAL_TOKENS if name in defaults}


def _add_tokens(
    backend: tokenizers.Tokenizer, directory: Path, settings: Mapping[str, Any], specials: Mapping[str, Any]
) -> None:
    """Add the added tokens of a vocabulary-file tokenizer as transformers does: tokenizer_config.json's
    ``added_tokens_decoder`` (else the older added_tokens.json), in id order, each of which must get the id listed
    there; then the special tokens (``specials``, ``additional_special_tokens``) not among them, as special tokens
    matched before normalisation."""
    extra = settings.get("additional_special_tokens") or settings.get("extra_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, Mapping) else list(extra)
    special = [t for t in (*specials.values(), *extra) if t is not None]
    if "added_tokens_decoder" in settings:
        source, listed = directory / "tokenizer_config.json", settings["added_tokens_decoder"]
    else:
        source, listed = directory / "added_tokens.json", read_json(directory / "added_tokens.json") or {}
    if not isinstance(listed, Mapping):
        raise ValueError(f"{source}: expected an object of added tokens, got {type(listed).__name__}")
    if source.name == "tokenizer_config.json":  # id -> serialised AddedToken
        where = f"{source}: added_tokens_decoder"
        listed = [(_token_id(i, where), _added_token(t, where=where)) for i, t in listed.items()]
    else:  # content -> id; special where the settings name the token
        names = set(map(_token_content, special))
        listed = [
            (_token_id(i, source), tokenizers.AddedToken(t, normalized=t not in names, special=t in names))
            for t, i in listed.items()
        ]
    for i, token in sorted(listed, key=lambda item: item[0]):
        backend.add_tokens([token])
        if backend.token_to_id(token.content) != i:
            raise ValueError(
                f"{source}: added token {token.content!r} has id {i}, but the vocabulary files give it id "
                f"{backend.token_to_id(token.content)}"
            )
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    for value in special:
        token = _added_token(value, special=True, where=f"{directory}: the special tokens")
        if token.content not in present:
            backend.add_tokens([token])
            present.add(token.content)


def _token_id(value: Any, where: Any) -> int:
    """An added token's id as a tokenizer file lists it (an int, or a JSON key such as ``"30522"``)."""
    if is_int(value) or (isinstance(value, str) and value.isdecimal()):
        return int(value)
    raise ValueError(f"{where}: expected integer token ids, got {value!r}")


def _added_token(value: Any, *, where: str, special: bool | None = None) -> tokenizers.AddedToken:
    """A token setting (a string, or transformers' serialised AddedToken with its lstrip, rstrip, normalized, ...) as
    a ``tokenizers.AddedToken``, special where ``special`` says so."""
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=bool(special))
    if not isinstance(value, Mapping) or not isinstance(value.get("content"), str):
        raise ValueError(f"{where}: expected a token (a string or an object with a 'content' string), got {value!r}")
    fields = {k: bool(value[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
    return tokenizers.AddedToken(value["content"], **{**fields, **({} if special is None else {"special": special})})
