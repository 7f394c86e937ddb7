"""Decoding options: one frozen, validated dataclass, :class:`DecodingOptions`, that ``generate`` / ``caption`` /
``transcribe`` / ``complete`` take as keywords and the CLI derives its flags from. Torch-free, so that a command's
``--help`` does not import torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmformer.values import build_options, is_int, is_number, option


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode: the one place the options, their defaults and their help live (``generate(**options)`` builds
    it, the CLI derives its flags from it). Validated on construction, so a bad option fails before any model work;
    ``replace(options, **changes)`` validates again."""

    max_new_tokens: int = option(30, "tokens generated after the prompt (fewer if every row ends or positions run out)")
    num_beams: int = option(1, "beam width; > 1 runs beam search")
    top_k: int | None = option(None, "sample only among the k most likely tokens")
    top_p: float | None = option(None, "sample only from the most likely tokens whose probability reaches top_p")
    temperature: float = option(1.0, "logits are divided by it before sampling")
    length_penalty: float = option(1.0, "beam search scores a hypothesis sum(logprob) / length**length_penalty")
    do_sample: bool | None = option(None, "sample (True) or pick the most likely token (False); default: sample iff "
                                           "top_k, top_p or a temperature != 1 asks for it")  # fmt: skip
    repetition_penalty: float = option(1.0, "divide the (positive) logits of tokens already in the row by it, "
                                             "multiply negative ones (CTRL; > 1 discourages repeats)")  # fmt: skip
    stop_strings: tuple[str, ...] = option((), "end a row once its generated text contains one of these strings "
                                                "(needs a tokenizer; repeat the flag for several)")  # fmt: skip
    use_cache: bool = option(True, "decode incrementally through a KV cache (False recomputes every step)")
    cache: str = option(
        "dynamic",
        "dynamic: the KV cache grows as decoding goes on; static: preallocated to prompt + max_new_tokens, with "
        "fixed-shape steps (compiled: CUDA graphs on a GPU)",
    )
    compile: bool = option(False, "run the cached decoder step through torch.compile (pays off over many calls)")
    min_new_tokens: int = option(0, "end-of-text is not generated before this many new tokens")
    forced_eos: bool = option(False, "a row still open at the length limit ends with end-of-text there")
    language: str | None = option(None, "Whisper: the audio's language code, e.g. en (default: the checkpoint's, "
                                         "else detected from the audio)")  # fmt: skip
    task: str | None = option(None, "Whisper: transcribe or translate (default: the checkpoint's, else transcribe)")

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {self.max_new_tokens!r}")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise ValueError(f"num_beams: expected an int >= 1, got {self.num_beams!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not is_number(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {self.top_p!r}")
        if not is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(
                f"temperature: expected a number > 0 (do_sample=False decodes greedily), got {self.temperature!r}"
            )
        if not is_number(self.length_penalty):
            raise ValueError(f"length_penalty: expected a finite number, got {self.length_penalty!r}")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: expected a number > 0 (1 = off), got {self.repetition_penalty!r}")
        stops = self.stop_strings
        if (
            isinstance(stops, str)
            or not isinstance(stops, (list, tuple))
            or not all(isinstance(x, str) and x for x in stops)
        ):
            raise ValueError(f"stop_strings: expected a list of non-empty strings, got {stops!r}")
        object.__setattr__(self, "stop_strings", tuple(stops))
        if self.do_sample not in (None, True, False):
            raise ValueError(f"do_sample: expected None, True or False, got {self.do_sample!r}")
        if not isinstance(self.use_cache, bool):
            raise ValueError(f"use_cache: expected True or False, got {self.use_cache!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: expected True or False, got {self.compile!r}")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache: expected 'dynamic' or 'static', got {self.cache!r}")
        if self.cache == "static" and not self.use_cache:
            raise ValueError("cache='static' preallocates the KV cache; it needs use_cache=True (got use_cache=False)")
        if self.compile and not self.use_cache:
            raise ValueError(
                "compile=True compiles the KV-cached decoder step; it needs use_cache=True (got use_cache=False)"
            )
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens: expected an int >= 0, got {self.min_new_tokens!r}")
        if self.min_new_tokens > self.max_new_tokens:  # every row would be cut at max_new_tokens, unfinished
            raise ValueError(f"min_new_tokens: expected at most max_new_tokens ({self.max_new_tokens}), got "
                             f"{self.min_new_tokens}")  # fmt: skip
        if not isinstance(self.forced_eos, bool):
            raise ValueError(f"forced_eos: expected True or False, got {self.forced_eos!r}")
        for name in ("language", "task"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: expected None or a string, got {getattr(self, name)!r}")
        if self.sample and self.num_beams > 1:
            raise ValueError(
                f"num_beams={self.num_beams} with sampling (do_sample={self.do_sample}, top_k={self.top_k}, "
                f"top_p={self.top_p}, temperature={self.temperature}) is not supported: use num_beams=1 to sample, "
                "or drop the sampling options for beam search"
            )

    @property
    def sample(self) -> bool:
        """Whether tokens are sampled: ``do_sample``, or when it is None, whether a sampling filter is set."""
        if self.do_sample is not None:
            return self.do_sample
        return self.top_k is not None or self.top_p is not None or self.temperature != 1.0

    @classmethod
    def build(cls, options: DecodingOptions | None = None, **changes: Any) -> DecodingOptions:
        """``options`` (default: the defaults) with ``changes`` applied, as whisper's ``replace(options, **kwargs)``;
        an unknown name is a TypeError listing the valid ones."""
        return build_options(cls, options, changes, "decoding")
