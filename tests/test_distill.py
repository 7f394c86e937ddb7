"""Distillation: the KL and contrastive-logit losses against float64 formulas, a frozen teacher of another size that
gets no gradient and never reaches the student's checkpoint, and clear errors for a teacher with another vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from test_task import Digits, DigitsData, make_task, tiny_config, tokenizer, trainer

from mmformer.config import ModelConfig, StackConfig
from mmformer.data.collate import Collator
from mmformer.model import MultimodalTransformer
from mmformer.tasks.losses import contrastive_distill, distill_kl

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, T: float, mask: torch.Tensor | None) -> torch.Tensor:
    """T² · Σ_v p_t (log p_t − log p_s), averaged over the kept positions, in float64."""
    s, t = student.double() / T, teacher.double() / T
    p_t = t.exp() / t.exp().sum(-1, keepdim=True)
    log_p_s = s - s.exp().sum(-1, keepdim=True).log()
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return T**2 * kl.mean()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_distillation_equals_the_float64_formula_with_t_squared(T):
    student, teacher = torch.randn(3, 5, 11) * 3, torch.randn(3, 5, 11) * 3
    mask = torch.rand(3, 5) > 0.3
    for m in (None, mask):
        expected = reference_kl(student, teacher, T, m)
        assert float((distill_kl(student.double(), teacher.double(), T, m) - expected).abs()) < 1e-6
        assert float((distill_kl(student, teacher, T, m).double() - expected).abs()) < 1e-6 * float(expected)  # fp32
    assert float(distill_kl(teacher, teacher, T)) == pytest.approx(0.0, abs=1e-6)


def contrastive_distill_error(seed: int) -> tuple[float, float]:
    """(|float32 result − float64 formula|, |formula|) of :func:`contrastive_distill` on random seeded features: the
    similarity rows and columns of student (E 4, scale 10) and teacher (E 9, scale 20), KL at T = 2 in float64."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda e: torch.nn.functional.normalize(torch.randn(6, e, generator=g), dim=-1)  # noqa: E731
    a_s, b_s, a_t, b_t = unit(4), unit(4), unit(9), unit(9)
    scale_s, scale_t = torch.tensor(10.0), torch.tensor(20.0)
    rows_s = scale_s.double() * a_s.double() @ b_s.double().T  # (B, B), from the same float32 inputs
    rows_t = scale_t.double() * a_t.double() @ b_t.double().T
    expected = 0.5 * (reference_kl(rows_s, rows_t, 2.0, None) + reference_kl(rows_s.T, rows_t.T, 2.0, None))
    got = contrastive_distill((a_s, b_s, scale_s), (a_t, b_t, scale_t), 2.0)
    return float((got.double() - expected).abs()), float(expected.abs())


# float32 rounds the (B, B) logits (up to 20) to ~1e-6 and the loss (~10) to ~1e-6, by a CPU's summation order
CONTRASTIVE_RTOL = 1e-5


@pytest.mark.parametrize("seed", range(8))
def test_contrastive_distillation_compares_similarity_rows_and_columns(seed):
    error, magnitude = contrastive_distill_error(seed)
    assert magnitude > 1.0 and error <= CONTRASTIVE_RTOL * magnitude


def teacher_model(**stack) -> MultimodalTransformer:
    """A teacher twice as wide and one block deeper than :func:`test_task.tiny_config`'s student."""
    torch.manual_seed(1)
    config = tiny_config(tokenizer().vocab_size)
    stacks = {"shared": StackConfig(**{**vars(config.stacks["shared"]), "width": 64, "depth": 3, **stack})}
    config = ModelConfig(**{**vars(config), "stacks": stacks, "embed_dim": 24})
    return MultimodalTransformer(config).eval()


def test_teacher_is_frozen_gets_no_gradient_and_is_not_saved(tmp_path):
    teacher = teacher_model()
    teacher.save_pretrained(tmp_path / "teacher")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = make_task(distill=dict(teacher=str(tmp_path / "teacher"), feature_weight=1.0), objectives=dict(ctc=0.3))

    batch = Collator(tokenizer())([Digits()[i] for i in range(4)])
    parts, _ = task._losses(batch)
    expected = {"contrastive_image", "contrastive_audio", "caption", "speech", "ctc"}
    distilled = {"distill_caption", "distill_speech", "distill_contrastive_image", "distill_contrastive_audio"}
    features = {"distill_feature_image", "distill_feature_audio", "distill_feature_text"}
    assert set(parts) == expected | distilled | features
    sum(task.weights[k] * v for k, v in parts.items()).backward()
    loaded = task.distiller.teacher
    assert all(p.grad is None and not p.requires_grad for p in loaded.parameters())
    assert not loaded.training
    # every student parameter and the feature projections (24-d teacher vs 16-d student) do get gradients
    assert [n for n, p in task.named_parameters() if p.grad is None] == []

    t = trainer(max_steps=2, enable_checkpointing=False)
    t.fit(task, DigitsData())
    assert not loaded.training  # task.train() does not reach it
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())
    assert all(t.callback_metrics[f"train/{k}"] >= 0 for k in distilled | features)

    path = tmp_path / "student.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    assert not any("teacher" in k for k in state), sorted(state)
    assert {k.split(".")[0] for k in state} == {"model", "distiller"}  # the projections, not the teacher
    n_saved = sum(v.numel() for k, v in state.items() if k.startswith("model."))
    assert n_saved == sum(v.numel() for v in task.model.state_dict().values())
    assert "teacher" not in ckpt["hyper_parameters"]["distill"]


def test_a_teacher_with_another_vocabulary_is_a_clear_error():
    teacher = teacher_model()
    config = ModelConfig(**{**vars(teacher.config), "text": {**vars(teacher.config.text), "vocab_size": 77}})
    other = MultimodalTransformer(config)
    with pytest.raises(ValueError, match=r"teacher: its vocabulary has 77 tokens, the student's \d+"):
        make_task(distill=dict(teacher=other))
    with pytest.raises(ValueError, match="distill.temperature: expected a number > 0"):
        make_task(distill=dict(teacher=teacher, temperature=0.0))
    with pytest.raises(ValueError, match=r"distill.weight: expected a number in \[0, 1\]"):
        make_task(distill=dict(teacher=teacher, weight=-1.0))
    with pytest.raises(ValueError, match=r"distill.weight: expected a number in \[0, 1\]"):
        make_task(distill=dict(teacher=teacher, weight=1.5))
    packed = {"input_ids": torch.ones(1, 6, dtype=torch.long), "text_lengths": torch.tensor([3, 3])}
    with pytest.raises(ValueError, match="teacher: distillation reads padded batches; this one is packed"):
        make_task(distill=dict(teacher=teacher)).distiller(packed, {}, {}, torch.tensor(10.0))


def test_distill_weight_mixes_labels_and_teacher_at_each_terms_weight():
    task = make_task(distill=dict(teacher=teacher_model(), weight=0.25), objectives=dict(caption=2.0, ctc=0.3))
    w = task.weights
    assert (w["caption"], w["distill_caption"]) == (1.5, 0.5)
    assert (w["speech"], w["distill_speech"]) == (0.75, 0.25)
    assert (w["contrastive_image"], w["distill_contrastive_image"]) == (0.75, 0.25)
    assert w["ctc"] == 0.3 and w["distill_feature_image"] == 0.0


def test_log_mel_batches_from_specaugment_are_distilled_when_the_teacher_reads_them():
    task = make_task(distill=dict(teacher=teacher_model()), objectives=dict(contrastive=0.0, caption=0.0))
    batch = Collator(tokenizer())([Digits(modalities=("audio",))[i] for i in range(4)])
    features = task.model.audio_embed.features
    batch["audio_features"] = features(batch["audio"], batch["audio_lengths"])
    batch["feature_lengths"] = features.frames(batch.pop("audio_lengths"))
    del batch["audio"]
    parts, _ = task._losses(batch)
    assert {"speech", "distill_speech"} <= set(parts)

    other = teacher_model()
    config = ModelConfig(**{**vars(other.config), "audio": {**vars(other.config.audio), "n_mels": 8}})
    task = make_task(distill=dict(teacher=MultimodalTransformer(config)), objectives=dict(contrastive=0.0, caption=0.0))
    with pytest.raises(
        ValueError, match=r"teacher: the batch holds the student's log-mel features .*'n_mels': \(8, 16\)"
    ):
        task._losses(batch)
