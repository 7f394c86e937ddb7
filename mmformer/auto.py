"""One entry point for every model source: ``mmformer.from_pretrained(name_or_path)`` (alias ``load_pretrained``).

Today it reads mmformer's own formats (a save_pretrained directory, a training ``.ckpt``, a weights file beside a
config.json) through :meth:`MultimodalTransformer.from_pretrained`. Every caller that loads "a model a user names"
(the CLI's ``--model`` flags, ``init_from``, a distillation teacher) goes through here, so that new sources
(Hugging Face folders and Hub ids, open_clip tags, timm names) reach all of them at once.
"""

from __future__ import annotations

import os
from typing import Any

from mmformer.model import MultimodalTransformer
from mmformer.pretrained import read_checkpoint
from mmformer.processor import Processor


def from_pretrained(
    name_or_path: str | os.PathLike, *, adapter: str | os.PathLike | None = None, **kwargs: Any
) -> MultimodalTransformer:
    """Load a model; keyword arguments as :meth:`MultimodalTransformer.from_pretrained` (``device``, ``dtype``,
    ``strict``, ``config``, ``max_parameters``, ``map_location``). ``adapter``: a LoRA adapter folder (peft's
    layout) applied on top (see :func:`mmformer.adapters.load_adapter`)."""
    model = MultimodalTransformer.from_pretrained(name_or_path, **kwargs)
    if adapter is not None:
        from mmformer.adapters import load_adapter

        load_adapter(model, adapter)
    return model


def load_processor(name_or_path: str | os.PathLike) -> Processor | None:
    """The processor (tokenizer, image and audio preprocessing) saved with a model, or None; the same sources as
    :func:`from_pretrained` (used where a processor is needed without the weights, e.g. ``init_from``'s data)."""
    return read_checkpoint(name_or_path).processor


load_pretrained = from_pretrained
