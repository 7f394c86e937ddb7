"""PT2E int8 (X86InductorQuantizer): static and dynamic graphs stay close to the float model, round-trip through
their files (float safetensors + observer parameters) in a fresh process to identical outputs, compile with inductor
to the same answers, and refuse a device or CPU the x86 kernels cannot serve.

Tolerances (tiny seeded model, width 32, one block; largest absolute difference on L2-normalised embeddings):
static ≤ 0.06 (one activation scale per tensor, calibrated on other data than the test inputs), dynamic ≤ 0.03 — as
the torchao methods in test_quantization.py.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("torchao")

from cli_helpers import REPO, cli_env  # noqa: E402
from conftest import TINY_AUDIO, TINY_TEXT  # noqa: E402
from helpers import frozen_tensors  # noqa: E402
from test_quantization import float_dir, manifest, tiny  # noqa: E402, F401  (the tiny model and its calibration manifest)

import mmformer  # noqa: E402
from mmformer.compress import pt2e  # noqa: E402
from mmformer.compress.quantization import calibration_batches  # noqa: E402

TOLERANCE = {"static": 0.06, "dynamic": 0.03}
TOWERS = {"static": ["image", "decoder"], "dynamic": ["audio", "text"]}


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(3, 3, 16, 16, generator=g),
        "audio_features": torch.randn(3, 8, 40, generator=g),
        "feature_lengths": torch.tensor([40, 31, 25]),
        "input_ids": torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool),
    }


def outputs(model, towers: list[str]) -> dict[str, torch.Tensor]:
    x = inputs()
    out = {}
    with torch.no_grad():
        if "image" in towers:
            out["image"] = model.encode_image(x["pixel_values"])
        if "audio" in towers:
            out["audio"] = model.encode_audio(audio_features=x["audio_features"], feature_lengths=x["feature_lengths"])
        if "text" in towers:
            out["text"] = model.encode_text(x["input_ids"], x["attention_mask"])
        if "decoder" in towers:
            out["ids"] = model.generate(image=x["pixel_values"], max_new_tokens=6)
    return out


FRESH = """
import sys, torch
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from test_quantization_pt2e import outputs
from mmformer.compress import pt2e
model = pt2e.load({path!r}, compile=False)
save_file({{k: v.contiguous() for k, v in outputs(model, {towers!r}).items()}}, {out!r})
"""


@pytest.mark.parametrize("mode", pt2e.MODES)
def test_pt2e_is_close_to_float_and_reloads_identically_in_a_fresh_process(mode, manifest, tmp_path):  # noqa: F811
    model = tiny(depth=1)  # one block: each graph is exported twice (here and in the fresh process)
    towers = TOWERS[mode]
    calibration = calibration_batches(model, manifest, batch_size=4) if mode == "static" else None
    quantized = pt2e.quantize(model, mode, calibration=calibration, towers=towers, compile=False)
    assert getattr(model, "quantization", None) is None  # the float model is left as it was
    expected, got = outputs(model, towers), outputs(quantized, towers)
    for name in set(expected) - {"ids"}:
        diff = float((got[name] - expected[name]).abs().max())
        assert 0 < diff <= TOLERANCE[mode], (name, diff)  # quantized, and close
    # the graphs hold int8 kernels' quantize ops (static: fixed activation scales; dynamic: chosen at run time)
    ops = {str(n.target) for g in quantized.graphs.values() for n in g.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in op for op in ops), sorted(ops)[:20]
    if mode == "dynamic":
        assert any("choose_qparams" in op for op in ops)

    path = quantized.save_pretrained(tmp_path / mode)
    assert pt2e.is_pt2e(path)
    assert not any(p.suffix in (".pt", ".pt2", ".bin", ".pkl") for p in path.iterdir())  # safetensors + JSON only
    header = json.loads(load_file_metadata(path / pt2e.QPARAMS_FILE)["quantization_config"])
    assert header == {"quant_method": "pt2e", "method": mode, "graphs": sorted(quantized.graphs)}

    out = tmp_path / "fresh.safetensors"
    code = FRESH.format(tests=str(__import__("pathlib").Path(__file__).parent), path=str(path), towers=towers,
                        out=str(out))  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = load_file(out)
    assert set(fresh) == set(got)
    for name in got:
        assert torch.equal(fresh[name], got[name]), name


def load_file_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_pt2e_refuses_devices_and_cpus_its_kernels_cannot_serve(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"pt2e int8 \(X86InductorQuantizer\) runs on x86-64 CPUs only; got device "
                                         r"'cuda'"):  # fmt: skip
        pt2e.check_device("cuda")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    with pytest.raises(ValueError, match="x86-64 CPUs only; this CPU is 'aarch64'"):
        pt2e.quantize(tiny(), "dynamic", towers=["image"])
    with pytest.raises(ValueError, match="x86-64 CPUs only; this CPU is 'aarch64'"):
        pt2e.check_device("cpu")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no pt2e_qparams.safetensors"):
        pt2e.load(tmp_path)
    with pytest.raises(ValueError, match=r"the pt2e backend supports \['static', 'dynamic'\], got 'int4'"):
        pt2e.quantize(tiny(), "int4")
    with pytest.raises(ValueError, match="static int8 needs calibration batches"):
        pt2e.quantize(tiny(), "static", towers=["image"])
    from mmformer.compress.quantization import quantize

    with pytest.raises(ValueError, match=r"the pt2e backend supports \['static', 'dynamic'\], got 'int4-weight'"):
        quantize(tiny(), "int4-weight", backend="pt2e")
    with pytest.raises(ValueError, match="backend: expected 'torchao' or 'pt2e'.* got 'onnxruntime'"):
        quantize(tiny(), "dynamic", backend="onnxruntime")


def test_a_pt2e_file_whose_observers_do_not_match_is_refused(tmp_path):
    model = tiny()
    path = pt2e.quantize(model, "dynamic", towers=["image"], compile=False).save_pretrained(tmp_path / "q")
    file = path / pt2e.QPARAMS_FILE
    tensors, metadata = load_file(file), load_file_metadata(file)
    dropped = sorted(tensors)[0].rsplit(".", 1)[0]
    save_file({k: v for k, v in tensors.items() if not k.startswith(dropped + ".")}, str(file), metadata=metadata)
    with pytest.raises(ValueError, match="image_encoder graph's observers .* differ from the file's"):
        pt2e.load(path, device="cpu")
    with pytest.raises(ValueError, match="got device 'meta'"):
        pt2e.load(path, device="meta")


def test_cli_writes_a_pt2e_model_and_refuses_methods_it_lacks(float_dir, tmp_path, capsys):  # noqa: F811
    from mmformer.cli.main import main

    main(["quantize", "--model", str(float_dir), "--backend", "pt2e", "--method", "dynamic", "--towers", "image",
          "--out", str(tmp_path / "q")])  # fmt: skip
    assert "pt2e dynamic int8 graphs image_encoder" in capsys.readouterr().out
    loaded = pt2e.load(tmp_path / "q", compile=False)
    assert loaded.mode == "dynamic" and sorted(loaded.graphs) == ["image_encoder"]
    # the folder also holds the float model: loading it as a model says what it gets
    with pytest.warns(UserWarning, match=r"a pt2e int8 folder; from_pretrained loads its float model"):
        float_model = mmformer.from_pretrained(tmp_path / "q")
    assert float_model.quantization is None
    with pytest.raises(SystemExit, match=r"--method: expected one of dynamic, static, got 'int4-weight' "
                                         r"\(--backend pt2e\)"):  # fmt: skip
        main(["quantize", "--model", str(float_dir), "--backend", "pt2e", "--method", "int4-weight", "--out",
              str(tmp_path / "x")])  # fmt: skip
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backend", ["pt2e", "torchao", "onnxruntime"])
def test_an_image_encoder_alone_calibrates_from_images_without_texts(backend, tmp_path, capsys):
    """A timm ViT (no text tower, no tokenizer) quantizes statically from a manifest of images alone, through every
    backend — calibration asked for a tokenizer before ("needs the model's processor with its tokenizer") — and the
    written model, reloaded, encodes close to float; a model that reads text still needs the tokenizer."""
    import json

    from test_convert_timm import tiny_vit

    from mmformer.cli.main import main
    from mmformer.convert import from_timm_vit
    from mmformer.preprocess.processor import Processor

    model = from_timm_vit(tiny_vit()).eval()
    assert model.processor.tokenizer is None
    model.save_pretrained(tmp_path / "vit")
    digits = REPO / "data" / "digits"
    rows = [json.loads(line) for line in (digits / "test.jsonl").read_text().splitlines()[:8]]
    images = tmp_path / "images.jsonl"
    images.write_text("".join(json.dumps({"image": str(digits / r["image"])}) + "\n" for r in rows))
    batches = calibration_batches(model, images, batch_size=4)
    assert [sorted(k for k in b if k != "source") for b in batches] == [["pixel_values"]] * 2
    main(["quantize", "--model", str(tmp_path / "vit"), "--backend", backend, "--method", "static", "--calib",
          str(images), "--out", str(tmp_path / "q")])  # fmt: skip
    assert "static" in capsys.readouterr().out
    x = batches[0]["pixel_values"]
    with torch.no_grad():
        expected = model.encode_image(x)
        if backend == "pt2e":
            got = pt2e.load(tmp_path / "q", compile=False).encode_image(x)
        elif backend == "torchao":
            got = mmformer.from_pretrained(tmp_path / "q").encode_image(x)
        else:
            from mmformer.ship.onnx_runner import OnnxModel

            files = [str(digits / r["image"]) for r in rows[:4]]
            runner = OnnxModel(tmp_path / "q")
            got = torch.from_numpy(runner.encode_image(files))
            with pytest.raises(ValueError, match=r"this export has no audio_encoder graph; it has \['image_encoder'\]"):
                runner.transcribe([str(digits / rows[0]["audio_filepath"])])  # was numpy's matmul error
    assert 0 < float((got - expected).abs().max()) <= 0.05
    for samples in (0, -5):  # calibrated on one sample before
        with pytest.raises(ValueError, match=rf"max_samples: expected an int >= 1, got {samples}"):
            calibration_batches(model, images, max_samples=samples)
    if backend == "torchao":
        with pytest.raises(SystemExit, match=r"--towers: only with --backend pt2e or onnxruntime"):  # it quantized all
            main(["quantize", "--model", str(tmp_path / "vit"), "--method", "dynamic", "--towers", "image",
                  "--out", str(tmp_path / "t")])  # fmt: skip
    reads_text = tiny()
    reads_text.processor = Processor(image=reads_text.processor.image, audio=reads_text.processor.audio)
    with pytest.raises(ValueError, match=r"this model reads text .* needs its processor's tokenizer"):
        calibration_batches(reads_text, images)


def int8_micro_kernels() -> bool:
    """Whether inductor has an int8 GEMM micro-kernel for this CPU (AMX or AVX-512 VNNI)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = str(pick_vec_isa())
    return "amx_tile" in isa or "avx512_vnni" in isa


def generated_code(model: pt2e.PT2EModel, graph: str) -> str:
    """The Python (with its C++ kernels as strings) inductor generated for one compiled graph; read from the files,
    so a graph inductor took from its on-disk cache shows its code too."""
    return "".join(Path(m.__file__).read_text(encoding="utf-8") for m in model._compiled[graph]._modules)


@pytest.mark.slow
def test_compiled_pt2e_graphs_answer_as_the_reference_graphs():
    """inductor lowers a dynamic graph's q/dq patterns to oneDNN int8 kernels: the answers stay those of the
    reference graphs up to their rounding (a few quantization steps of the output). The graphs compile with
    inductor's freezing, and leave it as it was for whatever the process compiles next (set process-wide, it froze a
    static KV cache's write position in a later compiled decoding: tests/test_static_cache.py failed after this test
    in one process)."""
    import torch._inductor.config as inductor

    before = inductor.freezing
    model = tiny(depth=1)  # one block: compile time grows with the graph
    reference = pt2e.quantize(model, "dynamic", towers=["image"], compile=False)
    gc.collect()
    held = len(frozen_tensors())  # what other tests in this process still hold
    compiled = pt2e.PT2EModel(model, "dynamic", reference.graphs, reference.qparams, compile=True)
    x = inputs()["pixel_values"]
    expected, got = reference.encode_image(x), compiled.encode_image(x)
    assert float((got - expected).abs().max()) <= 0.03
    assert inductor.freezing == before
    # oneDNN's int8 kernels, not inductor's C++ GEMM templates (which static graphs use): with them, torch 2.14's
    # dynamic-activation graphs corrupted the heap
    code = generated_code(compiled, "image_encoder")
    assert "qlinear_pointwise" in code and "micro_gemm" not in code
    # its frozen weights go with it (torch keeps a frozen graph's constants for the process's life otherwise)
    assert len(frozen_tensors()) > held
    del compiled
    gc.collect()
    assert len(frozen_tensors()) == held


@pytest.mark.slow  # two graphs compiled with the templates (one block: compile time grows with the graph)
def test_compiled_static_int8_runs_cpp_gemm_templates_as_its_reference_graphs(manifest):  # noqa: F811
    """Static graphs compile their int8 linear layers as inductor's C++ GEMM templates (oneDNN's qlinear spends most
    of a small layer's time outside its kernel: pt2e_model.STATIC_GEMMS): the decoded ids are the reference graphs', the
    image tower left in float. (An image tower through the templates at several row counts:
    test_compiled_int8_of_a_converted_open_clip_answers_as_its_reference_graphs; dynamic graphs keep oneDNN's:
    test_compiled_pt2e_graphs_answer_as_the_reference_graphs.)"""
    model = tiny(depth=1)
    calibration = calibration_batches(model, manifest, batch_size=4)
    reference = pt2e.quantize(model, "static", calibration=calibration, towers=["decoder"], compile=False)
    compiled = pt2e.PT2EModel(model, "static", reference.graphs, reference.qparams, compile=True)
    x = inputs()["pixel_values"]
    assert torch.equal(compiled.generate(image=x, max_new_tokens=6), reference.generate(image=x, max_new_tokens=6))
    # and no graph twice: the decoding's first step (a past of one position) runs its later steps' graph
    graphs = {name: len(fn._graphs) for name, fn in compiled._compiled.items()}
    assert graphs == {"decoder_model": 1, "decoder_with_past_model": 1}, graphs
    if int8_micro_kernels():
        for graph in ("decoder_model", "decoder_with_past_model"):
            code = generated_code(compiled, graph)
            assert "micro_gemm" in code and "qlinear_pointwise" not in code, graph


def test_a_graph_the_templates_cannot_lower_compiles_with_onednn():
    """With C++ templates as the only GEMM backend, a product no template serves (here a Gram matrix of activations:
    templates need a constant right-hand side) has no choice, and inductor raises NoValidChoicesError at the first
    call: that graph compiles again without the templates, with a warning, and answers as its reference graph."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    class LinearThenGram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:  # (B, 32) → (B, B)
            y = self.proj(x)
            return (y @ y.T,)

    torch.manual_seed(0)
    x = torch.randn(4, 32)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=False))
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(LinearThenGram().eval(), (x,)).module(), quantizer)
        prepared(x)
        graph = convert_pt2e(prepared)
        expected = graph(x)[0]
    compiled = pt2e.PT2EModel(torch.nn.Identity(), "static", {"image_encoder": graph}, {}, compile=True)
    with pytest.warns(UserWarning, match="the image_encoder graph runs oneDNN's int8 kernels.*NoValidChoicesError"):
        got = compiled.run("image_encoder", x)[0]
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
    assert "qlinear_pointwise" in generated_code(compiled, "image_encoder")
    assert torch.equal(compiled.run("image_encoder", x)[0], got)  # the second call runs the fallback, silently


def test_templates_parsed_once_keeps_each_parsed_source_and_puts_the_method_back():
    """Inside ``templates_parsed_once`` one source gives one parsed Jinja template (torch parses it again at every
    call otherwise); the original method is back afterwards, also when the block raises."""
    from torch._inductor.codegen.common import KernelTemplate

    from mmformer.layers.freezing import templates_parsed_once

    original = vars(KernelTemplate)["_template_from_string"]
    source = "{{ name }} = {{ value }};"
    assert KernelTemplate._template_from_string(source) is not KernelTemplate._template_from_string(source)
    with templates_parsed_once():
        first = KernelTemplate._template_from_string(source)
        assert KernelTemplate._template_from_string(source) is first
        assert first.render(name="x", value=3) == "x = 3;"
        assert KernelTemplate._template_from_string("{{ other }}") is not first
    assert vars(KernelTemplate)["_template_from_string"] is original
    with pytest.raises(RuntimeError, match="inside"), templates_parsed_once():
        raise RuntimeError("inside")
    assert vars(KernelTemplate)["_template_from_string"] is original


def test_a_static_int8_compile_parses_each_template_source_once(monkeypatch):
    """A static graph's compile (C++ GEMM templates) renders its templates from sources parsed once each, not once
    per render (what torch 2.14 does: 38.9 → 28.1 s for whisper-tiny's first static int8 decoding), and answers as
    its reference graph."""
    import jinja2
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from mmformer.layers import freezing

    freezing._parsed_template.cache_clear()  # parsed by an earlier compile of this process, a source is not parsed
    parsed: list[str] = []
    from_string = jinja2.Environment.from_string

    def counted(self, source, *args, **kwargs):
        parsed.append(source)
        return from_string(self, source, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "from_string", counted)
    torch.manual_seed(0)
    x = torch.randn(4, 64)

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:  # (B, 64) → (B, 64), as the towers' graphs: a tuple
            return (self.second(self.first(x).relu()),)

    layers = TwoLayers().eval()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=False))
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(layers, (x,)).module(), quantizer)
        prepared(x)
        graph = convert_pt2e(prepared)
        expected = graph(x)[0]
    compiled = pt2e.PT2EModel(torch.nn.Identity(), "static", {"image_encoder": graph}, {}, compile=True)
    got = compiled.run("image_encoder", x)[0]
    assert float((got - expected).abs().max()) <= 1e-5
    if int8_micro_kernels():  # the templates ran (elsewhere oneDNN's kernels may serve, with no template)
        assert "micro_gemm" in generated_code(compiled, "image_encoder")
        assert parsed, "no template was parsed"
    repeated = {source[:60] for source in parsed if parsed.count(source) > 1}
    assert not repeated, f"parsed more than once: {sorted(repeated)}"


def test_static_int8_of_a_text_to_text_model_calibrates_its_decoder_on_the_text_encoders_states():
    """T5 (text encoder → decoder): calibration feeds the decoder graphs the text encoder's states (before, static
    int8 stopped with "the batches reached no input of the graphs ['decoder_model', ...]"), and generate reads
    ``input_ids`` through the int8 text encoder; the decoder's logits stay close to the float model's."""
    import test_convert_text

    from mmformer.convert import from_hf_t5

    model = from_hf_t5(test_convert_text.t5("v1.1")).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, test_convert_text.V, (4, 7), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -2:] = False
    quantized = pt2e.quantize(model, "static", calibration=[{"input_ids": ids, "attention_mask": mask}],
                              compile=False)  # fmt: skip
    assert {"text_encoder", "decoder_model", "decoder_with_past_model"} <= set(quantized.graphs)
    start = torch.full((4, 1), model.config.text.bos_id)
    with torch.no_grad():
        memory, _ = model.encode_text_tokens(ids, mask)
        expected = model.decode(start, memory, mask)
        unread = model.decode(start, torch.zeros_like(memory), mask)  # what the logits would be without the text
        states = quantized.run("text_encoder", ids, mask)[1]
        got = quantized.run("decoder_model", start, states, mask)[0]
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 0.1 * scale
    assert float((unread - expected).abs().max()) > 0.3 * scale  # the memory matters: the check above can fail
    out = quantized.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    assert out.shape[0] == 4 and torch.equal(out[:, 0], start[:, 0])
    assert torch.equal(out[:, 1], got[:, -1].argmax(-1))
    with pytest.raises(ValueError, match="expected at most one of image=, audio=, audio_features=, input_ids="):
        quantized.generate(input_ids=ids, image=torch.zeros(4, 3, 16, 16))


def test_pt2e_audio_graph_serves_every_frame_count_of_a_strided_convolution():
    """The exported audio graph guards on the frame count modulo the convolution stride (its example's residue):
    the inputs are padded with frames past every clip's length, which the float model reads as silence."""
    from mmformer.config import AudioConfig, ModelConfig, StackConfig, TextConfig
    from mmformer.model import MultimodalTransformer

    torch.manual_seed(0)
    config = ModelConfig(
        stacks={"shared": StackConfig(width=32, depth=1, n_heads=4)},
        routes={"audio": "shared", "text": "shared"},
        image=None,
        audio=AudioConfig(**{**TINY_AUDIO, "conv_stride": 4}),
        text=TextConfig(**TINY_TEXT),
        embed_dim=16,
    )
    model = MultimodalTransformer(config).eval()
    quantized = pt2e.quantize(model, "dynamic", towers=["audio"], compile=False)
    g = torch.Generator().manual_seed(2)
    for frames in (25, 26, 27, 28):
        features = torch.randn(2, 8, frames, generator=g)
        lengths = torch.tensor([frames, frames - 3])
        with torch.no_grad():
            expected = model.encode_audio(audio_features=features, feature_lengths=lengths)
        got = quantized.encode_audio(audio_features=features, feature_lengths=lengths)
        assert float((got - expected).abs().max()) <= 0.03, frames


def converted_open_clip(layers: int = 2):
    """A small open_clip CLIP (``layers`` blocks per tower) converted to mmformer, with one calibration batch."""
    open_clip = pytest.importorskip("open_clip")
    from mmformer.convert import from_open_clip

    torch.manual_seed(0)
    peer = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=16, width=32, layers=layers, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=layers),
    )
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 60, (4, 8), generator=g)
    batch = {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "input_ids": ids,
             "attention_mask": torch.ones_like(ids, dtype=torch.bool)}  # fmt: skip
    return from_open_clip(peer).eval(), batch, g


def test_static_int8_of_a_converted_open_clip_quantizes_both_towers():
    """The causal text tower exports (no data-dependent padding branch in attention): static int8 of an open_clip
    CLIP's conversion calibrates and runs both towers, close to the float model."""
    model, batch, g = converted_open_clip()
    quantized = pt2e.quantize(model, "static", calibration=[batch], compile=False)
    assert sorted(quantized.graphs) == ["image_encoder", "text_encoder"]
    pixels, text = torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 60, (2, 8), generator=g)
    with torch.no_grad():
        expected = (model.encode_image(pixels), model.encode_text(text))
    got = (quantized.encode_image(pixels), quantized.encode_text(text))
    for e, q in zip(expected, got):
        assert 0 < float((q - e).abs().max()) <= 0.06


@pytest.mark.slow
def test_compiled_int8_of_a_converted_open_clip_answers_as_its_reference_graphs():
    """Compiled with freezing, an int8 projection of the pooled class token answered 0.73 away from its reference
    graph (an embedding of norm 1; torch 2.14; static and dynamic alike, so one mode is tested, and one block per
    tower: compile time grows with the graph): the pooled projections stay float, and compiled answers are the
    reference graphs' up to float rounding."""
    mode = "static"
    model, batch, g = converted_open_clip(layers=1)
    reference = pt2e.quantize(model, mode, calibration=[batch], compile=False)
    compiled = pt2e.PT2EModel(model, mode, reference.graphs, reference.qparams, compile=True)
    pixels, text = torch.randn(3, 3, 32, 32, generator=g), torch.randint(1, 60, (2, 8), generator=g)
    # two row counts of images (not 1: dynamo specializes a size of 1, so one row would compile a graph of its own)
    for encode, x in (("encode_image", pixels[:2]), ("encode_image", pixels), ("encode_text", text)):
        expected, got = getattr(reference, encode)(x), getattr(compiled, encode)(x)
        assert float((got - expected).abs().max()) <= 1e-4, (encode, len(x))
    assert {name: len(fn._graphs) for name, fn in compiled._compiled.items()} == {"image_encoder": 1, "text_encoder": 1}
    if (
        int8_micro_kernels()
    ):  # static graphs' int8 linear layers run inductor's C++ GEMM templates (pt2e_model.STATIC_GEMMS)
        code = generated_code(compiled, "image_encoder")
        assert "micro_gemm" in code and "qlinear_pointwise" not in code
