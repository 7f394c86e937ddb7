"""Settings that a run would silently ignore, or train into a layout its model never reads, are refused when the task
is built: a teacher for objectives distillation does not cover, a learned decoder prefix with the lm objective, and
teacher-forced captions / transcripts for a decoder that reads a checkpoint's prompt first (Whisper)."""

from __future__ import annotations

import pytest
import torch

from mmformer.adapt.prompts import DecoderPrefix
from mmformer.config import GenerationConfig, ModelConfig, StackConfig, TextConfig
from mmformer.model import MultimodalTransformer
from mmformer.tasks.distill import part_weights
from mmformer.tasks.losses import check_teacher_forcing
from mmformer.tasks.settings import DistillSettings, ObjectiveSettings
from mmformer.tasks.text_objectives import TextObjectives


def test_a_teacher_for_a_language_model_only_is_refused():
    """A GPT-2 run with distill.teacher trained the same weights as without one (max diff 0.0): nothing distils lm."""
    lm_only = ObjectiveSettings(contrastive=0.0, caption=0.0, speech=0.0, lm=1.0).part_weights()
    with pytest.raises(ValueError, match=r"distill\.teacher: .* does not distil \(objectives\.lm / mlm\)"):
        part_weights(lm_only, DistillSettings(teacher="teacher"))
    mixed = part_weights(ObjectiveSettings(lm=1.0).part_weights(), DistillSettings(teacher="teacher"))
    assert mixed["distill_caption"] > 0  # a run that also captions distils its captions


def decoder_only() -> MultimodalTransformer:
    torch.manual_seed(0)
    text = TextConfig(vocab_size=40, max_length=16)
    stack = StackConfig(width=16, depth=1, n_heads=2)
    return MultimodalTransformer(
        ModelConfig(stacks={"s": stack}, routes={"decoder": "s"}, image=None, audio=None, text=text, embed_dim=None)
    )


def test_a_decoder_prefix_with_the_lm_objective_is_refused():
    """lm's decode reads no prefix: training crashed deep in autograd (no tensor required grad)."""
    model = decoder_only()
    with pytest.raises(ValueError, match=r"decoder_prefix trains with the caption / speech objectives"):
        TextObjectives(lm=True, mlm=False).check(model, DecoderPrefix(3, 16))
    TextObjectives(lm=True, mlm=False).check(model)  # without a prefix: fine


def test_teacher_forcing_refuses_a_decoder_that_reads_a_checkpoints_prompt():
    """A converted Whisper's decoder starts from <|startoftranscript|><|en|><|transcribe|><|notimestamps|>; teacher
    forcing trains [bos] text [eos] rows: fine-tuned, it never said a text's first word nor stopped."""
    whisper = ModelConfig(generation=GenerationConfig(language_ids={"en": 50}, task_ids={"transcribe": 51}))
    with pytest.raises(ValueError, match=r"fine-tuning a Whisper checkpoint is not supported"):
        check_teacher_forcing(whisper)
    check_teacher_forcing(ModelConfig())  # a decoder that starts from bos
    check_teacher_forcing(ModelConfig(generation=GenerationConfig(suppress_tokens=[5])))  # rules, but no prompt


def test_caption_and_speech_are_refused_for_a_decoder_without_cross_attention(make_model_config):
    """Its decode drops the image / audio tokens: the objectives trained a language model of the texts alone, and
    caption() gave two different images the same ids."""
    from mmformer.tasks import MultimodalTask

    no_cross = make_model_config(stack={"cross_attention": False}, audio=None)
    with pytest.raises(ValueError, match=r"objectives\.caption=1\.0: .*model\.stacks\.shared\.cross_attention: false"):
        MultimodalTask(no_cross)  # the default weights; speech is not named: the model has no audio route
    MultimodalTask(no_cross, objectives=ObjectiveSettings(caption=0.0))  # contrastive only: fine
    MultimodalTask(make_model_config(audio=None))  # a decoder that cross-attends: fine
