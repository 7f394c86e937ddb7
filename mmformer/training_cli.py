"""``mmformer fit | validate | test | predict``: a LightningCLI over :class:`~mmformer.tasks.MultimodalTask` and
:class:`~mmformer.data.MultimodalDataModule`.

The vocabulary size is set once: the data module's tokenizer links it into the model config.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from mmformer.data import MultimodalDataModule
from mmformer.tasks import MultimodalTask


class MMFormerCLI(LightningCLI):
    """LightningCLI with mmformer's link from the data module's tokenizer to the model's vocabulary."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.model.text.vocab_size", apply_on="instantiate")


def build_cli(args: Sequence[str] | None = None, *, run: bool = True) -> MMFormerCLI:
    """Parse ``args`` and build the task, data module and trainer; ``run=False`` stops there (a dry run)."""
    return MMFormerCLI(
        MultimodalTask,
        MultimodalDataModule,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def run_training_cli(argv: Sequence[str]) -> None:
    build_cli(argv)
