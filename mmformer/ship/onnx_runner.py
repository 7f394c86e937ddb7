"""Run an ONNX export (``mmformer export --format onnx``) without PyTorch: numpy, onnxruntime, tokenizers, Pillow and
soundfile only. It proves the export is complete: zero-shot classification of images or audio, greedy captioning
and transcription through the decoder graphs with their explicit KV cache, giving the ids the model's greedy
``generate`` gives: its prompt (a Whisper checkpoint's start, language — given or detected —, task and no-timestamps
tokens), suppressed tokens, end ids and length limit, read from ``export_config.json`` (docs/export.md).

    from mmformer.ship.onnx_runner import OnnxModel
    model = OnnxModel("out/onnx")
    probs, labels = model.zeroshot(["a.png", "b.png"], ["zero", "one"], modality="image")
    texts = model.transcribe(["a.flac"])

    python -m mmformer.ship.onnx_runner out/onnx --classes zero,one,two a.png b.flac     # zero-shot
    python -m mmformer.ship.onnx_runner out/onnx --transcribe a.flac                     # speech to text
    python -m mmformer.ship.onnx_runner out/onnx --transcribe --language en a.flac       # Whisper, language chosen

(the command line: :mod:`mmformer.ship.runner_cli`). Preprocessing follows :class:`mmformer.Processor` (images:
channels, resize to cover and centre crop, normalise; audio: mono, float or int16 PCM, resampled to the model's rate
as torchaudio does) and :class:`mmformer.embedders.audio.LogMel` (centred STFT with a periodic Hann window, the saved
mel filter bank, log10 with an 8-decade range per utterance; Whisper's fixed window) as the export's ``audio.log_mel``
block states its steps, in numpy (:mod:`mmformer.ship.audio_features`). Each rule of decoding names the torch code it
follows: a change there must come here too.

This module imports neither torch nor the rest of mmformer (``import mmformer`` itself is light) but its audio front
end (:mod:`mmformer.ship.audio_features`) and :mod:`mmformer.preprocess.media`, both torch-free: the rules it shares
with the Processor, the commands and the server (which files are audio; how an image file is read — decoded fully,
upright, 16-bit grayscale scaled, the pixel limit —; how an audio file is read — decoded block by block, checked, the
rates checked before decoding, cut to ``max_seconds`` with the same warning), so that a file gives the same pixels,
samples and errors (naming it) here. Only the resampler is its own: numpy's, equal to torchaudio's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmformer.preprocess.media import (
    SampleError,
    check_resample,
    check_unicode,
    convert_image,
    decode_audio,
    read_image,
    read_tokenizer_json,
    truncate_audio,
)
from mmformer.ship.audio_features import log_mel_features, log_mel_rules, resample, sinc_resampler

EXPORT_CONFIG = "export_config.json"
# export_config.json's format, written by `mmformer export` (an export without one is of format 1): a runner refuses
# a newer one as newer, instead of ignoring keys it does not know (an older runner ignored `image.memory_start`).
EXPORT_FORMAT_VERSION = 1


def cross_inputs(keys: Any, values: Any) -> dict[str, Any]:
    """The decoder step's cross-attention inputs from the prefill's stacked keys and values (L, B, nkv, S, hs):
    ``cross_keys_{i}`` and ``cross_values_{i}``, layer i's (B, nkv, S, hs) — views, for numpy arrays and torch
    tensors alike (the export names its inputs with this too)."""
    return {f"cross_{kind}_{i}": t[i] for kind, t in (("keys", keys), ("values", values)) for i in range(t.shape[0])}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # 1 / (1 + exp(-x)), without exp's overflow at large -x


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class OnnxModel:
    """The graphs of one export folder, run with onnxruntime.

    Args:
        directory: a folder written by :func:`mmformer.ship.export.export` with ``format="onnx"``.
        providers: onnxruntime execution providers (default: CPU).
        threads: onnxruntime's intra-op threads (default: its own choice, one per core).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ):
        import onnxruntime as ort

        self.directory = Path(directory)
        path = self.directory / EXPORT_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"directory: no {EXPORT_CONFIG} in {self.directory}; expected an mmformer export")
        self.config = json.loads(path.read_text(encoding="utf-8"))
        version = self.config.get("format_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version > EXPORT_FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {version!r} was written by a newer mmformer; this runner reads "
                             f"format_version <= {EXPORT_FORMAT_VERSION}: upgrade mmformer")  # fmt: skip
        if self.config.get("format") != "onnx":
            raise ValueError(f"{path}: expected an ONNX export, got format {self.config.get('format')!r}")
        quantized = self.config.get("quantization")
        if quantized and "CPUExecutionProvider" not in providers:
            raise ValueError(
                f"providers: this export's graphs are int8 ({quantized['backend']} {quantized['method']}), made for "
                f"onnxruntime's CPUExecutionProvider; got providers {list(providers)}"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {name: self._session(ort, g["file"], options, providers)
                         for name, g in self.config["graphs"].items()}  # fmt: skip
        self.text = self.config["text"]
        # the keys below came with the decoding rules; an export written before them has none and decodes as it did
        # (no window, [bos], end-of-text only, the position table): see the properties that read them
        self.generation = self.config.get("generation")  # GenerationConfig's fields (Whisper's), or None
        self.logit_scale = float(self.config.get("logit_scale", 1.0))
        bias = self.config.get("logit_bias")  # SigLIP's; None (or an export without the key): softmax scores
        self.logit_bias = None if bias is None else float(bias)
        self._tokenizer = None
        preprocessor = self.directory / "preprocessor_config.json"
        self.preprocessor = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        filters = (self.config.get("audio") or {}).get("mel_filters")  # (n_fft/2 + 1, M), read once
        self.mel_filters = np.load(self.directory / filters, allow_pickle=False) if filters else None
        self.log_mel_rules = log_mel_rules((self.config.get("audio") or {}).get("log_mel"))  # read once

    def _session(self, ort: Any, file: str, options: Any, providers: Sequence[str]) -> Any:
        try:
            return ort.InferenceSession(str(self.directory / file), options, providers=list(providers))
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            opset = self.config.get("opset")
            if opset and "opset" in str(error).lower():
                raise ValueError(
                    f"directory: {self.directory} was exported at ONNX opset {opset}, which onnxruntime "
                    f"{ort.__version__} does not run (opset 24 needs onnxruntime >= 1.24); upgrade onnxruntime or "
                    f"export again with `mmformer export --opset 23`"
                ) from error
            raise

    def _run(self, graph: str, **inputs: np.ndarray) -> list[np.ndarray]:
        if graph not in self.sessions:
            raise ValueError(f"this export has no {graph} graph; it has {sorted(self.sessions)}")
        return self.sessions[graph].run(None, inputs)

    # ------------------------------------------------------------------ text
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            path = self.directory / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{self.directory}: no tokenizer.json; export the model with its processor")
            tok = read_tokenizer_json(path)
            self.max_length = (tok.truncation or {}).get("max_length") or self.text["max_length"] or 10**9
            if self.text["max_length"]:
                self.max_length = min(self.max_length, self.text["max_length"])
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer = tok
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts → ids (B, T) int64 and mask (B, T) bool: bos … eos, cut to the context keeping eos, right-padded.
        A text that is not valid Unicode is refused as the Tokenizer refuses it (tokenizers' error names nothing)."""
        for i, t in enumerate(texts):
            check_unicode(t, f"texts[{i}]")
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        eos = self.text["eos_id"]
        cut = []
        for row in rows:
            if len(row) > self.max_length:
                last = row[-1]
                row = row[: self.max_length]
                if eos is not None and last == eos:
                    row[-1] = eos
            cut.append(row)
        width = max(map(len, cut))
        ids = np.full((len(cut), width), self.text["pad_id"], dtype=np.int64)
        mask = np.zeros((len(cut), width), dtype=bool)
        for i, row in enumerate(cut):
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        return ids, mask

    def detokenize(self, ids: np.ndarray) -> list[str]:
        """Generated rows (prompt removed) → texts, each up to its first eos, else without its trailing padding (a
        row that ended at another end id): as the model's tokenizer cuts them (``Tokenizer._until_eos``)."""
        eos, pad, out = self.text["eos_id"], self.text["pad_id"], []
        for row in ids.tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]
            else:
                while row and row[-1] == pad:
                    row.pop()
            out.append(row)
        return self.tokenizer.decode_batch(out, skip_special_tokens=True)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(B, E) L2-normalised text embeddings."""
        ids, mask = self.tokenize(texts)
        return self._run("text_encoder", input_ids=ids, attention_mask=mask)[0]

    # ------------------------------------------------------------------ images
    @property
    def image_mode(self) -> str:  # the PIL mode images are read in
        return "RGB" if (self.preprocessor.get("image") or {}).get("channels", 3) == 3 else "L"

    def preprocess_images(self, images: Sequence[Any]) -> np.ndarray:
        """Image files or PIL images → normalised pixels (B, C, H, W) float32."""
        from PIL import Image

        cfg = self.preprocessor.get("image") or {}
        h, w = cfg.get("image_size", [224, 224])
        channels = cfg.get("channels", 3)
        mean = np.array(cfg.get("mean", [0.5]) * (channels if len(cfg.get("mean", [0.5])) == 1 else 1), np.float32)
        std = np.array(cfg.get("std", [0.5]) * (channels if len(cfg.get("std", [0.5])) == 1 else 1), np.float32)
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}.get(
            cfg.get("interpolation", "bicubic"), Image.BICUBIC
        )
        mode = self.image_mode
        out = []
        for item in images:  # a file read as the Processor reads it (decoded fully, upright, 16-bit scaled, checked)
            img = convert_image(item, mode) if isinstance(item, Image.Image) else read_image(item, mode, name=str(item))
            if cfg.get("resize") == "exact":
                img = img if (img.height, img.width) == (h, w) else img.resize((w, h), resample)
            elif cfg.get("resize_size") is not None or h == w:  # the short side to resize_size (or the square's
                short, long = sorted((img.width, img.height))  # side), as the Processor's torchvision Resize(int)
                side = cfg.get("resize_size") or h
                size = (side, int(side * long / short))
                img = img.resize(size if img.width <= img.height else size[::-1], resample)
            elif (img.height, img.width) != (h, w):  # cover (h, w) keeping the aspect ratio
                scale = max(h / img.height, w / img.width)
                img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), resample)
            if cfg.get("resize") != "exact" and (img.height, img.width) != (h, w):  # then the centre crop
                floor = cfg.get("crop_offset") == "floor"  # Hugging Face's; torchvision's CenterCrop rounds
                left, top = (
                    ((img.width - w) // 2, (img.height - h) // 2)
                    if floor
                    else (int(round((img.width - w) / 2.0)), int(round((img.height - h) / 2.0)))
                )
                img = img.crop((left, top, left + w, top + h))
            x = np.asarray(img, dtype=np.float32) / 255.0
            x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # (C, H, W)
            out.append((x - mean[:, None, None]) / std[:, None, None])
        return np.stack(out).astype(np.float32)

    def encode_image(self, images: Sequence[Any]) -> np.ndarray:
        """(B, E) L2-normalised image embeddings."""
        return self._run("image_encoder", pixel_values=self.preprocess_images(images))[0]

    # ------------------------------------------------------------------ audio
    @property
    def sample_rate(self) -> int:
        """The model's audio rate, that of the waveforms :meth:`load_audio` gives."""
        if not self.config.get("audio"):
            raise ValueError(f"audio: {self.directory} is the export of a model without audio; it reads images or text")
        return self.config["audio"]["sample_rate"]

    def load_audio(self, audio: Sequence[Any], sample_rate: int | None = None) -> list[np.ndarray]:
        """Audio files or 1-D arrays (at ``sample_rate``) of float or int16 PCM samples (scaled by 1/32768, as the
        Processor does) → mono float32 waveforms at the model's rate."""
        rate = self.sample_rate
        max_seconds = (self.preprocessor.get("audio") or {}).get("max_seconds")
        if sample_rate is not None:  # before any file is read, as the Processor checks its sampling_rate
            check_resample(int(sample_rate), rate, what="sample_rate")
        waves = []
        for item in audio:
            name = _audio_name(item, len(waves))
            if isinstance(item, (str, os.PathLike)):  # read as the Processor reads a file (decode_audio's checks)
                wave, _ = decode_audio(item, rate, resampler=sinc_resampler, name=name, max_seconds=max_seconds)
                waves.append(wave)
                continue
            wave = np.asarray(item)
            if sample_rate is None:
                raise ValueError("sample_rate: required with waveform arrays (the rate they were recorded at)")
            if wave.ndim != 1 or wave.size == 0:
                raise ValueError(f"{name}: expected a mono waveform of at least one sample, got shape {wave.shape}")
            if wave.dtype != np.int16 and not np.issubdtype(wave.dtype, np.floating):
                raise TypeError(f"{name}: expected float (or int16 PCM) samples; got dtype {wave.dtype}")
            wave = wave.astype(np.float32) / (32768.0 if wave.dtype == np.int16 else 1.0)  # as Processor.waveform
            if not np.isfinite(wave).all():
                raise ValueError(f"{name}: waveform contains NaN or infinite values")
            waves.append(truncate_audio(resample(wave, int(sample_rate), rate), rate, max_seconds, name))
        return waves

    @property
    def window_samples(self) -> int:
        """Samples every waveform is zero-padded or cut to before the log-mel (``AudioConfig.window_samples``:
        Whisper's 30 s); 0 where waveforms keep their length (and in an export without ``pad_to_seconds``)."""
        audio = self.config.get("audio") or {}
        seconds = audio.get("pad_to_seconds")
        return 0 if seconds is None else round(seconds * audio["sample_rate"])

    def log_mel(self, waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Waveforms → log-mel features (B, M, Nf) float32 and frame counts (B,), by the export's rules
        (:attr:`log_mel_rules`), its filter bank and its fixed window (:attr:`window_samples`), as the model's LogMel
        computes them (:func:`~mmformer.ship.audio_features.log_mel_features`)."""
        return log_mel_features(waves, self.config["audio"], self.mel_filters, self.log_mel_rules, self.window_samples)

    def _audio_states(
        self, audio: Sequence[Any], sample_rate: int | None, one_window: bool = False
    ) -> list[np.ndarray]:
        """The audio graph's outputs for audio files or waveforms; ``one_window``: refuse audio longer than the
        model's window (:meth:`check_one_window`) rather than cut it, as the features do."""
        if "audio_encoder" not in self.sessions:  # before the features, which need the export's mel filter bank
            raise ValueError(f"this export has no audio_encoder graph; it has {sorted(self.sessions)}")
        waves = self.load_audio(audio, sample_rate)
        if one_window:
            self.check_one_window(audio, waves)
        features, lengths = self.log_mel(waves)
        return self._run("audio_encoder", input_features=features, feature_lengths=lengths)

    def check_one_window(self, audio: Sequence[Any], waves: Sequence[np.ndarray]) -> None:
        """Refuse a waveform longer than the model's fixed window (Whisper's 30 s): the model's ``transcribe``
        decodes such audio window after window (:func:`mmformer.generation.decoding.transcribe`), which this runner
        does not; cutting it would lose the rest without a word (a :class:`SampleError` naming the input)."""
        window, rate = self.window_samples, self.sample_rate
        for i, (item, wave) in enumerate(zip(audio, waves)):
            if window and len(wave) > window:
                raise SampleError(
                    _audio_name(item, i),
                    f"expected at most the model's {window / rate:g} s window ({window} samples at {rate} Hz), got "
                    f"{len(wave) / rate:.2f} s ({len(wave)} samples); this runner decodes one window: transcribe "
                    "longer audio with `mmformer transcribe` (the long-form path), or cut it",
                )

    def encode_audio(self, audio: Sequence[Any], sample_rate: int | None = None) -> np.ndarray:
        """(B, E) L2-normalised audio embeddings."""
        return self._audio_states(audio, sample_rate)[0]

    # ------------------------------------------------------------------ zero-shot
    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str] = ("{}",)) -> np.ndarray:
        """(C, E): per class, the normalised mean over templates of the normalised prompt embeddings."""
        for i, name in enumerate(classnames):
            check_unicode(name, f"classnames[{i}]")  # named as given, not as the prompt it is put in
        prompts = [t.replace("{}", name) for name in classnames for t in templates]
        per_prompt = self.encode_text(prompts).reshape(len(classnames), len(templates), -1)
        return _normalize(per_prompt.mean(axis=1))

    def zeroshot(
        self,
        inputs: Sequence[Any],
        classnames: Sequence[str],
        templates: Sequence[str] = ("{}",),
        modality: str = "image",
        sample_rate: int | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """Class probabilities (B, C) and the most likely class of each input, as
        :meth:`mmformer.ZeroShotClassifier.predict_proba` gives them: the softmax of ``logit_scale`` × cosine
        similarity (rows sum to 1), or for a model with a logit bias (SigLIP, trained with a sigmoid loss) the sigmoid
        of that plus the bias, an independent probability per class (:func:`mmformer.zeroshot.zero_shot_logits`)."""
        if modality not in ("image", "audio"):
            raise ValueError(f"modality: expected 'image' or 'audio', got {modality!r}")
        features = self.encode_image(inputs) if modality == "image" else self.encode_audio(inputs, sample_rate)
        logits = (self.logit_scale * features @ self.class_embeddings(classnames, templates).T).astype(np.float64)
        if self.logit_bias is None:
            probs = _softmax(logits)
        else:
            probs = _sigmoid(logits + self.logit_bias)
        return probs, [classnames[i] for i in probs.argmax(axis=1)]

    # ------------------------------------------------------------------ the decoding rules
    @property
    def max_tokens(self) -> int | None:
        """The most token columns a row may reach, prompt included: the decoder's position table less an appended
        class token's slot (``TextConfig.max_tokens``, CoCa), where ``generate`` stops; None with no table. An export
        without the key: its table (``max_length``)."""
        return self.text.get("max_tokens", self.text["max_length"])

    @property
    def end_ids(self) -> list[int]:
        """Every id that ends a row: end-of-text, then the checkpoint's others (``extra_eos_ids``; Llama 3 lists
        several), as :func:`mmformer.generation.score_processing.model_end_ids`."""
        return [i for i in (self.text["eos_id"], *self.text.get("extra_eos_ids", [])) if i is not None]

    @property
    def prompt_length(self) -> int:
        """Tokens of the default prompt: ``bos``, then the checkpoint's language, task and no-timestamps tokens
        (:func:`mmformer.generation.decoding_rules.prompt_length`)."""
        gen = self.generation
        if gen is None:
            return 1
        return 1 + bool(gen["language_ids"]) + bool(gen["task_ids"]) + (gen["no_timestamps_id"] is not None)

    def language_id(self, language: str) -> int:
        """The token of a language code ("en", or "<|en|>") of the checkpoint's generation config, as
        :func:`mmformer.generation.decoding_rules.language_id` finds it."""
        gen = self.generation
        code = language.strip().lower().removeprefix("<|").removesuffix("|>")
        if gen is None or not gen["language_ids"]:
            raise ValueError(f"language: this model has no language tokens (a model trained here, or an English-only "
                             f"Whisper checkpoint): leave it out; got {language!r}")  # fmt: skip
        if code not in gen["language_ids"]:
            raise ValueError(
                f"language: expected one of this checkpoint's codes {sorted(gen['language_ids'])}, got {language!r}"
            )
        return gen["language_ids"][code]

    def task_id(self, task: str) -> int:
        """The token of a task ("transcribe", "translate"), as :func:`mmformer.generation.decoding_rules.task_id`."""
        tasks = {} if self.generation is None else self.generation["task_ids"]
        if task not in tasks:
            raise ValueError(f"task: expected one of this checkpoint's tasks {sorted(tasks)}, got {task!r}")
        return tasks[task]

    def check_language_task(self, language: str | None, task: str | None) -> None:
        """A chosen ``language`` / ``task`` (None: not chosen) checked against the checkpoint before any work, as
        ``DecodingOptions`` and :func:`mmformer.generation.decoding_rules.check_language_task` check them."""
        for name, value in (("language", language), ("task", task)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name}: expected None or a string, got {value!r}")
        if self.generation is None and (language is not None or task is not None):
            raise ValueError(
                f"language / task: this model has no such tokens; got language={language!r}, task={task!r}"
            )
        if language is not None:
            self.language_id(language)
        if task is not None:
            self.task_id(task)

    def detect_language(self, memory: np.ndarray, memory_mask: np.ndarray) -> np.ndarray:
        """(B,) language tokens: per row, the one the decoder finds most likely after ``bos``
        (:func:`mmformer.generation.decoding_rules.detect_language`, as Whisper does)."""
        candidates = np.array(sorted(self.generation["language_ids"].values()), dtype=np.int64)
        start = np.full((memory.shape[0], 1), self.text["bos_id"], dtype=np.int64)
        logits = self._run("decoder_model", input_ids=start, memory=memory, memory_mask=memory_mask)[0][:, -1]
        return candidates[logits[:, candidates].argmax(axis=-1)]

    def prompt(
        self, memory: np.ndarray, memory_mask: np.ndarray, language: str | None = None, task: str | None = None
    ) -> np.ndarray:
        """(B, P) default decoder prompt: ``[bos]``, or a Whisper checkpoint's ``[start, language, task,
        no-timestamps]``, the language detected per row unless chosen
        (:func:`mmformer.generation.decoding_rules.default_prompt`)."""
        B, gen = memory.shape[0], self.generation
        self.check_language_task(language, task)
        columns = [np.full(B, self.text["bos_id"], dtype=np.int64)]
        if gen is not None:
            language = language if language is not None else gen["language"]
            if language is not None:
                columns.append(np.full(B, self.language_id(language), dtype=np.int64))
            elif gen["language_ids"]:
                columns.append(self.detect_language(memory, memory_mask))
            task = task if task is not None else gen["task"] or ("transcribe" if gen["task_ids"] else None)
            if task is not None:
                columns.append(np.full(B, self.task_id(task), dtype=np.int64))
            if gen["no_timestamps_id"] is not None:
                columns.append(np.full(B, gen["no_timestamps_id"], dtype=np.int64))
        return np.stack(columns, axis=1)

    def suppress(self, logits: np.ndarray, step: int) -> np.ndarray:
        """Next-token logits (B, V) with the checkpoint's suppressed tokens at -inf: ``suppress_tokens`` always,
        ``begin_suppress_tokens`` at the first new token (``step`` 0), as the processors
        :func:`mmformer.generation.score_processing.build_score_processors` makes of them (``SuppressTokens``)."""
        gen = self.generation
        banned = [] if gen is None else [*gen["suppress_tokens"], *(gen["begin_suppress_tokens"] if step == 0 else [])]
        if not banned:
            return logits
        logits = logits.copy()
        logits[:, banned] = -np.inf
        return logits

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        memory: np.ndarray,
        memory_mask: np.ndarray,
        max_new_tokens: int = 30,
        *,
        language: str | None = None,
        task: str | None = None,
    ) -> np.ndarray:
        """Greedy decoding from encoder states (B, S, D), as the model's greedy ``generate``: ids (B, P + generated),
        the default prompt (:meth:`prompt`) first, rows padded after their end id (:attr:`end_ids`), suppressed
        tokens never chosen (:meth:`suppress`); at most ``max_new_tokens``, and no further than :attr:`max_tokens`.

        The first call reads the prompt and returns the self-attention cache and the cross-attention keys/values;
        each later call feeds one token with the cache and returns it one position longer.
        """
        memory = memory.astype(np.float32)
        tokens = self.prompt(memory, memory_mask, language, task)
        B, n_prompt = tokens.shape
        limit = n_prompt + max_new_tokens
        if self.max_tokens:
            limit = min(limit, self.max_tokens)
        logits, keys, values, cross_keys, cross_values = self._run(
            "decoder_model", input_ids=tokens, memory=memory, memory_mask=memory_mask
        )
        step_inputs = self.config["graphs"]["decoder_with_past_model"]["inputs"]
        if "cross_keys" in step_inputs:  # an export of mmformer before opset 23: one stacked input each
            cross = {"cross_keys": cross_keys, "cross_values": cross_values}
        else:
            cross = cross_inputs(cross_keys, cross_values)  # the step reads each layer's as its own input
        done = np.zeros(B, dtype=bool)
        end_ids = self.end_ids
        while tokens.shape[1] < limit:
            next_ids = self.suppress(logits[:, -1], tokens.shape[1] - n_prompt).argmax(axis=-1).astype(np.int64)
            next_ids[done] = self.text["pad_id"]
            tokens = np.concatenate([tokens, next_ids[:, None]], axis=1)
            done |= np.isin(next_ids, end_ids)
            if done.all() or tokens.shape[1] >= limit:
                break
            logits, keys, values = self._run(
                "decoder_with_past_model",
                input_ids=next_ids[:, None],
                memory_mask=memory_mask,
                past_keys=keys,
                past_values=values,
                **cross,
            )
        return tokens

    def transcribe(
        self,
        audio: Sequence[Any],
        sample_rate: int | None = None,
        max_new_tokens: int = 30,
        *,
        language: str | None = None,
        task: str | None = None,
    ) -> list[str]:
        """Greedy transcripts of audio files or waveforms, as the model's ``transcribe`` gives them; ``language`` and
        ``task`` choose a Whisper checkpoint's tokens (default: its own; the language detected).

        Raises:
            ValueError: audio longer than the model's fixed window (:meth:`check_one_window`).
        """
        self.check_language_task(language, task)  # before the audio's work
        _, states, mask = self._audio_states(audio, sample_rate, one_window=True)
        ids = self.generate(states, mask, max_new_tokens, language=language, task=task)
        return self.detokenize(ids[:, self.prompt_length :])

    @property
    def image_memory_start(self) -> int:
        """How many leading ``image_states`` the model's decoder does not read (CoCa's pooled first query; see
        :func:`mmformer.ship.exportable.image_memory_start`): the memory is the rest, every token real. 0 in an export
        without the key (written before it)."""
        return (self.config.get("image") or {}).get("memory_start", 0)

    def caption(self, images: Sequence[Any], max_new_tokens: int = 30) -> list[str]:
        """Greedy captions of image files or PIL images, decoded from the image tokens the model's decoder reads."""
        _, states = self._run("image_encoder", pixel_values=self.preprocess_images(images))
        memory = states[:, self.image_memory_start :]
        mask = np.ones(memory.shape[:2], dtype=bool)
        return self.detokenize(self.generate(memory, mask, max_new_tokens)[:, self.prompt_length :])


def _audio_name(item: Any, index: int) -> str:
    """How an error names one of the audio inputs: its path, else its place in the list."""
    return str(item) if isinstance(item, (str, os.PathLike)) else f"audio[{index}]"


if __name__ == "__main__":  # `python -m mmformer.ship.onnx_runner`: the command line of runner_cli, run by name (not
    import runpy  # imported: this module imports of mmformer only media and audio_features; runner_cli imports it)

    runpy.run_module("mmformer.ship.runner_cli", run_name="__main__", alter_sys=True)
