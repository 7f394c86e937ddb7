"""Source-level rules of the house that a reviewer would otherwise have to remember (ARCHITECTURE.md): one owner per
idea, so that state does not leak across classes and layers do not import upwards (the layer order below, which
ARCHITECTURE.md draws)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import hub_helpers
import pytest
from hub_helpers import config_reads, put_in_cache

PACKAGE = Path(__file__).resolve().parents[1] / "mmformer"
hf_cache, no_network = hub_helpers.hf_cache, hub_helpers.no_network  # fixtures: an offline cache; no socket opened

# KVCache keeps its tensors private (_k, _v, _layers, _cross, _spare): nothing outside layers/ may reach for them.
CACHE_INTERNALS = re.compile(r"cache\w*\.(_\w+|k|v|layers|cross\[)\b")


def sources(folder: Path = PACKAGE) -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.py"))}


def imported_modules(text: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_kv_cache_internals_outside_layers():
    offenders = [
        f"{path}:{number}: {line.strip()}"
        for path, text in sources().items()
        if not path.startswith("mmformer/layers/")
        for number, line in enumerate(text.splitlines(), 1)
        if CACHE_INTERNALS.search(line)
    ]
    assert not offenders, "KVCache internals used outside layers/ (use its methods):\n" + "\n".join(offenders)


def test_the_scan_would_catch_an_internal_access():
    assert CACHE_INTERNALS.search("n = self.cache.k.shape[3]")
    assert CACHE_INTERNALS.search("kv = cache.cross[layer]")
    assert CACHE_INTERNALS.search("cache._k[:, :, :n] = old")
    assert not CACHE_INTERNALS.search("if cache.has_cross(layer): k, v = cache.cross(layer)")


def test_file_io_does_not_know_the_model():
    imported = imported_modules((PACKAGE / "io/pretrained.py").read_text(encoding="utf-8"))
    assert not {m for m in imported if m.startswith("mmformer.model")}, imported
    imported = imported_modules((PACKAGE / "io/weights.py").read_text(encoding="utf-8"))
    assert not {m for m in imported if m.startswith("mmformer.model")}, imported


def test_no_hooks_in_training_or_model_code():
    for path, text in sources().items():
        if path.startswith(("mmformer/tasks/", "mmformer/model.py", "mmformer/layers/")):
            assert "register_forward_hook" not in text and "register_forward_pre_hook" not in text, path


def test_no_function_level_import_of_the_model_in_model_py():
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
            modules = {getattr(n, "module", None) or n.names[0].name for n in inner}
            assert not {m for m in modules if m and m.startswith("mmformer")}, (node.name, modules)


# ---------------------------------------------------------------------------------------------------- one source
@pytest.mark.parametrize("kind", ["hf", "mmformer"])
def test_a_hub_id_reads_its_config_json_once(hf_cache, tmp_path, tiny_model, kind):
    """``from_pretrained`` of a Hub id (a cache built here, offline) opens its config.json once, whatever reads it:
    hub.resolve_source; the converter, the loader and load_processor take the Source."""
    pytest.importorskip("transformers")
    import torch
    from test_hub import saved, tiny_clip

    import mmformer
    from mmformer.io import hub

    if kind == "hf":
        put_in_cache(hf_cache, "org/clip-tiny", saved(tiny_clip(), tmp_path / "src"))
    else:
        tiny_model.save_pretrained(tmp_path / "src")
        put_in_cache(hf_cache, "org/clip-tiny", tmp_path / "src")
    with config_reads() as opened:
        model = mmformer.from_pretrained("org/clip-tiny")
    assert len(opened) == 1, opened  # hub.resolve_source; the converter / loader take the Source's config
    assert "/snapshots/" in opened[0]
    if kind == "mmformer":
        assert torch.equal(model.text_embed.tokens.weight, tiny_model.text_embed.tokens.weight)
    with config_reads() as opened:
        source = hub.resolve_source("org/clip-tiny")
        mmformer.from_pretrained(source)
        processor = mmformer.io.auto.load_processor(source)
    assert len(opened) == 1 and (processor is None) == (model.processor is None) == (kind == "mmformer")


# ---------------------------------------------------------------------------------------------------- layers
# The layer order, lowest first: a module may import (at module level or inside a function) only from its own layer or
# lower ones. ``if TYPE_CHECKING:`` imports are annotations, never executed, and do not count. ARCHITECTURE.md draws
# the same order; a module is placed by the longest dotted prefix below that names it, so moving files into folders
# only edits this mapping.
LAYERS = ["foundation", "blocks", "preprocess", "files", "decoding", "model", "ship", "compress", "adapt", "load",
          "zeroshot", "tasks", "apps", "cli", "demos"]  # fmt: skip
LAYER_OF = {
    "mmformer": "foundation",  # the package root: __version__ and lazy re-exports
    "mmformer.config": "foundation",
    "mmformer.values": "foundation",
    "mmformer.eval_mode": "foundation",
    "mmformer.io.atomic": "foundation",
    "mmformer.layers": "blocks",
    "mmformer.embedders": "blocks",
    "mmformer.io.weights": "blocks",
    "mmformer.preprocess.tokenizer": "preprocess",
    "mmformer.preprocess.processor": "preprocess",
    "mmformer.data": "preprocess",
    "mmformer.io.pretrained": "files",
    "mmformer.io.quantized_files": "files",
    "mmformer.io.hub": "files",
    "mmformer.io.checkpointing": "files",
    "mmformer.generation.search": "decoding",
    "mmformer.generation.token_choice": "decoding",
    "mmformer.generation.decoding_rules": "decoding",
    "mmformer.generation.score_processing": "decoding",
    "mmformer.generation.decoding": "decoding",
    "mmformer.generation.completion": "decoding",
    "mmformer.generation.streaming": "decoding",
    "mmformer.model": "model",
    "mmformer.ship.export": "ship",
    "mmformer.ship.onnx_runner": "ship",
    "mmformer.compress.quantization": "compress",
    "mmformer.adapt.adapters": "adapt",
    "mmformer.adapt.prompts": "adapt",
    "mmformer.io.auto": "load",
    "mmformer.convert": "load",
    "mmformer.zeroshot": "zeroshot",
    "mmformer.tasks": "tasks",
    "mmformer.longform": "apps",
    "mmformer.serve": "apps",
    "mmformer.cli.main": "cli",
    "mmformer.cli.training": "cli",
    "mmformer.__main__": "cli",  # python -m mmformer
    "mmformer.demos.digits": "demos",
    "mmformer.demos.adapt": "demos",
    "mmformer.demos": "demos",
    # the folders of the lifecycle layout (issue #21), for their __init__.py; the modules moved into them keep the
    # layers above (a longer prefix wins)
    "mmformer.io": "files",
    "mmformer.generation": "decoding",
    "mmformer.cli": "cli",
    "mmformer.preprocess": "preprocess",
    "mmformer.ship": "ship",
    "mmformer.compress": "compress",
    "mmformer.adapt": "adapt",
}


def module_name(path: str) -> str:
    """``mmformer/data/io.py`` → ``mmformer.data.io``; a package's ``__init__.py`` → the package."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    """The layer of the longest prefix of ``module`` in LAYER_OF (the package root names only itself)."""
    keys = [k for k in LAYER_OF if module == k or (k != "mmformer" and module.startswith(k + "."))]
    return LAYER_OF[max(keys, key=len)] if keys else None


def runtime_imports(text: str, module: str, is_package: bool, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported mmformer module) of every import that runs — module level or in a function — skipping
    ``if TYPE_CHECKING:`` blocks; ``from package import name`` is the submodule where one exists."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def type_checking(node: ast.AST) -> bool:
        test = getattr(node, "test", None)
        return isinstance(node, ast.If) and (
            (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        )

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if type_checking(child):
                for other in child.orelse:
                    visit(ast.Module(body=[other], type_ignores=[]))
            elif isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([child.module] if child.module else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    found.append((child.lineno, full if full in modules else base))
            else:
                visit(child)

    visit(ast.parse(text))
    return [(line, name) for line, name in found if name == "mmformer" or name.startswith("mmformer.")]


def upward_imports(texts: dict[str, str]) -> list[str]:
    """Every import that points to a higher layer, and every module no layer names, as ``path:line: ...``."""
    modules = {module_name(path) for path in texts}
    problems = []
    for path, text in texts.items():
        module = module_name(path)
        here = layer_of(module)
        if here is None:
            problems.append(f"{path}: {module} has no layer in LAYER_OF")
            continue
        for line, target in runtime_imports(text, module, path.endswith("__init__.py"), modules):
            there = layer_of(target)
            if there is not None and LAYERS.index(there) > LAYERS.index(here):
                problems.append(f"{path}:{line}: {module} ({here}) imports {target} ({there})")
    return problems


def test_every_layer_is_drawn_once_in_order():
    assert len(set(LAYERS)) == len(LAYERS) and set(LAYER_OF.values()) <= set(LAYERS)
    architecture = (PACKAGE.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    drawn = re.search(r"Layers, lowest first: (.*?)\.\n", architecture, re.S)
    assert drawn is not None, "ARCHITECTURE.md must draw the layer order ('Layers, lowest first: a → b → ...')"
    assert [name.strip(" `\n") for name in drawn.group(1).split("→")] == LAYERS


def test_no_import_points_upward():
    problems = upward_imports(sources())
    assert not problems, "imports against the layer order (tests/test_house.py LAYERS):\n" + "\n".join(problems)


def test_the_layer_scan_catches_a_planted_upward_import():
    texts = sources()
    model = texts["mmformer/model.py"]
    assert upward_imports({"mmformer/model.py": model}) == []
    planted = model + "\n\ndef _planted():\n    from mmformer.cli.main import main\n\n    return main\n"
    assert upward_imports({"mmformer/model.py": planted}) == [
        f"mmformer/model.py:{len(model.splitlines()) + 4}: mmformer.model (model) imports mmformer.cli.main (cli)"
    ]
    relative = "from .tasks import losses\n"  # relative, at module level, from a submodule's package
    assert upward_imports({"mmformer/zeroshot.py": relative, "mmformer/tasks/losses.py": ""}) == [
        "mmformer/zeroshot.py:1: mmformer.zeroshot (zeroshot) imports mmformer.tasks.losses (tasks)"
    ]
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mmformer.model import M\n"
    assert upward_imports({"mmformer/generation/search.py": typing_only}) == []
    assert upward_imports({"mmformer/newthing.py": ""}) == [
        "mmformer/newthing.py: mmformer.newthing has no layer in LAYER_OF"
    ]
