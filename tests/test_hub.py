"""mmformer.from_pretrained by name, offline: Hub ids resolved from a Hugging Face cache built on disk (refs,
snapshots, revisions, HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE), the converter picked by ``model_type``, open_clip tags
and timm names through their libraries' caches, and clear errors for what is missing or unsupported. Every model is
a tiny random-weight one created here; no test may open a socket (``no_network``)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
import hub_helpers  # noqa: E402
from helpers import randomize_  # noqa: E402
from hub_helpers import config_reads, put_in_cache  # noqa: E402

import mmformer  # noqa: E402
from mmformer import MultimodalTransformer  # noqa: E402
from mmformer.io import hub  # noqa: E402
from mmformer.io.auto import HF_CONVERTERS  # noqa: E402

ATOL = 1e-4
hf_cache, no_network = hub_helpers.hf_cache, hub_helpers.no_network  # fixtures: an offline cache; no socket opened


def tiny_clip(**text_options):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, eos_token_id=98, bos_token_id=97, pad_token_id=1)  # fmt: skip
    text.update(text_options)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4)  # fmt: skip
    return randomize_(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), scale=0.1)


def tiny_bert(kind: str = "bert"):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    config, model = (BertConfig, BertModel) if kind == "bert" else (RobertaConfig, RobertaModel)
    cfg = config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                 max_position_embeddings=24, pad_token_id=1)  # fmt: skip
    return randomize_(model(cfg, add_pooling_layer=False), scale=0.1)


def tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=60, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                        max_source_positions=20, max_target_positions=16, pad_token_id=4, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=3, suppress_tokens=[5],
                        begin_suppress_tokens=[2])  # fmt: skip
    return randomize_(WhisperForConditionalGeneration(cfg), scale=0.1)


def tiny_siglip():
    from transformers import SiglipConfig, SiglipModel

    text = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=10, pad_token_id=1, eos_token_id=1, bos_token_id=49)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=8)  # fmt: skip
    return randomize_(SiglipModel(SiglipConfig(text_config=text, vision_config=vision)), scale=0.1)


def saved(model, folder):
    model.save_pretrained(folder)
    return folder


def image_diff(ours: MultimodalTransformer, pixels: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours.encode_image(pixels) - torch.nn.functional.normalize(reference, dim=-1)).abs().max().item()


# ---------------------------------------------------------------------------------------------------- guard
def test_the_network_guard_refuses_connections(no_network):
    with pytest.raises(AssertionError, match="network connection"):
        socket.create_connection(("huggingface.co", 443))
    with socket.socket() as s, pytest.raises(AssertionError, match="network connection"):
        s.connect(("127.0.0.1", 9))
    assert len(no_network) == 2  # recorded: the guard fails any other test at teardown
    no_network.clear()


def test_names_are_told_apart(tmp_path):
    assert hub.parse_name("openai/whisper-tiny") == hub.HubSource("hub", "openai/whisper-tiny")
    assert hub.parse_name("bert-base-uncased").kind == "hub"
    assert hub.parse_name("open_clip:ViT-B-32/openai") == hub.HubSource("open_clip", "ViT-B-32", "openai")
    assert hub.parse_name("open_clip:hf-hub:laion/CoCa") == hub.HubSource("open_clip", "hf-hub:laion/CoCa")
    assert hub.parse_name("timm:vit_small_patch14_reg4_dinov2.lvd142m").kind == "timm"
    assert hub.parse_name(tmp_path).kind == "path"
    assert hub.parse_name("./not/there").kind == "path"
    with pytest.raises(ValueError, match="open_clip:MODEL/TAG"):
        hub.parse_name("open_clip:ViT-B-32")
    with pytest.raises(TypeError, match="name_or_path"):
        mmformer.from_pretrained(42)


def test_a_path_under_home_is_expanded(tmp_path, monkeypatch, tiny_model):
    # docs/loading.md writes "~/models/whisper-tiny"; from_pretrained("~/models/dm") was a FileNotFoundError
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_model.save_pretrained(tmp_path / "models" / "dm")
    assert hub.parse_name("~/models/dm") == hub.HubSource("path", str(tmp_path / "models" / "dm"))
    assert hub.resolve_source("~/models/dm").location == str(tmp_path / "models" / "dm")
    model = mmformer.from_pretrained("~/models/dm")
    assert torch.equal(model.text_embed.tokens.weight, tiny_model.text_embed.tokens.weight)
    from mmformer.tasks.adapt import base_name

    assert base_name("~/models/dm") == str(tmp_path / "models" / "dm")  # what an adapter records as its base
    assert hub.parse_name("openai/whisper-tiny").kind == "hub"


# ---------------------------------------------------------------------------------------------------- Hub ids
def test_hub_id_from_the_cache_offline(hf_cache, tmp_path):
    hf = tiny_clip()
    put_in_cache(hf_cache, "openai/clip-tiny", saved(hf, tmp_path / "src"))
    model = mmformer.from_pretrained("openai/clip-tiny")
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert image_diff(model, pixels, hf.get_image_features(pixel_values=pixels).pooler_output) < ATOL
    assert model.processor is not None and not model.training
    assert mmformer.load_pretrained is mmformer.from_pretrained


@pytest.mark.parametrize(
    ("make", "model_type", "route"),
    [(tiny_bert, "bert", "text"), (lambda: tiny_bert("roberta"), "roberta", "text"), (tiny_whisper, "whisper", "audio"),
     (tiny_siglip, "siglip", "image")],
)  # fmt: skip
def test_the_converter_follows_model_type(hf_cache, tmp_path, make, model_type, route):
    hf = make()
    put_in_cache(hf_cache, f"org/{model_type}-tiny", saved(hf, tmp_path / "src"))
    model = mmformer.from_pretrained(f"org/{model_type}-tiny")
    assert route in model.config.routes
    if model_type in ("bert", "roberta"):
        ids = torch.randint(3, 64, (2, 7))
        with torch.no_grad():
            diff = (model.encode_text_tokens(ids)[0] - hf(input_ids=ids).last_hidden_state).abs().max().item()
        assert diff < ATOL
    if model_type == "whisper":
        assert model.config.audio.pad_to_seconds == 40 * 160 / 16000  # the encoder's whole window
        assert model.config.generation.suppress_tokens == [5] and model.config.generation.begin_suppress_tokens == [2]


def test_unsupported_model_type_is_named(hf_cache, tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_size": 8}))
    put_in_cache(hf_cache, "org/neox", folder)
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported") as info:
        mmformer.from_pretrained("org/neox")
    for supported in ("bert", "clip", "siglip", "whisper"):
        assert repr(supported) in str(info.value)
    assert set(HF_CONVERTERS) >= {"clip", "siglip", "whisper", "bert"}


def test_revisions_and_commits(hf_cache, tmp_path):
    first, second = tiny_bert(), tiny_bert()
    put_in_cache(hf_cache, "org/bert", saved(first, tmp_path / "v1"), revision="v1")
    commit = put_in_cache(hf_cache, "org/bert", saved(second, tmp_path / "main"))
    ids = torch.randint(3, 64, (1, 5))

    def hidden(model):
        with torch.no_grad():
            return model.encode_text_tokens(ids)[0]

    with torch.no_grad():
        want_first, want_second = first(input_ids=ids).last_hidden_state, second(input_ids=ids).last_hidden_state
    assert (hidden(mmformer.from_pretrained("org/bert", revision="v1")) - want_first).abs().max() < ATOL
    assert (hidden(mmformer.from_pretrained("org/bert")) - want_second).abs().max() < ATOL
    assert (hidden(mmformer.from_pretrained("org/bert", revision=commit)) - want_second).abs().max() < ATOL


def test_missing_id_or_revision_names_it_and_the_cache(hf_cache, tmp_path, monkeypatch):
    with pytest.raises(
        FileNotFoundError, match=r"'org/absent' \(revision 'main'\) is not in the Hugging Face cache"
    ) as e:
        mmformer.from_pretrained("org/absent")
    assert str(hf_cache) in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    put_in_cache(hf_cache, "org/bert", saved(tiny_bert(), tmp_path / "src"))
    with pytest.raises(FileNotFoundError, match=r"'org/bert' \(revision 'v9'\) is not in the Hugging Face cache"):
        mmformer.from_pretrained("org/bert", revision="v9")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        mmformer.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="revision: only for Hugging Face Hub ids"):
        mmformer.from_pretrained(tmp_path / "src", revision="v1")
    (tmp_path / "out").mkdir()  # `out/clip`, a typo of a local folder, has the form of a Hub id 'org/name'
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such folder 'out/clip' \(the folder 'out' has no 'clip'\)"):
        mmformer.from_pretrained("out/clip")


def test_a_missing_local_folder_of_hub_form_is_named_as_both_a_folder_and_a_hub_id(tmp_path, monkeypatch):
    """README's ``--model out/model`` before an export made it: the error spoke of the Hugging Face cache only,
    suggested ``huggingface-cli download out/model`` and quoted httpx's multi-line connection error, never that no
    local folder out/model exists. As transformers does, it says both, in one line."""
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):  # snapshot_download without a network, as huggingface_hub 1.x chains it
        try:
            try:
                raise socket.gaierror(-2, "Name or service not known")
            except socket.gaierror as e:
                raise httpx.ConnectError("[Errno -2] Name or service not known") from e
        except httpx.ConnectError as e:
            raise LocalEntryNotFoundError(
                f"Got: ConnectError: {e}\nAn error happened while trying to locate the files on the Hub, and we "
                "cannot find the appropriate snapshot folder for the specified revision on the local disk."
            ) from e

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        mmformer.from_pretrained("out/model")
    message = str(e.value)
    assert message.startswith(
        f"name_or_path: no such folder 'out/model' (no folder 'out' in {tmp_path}), and no Hugging Face Hub model of "
        "that name could be loaded: 'out/model' (revision 'main') is not in the Hugging Face cache"
    ), message
    assert "(the Hub could not be reached: Name or service not known)" in message
    assert "\n" not in message and "An error happened" not in message and "ConnectError" not in message
    from mmformer.cli.main import main

    with pytest.raises(SystemExit, match=r"^mmformer convert: error: name_or_path: no such folder 'out/model'"):
        main(["convert", "out/model", "--out", str(tmp_path / "converted")])


def test_a_snapshot_without_weights_is_named(hf_cache, tmp_path):
    folder = tmp_path / "src"
    saved(tiny_bert(), folder)
    (folder / "model.safetensors").unlink()
    put_in_cache(hf_cache, "org/weightless", folder)
    with pytest.raises(FileNotFoundError, match=r"'org/weightless' .* holds no weights .*model\.safetensors"):
        mmformer.from_pretrained("org/weightless")


def test_hf_home_and_explicit_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.cache_dir_for() == tmp_path / "home" / "hub"
    put_in_cache((tmp_path / "home" / "hub"), "org/bert", saved(tiny_bert(), tmp_path / "src"))
    assert "text" in mmformer.from_pretrained("org/bert").config.routes
    other = tmp_path / "elsewhere"
    put_in_cache(other, "org/bert2", tmp_path / "src")
    assert "text" in mmformer.from_pretrained("org/bert2", cache_dir=other).config.routes
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub.is_offline(local_files_only=True) and mmformer.from_pretrained(
        "org/bert2", cache_dir=other, local_files_only=True
    )


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_safetensors_are_preferred_and_bins_read_weights_only(hf_cache, tmp_path):
    hf = tiny_bert()
    folder = saved(hf, tmp_path / "src")
    decoy = {k: torch.zeros_like(v) for k, v in hf.state_dict().items()}
    torch.save(decoy, folder / "pytorch_model.bin")  # a different .bin beside the safetensors: not read
    put_in_cache(hf_cache, "org/both", folder)
    ids = torch.randint(3, 64, (1, 6))
    with torch.no_grad():
        ours = mmformer.from_pretrained("org/both").encode_text_tokens(ids)[0]
        assert (ours - hf(input_ids=ids).last_hidden_state).abs().max() < ATOL

    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    put_in_cache(hf_cache, "org/bin-only", folder)
    with torch.no_grad():
        ours = mmformer.from_pretrained("org/bin-only").encode_text_tokens(ids)[0]
    assert (ours - hf(input_ids=ids).last_hidden_state).abs().max() < ATOL

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    put_in_cache(hf_cache, "org/evil", folder)
    with pytest.raises(ValueError, match="not a checkpoint|never unpickles"):
        mmformer.from_pretrained("org/evil")


def test_local_hf_folder_and_own_folder(tmp_path):
    hf = tiny_clip()
    model = mmformer.from_pretrained(saved(hf, tmp_path / "hf"))
    model.save_pretrained(tmp_path / "ours")
    again = mmformer.from_pretrained(tmp_path / "ours", dtype=torch.float64)
    assert again.text_embed.tokens.weight.dtype == torch.float64
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert (again.encode_image(pixels.double()).float() - model.encode_image(pixels)).abs().max() < ATOL
    with pytest.raises(ValueError, match="only for mmformer's own formats"):
        mmformer.from_pretrained(tmp_path / "hf", strict=False)
    with pytest.raises(TypeError, match="unknown keyword arguments"):
        mmformer.from_pretrained(tmp_path / "hf", revisoin="main")


def test_own_format_on_the_hub(hf_cache, tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "ours")
    put_in_cache(hf_cache, "me/tiny-mmformer", tmp_path / "ours")
    model = mmformer.from_pretrained("me/tiny-mmformer")
    assert torch.equal(model.text_embed.tokens.weight, tiny_model.text_embed.tokens.weight)


def test_cli_convert_and_model_flags_take_hub_ids(hf_cache, tmp_path, capsys):
    from mmformer.cli.main import main

    put_in_cache(hf_cache, "org/bert", saved(tiny_bert(), tmp_path / "src"))
    main(["convert", "org/bert", "--out", str(tmp_path / "out")])
    assert "text" in MultimodalTransformer.from_pretrained(tmp_path / "out").config.routes
    main(["convert", "org/bert", "--from", "hf_bert", "--out", str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="not in the Hugging Face cache"):
        main(["convert", "org/absent", "--out", str(tmp_path / "out3")])


# ---------------------------------------------------------------------------------------------------- libraries
def test_open_clip_tag_through_its_cache(hf_cache):
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    small = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
                 text_cfg=dict(context_length=8, vocab_size=49408, width=16, heads=2, layers=1))  # fmt: skip
    reference = randomize_(open_clip.create_model("ViT-B-32", force_quick_gelu=True, **small), scale=0.1)
    # open_clip's ViT-B-32/openai lives in the Hub repo timm/vit_base_patch32_clip_224.openai
    folder = hf_cache.parent / "oc"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")
    put_in_cache(hf_cache, "timm/vit_base_patch32_clip_224.openai", folder)
    model = mmformer.from_pretrained("open_clip:ViT-B-32/openai", model_kwargs=small)
    assert model.config.stacks["vision"].mlp == "quickgelu"  # the tag's setting, as open_clip's registry says
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert image_diff(model, pixels, reference.encode_image(pixels)) < ATOL
    assert model.processor.tokenizer is not None and model.processor.image.image_size == (32, 32)
    with pytest.raises(
        FileNotFoundError, match=r"open_clip:ViT-B-32/laion2b_s34b_b79k: its weights .* not in the cache"
    ):
        mmformer.from_pretrained("open_clip:ViT-B-32/laion2b_s34b_b79k", model_kwargs=small)
    with pytest.raises(ValueError, match="has no pretrained tag 'nope'"):
        mmformer.from_pretrained("open_clip:ViT-B-32/nope")


def laion_like(folder, hf_folder, open_clip_model, model_cfg, preprocess_cfg):
    """A folder as every laion/CLIP-* repository is: a Hugging Face CLIP folder (config.json, model.safetensors)
    with open_clip's open_clip_config.json and open_clip_model.safetensors beside it."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(hf_folder, folder)
    state = {k: v.contiguous() for k, v in open_clip_model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def test_a_laion_repository_loads_as_open_clip_or_as_hugging_face(hf_cache, tmp_path):
    """``open_clip:hf-hub:ID``, and its folder with ``source="open_clip"``, give open_clip's model (its weights, its
    GELU from open_clip_config.json, its preprocessing); the folder or the id alone give the Hugging Face model."""
    open_clip = pytest.importorskip("open_clip")
    from mmformer.convert import from_open_clip

    cfg = dict(embed_dim=16, vision_cfg=dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
               text_cfg=dict(context_length=8, vocab_size=99, width=16, heads=2, layers=1))  # fmt: skip
    preprocess = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear"}
    reference, hf = randomize_(open_clip.CLIP(**cfg), scale=0.1).eval(), tiny_clip()
    put_in_cache(hf_cache, "openai/clip-tiny", saved(hf, tmp_path / "hf"))
    folder = laion_like(tmp_path / "laion", tmp_path / "hf", reference, cfg, preprocess)
    put_in_cache(hf_cache, "laion/CLIP-tiny", folder)
    pixels = torch.randn(2, 3, 16, 16)
    for model in (
        mmformer.from_pretrained("open_clip:hf-hub:laion/CLIP-tiny"),
        mmformer.from_pretrained(folder, source="open_clip"),
        from_open_clip(folder),
    ):
        assert image_diff(model, pixels, reference.encode_image(pixels)) < ATOL
        assert model.processor.image.mean == (0.1, 0.2, 0.3) and model.processor.image.interpolation == "bilinear"
    with torch.no_grad():
        hf_features = hf.get_image_features(pixel_values=pixels).pooler_output
    for name in (folder, "laion/CLIP-tiny"):
        assert image_diff(mmformer.from_pretrained(name), pixels, hf_features) < ATOL
    with pytest.raises(ValueError, match="'open_clip:hf-hub:openai/clip-tiny' holds no open_clip_config.json"):
        mmformer.from_pretrained("open_clip:hf-hub:openai/clip-tiny")


def test_timm_name_through_its_cache(hf_cache):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    small = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, num_classes=0)
    reference = randomize_(timm.create_model("vit_tiny_patch16_224", pretrained=False, **small), scale=0.1)
    folder = hf_cache.parent / "timm"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "model.safetensors")
    put_in_cache(hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k", folder)
    model = mmformer.from_pretrained("timm:vit_tiny_patch16_224.augreg_in21k", model_kwargs=small)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model.encode_image(pixels, normalize=False) - reference(pixels)).abs().max() < ATOL
    assert model.processor.image.mean == (0.5, 0.5, 0.5)  # the augreg tag's normalisation, from timm's config
    with pytest.raises(FileNotFoundError, match=r"timm:vit_small_patch16_224.augreg_in21k: its weights .* not in"):
        mmformer.from_pretrained("timm:vit_small_patch16_224.augreg_in21k")
    with pytest.raises(ValueError, match="timm: no model 'vit_nonexistent'"):
        mmformer.from_pretrained("timm:vit_nonexistent")


# ---------------------------------------------------------------------------------------- one source, read once
def test_the_counter_sees_every_way_of_reading_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with config_reads() as opened:
        path.read_text()
        json.load(open(path))  # noqa: SIM115
        os.close(os.open(path, os.O_RDONLY))
        (tmp_path / "other.json").write_text("{}")
    assert len(opened) == 3


def test_sources_are_resolved_once_into_their_kind(hf_cache, tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "ours")
    put_in_cache(hf_cache, "org/ours", tmp_path / "ours", revision="v1")
    saved(tiny_clip(), tmp_path / "hf")
    (tmp_path / "run.ckpt").write_bytes(b"")
    cases = {
        tmp_path / "ours": ("mmformer", True, None),
        tmp_path / "ours" / "config.json": ("mmformer", True, None),
        tmp_path / "ours" / "model.safetensors": ("weights", True, None),
        tmp_path / "run.ckpt": ("checkpoint", True, None),
        tmp_path / "hf": ("hf", True, None),
        "open_clip:ViT-B-32/openai": ("open_clip", False, "openai"),
        "timm:vit_tiny_patch16_224": ("timm", False, None),
        "whisper:tiny": ("whisper", False, None),
    }
    for name, (kind, local, tag) in cases.items():
        source = hub.resolve_source(name)
        assert (source.kind, source.local, source.tag) == (kind, local, tag), name
    assert hub.resolve_source(tmp_path / "hf").config["model_type"] == "clip"
    assert hub.resolve_source("timm:vit_tiny_patch16_224").location == "vit_tiny_patch16_224"
    assert hub.resolve_source(tmp_path / "ours" / "model.safetensors").config is None  # read by read_checkpoint
    on_hub = hub.resolve_source("org/ours", revision="v1")
    assert (on_hub.kind, on_hub.repo_id, on_hub.revision, str(on_hub)) == ("mmformer", "org/ours", "v1", "org/ours")
    assert on_hub.config["stacks"] == tiny_model.config.to_dict()["stacks"]
    with pytest.raises(ValueError, match="revision: only for Hugging Face Hub ids"):
        hub.resolve_source(tmp_path / "ours", revision="v1")
    with pytest.raises(ValueError, match="whisper:NAME"):
        hub.resolve_source("whisper:")
    with pytest.raises(ValueError, match="kind: expected one of"):
        hub.Source("npz", "x")
    with pytest.raises(ValueError, match="a timm model name, not a local file"):
        hub.resolve_source("timm:vit_tiny_patch16_224").path  # noqa: B018


def test_a_new_kind_reaches_the_converter_named_for_it(monkeypatch, tiny_model):
    """``whisper:NAME`` is dispatched to ``mmformer.convert``'s ``from_openai_whisper`` by name: a converter module
    registered there is all a kind needs (here a stand-in that records what it was given)."""
    import types

    import mmformer.convert

    calls = []
    module = types.ModuleType("whisper_stand_in")
    module.from_openai_whisper = lambda location: calls.append(location) or tiny_model
    monkeypatch.setitem(sys.modules, "whisper_stand_in", module)
    monkeypatch.setitem(mmformer.convert._CONVERTERS, "from_openai_whisper", "whisper_stand_in")
    monkeypatch.setattr(mmformer.convert, "__all__", [*mmformer.convert.__all__, "from_openai_whisper"])
    assert mmformer.from_pretrained("whisper:tiny") is tiny_model and calls == ["tiny"]
    assert mmformer.io.auto.KIND_CONVERTERS["whisper"] == "from_openai_whisper"


def test_a_kind_without_its_converter_is_named(monkeypatch):
    import mmformer.convert

    if "from_openai_whisper" in mmformer.convert.__all__:
        monkeypatch.setattr(
            mmformer.convert, "__all__", [n for n in mmformer.convert.__all__ if n != "from_openai_whisper"]
        )
    with pytest.raises(ValueError, match="no converter 'from_openai_whisper' in mmformer.convert"):
        mmformer.from_pretrained("whisper:tiny")


def test_init_from_a_converted_model_converts_it_once(tmp_path, monkeypatch):
    """``mmformer fit`` with ``model.init_from`` a Hugging Face folder: the task converts it once and the data module
    takes that model's processor (the CLI builds the data module first; it used to convert the model for its
    processor, then the task converted it again)."""
    from cli_helpers import fit_in_process, tiny_config, write_config, write_pairs

    import mmformer.convert.hf_clip
    from mmformer.preprocess.tokenizer import Tokenizer

    train = write_pairs(tmp_path, n=8)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    tokenizer = Tokenizer.train(texts, vocab_size=280, max_length=8)
    hf = tiny_clip(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id)
    folder = saved(hf, tmp_path / "clip")
    tokenizer.save(tmp_path / "tokenizer.json")  # the converted CLIP brings no tokenizer of its own
    conversions = []
    convert = mmformer.convert.hf_clip.from_hf_clip
    monkeypatch.setattr(mmformer.convert.hf_clip, "from_hf_clip", lambda src: conversions.append(src) or convert(src))
    config = tiny_config(tmp_path, train, max_steps=1, model={"model": None, "init_from": str(folder)},
                         data={"tokenizer": str(tmp_path / "tokenizer.json")})  # fmt: skip
    with config_reads() as opened:
        cli = fit_in_process(write_config(tmp_path / "config.yaml", config), "--trainer.max_steps", "0")
    assert len(conversions) == 1 and len(opened) == 1
    assert cli.datamodule.processor.image == cli.model.model.processor.image  # CLIP's 3-channel pipeline, not data.*
    assert cli.datamodule.processor.image.channels == 3
    assert cli.datamodule.tokenizer.backend.to_str() == tokenizer.backend.to_str()


def test_the_data_module_loads_no_model_for_processor_from(tmp_path):
    """``data.processor_from`` names the model the task loads; the data module waits for its processor (handed over
    by the task under a trainer, or by ``use_processor``) and never loads a model itself."""
    from cli_helpers import write_pairs

    from mmformer.data import MultimodalDataModule
    from mmformer.preprocess.processor import ImageProcessorConfig
    from mmformer.preprocess.tokenizer import Tokenizer

    train = write_pairs(tmp_path, n=4)
    tokenizer = Tokenizer.train([f"{a} {b}" for a in "ab" for b in "cd"], vocab_size=270, max_length=8)
    given = mmformer.Processor(
        tokenizer, ImageProcessorConfig(image_size=[16, 16], channels=1, mean=(0.5,), std=(0.5,))
    )
    dm = MultimodalDataModule(train=str(train), modalities=["image"], processor_from="org/not-loaded", batch_size=2)
    assert dm.vocab_size is None  # the task sizes the model by the loaded model's own tokenizer
    with pytest.raises(ValueError, match=r"processor_from: 'org/not-loaded': .*use_processor"):
        dm.setup("fit")
    dm.use_processor(given)
    assert dm.tokenizer is tokenizer and dm.vocab_size == tokenizer.vocab_size
    assert dm.processor.image == given.image and dm.processor is not given  # the model keeps its own
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (2, 1, 16, 16)

    tokenizer.save(tmp_path / "explicit.json")
    explicit = MultimodalDataModule(train=str(train), processor_from="org/x", tokenizer=str(tmp_path / "explicit.json"))
    assert explicit.vocab_size == tokenizer.vocab_size  # an explicit tokenizer: known without the model
    explicit.use_processor(mmformer.Processor(None, given.image))
    assert explicit.processor.image.channels == 1 and explicit.tokenizer.vocab_size == tokenizer.vocab_size
    bare = MultimodalDataModule(train=str(train), processor_from="org/x")
    bare.use_processor(mmformer.Processor(None, given.image))
    with pytest.raises(ValueError, match="comes without a tokenizer.*data.tokenizer"):
        bare.tokenizer  # noqa: B018
