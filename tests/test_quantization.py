"""torchao quantization: every method stays close to fp32 on a tiny model, saves and re-loads to identical outputs
without unpickling anything, fails clearly without torchao, calibrates static int8 from a manifest, and QAT trains
with fake quantization and converts at the end of fit.

Tolerances (tiny seeded model, width 32; largest absolute difference on L2-normalised embeddings and on decoder
logits): dynamic and weight-only int8 ≤ 0.03 on embeddings and ≤ 0.05 on logits; static int8 (one activation scale
per layer, calibrated on other data than the test inputs) ≤ 0.06 and ≤ 0.1; int4 (4-bit weights in groups of 32)
≤ 0.2 on both.
"""

from __future__ import annotations

import json
import pickle
import sys

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

pytest.importorskip("torchao")

from conftest import TINY_AUDIO, TINY_IMAGE, TINY_STACK, TINY_TEXT  # noqa: E402

import mmformer  # noqa: E402
from mmformer.compress.quantization import METHODS, calibration_batches, fake_quantized, quantize  # noqa: E402
from mmformer.config import AudioConfig, ImageConfig, ModelConfig, StackConfig, TextConfig  # noqa: E402
from mmformer.model import MultimodalTransformer  # noqa: E402
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor  # noqa: E402
from mmformer.preprocess.tokenizer import Tokenizer  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TOLERANCE = {"dynamic": (0.03, 0.05), "int8-weight": (0.03, 0.05), "static": (0.06, 0.1), "int4-weight": (0.2, 0.2)}


def tiny(depth: int = TINY_STACK["depth"]) -> MultimodalTransformer:
    """The suite's tiny shapes, at width 32 so that int4 groups of 32 divide the linear layers; ``depth`` blocks
    (fewer for a test about compiled graphs, whose compile time grows with the graph)."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train([" ".join(WORDS)] * 4, vocab_size=300)
    config = ModelConfig(
        stacks={"shared": StackConfig(**{**TINY_STACK, "width": 32, "depth": depth, "cross_attention": True})},
        image=ImageConfig(**TINY_IMAGE),
        audio=AudioConfig(**TINY_AUDIO),
        text=TextConfig(**{**TINY_TEXT, "vocab_size": tokenizer.vocab_size}),
        embed_dim=16,
    )
    model = MultimodalTransformer(config).eval()
    model.processor = Processor(
        tokenizer, ImageProcessorConfig(image_size=16, channels=3), AudioProcessorConfig(sample_rate=8000)
    )
    return model


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "float"
    tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Eight image + audio + text samples on disk, as a JSONL manifest."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        t = np.arange(1600) / 8000
        soundfile.write(folder / f"{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t), 8000)
        rows.append({"image": f"{i}.png", "audio_filepath": f"{i}.wav", "text": f"{WORDS[i]} {WORDS[7 - i]}"})
    path = folder / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def outputs(model: MultimodalTransformer, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels, audio = torch.randn(3, 3, 16, 16, generator=g), 0.3 * torch.randn(3, 1200, generator=g)
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]])
    mask = ids != 0
    mask[:, 0] = True
    lengths = torch.tensor([1200, 900, 1000])
    pixels, audio, ids, mask, lengths = (t.to(device) for t in (pixels, audio, ids, mask, lengths))
    with torch.inference_mode():
        memory, memory_mask = model.encode_audio_tokens(audio, lengths)
        out = {
            "image": model.encode_image(pixels),
            "audio": model.encode_audio(audio, lengths),
            "text": model.encode_text(ids, mask),
            "logits": model.decode(ids[:, :3], memory, memory_mask),
        }
    return {k: v.float().cpu() for k, v in out.items()}


@pytest.fixture(scope="module")
def reference(float_dir):
    return outputs(mmformer.load_pretrained(float_dir))


@pytest.fixture(scope="module")
def quantized_dirs(float_dir, manifest, tmp_path_factory):
    """Each method applied to the float model and saved: method → (model in memory, its folder)."""
    out = {}
    for method in METHODS:
        model = mmformer.load_pretrained(float_dir)
        calibration = calibration_batches(model, manifest, batch_size=4) if method == "static" else None
        quantize(model, method, calibration=calibration)
        path = tmp_path_factory.mktemp("quant") / method
        model.save_pretrained(path)
        out[method] = (model, path)
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("method", METHODS)
def test_each_method_is_close_to_fp32_and_reloads_identically(method, quantized_dirs, reference, monkeypatch):
    model, path = quantized_dirs[method]
    kinds = {type(model.get_submodule(name).weight).__name__ for name in model.quantization.modules}
    assert kinds == ({"Int4OpaqueTensor"} if method == "int4-weight" else {"Int8Tensor"})
    assert (
        len(model.quantization.modules) == 2 * 7 + 3
    )  # 2 blocks × 7 linears + 3 projections; the tied LM head stays float
    embed_tol, logit_tol = TOLERANCE[method]  # (embeddings, logits)
    got = outputs(model)
    for name, expected in reference.items():
        diff = float((got[name] - expected).abs().max())
        assert diff <= (logit_tol if name == "logits" else embed_tol), (name, diff)
        assert diff > 0  # it is quantized

    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao" and config["method"] == method

    def refuse(*args, **kwargs):
        raise AssertionError("loading a quantized model unpickled something")

    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = mmformer.load_pretrained(path)
    assert loaded.quantization.method == method
    again = outputs(loaded)
    assert all(torch.equal(again[k], got[k]) for k in got)


@pytest.mark.numerics
def test_quantized_models_classify_caption_and_transcribe_unchanged(quantized_dirs):
    model, path = quantized_dirs["dynamic"]
    loaded = mmformer.load_pretrained(path)
    images = [torch.rand(3, 16, 16) for _ in range(2)]
    clf = mmformer.ZeroShotClassifier(loaded, classnames=WORDS[:3], modality="image")
    assert torch.allclose(clf.predict_proba(images).sum(dim=1), torch.ones(2))
    captions = loaded.caption(images, max_new_tokens=4)
    transcripts = loaded.transcribe([0.3 * torch.randn(1600)], sample_rate=8000, max_new_tokens=4)
    assert captions == model.caption(images, max_new_tokens=4) and len(transcripts) == 1


def test_compiled_single_row_decoding_of_int8_activations_is_refused(quantized_dirs):
    """torch.compile computes torchao's int8-activation linear layers wrongly on a (1, 1, D) input (torchao 0.18,
    torch 2.14: BENCHMARKS.md), every step of decoding one row: a reloaded dynamic or static model refuses
    generate(compile=True) for one row, naming the ways out, before anything is compiled; weight-only int8 and two
    or more rows are not refused."""
    from mmformer.generation import search
    from mmformer.generation.decoding import generate

    images = torch.rand(1, 3, 16, 16)
    for method in search.INT8_ACTIVATIONS:
        loaded = mmformer.load_pretrained(quantized_dirs[method][1])
        with pytest.raises(ValueError, match=rf"compile: .*{method!r} int8 method decodes one row wrongly.*"
                                             r"compile=False.*backend='pt2e'"):  # fmt: skip
            generate(loaded, image=images, max_new_tokens=2, compile=True)
        search._check_compilable(loaded, rows=2)
    search._check_compilable(quantized_dirs["int8-weight"][0], rows=1)


def test_a_text_encoder_alone_calibrates_from_texts(manifest):
    """A text-only model (BERT-like: no image or audio tower) calibrates static int8 from a manifest's texts — the
    calibration kept only samples with an image or audio before, so a text encoder had none to read."""
    full = tiny()
    config = ModelConfig(stacks={"shared": StackConfig(**{**TINY_STACK, "width": 32})}, routes={"text": "shared"},
                         image=None, audio=None, text=full.config.text, embed_dim=16)  # fmt: skip
    model = MultimodalTransformer(config).eval()
    model.processor = Processor(full.processor.tokenizer)
    batches = calibration_batches(model, manifest, batch_size=4)
    assert len(batches) == 2 and all("input_ids" in b and "pixel_values" not in b for b in batches)
    quantized = quantize(model, "static", calibration=batches)
    assert quantized.quantization.method == "static" and quantized.quantization.modules


def test_static_int8_of_a_text_to_text_model_quantizes_and_decodes_with_its_decoder():
    """T5: static calibration reaches the decoder (it reads the text encoder's states; before, only the encoder was
    quantized), and greedy decoding through the int8 LM head works — the head is called at the rank it was
    calibrated at (a 2-D call failed torchao's static int8 tensor: "scale.ndim == hp_tensor.ndim")."""
    import copy

    import test_convert_text

    from mmformer.convert import from_hf_t5
    from mmformer.generation.decoding import generate

    model = from_hf_t5(test_convert_text.t5("v1.1")).eval()
    ids = torch.randint(3, test_convert_text.V, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    quantized = quantize(copy.deepcopy(model), "static", calibration=[{"input_ids": ids, "attention_mask": mask}])
    modules = quantized.quantization.modules
    assert "lm_head" in modules and any(".cross_attn." in m for m in modules), modules
    expected = generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=5)
    got = generate(quantized, input_ids=ids, attention_mask=mask, max_new_tokens=5)
    assert got.shape == expected.shape
    assert float((got == expected).float().mean()) >= 0.5  # int8 may flip a close call, not the whole decoding


def test_a_quantized_model_without_torchao_is_a_clear_error(quantized_dirs, float_dir, monkeypatch):
    _, path = quantized_dirs["int8-weight"]
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError
    with pytest.raises(ImportError, match=r"needs the `torchao` package.*pip install"):
        mmformer.load_pretrained(path)
    with pytest.raises(ImportError, match="torchao"):
        quantize(mmformer.load_pretrained(float_dir), "dynamic")


def test_bad_methods_and_calibration_data_are_clear_errors(float_dir, manifest, tmp_path):
    model = mmformer.load_pretrained(float_dir)
    with pytest.raises(ValueError, match=r"method: expected one of \['dynamic', .*got 'int3'"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match="calibration: static int8 needs calibration batches"):
        quantize(model, "static")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"image": f"missing{i}.png", "text": "one"}) + "\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"calib: .*bad.jsonl: no usable samples"):
        calibration_batches(model, bad)
    quantize(model, "int8-weight")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "dynamic")


@pytest.mark.parametrize("backend", ["torchao", "pt2e"])
def test_a_model_carrying_an_adapter_is_refused_naming_the_merge(backend):
    """quantize() would quantize peft's lora_A / lora_B linears with the base, after which the adapter could be
    neither saved ("invalid python storage") nor merged (Int8Tensor in aten.mm): merge first."""
    from mmformer.adapt import adapters

    model = adapters.add_lora(tiny(depth=1), adapters.LoraSettings(r=2, target_modules=["qkv"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model: carries a LoRA adapter.*merge_and_unload.*`mmformer merge"):
        quantize(model, "int8-weight" if backend == "torchao" else "dynamic", backend=backend)
    assert getattr(model, "quantization", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was quantized
    adapters.merge_and_unload(model)  # the way the message names still works


def test_static_calibration_takes_a_tokenizers_integer_mask():
    """A 0/1 integer attention_mask (a Hugging Face tokenizer's) calibrates as the boolean mask does; the exported
    text graph refused it ("Expected: Bool, Got: long int")."""
    import copy

    full = tiny()
    config = ModelConfig(stacks={"shared": StackConfig(**{**TINY_STACK, "width": 32, "depth": 1})},
                         routes={"text": "shared"}, image=None, audio=None, text=full.config.text,
                         embed_dim=16)  # fmt: skip
    model = MultimodalTransformer(config).eval()
    ids = torch.randint(3, 40, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 4:] = False
    by_kind = {
        dtype: quantize(
            copy.deepcopy(model), "static", calibration=[{"input_ids": ids, "attention_mask": mask.to(dtype)}]
        )
        for dtype in (torch.bool, torch.long)
    }
    assert by_kind[torch.long].quantization.modules == by_kind[torch.bool].quantization.modules
    torch.testing.assert_close(by_kind[torch.long].encode_text(ids, mask), by_kind[torch.bool].encode_text(ids, mask),
                               rtol=0, atol=0)  # fmt: skip


def test_a_tampered_torchao_header_is_refused_before_loading(quantized_dirs, tmp_path):
    import safetensors.torch

    _, path = quantized_dirs["dynamic"]
    copy = tmp_path / "tampered"
    copy.mkdir()
    for f in path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    weights = copy / "model.safetensors"
    with safetensors.safe_open(str(weights), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(k for k, v in metadata.items() if '"Int8Tensor"' in v)
    metadata[name] = metadata[name].replace('"Int8Tensor"', '"os.system"')
    safetensors.torch.save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(ValueError, match=r"tensor type 'os.system' is not one mmformer rebuilds"):
        mmformer.load_pretrained(copy)


@pytest.mark.numerics
def test_qat_fake_quantizes_during_fit_and_converts_at_the_end():
    import lightning as L
    from test_task import DigitsData, LossLog, make_task, trainer

    class Watch(L.Callback):
        seen: list[int] = []

        def on_train_batch_end(self, trainer, task, outputs, batch, batch_idx):
            self.seen.append(len(fake_quantized(task.model)))

    task = make_task(qat={"method": "dynamic"}, objectives=dict(contrastive=0.0, speech=0.0))
    n_linear = len(fake_quantized(task.model))
    assert n_linear >= 10
    watch, log = Watch(), LossLog()
    t = trainer(max_steps=12, callbacks=[watch, log])
    t.fit(task, DigitsData(modalities=("image",)))
    assert watch.seen == [n_linear] * 12  # fake-quantized all through fit
    assert fake_quantized(task.model) == []  # converted when fit ended
    assert task.model.quantization.method == "dynamic"
    assert type(task.model.stacks["shared"].blocks[0].attn.fn.qkv.weight).__name__ == "Int8Tensor"
    first, last = np.mean(log.losses[:3]), np.mean(log.losses[-3:])
    assert last < first, log.losses


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dynamic", "int8-weight", "int4-weight"])
def test_methods_on_cuda(method, float_dir, tmp_path):
    """On CUDA: int8 through torchao's Int8Tensor; int4 through the tile-packed layout (bf16 model). A model whose int4
    weights were packed for the CPU kernel is refused on CUDA with a clear error."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = mmformer.load_pretrained(float_dir, device="cuda")
    reference = outputs(model, "cuda")
    quantize(model, method)
    kind = {"int4-weight": "Int4TilePackedTo4dTensor"}.get(method, "Int8Tensor")
    assert type(model.stacks["shared"].blocks[0].attn.fn.qkv.weight).__name__ == kind
    got = outputs(model, "cuda")
    for name, expected in reference.items():  # int4: bf16 activations on top of the 4-bit weights
        tolerance = TOLERANCE[method][name == "logits"] * (2 if method == "int4-weight" else 1)
        assert float((got[name] - expected).abs().max()) <= tolerance, name
    model.save_pretrained(tmp_path / method)
    loaded = mmformer.load_pretrained(tmp_path / method, device="cuda")
    again = outputs(loaded, "cuda")
    assert all(torch.equal(again[k], got[k]) for k in got)
    if method == "int4-weight":
        cpu = mmformer.load_pretrained(float_dir)
        quantize(cpu, "int4-weight")
        cpu.save_pretrained(tmp_path / "cpu")
        with pytest.raises(ValueError, match="packed for the CPU kernel"):
            mmformer.load_pretrained(tmp_path / "cpu", device="cuda")


def test_cli_quantizes_and_refuses_bad_requests(float_dir, manifest, tmp_path, capsys):
    from mmformer.cli.main import main

    main(["quantize", "--model", str(float_dir), "--method", "static", "--calib", str(manifest), "--out",
          str(tmp_path / "static")])  # fmt: skip
    printed = capsys.readouterr()
    assert "layers static" in printed.out and "--backend pt2e" not in printed.out  # stdout: the result alone
    (note,) = [line for line in printed.err.splitlines() if line.startswith("note: ")]  # the CPU speed advisory
    assert "dynamic/static int8" in note and "--backend pt2e" in note
    assert mmformer.load_pretrained(tmp_path / "static").quantization.method == "static"
    with pytest.raises(
        SystemExit, match="--method: expected one of dynamic, int8-weight, int4-weight, static, got 'fp8'"
    ):
        main(["quantize", "--model", str(float_dir), "--method", "fp8", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--method static needs --calib MANIFEST"):
        main(["quantize", "--model", str(float_dir), "--method", "static", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.numerics
def test_int8_embeddings_and_bfloat16_storage_make_a_smaller_file_that_reloads_exactly(float_dir, reference, tmp_path):
    plain, compact = mmformer.load_pretrained(float_dir), mmformer.load_pretrained(float_dir)
    quantize(plain, "dynamic")
    quantize(compact, "dynamic", embeddings=True, float_storage="bfloat16")
    assert compact.lm_head.weight is compact.text_embed.tokens.weight  # still tied, now int8
    assert type(compact.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    got = outputs(compact)
    for name, expected in reference.items():
        assert float((got[name] - expected).abs().max()) <= TOLERANCE["static"][name == "logits"], name
    plain.save_pretrained(tmp_path / "plain")
    compact.save_pretrained(tmp_path / "compact")
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("plain", "compact")]
    assert sizes[1] < 0.8 * sizes[0], sizes
    loaded = mmformer.load_pretrained(tmp_path / "compact")
    assert loaded.lm_head.weight is loaded.text_embed.tokens.weight
    again = outputs(loaded)
    assert all(torch.equal(again[k], got[k]) for k in got)
    images = [torch.rand(3, 16, 16) for _ in range(2)]  # generation reads the int8 LM head too
    assert loaded.caption(images, max_new_tokens=4) == compact.caption(images, max_new_tokens=4)
