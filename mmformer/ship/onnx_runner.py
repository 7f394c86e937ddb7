"""Run an ONNX export (``mmformer export --format onnx``) without PyTorch: numpy, onnxruntime, tokenizers, Pillow and
soundfile only. It proves the export is complete: zero-shot classification of images or audio, greedy captioning
and transcription through the decoder graphs with their explicit KV cache.

    from mmformer.ship.onnx_runner import OnnxModel
    model = OnnxModel("out/onnx")
    probs, labels = model.zeroshot(["a.png", "b.png"], ["zero", "one"], modality="image")
    texts = model.transcribe(["a.flac"])

    python -m mmformer.ship.onnx_runner out/onnx --classes zero,one,two a.png b.flac     # zero-shot
    python -m mmformer.ship.onnx_runner out/onnx --transcribe a.flac                     # speech to text

Preprocessing follows :class:`mmformer.Processor` (images: channels, resize to cover and centre crop, normalise;
audio: mono, resampled to the model's rate as torchaudio does) and :class:`mmformer.embedders.audio.LogMel` (centred
STFT with a periodic Hann window, the saved mel filter bank, log10 with an 8-decade range per utterance), in numpy.

This module imports neither torch nor the rest of mmformer (``import mmformer`` itself is light).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

EXPORT_CONFIG = "export_config.json"


def cross_inputs(keys: Any, values: Any) -> dict[str, Any]:
    """The decoder step's cross-attention inputs from the prefill's stacked keys and values (L, B, nkv, S, hs):
    ``cross_keys_{i}`` and ``cross_values_{i}``, layer i's (B, nkv, S, hs) — views, for numpy arrays and torch
    tensors alike (the export names its inputs with this too)."""
    return {f"cross_{kind}_{i}": t[i] for kind, t in (("keys", keys), ("values", values)) for i in range(t.shape[0])}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int, width: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """Band-limited sinc interpolation with a Hann window, as ``torchaudio.functional.resample`` (its defaults)."""
    if orig_rate == new_rate:
        return wave
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    base = min(orig, new) * rolloff
    half = math.ceil(width * orig / base)
    t = np.arange(0, -new, -1)[:, None] / new + np.arange(-half, half + orig)[None, :] / orig  # (new, 2 half + orig)
    t = np.clip(t * base, -width, width)
    window = np.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / t) * window * base / orig
    padded = np.pad(wave.astype(np.float64), (half, half + orig))
    blocks = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape[1])[::orig]  # (n, 2 half + orig)
    out = (blocks @ kernel.T).reshape(-1)
    return out[: math.ceil(new * len(wave) / orig)].astype(np.float32)


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
        self.logit_scale = float(self.config.get("logit_scale", 1.0))
        self._tokenizer = None
        preprocessor = self.directory / "preprocessor_config.json"
        self.preprocessor = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        filters = (self.config.get("audio") or {}).get("mel_filters")  # (n_fft/2 + 1, M), read once
        self.mel_filters = np.load(self.directory / filters, allow_pickle=False) if filters else None

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
            import tokenizers

            path = self.directory / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"{self.directory}: no tokenizer.json; export the model with its processor")
            tok = tokenizers.Tokenizer.from_file(str(path))
            self.max_length = (tok.truncation or {}).get("max_length") or self.text["max_length"] or 10**9
            if self.text["max_length"]:
                self.max_length = min(self.max_length, self.text["max_length"])
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer = tok
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts → ids (B, T) int64 and mask (B, T) bool: bos … eos, cut to the context keeping eos, right-padded."""
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
        """Generated rows (prompt removed) → texts, each up to its first eos."""
        eos, out = self.text["eos_id"], []
        for row in ids.tolist():
            if eos in row:
                row = row[: row.index(eos) + 1]
            out.append(row)
        return self.tokenizer.decode_batch(out, skip_special_tokens=True)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """(B, E) L2-normalised text embeddings."""
        ids, mask = self.tokenize(texts)
        return self._run("text_encoder", input_ids=ids, attention_mask=mask)[0]

    # ------------------------------------------------------------------ images
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
        out = []
        for item in images:
            img = item if isinstance(item, Image.Image) else Image.open(item)
            img = img.convert("RGB" if channels == 3 else "L")
            if (img.height, img.width) != (h, w):
                if cfg.get("resize") == "exact":
                    img = img.resize((w, h), resample)
                else:  # cover (h, w) keeping the aspect ratio, then centre crop
                    scale = max(h / img.height, w / img.width)
                    size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
                    img = img.resize(size, resample)
                    left, top = int(round((img.width - w) / 2.0)), int(round((img.height - h) / 2.0))
                    img = img.crop((left, top, left + w, top + h))
            x = np.asarray(img, dtype=np.float32) / 255.0
            x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)  # (C, H, W)
            out.append((x - mean[:, None, None]) / std[:, None, None])
        return np.stack(out).astype(np.float32)

    def encode_image(self, images: Sequence[Any]) -> np.ndarray:
        """(B, E) L2-normalised image embeddings."""
        return self._run("image_encoder", pixel_values=self.preprocess_images(images))[0]

    # ------------------------------------------------------------------ audio
    def load_audio(self, audio: Sequence[Any], sample_rate: int | None = None) -> list[np.ndarray]:
        """Audio files or 1-D float arrays (at ``sample_rate``) → mono float32 waveforms at the model's rate."""
        rate = self.config["audio"]["sample_rate"]
        waves = []
        for item in audio:
            if isinstance(item, (str, os.PathLike)):
                import soundfile

                wave, sr = soundfile.read(str(item), dtype="float32", always_2d=True)
                wave = wave.mean(axis=1)
            else:
                wave, sr = np.asarray(item, dtype=np.float32), sample_rate
            if sr is None:
                raise ValueError("sample_rate: required with waveform arrays (the rate they were recorded at)")
            if wave.ndim != 1 or wave.size == 0:
                name = item if isinstance(item, (str, os.PathLike)) else f"audio[{len(waves)}]"
                raise ValueError(f"{name}: expected a mono waveform of at least one sample, got shape {wave.shape}")
            wave = resample(wave, int(sr), rate)
            max_seconds = (self.preprocessor.get("audio") or {}).get("max_seconds")
            if max_seconds:
                wave = wave[: int(max_seconds * rate)]
            waves.append(wave.astype(np.float32))
        return waves

    def log_mel(self, waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Waveforms → log-mel features (B, M, Nf) float32 and frame counts (B,), as the model's LogMel computes
        them from the zero-padded batch: each row's frames are those of its waveform alone."""
        cfg = self.config["audio"]
        n_fft, hop = cfg["n_fft"], cfg["hop_length"]
        lengths = np.array([len(w) for w in waves], dtype=np.int64)
        batch = np.zeros((len(waves), int(lengths.max())), dtype=np.float32)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = w
        # centred frames, each waveform reflected at its own end (as LogMel's centre_pad), not at the batch's
        pad = n_fft // 2
        n = lengths[:, None]  # (B, 1)
        k = np.arange(-pad, batch.shape[1] + pad)[None, :]  # (1, S + 2 pad): each padded sample's source
        source = np.minimum(np.maximum(np.where(k >= n, 2 * (n - 1) - k, np.abs(k)), 0), n - 1)  # (B, S + 2 pad)
        padded = np.where(k >= n + pad, 0.0, np.take_along_axis(batch, source, axis=1)).astype(np.float32)
        frames = batch.shape[1] // hop + 1
        index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]  # (Nf, n_fft)
        window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)  # periodic Hann
        spectrum = np.fft.rfft(padded[:, index] * window, axis=-1)  # (B, Nf, n_fft/2 + 1)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        mel = np.log10(np.maximum(power @ self.mel_filters, 1e-10)).transpose(0, 2, 1)  # (B, M, Nf)
        n_frames = lengths // hop + 1
        real = np.arange(frames)[None, :] < n_frames[:, None]  # (B, Nf)
        peak = np.where(real[:, None, :], mel, -np.inf).max(axis=(1, 2), keepdims=True)
        return ((np.maximum(mel, peak - 8.0) + 4.0) / 4.0).astype(np.float32), n_frames

    def _audio_states(self, audio: Sequence[Any], sample_rate: int | None) -> list[np.ndarray]:
        if "audio_encoder" not in self.sessions:  # before the features, which need the export's mel filter bank
            raise ValueError(f"this export has no audio_encoder graph; it has {sorted(self.sessions)}")
        features, lengths = self.log_mel(self.load_audio(audio, sample_rate))
        return self._run("audio_encoder", input_features=features, feature_lengths=lengths)

    def encode_audio(self, audio: Sequence[Any], sample_rate: int | None = None) -> np.ndarray:
        """(B, E) L2-normalised audio embeddings."""
        return self._audio_states(audio, sample_rate)[0]

    # ------------------------------------------------------------------ zero-shot
    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str] = ("{}",)) -> np.ndarray:
        """(C, E): per class, the normalised mean over templates of the normalised prompt embeddings."""
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
        """Class probabilities (B, C) and the most likely class of each input."""
        if modality not in ("image", "audio"):
            raise ValueError(f"modality: expected 'image' or 'audio', got {modality!r}")
        features = self.encode_image(inputs) if modality == "image" else self.encode_audio(inputs, sample_rate)
        logits = self.logit_scale * features @ self.class_embeddings(classnames, templates).T
        probs = _softmax(logits.astype(np.float64))
        return probs, [classnames[i] for i in probs.argmax(axis=1)]

    # ------------------------------------------------------------------ generation
    def generate(self, memory: np.ndarray, memory_mask: np.ndarray, max_new_tokens: int = 30) -> np.ndarray:
        """Greedy decoding from encoder states (B, S, D): ids (B, 1 + generated), bos first, rows padded after eos.

        The first call reads the prompt (bos) and returns the self-attention cache and the cross-attention
        keys/values; each later call feeds one token with the cache and returns it one position longer.
        """
        B = memory.shape[0]
        bos, eos, pad = self.text["bos_id"], self.text["eos_id"], self.text["pad_id"]
        limit = 1 + max_new_tokens
        if self.text["max_length"]:
            limit = min(limit, self.text["max_length"])
        tokens = np.full((B, 1), bos, dtype=np.int64)
        logits, keys, values, cross_keys, cross_values = self._run(
            "decoder_model", input_ids=tokens, memory=memory.astype(np.float32), memory_mask=memory_mask
        )
        step_inputs = self.config["graphs"]["decoder_with_past_model"]["inputs"]
        if "cross_keys" in step_inputs:  # an export of mmformer before opset 23: one stacked input each
            cross = {"cross_keys": cross_keys, "cross_values": cross_values}
        else:
            cross = cross_inputs(cross_keys, cross_values)  # the step reads each layer's as its own input
        done = np.zeros(B, dtype=bool)
        while tokens.shape[1] < limit:
            next_ids = logits[:, -1].argmax(axis=-1).astype(np.int64)
            next_ids[done] = pad
            tokens = np.concatenate([tokens, next_ids[:, None]], axis=1)
            done |= next_ids == eos
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

    def transcribe(self, audio: Sequence[Any], sample_rate: int | None = None, max_new_tokens: int = 30) -> list[str]:
        """Greedy transcripts of audio files or waveforms."""
        _, states, mask = self._audio_states(audio, sample_rate)
        return self.detokenize(self.generate(states, mask, max_new_tokens)[:, 1:])

    def caption(self, images: Sequence[Any], max_new_tokens: int = 30) -> list[str]:
        """Greedy captions of image files or PIL images."""
        _, states = self._run("image_encoder", pixel_values=self.preprocess_images(images))
        mask = np.ones(states.shape[:2], dtype=bool)
        return self.detokenize(self.generate(states, mask, max_new_tokens)[:, 1:])


AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus"}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmformer.ship.onnx_runner", description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="folder written by `mmformer export --format onnx`")
    p.add_argument("--classes", help="comma-separated class names: zero-shot classification")
    p.add_argument("--transcribe", action="store_true", help="transcribe the audio files")
    p.add_argument("--caption", action="store_true", help="caption the image files")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    model = OnnxModel(args.export)
    audio = [f for f in args.files if Path(f).suffix.lower() in AUDIO_SUFFIXES]
    images = [f for f in args.files if f not in audio]
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        for modality, files in (("image", images), ("audio", audio)):
            if files:
                probs, labels = model.zeroshot(files, classes, modality=modality)
                for f, label, row in zip(files, labels, probs):
                    print(f"{f}\t{label}\t{row.max():.3f}")
    if args.transcribe and audio:
        for f, text in zip(audio, model.transcribe(audio, max_new_tokens=args.max_new_tokens)):
            print(f"{f}\t{text}")
    if args.caption and images:
        for f, text in zip(images, model.caption(images, max_new_tokens=args.max_new_tokens)):
            print(f"{f}\t{text}")


if __name__ == "__main__":
    main()
