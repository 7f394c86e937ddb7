"""LoRA / DoRA through peft on mmformer's layers, the adapter files peft reads, QLoRA's 4-bit base, a grown
vocabulary, and clear errors for adapters that do not fit."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import tokenizers
import torch

from mmformer import MultimodalTransformer
from mmformer.adapt import adapter_files, adapter_state, adapters, four_bit
from mmformer.adapt.adapters import LoraSettings


@pytest.fixture
def base(make_model_config):
    return MultimodalTransformer(make_model_config()).eval()


def fresh_copy(model: MultimodalTransformer) -> MultimodalTransformer:
    clone = MultimodalTransformer(copy.deepcopy(model.config)).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def outputs(model: MultimodalTransformer) -> torch.Tensor:
    """Every head at once: image/audio/text embeddings and decoder logits, on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    pixels, audio = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 800, generator=g)
    ids = torch.randint(3, 32, (2, 6), generator=g)
    with torch.no_grad():
        memory, _ = model.encode_image_tokens(pixels)
        parts = [model.encode_image(pixels), model.encode_audio(audio), model.encode_text(ids)]
        parts.append(model.decode(ids, memory))
    return torch.cat([p.flatten() for p in parts])


def perturb(model: torch.nn.Module) -> None:
    """Move the adapter away from its identity initialisation (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter_state.adapter_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.numerics
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_merged_unmerged_unloaded_and_peft_files(base, tmp_path, use_dora):
    reference = outputs(base)
    adapted = fresh_copy(base)
    adapters.add_lora(adapted, LoraSettings(r=4, target_modules=["all"], use_dora=use_dora))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # only the adapter trains
    assert any(".attn.fn.qkv.lora_A" in n for n in trainable) and any(".mlp.fn.fc2.lora_B" in n for n in trainable)
    perturb(adapted)
    unmerged = outputs(adapted)
    assert not torch.allclose(unmerged, reference)

    folder = tmp_path / "adapter"
    adapter_files.save_adapter(adapted, folder)
    adapter_files.save_adapter(adapted, folder)  # replaced atomically: nothing left beside it
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is use_dora

    with_peft = peft.PeftModel.from_pretrained(fresh_copy(base), str(folder))  # peft reads our files
    assert torch.equal(outputs(with_peft.base_model.model), unmerged)
    loaded = mmformer_load(base, folder)
    assert torch.equal(outputs(loaded), unmerged)

    merged = adapters.merge_and_unload(loaded)
    assert not adapters.has_adapter(merged) and not any("lora" in k for k in merged.state_dict())
    assert (outputs(merged) - unmerged).abs().max() < 1e-5
    unloaded = adapters.unload(mmformer_load(base, folder))
    assert torch.equal(outputs(unloaded), reference)  # the base, exactly
    assert sorted(unloaded.state_dict()) == sorted(base.state_dict())


def mmformer_load(base: MultimodalTransformer, folder) -> MultimodalTransformer:
    return adapter_files.load_adapter(fresh_copy(base), folder)


def test_from_pretrained_with_adapter_and_merge_command(base, tmp_path):
    from mmformer import from_pretrained
    from mmformer.cli.main import main

    base.save_pretrained(tmp_path / "base")
    adapted = fresh_copy(base)
    adapters.add_lora(adapted, LoraSettings(r=2, target_modules=["qkv", "cross_kv"], routes=["decoder"]))
    perturb(adapted)
    adapter_files.save_adapter(adapted, tmp_path / "adapter")
    loaded = from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert torch.equal(outputs(loaded), outputs(adapted))
    with pytest.raises(ValueError, match="carries adapter layers"):
        loaded.save_pretrained(tmp_path / "wrong")
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    main(["merge", "--base", base_dir, "--adapter", adapter_dir, "--out", str(tmp_path / "m")])
    merged = from_pretrained(tmp_path / "m")
    assert (outputs(merged) - outputs(adapted)).abs().max() < 1e-5


def test_adapter_of_another_base_is_refused_naming_the_module(base, make_model_config, tmp_path):
    other = MultimodalTransformer(make_model_config(stack={"width": 32})).eval()
    adapters.add_lora(other, LoraSettings(r=2, target_modules=["qkv"]))
    adapter_files.save_adapter(other, tmp_path / "adapter")
    target = fresh_copy(base)
    with pytest.raises(ValueError, match=r"another base.*stacks\.shared\.blocks\.0\.attn\.fn\.qkv \(lora_A\.weight: "
                                         r"expected \(2, 16\), found \(2, 32\)\)"):  # fmt: skip
        adapter_files.load_adapter(target, tmp_path / "adapter")
    assert not adapters.has_adapter(target) and torch.equal(outputs(target), outputs(base))  # left as it was


def test_bad_adapter_input_names_it(base, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        adapter_files.load_adapter(fresh_copy(base), tmp_path / "empty")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle"):
        adapter_files.load_adapter(fresh_copy(base), tmp_path / "pickled")
    with pytest.raises(ValueError, match="lora.target_modules: 'attn_out' matches no linear"):
        adapters.add_lora(fresh_copy(base), LoraSettings(target_modules=["attn_out"]))
    with pytest.raises(ValueError, match="fused"):
        adapters.add_lora(fresh_copy(base), LoraSettings(target_modules=["q", "v"]))
    with pytest.raises(ValueError, match=r"lora.routes: expected some of this model's routes"):
        adapters.add_lora(fresh_copy(base), LoraSettings(routes=["video"]))
    for rank in (0, -1):
        with pytest.raises(ValueError, match=rf"lora.r: expected the LoRA rank, an int >= 1, got {rank}"):
            LoraSettings(r=rank)
    with pytest.raises(ValueError, match="lora.quantize"):
        LoraSettings(quantize="int3")


def test_grown_vocabulary_keeps_old_logits_and_travels_with_the_adapter(base, tmp_path):
    from mmformer import Processor
    from mmformer.preprocess.tokenizer import Tokenizer

    ids = torch.randint(3, 32, (2, 5))
    memory, _ = base.encode_image_tokens(torch.randn(2, 3, 16, 16))
    before = base.decode(ids, memory).detach()
    grown = adapters.resize_token_embeddings(fresh_copy(base), 40)
    after = grown.decode(ids, memory).detach()  # (B, T, 40)
    assert torch.equal(after[..., :32], before) and torch.equal(after[..., 32:], torch.zeros_like(after[..., 32:]))
    assert grown.lm_head.weight is grown.text_embed.tokens.weight  # still tied

    new = list(range(32, 40))
    adapters.add_lora(grown, LoraSettings(r=2, target_modules=["qkv"], trainable_token_indices=new))
    perturb(grown)
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 40)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer = Tokenizer(backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")  # 40 ids
    adapter_files.save_adapter(grown, tmp_path / "adapter", processor=Processor(tokenizer))
    loaded = adapter_files.load_adapter(fresh_copy(base), tmp_path / "adapter")  # grows the base to 40 first
    assert loaded.config.text.vocab_size == 40 and torch.equal(outputs(loaded), outputs(grown))
    merged = adapters.merge_and_unload(loaded)  # token rows differ between input and output now: untied
    assert not merged.config.tie_lm_head and (outputs(merged) - outputs(grown)).abs().max() < 1e-5


def captioning_steps(model: MultimodalTransformer, device: str, steps: int = 6) -> list[float]:
    """AdamW steps (lr 1e-2) of a captioning loss on one fixed random batch, training what requires grad; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    pixels, ids = torch.randn(4, 3, 16, 16, device=device), torch.randint(3, 32, (4, 6), device=device)
    losses = []
    for _ in range(steps):
        memory, _ = model.encode_image_tokens(pixels)
        loss = torch.nn.functional.cross_entropy(model.decode(ids[:, :-1], memory).flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_qlora_step_on_a_4bit_base(make_model_config):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = MultimodalTransformer(make_model_config(stack={"width": 64, "n_heads": 4}, audio=None)).train()
    full = four_bit.weight_bytes(model)
    adapters.add_lora(model, LoraSettings(r=4, target_modules=["all"], quantize="nf4"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.dtype == torch.uint8 for m in layers)
    assert four_bit.weight_bytes(model) < full / 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = captioning_steps(model, "cpu")
    assert losses[-1] < losses[0]
    assert all(m.weight.dtype == torch.uint8 for m in layers)  # still 4-bit
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.gpu
def test_qlora_on_cuda(make_model_config):
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = MultimodalTransformer(make_model_config(stack={"width": 64}, audio=None)).cuda().train()
    adapters.add_lora(model, LoraSettings(r=4, target_modules=["all"], quantize="nf4"))
    losses = captioning_steps(model, "cuda")
    assert losses[-1] < losses[0]


def test_added_words_decode_as_written_and_leave_other_text_alone():
    """Adding a new language's words (HF's add_tokens) to a byte-level BPE: a word whose letters are all byte-table
    characters ("fünf") must still decode as written (tokenizers alone gives "f\ufffdnf")."""
    from tokenizers import AddedToken

    from mmformer.preprocess.tokenizer import Tokenizer

    english = ["four two nine", "seven", "one one"]
    base = Tokenizer.train(english * 5, vocab_size=270)
    backend = Tokenizer.from_str(base.backend.to_str()).backend
    backend.add_tokens([AddedToken(w, normalized=True) for word in ("fünf", "drei") for w in (word, " " + word)])
    grown = Tokenizer.from_str(backend.to_str())
    assert grown.vocab_size == base.vocab_size + 4
    assert torch.equal(grown(english)["input_ids"], base(english)["input_ids"])
    german = ["fünf drei", "drei fünf fünf", "fünf"]
    ids = grown(german)["input_ids"]
    assert ids.shape[1] == 5 and int(ids.max()) >= base.vocab_size  # one token per word
    assert grown.batch_decode(ids) == german and grown.decode(ids[0]) == "fünf drei"


@pytest.mark.numerics
def test_qlora_quantizes_what_torchao_quantizes_and_keeps_tied_heads():
    """One rule (quantization.quantizable) for QLoRA's 4-bit base and torchao: a BERT-style masked-LM decoder and an
    LM head that read the token table stay float and tied."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from mmformer.compress.quantization import quantizable
    from mmformer.config import ModelConfig, StackConfig, TextConfig

    config = ModelConfig(
        stacks={"s": StackConfig(width=64, depth=1, n_heads=2, mlp_ratio=2.0)},  # whole 4-bit blocks
        routes={"text": "s", "decoder": "s"},
        image=None,
        audio=None,
        text=TextConfig(vocab_size=48, max_length=16, mask_id=3),
        embed_dim=None,
        mlm_head=True,
        tie_lm_head=True,
    )
    torch.manual_seed(0)
    model = MultimodalTransformer(config).eval()
    chosen = quantizable(model)
    assert "mlm_head.dense" in chosen and "stacks.s.blocks.0.attn.fn.qkv" in chosen
    assert "mlm_head.decoder" not in chosen and "lm_head" not in chosen
    ids = torch.randint(4, 48, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model.mlm_logits(ids).detach()
    adapters.add_lora(model, LoraSettings(r=2, target_modules=["qkv"], quantize="nf4"))
    four_bit = sorted(n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit))
    assert [n.removesuffix(".base_layer") for n in four_bit] == sorted(chosen)
    tokens = model.text_embed.tokens.weight
    assert model.mlm_head.decoder.weight is tokens and model.lm_head.weight is tokens  # still one tensor
    after = model.mlm_logits(ids).detach()  # 4-bit layers inside, the float tied projection at the end
    assert (after - before).norm() < 0.3 * before.norm(), (after - before).norm() / before.norm()  # NF4 rounding


def test_modules_to_save_on_a_tied_table_merges_into_a_loadable_model_and_unloads_exactly(base, tmp_path):
    """A trained copy of the text embedder (modules_to_save) under a tied LM head: merging unties the head (it still
    reads the original table), and unload gives back the original module, not the trained copy."""
    from mmformer import from_pretrained

    assert base.config.tie_lm_head
    reference = outputs(base)
    adapted = fresh_copy(base)
    adapters.add_lora(adapted, LoraSettings(r=2, target_modules=["qkv"], modules_to_save=["text_embed"]))
    perturb(adapted)
    expected = outputs(adapted)
    adapter_files.save_adapter(adapted, tmp_path / "adapter")
    adapters.merge_and_unload(adapted).save_pretrained(tmp_path / "merged")
    assert (outputs(from_pretrained(tmp_path / "merged")) - expected).abs().max() < 1e-5
    unloaded = adapters.unload(mmformer_load(base, tmp_path / "adapter"))
    assert torch.equal(outputs(unloaded), reference)


def test_regex_targets_follow_routes(make_model_config):
    config = make_model_config(audio=None)
    config.stacks["vision"] = copy.deepcopy(config.stacks["shared"])
    config.routes["image"] = "vision"
    two = MultimodalTransformer(config)
    adapters.add_lora(two, LoraSettings(r=2, target_modules=[r".*mlp\.fn\.fc1"], routes=["image"]))
    stacks = {n.split(".blocks")[0] for n, _ in two.named_parameters() if "lora_A" in n}
    assert stacks == {"stacks.vision"}
    with pytest.raises(ValueError, match="routes"):
        adapters.lora_config(
            MultimodalTransformer(config), LoraSettings(target_modules=["text_proj"], routes=["image"])
        )


def test_rslora_reaches_peft_and_the_adapter_file(base, tmp_path):
    adapted = fresh_copy(base)
    adapters.add_lora(adapted, LoraSettings(r=4, target_modules=["qkv"], use_rslora=True))
    perturb(adapted)
    adapter_files.save_adapter(adapted, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    assert torch.equal(outputs(mmformer_load(base, tmp_path / "adapter")), outputs(adapted))
    with pytest.raises(ValueError, match="use_rslora"):
        LoraSettings(use_rslora="yes")


def edited_adapter(base, folder, **changes) -> None:
    """An adapter saved by mmformer, with ``changes`` written into its adapter_config.json (as peft would)."""
    adapted = fresh_copy(base)
    adapters.add_lora(adapted, LoraSettings(r=2, target_modules=["qkv"]))
    perturb(adapted)
    adapter_files.save_adapter(adapted, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return adapted


@pytest.mark.parametrize("changes, match", [({"bias": "all"}, "bias"), ({"init_lora_weights": "pissa"}, "pissa"),
                                            ({"target_modules": ["q_proj", "v_proj"]}, "not translated")])  # fmt: skip
def test_adapters_loading_cannot_apply_exactly_are_refused(base, tmp_path, changes, match):
    edited_adapter(base, tmp_path / "adapter", **changes)
    model = fresh_copy(base)
    with pytest.raises(ValueError, match=match):
        adapter_files.load_adapter(model, tmp_path / "adapter")
    assert torch.equal(outputs(model), outputs(base))


def test_adapter_with_an_init_that_only_sets_its_own_tensors_loads_as_peft_does(base, tmp_path):
    adapted = edited_adapter(base, tmp_path / "adapter", init_lora_weights="orthogonal")
    with_peft = peft.PeftModel.from_pretrained(fresh_copy(base), str(tmp_path / "adapter"))
    expected = outputs(with_peft.base_model.model)
    assert torch.equal(expected, outputs(adapted))
    assert torch.equal(outputs(mmformer_load(base, tmp_path / "adapter")), expected)


def decoded(model: MultimodalTransformer) -> torch.Tensor:
    ids = torch.randint(3, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.decode(ids)


def test_qlora_merges_into_float_weights_after_an_eval_forward_and_4bit_models_do_not_save(make_model_config, tmp_path):
    pytest.importorskip("bitsandbytes")
    from mmformer import from_pretrained

    torch.manual_seed(0)
    model = MultimodalTransformer(
        make_model_config(stack={"width": 64, "cross_attention": False}, audio=None, image=None)
    )
    adapters.add_lora(model, LoraSettings(r=4, target_modules=["all"], quantize="nf4"))
    perturb(model)
    expected = decoded(model.eval())  # on CPU, bitsandbytes repacks the 4-bit weights for eval here
    merged = adapters.merge_and_unload(model)
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
    assert (decoded(merged) - expected).norm() < 1e-2 * expected.norm()  # peft's 4-bit merge: 0.6 off
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(decoded(from_pretrained(tmp_path / "merged")), decoded(merged))
    quantized = four_bit.quantize_4bit(MultimodalTransformer(make_model_config(stack={"width": 64}, audio=None)))
    with pytest.raises(ValueError, match="4-bit layers"):
        quantized.save_pretrained(tmp_path / "four_bit")


def test_qlora_leaves_layers_bitsandbytes_cannot_pack_in_float(make_model_config):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = MultimodalTransformer(
        make_model_config(stack={"width": 32, "cross_attention": False}, audio=None, image=None)
    )
    with pytest.warns(UserWarning, match="stay float"):
        adapters.add_lora(model, LoraSettings(r=2, target_modules=["all"], quantize="nf4"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(m.in_features % 64 == 0 and m.out_features % 32 == 0 for m in layers)
    decoded(model.eval())  # bitsandbytes' CPU eval kernel failed on a width of 32


def test_adapter_folder_given_as_a_model_names_the_merge_command(base, tmp_path):
    from mmformer import from_pretrained

    edited_adapter(base, tmp_path / "adapter", base_model_name_or_path="data/base")
    with pytest.raises(FileNotFoundError, match="mmformer merge --base data/base --adapter .*adapter --out MERGED"):
        from_pretrained(tmp_path / "adapter")
