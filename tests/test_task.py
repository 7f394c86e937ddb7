"""MultimodalTask: every task mix trains, bf16 training learns, non-finite steps are skipped or stop training,
checkpoints hold only plain types, and a resumed run equals an uninterrupted one.

Tiny seeded models on synthetic in-memory data, CPU only (a GPU-marked test covers fp16 with its GradScaler).
"""

from __future__ import annotations

import functools
import gc
import math
import multiprocessing
import warnings

import lightning as L
import pytest
import tokenizers
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.data.collate import Collator
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.tasks import MultimodalTask, NonFiniteLossError, WarmupCosine
from mmformer.tasks.metrics import RetrievalRecall, TextMetrics, item_ids, text_keys
from mmformer.zeroshot import ZeroShotClassifier

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLE_RATE = 4000


def tiny_config(vocab_size: int, **stack) -> ModelConfig:
    return ModelConfig(
        stacks={"shared": StackConfig(width=32, depth=2, n_heads=2, cross_attention=True, **stack)},
        image=ImageConfig(image_size=[16, 16], patch_size=8),
        audio=AudioConfig(sample_rate=SAMPLE_RATE, n_mels=16, n_fft=128, hop_length=64, max_frames=64),
        text=TextConfig(vocab_size=vocab_size, max_length=16),
        embed_dim=16,
        ctc_head=True,
    )


@functools.cache
def tokenizer() -> Tokenizer:
    return Tokenizer.train([" ".join(WORDS)] * 4, vocab_size=300)


class Digits(Dataset):
    """Sample i: the words of i's digits as text, a pattern image and a tone whose pitch follows the first digit.

    ``nan_index``: that sample's image (and waveform) is NaN, to make the loss non-finite.
    """

    def __init__(self, n: int = 16, modalities=("image", "audio"), nan_index: int | None = None):
        self.n, self.modalities, self.nan_index = n, tuple(modalities), nan_index

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        digits = [int(d) for d in str(i)]
        g = torch.Generator().manual_seed(1000 + i)
        sample = {"text": " ".join(WORDS[d] for d in digits), "source": f"sample-{i}"}
        if "image" in self.modalities:
            sample["image"] = torch.randn(3, 16, 16, generator=g)
        if "audio" in self.modalities:
            length = 400 + 50 * (i % 5)
            t = torch.arange(length) / SAMPLE_RATE
            sample["audio"] = 0.5 * torch.sin(2 * math.pi * (200 + 100 * digits[0]) * t)
        if i == self.nan_index:
            for key in ("image", "audio"):
                if key in sample:
                    sample[key] = torch.full_like(sample[key], float("nan"))
        return sample


class EpochShuffle(Sampler):
    """A permutation seeded by (seed, epoch); Lightning calls ``set_epoch``, so a resumed run continues in place."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class DigitsData(L.LightningDataModule):
    """The data module shape MultimodalTask relies on: ``tokenizer`` and ``processor`` attributes."""

    def __init__(self, batch_size: int = 4, shuffle: bool = False, sampler: str = "epoch", **data):
        super().__init__()
        self.batch_size, self.shuffle, self.sampler, self.data = batch_size, shuffle, sampler, data
        self.tokenizer = tokenizer()
        self.processor = Processor(
            self.tokenizer, ImageProcessorConfig(image_size=16), AudioProcessorConfig(sample_rate=SAMPLE_RATE)
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle:
            n = len(dataset)
            sampler = (
                EpochShuffle(n)
                if self.sampler == "epoch"
                else torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
            )
        return DataLoader(dataset, self.batch_size, sampler=sampler, collate_fn=Collator(self.tokenizer))

    def train_dataloader(self) -> DataLoader:
        return self._loader(Digits(**self.data), self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(Digits(**{**self.data, "nan_index": None}), False)


def make_task(seed: int = 0, stack: dict | None = None, **kwargs) -> MultimodalTask:
    torch.manual_seed(seed)
    kwargs.setdefault("schedule", {"warmup_steps": 2, "max_steps": 100})
    return MultimodalTask(tiny_config(tokenizer().vocab_size, **(stack or {})), **kwargs)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,  # the evaluation tests ask for validation explicitly
        deterministic=True,
    )
    return L.Trainer(**{**defaults, **kwargs})


def weights(task: MultimodalTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


class LossLog(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def test_lm_on_paired_data_warns_that_it_trained_nothing():
    """lm and mlm train on text-only batches: objectives.lm=1.0 on image–text data was silently never used."""
    task = make_task(objectives=dict(lm=1.0, speech=0.0), generation={"evaluate": False})
    with pytest.warns(UserWarning, match=r"objectives\.lm=1\.0 trained nothing: no training batch was text-only"):
        trainer(max_steps=1).fit(task, DigitsData(modalities=("image",)))


# ---------------------------------------------------------------------- every task mix
MIXES = {
    "contrastive": (dict(objectives=dict(caption=0.0, speech=0.0)), ("image",), {}, {"contrastive_image"}),
    "caption": (dict(objectives=dict(contrastive=0.0, speech=0.0)), ("image",), {}, {"caption"}),
    "speech": (dict(objectives=dict(contrastive=0.0, caption=0.0)), ("audio",), {}, {"speech"}),
    "all+ctc+moe": (
        dict(objectives=dict(ctc=0.3)),
        ("image", "audio"),
        dict(n_experts=2, experts_top_k=1),
        {"contrastive_image", "contrastive_audio", "caption", "speech", "ctc", "moe_aux"},
    ),
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_one_training_step_of_every_task_mix(mix):
    kwargs, modalities, stack, parts = MIXES[mix]
    task = make_task(stack=stack, **kwargs)
    before = weights(task)
    t = trainer(max_steps=1)
    t.fit(task, DigitsData(modalities=modalities))
    logged = {k.removeprefix("train/") for k in t.callback_metrics}
    assert parts | {"loss"} <= logged, logged
    assert logged - {"loss", "logit_scale"} == parts  # nothing else was trained
    after = weights(task)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert max_diff(before, after) > 0


def test_all_parameters_get_gradients_in_the_full_mix():
    task = make_task(stack=dict(n_experts=2, experts_top_k=2), objectives=dict(ctc=0.3))
    batch = Collator(tokenizer())([Digits()[i] for i in range(4)])
    parts, _ = task._losses(batch)
    sum(parts.values()).backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_bad_batches_and_arguments_raise_clear_errors():
    task = make_task()
    with pytest.raises(ValueError, match="input_ids"):
        task._losses({"pixel_values": torch.zeros(2, 3, 16, 16)})
    with pytest.raises(ValueError, match=r"objectives\.ctc=1\.0 needs a CTC head"):
        MultimodalTask(ModelConfig(), objectives=dict(ctc=1.0))
    with pytest.raises(ValueError, match="nonfinite"):
        MultimodalTask(ModelConfig(), nonfinite="ignore")
    with pytest.raises(ValueError, match="zeroshot.templates"):
        MultimodalTask(ModelConfig(), zeroshot=dict(templates=["a photo"]))


# ---------------------------------------------------------------------- bf16 learns
def test_bf16_mixed_fit_loss_decreases():
    task = make_task(
        schedule=dict(warmup_steps=3, max_steps=30), optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)
    )
    log = LossLog()
    t = trainer(max_steps=30, precision="bf16-mixed", callbacks=[log])
    t.fit(task, DigitsData(shuffle=True))
    assert len(log.losses) == 30
    assert all(math.isfinite(x) for x in log.losses)
    first, last = sum(log.losses[:5]) / 5, sum(log.losses[-5:]) / 5
    assert last < 0.75 * first, log.losses  # measured: about 0.57
    assert all(p.dtype == torch.float32 for p in task.parameters())  # mixed precision keeps float32 weights


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_with_grad_scaler_skips_nonfinite_steps(fused):
    """16-mixed with its GradScaler, on CPU through the plugin (Trainer(precision="16-mixed") falls back to bf16 on
    CPU). A fused AdamW unscales inside its step, a for-loop one before the hooks: both must skip the NaN batch."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3, fused=fused, foreach=False if not fused else None)
    task = make_task(schedule=dict(warmup_steps=2, max_steps=10), nonfinite="skip", optimizer=optimizer)
    snaps = Snapshots()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.warns(UserWarning, match="skipping the step at global step 1"):
        trainer(max_steps=6, plugins=[plugin], callbacks=[snaps]).fit(task, DigitsData(nan_index=5))
    assert max_diff(snaps.before[1], snaps.after[1]) == 0.0
    assert max_diff(snaps.before[0], snaps.after[-1]) > 0.0  # the scaler let some steps through
    assert all(torch.isfinite(p).all() for p in task.parameters())


def test_bf16_mixed_clips_gradients_with_the_default_fused_adamw():
    """The GPU recipes' own setting: bf16-mixed with gradient_clip_val and the default optimizer, a fused AdamW (which
    Lightning's mixed-precision plugin refuses to clip)."""
    task = make_task(schedule=dict(warmup_steps=1, max_steps=2))
    t = trainer(max_steps=2, precision="bf16-mixed", gradient_clip_val=1.0)
    t.fit(task, DigitsData(n=8))
    assert t.global_step == 2 and t.optimizers[0].defaults["fused"]
    assert all(torch.isfinite(p).all() for p in task.parameters())


class GradNorms(L.Callback):
    """The norm of the gradient each SGD step applied: the update over the learning rate."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps = [torch.linalg.vector_norm(b - p.detach()) for b, p in zip(self.before, pl_module.parameters())]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(steps))) / self.lr)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_clips_a_fused_optimizers_unscaled_gradients(precision):
    """Clipping under mixed precision with a fused optimizer (it unscales inside its step) equals clipping with a
    for-loop one: the applied gradient norm is the clip value (fp16: of the gradients unscaled first), and the
    weights match. Plain SGD, so that the update is the clipped gradient itself."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def run(fused: bool) -> tuple[MultimodalTask, list[float]]:
        sgd = functools.partial(torch.optim.SGD, lr=0.1, fused=fused, foreach=None if fused else False)
        task = make_task(schedule=dict(warmup_steps=0, max_steps=3), optimizer=sgd)
        norms = GradNorms()
        amp = dict(precision="bf16-mixed")
        if precision == "16-mixed":  # on CPU through the plugin (see test_fp16_with_grad_scaler_skips_nonfinite_steps)
            scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # low enough that no step overflows
            amp = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
        trainer(max_steps=3, gradient_clip_val=0.05, callbacks=[norms], **amp).fit(task, DigitsData(n=12))
        return task, norms.norms

    fused, fused_norms = run(fused=True)
    loop, loop_norms = run(fused=False)
    assert fused_norms == pytest.approx([0.05] * 3, rel=1e-3), fused_norms  # every step clipped, to 0.05
    assert loop_norms == pytest.approx(fused_norms, rel=1e-4)
    assert max_diff(weights(fused), weights(loop)) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_gpu(precision):
    """fp16 (GradScaler, fused AdamW) and bf16 on CUDA, with a NaN batch skipped on the way."""
    task = make_task(schedule=dict(warmup_steps=2, max_steps=10), nonfinite="skip")
    snaps = Snapshots()
    t = trainer(accelerator="gpu", deterministic=False, max_steps=10, precision=precision, callbacks=[snaps])
    with pytest.warns(UserWarning, match="skipping the step at global step 1"):
        t.fit(task, DigitsData(nan_index=5))
    assert max_diff(snaps.before[1], snaps.after[1]) == 0.0
    assert max_diff(snaps.before[0], snaps.after[-1]) > 0.0
    assert all(torch.isfinite(p).all() for p in task.parameters())


# ---------------------------------------------------------------------- non-finite losses and gradients
class Snapshots(L.Callback):
    """Weights before and after every training batch."""

    def __init__(self):
        self.before: list[dict] = []
        self.after: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(weights(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(weights(pl_module))


def test_nonfinite_loss_is_skipped_with_a_warning():
    task = make_task(nonfinite="skip")
    snaps = Snapshots()
    with pytest.warns(UserWarning, match=r"skipping the step at global step 1 \(epoch 0, batch 1, samples .*sample-5"):
        trainer(max_steps=3, callbacks=[snaps]).fit(task, DigitsData(nan_index=5))  # batch 1 holds samples 4..7
    assert max_diff(snaps.before[1], snaps.after[1]) == 0.0  # the bad step changed nothing
    assert max_diff(snaps.before[2], snaps.after[2]) > 0.0  # training went on
    assert all(torch.isfinite(v).all() for v in snaps.after[-1].values())


def test_nonfinite_loss_stops_training_by_default():
    task = make_task()
    snaps = Snapshots()
    with pytest.raises(NonFiniteLossError, match=r"global step 1 \(epoch 0, batch 1, samples .*sample-5"):
        trainer(max_steps=3, callbacks=[snaps]).fit(task, DigitsData(nan_index=5))
    assert all(torch.isfinite(v).all() for v in task.model.state_dict().values())
    assert max_diff(snaps.before[1], weights(task)) == 0.0  # stopped before any update with the bad batch


class PoisonGradient(L.Callback):
    """Puts a NaN into one gradient after the backward of batch ``at`` (a finite loss with a bad gradient)."""

    def __init__(self, at: int):
        self.at = at

    def on_after_backward(self, trainer, pl_module):
        if trainer.fit_loop.epoch_loop.batch_idx == self.at:
            pl_module.model.logit_scale.grad.fill_(float("nan"))


@pytest.mark.parametrize("nonfinite", ["skip", "stop"])
def test_nonfinite_gradient_is_skipped_or_stops(nonfinite):
    task = make_task(nonfinite=nonfinite)
    snaps = Snapshots()
    t = trainer(max_steps=3, callbacks=[PoisonGradient(at=1), snaps])
    if nonfinite == "skip":
        with pytest.warns(UserWarning, match=r"non-finite gradient"):
            t.fit(task, DigitsData())
        assert max_diff(snaps.before[1], snaps.after[1]) == 0.0
        assert max_diff(snaps.before[2], snaps.after[2]) > 0.0
    else:
        with pytest.raises(NonFiniteLossError, match=r"gradient at global step 1 \(epoch 0, batch 1\)"):
            t.fit(task, DigitsData())
        assert max_diff(snaps.before[1], weights(task)) == 0.0
    assert all(torch.isfinite(v).all() for v in task.model.state_dict().values())


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_only_plain_types_and_everything_export_needs(tmp_path):
    task = make_task(zeroshot=dict(classes=["one", "two"]))
    data = DigitsData()
    t = trainer(max_steps=1)
    t.fit(task, data)
    path = tmp_path / "task.ckpt"
    t.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=True)  # raises on anything but plain types and tensors
    hparams = ckpt["hyper_parameters"]
    assert hparams["model"] == task.model.config.to_dict()
    assert ModelConfig.from_dict(hparams["model"]) == task.model.config
    assert "optimizer" not in hparams  # a Python callable: not stored (LightningCLI stores its plain config)
    extra = ckpt["mmformer"]
    assert extra["model_config"] == task.model.config.to_dict()
    assert extra["preprocessor_config"] == data.processor.to_dict()
    restored = Tokenizer.from_backend(tokenizers.Tokenizer.from_str(extra["tokenizer_json"]))
    assert restored("three one")["input_ids"].tolist() == data.tokenizer("three one")["input_ids"].tolist()

    loaded = MultimodalTask.load_from_checkpoint(path)  # rebuilt from the plain hyper-parameters
    assert loaded.zeroshot.classes == ["one", "two"]
    assert max_diff(weights(task), weights(loaded)) == 0.0


def test_resume_equals_uninterrupted_run(tmp_path):
    """N = 2 epochs, checkpoint, resume to 2N; compared with 2N epochs in one go (float32, CPU, fixed seed).

    N is a whole number of epochs: Lightning 2.6 restores a plain DataLoader mid-epoch by restarting the epoch's
    order and running only the remaining number of batches (it warns), so a mid-epoch resume sees other samples.
    The shuffle is seeded per epoch (``set_epoch``); a ``RandomSampler`` with a seeded generator would replay the
    first epoch's order after a resume, since the generator's state is not in the checkpoint.
    """
    kwargs = dict(
        schedule=dict(warmup_steps=3, max_steps=16), objectives=dict(ctc=0.2)
    )  # 4 batches per epoch, 16 steps in all

    def run(max_epochs: int, task: MultimodalTask, ckpt_path=None) -> L.Trainer:
        L.seed_everything(0, verbose=False)
        t = trainer(max_epochs=max_epochs)
        t.fit(task, DigitsData(shuffle=True), ckpt_path=ckpt_path, weights_only=True)  # a safe load resumes too
        return t

    full = make_task(**kwargs)
    run(4, full)

    first = make_task(**kwargs)
    t = run(2, first)
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = make_task(seed=1, **kwargs)  # different init: everything must come from the checkpoint
    t = run(4, resumed, ckpt_path=tmp_path / "half.ckpt")
    assert t.global_step == 16
    diff = max_diff(weights(full), weights(resumed))
    assert diff <= 1e-6, diff
    assert max_diff(weights(full), weights(first)) > 1e-3  # the second half did train


# ---------------------------------------------------------------------- 2 processes (gloo) through Lightning
VOCAB = 24
DDP_TOL = 1e-5


def lightning_config() -> ModelConfig:
    return ModelConfig(
        stacks={"shared": StackConfig(width=32, depth=2, n_heads=2, cross_attention=True)},
        routes={"image": "shared", "text": "shared", "decoder": "shared"},
        image=ImageConfig(image_size=[16, 16], patch_size=8),
        audio=None,
        text=TextConfig(vocab_size=VOCAB, max_length=8),
        embed_dim=16,
    )


class Pairs(Dataset):
    """16 image–caption pairs; every caption is ``[bos] a b [eos]`` (equal lengths, so that per-rank token means
    average to the global one); sample ``nan_index`` has a NaN image."""

    def __init__(self, nan_index: int | None = None):
        self.nan_index = nan_index

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, 16, 16, generator=g)
        if i == self.nan_index:
            image.fill_(float("nan"))
        return {"image": image, "ids": torch.tensor([1, 3 + i % 7, 10 + (3 * i) % 11, 2]), "source": f"pair-{i}"}


def collate(samples: list[dict]) -> dict:
    ids = torch.stack([s["ids"] for s in samples])
    return {
        "pixel_values": torch.stack([s["image"] for s in samples]),
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids, dtype=torch.bool),
        "source": [s["source"] for s in samples],
    }


class PairsData(L.LightningDataModule):
    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        # In order, rank 0 taking samples 0, 2, 4, ... and rank 1 samples 1, 3, 5, ..., so that step s of the two
        # ranks together sees exactly the batch s of one process. (Lightning's own DistributedSampler always
        # shuffles training data, hence use_distributed_sampler=False.)
        dataset = Pairs(nan_index=3)
        world = self.trainer.world_size
        sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(dataset, self.batch_size, sampler=sampler, collate_fn=collate)


class Record(L.Callback):
    """Saves (from rank 0) the gradients of the last optimizer step and the final weights."""

    def __init__(self, path: str):
        self.path = path
        self.grads: dict = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            weights = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
            torch.save({"grads": self.grads, "weights": weights}, self.path)

    def teardown(self, trainer, pl_module, stage):
        if multiprocessing.parent_process() is not None:  # a spawned rank: it exits once the fit returns
            gc.freeze()  # so its exit skips the final collections (1.5 s of CPU; as mmformer.cli.main.run does)


def lightning_run(path, devices: int) -> dict:
    torch.manual_seed(0)
    task = MultimodalTask(
        lightning_config(),
        optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        schedule=dict(warmup_steps=0, max_steps=2),
        nonfinite="skip",
    )
    t = trainer(
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=2,
        use_distributed_sampler=False,
        callbacks=[Record(str(path))],
    )
    data = PairsData(batch_size=16 // (2 * devices))
    if devices == 1:
        with pytest.warns(UserWarning, match=r"skipping the step at global step 0 \(epoch 0, batch 0, samples"):
            t.fit(task, data)
    else:  # the warnings are raised in the spawned processes
        t.fit(task, data)
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_lightning_ddp_spawn_equals_one_process(tmp_path):
    """Two steps: the first batch holds a NaN image on rank 1 only, so both ranks must skip step 0 together; step 1
    then trains normally. Gradients of step 1 and the weights after it match one process on the whole batches."""
    one = lightning_run(tmp_path / "one.pt", devices=1)
    two = lightning_run(tmp_path / "two.pt", devices=2)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=0, atol=DDP_TOL, msg=name)
    for name, value in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, rtol=0, atol=DDP_TOL, msg=name)
    assert all(torch.isfinite(v).all() for v in two["weights"].values())


# ---------------------------------------------------------------------- evaluation metrics
def test_validation_reports_retrieval_and_zeroshot():
    task = make_task(zeroshot=dict(classes=WORDS, templates=["{}", "the number {}"]), generation=dict(evaluate=False))
    t = trainer(limit_val_batches=1.0)
    t.validate(task, DigitsData())
    metrics = t.callback_metrics
    for name in (
        "i2t_r1",
        "i2t_r5",
        "t2i_r1",
        "a2t_r1",
        "a2t_r5",
        "t2a_r5",
        "zeroshot_image_acc",
        "zeroshot_audio_acc",
    ):
        value = float(metrics[f"val/{name}"])
        assert 0.0 <= value <= 1.0, (name, value)
    assert float(metrics["val/i2t_r5"]) >= float(metrics["val/i2t_r1"])


def test_validation_zero_shot_is_the_classifiers_in_bounded_batches(monkeypatch):
    """Validation builds class embeddings with the classifier's own function: a template with two {} works, and the
    10 classes x 3 templates = 30 prompts are encoded in batches of at most zeroshot.batch_size."""
    templates = ["{}", "the number {}", "a {} or a {}"]
    task = make_task(zeroshot=dict(classes=WORDS, templates=templates, batch_size=8), generation=dict(evaluate=False))
    batches = []
    encode_text = task.model.encode_text
    monkeypatch.setattr(
        task.model, "encode_text", lambda ids, *a, **k: batches.append(len(ids)) or encode_text(ids, *a, **k)
    )
    task.tokenizer = tokenizer()
    embeddings = task.evaluation.build_class_embeddings(task.model, task.tokenizer, task.prompt)
    assert batches == [8, 8, 8, 6]
    classifier = ZeroShotClassifier(task.model, tokenizer(), classnames=WORDS, templates=templates, modality="image")
    # the same function on the same prompts: equal up to float32 rounding (a batch of 8 rows and the classifier's own
    # batching may round differently on another CPU's kernels), and the classes they predict are exactly the same
    reference = classifier.class_embeddings
    torch.testing.assert_close(embeddings, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    queries = torch.nn.functional.normalize(
        torch.randn(64, reference.shape[1], generator=torch.Generator().manual_seed(0)), dim=-1
    )
    assert torch.equal((queries @ embeddings.T).argmax(dim=-1), (queries @ reference.T).argmax(dim=-1))
    t = trainer(limit_val_batches=1.0)
    t.validate(task, DigitsData())
    assert 0.0 <= float(t.callback_metrics["val/zeroshot_image_acc"]) <= 1.0


def test_validation_generates_and_scores_text():
    pytest.importorskip("mmformer.generation.decoding")
    task = make_task(generation=dict(max_new_tokens=4))
    t = trainer(limit_val_batches=1.0)
    t.validate(task, DigitsData(n=8))
    metrics = t.callback_metrics
    for name in ("caption_bleu", "caption_cer", "caption_exact", "speech_wer", "speech_cer"):
        assert math.isfinite(float(metrics[f"val/{name}"])), name
    predictions = t.predict(task, DigitsData(n=4).train_dataloader())
    out = predictions[0]
    assert out["image_features"].shape == (4, 16) and out["audio_features"].shape == (4, 16)
    assert out["text_features"].shape == (4, 16)
    assert len(out["captions"]) == 4 and all(isinstance(c, str) for c in out["transcripts"])


def test_memorised_captions_score_perfectly():
    """Metric wiring end to end: a model that learned its 4 captions gets BLEU 1, CER 0 and exact match 1."""
    pytest.importorskip("mmformer.generation.decoding")
    torch.manual_seed(0)
    task = make_task(
        objectives=dict(contrastive=0.0, speech=0.0),
        schedule=dict(warmup_steps=1, max_steps=60),
        generation=dict(max_new_tokens=6),
    )
    task.optimizer = functools.partial(torch.optim.AdamW, lr=1e-2)
    data = DigitsData(n=4, modalities=("image",))
    t = trainer(max_steps=60, limit_val_batches=1.0, check_val_every_n_epoch=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(task, data)
    t.validate(task, data)
    metrics = t.callback_metrics
    assert float(metrics["val/caption_exact"]) == 1.0
    assert float(metrics["val/caption_cer"]) == 0.0


def test_retrieval_recall_counts_equal_texts_as_matches():
    e = torch.eye(5)
    unit = lambda v: v / v.norm()  # noqa: E731
    images = torch.stack([e[0], e[1], e[2], e[1], unit(e[3] + 2 * e[1])])
    texts = torch.stack([e[0], e[1], e[2], unit(2 * e[1] + e[3]), unit(e[4] + e[3])])
    keys = text_keys(["one", "two", "three", "Two ", "four"])  # texts 1 and 3 are the same caption
    assert keys[1] == keys[3] and len(set(keys.tolist())) == 4
    metric = RetrievalRecall("i", "t")
    metric.update(images[:2], texts[:2], keys[:2])  # two batches of one epoch
    metric.update(images[2:], texts[2:], keys[2:])
    out = metric.compute()
    # image 3 retrieves text 1 (same caption: a hit); image 4 retrieves text 3 and text 3 image 4 (misses)
    assert out["i2t_r1"] == pytest.approx(4 / 5) and out["t2i_r1"] == pytest.approx(4 / 5)
    assert out["i2t_r5"] == 1.0 and out["t2i_r5"] == 1.0


def test_retrieval_recall_pools_the_captions_of_one_image():
    """COCO's protocol (open_clip's, CLIP benchmark's): the rows of one image (one per caption, the same source) are
    one image. Image → text scores each image once and hits when one of its captions ranks in the top k; text → image
    scores each caption and hits when its image does."""
    e = torch.eye(4)
    unit = lambda v: v / v.norm()  # noqa: E731
    # image A has 3 captions (rows 0-2), B and C one each; A's 2nd caption looks like B, its 3rd like C
    images = torch.stack([e[0], e[0], e[0], e[1], e[2]])
    texts = torch.stack([e[0], unit(e[1] + 0.5 * e[3]), e[2], e[1], unit(e[2] + e[3])])
    keys = text_keys(["a dog", "a puppy", "a pet", "a cat", "a bird"])
    items = item_ids(["a.jpg", "a.jpg", "a.jpg", "b.jpg", "c.jpg"])
    metric = RetrievalRecall("i", "t")
    metric.update(images[:2], texts[:2], keys[:2], items[:2])  # an image's rows in two batches of the epoch
    metric.update(images[2:], texts[2:], keys[2:], items[2:])
    out = metric.compute()
    # A finds its own "a dog", B "a cat"; C's best is "a pet", A's caption: 2 of 3 images
    assert out["i2t_r1"] == pytest.approx(2 / 3)
    # "a dog" → A, "a cat" → B, "a bird" → C hit; "a puppy" → B and "a pet" → C miss: 3 of 5 captions
    assert out["t2i_r1"] == pytest.approx(3 / 5)
    assert out["i2t_r5"] == 1.0 and out["t2i_r5"] == 1.0

    # the bug report's case: a perfect model on 4 images with 2 captions each scores 1, not 0.5
    perfect = RetrievalRecall("i", "t")
    image = torch.eye(4).repeat_interleave(2, 0)  # (8, 4): rows 2i and 2i+1 show image i
    captions = [f"caption {i} {j}" for i in range(4) for j in range(2)]
    perfect.update(image, image.clone(), text_keys(captions), item_ids([f"{i}.jpg" for i in range(4) for _ in "ab"]))
    assert all(float(v) == 1.0 for v in perfect.compute().values())


def test_validation_pools_rows_by_source():
    """The task passes each row's source as its image: two rows of one image with two captions (features as a
    perfect model gives them) count as one image found by both captions."""
    task = make_task(generation=dict(evaluate=False))
    image = torch.eye(16)[:4].repeat_interleave(2, 0)  # (8, 16), rows 2i and 2i+1 show image i
    batch = {
        "pixel_values": torch.zeros(8, 3, 16, 16),
        "text": [f"caption {i} {j}" for i in range(4) for j in range(2)],
        "source": [f"{i}.jpg" for i in range(4) for _ in range(2)],
    }
    task.evaluation.update(task.model, batch, {"image": image, "text": image.clone()}, "val", None, None)
    out = task.evaluation.end("val", torch.device("cpu"))
    assert {k: float(v) for k, v in out.items()} == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}


def test_caption_bleu_scores_against_all_references_of_an_image():
    """COCO's caption evaluation: one prediction per image, against all its captions. A prediction equal to one of
    an image's two captions scores BLEU 1 and exact 1; scored row by row against each row's caption it did not."""
    predictions = ["a cat sits on a mat", "a cat sits on a mat", "two dogs run on the grass"]
    references = ["a small dog runs on grass", "A cat sits on a mat", "two dogs run on the grass"]
    pooled, alone = TextMetrics(), TextMetrics()
    pooled.update(predictions, references, ["1.jpg", "1.jpg", "2.jpg"])
    alone.update(predictions, references)
    by_image, by_row = pooled.compute(), alone.compute()
    assert float(by_image["bleu"]) == pytest.approx(1.0) and float(by_image["exact"]) == 1.0
    assert float(by_row["bleu"]) < 0.9 and float(by_row["exact"]) == pytest.approx(2 / 3)
    assert float(by_image["cer"]) == float(by_row["cer"]) > 0  # error rates stay per row
    pooled.reset()
    pooled.update(["a cat"], ["a cat"], ["1.jpg"])
    assert float(pooled.compute()["exact"]) == 1.0  # reset forgets the epoch's rows


def test_warmup_cosine_schedule_and_weight_decay_groups():
    s = WarmupCosine(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5) and s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        WarmupCosine(1, 10, 1.5)

    task = make_task()
    opt = task.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in task.model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.05
    assert {"logit_scale", "image_embed.positions", "image_embed.cls_token", "text_embed.positions.weight"} <= no_decay
    assert all(n.endswith(("bias", "norm.weight")) or n in no_decay for n in no_decay)
    assert "text_embed.tokens.weight" in decay and "stacks.shared.blocks.0.attn.fn.qkv.weight" in decay
    assert all(p.ndim >= 2 for g in opt.param_groups[:1] for p in g["params"])


# ---------------------------------------------------------------------- schedules and the tokenizer at fit start
class PlateauTask(MultimodalTask):
    """A subclass with a metric-driven scheduler, stepped once per epoch on the validation loss."""

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss"}}


def test_a_subclass_plateau_scheduler_steps_on_its_metric():
    """The task's lr_scheduler_step dropped the metric and called ``step()``: ReduceLROnPlateau raised TypeError."""
    torch.manual_seed(0)
    task = PlateauTask(tiny_config(tokenizer().vocab_size), generation={"evaluate": False})
    t = trainer(max_epochs=2, limit_val_batches=1)
    t.fit(task, DigitsData(n=8, modalities=("image",)))
    (config,) = t.lr_scheduler_configs
    assert t.global_step == 4 and math.isfinite(config.scheduler.best)  # it read val/loss


def test_a_gradient_accumulation_schedule_sets_the_cosine_length():
    """Lightning's estimated_stepping_batches ignores a GradientAccumulationScheduler: 3 epochs of 4 batches
    accumulating {0: 1, 1: 4} step 4 + 1 + 1 times, and the cosine was 12 steps long (the rate stopped half-way)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    task = make_task(schedule={"warmup_steps": 1}, generation={"evaluate": False})
    t = trainer(max_epochs=3, callbacks=[GradientAccumulationScheduler({0: 1, 1: 4})])
    t.fit(task, DigitsData(n=16, modalities=("image",)))
    (config,) = t.lr_scheduler_configs
    assert config.scheduler.lr_lambdas[0].max_steps == t.global_step == 6


@pytest.mark.parametrize("extra_rows", [7, -7])
def test_a_token_table_that_differs_from_the_tokenizer_stops_at_setup(extra_rows):
    """A model sized by hand (larger than the data's tokenizer) trained, then failed in validation's generation
    ("ids must hold ints in [0, 301)"); a smaller one failed at its first batch. Both now stop before training, with
    both sizes."""
    size = tokenizer().vocab_size
    task = MultimodalTask(tiny_config(size + extra_rows))
    message = rf"vocab_size: .* has {size + extra_rows} rows .* tokenizer has {size} ids"
    for run in (trainer(max_steps=1).fit, trainer(limit_val_batches=1).validate):
        with pytest.raises(ValueError, match=message):
            run(task, DigitsData(n=4, modalities=("image",)))


def test_a_pretrained_table_may_keep_rows_its_tokenizer_does_not_use():
    """T5's table has 32128 rows for its 32100 tokens: a model from adapt.init_from is not refused for spare rows."""
    from mmformer.tasks.vocabulary import check_vocabulary

    size = tokenizer().vocab_size
    check_vocabulary(tiny_config(size + 7), tokenizer(), pretrained=True)
    with pytest.raises(ValueError, match="vocab_size"):
        check_vocabulary(tiny_config(size - 7), tokenizer(), pretrained=True)
