"""Smoke run of ``benchmarks/compress.py`` at ``--tiny`` (two-step students, 20 test rows, every quantization method,
both export formats). Slow: it exports the shipped digits model and trains three tiny runs. Timings are never
asserted; the figures live in BENCHMARKS.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not of the installed package
    sys.path.insert(0, ROOT)


@pytest.mark.slow
def test_compress_benchmark_runs_and_prints_its_tables(capsys):
    from benchmarks import compress

    compress.main(["all", "--tiny", "--no-save"])
    out = capsys.readouterr().out
    for text in ("student, distilled", "beats labels-only", "int4-weight", "qat-dynamic", "encode_speedup",
                 "decoder_with_past_model", "greedy transcription", "max_abs_diff_onnx", "pt2e static",
                 "onnxruntime dynamic", "bf16 autocast", "test_hard_speech_wer"):  # fmt: skip
        assert text in out, f"{text!r} missing from the benchmark's output:\n{out}"
