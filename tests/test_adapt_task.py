"""``mmformer fit`` from pretrained weights: init_from (strict, non-strict, vocabulary checks, the checkpoint's
processor), freezing by pattern and route group, LoRA and prompts trained through the CLI and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import WORDS, fit_in_process, tiny_config, write_config, write_pairs
from lightning.pytorch.utilities.model_summary import ModelSummary

from mmformer import ModelConfig, MultimodalTransformer, Processor, from_pretrained
from mmformer.adapt import adapter_files, adapters
from mmformer.cli.training import ConfigError
from mmformer.preprocess.processor import ImageProcessorConfig
from mmformer.preprocess.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny saved model with its processor (a tokenizer trained on the captions), as init_from's source."""
    root = tmp_path_factory.mktemp("adapt")
    train = write_pairs(root, n=12)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    tokenizer = Tokenizer.train(texts, vocab_size=280, max_length=8)
    config = tiny_config(root, train)["model"]["model"]
    config = ModelConfig.from_dict({**config, "text": {**config["text"], "vocab_size": tokenizer.vocab_size}})
    torch.manual_seed(1)
    model = MultimodalTransformer(config)
    image = ImageProcessorConfig(image_size=[16, 16], channels=1, mean=(0.5,), std=(0.5,))
    model.save_pretrained(root / "base", processor=Processor(tokenizer, image))
    return root, train


def adapt_config(root, train, tmp_path, *, max_steps: int = 3, **model):
    """tiny_config with the model taken from ``root/base`` (no model config of its own) and ``model`` options."""
    config = tiny_config(tmp_path, train, max_steps=max_steps, model={"model": None, "init_from": str(root / "base")})
    config["model"].update(model)
    return write_config(tmp_path / "config.yaml", config)


def test_init_from_with_no_steps_is_bit_identical_and_brings_its_processor(pretrained, tmp_path):
    root, train = pretrained
    config = adapt_config(root, train, tmp_path, max_steps=1)
    cli = fit_in_process(config, "--trainer.max_steps", "0")
    saved = from_pretrained(root / "base")
    state = cli.model.model.state_dict()
    assert state.keys() == saved.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())
    assert cli.datamodule.tokenizer.backend.to_str() == saved.processor.tokenizer.backend.to_str()
    assert not (tmp_path / "tokenizer").exists()  # no tokenizer was trained over it
    assert cli.datamodule.processor.image.channels == 1


def test_a_config_that_has_a_model_block_adapts_a_checkpoint_of_that_model(pretrained, tmp_path):
    """README's `fit --config configs/digits.yaml --model.adapt.init_from data/digits_model`: the config's model block
    (the checkpoint's architecture, the vocabulary left at its default 1000) against the checkpoint's table (its own
    tokenizer's size) stopped on the shapes; the config now takes the checkpoint's table size."""
    root, train = pretrained
    saved = from_pretrained(root / "base")
    config = tiny_config(tmp_path, train, max_steps=1, model={"init_from": str(root / "base")})
    assert "vocab_size" not in config["model"]["model"]["text"]  # the default, not the checkpoint's
    cli = fit_in_process(write_config(tmp_path / "config.yaml", config), "--trainer.max_steps", "0")
    state = cli.model.model.state_dict()
    assert cli.model.model.config.text.vocab_size == saved.config.text.vocab_size != 1000
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())


def test_mismatched_checkpoint_lists_keys_and_init_strict_false_initialises_them(pretrained, tmp_path):
    root, train = pretrained
    deeper = from_pretrained(root / "base").config.to_dict()
    deeper["stacks"]["shared"]["depth"] = 2
    config = adapt_config(root, train, tmp_path, model=deeper)
    with pytest.raises(
        ConfigError, match=r"init_from: .*missing keys.*stacks\.shared\.blocks\.1\.attn\.fn\.qkv\.weight"
    ):
        fit_in_process(config, run=False)
    config = adapt_config(root, train, tmp_path, model=deeper, init_strict=False)
    with pytest.warns(UserWarning, match=r"missing keys \(initialised afresh\): stacks\.shared\.blocks\.1\."):
        cli = fit_in_process(config, run=False)
    model, saved = cli.model.model, from_pretrained(root / "base").state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())  # what the file holds, exactly
    assert model.stacks.shared.blocks[1].attn.fn.qkv.weight.abs().sum() > 0  # the new block is initialised


def test_vocabulary_mismatch_names_both_sizes_unless_resized(pretrained, tmp_path):
    root, train = pretrained
    base_vocab = from_pretrained(root / "base").config.text.vocab_size
    bigger = Tokenizer.train([f"{w} {v}" for w in WORDS for v in WORDS] + ["x y z q"] * 5, vocab_size=300)
    assert bigger.vocab_size > base_vocab
    bigger.save(tmp_path / "tokenizer.json")
    config = adapt_config(root, train, tmp_path)
    with pytest.raises(ConfigError, match=rf"tokenizer has {bigger.vocab_size} token ids but .* has {base_vocab} rows"):
        fit_in_process(config, "--data.tokenizer", str(tmp_path / "tokenizer.json"), run=False)
    cli = fit_in_process(config, "--data.tokenizer", str(tmp_path / "tokenizer.json"), "--model.resize_vocab", "true",
                         run=False)  # fmt: skip
    assert cli.model.model.config.text.vocab_size == bigger.vocab_size


def test_frozen_parameters_get_no_grad_no_state_and_stay_identical(pretrained, tmp_path):
    root, train = pretrained
    config = adapt_config(root, train, tmp_path, frozen=["embedders", "heads"], trainable=["logit_scale"])
    cli = fit_in_process(config, run=False)
    task = cli.model
    frozen = {n: p.detach().clone() for n, p in task.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    assert "model.text_embed.tokens.weight" in frozen and "model.image_proj.weight" in frozen
    assert "model.logit_scale" in trainable and "model.stacks.shared.blocks.0.attn.fn.qkv.weight" in trainable
    summary = ModelSummary(task)
    assert summary.trainable_parameters == sum(p.numel() for p in trainable.values())
    assert summary.total_parameters - summary.trainable_parameters == sum(p.numel() for p in frozen.values())
    cli.trainer.fit(task, datamodule=cli.datamodule)
    params = dict(task.named_parameters())
    assert all(torch.equal(params[n], v) and params[n].grad is None for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items())
    state = cli.trainer.optimizers[0].state
    assert {id(p) for p in state} == {id(params[n]) for n in trainable}
    from mmformer.tasks.adapt import parameter_report

    report = parameter_report(task)
    assert f"frozen {sum(p.numel() for p in frozen.values()) / 1e3:.3g} k" in report


def test_bad_freezing_patterns_name_them(pretrained, tmp_path):
    root, train = pretrained
    config = adapt_config(root, train, tmp_path, frozen=["vision_tower"])
    with pytest.raises(ConfigError, match=r"frozen: 'vision_tower' selects no parameter"):
        fit_in_process(config, run=False)


def test_freezing_the_shared_stack_under_lora_names_frozen_and_the_stack(pretrained, tmp_path):
    # the README's adapt block: frozen: [image] takes the shared stack, where every LoRA layer lives, and torch's
    # "optimizer got an empty parameter list" named no option
    root, train = pretrained
    config = adapt_config(root, train, tmp_path, frozen=["image"], lora={"r": 2})
    shared = r"stacks\.shared, the stack of routes \['image', 'text', 'decoder'\]"  # tiny_config: no audio route
    with pytest.raises(ConfigError, match=rf"adapt\.frozen: \['image'\] leaves no parameter to train.*{shared}"):
        fit_in_process(config, run=False)


def test_the_readmes_adapt_block_builds_a_task_as_written(pretrained, tmp_path):
    # README's adapt / distill / qat block was one config that could not run: qat refuses LoRA, frozen: [image] took
    # the shared stack's LoRA layers; distill reads padded batches only, which its command line must say
    import re

    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"### Adapt, compress, ship\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    options = yaml.safe_load(block)
    root, train = pretrained
    options["adapt"]["init_from"] = str(root / "base")
    if options["adapt"].get("lora", {}).get("routes"):
        options["adapt"]["lora"]["routes"] = ["decoder"]  # the tiny base has no audio route
    if "distill" in options:
        assert "--data.packing false" in block
        options["distill"]["teacher"] = str(root / "base")
    config = adapt_config(root, train, tmp_path, **options)
    assert fit_in_process(config, run=False).model.model is not None


@pytest.mark.slow
def test_lora_fit_resumes_and_exports_an_adapter(pretrained, tmp_path):
    root, train = pretrained
    lora = {"r": 2, "target_modules": ["qkv", "mlp"]}
    config = adapt_config(root, train, tmp_path, max_steps=4, lora=lora)
    cli = fit_in_process(config)
    trained = cli.model.model
    assert adapters.has_adapter(trained)
    trained_outputs = probe(trained)

    from mmformer.cli.main import main

    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "adapter")])
    loaded = from_pretrained(root / "base", adapter=tmp_path / "adapter")
    assert torch.equal(probe(loaded), trained_outputs)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        root / "base"
    )
    base_outputs = probe(from_pretrained(root / "base"))
    assert torch.equal(probe(adapters.unload(loaded)), base_outputs)

    resumed = fit_in_process(config, "--ckpt_path", str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")).model.model
    assert torch.equal(probe(resumed), trained_outputs)  # the same steps again, from the middle


def probe(model: MultimodalTransformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    pixels, ids = torch.randn(2, 1, 16, 16, generator=g), torch.randint(3, 20, (2, 5), generator=g)
    with torch.no_grad():
        memory, _ = model.encode_image_tokens(pixels)
        return torch.cat([model.encode_image(pixels).flatten(), model.decode(ids, memory).flatten()])


def test_context_prompt_fit_moves_only_the_prompt_and_exports_it(pretrained, tmp_path):
    root, train = pretrained
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    labelled = root / "labelled.jsonl"  # the same images, each labelled with one class name
    labelled.write_text("".join(json.dumps({**r, "text": r["text"].split()[0]}) + "\n" for r in rows))
    classes = sorted({r["text"].split()[0] for r in rows})
    config = adapt_config(
        root, labelled, tmp_path, max_steps=4, prompt={"kind": "context", "length": 2}, zeroshot_classes=classes
    )
    cli = fit_in_process(config, run=False)
    before = {n: p.detach().clone() for n, p in cli.model.model.named_parameters()}
    start = cli.model.prompt.vectors.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert all(torch.equal(p, before[n]) for n, p in cli.model.model.named_parameters())
    assert not torch.equal(cli.model.prompt.vectors, start)

    from mmformer.adapt.prompts import load_prompt
    from mmformer.cli.main import main

    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "prompt.safetensors")])
    assert torch.equal(load_prompt(tmp_path / "prompt.safetensors").vectors, cli.model.prompt.vectors.detach())
    with pytest.raises(SystemExit, match=r"merge: only a LoRA run's adapter merges into its base"):  # was ignored
        main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--merge", "--out", str(tmp_path / "m")])


def test_context_prompt_fits_on_an_image_folder(pretrained, tmp_path):
    """A CoOp prompt trained on ImageFolder data (images and class labels, no texts): its batches carry no token ids,
    and the step's batch size was read from them (KeyError 'input_ids')."""
    import shutil

    root, train = pretrained
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    classes = sorted({r["text"].split()[0] for r in rows})
    for i, row in enumerate(rows):
        folder = tmp_path / "folder" / row["text"].split()[0]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / row["image"], folder / f"{i}.png")
    config = adapt_config(root, tmp_path / "folder", tmp_path, max_steps=2, prompt={"kind": "context", "length": 2},
                          zeroshot_classes=classes)  # fmt: skip
    cli = fit_in_process(config, "--data.modalities", "[image]", run=False)
    start = cli.model.prompt.vectors.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and not torch.equal(cli.model.prompt.vectors, start)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_qlora_fit_through_the_cli_keeps_a_4bit_base(pretrained, tmp_path, device):
    pytest.importorskip("bitsandbytes")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import bitsandbytes as bnb

    root, train = pretrained
    lora = {"r": 2, "target_modules": ["all"], "quantize": "nf4"}
    config = adapt_config(root, train, tmp_path, max_steps=4, lora=lora)
    precision = ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"] if device == "cuda" else []
    cli = fit_in_process(config, *precision)
    layers = [m for m in cli.model.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.uint8 for m in layers)
    losses = cli.trainer.callback_metrics
    assert torch.isfinite(losses["train/loss"])
    from mmformer.cli.main import main

    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "adapter")])
    loaded = from_pretrained(root / "base", adapter=tmp_path / "adapter")  # onto the full-precision base
    assert adapters.has_adapter(loaded)


def test_decoder_prefix_fit_moves_only_the_prefix(pretrained, tmp_path):
    root, train = pretrained
    config = adapt_config(root, train, tmp_path, prompt={"kind": "decoder_prefix", "length": 2}, contrastive_weight=0)
    # captions as long as the text table (8): the step cuts the decoder's inputs to the 6 positions the prefix leaves
    # (the run stopped part-way at the position table's check before; --data.text_max_length 6 worked around it)
    cli = fit_in_process(config, run=False)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    tokenizer = from_pretrained(root / "base").processor.tokenizer
    assert max(len(tokenizer.encode(t)) for t in texts) > 6  # some do not fit beside the prefix
    before = {n: p.detach().clone() for n, p in cli.model.model.named_parameters()}
    start = cli.model.prompt.vectors.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert all(torch.equal(p, before[n]) for n, p in cli.model.model.named_parameters())
    assert not torch.equal(cli.model.prompt.vectors, start)


def test_inference_commands_take_adapters_and_prompts(pretrained, tmp_path, capsys):
    from mmformer.adapt.prompts import ContextPrompt, DecoderPrefix
    from mmformer.cli.main import main

    root, train = pretrained
    image = str(root / "img" / "0.png")
    base = from_pretrained(root / "base")
    adapters.add_lora(base, adapters.LoraSettings(r=2, target_modules=["cross_attention"]))
    adapter_files.save_adapter(base, tmp_path / "adapter")
    DecoderPrefix(2, 32).save(tmp_path / "prefix.safetensors")
    ContextPrompt(2, 32).save(tmp_path / "context.safetensors")
    main(["caption", "--model", str(root / "base"), "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "3",
          "--prompt", str(tmp_path / "prefix.safetensors"), image])  # fmt: skip
    main(["zeroshot", "--model", str(root / "base"), "--classes", "zero,one,two",
          "--prompt", str(tmp_path / "context.safetensors"), image])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(image + "\t") and out[1] == image and len(out) == 5
    with pytest.raises(SystemExit, match="holds a context prompt, expected a decoder_prefix prompt"):
        main(["caption", "--model", str(root / "base"), "--prompt", str(tmp_path / "context.safetensors"), image])


def test_an_unknown_adapter_setting_is_named_with_the_accepted_keys():
    from mmformer.tasks.adapt import settings

    with pytest.raises(
        ValueError, match=r"adapt\.lora: unknown key\(s\) \['use_rs_lora'\]; accepted keys: .*'use_rslora'"
    ):
        settings({"r": 4, "use_rs_lora": True}, adapters.LoraSettings, "adapt.lora")
    assert settings({"r": 4, "use_rslora": True}, adapters.LoraSettings, "adapt.lora").use_rslora is True
