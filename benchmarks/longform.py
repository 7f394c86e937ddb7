"""Long-form transcription (issue #25): audio seconds per second on one long recording of speech (the digits clips,
10 min by default) at whisper-tiny dimensions with random weights, side by side in one run — mmformer sequential
(openai-whisper's algorithm), mmformer VAD-batched (float32; with the PT2E int8 audio encoder under the float
decoder: :func:`mmformer.longform.transcribe_files` of a PT2E model; with the audio encoder under bf16 autocast:
``bf16_encoder=True``), openai-whisper's ``transcribe()``,
faster-whisper's ``BatchedInferencePipeline`` on the same weights converted by CTranslate2 (float32 and int8),
Hugging Face's chunked pipeline — and the VAD-batched path's WER against the same utterances one by one on a
digits recording (the shipped digits model).

Fair work per window: random weights decode garbage of any length, so the end-of-text row of the (tied) embedding is
scaled to 1e-3, and the timestamp rows too (they never win: every window decodes exactly ``--new-tokens`` tokens in
every peer; a tiny row, not a zero one, keeps CTranslate2's int8 scales sane); the text context is ``2 * --new-tokens``
so that every peer's own default cap (n_text_ctx / 2) equals the explicit one; every peer decodes greedily at
temperature 0 with no fallback, without timestamps, without conditioning on previous text, in English (no language
detection), with no no-speech or log-prob skips. The windows differ by design and are counted: the sequential peers read
consecutive 30-s windows, the VAD peers the speech merged up to 30 s, Hugging Face's pipeline 30-s chunks with 5-s
strides on each side. The batched peers share ``--batch-size`` (8; 16 puts the 10-min recording's 12 windows in one
round of decoder steps, but was not faster for mmformer on the loaded 2-core machine: 28.1 s at 8 vs 29.4 s at 16, best
of 3 alternating runs).

``--profile-batch-sizes 8 16`` adds the split of mmformer's VAD-batched wall time (float32, and with the int8
encoder) at those batch sizes (a torch.profiler run over the ``record_function`` phases of
:mod:`mmformer.longform.batched`): VAD, log-mel, encoder, decoding, and the rest (windowing, timestamp bookkeeping,
assembling).

``--tiny`` (the test suite's smoke run): smoke dimensions (one layer, width 64), 1 min of audio, 4 tokens per window,
batch 2, one timed call per peer without a warm-up call, 12 digits utterances.
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import base_parser, machine, parse_args, record, table

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "data" / "digits"


def digits_recording(
    n_utterances: int,
    seed: int = 0,
    sample_rate: int = 16000,
    noise: float = 0.001,
    offset: int = 0,
    pause: tuple[float, float] = (0.3, 2.0),
) -> tuple[torch.Tensor, list[dict]]:
    """A long recording of test-split utterances (the shipped clips, resampled) separated by pauses drawn from
    ``pause`` seconds, over seeded white noise of standard deviation ``noise``; and the truth, one
    ``{"start", "end", "text"}`` per utterance (seconds: the clip's span in the recording)."""
    from mmformer.data.io import read_audio

    rows = [json.loads(line) for line in (DIGITS / "test.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(seed)
    picks = [rows[(offset + i) % len(rows)] for i in range(n_utterances)]
    parts, truth, pos = [], [], 0
    for row in picks:
        gap = round(rng.uniform(*pause) * sample_rate)
        clip = read_audio(DIGITS / row["audio_filepath"], sample_rate)[0]
        parts += [torch.zeros(gap), clip]
        truth.append({"start": (pos + gap) / sample_rate, "end": (pos + gap + clip.shape[0]) / sample_rate,
                      "text": row["text"]})  # fmt: skip
        pos += gap + clip.shape[0]
    parts.append(torch.zeros(round(rng.uniform(*pause) * sample_rate)))
    wave = torch.cat(parts)
    wave += torch.from_numpy(rng.standard_normal(wave.shape[0]).astype(np.float32)) * noise
    return wave, truth


# whisper-tiny (openai's ModelDimensions) but for the text context, set from --new-tokens; --tiny: a smoke size
WHISPER_TINY = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4, n_vocab=51865,
                    n_text_state=384, n_text_head=6, n_text_layer=4)  # fmt: skip
SMOKE = dict(WHISPER_TINY, n_audio_state=64, n_audio_head=2, n_audio_layer=1, n_text_state=64, n_text_head=2,
             n_text_layer=1)  # fmt: skip
SAMPLE_RATE = 16000


def long_recording(seconds: float, seed: int = 0) -> torch.Tensor:
    """At least ``seconds`` of test-split speech with 0.3-2 s pauses over quiet noise, cut to ``seconds``."""
    wave, _ = digits_recording(max(1, round(seconds / 1.9)) + 4, seed=seed)  # ~1.9 s per utterance and pause
    while wave.shape[0] < seconds * SAMPLE_RATE:
        wave = torch.cat([wave, wave])
    return wave[: round(seconds * SAMPLE_RATE)]


def whisper_checkpoints(dims: dict, folder: Path, seed: int = 0) -> dict[str, Path]:
    """One random openai-whisper model written as every peer reads it: openai's ``.pt``, a Hugging Face folder
    (weights, Whisper's tokenizer with openai's ids, a generation config) and CTranslate2 float32 / int8 folders."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast
    from whisper.model import ModelDimensions, Whisper
    from whisper.tokenizer import get_tokenizer

    from benchmarks.ct2 import convert_whisper
    from mmformer.convert.openai_whisper import _hf_config, _hf_name, openai_tokenizer

    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**dims)).eval()
    words = get_tokenizer(True, num_languages=99)
    with torch.no_grad():
        model.decoder.token_embedding.weight[words.eot] *= 1e-3  # end-of-text never wins (see the module doc)
        # nor does a timestamp: without timestamps openai-whisper and mmformer decode them as text, but faster-whisper
        # splits a window's tokens at every one (a run where CTranslate2's rounding let one win gave it 1-token
        # segments, failing the 64-tokens check)
        model.decoder.token_embedding.weight[words.timestamp_begin :] *= 1e-3
    paths = {"pt": folder / "tiny.pt", "hf": folder / "hf"}
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, paths["pt"])

    tokenizer = openai_tokenizer(dims["n_vocab"], dims["n_text_ctx"])
    hf = WhisperForConditionalGeneration(WhisperConfig(**_hf_config(asdict(model.dims), tokenizer))).eval()
    hf.model.load_state_dict({_hf_name(k): v for k, v in model.state_dict().items()})
    hf.tie_weights()
    hf.save_pretrained(paths["hf"])
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    languages = {f"<|{code}|>": token for code, token in zip(words.all_language_codes, words.all_language_tokens)}
    specials = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                "<|notimestamps|>"]  # fmt: skip
    eot = "<|endoftext|>"
    hf_tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot,
        additional_special_tokens=[*languages, *specials],
    )  # fmt: skip
    hf_tokenizer.save_pretrained(paths["hf"])
    GenerationConfig(
        decoder_start_token_id=words.sot, eos_token_id=words.eot, pad_token_id=words.eot, lang_to_id=languages,
        task_to_id={"transcribe": words.transcribe, "translate": words.translate},
        no_timestamps_token_id=words.no_timestamps, is_multilingual=True, max_length=dims["n_text_ctx"],
        suppress_tokens=[], begin_suppress_tokens=[],
    ).save_pretrained(paths["hf"])  # fmt: skip
    converted = convert_whisper(paths["hf"], folder)  # one owner of CTranslate2's conversion (benchmarks/ct2.py)
    return paths | {f"ct2-{quantization}": path for quantization, path in converted.items()}


def phase_split(run: Callable[[], object]) -> dict[str, float]:
    """Wall seconds of one ``run()`` under torch.profiler and of each long-form phase in it (the ``record_function``
    ranges of :data:`mmformer.longform.batched.PHASES`, summed over batches), the rest as ``other_s``."""
    from torch.profiler import ProfilerActivity, profile

    from mmformer.longform.batched import PHASES

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    names = {name: phase for phase, name in PHASES.items()}
    split = dict.fromkeys(PHASES, 0.0)
    for event in prof.key_averages():
        if event.key in names:
            split[names[event.key]] += event.cpu_time_total / 1e6  # a range's total is its wall time (µs)
    return (
        {"wall_s": wall}
        | {f"{phase}_s": seconds for phase, seconds in split.items()}
        | {"other_s": wall - sum(split.values())}
    )


def speed_rows(args) -> tuple[list[dict], list[dict]]:
    """Audio seconds per wall second of every peer on the same recording; and the phase split of mmformer's
    VAD-batched path at each of ``args.profile_batch_sizes``."""
    import whisper
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast, pipeline
    from transformers.utils import logging

    from mmformer.compress import pt2e
    from mmformer.convert.openai_whisper import from_openai_whisper
    from mmformer.longform import TranscribeOptions, transcribe_files
    from mmformer.longform.vad import VadOptions, cut_and_merge, model_window_samples, speech_regions

    logging.set_verbosity_error()
    dims = dict(SMOKE if args.tiny else WHISPER_TINY, n_text_ctx=2 * args.new_tokens)
    wave = long_recording(args.minutes * 60)
    seconds = wave.shape[0] / SAMPLE_RATE
    audio = wave.numpy()
    n, batch, threads = args.new_tokens, args.batch_size, torch.get_num_threads()
    folder = Path(tempfile.mkdtemp(prefix="longform-bench-"))
    try:
        paths = whisper_checkpoints(dims, folder)
        ours = from_openai_whisper(paths["pt"]).eval()
        # the int8 audio encoder (PT2E dynamic, compiled) under the float decoder: mmformer's int8 long-form path
        ours_int8 = pt2e.quantize(ours, "dynamic", towers=["audio"], compile=not args.tiny)
        options = TranscribeOptions(
            temperature=0.0, compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None,
            condition_on_previous_text=False, language="en", without_timestamps=True,
        )  # fmt: skip
        theirs = whisper.load_model(str(paths["pt"]), device="cpu")
        quiet = dict(verbose=None, temperature=0.0, compression_ratio_threshold=None, logprob_threshold=None,
                     no_speech_threshold=None, condition_on_previous_text=False, language="en",
                     without_timestamps=True, sample_len=n, fp16=False)  # fmt: skip
        fw = {q: WhisperModel(str(paths[f"ct2-{q}"]), device="cpu", compute_type=q, cpu_threads=threads)
              for q in ("float32", "int8")}  # fmt: skip
        # CTranslate2 decodes max_length / 2 new tokens (benchmarks/ct2.py) and faster-whisper passes max_length =
        # prompt + max_new_tokens: ask for 2n - 4 after its 4-token prompt to get n (checked below, per segment)
        fw_options = dict(language="en", without_timestamps=True, max_new_tokens=2 * n - 4, temperature=0.0,
                          log_prob_threshold=None, no_speech_threshold=None, compression_ratio_threshold=None,
                          condition_on_previous_text=False, beam_size=1, batch_size=batch)  # fmt: skip
        hf = WhisperForConditionalGeneration.from_pretrained(paths["hf"]).eval()
        asr = pipeline("automatic-speech-recognition", model=hf, device="cpu", chunk_length_s=30, batch_size=batch,
                       tokenizer=WhisperTokenizerFast.from_pretrained(paths["hf"]),
                       feature_extractor=WhisperFeatureExtractor(feature_size=dims["n_mels"]))  # fmt: skip
        hf_kwargs = dict(max_new_tokens=n, language="en", task="transcribe", num_beams=1, do_sample=False)

        peers = {
            "mmformer sequential": lambda: transcribe_files(ours, [wave], options=options, vad=False),
            "mmformer VAD-batched": lambda: transcribe_files(
                ours, [wave], options=options, vad=True, batch_size=batch
            ),  # fmt: skip
            "mmformer VAD-batched int8 encoder": lambda: transcribe_files(
                ours_int8, [wave], options=options, vad=True, batch_size=batch
            ),  # fmt: skip
            # the encoder under bf16 autocast (--compute-type bfloat16; auto picks it where the CPU has AMX)
            "mmformer VAD-batched bf16 encoder": lambda: transcribe_files(
                ours, [wave], options=options, vad=True, batch_size=batch, bf16_encoder=True
            ),  # fmt: skip
            "openai-whisper transcribe()": lambda: whisper.transcribe(theirs, audio, **quiet),
            "faster-whisper batched float32": lambda: list(
                BatchedInferencePipeline(fw["float32"]).transcribe(audio, **fw_options)[0]
            ),
            "faster-whisper batched int8": lambda: list(
                BatchedInferencePipeline(fw["int8"]).transcribe(audio, **fw_options)[0]
            ),
            "HF pipeline chunked": lambda: asr(audio.copy(), generate_kwargs=hf_kwargs),
        }
        limit = model_window_samples(ours)
        vad = VadOptions()
        regions = speech_regions(wave, SAMPLE_RATE, vad)
        vad_windows = len(cut_and_merge(regions, 0, limit, True, vad.pack_gap(SAMPLE_RATE)))
        stride = 5 * SAMPLE_RATE  # the pipeline's default: chunk_length_s / 6 on each side
        windows = {"mmformer sequential": -(-wave.shape[0] // limit), "openai-whisper transcribe()":
                   -(-wave.shape[0] // limit), "mmformer VAD-batched": vad_windows,
                   "mmformer VAD-batched int8 encoder": vad_windows, "mmformer VAD-batched bf16 encoder": vad_windows,
                   "HF pipeline chunked": -(-(wave.shape[0] - 2 * stride) // (limit - 2 * stride))}  # fmt: skip
        rows = []
        for name, run in peers.items():
            for _ in range(args.warmup):  # first calls load kernels, build the VAD session
                run()
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - start)
            best = min(times)
            if name.startswith("faster-whisper"):
                windows[name] = len(out)  # one segment per VAD chunk without timestamps
                if any(len(segment.tokens) != n for segment in out):
                    raise RuntimeError(f"{name}: expected {n} tokens per window, got {[len(s.tokens) for s in out]}")
            rows.append({"peer": name, "audio_s": round(seconds, 1), "windows": windows.get(name, ""),
                         "new_tokens": n, "batch": batch if "batched" in name or "HF" in name else 1,
                         "wall_s": best, "audio_s_per_s": seconds / best})  # fmt: skip
        base = {r["peer"]: r["audio_s_per_s"] for r in rows}
        for r in rows:
            r["vs_openai"] = r["audio_s_per_s"] / base["openai-whisper transcribe()"]
            r["vs_fw_float32"] = r["audio_s_per_s"] / base["faster-whisper batched float32"]
        splits = []
        for size in args.profile_batch_sizes:
            for path, model in (("mmformer VAD-batched", ours), ("mmformer VAD-batched int8 encoder", ours_int8)):
                run = functools.partial(transcribe_files, model, [wave], options=options, vad=True, batch_size=size)
                run()  # warm-up at this batch size
                split = phase_split(run)
                splits.append({"path": path, "batch": size, "windows": vad_windows} | split)
        return rows, splits
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def wer_rows(args) -> list[dict]:
    """The shipped digits model on a digits recording: utterances one by one (cut at their true spans), the
    VAD-batched path, and consecutive windows without VAD."""
    from torchmetrics.functional.text import word_error_rate

    from mmformer import load_pretrained
    from mmformer.longform import transcribe_files

    model = load_pretrained(ROOT / "data" / "digits_model").eval()
    wave, truth = digits_recording(args.digits_utterances)
    reference = " ".join(t["text"] for t in truth)
    clips = [wave[round(t["start"] * SAMPLE_RATE) : round(t["end"] * SAMPLE_RATE)] for t in truth]
    runs = {
        "one by one (true spans)": lambda: " ".join(model.transcribe(clips)),
        "VAD-batched": lambda: transcribe_files(model, [wave], vad=True, batch_size=args.batch_size)[0]["text"],
        "consecutive windows (no VAD)": lambda: transcribe_files(model, [wave], vad=False)[0]["text"],
    }
    rows = []
    for name, run in runs.items():
        start = time.perf_counter()
        text = run()
        wall = time.perf_counter() - start
        rows.append({"digits path": name, "utterances": len(truth), "audio_s": round(wave.shape[0] / SAMPLE_RATE, 1),
                     "wer": float(word_error_rate(text, reference)), "wall_s": wall})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the speed recording")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens every peer decodes per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (VAD-batched peers, HF pipeline)")
    p.add_argument("--profile-batch-sizes", type=int, nargs="*", default=[],
                   help="split mmformer's VAD-batched wall time into its phases at these batch sizes")  # fmt: skip
    p.add_argument("--digits-utterances", type=int, default=100, help="utterances of the digits WER recording")
    p.set_defaults(repeats=1, warmup=1)
    args = parse_args(p, argv)
    if args.tiny:
        args.minutes, args.new_tokens, args.batch_size, args.digits_utterances, args.warmup = 1.0, 4, 2, 12, 0
    rows, splits = speed_rows(args)
    print(f"long-form speed: audio seconds per second, whisper-tiny dims (random weights), {machine()}")
    print(table(rows, ["peer", "audio_s", "windows", "new_tokens", "batch", "wall_s", "audio_s_per_s", "vs_openai",
                       "vs_fw_float32"]))  # fmt: skip
    if splits:
        print("mmformer VAD-batched: wall time by phase (seconds, one profiled run each)")
        print(table(splits, ["path", "batch", "windows", "wall_s", *(k for k in splits[0] if k.endswith("_s") and
                                                                   k != "wall_s")]))  # fmt: skip
    wers = wer_rows(args)
    print("digits recording, the shipped model: WER by path")
    print(table(wers, ["digits path", "utterances", "audio_s", "wer", "wall_s"]))
    record("longform", rows + splits + wers, args)


if __name__ == "__main__":
    main()
