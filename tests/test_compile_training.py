"""Compiled training without graph breaks: ``MultimodalTask(compile=True)`` compiles every transformer block, and a
padded, a packed and a causal-text (CLIP) training step trace with zero graph breaks (torch's dynamo counters) and
give the eager losses and gradients. The padding layout is decided once per stack call, outside the blocks
(:func:`mmformer.layers.attention.key_mask`), so a causal text tower with padding also goes through ``torch.export``
(the converted CLIP's text tower, the graph static int8 quantization starts from).

The graph-break tests compile with the ``aot_eager`` backend: dynamo and AOTAutograd trace exactly what inductor
would be given (forward and backward), without code generation, which takes minutes on two loaded cores; one slow
test runs inductor itself.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from test_task import Digits, tiny_config, tokenizer
from torch._dynamo.utils import counters

from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.data.collate import Collator
from mmformer.tasks import MultimodalTask

open_clip = pytest.importorskip("open_clip")

SMALL_CLIP = dict(  # open_clip's ViT-B/32 layout (causal text tower, end-of-text pooling), tiny
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)


def clip_config(vocab_size: int) -> ModelConfig:
    """A CLIP-shaped task model: separate vision and text stacks, a causal text tower pooled at end-of-text."""
    tok = tokenizer()
    return ModelConfig(
        stacks={"vision": StackConfig(width=32, depth=2, n_heads=2), "text": StackConfig(width=32, depth=2, n_heads=2)},
        routes={"image": "vision", "text": "text"},
        image=ImageConfig(image_size=[16, 16], patch_size=8),
        text=TextConfig(vocab_size=vocab_size, max_length=16, causal=True, pool="eot", eos_id=tok.eos_id),
        embed_dim=16,
    )


def make(kind: str, compile: bool) -> tuple[MultimodalTask, dict]:
    """The task (seeded: eager and compiled tasks hold the same weights) and one batch of ``kind``."""
    torch.manual_seed(0)
    vocab = tokenizer().vocab_size
    if kind == "lm_text":  # a decoder-only language model (RoPE, SwiGLU, RMSNorm) on right-padded rows
        stack = StackConfig(width=32, depth=2, n_heads=2, position="rope", mlp="swiglu", norm="rmsnorm")
        config = ModelConfig(
            stacks={"s": stack}, routes={"decoder": "s"}, image=None, audio=None,
            text=TextConfig(vocab_size=64, max_length=16, position="none"), embed_dim=None,
        )  # fmt: skip
        task = MultimodalTask(config, lm_weight=1.0, contrastive_weight=0.0, caption_weight=0.0, speech_weight=0.0,
                              compile=compile)  # fmt: skip
        ids = torch.randint(4, 64, (3, 10), generator=torch.Generator().manual_seed(2))
        mask = torch.arange(10) < torch.tensor([[10], [7], [4]])
        return task, {"input_ids": ids.masked_fill(~mask, 0), "attention_mask": mask}
    if kind == "causal_text":
        task = MultimodalTask(clip_config(vocab), compile=compile)
        samples = [Digits(modalities=("image",))[i] for i in (3, 12, 7, 15)]  # 1 or 2 words: padded text rows
        return task, Collator(tokenizer())(samples)
    task = MultimodalTask(tiny_config(vocab), ctc_weight=0.3, compile=compile)
    samples = [Digits()[i] for i in (3, 12, 7, 15)]  # audio of unequal lengths, texts of 1 and 2 words
    return task, Collator(tokenizer(), packing=kind == "packed")(samples)


def step(task: MultimodalTask, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One training step's loss parts and the gradients of its weighted sum."""
    parts, _ = task._losses(batch)
    sum(task.weights[name] * value for name, value in parts.items()).backward()
    grads = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in parts.items()}, grads


@pytest.fixture
def backend(monkeypatch):
    """Make ``torch.compile`` (which ``nn.Module.compile`` calls) use the given backend; dynamo starts afresh."""

    def use(name: str) -> None:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=name))
        torch._dynamo.reset()
        counters.clear()

    yield use
    torch._dynamo.reset()


def assert_compiled_equals_eager(kind: str, tol: float = 1e-5) -> None:
    eager = step(*make(kind, compile=False))
    assert_same_step(kind, step(*make(kind, compile=True)), eager, tol)


def assert_same_step(kind: str, compiled: tuple[dict, dict], eager: tuple[dict, dict], tol: float = 1e-5) -> None:
    """No graph break, something compiled, and the compiled step's losses and gradients equal eager's."""
    (parts, grads), (eager_parts, eager_grads) = compiled, eager
    breaks = dict(counters["graph_break"])
    assert breaks == {}, f"{kind}: graph breaks {breaks}"
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"
    assert parts.keys() == eager_parts.keys()
    for name, value in parts.items():
        ref = eager_parts[name]
        assert abs(value.item() - ref.item()) <= tol * max(1.0, abs(ref.item())), (kind, name, value, ref)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        ref = eager_grads[name]
        assert (g - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()), (kind, name)


@pytest.mark.parametrize("kind", ["padded", "causal_text", "lm_text"])
def test_compiled_training_step_has_no_graph_breaks(backend, kind):
    """Padded (audio and text padding, caption + speech + CTC + contrastive), a CLIP step (causal text tower over
    right-padded text) and a decoder-only LM step on right-padded rows: zero graph breaks, losses and gradients equal
    eager (1e-5 / 1e-4 relative to magnitude); packed batches in the test below."""
    backend("aot_eager")
    assert_compiled_equals_eager(kind)


def test_packed_training_compiles_each_kind_of_block_call_once(backend):
    """The demo's packed training (image rows, packed audio and text documents, captions over the image tokens,
    transcripts over the packed audio), batches of other lengths at every step: no graph break, the first step's
    losses and gradients equal eager, and each kind of block call compiles once
    — four graphs, shared by every block, none again on later batches (sizes symbolic, no guard on a batch's lengths
    or a layer's index) — then four for evaluation (eval mode, no grad), and none past dynamo's limit."""
    backend("aot_eager")
    eager = step(*make("packed", compile=False))
    task, first = make("packed", compile=True)  # the first batch's step equals eager (losses, gradients)
    collate, data = Collator(tokenizer(), packing=True), Digits(n=120)
    batches = [first, *(collate([data[i] for i in rows]) for rows in [(1, 22, 103, 9, 45, 5), (100, 2, 31)])]
    graphs = []
    for i, batch in enumerate(batches):
        out = step(task, batch)
        if i == 0:
            assert_same_step("packed", out, eager)
        graphs.append(counters["stats"]["unique_graphs"])
    task.eval()
    with torch.no_grad():
        for batch in batches[:2]:
            task._losses(batch)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [4, 4, 4, 8, 8], graphs
    assert dict(counters["graph_break"]) == {}


@pytest.mark.slow
def test_compiled_training_step_with_inductor(backend):
    """The same padded step through inductor (generated kernels): no graph break, losses equal eager within 1e-5."""
    backend("inductor")
    assert_compiled_equals_eager("padded")


def test_padding_layout_does_not_change_the_loss():
    """The layout decided outside the blocks keeps the results: a causal text tower over right padding (is_causal
    alone) equals the same rows through the general path (key mask and causal triangle), which tracing takes."""
    from mmformer.layers.attention import key_mask

    task, batch = make("causal_text", compile=False)
    model = task.model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    assert not mask.all() and key_mask(mask, causal_alone=True) is None  # right padding: no mask needed
    fast = model.encode_text(ids, mask)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.compiler, "is_compiling", lambda: True)  # as while tracing: the mask stays
        general = model.encode_text(ids, mask)
    assert (fast - general).abs().max() < 1e-6


@pytest.mark.slow
def test_torch_export_of_a_converted_clip_causal_text_tower_with_padding(tmp_path):
    """A converted open_clip model's causal text tower exports with its padding mask (it stopped at the padding check
    before), and the program, loaded in a fresh process, equals open_clip on rows of another batch size and with
    other padding than the example it was traced with."""
    from mmformer.convert import from_open_clip
    from mmformer.ship import export

    torch.manual_seed(0)
    ref = open_clip.CLIP(**SMALL_CLIP).eval()
    model = from_open_clip(ref).eval()
    assert model.config.text.causal
    export.export(model, tmp_path / "graphs", format="torch-export", towers=["text"])
    ids = open_clip.tokenize(["a cat", "a photo of a big dog", "x"], context_length=16)  # (3, 16), zeros after eot
    mask = ids != 0
    script = (
        "import json, sys, torch\n"
        "from mmformer.ship.programs import load_program\n"
        f"program = load_program({str(tmp_path / 'graphs' / 'text_encoder.pt2')!r}).module()\n"
        "ids = torch.tensor(json.loads(sys.stdin.read()))\n"
        "embeds, _ = program(ids, ids != 0)\n"
        "print(json.dumps(embeds.tolist()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(ids.tolist()), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    exported = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    with torch.no_grad():
        expected = ref.encode_text(ids, normalize=True)
        ours = model.encode_text(ids, mask)
    assert (ours - expected).abs().max() < 1e-4
    assert (exported - expected).abs().max() < 1e-4


def test_static_int8_of_a_converted_clip_with_a_padded_causal_text_tower():
    """#26's blocker: static int8 (PT2E, calibrated on exported towers) of a converted open_clip model now exports its
    causal text tower with padding; the quantized text embeddings stay close to the float ones (cosine > 0.99)."""
    from mmformer.compress.quantization import quantize
    from mmformer.convert import from_open_clip

    torch.manual_seed(0)
    model = from_open_clip(open_clip.CLIP(**SMALL_CLIP)).eval()
    ids = open_clip.tokenize(["a cat", "a photo of a big dog", "x"], context_length=16)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.encode_text(ids, ids != 0)
    quantize(model, "static", calibration=[{"pixel_values": pixels, "input_ids": ids, "attention_mask": ids != 0}])
    with torch.no_grad():
        got = model.encode_text(ids, ids != 0)
    assert torch.nn.functional.cosine_similarity(got, ref).min() > 0.99
