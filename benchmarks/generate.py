"""Decoding tokens/s: mmformer's KV-cached generation against Hugging Face Whisper ``generate`` and CTranslate2
(``ctranslate2.models.Whisper``, the engine of faster-whisper; float32 and int8) on the same weights and log-mel
input, mmformer's int8 (PT2E, compiled: :mod:`mmformer.compress.pt2e`; ``--int8-mode static``, the default, calibrated
on noise clips with random texts, or ``dynamic``) against CTranslate2's, and mmformer's own cache-less decode; then
captioning, cached against cache-less.

Speech: a random ``transformers`` Whisper (``--size tiny``: a small config; ``--size whisper-tiny``: the
dimensions of OpenAI's whisper-tiny, 3 s of audio) converted with :func:`mmformer.convert.from_hf_whisper`. Hugging
Face runs ``GenerationMixin.generate`` (the generic decoding loop with its dynamic KV cache, without Whisper's
forced-token and timestamp processing, which would only add work to its side), greedy or beam search, with the
same decoder prompt (start-of-transcript, no-timestamps). CTranslate2 reads the same weights through its
Transformers converter (:mod:`benchmarks.ct2`) and decodes greedily only (its beam search is its own). Every peer
must produce exactly ``--new-tokens`` tokens per row: the end-of-text token's embedding row (tied to the LM head) is
scaled by 1e-3 (not zeroed: a zero row breaks CTranslate2's int8 scales), so its logit stays near 0 and it never
ranks among the top candidates; the output lengths are checked. ``same_ids``: every exact peer (all but the int8
ones) made Hugging Face's ids. Tokens/s counts generated tokens (batch × new tokens; beams are not counted twice) over
the whole call, the encoder included.

CTranslate2 runs in this process by default (``--ct2 same``) or, with ``--ct2 child``, in a child process of its
own (:func:`benchmarks.ct2.peers`: the same weights, inputs and threads; its ids join the same-ids check). In one
process its OpenMP runtime slows torch's decoding: after CTranslate2's first call, torch's threads sleep and wake at
every parallel region (voluntary context switches 0 → ~3,500 per 64-token call) and mmformer's batch-1 int8
decoding fell from 266–335 to 145–155 tokens/s (fp32: 148 → 127), measured on the 2-core EPYC. With ``--ct2 child``,
mmformer's float32 (eager, and compiled unless ``--no-compile``) and int8 (unless ``--no-int8``) also run in a child
of their own (``mmformer_alone``, ``compiled_alone``, ``int8_alone``: :func:`alone_peers`), and the two children's
engines are timed call by call in turn (:mod:`benchmarks.turns`), so that each engine is timed with the same company
and the VM's drift moves all alike: in this process five peers' weights (Hugging Face's among them) take turns in the
CPU's caches (on the Intel Xeon with a 300 MB L3, mmformer's batch-8 decoding ran 15 % slower right after Hugging
Face's than after its own), and children run one after the other measured the drift too.

    python -m benchmarks.generate [--size whisper-tiny] [--batches 1,8] [--beams 1,4] [--new-tokens 64] [--no-compile]
                                  [--ct2 same|child|off] [--no-int8] [--int8-mode static|dynamic]

``--tiny`` (the test suite's smoke run): smoke dimensions, batch 2, 4 new tokens, one timed call per peer (with
``--ct2 child``, no rest between the children's calls); speech greedy and beam 2 (or the given ``--beams``), captions
greedy only; only speech greedy's step compiled.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import base_parser, interleaved, machine, parse_args, record, table
from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.generation.decoding import generate
from mmformer.model import MultimodalTransformer

WHISPER_SIZES = {
    "tiny": dict(d_model=128, layers=2, heads=4, ffn=512, vocab=1024, source_positions=100, target_positions=128),
    "whisper-tiny": dict(
        d_model=384, layers=4, heads=6, ffn=1536, vocab=51865, source_positions=150, target_positions=448
    ),
    "whisper-small": dict(
        d_model=768, layers=12, heads=12, ffn=3072, vocab=51865, source_positions=1500, target_positions=448
    ),
    "smoke": dict(d_model=32, layers=1, heads=2, ffn=64, vocab=64, source_positions=8, target_positions=16),
}
CAPTION_SIZES = {
    "tiny": dict(image=64, width=128, depth=2, heads=4, vocab=1024),
    "whisper-tiny": dict(image=128, width=384, depth=4, heads=6, vocab=51865),
    "smoke": dict(image=32, width=32, depth=1, heads=2, vocab=64),
}
N_MELS, BOS, START, NO_TIMESTAMPS = 80, 1, 3, 4
# each engine alone in a child process (--ct2 child): mmformer's peer, and CTranslate2's it is measured against
ALONE_PAIRS = (("mmformer_alone", "ct2_float32"), ("compiled_alone", "ct2_float32"), ("int8_alone", "ct2_int8"))
INT8_PEERS = ("int8", "ct2_int8", "int8_alone")  # quantized: their ids may differ from the float peers'


def hf_whisper_config(s: dict):
    """A Hugging Face ``WhisperConfig`` of the dimensions ``s`` (an entry of :data:`WHISPER_SIZES`, or one built on
    it), with the last id as end-of-text and pad, and no suppressed tokens (the default lists name ids of the real
    vocabulary, beyond the smaller sizes')."""
    from transformers import WhisperConfig

    eos = s["vocab"] - 1
    return WhisperConfig(
        vocab_size=s["vocab"],
        num_mel_bins=N_MELS,
        d_model=s["d_model"],
        encoder_layers=s["layers"],
        decoder_layers=s["layers"],
        encoder_attention_heads=s["heads"],
        decoder_attention_heads=s["heads"],
        encoder_ffn_dim=s["ffn"],
        decoder_ffn_dim=s["ffn"],
        max_source_positions=s["source_positions"],
        max_target_positions=s["target_positions"],
        pad_token_id=eos,
        bos_token_id=BOS,
        eos_token_id=eos,
        decoder_start_token_id=START,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )


def whisper_pair(size: str | dict, seed: int = 0):
    """A random Hugging Face Whisper (a :data:`WHISPER_SIZES` name, or such a dict) whose end-of-text token never
    wins, and its mmformer conversion."""
    from transformers import WhisperForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()  # its batched-input attention-mask notice concerns padded prompts, not ours

    from mmformer.convert import from_hf_whisper

    config = hf_whisper_config(WHISPER_SIZES[size] if isinstance(size, str) else size)
    torch.manual_seed(seed)
    hf = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight[config.eos_token_id] *= 1e-3  # tied LM head: the eos logit stays ~0
    return hf, from_hf_whisper(hf)


def whisper_specials(hf) -> dict[int, str]:
    """The ids :func:`whisper_pair`'s model gives Whisper's special strings (what CTranslate2 looks up)."""
    return {START: "<|startoftranscript|>", NO_TIMESTAMPS: "<|notimestamps|>", hf.config.eos_token_id: "<|endoftext|>"}


def caption_model(size: str, seed: int = 0) -> MultimodalTransformer:
    """A random captioner: a ViT stack for the image and a cross-attending decoder stack; eos never wins."""
    s = CAPTION_SIZES[size]
    stack = dict(width=s["width"], depth=s["depth"], n_heads=s["heads"])
    config = ModelConfig(
        stacks={"vision": StackConfig(**stack), "decoder": StackConfig(**stack, cross_attention=True)},
        routes={"image": "vision", "decoder": "decoder"},
        image=ImageConfig(image_size=[s["image"], s["image"]], patch_size=16),
        audio=None,
        text=TextConfig(vocab_size=s["vocab"], max_length=128, pad_id=0, bos_id=BOS, eos_id=s["vocab"] - 1),
    )
    torch.manual_seed(seed)
    model = MultimodalTransformer(config).eval()
    with torch.no_grad():
        model.text_embed.tokens.weight[config.text.eos_id] = 0.0
    return model


def _check_length(name: str, ids: torch.Tensor, batch: int, length: int) -> None:
    if tuple(ids.shape) != (batch, length):
        raise RuntimeError(f"{name}: expected ids of shape {(batch, length)} (a fixed token count), got {ids.shape}")


def speech_peers(
    hf, ours: MultimodalTransformer, features: torch.Tensor, beams: int, n: int, args: argparse.Namespace, extra: dict
) -> dict:
    """Hugging Face generate, mmformer cached (eager, and compiled if asked) and cache-less generate, and for greedy
    search CTranslate2 float32 / int8 and mmformer's PT2E int8 (``extra``: name → model), each a closure over the same
    input."""
    from transformers import GenerationConfig, GenerationMixin

    from benchmarks import ct2

    eos = hf.config.eos_token_id
    hf_config = GenerationConfig(
        bos_token_id=BOS,
        pad_token_id=eos,
        eos_token_id=eos,
        decoder_start_token_id=START,
        do_sample=False,
        num_beams=beams,
        max_new_tokens=n,
    )
    prompt = torch.tensor([[START, NO_TIMESTAMPS]]).expand(features.shape[0], -1)
    peers = {
        "hf": lambda: GenerationMixin.generate(
            hf, input_features=features, decoder_input_ids=prompt, generation_config=hf_config
        )
    }
    # the smoke run compiles greedy's step only: a beam step compiles through the same code (tests/test_static_cache.py
    # compares it with eager)
    compile = args.compile and not (args.tiny and beams > 1)
    peers |= mmformer_peers(ours, dict(audio_features=features, prompt_ids=prompt), beams, n, compile)
    if beams == 1:
        for name, model in extra.items():
            if name == "int8":
                peers[name] = lambda m=model: m.generate(audio_features=features, prompt_ids=prompt, max_new_tokens=n)
            else:
                peers[name] = lambda m=model: ct2.generate(m, features, prompt[0].tolist(), n)
    return peers


def mmformer_peers(model: MultimodalTransformer, inputs: dict, beams: int, n: int, compile: bool) -> dict:
    """mmformer's KV-cached generate (eager, and compiled if asked: the static cache's fixed-shape step, the weights
    frozen into the graph on CPU) and its cache-less decode."""
    options = dict(inputs, max_new_tokens=n, num_beams=beams)
    peers = {
        "mmformer": lambda: generate(model, **options),
        "no_cache": lambda: generate(model, **options, use_cache=False),
    }
    if compile:
        peers["compiled"] = lambda: generate(model, **options, cache="static", compile=True)
    return peers


def measure(
    task: str, args: argparse.Namespace, batch: int, beams: int, peers: dict, prompt: int = 1, apart: dict | None = None
) -> dict:
    """Tokens/s of every peer (interleaved medians), their ratios, and whether the exact peers all made the same ids;
    ``apart``: peers measured in a child process, name → (tokens/s, ids).

    The untimed first call of each peer checks the output length and gives the compile time of a compiled one.
    """
    n = args.new_tokens
    ids, first_s = {}, {}
    for name, fn in peers.items():
        start = time.perf_counter()
        ids[name] = fn()
        first_s[name] = time.perf_counter() - start
        _check_length(name, ids[name], batch, prompt + n)
    seconds = interleaved(peers, warmup=args.warmup, repeats=args.repeats)
    tps = {name: batch * n / s for name, s in seconds.items()}
    for name, (tok_s, rows) in (apart or {}).items():
        tps[name], ids[name] = tok_s, torch.tensor(rows)
        _check_length(name, ids[name], batch, prompt + n)
    row = {"task": task, "batch": batch, "search": "greedy" if beams == 1 else f"beam {beams}", "new_tokens": n}
    row |= {f"{name}_tok_s": value for name, value in tps.items()}
    if "hf" in tps:
        row["vs_hf"] = tps["mmformer"] / tps["hf"]
    row["vs_no_cache"] = tps["mmformer"] / tps["no_cache"]
    if "compiled" in tps:
        row["compiled_vs_hf" if "hf" in tps else "compiled_vs_no_cache"] = tps["compiled"] / tps.get(
            "hf", tps["no_cache"]
        )
        # the first call's extra time; ~0 when inductor's on-disk cache already held an identical graph
        row["compile_s"] = max(0.0, first_s["compiled"] - seconds["compiled"])
    pairs = (("mmformer", "ct2_float32"), ("compiled", "ct2_float32"), ("int8", "mmformer"), ("int8", "ct2_int8"),
             *ALONE_PAIRS)  # fmt: skip
    for peer, base in pairs:
        if peer in tps and base in tps:
            row[f"{peer}_vs_{base}"] = tps[peer] / tps[base]
    reference = ids["hf" if "hf" in ids else "mmformer"]
    row["same_ids"] = all(torch.equal(reference, other) for name, other in ids.items() if name not in INT8_PEERS)
    return row


def speech_features(size: str, batch: int) -> torch.Tensor:
    """The log-mel input (batch, N_MELS, frames) every speech peer decodes, in this process or a child: seeded by the
    batch size, as many frames as Hugging Face's encoder takes (twice its source positions)."""
    frames = 2 * WHISPER_SIZES[size]["source_positions"]
    return torch.randn(batch, N_MELS, frames, generator=torch.Generator().manual_seed(batch))


def noise_calibration(model: MultimodalTransformer, n: int, generator: torch.Generator) -> list[dict]:
    """Static int8's calibration for a random speech model: ``n`` clips of noise at the model's full window with
    random texts (bos first; 18 tokens, so that the decoder step is calibrated at 16 positions after a prefill)."""
    audio, text = model.config.audio, model.config.text
    wave = 0.1 * torch.randn(n, audio.window_samples, generator=generator)  # (n, S)
    length = min(18, text.max_length)
    ids = torch.randint(5, text.vocab_size - 1, (n, length), generator=generator)
    ids[:, 0] = text.bos_id
    return [{"audio": wave, "audio_lengths": torch.full((n,), wave.shape[1], dtype=torch.long), "input_ids": ids,
             "attention_mask": torch.ones_like(ids, dtype=torch.bool)}]  # fmt: skip


def int8_model(ours: MultimodalTransformer, args: argparse.Namespace):
    """mmformer's int8 peer: PT2E int8 (``--int8-mode``; static calibrated by :func:`noise_calibration`) of the
    audio tower and the decoder, compiled unless ``--no-compile`` (the smoke run never compiles)."""
    from mmformer.compress import pt2e

    calibration = None
    if args.int8_mode == "static":
        calibration = noise_calibration(ours, 2 if args.tiny else 4, torch.Generator().manual_seed(1))
    return pt2e.quantize(ours, args.int8_mode, calibration=calibration, towers=["audio", "decoder"],
                         compile=args.compile and not args.tiny)  # fmt: skip


def alone_peers(args: argparse.Namespace) -> dict:
    """mmformer's greedy float32 (eager, and compiled unless ``--no-compile``) and (unless ``--no-int8``) PT2E int8
    decoding on :func:`speech_rows`'s weights and inputs (same seeds), for a child process with no other engine
    (:mod:`benchmarks.turns`), as CTranslate2's run in theirs: ``{"{batch}/mmformer_alone": call, "{batch}/
    compiled_alone": ..., "{batch}/int8_alone": ...}``, each call returning the ids."""
    _, ours = whisper_pair(args.size)
    int8 = int8_model(ours, args) if args.int8 else None
    out = {}
    for batch in args.batches:
        features = speech_features(args.size, batch)
        prompt = torch.tensor([[START, NO_TIMESTAMPS]]).expand(batch, -1)
        options = dict(audio_features=features, prompt_ids=prompt, max_new_tokens=args.new_tokens)
        out[f"{batch}/mmformer_alone"] = lambda o=options: generate(ours, **o)
        if args.compile:
            out[f"{batch}/compiled_alone"] = lambda o=options: generate(ours, **o, cache="static", compile=True)
        if int8 is not None:
            out[f"{batch}/int8_alone"] = lambda o=options: int8.generate(**o)
    return out


def alone_in_turns(args: argparse.Namespace) -> dict:
    """CTranslate2 (:func:`benchmarks.ct2.peers`) and mmformer (:func:`alone_peers`), each engine in a child process
    of its own, timed call by call in turn (:func:`benchmarks.turns.interleaved`; same weights, inputs, threads,
    warm-up and repeats): ``{batch: {name: (tokens/s, ids)}}`` as JSON keys."""
    from benchmarks import turns

    common = ["--new-tokens", str(args.new_tokens), "--batches", ",".join(map(str, args.batches)), "--threads",
              str(torch.get_num_threads())]  # fmt: skip
    size = ["--tiny"] if args.tiny else ["--size", args.size]  # --tiny sets the smoke run's size, batches and tokens
    ours = [sys.executable, "-m", "benchmarks.generate", *size, *common, "--alone-serve", "--no-save",
            "--compile" if args.compile else "--no-compile", "--int8" if args.int8 else "--no-int8",
            "--int8-mode", args.int8_mode]  # fmt: skip
    theirs = [sys.executable, "-m", "benchmarks.ct2", "--size", args.size, *common]
    root = Path(__file__).resolve().parent.parent
    rest = {"rest": 0.0} if args.tiny else {}  # the smoke run's timings mean nothing: no pause for spinning threads
    with turns.Child(theirs, cwd=root) as ct2, turns.Child(ours, cwd=root) as mmformer:
        measured = turns.interleaved([ct2, mmformer], warmup=max(1, args.warmup), repeats=args.repeats, **rest)
    out: dict = {}
    for key, (seconds, ids) in measured.items():
        batch, name = key.split("/")
        out.setdefault(batch, {})[name] = (int(batch) * args.new_tokens / seconds, ids)
    return out


def speech_rows(args: argparse.Namespace) -> list[dict]:
    hf, ours = whisper_pair(args.size)
    with tempfile.TemporaryDirectory() as folder:
        extra, apart = {}, {}
        if args.ct2 == "same":
            from benchmarks import ct2

            extra |= ct2.whisper_models(hf, whisper_specials(hf), folder)
        elif args.ct2 == "child":
            apart = alone_in_turns(args)
        if args.int8:
            extra["int8"] = int8_model(ours, args)
        rows = []
        for batch in args.batches:
            features = speech_features(args.size, batch)
            for beams in args.beams:
                peers = speech_peers(hf, ours, features, beams, args.new_tokens, args, extra)
                rows.append(measure(f"speech ({args.size})", args, batch, beams, peers, prompt=2,
                                    apart=apart.get(str(batch)) if beams == 1 else None))  # fmt: skip
    return rows


def caption_rows(args: argparse.Namespace) -> list[dict]:
    model = caption_model(args.size)
    size = CAPTION_SIZES[args.size]["image"]
    rows = []
    # the smoke run captions greedily and uncompiled: the speech rows already run each search and the compiled step
    # (a caption row would only add another compile of the same peers)
    beam_widths = args.beams[:1] if args.tiny else args.beams
    compile = args.compile and not args.tiny
    for batch in args.batches:
        pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        for beams in beam_widths:
            peers = mmformer_peers(model, dict(image=pixels), beams, args.new_tokens, compile)
            rows.append(measure(f"caption ({args.size})", args, batch, beams, peers))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--size", choices=("tiny", "whisper-tiny"), default="tiny")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--beams", default="1,4")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-caption", action="store_true")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time generate(compile=True), its compile time reported apart (default: on)",
    )
    p.add_argument(
        "--ct2",
        choices=("same", "child", "off"),
        default="same",
        help="CTranslate2 float32 and int8 peers (greedy): in this process (default), in a child process (its OpenMP "
        "runtime slows torch's threads in the same process: benchmarks/ct2.py), or off",
    )
    p.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mmformer's PT2E int8 peer (greedy; compiled unless --no-compile; default: on)",
    )
    p.add_argument(
        "--int8-mode",
        choices=("static", "dynamic"),
        default="static",
        help="the int8 peer's activations: static (calibrated on noise clips; its linear layers run inductor's C++ "
        "GEMM templates) or dynamic (scales at run time; oneDNN's kernels); default: static",
    )
    p.add_argument("--alone-serve", action="store_true", help=argparse.SUPPRESS)  # --ct2 child's: alone_peers()
    p.set_defaults(repeats=10)  # a decode is short: more repeats steady the medians on a shared machine
    args = parse_args(p, argv)
    if args.tiny:
        args.size, args.repeats, args.warmup, args.new_tokens = "smoke", 1, 0, 4
        args.batches = "2"
        if args.beams == p.get_default("beams"):  # an explicit --beams holds (e.g. 1: greedy rows only)
            args.beams = "1,2"
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.beams = [int(k) for k in str(args.beams).split(",")]
    if args.alone_serve:
        from benchmarks import turns

        turns.serve(alone_peers(args))
        return
    ct2 = args.ct2 != "off"
    compiled = ["compiled_tok_s", "compile_s"] if args.compile else []
    rows = speech_rows(args)
    print(f"speech decoding: Hugging Face Whisper generate vs mmformer (same weights), {machine()}")
    columns = ["task", "batch", "search", "new_tokens", "hf_tok_s", "mmformer_tok_s", "no_cache_tok_s"]
    columns += compiled + ["ct2_float32_tok_s", "ct2_int8_tok_s"] * ct2 + ["int8_tok_s"] * args.int8
    columns += ["vs_hf", "vs_no_cache"] + (["compiled_vs_hf"] if args.compile else [])
    columns += ["mmformer_vs_ct2_float32"] * ct2 + ["compiled_vs_ct2_float32"] * (ct2 and args.compile)
    columns += ["int8_vs_mmformer"] * args.int8
    columns += ["int8_vs_ct2_int8"] * (ct2 and args.int8)
    alone = args.ct2 == "child"  # mmformer's peers also timed alone, as CTranslate2's
    columns += ["mmformer_alone_tok_s", "mmformer_alone_vs_ct2_float32"] * alone
    columns += ["compiled_alone_tok_s", "compiled_alone_vs_ct2_float32"] * (alone and args.compile)
    columns += ["int8_alone_tok_s", "int8_alone_vs_ct2_int8"] * (alone and args.int8) + ["same_ids"]
    print(table(rows, columns))
    if not args.skip_caption:
        captions = caption_rows(args)
        print("captioning: mmformer KV-cached vs cache-less decode (same model)")
        columns = ["task", "batch", "search", "new_tokens", "mmformer_tok_s", "no_cache_tok_s"] + compiled
        columns += ["vs_no_cache"] + (["compiled_vs_no_cache"] if args.compile else []) + ["same_ids"]
        print(table(captions, columns))
        rows = rows + captions
    record("generate", rows, args)


if __name__ == "__main__":
    main()
