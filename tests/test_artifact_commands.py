"""The artifact commands on what a user has at hand: a training run's checkpoint (LoRA, prompt, QAT) named where a
model is expected or exported to graphs, quantize options a backend does not read, a merge into a quantized base, a
timm state dict beside timm's config.json, an adapter folder named as a model. Tiny random models, in this process;
each checkpoint is written by the task's own ``on_save_checkpoint``, as ``mmformer fit`` writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_adapt_task import probe  # image embeddings and decoder logits on fixed inputs

from mmformer import ModelConfig, MultimodalTransformer, Processor, StackConfig, TextConfig, from_pretrained
from mmformer.adapt import adapter_files, adapters
from mmformer.cli.main import main
from mmformer.config import ImageConfig
from mmformer.preprocess.processor import ImageProcessorConfig
from mmformer.preprocess.tokenizer import Tokenizer

WORDS = ["zero", "one", "two", "three"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny image–text model (width 32, one block, a captioning decoder) saved with its processor."""
    folder = tmp_path_factory.mktemp("artifacts") / "base"
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(WORDS * 10, vocab_size=280, max_length=8)
    config = ModelConfig(
        stacks={"shared": StackConfig(width=32, depth=1, n_heads=2, cross_attention=True)},
        image=ImageConfig(image_size=[16, 16], patch_size=8, channels=1),
        audio=None,
        text=TextConfig(vocab_size=tokenizer.vocab_size, max_length=8),
        routes={"image": "shared", "text": "shared", "decoder": "shared"},
        embed_dim=16,
    )
    image = ImageProcessorConfig(image_size=16, resize="exact", mean=(0.5,), std=(0.5,), channels=1)
    MultimodalTransformer(config).save_pretrained(folder, processor=Processor(tokenizer, image))
    return folder


def run_checkpoint(path: Path, init_from: str, *, qat: dict | None = None, **adapt) -> torch.nn.Module:
    """A task adapting ``init_from`` (``adapt``: lora / prompt) or fine-tuning it with ``qat``, its trainable weights
    moved off their start (LoRA's B starts at zero), saved at ``path`` as a fit's checkpoint; returns the task."""
    from mmformer.tasks import MultimodalTask

    torch.manual_seed(1)
    task = MultimodalTask(adapt={"init_from": init_from, **adapt}, qat=qat)
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return task


LORA = {"r": 2, "target_modules": ["qkv", "mlp"]}
CONTEXT = {"kind": "context", "length": 2}


# ---------------------------------------------------------------------------------------------------- bug 4
def test_an_adaptation_runs_checkpoint_named_as_a_model_says_how_to_export_it(base, tmp_path):
    """A LoRA run's last.ckpt where a model goes failed on "missing keys ... do not match the model config" (its
    weights are peft's layers); a prompt run's loaded its unchanged base and dropped the prompt, silently."""
    lora, prompt, plain = tmp_path / "lora.ckpt", tmp_path / "prompt.ckpt", tmp_path / "plain.ckpt"
    run_checkpoint(lora, str(base), lora=LORA)
    run_checkpoint(prompt, str(base), prompt=CONTEXT)
    tuned = run_checkpoint(plain, str(base)).model  # a full fine-tune from init_from is a model
    export_it = r"`mmformer export --ckpt .*lora\.ckpt --out ADAPTER`.*--adapter ADAPTER.*--merge"
    with pytest.raises(ValueError, match=rf"the checkpoint of a LoRA run on {base}: .*{export_it}"):
        from_pretrained(lora)
    use_it = rf"`mmformer zeroshot --classes \.\.\. --model {base} --prompt PROMPT\.safetensors`"
    dropped = r"would drop the prompt it learned; write the prompt with `mmformer export --ckpt .*prompt\.ckpt"
    with pytest.raises(SystemExit, match=rf"mmformer zeroshot: error: .*prompt\.ckpt: the checkpoint of a context "
                                         rf"prompt run on {base}: .*{dropped}.*{use_it}"):  # fmt: skip
        main(["zeroshot", "--model", str(prompt), "--classes", "zero,one", "x.png"])
    assert torch.equal(probe(from_pretrained(plain)), probe(tuned))


def test_a_lora_runs_graph_export_takes_the_merged_model_and_a_prompt_run_names_what_serves_it(
    base, tmp_path, monkeypatch
):
    """``export --ckpt LORA_RUN --format onnx`` stopped on missing keys; now it names --merge, and with --merge it
    exports the merged model (the one ``--format pretrained --merge`` writes); a CoOp run's ONNX export wrote its base
    without the prompt — refused, naming the prompt export and ``zeroshot --prompt``."""
    lora, prompt = tmp_path / "lora.ckpt", tmp_path / "prompt.ckpt"
    task = run_checkpoint(lora, str(base), lora=LORA)
    run_checkpoint(prompt, str(base), prompt=CONTEXT)
    exported = []
    monkeypatch.setattr("mmformer.ship.export.export", lambda model, out, **options: exported.append(model))
    with pytest.raises(SystemExit, match=r"lora\.ckpt: the checkpoint of a LoRA run .* --merge --out DIR` \(also with "
                                         r"--format onnx or torch-export\)"):  # fmt: skip
        main(["export", "--ckpt", str(lora), "--format", "onnx", "--out", str(tmp_path / "graphs")])
    main(["export", "--ckpt", str(lora), "--format", "onnx", "--merge", "--out", str(tmp_path / "graphs")])
    main(["export", "--ckpt", str(lora), "--merge", "--out", str(tmp_path / "merged")])
    (model,) = exported
    assert not adapters.has_adapter(model) and model.processor is not None
    assert torch.equal(probe(model), probe(from_pretrained(tmp_path / "merged")))
    torch.testing.assert_close(probe(model), probe(task.model), rtol=0, atol=1e-5)  # the adapter, merged in
    for fmt in ("onnx", "torch-export"):
        with pytest.raises(SystemExit, match=r"a context prompt run on .*exported from it would drop the prompt it "
                                             r"learned; write the prompt .*`mmformer zeroshot"):  # fmt: skip
            main(["export", "--ckpt", str(prompt), "--format", fmt, "--out", str(tmp_path / "graphs")])
    assert len(exported) == 1


# ---------------------------------------------------------------------------------------------------- bug 6
@pytest.mark.parametrize("method", ["dynamic", "int8-weight"])
def test_export_of_a_qat_run_writes_the_model_fit_converted(base, tmp_path, method):
    """A QAT run's checkpoints keep the float weights (fit converts them when it ends); ``export --ckpt`` wrote that
    float model, silently. Now it converts as the task does: the same quantized model, dynamic's asymmetric
    activations included."""
    pytest.importorskip("torchao")
    task = run_checkpoint(tmp_path / "qat.ckpt", str(base), qat={"method": method})
    task.on_fit_end()  # what fit's model becomes
    main(["export", "--ckpt", str(tmp_path / "qat.ckpt"), "--out", str(tmp_path / "model")])
    exported = from_pretrained(tmp_path / "model")
    assert exported.quantization.method == method == task.model.quantization.method
    assert exported.quantization.act_mapping == task.model.quantization.act_mapping
    assert torch.equal(probe(exported), probe(task.model))


# ---------------------------------------------------------------------------------------------------- bug 10
@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (["--backend", "pt2e", "--method", "dynamic", "--embeddings"], "--embeddings: only with --backend torchao"),
        (["--backend", "onnxruntime", "--method", "dynamic", "--float-storage", "bfloat16"],
         "--float-storage: only with --backend torchao"),
        (["--backend", "pt2e", "--method", "dynamic", "--group-size", "64"],
         "--group-size: only with --backend torchao --method int4-weight"),
        (["--method", "int8-weight", "--group-size", "64"], "--group-size: only with --backend torchao --method int4"),
        (["--method", "dynamic", "--calib", "calib.jsonl"], "--calib: only with --method static; got 'calib.jsonl'"),
        (["--method", "dynamic", "--towers", "image"], "--towers: only with --backend pt2e or onnxruntime"),
    ],
)  # fmt: skip
def test_quantize_refuses_options_its_backend_or_method_would_ignore(base, tmp_path, monkeypatch, options, refusal):
    called = []
    monkeypatch.setattr("mmformer.io.auto.load_pretrained", lambda *a, **k: called.append(a))  # no work may start
    with pytest.raises(SystemExit, match=rf"mmformer quantize: error: {refusal}"):
        main(["quantize", "--model", str(base), *options, "--out", str(tmp_path / "q")])
    assert not called


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (["--method", "dynamic", "--device", "meta"], "--device: expected a device that holds the weights' values"),
        (["--backend", "pt2e", "--method", "dynamic", "--device", "meta"], "--device: .* got 'meta'"),
        (["--method", "static", "--calib", "calib.jsonl", "--calib-samples", "0"],
         "--calib-samples: expected an int >= 1, got 0"),
    ],
)  # fmt: skip
def test_quantize_names_the_flag_of_a_bad_device_or_sample_count(base, tmp_path, monkeypatch, options, refusal):
    """--device meta failed in the loader ("no values for logit_scale"), --calib-samples 0 in the calibration under
    its Python name (max_samples): both are refused before loading, naming the flag."""
    called = []
    monkeypatch.setattr("mmformer.io.auto.load_pretrained", lambda *a, **k: called.append(a))  # no work may start
    with pytest.raises(SystemExit, match=rf"mmformer quantize: error: {refusal}"):
        main(["quantize", "--model", str(base), *options, "--out", str(tmp_path / "q")])
    assert not called


def test_the_quantize_options_table_knows_the_parsers_defaults():
    import argparse

    from mmformer.cli.artifacts import QUANTIZE_OPTIONS
    from mmformer.cli.parser import build as _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["quantize"]
    assert {name: sub.get_default(name) for name in QUANTIZE_OPTIONS} == {
        name: option.unset for name, option in QUANTIZE_OPTIONS.items()
    }


# ---------------------------------------------------------------------------------------------------- bug 13
def test_merge_into_a_quantized_base_is_refused_naming_its_quantization(base, tmp_path):
    pytest.importorskip("torchao")
    from mmformer.compress.quantization import quantize

    model = from_pretrained(base)
    adapters.add_lora(model, adapters.LoraSettings(**LORA))
    adapter_files.save_adapter(model, tmp_path / "adapter", base_model=str(base))
    quantize(from_pretrained(base), "int8-weight").save_pretrained(tmp_path / "int8")
    with pytest.raises(SystemExit, match=r"--base: .*int8 holds int8-weight quantized weights .* merge into the float "
                                         r"model, then quantize"):  # fmt: skip  # was peft's TorchaoLoraLinear error
        main(["merge", "--base", str(tmp_path / "int8"), "--adapter", str(tmp_path / "adapter"), "--out",
              str(tmp_path / "merged")])  # fmt: skip
    assert not (tmp_path / "merged").exists()


# ---------------------------------------------------------------------------------------------------- bug 14
def test_a_timm_state_dict_converts_with_the_architecture_of_timms_config_json(tmp_path):
    """A state dict beside timm's config.json (``save_for_hf``'s layout) needed ``model_name``, which ``mmformer
    convert`` cannot pass, and ``--from timm_vit`` on a timm folder failed where auto-detection worked: both now
    build timm's model from that config, and give what auto-detection gives."""
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=32, depth=1, num_heads=2, img_size=32,
                            num_classes=5, pretrained_cfg_overlay={"mean": (0.5,) * 3, "std": (0.5,) * 3})  # fmt: skip
    timm.models.save_for_hf(vit.eval(), tmp_path / "timm", safe_serialization=True)
    from mmformer.convert import from_timm_vit

    detected = from_pretrained(tmp_path / "timm")
    x = torch.randn(2, 3, 32, 32)
    from_file = from_timm_vit(tmp_path / "timm" / "model.safetensors")  # model_name: None
    forced = from_pretrained(tmp_path / "timm", source="timm_vit")  # `mmformer convert --from timm_vit FOLDER`
    for model in (from_file, forced):
        assert torch.equal(model.encode_image(x, normalize=False), detected.encode_image(x, normalize=False))
        assert model.processor.to_dict() == detected.processor.to_dict()
        assert model.processor.image.mean == (0.5,) * 3  # the config's pretrained_cfg, not the architecture's default


def test_convert_takes_the_timm_architecture_of_a_bare_state_dict_by_flag(tmp_path):
    """``mmformer convert STATE_DICT.pt --from timm_vit`` could not name the architecture: "model_name: ... got
    None", with no flag for it. ``--model-name`` reaches the converter, and the error names the flag."""
    import argparse

    from mmformer.cli import artifacts

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False).eval()  # timm's own test model: 0.37 M parameters
    torch.save(vit.state_dict(), tmp_path / "sd.pt")
    parser = argparse.ArgumentParser()  # convert's own flags beside those main's parser gives every command
    parser.add_argument("src")
    for flag in ("--from", "--out", "--revision"):
        parser.add_argument(flag, dest=flag[2:].replace("from", "source"))
    parser.add_argument("--overwrite", action="store_true")
    artifacts.add_convert_options(parser)
    args = [str(tmp_path / "sd.pt"), "--from", "timm_vit", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"^--model-name: model_name: a state dict needs the timm architecture name"):
        artifacts.convert(parser.parse_args(args))
    artifacts.convert(parser.parse_args([*args, "--model-name", "test_vit"]))
    expected = from_pretrained(tmp_path / "sd.pt", source="timm_vit", model_kwargs={"model_name": "test_vit"})
    got = from_pretrained(tmp_path / "out").state_dict()
    assert got.keys() == expected.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    with pytest.raises(ValueError, match=r"--model-name: only for --from timm_vit or open_clip .*got --from hf_clip"):
        artifacts.convert(parser.parse_args([*args[:1], "--from", "hf_clip", "--out", "o", "--model-name", "x"]))


# ---------------------------------------------------------------------------------------------------- bug 15
def test_an_adapter_folder_named_as_a_model_names_its_base(base, tmp_path):
    model = from_pretrained(base)
    adapters.add_lora(model, adapters.LoraSettings(**LORA))
    adapter_files.save_adapter(model, tmp_path / "adapter", base_model=str(base))
    with pytest.raises(FileNotFoundError, match=rf"a LoRA adapter folder .* --model {base} --adapter .*adapter"):
        from_pretrained(tmp_path / "adapter")  # was "no model.safetensors in this folder"


def test_a_relative_init_from_is_recorded_and_named_as_an_absolute_path(base, tmp_path, monkeypatch):
    """fit given ``init_from: base`` (relative) wrote ``base_model_name_or_path: base`` into the exported adapter,
    which loads from nowhere but that folder's parent; a Hub id stays as given."""
    monkeypatch.chdir(base.parent)
    run_checkpoint(tmp_path / "lora.ckpt", "base", lora=LORA)
    assert torch.load(tmp_path / "lora.ckpt", weights_only=True)["mmformer"]["init_from"] == str(base)
    main(["export", "--ckpt", str(tmp_path / "lora.ckpt"), "--out", str(tmp_path / "adapter")])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base
    )
    from mmformer.tasks.adapt import base_name

    assert base_name("openai/whisper-tiny") == "openai/whisper-tiny"


def test_static_int8_of_a_decoder_only_model_says_why_static_cannot_run(tmp_path):
    """torchao's static int8 of a decoder-only LM answered with the exporter's words about ``towers:``, which neither
    the user gave nor torchao takes; the refusal now says static calibrates through the exported graphs."""
    pytest.importorskip("torchao")
    tokenizer = Tokenizer.train(WORDS * 10, vocab_size=280, max_length=8)
    config = ModelConfig(
        stacks={"decoder": StackConfig(width=32, depth=1, n_heads=2)},
        routes={"decoder": "decoder"},
        image=None,
        audio=None,
        text=TextConfig(vocab_size=tokenizer.vocab_size, max_length=8),
    )
    MultimodalTransformer(config).save_pretrained(tmp_path / "lm", processor=Processor(tokenizer))
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": f"{w} one"}) + "\n" for w in WORDS))
    with pytest.raises(SystemExit, match=r"--method static: torchao calibrates every tower of the model through its "
                                         r"exported graph, and the decoder of a decoder-only language model is not "
                                         r"exportable yet"):  # fmt: skip
        main(["quantize", "--model", str(tmp_path / "lm"), "--method", "static", "--calib",
              str(tmp_path / "calib.jsonl"), "--out", str(tmp_path / "q")])  # fmt: skip
