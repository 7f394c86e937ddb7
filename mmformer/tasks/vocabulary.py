"""The model's token table against the tokenizer that reads its texts, checked when a trainer sets the task up."""

from __future__ import annotations

from typing import Any

from mmformer.config import ModelConfig


def check_vocabulary(config: ModelConfig, tokenizer: Any, pretrained: bool) -> None:
    """Raise ValueError when ``tokenizer``'s ids and the model's token table (``text.vocab_size``) disagree.

    A tokenizer with more ids than the table has rows stops training at its first id past the table. A model built
    from a config with more rows than the tokenizer has ids (a table sized by hand, not by the tokenizer as
    ``mmformer fit`` links it) trained, then failed in validation, generating ids the tokenizer cannot decode. A
    ``pretrained`` table (``adapt.init_from``) may have spare rows: T5's has 32128 for its 32100 tokens.
    """
    size = getattr(tokenizer, "vocab_size", None)
    if config.text is None or size is None:
        return
    table = config.text.vocab_size
    if size > table or (size < table and not pretrained):
        raise ValueError(
            f"vocab_size: the model's token table has {table} rows (model text.vocab_size) but the data's tokenizer "
            f"has {size} ids; build the task with the tokenizer's size, MultimodalTask(..., "
            "vocab_size=datamodule.vocab_size), as mmformer fit does"
        )
