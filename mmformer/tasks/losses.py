"""Training losses: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss (both gathering features across ranks with
gradients), teacher-forced cross-entropy for the decoder and CTC for the optional speech head.

Every loss runs in float32 with autocast switched off, whatever the training precision.

Distributed gradients. With ``gather_with_grad=True`` every rank all-gathers the features of every rank through
``torch.distributed.nn.functional.all_gather``, whose backward *sums* the gradients of all ranks into each rank's
local features. Each rank then holds ``W * dL/dx_r`` for its own features x_r (W ranks, L the loss of the whole
global batch: every rank computes the same L, or with ``local_loss=True`` its share L_r with mean_r L_r = L), and
DDP *averages* parameter gradients over the W ranks, so the update is exactly ``dL/dθ`` — the gradient of one
process on the concatenated batch. Nothing is rescaled, as in open_clip; ``tests/test_losses.py`` checks this to
1e-5. (``gather_with_grad=False`` keeps only the local gradient, which DDP's averaging then divides by W; the
logit scale still gets the full gradient. Use it only if you accept that.)

Shape legend: B local batch, N global batch (all ranks), E embedding size, T text tokens, V vocabulary,
Nt audio tokens.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmformer.generation.decoding_rules import reads_memory
from mmformer.layers.documents import Documents

MAX_LOGIT_SCALE = 100.0  # CLIP clamps the temperature so that logits stay in a trainable range
IGNORE_INDEX = -100


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: torch.Tensor, gather_with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """All-gather (B_r, E) features from every rank → ((N, E) in rank order, offset of this rank's rows).

    Ranks may hold different batch sizes (a data loader that drops bad samples): rows are padded to the largest
    batch for the collective and cut back afterwards, which keeps the gradient path intact.
    """
    rank, world = _world()
    if world == 1:
        return x, 0
    sizes = torch.tensor([x.shape[0]], device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    sizes = [int(s) for s in all_sizes]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))  # (B_max, E)
    if gather_with_grad:
        with warnings.catch_warnings():  # torch 2.14 deprecates it for a private API; it is still the public one
            warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
            chunks = list(torch.distributed.nn.functional.all_gather(padded))
    else:
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.detach())
        chunks[rank] = padded  # the local rows keep their gradient, as open_clip does
    gathered = torch.cat([c[:n] for c, n in zip(chunks, sizes)])  # (N, E)
    return gathered, sum(sizes[:rank])


def _rows_per_rank(n_global: int, local_loss: bool) -> float:
    """The loss normaliser: N for the global loss; N / W for a rank's local share, so that the mean of the shares
    (the value DDP's gradient averaging optimises) is the global loss even when ranks hold unequal batches. With
    equal batches N / W is the local batch size, as in open_clip."""
    return n_global / _world()[1] if local_loss else n_global


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]}: expected two (B, E) feature tensors of equal shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


class _PairLoss(nn.Module, metaclass=abc.ABCMeta):
    """What both contrastive losses share: the arguments (see :class:`ContrastiveLoss`), the input check, float32
    without autocast, the clamped logit scale and the all-gather; a subclass scores the gathered pairs in
    :meth:`_loss`."""

    def __init__(self, gather_with_grad: bool = True, local_loss: bool = False):
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss of row i of ``a`` matching row i of ``b`` (both (B, E)); ``logit_scale`` is already exponentiated."""
        _check_pair(a, b, ("a", "b"))
        with torch.autocast(a.device.type, enabled=False):
            a, b = a.float(), b.float()
            scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE)
            all_a, offset = gather_features(a, self.gather_with_grad)  # (N, E), this rank's first row in it
            all_b, _ = gather_features(b, self.gather_with_grad)
            return self._loss(a, b, all_a, all_b, offset, scale, logit_bias)

    @abc.abstractmethod
    def _loss(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        all_a: torch.Tensor,
        all_b: torch.Tensor,
        offset: int,
        scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """The loss of float32 local (B, E) and gathered (N, E) features; this rank's rows start at ``offset``."""


class ContrastiveLoss(_PairLoss):
    """CLIP's symmetric InfoNCE between two L2-normalised feature sets, optionally across ranks.

    ``logit_bias`` is accepted (and ignored) so that both contrastive losses share one call signature.

    Args:
        gather_with_grad: all-gather features with gradients (exact distributed gradients; see the module doc).
        local_loss: score only this rank's rows against every rank's columns (open_clip's ``local_loss``): less
            compute, the same averaged gradient; the value on one rank is then its share (the mean of the shares
            over ranks is the global loss).
    """

    def _loss(self, a, b, all_a, all_b, offset, scale, logit_bias):
        if self.local_loss:
            logits_a = scale * a @ all_b.T  # (B, N)
            logits_b = scale * b @ all_a.T  # (B, N)
            labels = torch.arange(a.shape[0], device=a.device) + offset
        else:
            logits_a = scale * all_a @ all_b.T  # (N, N)
            logits_b = logits_a.T
            labels = torch.arange(all_a.shape[0], device=a.device)
        total = F.cross_entropy(logits_a, labels, reduction="sum") + F.cross_entropy(logits_b, labels, reduction="sum")
        return total / (2 * _rows_per_rank(all_a.shape[0], self.local_loss))


class SigLipLoss(_PairLoss):
    """SigLIP's pairwise sigmoid loss: every (i, j) pair is a binary match / no-match decision.

    ``loss = -sum_ij log sigmoid(z_ij * (scale * a_i·b_j + bias)) / rows`` with z = +1 on matching pairs and -1
    elsewhere; ``logit_bias`` None means 0 (SigLIP starts it at -10). Across ranks the features are simply
    all-gathered with gradients (no ring exchange).

    Args:
        gather_with_grad: as :class:`ContrastiveLoss`.
        local_loss: as :class:`ContrastiveLoss`: this rank's rows against every rank's columns.
    """

    def _loss(self, a, b, all_a, all_b, offset, scale, logit_bias):
        rows, row_offset = (a, offset) if self.local_loss else (all_a, 0)
        logits = scale * rows @ all_b.T  # (rows, N)
        if logit_bias is not None:
            logits = logits + logit_bias.float()
        labels = -torch.ones_like(logits)
        index = torch.arange(rows.shape[0], device=a.device)
        labels[index, index + row_offset] = 1.0
        return -F.logsigmoid(labels * logits).sum() / _rows_per_rank(all_a.shape[0], self.local_loss)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not ``ignore_index``, in float32.

    Args:
        logits: (B, T, V) decoder logits (any dtype; upcast here).
        targets: (B, T) next-token ids, ``ignore_index`` at padding.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(
            f"targets: expected shape {tuple(logits.shape[:2])} to match logits (B, T, V) = {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def check_teacher_forcing(config: Any) -> None:
    """Refuse a model whose decoding starts from a checkpoint's multi-token prompt (Whisper's start, language, task and
    no-timestamps tokens: ``config.generation``): :func:`teacher_forcing` trains ``[bos] tokens [eos]`` rows, a layout
    such a decoder never reads — a fine-tuned converted Whisper then never said a text's first word nor stopped."""
    generation = getattr(config, "generation", None)
    if generation is not None and (generation.language_ids or generation.task_ids or generation.no_timestamps_id):
        raise ValueError(
            "objectives.caption / objectives.speech: this model decodes after its checkpoint's prompt (Whisper's "
            "start, language, task and no-timestamps tokens), which the caption / speech objectives do not build "
            "yet; fine-tuning a Whisper checkpoint is not supported (README, 'Not done yet')"
        )


# the decoder objectives and the encoder route each decodes from
DECODER_OBJECTIVES = {"caption": "image", "speech": "audio"}


def check_decoder_objectives(config: Any, objectives: Any) -> None:
    """Refuse caption / speech weights (of ``objectives``, the task's ObjectiveSettings) for a model with that
    encoder whose decoder reads no memory (:func:`~mmformer.generation.decoding_rules.reads_memory`: its stack has no
    cross-attention): its decode dropped the image / audio tokens, so the objective trained a language model of the
    texts alone, and caption() / transcribe() then gave every input the same tokens."""
    trained = [f"objectives.{name}={getattr(objectives, name)}" for name, route in DECODER_OBJECTIVES.items()
               if getattr(objectives, name) > 0 and route in config.routes]  # fmt: skip
    if not trained or "decoder" not in config.routes or reads_memory(config):
        return
    decoder = config.routes["decoder"]
    raise ValueError(
        f"{' and '.join(trained)}: these objectives decode text from the image / audio tokens, but the decoder's "
        f"stack has no cross-attention to read them (model.stacks.{decoder}.cross_attention: false); set "
        f"model.stacks.{decoder}.cross_attention: true, or set objectives.caption / objectives.speech to 0"
    )


def teacher_forcing(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``[bos] tokens [eos] pad…`` rows → decoder inputs ids[:, :-1], their mask, and targets ids[:, 1:] with
    padding set to ``IGNORE_INDEX`` (by the mask, since a pad id may also be a real token, as in CLIP)."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids: expected (B, T) with T >= 2 (bos + at least eos), got {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    targets = input_ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return input_ids[:, :-1], mask[:, :-1], targets


def cut_to_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions: int, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[bos] tokens [eos] pad…`` rows (B, T) cut to ``positions`` tokens, a cut row ending in eos as the collator's
    truncation ends one: the text positions a learned decoder prefix leaves its captions (its vectors take the
    first ones; captions cut to the whole table stopped training part-way at the position table's check)."""
    if input_ids.shape[1] <= positions:
        return input_ids, attention_mask
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    cut = mask[:, positions:].any(dim=1)  # (B,): rows that ran past the limit
    ids = input_ids[:, :positions].clone()
    ids[cut, -1] = eos_id
    return ids, mask[:, :positions]


def document_targets(input_ids: torch.Tensor, documents: Documents) -> torch.Tensor:
    """Teacher-forcing targets of a packed batch (R, T) of ``[bos] tokens [eos]`` documents: each token's target is
    the next token of its document, and each document's last token has none (``IGNORE_INDEX``). The decoder reads
    the packed ids as they are; the targets are those of :func:`teacher_forcing` on the padded rows."""
    targets = input_ids.flatten().roll(-1).index_fill(0, documents.offsets[1:] - 1, IGNORE_INDEX)
    return targets.view_as(input_ids)


def ctc_loss(
    logits: torch.Tensor,
    token_mask: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    blank: int,
    special_ids: tuple[int | None, ...] = (),
) -> torch.Tensor:
    """CTC between per-token audio logits and the transcript ids (bos/eos and padding removed), in float32.

    Args:
        logits: (B, Nt, V) CTC head outputs over the audio tokens.
        token_mask: (B, Nt) True at real audio tokens (None: all real); gives the input lengths.
        input_ids: (B, T) tokenised transcripts ``[bos] tokens [eos] pad…``.
        attention_mask: (B, T) True at real tokens.
        blank: the blank label; mmformer uses the pad id, which is never a transcript token.
        special_ids: ids dropped from the targets (bos, eos).

    Samples whose transcript cannot be aligned (more labels than audio tokens) contribute 0 (``zero_infinity``)
    rather than an infinite loss. The loss is averaged over the batch after dividing by target lengths (PyTorch's
    ``reduction="mean"``).
    """
    B, N = logits.shape[:2]
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    keep = mask & (input_ids != blank)
    for special in special_ids:
        if special is not None:
            keep &= input_ids != special
    target_lengths = keep.sum(dim=1)
    targets = input_ids[keep]  # (sum of target lengths,), concatenated in batch order
    input_lengths = (
        torch.full((B,), N, dtype=torch.long, device=logits.device) if token_mask is None else token_mask.sum(dim=1)
    )
    with torch.autocast(logits.device.type, enabled=False):
        log_probs = logits.float().log_softmax(dim=-1).transpose(0, 1)  # (Nt, B, V)
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=blank, zero_infinity=True)


def distill_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` per
    distribution, averaged over the positions ``mask`` keeps, in float32 (float64 for float64 logits).

    The T² factor keeps the gradient's size independent of the temperature, so that ``distill.weight`` means the
    same at every T.

    Args:
        student_logits: (..., V) logits; each row over the last dimension is one distribution.
        teacher_logits: (..., V) the teacher's logits for the same positions (no gradient flows into them).
        temperature: T > 0; larger values soften both distributions.
        mask: (...) bool, True where a position counts (decoder targets that are not padding); None: all.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits: expected the student's shape {tuple(student_logits.shape)}, got "
            f"{tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float32, or float64 for float64 logits
    with torch.autocast(student_logits.device.type, enabled=False):
        log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # (...)
        if mask is not None:
            if mask.shape != kl.shape:
                raise ValueError(f"mask: expected shape {tuple(kl.shape)} (the logits' leading dims), got "
                                 f"{tuple(mask.shape)}")  # fmt: skip
            kl = kl[mask.bool()]
        return kl.mean() * temperature**2 if kl.numel() else kl.sum()


def contrastive_distill(
    student: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """Contrastive-logit distillation: the student's similarity rows (media → texts) and columns (text → media)
    against the teacher's, each a distribution over the batch, through :func:`distill_kl`; the mean of both
    directions.

    Args:
        student: (media (B, E), text (B, E), logit scale) of the student: L2-normalised features and the
            exponentiated scale.
        teacher: the same for the teacher (its E may differ: only the (B, B) similarities are compared).
    """
    rows = []
    for a, b, scale in (student, teacher):
        _check_pair(a, b, ("media features", "text features"))
        with torch.autocast(a.device.type, enabled=False):
            rows.append(scale.float().clamp(max=MAX_LOGIT_SCALE) * a.float() @ b.float().T)  # (B, B)
    s, t = rows
    if s.shape != t.shape:
        raise ValueError(f"teacher: expected features for the student's batch {tuple(s.shape)}, got {tuple(t.shape)}")
    return 0.5 * (distill_kl(s, t, temperature) + distill_kl(s.T, t.T, temperature))
