"""Smoke run of ``benchmarks/compress.py sizes`` at ``--tiny`` (smoke dimensions of the ViT-B/32 and whisper-tiny
models, every backend), and its small pieces. Timings are never asserted, only that every backend has a row with
finite figures; the full-size figures are the lead's to take on a quiet machine."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")
pytest.importorskip("open_clip")
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not of the installed package
    sys.path.insert(0, ROOT)


def parse_table(out: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the last table whose header starts with ``first_column`` (the full one: each size's is printed as
    it is done), cut at the dashes line's column spans."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(first_column + " "))
    header, dashes = lines[start], lines[start + 1]
    spans, pos = [], 0
    for dash in dashes.split("  "):
        spans.append((pos, pos + len(dash)))
        pos += len(dash) + 2
    names = [header[a:b].strip() for a, b in spans]
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip() or line.startswith(("cpu:", "batch ")):
            break
        rows.append({n: line[a:b].strip() for n, (a, b) in zip(names, spans)})
    return rows


@pytest.mark.slow
def test_sizes_section_prints_every_backend_with_finite_speedups(capsys):
    from benchmarks import compress
    from benchmarks.compress_sizes import BACKENDS, INT8, SIZES
    from mmformer.compress.cpu_precision import cpu_report

    compress.main(["sizes", "--tiny", "--no-save"])
    out = capsys.readouterr().out
    rows = parse_table(out, "size")
    by_key = {(r["size"].split(" (")[0], r["backend"]): r for r in rows}
    assert set(by_key) == {(s, b) for s in SIZES for b in BACKENDS}, out
    for (size, backend), row in by_key.items():
        assert not row["note"].startswith("n/a"), f"{size} / {backend} did not run at --tiny: {row['note']}"
        columns = ["encode_ms", "encode_speedup", "max_abs_diff", "file_MB"]
        if size == "whisper-tiny":
            columns += ["decode_ms", "decode_speedup", "same_ids"]
        for column in columns:
            value = float(row[column])
            assert math.isfinite(value) and value >= 0, f"{size} / {backend}: {column} = {row[column]!r}\n{out}"
        assert float(row["encode_speedup"]) > 0
        # a sanity bound (outputs of the same seeded model): relative to float32's magnitude, loose for int8
        assert float(row["max_abs_diff"]) <= 0.5 * float(row["fp32_max_abs"]), f"{size} / {backend}\n{out}"
        assert row["meets_target"] in (("True", "False") if backend in INT8 else ("",))
        if backend in ("fp32", "onnx fp32"):
            assert float(row["max_abs_diff"]) <= 1e-4 * float(row["fp32_max_abs"]) + 1e-6
    goal = "1.5x" if cpu_report()["fast_int8"] else "1.15x"
    assert f"int8 >= {goal} float32 for encode and decode" in out
    assert "cpu: {" in out and "load average" in out
    for size in SIZES:
        for backend in INT8:
            assert f"{size} (smoke dims) / {backend}: " in out


def test_target_follows_the_cpu_class():
    from benchmarks.compress_sizes import target

    assert target({"fast_int8": True, "flags": ["avx512_vnni", "avx512f"]}) == (1.5, "VNNI/AMX-INT8 (avx512_vnni)")
    assert target({"fast_int8": False, "flags": ["avx2"]}) == (1.15, "no VNNI/AMX")


def test_size_and_backend_lists_reject_unknown_names():
    from benchmarks import compress

    with pytest.raises(ValueError, match=r"--backends: expected .*'pt2e dynamic'.* got 'fp32,int3'"):
        compress.main(["sizes", "--tiny", "--no-save", "--backends", "fp32,int3"])
    with pytest.raises(ValueError, match=r"--sizes: expected .*'vit-b-32'.* got 'vit-l-14'"):
        compress.main(["sizes", "--tiny", "--no-save", "--sizes", "vit-l-14"])


def test_a_backend_that_cannot_serve_a_size_is_printed_as_na_with_its_reason(tmp_path, monkeypatch):
    import argparse

    from benchmarks import compress_sizes

    real = compress_sizes.prepare

    def prepare(name, *rest):
        if name == "pt2e static":
            raise RuntimeError("calibration of this graph is impractical here\nsecond line")
        return real(name, *rest)

    monkeypatch.setattr(compress_sizes, "prepare", prepare)
    args = argparse.Namespace(tiny=True, compile=False, bf16="auto", new_tokens=4, warmup=0, repeats=1)
    subject = compress_sizes.clip_subject(tiny=True, batch=2)
    rows = compress_sizes.size_rows(subject, ["fp32", "pt2e static", "torchao dynamic"], tmp_path, args, 1.5)
    by_name = {r["backend"]: r for r in rows}
    assert list(by_name) == ["fp32", "pt2e static", "torchao dynamic"]
    note = "n/a: RuntimeError: calibration of this graph is impractical here"  # the first line only
    assert by_name["pt2e static"] == {"size": "vit-b-32", "backend": "pt2e static", "note": note}
    assert math.isfinite(by_name["torchao dynamic"]["encode_speedup"]) and by_name["fp32"]["encode_speedup"] == 1.0
    assert isinstance(by_name["torchao dynamic"]["meets_target"], bool)


def test_an_int8_row_whose_output_is_off_float32s_does_not_meet_the_target(tmp_path, monkeypatch):
    import argparse

    from benchmarks import compress_sizes

    real = compress_sizes.prepare

    def prepare(name, *rest):
        peer = real(name, *rest)
        if name == "torchao dynamic":  # fast and wrong: the embeddings negated
            encode = peer.encode
            peer.encode = lambda: -encode()
        return peer

    monkeypatch.setattr(compress_sizes, "prepare", prepare)
    args = argparse.Namespace(tiny=True, compile=False, bf16="auto", new_tokens=4, warmup=0, repeats=1)
    subject = compress_sizes.clip_subject(tiny=True, batch=2)
    rows = compress_sizes.size_rows(subject, ["fp32", "torchao dynamic"], tmp_path, args, goal=0.0)
    off = rows[1]
    assert off["max_abs_diff"] > compress_sizes.SANE * off["fp32_max_abs"]
    assert off["meets_target"] is False and "OUTPUT OFF" in off["note"]  # even against a goal of 0x
