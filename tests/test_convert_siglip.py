"""SigLIP conversion: a tiny random Hugging Face ``SiglipModel`` and its mmformer conversion agree — image and text
embeddings and the sigmoid logits (with the logit bias) to 1e-4, whether the text is padded to SigLIP's full length
or only to the longest text (mmformer pads it itself) — and zero-shot probabilities are SigLIP's sigmoids."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import SiglipConfig, SiglipModel  # noqa: E402

from mmformer import ZeroShotClassifier  # noqa: E402
from mmformer.convert.common import UnsupportedModelError  # noqa: E402
from mmformer.convert.hf_siglip import from_hf_siglip  # noqa: E402
from mmformer.zeroshot import zero_shot_logits  # noqa: E402

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-4
PAD = 1  # SigLIP pads with its eos token
LENGTH = 12


@pytest.fixture(scope="module")
def hf() -> SiglipModel:
    torch.manual_seed(0)
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=LENGTH, pad_token_id=PAD, eos_token_id=PAD, bos_token_id=98,
                projection_size=32)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=4, hidden_act="gelu_pytorch_tanh")  # fmt: skip
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 and "norm" in name else 0.1 * torch.randn_like(p))
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-3.0)
    return model


@pytest.fixture
def inputs():
    pixels = torch.randn(3, 3, 16, 16)
    ids = torch.randint(2, 98, (4, LENGTH))
    lengths = [5, 12, 8, 3]
    for row, n in enumerate(lengths):
        ids[row, n:] = PAD
    return pixels, ids, lengths


def test_embeddings_and_sigmoid_logits_match(hf, inputs):
    pixels, ids, _ = inputs
    model = from_hf_siglip(hf)
    assert model.config.image.pool == "map" and model.config.projections == {"image": "none"}
    assert model.config.text.pool == "last" and model.config.text.fixed_length and model.config.text.attend_padding
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels)
        image, text = model.encode_image(pixels), model.encode_text(ids)
        logits = zero_shot_logits(model, image, text)
    assert (image - out.image_embeds).abs().max().item() < ATOL
    assert (text - out.text_embeds).abs().max().item() < ATOL
    assert (logits - out.logits_per_image).abs().max().item() < ATOL
    assert model.logit_bias is not None and abs(model.logit_bias.item() + 3.0) < 1e-6


def test_shorter_padding_gives_the_same_embeddings(hf, inputs):
    """Ids padded to the longest text with a mask (mmformer's tokenizer) are padded to SigLIP's length inside."""
    _, ids, lengths = inputs
    model = from_hf_siglip(hf)
    short = ids[[0, 2, 3], :8]
    mask = torch.arange(8)[None, :] < torch.tensor([lengths[0], lengths[2], lengths[3]])[:, None]
    with torch.no_grad():
        reference = hf.get_text_features(input_ids=ids[[0, 2, 3]]).pooler_output
        ours = model.encode_text(short, mask, normalize=False)
    assert (ours - reference).abs().max().item() < ATOL


def test_exported_and_int8_text_towers_read_every_length_up_to_siglips_own(hf, inputs, tmp_path):
    """The text tower pads ids to SigLIP's length inside, with no branch on the length (padding 0 included): one
    torch.export program answers texts of 8 and of all 12 tokens as the model does, and PT2E int8 quantizes the
    tower (before: torch.export's "Constraints violated (text_tokens)", the length 12 taking another branch)."""
    from mmformer.compress import pt2e
    from mmformer.ship import export

    _, ids, lengths = inputs
    model = from_hf_siglip(hf).eval()
    folder = export.export(model, tmp_path / "programs", format="torch-export", towers=["text"], processor=None)
    program = torch.export.load(str(folder / "text_encoder.pt2")).module()
    for width in (8, LENGTH):
        x = ids[:, :width]
        mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        with torch.no_grad():
            expected = model.encode_text(x, mask)
            got = program(x, mask)[0]
        assert (got - expected).abs().max().item() < ATOL, width
    quantized = pt2e.quantize(model, "dynamic", towers=["text"], compile=False)
    with torch.no_grad():
        assert (quantized.encode_text(ids) - model.encode_text(ids)).abs().max().item() < 0.05


def test_zero_shot_probabilities_are_sigmoids(hf):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from mmformer.preprocess.processor import Processor
    from mmformer.preprocess.tokenizer import Tokenizer

    words = ["<pad>", "</s>", *[f"w{i}" for i in range(2, 98)], "<bos>"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, max_length=LENGTH, pad_token="</s>", bos_token=None, eos_token="</s>")
    model = from_hf_siglip(hf)
    classes = ["w10 w11", "w12", "w40 w41 w42"]
    clf = ZeroShotClassifier(model, Processor(tokenizer), classes, templates=["w5 {}"])
    pixels = torch.randn(2, 3, 16, 16)
    probs = clf.predict_proba(pixels)
    ids = torch.full((3, LENGTH), PAD)
    for row, text in enumerate(f"w5 {c}" for c in classes):
        encoded = tokenizer.encode(text)
        ids[row, : len(encoded)] = torch.tensor(encoded)
    with torch.no_grad():
        reference = torch.sigmoid(hf(input_ids=ids, pixel_values=pixels).logits_per_image)
    assert (probs - reference).abs().max().item() < ATOL
    assert not torch.allclose(probs.sum(dim=1), torch.ones(2))  # independent per class, unlike a softmax


def test_directory_and_processor(hf, tmp_path, inputs):
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
                "resample": 3,
                "size": {"height": 16, "width": 16},
                "do_center_crop": False,
            }
        )  # fmt: skip
    )
    model = from_hf_siglip(tmp_path)
    settings = model.processor.image
    assert settings.resize == "exact" and settings.mean == (0.5,) * 3 and settings.image_size == (16, 16)
    pixels, ids, _ = inputs
    with torch.no_grad():
        assert (model.encode_image(pixels) - hf(input_ids=ids, pixel_values=pixels).image_embeds).abs().max() < ATOL


def test_the_image_processor_transformers_5_saves_is_read(hf, tmp_path):
    """transformers 5 saves a SiglipProcessor's image settings in processor_config.json ("image_processor"), with no
    preprocessor_config.json: the converted processor follows them, not SigLIP's defaults."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipImageProcessor, SiglipProcessor

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"</s>": 0, "<unk>": 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="</s>", unk_token="<unk>")
    image = SiglipImageProcessor(size={"height": 20, "width": 24}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4] * 3,
                                 resample=2)  # fmt: skip
    hf.save_pretrained(tmp_path)
    SiglipProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(tmp_path)
    if (tmp_path / "preprocessor_config.json").exists():
        pytest.skip("transformers < 5 saves preprocessor_config.json")
    settings = from_hf_siglip(tmp_path).processor.image
    assert settings.image_size == (20, 24) and settings.resize == "exact" and settings.interpolation == "bilinear"
    assert settings.mean == tuple(image.image_mean) and settings.std == tuple(image.image_std)


def test_unsupported_siglip_is_named(hf):
    import copy

    headless = copy.deepcopy(hf)
    headless.config.vision_config.vision_use_head = False
    with pytest.raises(UnsupportedModelError, match="vision_use_head=False"):
        from_hf_siglip(headless)


def test_the_tokenizer_pads_with_the_checkpoints_pad_token(hf, tmp_path):
    """SigLIP's tokenizer pads with </s> (tokenizer_config.json's pad_token), not the vocabulary's <pad>: SigLIP
    attends to padding, so a short text's embedding would otherwise change with the batch it is in."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "photo", "of", "dog"]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", PAD)])
    reference = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    hf.save_pretrained(tmp_path)
    reference.save_pretrained(tmp_path)
    model = from_hf_siglip(tmp_path)
    assert (model.processor.tokenizer.pad_id, model.processor.tokenizer.max_length) == (PAD, LENGTH)
    texts = ["a cat", "a photo of a dog"]
    batch = model.processor(text=texts)
    assert batch["attention_mask"].sum(dim=1).tolist()[0] < batch["input_ids"].shape[1] < LENGTH  # padded, not cut
    expected = reference(texts, padding="max_length", max_length=LENGTH, return_tensors="pt").input_ids
    with torch.no_grad():
        together = model.encode_text(batch["input_ids"], batch["attention_mask"])
        alone = model.encode_text(**{k: v for k, v in model.processor(text=texts[:1]).items()})
        reference_embeds = hf(input_ids=expected, pixel_values=torch.zeros(1, 3, 16, 16)).text_embeds
    assert (together - reference_embeds).abs().max() < ATOL
    assert (together[:1] - alone).abs().max() < ATOL
