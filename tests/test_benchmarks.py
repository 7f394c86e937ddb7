"""Smoke tests of the benchmarks: each runs at its ``--tiny`` size without saving and prints its table. Timings are
never asserted (they belong to the machine, not to the code); the figures live in BENCHMARKS.md."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("transformers")
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:  # `benchmarks` is a folder of the repository, not of the installed package
    sys.path.insert(0, ROOT)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train_step", ["open_clip", "mmformer", "utilisation", "float32", "bf16"]),
        ("encode", ["image", "text", "vs_open_clip"]),
        (
            "generate",
            [
                "speech (smoke)",
                "caption (smoke)",
                "vs_hf",
                "vs_no_cache",
                "compiled_vs_hf",
                "compile_s",
                "mmformer_vs_ct2_float32",
                "int8_vs_ct2_int8",
            ],
        ),
        ("attention", ["fused_ms", "naive_MiB", "memory_ratio"]),
        ("startup", ["mmformer --help", "mmformer zeroshot"]),
        ("lm_perplexity", ["model", "bigram (interpolated)", "unigram (add-one)", "vs_bigram"]),
        ("clip_train", ["open_clip_samples_s", "packed_samples_s", "packed_vs_open_clip"]),
        ("speech_train", ["hf_samples_s", "packed_samples_s", "packed_vs_hf"]),
        ("digits_step", ["grouped", "whole", "bf16", "vs_grouped", "real samples in the padded audio batch"]),
        ("qlora_memory", ["full_fp32", "full_bf16", "qlora_nf4", "vs_bf16", "linear_vs_bf16"]),
        (
            "longform",
            [
                "mmformer sequential",
                "mmformer VAD-batched",
                "mmformer VAD-batched bf16 encoder",
                "openai-whisper transcribe()",
                "faster-whisper batched int8",
                "HF pipeline chunked",
                "audio_s_per_s",
                "one by one",
            ],
        ),
        ("serve", ["zero-shot", "transcription", "rps_vs_plain", "mmformer_p99_ms", "plain_p99_ms"]),
    ],
)
@pytest.mark.slow
def test_benchmark_runs_and_prints_its_table(name, expected, capsys):
    importlib.import_module(f"benchmarks.{name}").main(["--tiny", "--no-save"])
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, f"benchmarks.{name}: {text!r} missing from its output:\n{out}"


def test_gpu_check_runs_at_tiny_size_on_cpu(tmp_path, capsys):
    """Every row runs (or, needing CUDA, says why it skips) and writes its JSON lines; none fails."""
    import json

    gpu_check = importlib.import_module("benchmarks.gpu_check")
    gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    status = {line["check"]: line["status"] for line in lines}
    assert set(status) == set(gpu_check.ROWS), status
    assert "error" not in status.values(), [line for line in lines if line["status"] == "error"]
    for name in ("sdpa", "fp16", "fsdp"):
        assert status[name] == "skipped" and f"[{name}] skipped" in out
    assert "needs CUDA" in out and "vs_padded_77" in out and "mfu_vs_measured_peak" in out


@pytest.mark.slow
def test_generate_measures_ctranslate2_in_a_child_process(capsys):
    """``--ct2 child``: CTranslate2's rows come from ``python -m benchmarks.ct2`` in a child process, and mmformer's
    float32 is also timed alone in another, the two children's engines called in turn (same weights and inputs:
    their ids join the same-ids check)."""
    pytest.importorskip("ctranslate2")
    importlib.import_module("benchmarks.generate").main(
        ["--tiny", "--no-save", "--ct2", "child", "--skip-caption", "--no-compile", "--no-int8", "--beams", "1"]
    )  # the int8 peers' own rows, and beam search: the smoke run of benchmarks.generate in
    # test_benchmark_runs_and_prints_its_table (CTranslate2's rows are greedy only)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("task"))
    row = next(line for line in out.splitlines() if "greedy" in line)
    for column in ("mmformer_vs_ct2_float32", "mmformer_alone_tok_s", "mmformer_alone_vs_ct2_float32"):
        assert column in header, out
    values = dict(zip(header.split(), row.replace("speech (smoke)", "speech").split()))
    assert float(values["mmformer_alone_tok_s"].replace(",", "")) > 0 and values["same_ids"] == "True", out


def test_turns_alternates_children_and_names_a_child_that_died():
    """``benchmarks.turns``: two children's peers answer in turn with their ids; clashing peer names and a child
    that ends without answering are errors naming what went wrong."""
    from benchmarks import turns

    child = "from benchmarks import turns; import torch; turns.serve({{'{0}': lambda: torch.tensor([{1}])}})"
    root = Path(__file__).resolve().parent.parent
    with (
        turns.Child([sys.executable, "-c", child.format("a", 1)], cwd=root) as a,
        turns.Child([sys.executable, "-c", child.format("b", 2)], cwd=root) as b,
    ):
        measured = turns.interleaved([a, b], warmup=1, repeats=2, rest=0.0)
        assert {name: ids for name, (_, ids) in measured.items()} == {"a": [1], "b": [2]}
        assert all(seconds >= 0 for seconds, _ in measured.values())
        with pytest.raises(ValueError, match="distinct peer names"):
            turns.interleaved([a, a], repeats=1, rest=0.0)
    with pytest.raises(RuntimeError, match="exit 3"):
        turns.Child([sys.executable, "-c", "raise SystemExit(3)"], cwd=root)
