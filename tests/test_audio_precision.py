"""The audio front end under ``--trainer.precision bf16-true``: Lightning casts the module to bfloat16 and makes
bfloat16 the default dtype around every forward; the log-mel features are still computed in float32 (the same as
in a float32 run of the same waveforms) and cast to the convolutions' dtype after."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import HalfPrecision

from mmformer.embedders.audio import LogMel


def test_log_mel_is_float32_and_the_audio_tokens_bf16_under_bf16_true(tiny_model):
    plugin = HalfPrecision("bf16-true")  # what Lightning's trainer applies for precision="bf16-true"
    model = plugin.convert_module(tiny_model)
    generator = torch.Generator().manual_seed(0)
    audio = plugin.convert_input(0.1 * torch.randn(2, 1600, generator=generator))  # inputs cast to bf16 too
    lengths = torch.tensor([1600, 700])  # two length groups: each row's features alone
    reference = LogMel(model.config.audio)(audio.float(), lengths)  # float32 default dtype
    with plugin.forward_context():
        assert torch.get_default_dtype() == torch.bfloat16
        features = model.audio_embed.features(audio.float(), lengths)
        tokens = model.encode_audio(audio, lengths)
    assert features.dtype == torch.float32 and torch.equal(features, reference)
    assert tokens.dtype == torch.bfloat16 and tokens.isfinite().all()
    assert torch.get_default_dtype() == torch.float32  # restored after the forward
