"""What a path names, beyond a model folder: a file inside a Hugging Face folder, a sentence-transformers folder in the
older layout (its Transformer module in ``0_Transformer/``, as ``modules.json`` says), and a Hub cache whose links
point at deleted blobs. Every model is a tiny random-weight one created here; no test opens a socket."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
import hub_helpers  # noqa: E402
from helpers import randomize_  # noqa: E402
from hub_helpers import put_in_cache  # noqa: E402

import mmformer  # noqa: E402
from mmformer.convert.common import UnsupportedModelError  # noqa: E402
from mmformer.io import hub  # noqa: E402

ATOL = 1e-5
TEXTS = ["the quick brown fox", "a photo of a cat", "dog"]
hf_cache, no_network = hub_helpers.hf_cache, hub_helpers.no_network  # fixtures: an offline cache; no socket opened


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A random BERT folder with a small WordPiece tokenizer (what sentence-transformers' Transformer reads)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(" ".join(TEXTS).split()))]
    backend = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                           ("[SEP]", 3)])  # fmt: skip
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=40, max_position_embeddings=24)  # fmt: skip
    randomize_(BertModel(cfg, add_pooling_layer=False), scale=0.1).save_pretrained(folder)
    BertTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    return folder


def sentence_model(bert_dir, folder, *, dense: bool = False):
    """A sentence-transformers model (CLS pooling, then Normalize) on the tiny BERT, saved by sentence-transformers in
    the current layout, then moved into the older one: the Transformer module's files in ``0_Transformer/``, which
    ``modules.json`` names, and no config.json at the root."""
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer import modules as parts
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models as parts
    modules = [parts.Transformer(str(bert_dir)), parts.Pooling(32, pooling_mode="cls")]
    modules += [parts.Dense(32, 16)] if dense else []
    reference = st.SentenceTransformer(modules=[*modules, parts.Normalize()], device="cpu")
    reference.save(str(folder), create_model_card=False)  # a model card asks the Hub about the base model
    (folder / "0_Transformer").mkdir()
    pipeline = ("modules.json", "config_sentence_transformers.json", "README.md")
    for entry in list(folder.iterdir()):
        if entry.is_file() and entry.name not in pipeline:
            entry.rename(folder / "0_Transformer" / entry.name)
    listed = json.loads((folder / "modules.json").read_text())
    listed[0]["path"] = "0_Transformer"
    (folder / "modules.json").write_text(json.dumps(listed))
    return folder


def encode(model, texts=TEXTS) -> torch.Tensor:
    batch = model.processor(text=texts)
    with torch.no_grad():
        return model.encode_text(batch["input_ids"], batch["attention_mask"])


# ---------------------------------------------------------------------------------------------------- weights files
def test_a_hugging_face_folders_weights_file_loads_as_the_folder(bert_dir):
    """``folder/model.safetensors`` of a Hugging Face folder is that folder (as ``folder/config.json`` is), read by
    its converter: not mmformer's bare weights beside a config.json that is no ModelConfig."""
    source = hub.resolve_source(bert_dir / "model.safetensors")
    assert (source.kind, source.path, source.config["model_type"]) == ("hf", bert_dir, "bert")
    expected = mmformer.from_pretrained(bert_dir)
    assert torch.equal(encode(mmformer.from_pretrained(bert_dir / "model.safetensors")), encode(expected))


def test_our_folders_weights_file_stays_bare_weights(tmp_path):
    """mmformer's own folder's model.safetensors is read as bare weights beside our config.json, as before."""
    config = mmformer.ModelConfig(
        stacks={"shared": mmformer.StackConfig(width=16, depth=1, n_heads=2)}, routes={"text": "shared"},
        image=None, audio=None, text=mmformer.TextConfig(vocab_size=20, max_length=8), embed_dim=8,
    )  # fmt: skip
    torch.manual_seed(0)
    mmformer.MultimodalTransformer(config).save_pretrained(tmp_path / "ours")
    assert hub.resolve_source(tmp_path / "ours" / "model.safetensors").kind == "weights"
    loaded = mmformer.from_pretrained(tmp_path / "ours" / "model.safetensors").state_dict()
    expected = mmformer.from_pretrained(tmp_path / "ours").state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_another_file_in_a_hugging_face_folder_is_refused_naming_the_folder(bert_dir, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(bert_dir, folder)
    shutil.copyfile(folder / "model.safetensors", folder / "finetuned.safetensors")
    with pytest.raises(ValueError, match=r"finetuned.safetensors is a file of a Hugging Face model folder .*loads as a "
                                         rf"whole, from its own weights .*pass the folder: {folder}$"):  # fmt: skip
        mmformer.from_pretrained(folder / "finetuned.safetensors")


# ------------------------------------------------------------------------------------------ sentence-transformers
def test_a_sentence_transformers_folder_in_the_older_layout_loads(bert_dir, tmp_path):
    """modules.json names 0_Transformer/ as the Transformer module: its model, tokenizer and length are read there,
    the pooling (CLS here, not the default mean) and normalisation from the pipeline, as sentence-transformers
    encodes; naming the module's folder itself gives the same model."""
    from sentence_transformers import SentenceTransformer

    folder = sentence_model(bert_dir, tmp_path / "st")
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_tensor=True)
    model = mmformer.from_pretrained(folder)
    assert model.config.text.pool == "cls"
    assert (encode(model) - expected).abs().max().item() < ATOL
    assert torch.equal(encode(mmformer.from_pretrained(folder / "0_Transformer")), encode(model))


def test_a_sentence_transformers_folder_in_the_older_layout_from_the_hub(bert_dir, tmp_path, hf_cache, monkeypatch):
    """From the cache, and fetched as from the Hub: its JSON and text files first, then the Transformer module's
    weights in 0_Transformer/ (safetensors only, as for a model at the root)."""
    folder = sentence_model(bert_dir, tmp_path / "st")
    put_in_cache(hf_cache, "org/st-old", folder)
    source = hub.resolve_source("org/st-old")
    assert (source.kind, source.path.name, source.repo_id) == ("hf", "0_Transformer", "org/st-old")
    assert torch.equal(encode(mmformer.from_pretrained(source)), encode(mmformer.from_pretrained(folder)))

    asked, snapshot = [], tmp_path / "snapshot"

    def fetch(repo_id, patterns, **where):  # snapshot_download: the repository's files that match, into the snapshot
        asked.append(list(patterns))
        for file in folder.rglob("*"):
            name = file.relative_to(folder).as_posix()
            if file.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, snapshot / name)
        return snapshot

    monkeypatch.setattr(hub, "snapshot_files", fetch)
    assert hub.resolve_source("org/st-old").path == snapshot / "0_Transformer"
    assert asked == [["*.json", "*.txt"], [f"0_Transformer/{p}" for p in hub.WEIGHT_FILES["hf"][0]]]
    assert (snapshot / "0_Transformer" / "model.safetensors").is_file()


def test_an_older_layout_pipeline_it_cannot_reproduce_is_refused_by_name(bert_dir, tmp_path):
    folder = sentence_model(bert_dir, tmp_path / "dense", dense=True)
    with pytest.raises(UnsupportedModelError, match=r"modules.json: module 2_Dense \(.*Dense\) is not supported"):
        mmformer.from_pretrained(folder)
    folder = sentence_model(bert_dir, tmp_path / "gone")
    shutil.rmtree(folder / "0_Transformer")
    with pytest.raises(FileNotFoundError, match=r"modules.json: its Transformer module \(0_Transformer .*\) is read "
                                                r"from .*0_Transformer, which has no config.json"):  # fmt: skip
        mmformer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------- broken cache
def test_a_link_to_a_deleted_blob_is_a_broken_cache_entry(bert_dir, hf_cache):
    """A snapshot file whose blob is gone is named as a broken link with its missing target, whether the model is
    named by its Hub id, its snapshot folder or the file — config.json and weights alike."""
    snapshot = hf_cache / "models--org--bert" / "snapshots" / put_in_cache(hf_cache, "org/bert", bert_dir)
    for name in ("model.safetensors", "config.json"):
        blob = os.path.realpath(snapshot / name)
        os.unlink(blob)
        broken = rf"{snapshot / name}: a link to {blob}, which is missing; .* a broken entry"
        for path in ("org/bert", snapshot, snapshot / name):
            with pytest.raises(FileNotFoundError, match=broken):
                mmformer.from_pretrained(path)
