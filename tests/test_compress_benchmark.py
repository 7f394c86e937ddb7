"""Smoke run of ``benchmarks/compress.py`` at ``--tiny`` (two-step students, 8 test rows, every torchao method, both
export formats), in three parts that pytest-xdist can run side by side: the export and backends sections run
together, so that the backends read the export section's float ONNX export instead of exporting again. The backends
section runs one backend of each kind (PT2E, onnxruntime, bf16): the loop is the same for all, each backend's
round trip has its own test (tests/test_quantization_pt2e.py, tests/test_quantization_onnx.py), and every backend
runs in the sizes section's smoke (tests/test_compress_sizes.py). ``--tiny`` measures a one-block copy of the shipped
digits model (every section's code, a quarter of its graph). Slow: it exports that model and trains three tiny
runs. Timings are never asserted; the figures live in BENCHMARKS.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao")
pytest.importorskip("onnxruntime")
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not of the installed package
    sys.path.insert(0, ROOT)

# the sections of one test, and what their tables must show
BACKENDS = "pt2e static,onnxruntime dynamic,bf16 autocast"
PARTS = {
    "distill": ["student, distilled", "beats labels-only"],
    "quantize": ["int4-weight", "qat-dynamic", "encode_speedup"],
    "export backends": ["decoder_with_past_model", "greedy transcription", "max_abs_diff_onnx", "encode_speedup",
                        "pt2e static", "onnxruntime dynamic", "bf16 autocast", "test_hard_speech_wer"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sections", list(PARTS))
def test_compress_benchmark_runs_and_prints_its_tables(capsys, sections):
    from benchmarks import compress

    compress.main([*sections.split(), "--tiny", "--no-save", "--backends", BACKENDS])
    out = capsys.readouterr().out
    for text in PARTS[sections]:
        assert text in out, f"{text!r} missing from the benchmark's output:\n{out}"
