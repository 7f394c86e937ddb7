"""open_clip models with their text tower in ``model.text``: CoCa (contrastive towers, the multimodal decoder's
logits to 1e-4 and greedy caption ids equal to open_clip's ``generate``) and CustomTextCLIP with a Hugging Face
RoBERTa text tower (mean / cls pooling, linear / MLP projection). Tiny random-weight models built here."""

from __future__ import annotations

import copy

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
from helpers import randomize_  # noqa: E402
from open_clip.coca_model import CoCa  # noqa: E402
from open_clip.model import CustomTextCLIP  # noqa: E402

from mmformer.convert.common import UnsupportedModelError  # noqa: E402
from mmformer.convert.open_clip import from_open_clip  # noqa: E402

pytestmark = pytest.mark.numerics  # run again on other kernels by `make test` (Makefile: NUMERICS_ENV)

ATOL = 1e-4
SOT, EOT = 49406, 49407
CONTEXT = 12
COCA = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=48, patch_size=8, head_width=12, attentional_pool=True,
                    attn_pooler_heads=4, attn_pooler_queries=9, output_tokens=True),
    text_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=32, heads=4, layers=2, embed_cls=True,
                  output_tokens=True),
    multimodal_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=32, heads=4, layers=2),
)  # fmt: skip


def text_batch() -> torch.Tensor:
    """(3, CONTEXT) ids as open_clip's tokenizer gives them: sot, tokens, eot, zero padding to the context."""
    rows = [[SOT, 320, 1125, 539, EOT], [SOT, *range(400, 400 + CONTEXT - 2), EOT], [SOT, 2368, EOT]]
    ids = torch.zeros(3, CONTEXT, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    return randomize_(CoCa(**COCA))


@pytest.fixture(scope="module", params=[False, True], ids=["legacy-cls-mask", "correct-cls-mask"])
def coca_variants(request):
    torch.manual_seed(1)
    model = randomize_(CoCa(**COCA))
    model.text.correct_cls_mask = request.param  # a TextTransformer attribute open_clip's text config does not expose
    return model


def test_coca_contrastive_towers_match(coca_variants):
    ref = coca_variants
    model = from_open_clip(ref)
    assert model.config.text.legacy_cls_mask == (not ref.text.correct_cls_mask)
    pixels, ids = torch.randn(2, 3, 32, 32), text_batch()
    mask = ids != 0
    with torch.no_grad():
        assert (model.encode_image(pixels) - ref.encode_image(pixels)).abs().max().item() < ATOL
        assert (model.encode_text(ids, mask) - ref.encode_text(ids)).abs().max().item() < ATOL
        # mmformer's tokenizer pads to the longest text only: the model pads to the context itself
        short = model.encode_text(ids[:, :8][[0, 2]], mask[:, :8][[0, 2]])
        assert (short - ref.encode_text(ids[[0, 2]])).abs().max().item() < ATOL


def test_coca_decoder_logits_match(coca):
    model = from_open_clip(coca)
    assert model.config.decoder_input == "text" and model.config.stacks["decoder"].cross_mlp
    pixels, ids = torch.randn(2, 3, 32, 32), text_batch()[:2, :6]
    with torch.no_grad():
        reference = coca(pixels, ids, output_labels=False)["logits"]
        memory, memory_mask = model.encode_image_tokens(pixels)
        assert memory.shape == (2, 9, 32) and not memory_mask[:, 0].any()  # the pooled query is not read
        logits = model.decode(ids, memory, memory_mask)
    assert (logits - reference).abs().max().item() < ATOL


@pytest.fixture
def open_clip_generate(monkeypatch):
    """open_clip's CoCa ``generate`` needs names transformers 5 no longer exports together (``BeamSearchScorer``
    is gone, so open_clip disables generation at import); the greedy path uses none of it: provide the rest."""
    import open_clip.coca_model as coca_model

    for name in ("LogitsProcessorList", "TopKLogitsWarper", "TopPLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):  # fmt: skip
        monkeypatch.setattr(coca_model, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)


@pytest.mark.parametrize("eot_bias", [0.0, 0.5], ids=["full-length", "eot-early"])
def test_coca_greedy_captions_equal_open_clip_generate(coca, open_clip_generate, eot_bias):
    """Greedy decoding with open_clip's minimum length and final end-of-text; with ``eot_bias`` the end-of-text
    logit is pushed up so that rows end as soon as the minimum length allows, at different steps."""
    ref = copy.deepcopy(coca)
    torch.manual_seed(5)
    with torch.no_grad():
        ref.text_decoder.text_projection[:, EOT] += eot_bias * torch.randn(ref.text_decoder.text_projection.shape[0])
    model = from_open_clip(ref)
    torch.manual_seed(3)
    pixels = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        reference = ref.generate(pixels, generation_type="top_k", top_k=1, seq_len=10, min_seq_len=3)
    ends = {int((row == EOT).nonzero()[0]) for row in reference}
    assert ends == ({9} if eot_bias == 0 else {3, 4})  # never before min_seq_len; the final token forced
    for use_cache in (True, False):
        ours = model.generate(image=pixels, max_new_tokens=9, min_new_tokens=2, forced_eos=True, use_cache=use_cache)
        assert torch.equal(ours, reference)
    assert ours[:, 0].eq(SOT).all()


def test_coca_exports_its_decoder_and_the_programs_caption_as_the_model(coca, tmp_path):
    """CoCa's decoder runs its causal text layers before the cross-attention ones: the exported decoder graphs carry
    the cross-attention layers' keys and values only (before: "not every layer holds cross-attention keys/values
    yet", so no ONNX, torch.export or int8 export of a CoCa decoder); greedy decoding through the torch.export
    programs gives the model's own ids, and the texts use every position CoCa has (its class token's slot aside)."""
    from mmformer.compress import pt2e
    from mmformer.ship import export

    model = from_open_clip(coca).eval()
    folder = export.export(model, tmp_path / "programs", format="torch-export", processor=None)
    programs = {p.stem: torch.export.load(str(p)).module() for p in folder.glob("*.pt2")}
    assert {"image_encoder", "text_encoder", "decoder_model", "decoder_with_past_model"} <= set(programs)
    runner = pt2e.PT2EModel(model, "dynamic", programs, {}, compile=False)  # float programs, PT2E's greedy loop
    torch.manual_seed(3)
    pixels = torch.randn(4, 3, 32, 32)
    steps = model.config.text.max_tokens - 1
    with torch.no_grad():
        expected = model.generate(image=pixels, max_new_tokens=steps)
        got = runner.generate(image=pixels, max_new_tokens=steps)
    assert got.shape[1] == model.config.text.max_tokens
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
    from transformers import RobertaConfig

    folder = tmp_path_factory.mktemp("roberta")
    RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=20, type_vocab_size=1, pad_token_id=1).save_pretrained(folder)  # fmt: skip
    return str(folder)


@pytest.mark.parametrize(
    ("pooler", "proj"), [("mean_pooler", "mlp"), ("cls_last_hidden_state_pooler", "linear")], ids=["mean-mlp", "cls"]
)
def test_hf_text_tower_matches(roberta_dir, pooler, proj):
    torch.manual_seed(0)
    text_cfg = dict(hf_model_name=roberta_dir, hf_tokenizer_name=roberta_dir, hf_proj_type=proj, hf_pooler_type=pooler,
                    hf_model_pretrained=False)  # fmt: skip
    vision_cfg = dict(image_size=32, layers=2, width=48, patch_size=8, head_width=12)
    ref = randomize_(CustomTextCLIP(embed_dim=24, quick_gelu=True, text_cfg=text_cfg, vision_cfg=vision_cfg))
    model = from_open_clip(ref)
    assert model.config.stacks["text"].norm_placement == "post"  # a RoBERTa encoder
    ids = torch.randint(3, 60, (3, 10))
    ids[1, 6:], ids[2, 3:] = 1, 1  # RoBERTa's padding
    with torch.no_grad():
        diff = (model.encode_text(ids, ids != 1) - ref.encode_text(ids, normalize=True)).abs().max().item()
        pixels = torch.randn(2, 3, 32, 32)
        image_diff = (model.encode_image(pixels) - ref.encode_image(pixels, normalize=True)).abs().max().item()
    assert diff < ATOL and image_diff < ATOL


def test_bert_pooler_layer_is_refused(roberta_dir):
    text_cfg = dict(hf_model_name=roberta_dir, hf_tokenizer_name=roberta_dir, hf_proj_type="linear",
                    hf_pooler_type="cls_pooler", hf_model_pretrained=False)  # fmt: skip
    ref = CustomTextCLIP(embed_dim=24, text_cfg=text_cfg, vision_cfg=dict(image_size=32, layers=1, width=48,
                                                                          patch_size=8, head_width=12))  # fmt: skip
    with pytest.raises(UnsupportedModelError, match="text pooler ClsPooler"):
        from_open_clip(ref)
