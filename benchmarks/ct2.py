"""CTranslate2 (the engine of faster-whisper) as a benchmark peer on the same random weights as the other peers: a
Hugging Face Whisper folder converted with ``ctranslate2.converters.TransformersConverter`` at float32 and int8,
and greedy decoding through ``ctranslate2.models.Whisper.generate``.

CTranslate2's quirks (see DESIGN.md): the converter needs a tokenizer in the folder (a ``tokenizers`` WordLevel
``tokenizer.json`` with Whisper's special strings at the model's ids works; it is copied into the converted folder,
where faster-whisper looks for it); the special ids come from those strings; its ``max_length`` is not the new
tokens (ask for twice as many; the benchmark checks the count);
a zeroed embedding row (e.g. end-of-text, to keep it from winning) breaks the row's int8 scale: scale it down
instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

QUANTIZATIONS = ("float32", "int8")


def word_level_tokenizer(vocab_size: int, specials: dict[int, str]):
    """A ``transformers`` fast tokenizer whose id ``i`` is the word ``t{i}``, except the ``specials`` (id → Whisper's
    string, e.g. ``{50257: "<|endoftext|>"}``) — what the converter and ``ctranslate2.models.Whisper`` read ids
    from."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {specials.get(i, f"t{i}"): i for i in range(vocab_size)}
    if len(vocab) != vocab_size:
        raise ValueError(f"specials: expected distinct strings at ids below {vocab_size}, got {specials}")
    unk = next(word for word, i in vocab.items() if i not in specials)
    backend = Tokenizer(WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=unk)


def convert_whisper(
    hf_folder: str | Path, out: str | Path, quantizations: tuple[str, ...] = QUANTIZATIONS
) -> dict[str, Path]:
    """CTranslate2 folders (one per quantization) of a saved Hugging Face Whisper folder holding a tokenizer."""
    import ctranslate2

    hf_folder, out = Path(hf_folder), Path(out)
    if not (hf_folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"hf_folder: no tokenizer.json in {hf_folder}; CTranslate2's converter needs one")
    paths = {}
    for quantization in quantizations:
        paths[quantization] = out / f"ct2-{quantization}"
        converter = ctranslate2.converters.TransformersConverter(str(hf_folder), copy_files=["tokenizer.json"])
        converter.convert(str(paths[quantization]), quantization=quantization, force=True)
    return paths


def whisper_models(hf, specials: dict[int, str], folder: str | Path, threads: int | None = None) -> dict:
    """``ctranslate2.models.Whisper`` of a Hugging Face Whisper model at each of :data:`QUANTIZATIONS`, keyed
    ``ct2_float32`` / ``ct2_int8`` (the model is saved with a word-level tokenizer holding ``specials``)."""
    import ctranslate2

    folder = Path(folder)
    hf.save_pretrained(folder / "hf")
    word_level_tokenizer(hf.config.vocab_size, specials).save_pretrained(folder / "hf")
    threads = threads or torch.get_num_threads()
    return {
        f"ct2_{q}": ctranslate2.models.Whisper(str(path), device="cpu", compute_type=q, intra_threads=threads)
        for q, path in convert_whisper(folder / "hf", folder).items()
    }


def generate(model, features: torch.Tensor, prompt: list[int], new_tokens: int) -> torch.Tensor:
    """Greedy ids (B, len(prompt) + new_tokens) from log-mel features (B, M, Nf), the prompt first, as Hugging Face's
    ``generate`` returns them (no blank or token suppression, no timestamp rules: the prompt holds
    ``<|notimestamps|>``)."""
    import ctranslate2

    storage = ctranslate2.StorageView.from_array(features.contiguous().numpy())
    results = model.generate(
        storage,
        [prompt] * features.shape[0],
        beam_size=1,
        max_length=2 * new_tokens,  # gives max_length / 2 new tokens after this prompt (measured; see DESIGN.md)
        suppress_blank=False,
        suppress_tokens=[],
        return_scores=False,
    )
    return torch.tensor([prompt + r.sequences_ids[0] for r in results])


def peers(size: str, batches: list[int], new_tokens: int, folder: str | Path) -> dict:
    """CTranslate2's greedy decoding at each batch size, on the weights and inputs of
    :func:`benchmarks.generate.speech_rows` (same seeds): ``{"{batch}/ct2_float32": call, "{batch}/ct2_int8": ...}``,
    each call returning the ids. ``python -m benchmarks.generate --ct2 child`` runs them in a child process of their
    own (:mod:`benchmarks.turns`): beside torch's decoding in one process, CTranslate2's OpenMP runtime made torch's
    threads sleep and wake at every parallel region (voluntary context switches 0 -> ~3,500 per 64-token call) and
    mmformer's decoding 1.2-2x slower, persistently after CTranslate2's first call."""
    from benchmarks.generate import NO_TIMESTAMPS, START, speech_features, whisper_pair, whisper_specials

    hf, _ = whisper_pair(size)
    models = whisper_models(hf, whisper_specials(hf), folder)
    out = {}
    for batch in batches:
        features = speech_features(size, batch)
        for name, model in models.items():
            out[f"{batch}/{name}"] = lambda m=model, x=features: generate(m, x, [START, NO_TIMESTAMPS], new_tokens)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.ct2 --size S --batches 1,8 --new-tokens N``: :func:`peers` served to a parent that
    times them in turn with other processes' engines (:func:`benchmarks.turns.serve`)."""
    import argparse
    import tempfile

    from benchmarks import turns
    from benchmarks.common import parse_args

    p = argparse.ArgumentParser(description=peers.__doc__)
    p.add_argument("--size", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=None)
    args = parse_args(p, argv)
    with tempfile.TemporaryDirectory() as folder:
        turns.serve(peers(args.size, [int(b) for b in args.batches.split(",")], args.new_tokens, folder))


if __name__ == "__main__":
    main()
