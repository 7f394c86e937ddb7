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


def from_pretrained(name_or_path: str | os.PathLike, **kwargs: Any) -> MultimodalTransformer:
    """Load a model; keyword arguments as :meth:`MultimodalTransformer.from_pretrained` (``device``, ``dtype``,
    ``strict``, ``config``, ``max_parameters``, ``map_location``)."""
    return MultimodalTransformer.from_pretrained(name_or_path, **kwargs)


load_pretrained = from_pretrained
