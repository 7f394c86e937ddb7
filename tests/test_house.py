"""Source-level rules of the house that a reviewer would otherwise have to remember (ARCHITECTURE.md): one owner per
idea, so that state does not leak across classes and layers do not import upwards."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmformer"

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
    imported = imported_modules((PACKAGE / "pretrained.py").read_text(encoding="utf-8"))
    assert not {m for m in imported if m.startswith("mmformer.model")}, imported
    imported = imported_modules((PACKAGE / "weights.py").read_text(encoding="utf-8"))
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
