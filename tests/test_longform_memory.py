"""Long recordings within memory (the bug hunt's hour-long file under ``ulimit -v``: a traceback, and the short clip
beside it lost).

- The VAD's level estimate (``background``) and edge trims (``_trim``) read the samples block by block: they hold a
  few blocks however long the recording (before, the samples outside the speech were gathered with their int64
  indices, ~3 bytes per byte of samples: the 1.7 GB an hour took), and give exactly what the whole-tensor computation
  gave (the reference below is that code): the same levels, regions, windows and transcripts.
- An input that runs out of memory while it is read, while its speech is found or while its windows are decoded
  costs only its own result, reported by name with what to try, as an unreadable file is; the others are
  transcribed as they would be without it. Running out is simulated (monkeypatch), never caused.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from test_memory import heap_in_use, needs_glibc

from mmformer import load_pretrained
from mmformer.generation.options import DecodingOptions
from mmformer.longform import TranscribeOptions, VadOptions, pipeline, transcribe_files, vad

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository: the recording is built by one function
    sys.path.insert(0, str(ROOT))
from benchmarks.longform import digits_recording  # noqa: E402

RATE = 16000
CLIPS = [str(ROOT / "data" / "digits" / "audio" / "test" / f"00000{i}.flac") for i in range(3)]
# what torch's CPU allocator raises (the bug report's traceback)
TORCH_OUT_OF_MEMORY = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 460800000 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.fixture(scope="module")
def model():
    return load_pretrained(ROOT / "data" / "digits_model").eval()


@pytest.fixture(scope="module")
def recording() -> torch.Tensor:
    return digits_recording(12, seed=21)[0]  # ~25 s: twelve utterances over -60 dBFS noise


# ---------------------------------------------------------------------- the whole-tensor reference (the old code)
def whole_background(wave, stamps, sigmas=5.0):
    outside = torch.ones(wave.shape[0], dtype=torch.bool)
    for start, end in stamps:
        outside[start:end] = False
    x = wave[outside]
    if x.numel() == 0:
        return float(wave.median()) if wave.numel() else 0.0, 0.0
    offset = float(x.median())
    return offset, sigmas * float((x - offset).abs().median()) / 0.6745


def whole_trim(wave, start, end, trim_db, offset, floor):
    x = (wave[start:end] - offset).abs()  # (S,)
    peak = float(x.max()) if x.numel() else 0.0
    loud = (x > max(peak * 10 ** (-trim_db / 20), floor)).nonzero().flatten()
    if loud.numel() == 0:
        return None
    return start + int(loud[0]), start + int(loud[-1]) + 1


def whole_tensor(monkeypatch) -> None:
    monkeypatch.setattr(vad, "background", whole_background)
    monkeypatch.setattr(vad, "_trim", whole_trim)


# ---------------------------------------------------------------------- block by block, exactly the same
@pytest.mark.parametrize(
    "values",
    [[0.5], [2.0, -1.0], [3.0, 1.0, 2.0], [0.0, -0.0, 0.0, -0.0], [-1.0, -2.0, -2.0, 5.0], [1e-45, -1e-45, 0.0],
     [float("inf"), -float("inf"), 1.0, 1.0], "randn", "ties", "tiny"],
)  # fmt: skip
@pytest.mark.parametrize("block", [1, 3, 2**20])
def test_the_block_median_is_torchs_median(values, block, monkeypatch):
    """torch's median (the lower middle value) of odd and even counts, ties, signed zeros, subnormals, infinities."""
    g = torch.Generator().manual_seed(0)
    x = {
        "randn": lambda: torch.randn(1001, generator=g) * 0.01 + 0.2,
        "ties": lambda: torch.randint(-3, 3, (1000,), generator=g).float(),
        "tiny": lambda: torch.randn(1000, generator=g) * 1e-38,
    }[values]() if isinstance(values, str) else torch.tensor(values)  # fmt: skip
    monkeypatch.setattr(vad, "BLOCK", block)
    assert vad._median(lambda: vad._blocks(x, [(0, x.shape[0])])) == float(x.median())


def test_levels_edges_and_regions_equal_the_whole_tensor_computation(recording, monkeypatch):
    """On Silero's frames of a digits recording (with and without a DC offset), in blocks of 4096 samples: the
    level of the samples outside any stamps (Silero's, overlapping, out of range, empty, none, all), every trim, and
    the regions are the whole-tensor computation's."""
    monkeypatch.setattr(vad, "BLOCK", 4096)
    for wave in (recording, recording + 0.2):
        (probs,) = vad.speech_probabilities([wave])
        n = wave.shape[0]
        silero = [(s, s + 20000) for s in range(3000, n - 20000, 40000)]
        for stamps in (silero, [(0, 10), (5, 9000), (8000, 12000), (n - 5, n + 100)], [(10, 5)], [], [(0, n)]):
            assert vad.background(wave, stamps) == whole_background(wave, stamps), stamps
        offset, floor = whole_background(wave, silero)
        for start, end in [*silero, (0, n), (n - 100, n + 50), (7, 7)]:
            for trim_db in (30.0, 60.0):
                ours = vad._trim(wave, start, end, trim_db, offset, floor)
                assert ours == whole_trim(wave, start, end, trim_db, offset, floor), (start, end)
        assert vad._trim(wave, 0, n, 30.0, offset, 1e9) is None  # nothing above the floor
        for options in (VadOptions(), VadOptions(trim_db=20.0, speech_pad_ms=0)):
            ours = vad._regions(wave, probs, n, RATE, options)
            with monkeypatch.context() as m:
                whole_tensor(m)
                assert ours == vad._regions(wave, probs, n, RATE, options) and len(ours) >= 10


def test_windows_and_transcripts_equal_the_whole_tensor_computation(model, recording, monkeypatch):
    monkeypatch.setattr(vad, "BLOCK", 4096)
    inputs = [recording, recording[: 9 * RATE] + 0.1]
    ours = transcribe_files(model, inputs, DecodingOptions(do_sample=False), vad=True)
    whole_tensor(monkeypatch)
    assert transcribe_files(model, inputs, DecodingOptions(do_sample=False), vad=True) == ours
    assert len(ours[0]["segments"]) >= 10


def peak_heap(run) -> int:
    """Bytes the C heap held at most above its level before, while ``run()`` ran (sampled from a thread; the
    interpreter switches threads every 0.1 ms meanwhile)."""
    base, peak, done = heap_in_use(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], heap_in_use())
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    return peak[0] - base


@needs_glibc
def test_the_level_and_edges_of_a_long_recording_hold_a_few_blocks(recording, monkeypatch):
    """Four minutes of speech (a recording repeated, Silero's frames with it): placing its regions' edges on the
    level holds less than a quarter of its samples' bytes (measured: ~0.15 in blocks of 2**16; an hour in blocks of
    2**20 held 20 MiB beside its 220 MiB of samples); the whole-tensor computation held twice the samples (the
    control: the measurement sees it)."""
    monkeypatch.setattr(vad, "BLOCK", 2**16)
    frames = recording.shape[0] // vad.VAD_FRAME
    piece = recording[: frames * vad.VAD_FRAME]
    (probs,) = vad.speech_probabilities([piece])
    repeat = 4_000_000 // piece.shape[0] + 1
    wave, probs = piece.repeat(repeat), probs * repeat  # (S,) 16 MB, one probability per frame
    samples = wave.numel() * wave.element_size()
    regions = []
    used = peak_heap(lambda: regions.append(vad._regions(wave, probs, wave.shape[0], RATE, VadOptions())))
    assert len(regions[0]) >= 10 * repeat
    assert used < samples / 4, f"{used / 2**20:.1f} MiB for {samples / 2**20:.1f} MiB of samples"
    whole_tensor(monkeypatch)
    used = peak_heap(lambda: regions.append(vad._regions(wave, probs, wave.shape[0], RATE, VadOptions())))
    assert regions[1] == regions[0] and used > samples, f"control: {used / 2**20:.1f} MiB"


# ---------------------------------------------------------------------- out of memory: one input's error
def test_out_of_memory_is_an_allocation_refused_and_nothing_else():
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    is_out_of_memory = pipeline.is_out_of_memory

    assert is_out_of_memory(MemoryError()) and is_out_of_memory(RuntimeError(TORCH_OUT_OF_MEMORY))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(Fail("[ONNXRuntimeError] : 1 : FAIL : Load model from x.onnx failed:std::bad_alloc"))
    others = [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("can't allocate memory"),
              Fail("[ONNXRuntimeError] : 1 : FAIL : Invalid input"), OSError(12, "Cannot allocate memory")]  # fmt: skip
    assert not any(is_out_of_memory(other) for other in others)


def _run(model, inputs, **kwargs) -> tuple[list[dict], list[tuple[int, dict]], list[float], list[str]]:
    """Results, the ``on_result`` calls, the progress increments and the warnings of a run."""
    handed, seconds = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = transcribe_files(
            model,
            inputs,
            kwargs.pop("options", DecodingOptions(do_sample=False)),
            on_result=lambda i, result: handed.append((i, result)),
            progress=lambda s, total: seconds.append((s, total)),
            **kwargs,
        )
    return results, handed, seconds, [str(w.message) for w in caught]


def _check_one_failed(results, handed, seconds, caught, index, name, says, alone):
    """Input ``index`` failed naming ``name`` and ``says`` (and warned so once); the others' results are ``alone``
    (a run without it); each input was handed on once (the very dict returned); the progress adds up to its total."""
    error = results[index]["error"]
    assert name in error and says in error and "out of memory" in error, error
    assert results[index] == {"error": error, "text": "", "segments": [], "language": None}
    assert [r for i, r in enumerate(results) if i != index] == alone
    assert sorted(i for i, _ in handed) == list(range(len(results)))
    assert all(result is results[i] for i, result in handed)
    assert sum(f"skipped {error}" in w for w in caught) == 1, caught
    (total,) = {t for _, t in seconds}
    assert abs(sum(s for s, _ in seconds) - total) < 0.02, seconds  # Whisper's steps are rounded to 10 ms
    return error


def test_an_input_out_of_memory_while_read_costs_only_its_result(model, tmp_path, monkeypatch):
    long = tmp_path / "long.flac"
    long.write_bytes(Path(CLIPS[0]).read_bytes())
    read = pipeline.read_input

    def read_input(source, *args):
        if str(source) == str(long):
            raise RuntimeError(TORCH_OUT_OF_MEMORY)
        return read(source, *args)

    monkeypatch.setattr(pipeline, "read_input", read_input)
    alone = transcribe_files(model, [CLIPS[1], CLIPS[2]], DecodingOptions(do_sample=False))
    results, handed, seconds, caught = _run(model, [CLIPS[1], str(long), CLIPS[2]])
    error = _check_one_failed(results, handed, seconds, caught, 1, "long.flac", "reading it", alone)
    assert "try a shorter input" in error and "DefaultCPUAllocator" in error
    assert handed[0][0] == 1  # before any decoding, as an unreadable file's


def test_an_input_out_of_memory_while_its_speech_is_found_costs_only_its_result(model, recording, monkeypatch):
    """All inputs' speech is found together; where that runs out, each input's alone: only the long one fails, its
    memory given back (its seconds still count in the progress)."""
    inputs = [recording[: 9 * RATE], recording, recording[5 * RATE : 14 * RATE]]
    find = pipeline.speech_regions_many

    def speech_regions_many(waves, *args):
        if any(w.shape[0] == recording.shape[0] for w in waves):
            raise MemoryError("Unable to allocate 8.00 MiB for an array with shape (1048576,) and data type int64")
        return find(waves, *args)

    monkeypatch.setattr(pipeline, "speech_regions_many", speech_regions_many)
    alone = transcribe_files(model, [inputs[0], inputs[2]], DecodingOptions(do_sample=False), vad=True)
    results, handed, seconds, caught = _run(model, inputs, vad=True)
    error = _check_one_failed(results, handed, seconds, caught, 1, "inputs[1]", "finding its speech", alone)
    assert "try a shorter input" in error and {t for _, t in seconds} == {sum(w.shape[0] for w in inputs) / RATE}


def test_a_batch_out_of_memory_is_decoded_again_one_window_at_a_time(model, recording, monkeypatch):
    decode = pipeline.decode_windows_generic

    def decode_windows_generic(model, windows, *args, **kwargs):
        if len(windows) > 1:
            raise RuntimeError(TORCH_OUT_OF_MEMORY)
        return decode(model, windows, *args, **kwargs)

    plain = transcribe_files(model, [recording, CLIPS[0]], DecodingOptions(do_sample=False), batch_size=4)
    monkeypatch.setattr(pipeline, "decode_windows_generic", decode_windows_generic)
    results, handed, seconds, caught = _run(model, [recording, CLIPS[0]], batch_size=4)
    assert results == plain and len(handed) == 2
    assert any("decoding 4 windows at once" in w and "one at a time" in w and "batch_size" in w for w in caught)


def test_a_window_out_of_memory_alone_costs_only_its_input(model, recording, monkeypatch):
    """A window of the second input runs out even alone: that input fails, its windows still queued are not decoded,
    and the others' windows (in the same batches) are decoded as without it."""
    inputs = [recording, recording[: 9 * RATE] + 0.1, CLIPS[0]]
    decode, decoded = pipeline.decode_windows_generic, []

    def decode_windows_generic(model, windows, *args, **kwargs):
        if any(w.file == 1 for w in windows):
            raise MemoryError()
        decoded.extend(w.file for w in windows)
        return decode(model, windows, *args, **kwargs)

    alone = transcribe_files(model, [inputs[0], inputs[2]], DecodingOptions(do_sample=False), vad=True)
    monkeypatch.setattr(pipeline, "decode_windows_generic", decode_windows_generic)
    results, handed, seconds, caught = _run(model, inputs, vad=True, batch_size=3)
    error = _check_one_failed(results, handed, seconds, caught, 1, "inputs[1]", "decoding it", alone)
    assert "(MemoryError: no details)" in error and "try a smaller batch_size" in error
    assert 1 not in decoded


def test_other_errors_still_stop_the_run(model, recording, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(pipeline, "decode_windows_generic", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        transcribe_files(model, [recording, CLIPS[0]], batch_size=1)
    monkeypatch.setattr(pipeline, "read_input", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        transcribe_files(model, [CLIPS[0]])


@pytest.fixture(scope="module")
def whisper_model(tmp_path_factory):
    pytest.importorskip("whisper")
    from test_openai_whisper_convert import random_whisper, save_pt

    from mmformer.convert.openai_whisper import from_openai_whisper

    return from_openai_whisper(save_pt(random_whisper(seed=0), tmp_path_factory.mktemp("whisper") / "tiny.pt"))


def test_whisper_input_out_of_memory_in_openai_whispers_algorithm_costs_only_its_result(whisper_model, monkeypatch):
    waves = [digits_recording(2, seed=5)[0], digits_recording(3, seed=6)[0], digits_recording(1, seed=7)[0]]
    options = TranscribeOptions(temperature=0.0, language="en")
    sequential = pipeline.transcribe_sequential

    def transcribe_sequential(model, wave, *args, **kwargs):
        if wave.shape[0] == waves[1].shape[0]:
            kwargs["progress"](1.0, wave.shape[0] / RATE)  # a window done, then out of memory
            raise RuntimeError(TORCH_OUT_OF_MEMORY)
        return sequential(model, wave, *args, **kwargs)

    alone = transcribe_files(whisper_model, [waves[0], waves[2]], options)
    monkeypatch.setattr(pipeline, "transcribe_sequential", transcribe_sequential)
    results, handed, seconds, caught = _run(whisper_model, waves, options=options)
    _check_one_failed(results, handed, seconds, caught, 1, "inputs[1]", "transcribing it", alone)
    assert {t for _, t in seconds} == {sum(w.shape[0] for w in waves) / RATE}  # the failed input's seconds in it


# ---------------------------------------------------------------------- a VAD package that cannot be loaded
def test_a_vad_package_that_is_there_but_cannot_be_loaded_says_why(monkeypatch):
    """Where memory is limited, onnxruntime's shared library could not be mapped, and the error said the packages
    were missing."""

    class Unloadable:
        def find_spec(self, name, path=None, target=None):
            if name == "onnxruntime":
                raise ImportError("onnxruntime_pybind11_state.so: failed to map segment from shared object")

    vad.silero_sequence_session.cache_clear()
    monkeypatch.delitem(sys.modules, "onnxruntime")
    monkeypatch.setattr(sys, "meta_path", [Unloadable(), *sys.meta_path])
    try:
        with pytest.raises(ImportError, match=r"installed but cannot be loaded \(.*failed to map segment"):
            vad.silero_sequence_session()
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
        with pytest.raises(ImportError, match="VAD needs the silero-vad and onnxruntime packages"):
            vad.silero_sequence_session()
    finally:
        vad.silero_sequence_session.cache_clear()
