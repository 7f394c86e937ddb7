"""Audio → frame tokens: log-mel features (torchaudio) and two 1-D convolutions with GELU, as in Whisper.

Shape legend: B batch, S samples, M mel bins, Nf mel frames, N tokens = ceil(Nf / stride), D width.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmformer.config import AudioConfig, StackConfig
from mmformer.embedders.checks import check_device, check_lengths
from mmformer.io.weights import base_layer
from mmformer.layers.positions import AbsolutePositions

POWER_FLOOR = 1e-10  # the power spectrum is clamped to it before log10 (Whisper's)
DECADES = 8.0  # dynamic range: log-mel values are raised to at least the clip's peak minus this many decades
GROUP_FILL = 0.5  # a length group's shortest waveform is at least this share of its longest (see length_groups)
CONV_REACH = 2  # R: frames past its own the last token's convolutions read (conv1 reaches one frame, conv2 one output)


def centre_pad(audio: torch.Tensor, lengths: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Waveforms (B, S) of ``lengths`` samples (default: all S) → (B, S + 2 pad): each row reflected by ``pad``
    samples at its start and at its own end, zeros after — the centring of ``torch.stft(center=True,
    pad_mode="reflect")`` done per row, so that a waveform's STFT frames do not depend on the longer ones batched
    with it (the STFT's own centring reflects every row at the batch's end, where a shorter row has zeros).

    A row of at most ``pad`` samples (too short for the STFT alone) reads its first or last sample where a
    reflection would run out of it.
    """
    B, S = audio.shape
    device = audio.device
    n = torch.full((B, 1), S, device=device) if lengths is None else lengths.to(device)[:, None]  # (B, 1)
    j = torch.arange(pad, device=device)[None, :]  # (1, pad)
    # Only the 2 pad reflected samples of a row are gathered; its S samples are copied (index arithmetic over all
    # B (S + 2 pad) outputs cost a fifth of a training step at the digits recipe's lengths)
    start = audio.gather(1, torch.minimum(pad - j, n - 1))  # (B, pad): samples pad..1, reflected
    end = audio.gather(1, (n - 2 - j).clamp(min=0))  # (B, pad): samples n-2, n-3, ..., reflected at the row's end
    if lengths is not None:
        audio = audio.masked_fill(torch.arange(S, device=device)[None, :] >= n, 0.0)  # zeros past each length
    padded = torch.cat([start, audio, audio.new_zeros(B, pad)], dim=1)  # (B, S + 2 pad)
    return padded.scatter(1, n + pad + j, end)  # the end's reflection where the row's own samples stop


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """float32 as the default dtype inside: the features are computed in float32 (and cast to the convolutions'
    dtype after) even where the default is another, as Lightning's ``precision="bf16-true"`` sets it around every
    forward; a filter bank built in bfloat16 would lose its precision and meet the float32 spectrum in a matmul.
    Nothing is set where float32 is the default already (compiled and exported code sees no call)."""
    previous = torch.get_default_dtype()
    if previous == torch.float32:
        yield
        return
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class LogMel(nn.Module):
    """Whisper-style log-mel: power mel spectrogram (torchaudio; Slaney scale and norm), log10, an 8-decade dynamic
    range per utterance, scaled to roughly [-1, 1]. The STFT window and mel filters are derived from the config and
    computed where they are used, so the module holds no state.

    With ``AudioConfig.pad_to_seconds`` it computes exactly what Whisper's feature extractor does: each waveform is
    zero-padded (or cut) to that length, the frame past the end of the centred STFT is dropped (30 s → 3000
    frames) and the peak spans the whole window. Without it the features follow the waveform's own length and
    exclude the padding of a batch (mmformer's default, which the digits models were trained with).

    Every row's features within its frame count are those of the waveform alone, whatever it is batched with: the
    STFT's centring reflects each waveform at its own end (:func:`centre_pad`), not at the batch's.
    """

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.hop_length = cfg.hop_length

    def filters(self, device: torch.device) -> torch.Tensor:
        """(n_fft/2 + 1, M) float32 mel filter bank."""
        import torchaudio.functional as AF  # imported here so that `import mmformer` stays light

        cfg = self.cfg
        with float32_default():  # torchaudio builds it in the default dtype
            bank = AF.melscale_fbanks(
                cfg.n_fft // 2 + 1, 0.0, float(cfg.sample_rate // 2), cfg.n_mels, cfg.sample_rate, "slaney", "slaney"
            )
        return bank.to(device)

    def power_mel(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) float32 waveforms of ``lengths`` samples (default: all S) → (B, M, Nf) float32 power mel spectrogram
        (centred STFT, Hann window; each row centred at its own end, see :func:`centre_pad`)."""
        import torchaudio.functional as AF

        cfg = self.cfg
        window = torch.hann_window(cfg.n_fft, device=audio.device, dtype=torch.float32)
        padded = centre_pad(audio, lengths, cfg.n_fft // 2)  # (B, S + n_fft)
        spec = AF.spectrogram(padded, 0, window, cfg.n_fft, cfg.hop_length, cfg.n_fft, None, False, center=False)
        # |z|^2 as re^2 + im^2: the complex abs (a hypot, then squared) took twice as long
        parts = torch.view_as_real(spec)  # (B, n_fft/2 + 1, Nf, 2)
        power = parts[..., 0].square() + parts[..., 1].square()  # (B, n_fft/2 + 1, Nf)
        return torch.matmul(power.transpose(-1, -2), self.filters(audio.device)).transpose(-1, -2)  # (B, M, Nf)

    def frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Mel frames (centred STFT) of waveforms with these sample counts (all the window's with pad_to_seconds)."""
        if self.cfg.pad_to_seconds is not None:
            return torch.full_like(lengths, self.cfg.window_samples // self.hop_length)
        return lengths // self.hop_length + 1

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) waveforms → (B, M, Nf) log-mel. Padding frames are excluded from the per-utterance maximum (with
        pad_to_seconds: Whisper's fixed window, padding included)."""
        window = self.cfg.window_samples
        if window:  # Whisper: pad or cut to the window, drop the frame past its end, one peak over all of it
            if lengths is not None:  # Whisper's fixed window pads with zeros (centre_pad zeroes them without one)
                real_samples = torch.arange(audio.shape[-1], device=audio.device)[None, :] < lengths[:, None]  # (B, S)
                audio = audio.masked_fill(~real_samples, 0.0)
            audio = F.pad(audio[:, :window], (0, max(0, window - audio.shape[-1])))  # (B, window)
            mel = self.power_mel(audio.float())[..., :-1].clamp(min=POWER_FLOOR).log10()  # (B, M, window / hop)
            lengths = None
        else:
            mel = self.power_mel(audio.float(), lengths).clamp(min=POWER_FLOOR).log10()  # (B, M, Nf)
        if lengths is not None:
            real = torch.arange(mel.shape[-1], device=mel.device)[None, :] < self.frames(lengths)[:, None]
            peak = mel.masked_fill(~real[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)
        else:
            peak = mel.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(mel, peak - DECADES) + 4.0) / 4.0

    @staticmethod
    def silence(features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1) the level :meth:`forward` gives digital silence in each clip of log-mel ``features`` (B, M, Nf)
        with ``frames`` (B,) real frames: the clip's floor, DECADES below its peak (and never below the power
        floor's), read from its own frames only."""
        real = torch.arange(features.shape[-1], device=features.device)[None, :] < frames[:, None]  # (B, Nf)
        top = features.masked_fill(~real[:, None, :], float("-inf")).amax(dim=(1, 2), keepdim=True)  # (peak + 4) / 4
        lowest = (math.log10(POWER_FLOOR) + 4.0) / 4.0
        return (top - DECADES / 4.0).clamp(min=lowest)


class AudioEmbedder(nn.Module):
    """Waveforms or precomputed log-mel features → (B, N, D) tokens and a (B, N) padding mask. A clip's tokens are
    those it has alone, whatever it is batched with (:func:`centre_pad`, :meth:`convolve`)."""

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

    def convolve(self, features: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel (B, M, Nf) of clips of ``frames`` (B,) frames (default: all Nf) → the convolutions' output
        (B, D, N).

        Every clip is read as followed by silence, whatever it is batched with: its frames past its own length, and
        CONV_REACH more past the batch's end, are set to its silence level (:meth:`LogMel.silence`), so the kernels
        at its last frames read the same values alone and beside longer clips (whose padding frames they would
        otherwise read). Silence, rather than the convolutions' zero padding, is what a clip's end saw in padded
        training batches, and what Whisper's encoder reads after speech in its window. A fixed window
        (``pad_to_seconds``, Whisper) is read as it is, with the convolutions' zero padding at its end.
        """
        n_frames = features.shape[-1]
        if self.cfg.pad_to_seconds is None:
            if frames is None:
                frames = torch.full(features.shape[:1], n_frames, dtype=torch.long, device=features.device)
            silence = LogMel.silence(features, frames).to(features.dtype)  # (B, 1, 1)
            past = torch.arange(n_frames + CONV_REACH, device=features.device)[None, :] >= frames[:, None]  # (B, Nf+R)
            features = torch.where(past[:, None, :], silence, F.pad(features, (0, CONV_REACH)))  # (B, M, Nf + R)
        h = F.gelu(self.conv1(features))  # (B, D, Nf [+ R])
        if self.cfg.pad_to_seconds is None and type(self.conv2) is nn.Conv1d:
            # The strided convolution reads conv1's outputs 0..Nf: padded on the left only, it gives exactly
            # tokens_for_frames(Nf) tokens, the ones conv2's own padding would give, and nothing is sliced off (a
            # slice to a length computed from the frame count makes torch.export guard on that count).
            h = F.pad(h[..., : n_frames + 1], (1, 0))  # (B, D, Nf + 2)
            x = F.conv1d(h, self.conv2.weight, self.conv2.bias, stride=self.conv2.stride)  # (B, D, N)
        else:  # Whisper's window (conv2's padding gives N), or a conv2 that an adapter wraps
            x = self.conv2(h)[..., : self.tokens_for_frames(n_frames)]
        return F.gelu(x)

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
        groups = None
        if features is None:
            audio, lengths = self.check_waveforms(audio, lengths)
            # Whisper's fixed window: every frame is attended to, as Whisper's encoder does
            padded = self.cfg.pad_to_seconds is not None
            feature_lengths = None if lengths is None or padded else self.features.frames(lengths)
            groups = self.length_groups(audio, lengths)
            if groups is None:
                features = self.features(audio, lengths)
        else:
            self.check_features(features)
            if feature_lengths is not None:
                feature_lengths = check_lengths(
                    "feature_lengths",
                    feature_lengths,
                    features.shape[0],
                    features.shape[-1],
                    base_layer(self.conv1).weight,
                )
        if groups is None:
            self.check_frames(features.shape[-1], "audio" if audio is not None else "audio_features")
            x = self.convolve(features.to(base_layer(self.conv1).weight.dtype), feature_lengths)  # (B, D, N)
        else:
            x = self.convolve_groups(audio, lengths, feature_lengths, groups)  # (B, D, N)
        x = x.transpose(1, 2)  # (B, N, D)
        if self.positions is not None:
            x = self.positions(x)
        mask = None
        if feature_lengths is not None:
            n_tokens = self.tokens_for_frames(feature_lengths.to(x.device))
            mask = torch.arange(x.shape[1], device=x.device)[None, :] < n_tokens[:, None]  # (B, N)
        return x, mask

    def length_groups(self, audio: torch.Tensor, lengths: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Row indices of a CPU batch of waveforms in groups of similar lengths (longest first; a group's shortest
        row at least GROUP_FILL of its longest), or None when the batch is one group, is on an accelerator (where
        the padding costs little and a grouping would cost a host sync) or is being compiled, exported or traced (its
        shapes would depend on the data).

        The front end (STFT, log-mel, convolutions) otherwise works on every row padded to the longest: at the
        digits recipe's lengths (speech of 0.3-3 s, silence around half of it, a speechless clip of up to 8 s now and
        then) a quarter to a half of that work is real."""
        if (
            lengths is None
            or self.cfg.pad_to_seconds is not None
            or audio.device.type != "cpu"
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
            or torch.jit.is_tracing()
        ):
            return None
        order = torch.argsort(lengths, descending=True, stable=True)
        ordered = lengths[order].tolist()
        groups, first = [], 0
        for i in range(1, len(ordered) + 1):  # a new group where a row is shorter than GROUP_FILL of its group's first
            if i == len(ordered) or ordered[i] < GROUP_FILL * ordered[first]:
                groups.append(order[first:i])
                first = i
        return groups if len(groups) > 1 else None

    def convolve_groups(
        self, audio: torch.Tensor, lengths: torch.Tensor, frames: torch.Tensor, groups: list[torch.Tensor]
    ) -> torch.Tensor:
        """:meth:`convolve` of the log-mel of waveforms (B, S) with ``lengths`` samples and ``frames`` mel frames (B,),
        one length group at a time, each cut to its longest row → (B, D, N). Every clip's output is the one it has
        alone (:func:`centre_pad`, :meth:`convolve`), so the groups' rows, put back in the batch's order and padded
        with zeros to the whole batch's token count N, are the whole batch's (up to float rounding of other shapes)."""
        n_frames = int(self.features.frames(lengths.new_tensor(audio.shape[-1])))  # the whole padded batch's
        self.check_frames(n_frames, "audio")
        n_tokens = self.tokens_for_frames(n_frames)
        parts = []
        for rows in groups:
            n = lengths[rows]
            features = self.features(audio[rows, : int(n.max())], n)  # (b, M, Nf_g)
            parts.append(self.convolve(features.to(base_layer(self.conv1).weight.dtype), frames[rows]))  # (b, D, N_g)
        x = torch.cat([F.pad(p, (0, n_tokens - p.shape[-1])) for p in parts])  # (B, D, N), in group order
        return x[torch.argsort(torch.cat(groups))]  # in the batch's order

    def check_frames(self, n_frames: int, name: str) -> None:
        """Refuse more mel frames than the position table holds tokens for."""
        if self.positions is not None and self.tokens_for_frames(n_frames) > self.positions.length:
            raise ValueError(
                f"{name}: expected at most {self.cfg.max_frames} mel frames (AudioConfig.max_frames, the position "
                f"table), got {n_frames}; pass shorter audio or build the model with a larger max_frames"
            )

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
        check_device("audio", audio, base_layer(self.conv1).weight)
        if audio.shape[0] == 0:
            raise ValueError(f"audio: expected at least one waveform, got shape {tuple(audio.shape)}")
        # any length of at least one sample: a row shorter than the STFT's centring reads its own first or last
        # sample where a reflection runs out (centre_pad), alone as in a batch of longer rows
        if audio.shape[1] == 0:
            raise ValueError(f"audio: expected at least one sample per waveform, got shape {tuple(audio.shape)}")
        if lengths is not None:
            lengths = check_lengths(
                "audio_lengths", lengths, audio.shape[0], audio.shape[1], base_layer(self.conv1).weight
            )
        return audio, lengths

    def check_features(self, features: torch.Tensor) -> None:
        if not isinstance(features, torch.Tensor) or features.ndim != 3 or features.shape[1] != self.cfg.n_mels:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"audio_features: expected log-mel (B, {self.cfg.n_mels}, frames), got {shape}")
        if not features.is_floating_point():
            raise TypeError(f"audio_features: expected a float tensor of log-mel features, got {features.dtype}")
        check_device("audio_features", features, base_layer(self.conv1).weight)
        if features.shape[0] == 0 or features.shape[-1] == 0:
            raise ValueError(f"audio_features: expected at least one row and one frame, got {tuple(features.shape)}")
