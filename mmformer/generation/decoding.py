"""Text generation: from image, audio or text memory, or from a prompt alone (a decoder-only language model);
greedy decoding, beam search and sampling, with or without a KV cache.

Structure (after Whisper's ``decoding.py``): the options are a frozen, validated :class:`DecodingOptions`
(:mod:`mmformer.generation.options`); every adjustment of a step's scores is a score processor built once per call
from the options and the checkpoint's rules (:mod:`mmformer.generation.score_processing`: repetition penalty,
``min_new_tokens``, ``forced_eos``, suppressed tokens, temperature / top-k / top-p); small strategy classes pick tokens
(:mod:`mmformer.generation.token_choice`: :class:`Greedy`, :class:`Sampler`, :class:`StopStrings`) and run the search
(:mod:`mmformer.generation.search`: :class:`TokenSearch` for greedy/sampling, :class:`BeamSearch`, and the
:class:`DecoderRunner` that feeds the decoder incrementally through one :class:`~mmformer.layers.cache.KVCache` or from
scratch every step, the reference the cache must equal). A checkpoint's prompt (Whisper's, with language detection)
comes from :mod:`mmformer.generation.decoding_rules`.

Returned ids are the prompt followed by the generated tokens. A row ends at its first ``eos_id`` (kept) or where its
text has produced a stop string, and is right-padded with ``pad_id`` to the longest row; rows that never end run to
``max_new_tokens``, or stop cleanly where the decoder's position table (``config.text.max_length``) ends.

Prompts of different lengths are left-padded (``prompt_mask`` False at the padding; ragged lists of ids are padded
here): every row's next token then goes to the same column, and each row's tokens are numbered from its first real
one, so a row continues exactly as it would alone.

Shape legend: B batch, K beams, N = B*K decoded rows, P prompt tokens, L tokens so far, V vocabulary,
S memory tokens, D width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from mmformer.embedders.checks import check_prefix, check_token_ids
from mmformer.generation.decoding_rules import (
    check_language_task,
    default_prompt,
    prompt_length,
    reads_memory,
    text_to_text,
)
from mmformer.generation.options import DecodingOptions
from mmformer.generation.score_processing import build_score_processors, model_end_ids
from mmformer.generation.search import BeamSearch, DecoderRunner, TokenSearch
from mmformer.generation.token_choice import Generators, StopStrings, token_chooser
from mmformer.io.weights import model_device

if TYPE_CHECKING:
    from mmformer.config import ModelConfig
    from mmformer.generation.streaming import TextStreamer
    from mmformer.model import MultimodalTransformer
    from mmformer.preprocess.processor import Processor


# ---------------------------------------------------------------------- entry points
def check_reads_memory(config: ModelConfig, given: Sequence[str], what: str = "generate") -> None:
    """Refuse a memory (``given``: the names of the inputs an encoder would read) for a decoder that cannot read it
    (:func:`reads_memory`): two different images captioned the same tokens."""
    if given and not reads_memory(config):
        decoder = config.routes.get("decoder")
        raise ValueError(
            f"{what}: got {', '.join(given)}, but this model's decoder (stack {decoder!r}) has no cross-attention "
            f"(config.stacks[{decoder!r}].cross_attention=False): it is a decoder-only language model and cannot read "
            "an image, audio or encoder text; give it only a prompt (prompt_ids=), or use a model whose decoder stack "
            "has cross_attention=True"
        )


def _memory(
    model: MultimodalTransformer | GraphModel,
    image: torch.Tensor | None,
    audio: torch.Tensor | None,
    audio_lengths: torch.Tensor | None,
    audio_features: torch.Tensor | None,
    feature_lengths: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The encoder states (B, S, D) and mask the decoder reads (a PT2E model's: its int8 encoder graph's); (None,
    None) when nothing is given (a decoder-only model continues its prompt)."""
    sources = (("image", image), ("audio", audio), ("audio_features", audio_features), ("input_ids", input_ids))
    given = [name for name, x in sources if x is not None]
    if len(given) > 1:
        raise ValueError(
            f"generate: expected at most one of image=, audio=, audio_features=, input_ids= (the memory the decoder "
            f"reads), got {given}"
        )
    if audio_lengths is not None and audio is None:
        raise ValueError("audio_lengths: only meaningful with audio= (waveforms); got audio=None")
    if feature_lengths is not None and audio_features is None:
        raise ValueError("feature_lengths: only meaningful with audio_features= (log-mel); got audio_features=None")
    if attention_mask is not None and input_ids is None:
        raise ValueError("attention_mask: only meaningful with input_ids= (text the encoder reads); for a prompt's "
                         "padding pass prompt_mask=")  # fmt: skip
    if given and not isinstance(model, torch.nn.Module):  # a PT2E model: its encoder graphs
        inputs = dict(audio_features=audio_features, feature_lengths=feature_lengths, input_ids=input_ids)
        return model.memory(image, audio, audio_lengths, attention_mask=attention_mask, **inputs)
    if image is not None:
        return model.encode_image_tokens(image)
    if audio is not None:
        return model.encode_audio_tokens(audio, audio_lengths)
    if audio_features is not None:
        return model.encode_audio_tokens(audio_features=audio_features, feature_lengths=feature_lengths)
    if input_ids is not None:  # text-to-text (T5): the text encoder's states
        return model.encode_text_tokens(input_ids, attention_mask)
    return None, None


class GraphModel(Protocol):
    """What :func:`generate` reads of a model of compiled graphs (a PT2E int8 model,
    :class:`mmformer.compress.pt2e.PT2EModel`): its float model (config, rules, checks), the memory its encoder
    graphs make, and a runner over its decoder graphs with :class:`~mmformer.generation.search.DecoderRunner`'s
    interface (``next_logits``, ``reorder``)."""

    model: MultimodalTransformer

    def memory(
        self, image: Any, audio: Any, audio_lengths: Any, **inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def decoder_runner(self, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> Any:
        """A runner over the decoder graphs, or None where the decoder runs in float (the float model's runner)."""
        ...


def _graphs_of(model: Any) -> GraphModel | None:
    """``model`` if it is a model of compiled graphs (no module), else None."""
    if isinstance(model, torch.nn.Module):
        return None
    if not callable(getattr(model, "decoder_runner", None)):
        raise TypeError(f"model: expected a MultimodalTransformer or a model of compiled graphs (a PT2E int8 model), "
                        f"got {type(model).__name__}")  # fmt: skip
    return model


def _graph_runner(
    graphs: GraphModel,
    memory: torch.Tensor | None,
    memory_mask: torch.Tensor | None,
    prompt_mask: torch.Tensor | None,
    prefix_embeds: torch.Tensor | None,
) -> Any:
    """The runner over a graph model's decoder graphs (None: its decoder runs in float), refusing what the graphs
    were not traced with."""
    if memory is None:
        raise ValueError("generate: a PT2E int8 model decodes from an image, audio or text memory; got none")
    runner = graphs.decoder_runner(memory, memory_mask)
    if runner is None:
        return None
    if prefix_embeds is not None:
        raise ValueError("prefix_embeds: a PT2E int8 model's decoder graphs take no learned prefix; decode with the "
                         "float model (.model)")  # fmt: skip
    if prompt_mask is not None and not bool(prompt_mask.all()):
        raise ValueError("prompt_ids: a PT2E int8 model's decoder graphs read prompts of one length (no prompt "
                         "mask); pass prompts of equal lengths, or decode with the float model (.model)")  # fmt: skip
    return runner


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths → left-padded ids (B, P) and their mask (B, P), True = real token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.as_tensor(row, dtype=torch.long, device=device)
            mask[i, width - len(row) :] = True
    return ids, mask


def ragged(prompt_ids: Any) -> bool:
    """Whether ``prompt_ids`` is a list of id lists of different lengths."""
    return (
        isinstance(prompt_ids, (list, tuple))
        and len(prompt_ids) > 0
        and all(isinstance(r, (list, tuple)) for r in prompt_ids)
        and len({len(r) for r in prompt_ids}) > 1
    )


def _prompt(
    model: MultimodalTransformer,
    prompt_ids: Any,
    prompt_mask: Any,
    batch: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The given prompt ids (B, P) and mask (B, P) or None, checked; ``batch`` is the memory's batch size (None:
    no memory)."""
    text = model.config.text
    if prompt_ids is None:  # without a memory (with one, generate starts from the default prompt)
        raise ValueError(
            "generate: expected prompt_ids= (a decoder-only model continues a prompt; Hugging Face's input_ids= means "
            "it too) or one of image=, audio=, audio_features=, input_ids= (the memory a decoder reads); got none"
        )
    if isinstance(prompt_ids, (list, tuple)) and len(prompt_ids) == 0:
        raise ValueError("prompt_ids: expected at least one prompt, got an empty list")
    if ragged(prompt_ids):
        if prompt_mask is not None:
            raise ValueError("prompt_mask: not needed with prompts of different lengths (they are left-padded here)")
        if any(len(r) == 0 for r in prompt_ids):
            raise ValueError(f"prompt_ids: expected at least one token per prompt, got lengths "
                             f"{[len(r) for r in prompt_ids]}")  # fmt: skip
        check_token_ids("prompt_ids", torch.tensor([t for r in prompt_ids for t in r]), text.vocab_size, what="ids")
        prompt_ids, prompt_mask = left_pad(prompt_ids, text.pad_id, device)
    try:
        prompt = torch.as_tensor(prompt_ids, device=device)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise TypeError(
            f"prompt_ids: expected integer ids (B, P) or (P,) as a tensor or lists, got {type(prompt_ids).__name__}"
        ) from e
    if prompt.dtype not in (torch.int64, torch.int32) or prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        raise ValueError(
            f"prompt_ids: expected integer ids (B, P) or (P,) with P >= 1, got {tuple(prompt.shape)} {prompt.dtype}"
        )
    prompt = prompt.long()
    if prompt.ndim == 1:
        prompt = prompt.expand(batch or 1, -1)
    if prompt.shape[0] == 0:
        raise ValueError(f"prompt_ids: expected at least one prompt, got shape {tuple(prompt.shape)}")
    if batch is not None and prompt.shape[0] != batch:
        raise ValueError(
            f"prompt_ids: expected {batch} rows (one per image/audio/text), got shape {tuple(prompt.shape)}"
        )
    check_token_ids("prompt_ids", prompt, text.vocab_size, what="ids")
    if prompt.shape[1] > text.max_tokens:
        raise ValueError(
            f"prompt_ids: {prompt.shape[1]} tokens exceed the model's context (config.text.max_length="
            f"{text.max_length}); shorten the prompt"
        )
    if prompt_mask is None:
        return prompt, None
    mask = torch.as_tensor(prompt_mask, device=device)
    binary = not mask.is_floating_point() or bool(((mask == 0) | (mask == 1)).all())
    if tuple(mask.shape) != tuple(prompt.shape) or not binary:
        raise ValueError(f"prompt_mask: expected a bool mask of the shape of prompt_ids {tuple(prompt.shape)}, "
                         f"True = real token; got {tuple(mask.shape)} {mask.dtype}")  # fmt: skip
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("prompt_mask: every prompt needs at least one real token (a row is all padding)")
    return _padded_left(prompt, mask, text.pad_id)


def _padded_left(prompt: torch.Tensor, mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (B, P) with their mask, left-padded: right-padded rows (a tokenizer's usual layout, mmformer's
    processor's too) are moved to the right end, as if each had been left-padded, so that the next token of every row
    goes to one column and each row continues as it would alone. A mask with a gap inside a row is refused."""
    real = mask.long()
    starts = real.argmax(dim=1)  # (B,) first real token
    ends = mask.shape[1] - real.flip(1).argmax(dim=1)  # (B,) one past the last one
    if not bool((real.sum(dim=1) == ends - starts).all()):
        raise ValueError(
            "attention_mask: expected each prompt's real tokens in one run, padded on the left or the right; got a "
            "row with padding between its tokens"
        )
    if bool((ends == mask.shape[1]).all()):  # already left-padded (or not padded)
        return prompt, mask
    rows = [row[m].tolist() for row, m in zip(prompt, mask)]
    return left_pad(rows, pad_id, prompt.device)


@torch.inference_mode()
def generate(
    model: MultimodalTransformer,
    *,
    image: torch.Tensor | None = None,
    audio: torch.Tensor | None = None,
    audio_lengths: torch.Tensor | None = None,
    audio_features: torch.Tensor | None = None,
    feature_lengths: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prompt_ids: torch.Tensor | Sequence | None = None,
    prompt_mask: torch.Tensor | None = None,
    prefix_embeds: torch.Tensor | None = None,
    options: DecodingOptions | None = None,
    generator: Generators = None,
    tokenizer: Any = None,
    streamer: TextStreamer | None = None,
    **changes: Any,
) -> torch.Tensor:
    """Decode token ids from an image, audio or text memory, or continue a prompt alone (decoder-only LM).

    Args:
        model: a model with a decoder route, or its PT2E int8 model (:class:`mmformer.compress.pt2e.PT2EModel`): its
            encoder graph makes the memory and its decoder graphs run the steps (a prompt of one length, no learned
            prefix); everything else is the float model's.
        image: normalised pixels (B, C, H, W).
        audio: waveforms (B, S) with optional sample counts ``audio_lengths`` (B,).
        audio_features: precomputed log-mel (B, n_mels, frames), as Whisper's ``input_features``, with optional frame
            counts ``feature_lengths`` (B,).
        input_ids: token ids (B, T), with their ``attention_mask`` (B, T), as Hugging Face's ``generate`` reads
            them: for a text-to-text model (T5: a text encoder of its own) the encoder's input; for any other the
            decoder's prompt, the same as ``prompt_ids=`` / ``prompt_mask=`` (a decoder-only LM: GPT-2, Llama, or one
            trained here with ``lm`` whose text route shares the decoder's stack).
        prompt_ids: decoder prefix (B, P) or (P,) for every row, or a list of id lists of different lengths (left-
            padded here); default ``[[bos_id]] * B``, or for a checkpoint with a generation config (Whisper) its
            start, language (``language=`` or detected), task and no-timestamps tokens. Without a memory the prompt
            is required. The checkpoint's suppressed tokens are never generated. ``language=`` / ``task=`` choose
            tokens of the default prompt: they are refused with ``prompt_ids`` (which would replace them).
        prompt_mask: (B, P) True at the prompt's real tokens, as Hugging Face's ``attention_mask`` of a
            decoder-only model; right-padded rows (a tokenizer's layout) are left-padded here first, so each row
            continues as it would alone and the returned prompt part is left-padded.
        prefix_embeds: a learned decoder prefix (P', D) read before the prompt by every row (prompt tuning; see
            :class:`mmformer.adapt.prompts.DecoderPrefix`); it takes P' positions of the decoder's position table.
        options: a :class:`DecodingOptions`; default its defaults.
        generator: random generator for reproducible sampling, or a list of one per row
            (:func:`~mmformer.generation.token_choice.row_generators`): a row then samples the same tokens whatever
            the rows decoded with it.
        tokenizer: decodes rows for ``stop_strings`` (default: ``model.processor.tokenizer``).
        streamer: a :class:`mmformer.generation.streaming.TextStreamer`; it receives the prompt, then each token as
            it is decoded, then ``end()`` (the calls Hugging Face's generate makes to its streamers); one row, greedy
            or sampling (beam search knows its final tokens only at the end).
        changes: :class:`DecodingOptions` fields overriding ``options`` (``max_new_tokens=``, ``num_beams=``,
            ``top_k=``, ``top_p=``, ``temperature=``, ``length_penalty=``, ``do_sample=``, ``repetition_penalty=``,
            ``stop_strings=``, ``use_cache=``, ``compile=``, ``min_new_tokens=``, ``forced_eos=``, ``language=``,
            ``task=``).

    Returns:
        LongTensor (B, P + generated): the prompt (as given, or left-padded) then the generated tokens; each row ends
        at its first eos or stop string (kept) and is padded with ``pad_id``. Decoding stops early, without error,
        where the decoder's position table ends.
    """
    options = DecodingOptions.build(options, **changes)
    graphs = _graphs_of(model)
    if graphs is not None:
        model = graphs.model  # the float model: its config, rules and checks; the graphs do the matrix work
    if model.lm_head is None:
        raise ValueError(f"generate: this model has no decoder; its routes are {sorted(model.config.routes)}")
    check_language_task(model, options.language, options.task, prompt_given=prompt_ids is not None)
    if input_ids is not None and not text_to_text(model):  # Hugging Face's decoder-only call: the prompt
        if prompt_ids is not None or prompt_mask is not None:
            raise ValueError(
                "input_ids: on a model without a text encoder it is the prompt (as Hugging Face's generate reads it: "
                "only a text-to-text model's are its encoder's input), so prompt_ids= / prompt_mask= must not be "
                "given too; got both"
            )
        prompt_ids, prompt_mask, input_ids, attention_mask = input_ids, attention_mask, None, None
    memory_inputs = (
        ("image=", image),
        ("audio=", audio),
        ("audio_features=", audio_features),
        ("input_ids=", input_ids),
    )
    check_reads_memory(model.config, [name for name, x in memory_inputs if x is not None])
    text = model.config.text
    memory, memory_mask = _memory(
        graphs or model, image, audio, audio_lengths, audio_features, feature_lengths, input_ids, attention_mask
    )
    if memory is None and text_to_text(model):
        raise ValueError(
            "generate: this text-to-text model's decoder reads its text encoder's states; pass input_ids= (with "
            "attention_mask=), the text the encoder reads — prompt_ids= alone would decode without the encoder"
        )
    if memory is not None and memory.shape[0] == 0:
        raise ValueError(f"generate: expected at least one image or waveform, got a batch of 0 ({tuple(memory.shape)})")
    if prompt_ids is None and memory is not None:
        if prompt_mask is not None:
            raise ValueError("prompt_mask: only meaningful with prompt_ids=")
        prompt = default_prompt(model, options, memory, memory_mask)
    else:
        device = memory.device if memory is not None else model_device(model)
        prompt, prompt_mask = _prompt(
            model, prompt_ids, prompt_mask, None if memory is None else memory.shape[0], device
        )
    n_prompt = prompt.shape[1]
    if streamer is not None and (options.num_beams > 1 or prompt.shape[0] > 1):
        raise ValueError(
            f"streamer: streaming decodes one row greedily or by sampling; got {prompt.shape[0]} rows and num_beams="
            f"{options.num_beams} (beam search knows its final tokens only at the end)"
        )
    max_length = n_prompt + options.max_new_tokens
    if prefix_embeds is not None:
        check_prefix(prefix_embeds, model.config.width("decoder"))
        prefix_embeds = prefix_embeds.to(prompt.device)
    n_prefix = 0 if prefix_embeds is None else prefix_embeds.shape[0]
    if text.position != "none":  # absolute positions end with their table: stop there rather than fail
        if n_prefix + n_prompt > text.max_tokens:
            raise ValueError(
                f"prompt_ids: {n_prompt} tokens{f' after a {n_prefix}-vector prefix' if n_prefix else ''} exceed the "
                f"decoder's position table (config.text.max_length={text.max_length})"
            )
        max_length = min(max_length, text.max_tokens - n_prefix)
    if max_length <= n_prompt:
        if streamer is not None:  # nothing to decode: the stream still begins and ends
            streamer.put(prompt.cpu())
            streamer.end()
        return prompt
    stop = None
    if options.stop_strings:
        if tokenizer is None:
            tokenizer = getattr(getattr(model, "processor", None), "tokenizer", None)
        if tokenizer is None:
            raise ValueError("stop_strings: finding them needs a tokenizer; pass tokenizer= or use a model loaded with "
                             "one (model.processor)")  # fmt: skip
        stop = StopStrings(tokenizer, options.stop_strings, n_prompt)

    K = options.num_beams
    if K > 1:
        # (B, P) → (B*K, P): each sample's K beams sit next to each other and share its memory rows (B, S, D),
        # whose cross-attention keys/values are computed and read once per sample
        prompt = prompt.repeat_interleave(K, dim=0)
        if prompt_mask is not None:
            prompt_mask = prompt_mask.repeat_interleave(K, dim=0)
    processors = build_score_processors(model, options, max_length=max_length, prompt_mask=prompt_mask)
    ends = model_end_ids(model)  # end-of-text, and the checkpoint's other end ids (Llama 3 lists several)
    if K > 1:
        search: TokenSearch | BeamSearch = BeamSearch(K, options.length_penalty, ends, text.pad_id, processors, stop)
    else:
        chooser = token_chooser(options, generator, prompt.shape[0])
        search = TokenSearch(chooser, ends, text.pad_id, processors, stop)
    runner = None if graphs is None else _graph_runner(graphs, memory, memory_mask, prompt_mask, prefix_embeds)
    if runner is None:
        runner = DecoderRunner(
            model,
            memory,
            memory_mask,
            max_length,
            options.use_cache,
            options.compile,
            prefix_embeds,
            prompt_mask,
            static=options.cache == "static",
        )
    if streamer is not None:
        return search.run(runner, prompt, max_length, streamer=streamer)
    return search.run(runner, prompt, max_length)


def processor_with_tokenizer(model: MultimodalTransformer, processor: Processor | None, what: str) -> Processor:
    """``processor``, else ``model.processor``; a ValueError saying which of them lacks the tokenizer ``what``
    needs."""
    if processor is not None:
        if getattr(processor, "tokenizer", None) is not None:
            return processor
        missing = f"the processor passed (a {type(processor).__name__}) has none"
    elif getattr(model, "processor", None) is None:
        missing = "no processor was passed and the model has none (model.processor is None)"
    elif getattr(model.processor, "tokenizer", None) is None:
        missing = (
            "no processor was passed and the model's has none (model.processor.tokenizer is None): the model was "
            "loaded or converted without one (a Hugging Face folder gives one from its tokenizer.json, a BERT "
            "vocab.txt or a GPT-2 vocab.json + merges.txt; a transformers model object carries none)"
        )
    else:
        return model.processor
    raise ValueError(
        f"{what}: turning ids into text needs a Processor with a tokenizer, but {missing}; pass processor= a "
        "Processor that has one"
    )


def _detokenize(model: MultimodalTransformer, processor: Processor, ids: torch.Tensor, decoding: dict) -> list[str]:
    """The generated text of ids from :func:`generate`, without the prompt."""
    prompt = decoding.get("prompt_ids")
    if prompt is None:
        skip = prompt_length(model)
    else:  # prompts of different lengths are left-padded to the longest
        skip = max(len(row) for row in prompt) if ragged(prompt) else torch.as_tensor(prompt).shape[-1]
    return processor.tokenizer.batch_decode(ids[:, skip:].cpu(), skip_special_tokens=True)


def caption(
    model: MultimodalTransformer, images: Any, processor: Processor | None = None, **decoding: Any
) -> list[str]:
    """Captions of images.

    Args:
        images: normalised ``pixel_values`` (B, C, H, W) as a float tensor, or anything the processor takes (PIL
            images, file paths, numpy arrays, (C, H, W) tensors).
        processor: preprocessing and tokenizer; default ``model.processor``.
        decoding: :func:`generate` options (``max_new_tokens``, ``num_beams``, ...).
    """
    processor = processor_with_tokenizer(model, processor, "caption")
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.is_floating_point():
        pixel_values = images
    else:
        pixel_values = processor(images=images)["pixel_values"]
    ids = generate(model, image=pixel_values.to(model_device(model)), **decoding)
    return _detokenize(model, processor, ids, decoding)


def transcribe(
    model: MultimodalTransformer,
    waveforms: Any,
    sample_rate: int = 16000,
    processor: Processor | None = None,
    **decoding: Any,
) -> list[str]:
    """Transcripts of speech.

    A model with a fixed audio window (``AudioConfig.pad_to_seconds``: Whisper's 30 s) transcribes longer audio by
    consecutive, non-overlapping windows: [0, 30 s), [30 s, 60 s), ... each decoded on its own (with its own prompt,
    and language detection when no language is chosen); a row's transcript is its windows' texts joined by spaces.
    A word cut by a window boundary may be lost or split (Whisper's own long-form decoding moves its windows by the
    timestamps it predicts; this does not).

    Args:
        waveforms: (B, S) tensor/array or a list of 1-D waveforms recorded at ``sample_rate``, or audio file paths;
            the processor resamples them to the model's rate and pads them.
        sample_rate: the rate of the waveform arrays (file paths carry their own).
        processor: preprocessing and tokenizer; default ``model.processor``.
        decoding: :func:`generate` options.
    """
    processor = processor_with_tokenizer(model, processor, "transcribe")
    if model.config.audio is not None:
        processor.check_audio_rate(model.config.audio.sample_rate)
    batch = processor(audio=waveforms, sampling_rate=sample_rate)
    audio, lengths = batch["audio"], batch["audio_lengths"]
    device = model_device(model)
    window = model.config.audio.window_samples if model.config.audio is not None else 0
    if not window or audio.shape[-1] <= window:
        ids = generate(model, audio=audio.to(device), audio_lengths=lengths.to(device), **decoding)
        return _detokenize(model, processor, ids, decoding)
    parts: list[list[str]] = [[] for _ in range(audio.shape[0])]
    for start in range(0, int(lengths.max()), window):
        rows = (lengths > start).nonzero().flatten()  # the waveforms that reach into this window
        chunk = audio[rows, start : start + window]
        chunk = F.pad(chunk, (0, window - chunk.shape[-1]))  # (b, window): the log-mel pads to it anyway
        chunk_lengths = (lengths[rows] - start).clamp(max=window)
        options = dict(decoding)
        prompt = options.get("prompt_ids")
        if prompt is not None and ragged(prompt):
            options["prompt_ids"] = [prompt[i] for i in rows.tolist()]
        elif prompt is not None and torch.as_tensor(prompt).ndim == 2:
            options["prompt_ids"] = torch.as_tensor(prompt)[rows]
        ids = generate(model, audio=chunk.to(device), audio_lengths=chunk_lengths.to(device), **options)
        for row, text in zip(rows.tolist(), _detokenize(model, processor, ids, options)):
            parts[row].append(text.strip())
    return [" ".join(p for p in row if p) for row in parts]
