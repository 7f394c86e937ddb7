"""Audio → frame tokens: log-mel features (torchaudio) and two 1-D convolutions with GELU, as in Whisper.

Shape legend: B batch, S samples, M mel bins, Nf mel frames, N tokens = ceil(Nf / stride), D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.config import AudioConfig, StackConfig
from mmformer.embedders.checks import check_device, check_lengths
from mmformer.layers.positions import AbsolutePositions


class LogMel(nn.Module):
    """Whisper-style log-mel: power mel spectrogram (torchaudio; Slaney scale and norm), log10, an 8-decade dynamic
    range per utterance, scaled to roughly [-1, 1]. The STFT window and mel filters are derived from the config and
    computed where they are used, so the module holds no state.

    With ``AudioConfig.pad_to_seconds`` it computes exactly what Whisper's feature extractor does: each waveform is
    zero-padded (or cut) to that length, the frame past the end of the centred STFT is dropped (30 s → 3000
    frames) and the peak spans the whole window. Without it the features follow the waveform's own length and
    exclude the padding of a batch (mmformer's default, which the digits models were trained with).
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.hop_length = cfg.hop_length

    def filters(self, device: torch.device) -> torch.Tensor:
        """(n_fft/2 + 1, M) mel filter bank."""
        import torchaudio.functional as AF  # imported here so that `import mmformer` stays light

        cfg = self.cfg
        bank = AF.melscale_fbanks(
            cfg.n_fft // 2 + 1, 0.0, float(cfg.sample_rate // 2), cfg.n_mels, cfg.sample_rate, "slaney", "slaney"
        )
        return bank.to(device)

    def power_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, S) waveforms → (B, M, Nf) power mel spectrogram (centred STFT, Hann window)."""
        import torchaudio.functional as AF

        cfg = self.cfg
        window = torch.hann_window(cfg.n_fft, device=audio.device)
        spec = AF.spectrogram(audio, 0, window, cfg.n_fft, cfg.hop_length, cfg.n_fft, 2.0, False)  # (B, F, Nf)
        return torch.matmul(spec.transpose(-1, -2), self.filters(audio.device)).transpose(-1, -2)

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Mel frames (centred STFT) of waveforms with these sample counts (all the window's with pad_to_seconds)."""
        if self.cfg.pad_to_seconds is not None:
            return torch.full_like(lengths, self.cfg.window_samples // self.hop_length)
        return lengths // self.hop_length + 1

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) waveforms → (B, M, Nf) log-mel. Padding frames are excluded from the per-utterance maximum (with
        pad_to_seconds: Whisper's fixed window, padding included)."""
        if lengths is not None:
            # Zero the samples past each length (Whisper pads with zeros): the STFT windows of the last real frames
            # reach into the padding, so its content would otherwise leak into real frames.
            real_samples = torch.arange(audio.shape[-1], device=audio.device)[None, :] < lengths[:, None]  # (B, S)
            audio = audio.masked_fill(~real_samples, 0.0)
        window = self.cfg.window_samples
        if window:  # Whisper: pad or cut to the window, drop the frame past its end, one peak over all of it
            audio = F.pad(audio[:, :window], (0, max(0, window - audio.shape[-1])))  # (B, window)
            mel = self.power_mel(audio.float())[..., :-1].clamp(min=1e-10).log10()  # (B, M, window / hop)
            lengths = None
        else:
            mel = self.power_mel(audio.float()).clamp(min=1e-10).log10()  # (B, M, Nf)
        if lengths is not None:
            real = torch.arange(mel.shape[-1], device=mel.device)[None, :] < self.frames(lengths)[:, None]
            peak = mel.masked_fill(~real[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        else:
            peak = mel.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(mel, peak - 8.0) + 4.0) / 4.0


class AudioEmbedder(nn.Module):
    """Waveforms or precomputed log-mel features → (B, N, D) tokens and a (B, N) padding mask."""

    def __init__(self, cfg: AudioConfig, stack: StackConfig):
        super().__init__()
        self.cfg = cfg
        self.features = LogMel(cfg)
        self.conv1 = nn.Conv1d(cfg.n_mels, stack.width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(stack.width, stack.width, kernel_size=3, stride=cfg.conv_stride, padding=1)
        self.positions = (
            None
            if cfg.position == "none"
            else AbsolutePositions(cfg.position, cfg.max_tokens, stack.width, what="audio (in frames / conv_stride)")
        )

    def tokens_for_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Token count after the strided convolution (kernel 3, padding 1)."""
        return (frames - 1) // self.cfg.conv_stride + 1

    def forward(
        self,
        audio: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embed waveforms ``audio`` (B, S) with sample ``lengths`` (B,), or log-mel ``features`` (B, M, Nf) with
        optional frame counts ``feature_lengths`` (B,)."""
        if features is None:
            audio, lengths = self.check_waveforms(audio, lengths)
            features = self.features(audio, lengths)
            # Whisper's fixed window: every frame is attended to, as Whisper's encoder does
            padded = self.cfg.pad_to_seconds is not None
            feature_lengths = None if lengths is None or padded else self.features.frames(lengths)
        else:
            self.check_features(features)
            if feature_lengths is not None:
                feature_lengths = check_lengths(
                    "feature_lengths", feature_lengths, features.shape[0], features.shape[-1], self.conv1.weight
                )
        n_frames = features.shape[-1]
        if self.positions is not None and self.tokens_for_frames(n_frames) > self.positions.length:
            raise ValueError(
                f"{'audio' if audio is not None else 'audio_features'}: expected at most {self.cfg.max_frames} mel "
                f"frames (AudioConfig.max_frames, the position table), got {n_frames}; pass shorter audio or build "
                "the model with a larger max_frames"
            )
        x = F.gelu(self.conv1(features.to(self.conv1.weight.dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, N, D)
        if self.positions is not None:
            x = self.positions(x)
        mask = None
        if feature_lengths is not None:
            n_tokens = self.tokens_for_frames(feature_lengths.to(x.device))
            mask = torch.arange(x.shape[1], device=x.device)[None, :] < n_tokens[:, None]  # (B, N)
        return x, mask

    def check_waveforms(
        self, audio: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(audio, torch.Tensor):
            raise TypeError(f"audio: expected a float tensor (B, S) of waveforms, got {type(audio).__name__}")
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2:
            raise ValueError(f"audio: expected shape (B, S) of mono waveforms, got {tuple(audio.shape)}")
        if not audio.is_floating_point():
            raise TypeError(f"audio: expected a float waveform tensor, got {audio.dtype}")
        check_device("audio", audio, self.conv1.weight)
        if audio.shape[0] == 0:
            raise ValueError(f"audio: expected at least one waveform, got shape {tuple(audio.shape)}")
        if audio.shape[1] < self.cfg.n_fft // 2 + 1 and self.cfg.pad_to_seconds is None:
            raise ValueError(f"audio: needs at least {self.cfg.n_fft // 2 + 1} samples, got {audio.shape[1]}")
        if lengths is not None:
            lengths = check_lengths("audio_lengths", lengths, audio.shape[0], audio.shape[1], self.conv1.weight)
        return audio, lengths

    def check_features(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[1] != self.cfg.n_mels:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"audio_features: expected log-mel (B, {self.cfg.n_mels}, frames), got {shape}")
        if not features.is_floating_point():
            raise TypeError(f"audio_features: expected a float tensor of log-mel features, got {features.dtype}")
        check_device("audio_features", features, self.conv1.weight)
        if features.shape[0] == 0 or features.shape[-1] == 0:
            raise ValueError(f"audio_features: expected at least one row and one frame, got {tuple(features.shape)}")
