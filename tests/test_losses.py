"""Losses: float64 references on one process, and exact equality of a 2-process gloo DDP run with one process on
the concatenated batch (loss, parameter and feature gradients).

The same check through Lightning (``ddp_spawn``, MultimodalTask, weights after a step) is in ``test_task.py``. This
file imports only torch and ``mmformer.tasks.losses``, so that its spawned processes start quickly.
"""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mmformer.tasks.losses import ContrastiveLoss, SigLipLoss, caption_loss, ctc_loss, teacher_forcing

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

TOL = 1e-5


def features(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    b = F.normalize(a + 0.5 * torch.randn(n, dim, generator=g), dim=-1)
    return a, b


# ---------------------------------------------------------------------- float64 references, one process
def reference_clip(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    logits = min(scale, 100.0) * a.double() @ b.double().T
    row = (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()
    col = (torch.logsumexp(logits, dim=0) - logits.diagonal()).mean()
    return (row + col) / 2


def reference_siglip(a: torch.Tensor, b: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    logits = scale * a.double() @ b.double().T + bias
    z = 2 * torch.eye(len(a), dtype=torch.float64) - 1
    return torch.log1p(torch.exp(-z * logits)).sum() / len(a)  # -log sigmoid(x) = log(1 + e^-x)


def grads_of(loss_fn, a: torch.Tensor, b: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = loss_fn(a, b, *args)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.parametrize("scale", [1.0, 14.3, 250.0])
@pytest.mark.parametrize("local_loss", [False, True])
def test_contrastive_loss_matches_float64_reference(scale, local_loss):
    a, b = features(12)
    loss, ga, gb = grads_of(ContrastiveLoss(local_loss=local_loss), a, b, torch.tensor(scale))
    ref, ra, rb = grads_of(lambda x, y: reference_clip(x, y, scale), a.double(), b.double())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-6)


def test_siglip_loss_matches_float64_reference():
    a, b = features(10, seed=1)
    loss, ga, gb = grads_of(SigLipLoss(), a, b, torch.tensor(10.0), torch.tensor(-3.0))
    ref, ra, rb = grads_of(lambda x, y: reference_siglip(x, y, 10.0, -3.0), a.double(), b.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga.double(), ra, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-6)


def test_losses_stay_float32_under_bf16_autocast():
    a, b = features(16, dim=32, seed=2)
    a16, b16 = a.bfloat16(), b.bfloat16()
    scale = torch.tensor(30.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clip = ContrastiveLoss()(a16, b16, scale)
        sig = SigLipLoss()(a16, b16, scale, torch.tensor(-5.0))
    assert clip.dtype == sig.dtype == torch.float32
    # the reference on the same (bf16-rounded) features: only float32 rounding separates them
    torch.testing.assert_close(clip.double(), reference_clip(a16.float(), b16.float(), 30.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        sig.double(), reference_siglip(a16.float(), b16.float(), 30.0, -5.0), rtol=1e-6, atol=1e-6
    )


def test_contrastive_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(3, 8\)"):
        ContrastiveLoss()(torch.zeros(4, 8), torch.zeros(3, 8), torch.tensor(1.0))


def test_caption_loss_ignores_padding_by_the_mask():
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 0, 8, 9, 2]])  # id 0 is also a real token in row 1 (as CLIP's "!")
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    inputs, input_mask, targets = teacher_forcing(ids, mask)
    assert inputs.tolist() == ids[:, :-1].tolist() and input_mask.tolist() == mask[:, :-1].tolist()
    logits = torch.randn(2, 5, 12, generator=g).bfloat16()
    loss = caption_loss(logits, targets)
    real = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]  # (row, position) of real targets
    lp = logits.double().log_softmax(-1)
    ref = -torch.stack([lp[r, t, ids[r, t + 1]] for r, t in real]).mean()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)


def test_ctc_loss_uses_pad_as_blank_and_strips_bos_eos():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 9, 12, generator=g)
    token_mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    ids = torch.tensor([[1, 5, 6, 6, 2], [1, 7, 2, 0, 0]])  # bos=1, eos=2, pad=0
    loss = ctc_loss(logits, token_mask, ids, ids != 0, blank=0, special_ids=(1, 2))
    lp = logits.double().log_softmax(-1).transpose(0, 1)
    ref = F.ctc_loss(lp, torch.tensor([5, 6, 6, 7]), torch.tensor([9, 6]), torch.tensor([3, 1]), blank=0)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- 2-process gloo, raw DDP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Towers(nn.Module):
    """Two linear towers, a log logit scale and (for SigLIP) a logit bias: the smallest contrastive model."""

    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(5, 8)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.normalize(self.a(x), dim=-1), F.normalize(self.b(y), dim=-1), self.logit_scale.exp(), self.logit_bias


LOSSES = {
    "clip": lambda: ContrastiveLoss(),
    "clip_local": lambda: ContrastiveLoss(local_loss=True),
    "siglip": lambda: SigLipLoss(),
    "siglip_local": lambda: SigLipLoss(local_loss=True),
}
SIZES = (3, 5)  # unequal per-rank batches (a loader that dropped bad samples)


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)


def run_losses(x: torch.Tensor, y: torch.Tensor, ddp: bool) -> dict[str, dict]:
    """Loss, parameter gradients and feature gradients of each loss on this process's rows."""
    out = {}
    for name, make in LOSSES.items():
        towers = Towers(bias=name.startswith("siglip"))
        model = nn.parallel.DistributedDataParallel(towers) if ddp else towers  # DDP averages parameter gradients
        fa, fb, scale, bias = model(x, y)
        fa.retain_grad()
        fb.retain_grad()
        loss = make()(fa, fb, scale, bias)
        loss.backward()
        out[name] = {
            "loss": loss.detach(),
            "params": {n: p.grad.clone() for n, p in towers.named_parameters()},
            "features": (fa.grad.clone(), fb.grad.clone()),
        }
    return out


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = inputs(sum(SIZES))
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        torch.save(run_losses(x[rows], y[rows], ddp=True), f"{out}/rank{rank}.pt")
        # both ranks done before either tears down: rank 0 hosts the TCP store, and a rank 1 still tearing down when
        # rank 0 had exited aborted ("terminate called without an active exception": once in a fresh-clone `make test`)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_gloo_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, y = inputs(sum(SIZES))
    ref = run_losses(x, y, ddp=False)
    for name in LOSSES:
        losses = torch.stack([ranks[r][name]["loss"] for r in range(2)])
        if name.endswith("local"):  # each rank holds its share; their mean is the global loss
            torch.testing.assert_close(losses.mean(), ref[name]["loss"], rtol=0, atol=TOL)
        else:  # every rank computes the global loss itself
            for r in range(2):
                torch.testing.assert_close(losses[r], ref[name]["loss"], rtol=0, atol=TOL)
        for r in range(2):
            # parameters: DDP's averaged gradient is exactly the one-process gradient, without any rescaling
            assert ranks[r][name]["params"].keys() == ref[name]["params"].keys()
            for p, grad in ref[name]["params"].items():
                torch.testing.assert_close(ranks[r][name]["params"][p], grad, rtol=0, atol=TOL, msg=f"{name} {p}")
            # features: the all-gather's backward sums W equal contributions, so rank r holds W * dL/dx_r — what
            # DDP's division by W turns back into dL/dθ
            start = sum(SIZES[:r])
            for got, want in zip(ranks[r][name]["features"], ref[name]["features"]):
                torch.testing.assert_close(got / 2, want[start : start + SIZES[r]], rtol=0, atol=TOL, msg=name)
