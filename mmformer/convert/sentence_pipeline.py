"""A sentence-transformers folder's pipeline → the settings of mmformer's BERT-style text tower, or a refusal.

sentence-transformers saves a model as modules run in order (``modules.json``): ``Transformer`` (the Hugging Face
model at the folder root; in the older layout, in a subfolder, ``0_Transformer/``, and no config.json at the root),
``Pooling`` (``1_Pooling/config.json``), then optionally ``Dense`` (a Linear and an activation), ``Normalize``, ...
:func:`mmformer.io.hub.sentence_modules` reads that list (and :func:`mmformer.io.hub.resolve_source` resolves an
older-layout folder to its Transformer module's); :func:`read_pooling` checks the pipeline a model folder is the
Transformer module of, reads its Pooling config and returns the pooling the converter sets (``TextConfig.pool``);
:func:`hf_max_length` the length texts are cut to. A module or setting mmformer does not reproduce exactly is refused
by name (:class:`~mmformer.convert.common.UnsupportedModelError`), never loaded with silently different embeddings.

Pooling configs come in two spellings: ``"pooling_mode": "cls"`` (sentence-transformers >= 5, a list when several
modes are concatenated) and ``pooling_mode_cls_token: true``-style flags (older versions; none set means mean).
``include_prompt`` only matters when a prompt is prepended, which mmformer's processor never does; a folder whose
``config_sentence_transformers.json`` names a non-empty default prompt (prepended by ``encode``) is refused.

The length: ``max_seq_length`` of ``sentence_bert_config.json`` (older versions), else ``model_max_length`` of
``tokenizer_config.json`` (where sentence-transformers >= 3 writes it), capped by the position table, as
sentence-transformers' ``Transformer`` module decides it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from mmformer.convert.common import UnsupportedModelError
from mmformer.io.hub import SENTENCE_MODULES, SentenceModule, read_json, sentence_modules
from mmformer.values import is_int

__all__ = ["hf_max_length", "read_pooling"]

# sentence-transformers pooling mode → mmformer's TextConfig.pool (the modes its text tower computes the same way)
POOLING = {"mean": "mean", "cls": "cls", "max": "max"}
# the legacy flags of 1_Pooling/config.json, in sentence-transformers' order, and the mode each one turns on
_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# modules.json classes (the last part of "type": sentence_transformers.models.Pooling, or
# sentence_transformers.sentence_transformer.modules.pooling.Pooling in newer versions) read here
_KNOWN = ("Transformer", "Pooling", "Normalize")


def read_pooling(directory: Path | None) -> str | None:
    """The ``TextConfig.pool`` of the sentence-transformers pipeline whose Transformer module ``directory`` is (None:
    no ``modules.json`` runs it, a plain Hugging Face folder). That is ``directory``'s own ``modules.json`` (the
    current layout), or its parent's, naming ``directory`` as its Transformer module (the older layout,
    ``0_Transformer/``): the same embeddings whichever of the two folders a user names. A final Normalize module is
    ``encode_text``'s default (``normalize=True``); without one, a warning says to pass ``normalize=False``.

    Raises:
        UnsupportedModelError: a module, pooling mode or default prompt mmformer does not reproduce, named.
    """
    if directory is None:
        return None
    pipeline = _pipeline_of(directory)
    if pipeline is None:
        return None
    root, modules = pipeline
    _check_modules(root, modules)
    _check_prompt(root)
    if "Normalize" not in [module.kind for module in modules]:
        warnings.warn(
            f"{root / SENTENCE_MODULES}: the pipeline has no Normalize module, so sentence-transformers' encode gives "
            "unnormalised vectors; mmformer's encode_text normalises by default: encode_text(normalize=False) gives "
            "the pipeline's own",
            stacklevel=2,
        )
    pooling = modules[1].folder
    return _pooling(root / "1_Pooling" if pooling == root else pooling)  # no path: where sentence-transformers saves it


def _pipeline_of(directory: Path) -> tuple[Path, list[SentenceModule]] | None:
    """The folder whose ``modules.json`` runs ``directory`` as its Transformer module — ``directory`` itself (the
    current layout) or its parent (the older layout) — and its modules; None for neither."""
    modules = sentence_modules(directory)
    if modules:
        if not _same(modules[0].folder, directory):  # a converter handed the folder above the model's
            raise UnsupportedModelError(
                f"{directory / SENTENCE_MODULES}: its first module, {modules[0].name}, is in {modules[0].folder}, not "
                f"at this folder's root; load the sentence-transformers folder with "
                f"mmformer.from_pretrained({str(directory)!r})"
            )
        return directory, modules
    modules = sentence_modules(directory.parent)
    return (directory.parent, modules) if modules and _same(modules[0].folder, directory) else None


def _check_modules(folder: Path, modules: list[SentenceModule]) -> None:
    """Refuse a pipeline other than Transformer → Pooling (→ Normalize), naming the module."""
    where = folder / SENTENCE_MODULES
    for module in modules:
        if module.kind not in _KNOWN:
            dense = module.kind == "Dense"
            what = "a Dense layer (a Linear and an activation after pooling)" if dense else "this module"
            raise UnsupportedModelError(
                f"{where}: module {module.name} is not supported: mmformer reproduces Transformer → Pooling → "
                f"Normalize only, not {what}"
            )
    kinds = [module.kind for module in modules]
    if kinds[0] != "Transformer":
        raise UnsupportedModelError(f"{where}: expected the Transformer module first, got {modules[0].name}")
    if kinds.count("Pooling") != 1 or kinds[1] != "Pooling" or kinds.count("Transformer") != 1:
        raise UnsupportedModelError(f"{where}: expected Transformer → Pooling (→ Normalize), got {kinds}")


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _pooling(folder: Path) -> str:
    """mmformer's pool of a Pooling module's config.json."""
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{folder / 'config.json'}: a Pooling module without its config")
    mode = config.get("pooling_mode")
    if mode is None:  # older sentence-transformers: one flag per mode, none set meaning mean
        mode = [m for flag, m in _LEGACY_FLAGS.items() if config.get(flag)] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLING:
        raise UnsupportedModelError(
            f"{folder / 'config.json'}: pooling mode {modes[0] if len(modes) == 1 else modes!r} is not supported; "
            f"mmformer's text tower pools {sorted(POOLING)} (one mode)"
        )
    return POOLING[modes[0]]


def _check_prompt(directory: Path) -> None:
    """Refuse a default prompt: sentence-transformers' ``encode`` prepends it to every text, mmformer does not."""
    config = read_json(directory / "config_sentence_transformers.json") or {}
    name = config.get("default_prompt_name")
    prompt = (config.get("prompts") or {}).get(name) if name else None
    if prompt:
        raise UnsupportedModelError(
            f"{directory / 'config_sentence_transformers.json'}: default_prompt_name={name!r} (encode prepends "
            f"{prompt!r} to every text; mmformer's processor does not)"
        )


def hf_max_length(directory: Path | None, max_positions: int) -> int | None:
    """The length texts are cut to: sentence-transformers' ``max_seq_length`` (sentence_bert_config.json), else the
    tokenizer's ``model_max_length`` (tokenizer_config.json), capped by ``max_positions``; None when neither says."""
    if directory is None:
        return None
    st_config = read_json(directory / "sentence_bert_config.json") or {}
    length = st_config.get("max_seq_length")
    if not is_int(length):
        length = (read_json(directory / "tokenizer_config.json") or {}).get("model_max_length")
    if not is_int(length) or length <= 0:  # absent, or transformers' "no limit" (1e30, a float)
        return None
    return min(length, max_positions)
