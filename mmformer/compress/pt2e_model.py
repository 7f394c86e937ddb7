"""A PT2E int8 model at run time: :class:`PT2EModel` holds each tower's quantized graph (compiled with inductor,
:class:`GraphRunner` per graph) beside the float model it was made from, and answers the model's calls (encoders,
the decoder step) through them; :mod:`mmformer.compress.pt2e` makes one (``quantize``) and reads one back (``load``).

The graphs run on x86-64 CPUs only (the quantizer's kernels); another device or CPU gets a ValueError naming both
(:func:`check_device`).

Shape legend: B batch, C channels, H×W pixels, M mel bins, Nf mel frames, T tokens, S memory tokens, E embedding
size, V vocabulary.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.generation.search import unseen
from mmformer.layers.freezing import FrozenCompile

BACKEND = "pt2e"
QPARAMS_FILE = "pt2e_qparams.safetensors"
X86 = ("x86_64", "amd64", "i686", "x86")


def check_device(device: torch.device | str | None, backend: str = "pt2e int8 (X86InductorQuantizer)") -> None:
    """Refuse a device or CPU the x86 int8 kernels cannot serve (the message names the backend and the device)."""
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        raise ValueError(f"device: {backend} runs on x86-64 CPUs only; got device {str(device)!r}")
    machine = platform.machine()
    if machine.lower() not in X86:
        raise ValueError(f"device: {backend} runs on x86-64 CPUs only; this CPU is {machine!r}")


POOLED_PROJECTIONS = ("image_proj", "audio_proj", "text_proj")  # pooled features → the shared embedding space

# Static graphs compile their int8 linear layers as inductor's C++ GEMM templates (AMX or AVX-512 VNNI micro-kernels
# over weights packed at compile time) instead of oneDNN's ``qlinear_pointwise``, which spends ~40 µs a call outside
# its ~10 µs kernel: a chain of eight 384 × 1536 layers, 2 threads, 1 / 8 rows, 2.8× / 4.2× float32 against 1.0× /
# 1.6× (AMX), 3.2× / 4.1× against 1.15× / 1.5× with AMX masked (the VNNI kernel), outputs within 4e-8 of the reference
# graph. "CPP" alone, no ATen peer: with one choice nothing is benchmarked (with both, each GEMM shape took ~2 s to
# time, for the same speed); an int8 layer no micro-kernel serves still gets oneDNN's. The templates' C++ takes
# longer to build (first calls at ViT-B/32 and whisper-tiny: 38 / 67 s, dynamic graphs 16 / 39 s). Dynamic graphs
# keep oneDNN's: with these templates torch 2.14's dynamic-activation graphs corrupted the heap (the process
# aborted, "corrupted double-linked list").
STATIC_GEMMS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP"}


class PT2EModel:
    """The int8 graphs of a model's towers, with the float model kept for its config and processor.

    Args:
        model: the float model the graphs were made from.
        mode: ``static`` or ``dynamic``.
        graphs: graph name (as :mod:`mmformer.ship.exportable` names them) → converted graph module.
        qparams: ``{graph}.{observer}.scale|zero_point`` → tensor, what :meth:`save_pretrained` writes.
        compile: run each graph through ``torch.compile`` (inductor, freezing) on first use.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str,
        graphs: dict[str, torch.fx.GraphModule],
        qparams: dict[str, torch.Tensor],
        compile: bool = True,
    ):
        self.model = model
        self.mode = mode
        self.graphs = graphs
        self.qparams = qparams
        self.compile = compile
        self._compiled: dict[str, Any] = {}
        self.quantization = {"quant_method": BACKEND, "method": mode, "graphs": sorted(graphs)}

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def processor(self) -> Any:
        return getattr(self.model, "processor", None)

    def run(self, name: str, *inputs: torch.Tensor, again: bool = False) -> tuple[torch.Tensor, ...]:
        """One graph's outputs (compiled on first use when ``compile``); ``again``: a call with the signature of one
        already made (a decoding's later steps: :meth:`~mmformer.layers.freezing.FrozenCompile.again`).

        The graph runs in inference mode on inference tensors, whatever the caller passes: dynamo guards on each
        input's dispatch keys, which differ between an ordinary tensor and an inference tensor (``generate``'s and
        the server's), so a user's ``encode_image`` and then ``generate`` compiled the image graph twice. An ordinary
        input is copied (an inference tensor, generate's and the server's inputs, is not), and a caller outside
        inference mode gets ordinary tensors back, as from the float model."""
        if name not in self.graphs:
            raise ValueError(f"graph: this quantized model has no {name!r} graph; it has {sorted(self.graphs)}")
        outside = not torch.is_inference_mode_enabled()
        with torch.inference_mode():
            inputs = tuple(x if x.is_inference() else x.clone() for x in inputs)
            outputs = self._outputs(name, inputs, again)
        return tuple(x.clone() for x in outputs) if outside else outputs

    def _outputs(self, name: str, inputs: tuple[torch.Tensor, ...], again: bool) -> tuple[torch.Tensor, ...]:
        """:meth:`run`'s graph call (in inference mode)."""
        if name not in self._compiled:
            templates = self.mode == "static"
            self._compiled[name] = self._compiled_graph(name, templates) if self.compile else self.graphs[name]
        compiled = self._compiled[name]
        call = compiled.again if again and isinstance(compiled, FrozenCompile) else compiled
        try:
            return tuple(call(*inputs))
        except Exception as e:
            # only a compile with the templates raises it (without them the GEMM backends include ATen, so every
            # product has a choice): the compile below cannot fall back again
            if "NoValidChoicesError" not in str(e):
                raise
            reason = str(e).splitlines()[0][:200]
        # with "CPP" as the only GEMM backend, a float product that no C++ template serves (one whose constant is
        # not its right-hand operand) has no choice at all: that graph compiles without the templates
        warnings.warn(
            f"pt2e: the {name} graph runs oneDNN's int8 kernels (slower at few rows): inductor's C++ GEMM templates "
            f"cannot lower one of its products ({reason})",
            stacklevel=3,
        )
        self._compiled[name].release()
        self._compiled[name] = self._compiled_graph(name, templates=False)
        return tuple(self._compiled[name](*inputs))

    def _compiled_graph(self, name: str, templates: bool) -> FrozenCompile:
        """The graph through ``torch.compile`` (inductor, freezing; its int8 products as C++ GEMM templates if
        ``templates``), its frozen weights released with this object (torch would keep them)."""
        # no guards on the graph module's attributes: freezing folds its weights into the compiled code, and the
        # module is this object's own, never changed after quantization — those guards cost ~0.1 ms a call (the
        # digits model's transcription: 0.92-0.95x -> 0.99-1.06x float32). The inputs' shapes and dtypes stay guarded.
        # the step's past (L, N, nkv, P, hs) has P = 1 at the first step after a one-token prompt: traced as the
        # constant 1, that graph would serve no other step, and the second step compiled the graph again (the first
        # decoding's compile time twice); a single row (N = 1) likewise
        fn = FrozenCompile(
            self.graphs[name],
            dynamic=True,
            guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe,
            inductor=STATIC_GEMMS if templates else None,
            specialize_ones=name != "decoder_with_past_model",
        )
        fn.release_with(self)
        return fn

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, C, H, W) → (B, E), L2-normalised unless ``normalize=False`` (a classifier's head logits): see
        :meth:`_unnormalised`."""
        if "image_encoder" not in self.graphs:  # a tower left unquantized runs in float
            with torch.no_grad():
                return self.model.encode_image(pixel_values, normalize=normalize)
        embeds, states = self.run("image_encoder", pixel_values)
        return embeds if normalize else self._unnormalised(self.model.pool_image, states)

    def _unnormalised(self, pool: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """A tower's embeddings before the L2 norm that its graph applies: its graph's token states pooled and
        projected by the float model's ``pool`` with ``normalize=False``. No second graph: the pooled projections
        are not quantized (:data:`POOLED_PROJECTIONS`), so the graph's embeddings are these, normalised (an
        attention-pooling head, whose linear layers the graph runs in int8, runs in float here)."""
        with torch.no_grad():
            return pool(*inputs, normalize=False)

    def encode_audio(
        self,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        *,
        audio_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Waveforms (B, S) with their lengths, or log-mel (B, M, Nf) with frame counts (B,) → (B, E),
        L2-normalised unless ``normalize=False`` (the float model's arguments; see :meth:`_unnormalised`)."""
        if "audio_encoder" not in self.graphs:
            with torch.no_grad():
                return self.model.encode_audio(audio, audio_lengths, audio_features=audio_features,
                                               feature_lengths=feature_lengths, normalize=normalize)  # fmt: skip
        features = self._features(audio, audio_lengths, audio_features, feature_lengths)
        embeds, states, mask = self.run("audio_encoder", *features)
        return embeds if normalize else self._unnormalised(self.model.pool_audio, states, mask)

    def audio_states(self, features: torch.Tensor) -> torch.Tensor:
        """The int8 audio encoder's states (B, S, D) of log-mel (B, M, Nf), every frame valid: what a decoder
        attends to (the long-form path of a Whisper checkpoint reads its windows through this)."""
        return self.run("audio_encoder", *self._features(None, None, features, None))[1]

    def _features(
        self,
        audio: torch.Tensor | None,
        audio_lengths: torch.Tensor | None,
        features: torch.Tensor | None,
        lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The audio graph's inputs: log-mel (B, M, Nf) and frame counts (B,), from waveforms if given those."""
        if (audio is None) == (features is None):
            raise ValueError("audio: expected exactly one of audio= (waveforms) or audio_features= (log-mel)")
        if audio is not None:
            lengths = audio_lengths if audio_lengths is not None else torch.full((audio.shape[0],), audio.shape[-1])
            extract = self.model.audio_embed.features
            with torch.no_grad():
                features, lengths = extract(audio, lengths), extract.frames(lengths)
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[-1], dtype=torch.long)
        return pad_frames(self.model, features), lengths

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, T) ids and mask → (B, E), L2-normalised unless ``normalize=False`` (see :meth:`_unnormalised`)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if "text_encoder" not in self.graphs:
            with torch.no_grad():
                return self.model.encode_text(input_ids, mask, normalize=normalize)
        embeds, states = self.run("text_encoder", input_ids, mask)
        if normalize:
            return embeds
        # the positions the stack read past the ids (a fixed-length tower's padding; CoCa's appended class token,
        # which its pooling takes as the last state, not through the mask) are padding to the pooling
        extra = states.shape[1] - input_ids.shape[1]
        ids = F.pad(input_ids, (0, extra), value=self.config.text.pad_id)
        return self._unnormalised(self.model.pool_text, states, ids, F.pad(mask, (0, extra), value=False))

    def memory(
        self,
        image: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        *,
        audio_features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's states (B, S, D) and their mask (B, S), True = real (None: nothing padded), that the decoder
        reads: of ``image``, ``audio`` / ``audio_features``, or a text-to-text model's (T5) ``input_ids`` with their
        ``attention_mask`` — through the int8 encoder graph, or the float model's encoder for a tower left
        unquantized."""
        given = [n for n, x in (("image", image), ("audio", audio), ("audio_features", audio_features),
                                ("input_ids", input_ids)) if x is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(f"generate: expected exactly one of image=, audio= / audio_features=, input_ids=; got "
                             f"{given or 'none'}")  # fmt: skip
        graph = {"image": "image_encoder", "input_ids": "text_encoder"}.get(given[0], "audio_encoder")
        if graph not in self.graphs:  # a tower left unquantized: the float model's memory, as generate makes it
            from mmformer.generation.decoding import _memory

            with torch.no_grad():
                return _memory(self.model, image, audio, audio_lengths, audio_features, feature_lengths, input_ids,
                               attention_mask)  # fmt: skip
        if image is not None:  # the tokens the model's decoder reads (CoCa hides its pooled first query)
            states = self.run("image_encoder", image)[1][:, self.image_memory_start :]
            return states, torch.ones(states.shape[:2], dtype=torch.bool)
        if input_ids is not None:
            mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            return self.run("text_encoder", input_ids, mask)[1], mask
        _, states, mask = self.run(
            "audio_encoder", *self._features(audio, audio_lengths, audio_features, feature_lengths)
        )
        return states, mask

    @functools.cached_property
    def image_memory_start(self) -> int:
        """How many leading image tokens the model's decoder does not read
        (:func:`~mmformer.ship.exportable.image_memory_start`): the decoder graphs read their mask as a count of real
        tokens first, as the ONNX ones do."""
        from mmformer.ship.exportable import image_memory_start

        return image_memory_start(self.model)

    def generate(self, input_ids: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        """:func:`mmformer.generation.decoding.generate` with the int8 graphs: the encoder's states from
        :meth:`memory`, every decoding step through the prefill and step graphs (:class:`GraphRunner`); the search,
        the score processors (a Whisper checkpoint's rules among them) and the options are the float model's."""
        from mmformer.generation.decoding import generate

        return generate(self, input_ids=input_ids, **inputs)

    def decoder_runner(self, memory: torch.Tensor, memory_mask: torch.Tensor | None) -> GraphRunner | None:
        """The decoding loop's runner over the decoder graphs (:func:`mmformer.generation.decoding.generate`); None
        when the decoder was left unquantized (the float model's runner decodes)."""
        return GraphRunner(self, memory, memory_mask) if "decoder_model" in self.graphs else None

    def caption(self, images: Any, processor: Any = None, **decoding: Any) -> list[str]:
        """:func:`mmformer.generation.decoding.caption` through the int8 graphs."""
        from mmformer.generation.decoding import caption

        return caption(self, images, processor, **decoding)

    def transcribe(self, waveforms: Any, sample_rate: int = 16000, processor: Any = None, **decoding: Any) -> list[str]:
        """:func:`mmformer.generation.decoding.transcribe` through the int8 graphs."""
        from mmformer.generation.decoding import transcribe

        return transcribe(self, waveforms, sample_rate, processor, **decoding)

    # what zero-shot classification and decoding read of a model besides its graphs: the float model's scores, and
    # a mode that never changes (the graphs have no dropout)
    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.Tensor | None:
        return self.model.logit_bias

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # check_device: the graphs run on x86 CPUs only

    training = False

    def eval(self) -> PT2EModel:
        return self

    def train(self, mode: bool = True) -> PT2EModel:
        if mode:
            raise ValueError("train: a PT2E int8 model runs inference only; train its float model (.model)")
        return self

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """The float model (``save_pretrained``) plus :data:`QPARAMS_FILE`, atomically; reload with :func:`load`."""
        from mmformer.io import pretrained
        from mmformer.io.atomic import save_safetensors

        with pretrained.atomic_directory(directory, overwrite=overwrite) as staging:
            self.model.save_pretrained(staging)
            metadata = {"quantization_config": json.dumps(self.quantization), "torch_version": torch.__version__}
            tensors = {k: v.detach().contiguous() for k, v in self.qparams.items()}
            save_safetensors(tensors, staging / QPARAMS_FILE, metadata=metadata)
        return Path(directory)


class GraphRunner:
    """:class:`mmformer.generation.search.DecoderRunner`'s interface over a PT2E model's decoder graphs: the first call
    runs the prompt (N, P) through ``decoder_model`` (which returns the self- and cross-attention caches), later
    calls the new token (N, 1) through ``decoder_with_past_model``. ``memory`` (B, S, D) and its mask (B, S) serve
    N = B*K rows, K consecutive ones each (the beams of a sample), as the float runner's do.

    The graphs take no prompt mask and no learned prefix: prompts of one length, as the exports trace them."""

    def __init__(self, graphs: PT2EModel, memory: torch.Tensor, memory_mask: torch.Tensor | None):
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        self.graphs, self.memory, self.memory_mask = graphs, memory, memory_mask
        self.keys: torch.Tensor | None = None  # (L, N, nkv, P, hs), and the values
        self.values: torch.Tensor | None = None
        self.cross: tuple[torch.Tensor, ...] = ()  # each cross-attention layer's keys, then their values
        self.seen = 0
        self.stepped = False  # whether a step after the prompt ran

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens so far (N, L) → float32 logits (N, V) for position L."""
        if self.keys is None:
            k = tokens.shape[0] // self.memory.shape[0]  # rows per memory row (beams)
            if k > 1:
                self.memory = self.memory.repeat_interleave(k, dim=0)
                self.memory_mask = self.memory_mask.repeat_interleave(k, dim=0)
            logits, self.keys, self.values, cross_keys, cross_values = self.graphs.run(
                "decoder_model", tokens, self.memory, self.memory_mask
            )
            self.cross, self.memory = (*cross_keys, *cross_values), None  # the cache holds what the steps read
        else:
            new = unseen(tokens, self.seen)  # (N, 1)
            logits, self.keys, self.values = self.graphs.run(
                "decoder_with_past_model", new, self.memory_mask, self.keys, self.values, *self.cross,
                again=self.stepped,  # after this decoding's first step: the same inputs, a step longer
            )  # fmt: skip
            self.stepped = True
        self.seen = tokens.shape[1]
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (N,) of the self-attention cache, as beam search reassigns hypotheses (a sample's beams
        share its memory, so the cross-attention keys/values stay)."""
        if self.keys is not None:
            self.keys, self.values = self.keys.index_select(1, index), self.values.index_select(1, index)


def pad_frames(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Log-mel (B, M, Nf) padded at the end to Nf' ≡ the export example's frame count modulo the convolution stride.

    An exported audio graph keeps the guards its example's frame count passed, and the strided convolution's floor
    divisions guard on Nf modulo the stride (torch.export cannot prove them over the whole range); frames past every
    clip's length are read as silence (:meth:`mmformer.embedders.audio.AudioEmbedder.convolve`), so the real tokens
    come out the same, with at most one more masked token."""
    from mmformer.ship.exportable import examples

    audio = model.config.audio
    if audio is None or audio.pad_to_seconds is not None:
        return features  # a fixed window (Whisper) is read as it is
    example = examples(model)["input_features"].shape[-1]
    pad = (example - features.shape[-1]) % audio.conv_stride
    return torch.nn.functional.pad(features, (0, pad)) if pad else features
