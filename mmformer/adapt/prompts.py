"""Soft prompts: a few learned vectors in a frozen model's input, saved as one small safetensors file beside it.

- :class:`ContextPrompt` — CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", 2022): M learned
  context vectors take the place of a hand-written template in front of each class name, on the text side of
  zero-shot classification: ``[bos] v_1 … v_M <class name tokens> [eos]``. Class embeddings come from
  :func:`mmformer.zeroshot.build_class_embeddings` (``prompt=``), the one function that builds them.
- :class:`DecoderPrefix` — prompt tuning (Lester et al., 2021) for the decoder: P learned vectors the decoder reads
  before its first token when captioning or transcribing (``model.decode(..., prefix_embeds=)``,
  ``generate(..., prefix_embeds=)``); they take the first P positions of the decoder's position table.

A prompt file holds one float tensor ``prompt`` (length, D) and metadata ``mmformer_prompt`` (the kind); it is
read by its header first (kind, shape, dtype checked against the model it is for) and only then loaded.

Shape legend: M context vectors, P prefix vectors, D text width, C classes, T tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from mmformer.io.atomic import safetensors_bytes, write_bytes_atomic
from mmformer.io.weights import base_layer
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.model import MultimodalTransformer
    from mmformer.preprocess.tokenizer import Tokenizer

PROMPT_KEY = "prompt"
KIND_KEY = "mmformer_prompt"
PROMPT_FORMAT_VERSION = "1"
PROMPT_FILE = "prompt.safetensors"  # a prompt's file name inside a folder (what ``mmformer export`` writes there)


class SoftPrompt(nn.Module):
    """``length`` learned vectors of width ``width`` (initialised N(0, 0.02), as token embeddings are)."""

    kind: ClassVar[str] = ""
    route: ClassVar[str] = ""  # the route whose width the vectors have
    part: ClassVar[str] = ""  # that route's part, as error messages name it

    def __init__(self, length: int, width: int, init: torch.Tensor | None = None):
        super().__init__()
        for name, value in (("length", length), ("width", width)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        self.vectors = nn.Parameter(torch.empty(length, width))  # (M or P, D)
        self.reset_parameters()
        if init is not None:
            if tuple(init.shape) != (length, width):
                raise ValueError(f"init: expected shape ({length}, {width}), got {tuple(init.shape)}")
            with torch.no_grad():
                self.vectors.copy_(init)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.vectors.normal_(0.0, 0.02)

    @property
    def length(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.shape[1]

    def extra_repr(self) -> str:
        return f"length={self.length}, width={self.width}"

    @classmethod
    def model_width(cls, model: MultimodalTransformer) -> int:
        """The width of the route this kind of prompt feeds (ValueError if the model lacks it)."""
        if cls.route not in model.config.routes:
            raise ValueError(f"model: a {cls.kind} prompt needs a {cls.part}; routes are {sorted(model.config.routes)}")
        return model.config.width(cls.route)

    def check_model(self, model: MultimodalTransformer, source: object = "prompt") -> None:
        """A clear error when the prompt's width is not the width of the model part it feeds."""
        width = self.model_width(model)
        if self.width != width:
            raise ValueError(
                f"{source}: a {self.kind} prompt of width {self.width}, but this model's "
                f"{self.part} has width {width}; the prompt was learned "
                "for another model"
            )

    def save(self, path: str | os.PathLike) -> None:
        """Write the prompt file atomically (a temporary file beside it, renamed over it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = safetensors_bytes(  # the same bytes for the same prompt (the metadata's keys in order)
            {PROMPT_KEY: self.vectors.detach().float().cpu().contiguous()},
            metadata={KIND_KEY: self.kind, "format_version": PROMPT_FORMAT_VERSION},
        )
        write_bytes_atomic(path, data)


class ContextPrompt(SoftPrompt):
    """CoOp's learned context: M vectors in front of every class name, shared by all classes."""

    kind, route, part = "context", "text", "text encoder"

    @classmethod
    def from_words(cls, model: MultimodalTransformer, tokenizer: Tokenizer, words: str) -> ContextPrompt:
        """A prompt initialised with the token embeddings of ``words`` (CoOp's "a photo of a" initialisation)."""
        ids = tokenizer([words])["input_ids"][0]
        ids = [int(i) for i in ids if int(i) not in _special_ids(model, tokenizer)]
        if not ids:
            raise ValueError(f"init: {words!r} tokenizes to no token")
        with torch.no_grad():
            init = model.text_embed.tokens(torch.tensor(ids, device=base_layer(model.text_embed.tokens).weight.device))
        return cls(len(ids), init.shape[1], init.detach().float().cpu())

    def class_inputs(
        self, model: MultimodalTransformer, tokenizer: Tokenizer, classnames: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ids (C, T), mask (C, T) and input embeddings (C, T, D) of ``[bos] v_1 … v_M name [eos]`` per class.

        The context positions hold the pad id in the ids (only the embeddings matter there; pooling looks for eos).
        """
        self.check_model(model)
        text = model.config.text
        M = self.length
        named = tokenizer(list(classnames), max_length=tokenizer.max_length)
        ids, mask = named["input_ids"], named["attention_mask"].bool()  # (C, T0): [bos] name [eos] pad…
        start = 1 if text.bos_id is not None and bool((ids[:, 0] == text.bos_id).all()) else 0
        C = ids.shape[0]
        context_ids = torch.full((C, M), text.pad_id, dtype=ids.dtype)
        ids = torch.cat([ids[:, :start], context_ids, ids[:, start:]], dim=1)  # (C, T0 + M)
        mask = torch.cat([mask[:, :start], torch.ones(C, M, dtype=torch.bool), mask[:, start:]], dim=1)
        longest = int(mask.sum(dim=1).max())
        ids, mask = ids[:, :longest], mask[:, :longest]
        if text.position != "none" and longest > text.max_length:
            raise ValueError(
                f"prompt: {M} context vectors and the longest class name take {longest} tokens, more than the text "
                f"encoder's {text.max_length} positions (config.text.max_length); use fewer context vectors"
            )
        device = self.vectors.device
        ids, mask = ids.to(device), mask.to(device)
        embeds = model.text_embed.tokens(ids)  # (C, T, D)
        context = self.vectors.to(embeds.dtype).expand(C, M, -1)
        embeds = torch.cat([embeds[:, :start], context, embeds[:, start + M :]], dim=1)
        return ids, mask, embeds


class DecoderPrefix(SoftPrompt):
    """P vectors the decoder reads before its first token (pass ``prefix_embeds=prefix.vectors``)."""

    kind, route, part = "decoder_prefix", "decoder", "decoder"


KINDS: dict[str, type[SoftPrompt]] = {ContextPrompt.kind: ContextPrompt, DecoderPrefix.kind: DecoderPrefix}


def load_prompt(path: str | os.PathLike, model: MultimodalTransformer | None = None, *, kind: str | None = None) -> Any:
    """Read a prompt file (or a folder holding :data:`PROMPT_FILE`, as ``mmformer export`` writes it): its header
    (kind, one 2-D float tensor) is checked first, against ``model``'s width when given, and ``kind`` when given;
    returns a :class:`ContextPrompt` or :class:`DecoderPrefix`.

    Raises:
        FileNotFoundError: no such file, or a folder without :data:`PROMPT_FILE`.
        ValueError: not a safetensors prompt file, another kind than asked, or a width other than the model's.
    """
    from mmformer.io.pretrained import open_safetensors

    path = Path(path).expanduser()
    if path.is_dir():
        path = path / PROMPT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt: no such file {path}; expected a prompt .safetensors file (prompt.save), or a folder holding "
            f"{PROMPT_FILE} (mmformer export of a prompt run)"
        )
    specs, read, metadata = open_safetensors(path, "cpu")
    found = metadata.get(KIND_KEY)
    if found not in KINDS or set(specs) != {PROMPT_KEY}:
        raise ValueError(
            f"prompt: {path} is not an mmformer prompt file: expected one tensor {PROMPT_KEY!r} and metadata "
            f"{KIND_KEY} in {list(KINDS)}, got tensors {sorted(specs)} and {KIND_KEY}={found!r}"
        )
    if kind is not None and found != kind:
        raise ValueError(f"prompt: {path} holds a {found} prompt, expected a {kind} prompt")
    spec = specs[PROMPT_KEY]
    if len(spec.shape) != 2 or not spec.dtype.is_floating_point or min(spec.shape) < 1:
        raise ValueError(f"prompt: {path}: expected a float tensor (length, D), got {spec.dtype} {spec.shape}")
    prompt = build_on_meta_prompt(KINDS[found], *spec.shape)
    if model is not None:
        prompt.check_model(model, source=f"prompt: {path}")
    vectors = read([PROMPT_KEY])[PROMPT_KEY].float()
    prompt.vectors = nn.Parameter(vectors)
    return prompt


def build_on_meta_prompt(cls: type[SoftPrompt], length: int, width: int) -> SoftPrompt:
    """A prompt of that size without memory (filled from a file after its header was checked)."""
    with torch.device("meta"):
        return cls(length, width)


def _special_ids(model: MultimodalTransformer, tokenizer: Any) -> set[int]:
    text = model.config.text
    ids = {text.pad_id, text.bos_id, text.eos_id}
    return {int(i) for i in ids if i is not None}
