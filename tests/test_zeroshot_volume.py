"""Zero-shot classification with open_clip's inputs and at ImageNet's volume: a class list with repeated names
(open_clip's ``IMAGENET_CLASSNAMES`` holds 'missile' and 'sunglasses' twice, so that its columns line up with the
data set's label indices) is accepted, its repeated columns identical; the class embeddings are built without
holding all C × K prompt embeddings (1,000 classes × 80 templates at E = 1024 held 312 MiB for a 4 MiB result), equal
to averaging them all at once; what the cached class embeddings are built from is read-only; a callable template's
prompt is checked; ``/v1/classify`` takes the same lists and refuses a ``templates`` that is not a list of templates.
"""

from __future__ import annotations

import base64
import io
import weakref

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmformer import MultimodalTransformer, ZeroShotClassifier
from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
from mmformer.preprocess.processor import ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.zeroshot import build_class_embeddings, check_classnames

# names of unequal token lengths, so that batches are padded to different lengths
NAMES = ["cat", "dog", "a small red bird", "tree", "car on the road", "fish", "the big house", "one", "two", "three"]
TEMPLATES = ["a photo of a {}.", "{}", "a blurry photo of the {} in the park"]


@pytest.fixture(scope="module")
def processor() -> Processor:
    corpus = ["a photo of a cat dog bird tree car fish house", "the blurry park road one two three small red big"]
    tokenizer = Tokenizer.train(corpus, vocab_size=300)
    return Processor(tokenizer, image=ImageProcessorConfig(image_size=16))


@pytest.fixture(scope="module")
def model(processor) -> MultimodalTransformer:
    torch.manual_seed(0)
    config = ModelConfig(
        stacks={"shared": StackConfig(width=32, depth=1, n_heads=2)},
        routes={"image": "shared", "text": "shared"},
        image=ImageConfig(image_size=[16, 16], patch_size=8),
        text=TextConfig(vocab_size=processor.tokenizer.vocab_size, max_length=32),
        embed_dim=16,
    )
    model = MultimodalTransformer(config).eval()
    model.processor = processor
    return model


def pixels(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------- repeated names
def test_repeated_class_names_are_accepted_with_a_warning_their_columns_identical(model, processor):
    """open_clip's ImageNet list was refused ("expected distinct names"); now each position is a column, a repeated
    name's columns are the same values (encoded once, not in two batches padded differently), and an argmax gives
    the first."""
    names = ["cat", "dog", "a small red bird", "cat", "tree", "dog"]
    with pytest.warns(UserWarning, match=r"classnames: repeated names 'cat' at \[0, 3\], 'dog' at \[1, 5\]; each"):
        clf = ZeroShotClassifier(model, processor, names, TEMPLATES, batch_size=4)
    distinct = ZeroShotClassifier(model, processor, ["cat", "dog", "a small red bird", "tree"], TEMPLATES, batch_size=4)
    torch.testing.assert_close(clf.class_embeddings, distinct.class_embeddings[[0, 1, 2, 0, 3, 1]], atol=1e-6, rtol=0)
    assert torch.equal(clf.class_embeddings[0], clf.class_embeddings[3])
    assert torch.equal(clf.class_embeddings[1], clf.class_embeddings[5])
    probs = clf.predict_proba(pixels(8))
    assert probs.shape == (8, 6) and torch.equal(probs[:, 0], probs[:, 3]) and torch.equal(probs[:, 1], probs[:, 5])
    assert not {3, 5} & set(probs.argmax(dim=-1).tolist())  # ties go to the first column
    assert clf.predict(pixels(8)) == [names[i] for i in probs.argmax(dim=-1).tolist()]


def test_distinct_names_are_still_required_where_asked_and_the_message_is_cut():
    """The training task's zero-shot accuracy maps a sample's text back to one class: it keeps ``distinct=True``
    (the default). Its message named every duplicate (a 1,000-class list echoed whole)."""
    assert check_classnames(["cat", "cat"], distinct=False) == ["cat", "cat"]
    names = [f"class {i}" for i in range(1000)] * 2
    with pytest.raises(
        ValueError, match=r"classnames: expected distinct names, got duplicates 'class 0' at \[0, 1000\]"
    ):
        check_classnames(names)
    with pytest.raises(ValueError) as error:
        check_classnames(names)
    assert "(1000 in all)" in str(error.value) and len(str(error.value)) < 250


# ---------------------------------------------------------------------------------------------------- memory
class Counting:
    """``encode_text`` that counts how many of its outputs are alive at once (the prompt embeddings held)."""

    def __init__(self, encode_text):
        self.encode_text, self.alive, self.most = encode_text, [], 0

    def __call__(self, *args, **kwargs):
        out = self.encode_text(*args, **kwargs)
        self.alive.append(weakref.ref(out))
        self.most = max(self.most, sum(r() is not None for r in self.alive))
        return out


def test_class_embeddings_hold_one_batch_of_prompt_embeddings_and_equal_the_mean_of_all(model, processor, monkeypatch):
    """Every C × K prompt embedding was kept and concatenated before averaging; now classes are averaged as their
    batches come. Counted here as the encode_text outputs alive at each call (all of them before, <= 2 now), and the
    result equal to averaging all the embeddings of the same batches at once (bit for bit)."""
    tokenizer = processor.tokenizer
    names = NAMES + [f"{n} two" for n in NAMES] + ["bird"]  # 21 classes, 63 prompts
    prompts = [t.replace("{}", n) for n in names for t in TEMPLATES]
    for batch_size in (2, 5, 64):  # fewer prompts per batch than templates; classes cut in two; one batch
        with torch.no_grad():
            batches = [tokenizer(prompts[s : s + batch_size]) for s in range(0, len(prompts), batch_size)]
            every = torch.cat([model.encode_text(b["input_ids"], b["attention_mask"]) for b in batches])
        expected = F.normalize(every.view(len(names), len(TEMPLATES), -1).mean(dim=1), dim=-1)
        counting = Counting(model.encode_text)
        with monkeypatch.context() as patch:
            patch.setattr(model, "encode_text", counting)
            got = build_class_embeddings(model, tokenizer, names, TEMPLATES, batch_size=batch_size)
        assert len(counting.alive) == len(batches)
        assert counting.most <= 2, (batch_size, counting.most, len(batches))
        assert torch.equal(got, expected), (batch_size, (got - expected).abs().max())


# ---------------------------------------------------------------------------------------------------- read-only
def test_what_the_class_embeddings_are_built_from_is_read_only(model, processor):
    """``clf.classnames = other`` kept the cached embeddings of the old names: predict answered the wrong labels,
    or IndexError for a shorter list. Now a clear AttributeError; the names are a tuple (not changed in place)."""
    clf = ZeroShotClassifier(model, processor, ["cat", "dog"], ["a photo of a {}."])
    before = clf.predict(pixels(4))
    for name, value in (("classnames", ["dog", "cat"]), ("templates", ["{}"]), ("prompt", None)):
        with pytest.raises(AttributeError, match=rf"{name}: read-only, .*build a new ZeroShotClassifier"):
            setattr(clf, name, value)
    assert clf.classnames == ("cat", "dog") and clf.templates == ("a photo of a {}.",) and clf.prompt is None
    with pytest.raises(AttributeError):
        clf.classnames.append("bird")
    assert clf.predict(pixels(4)) == before


# ---------------------------------------------------------------------------------------------------- templates
def test_a_callable_template_that_returns_no_string_is_named(model, processor):
    """It failed at the first prediction with "'NoneType' object has no attribute 'encode'" from the tokenizer."""
    for bad, shown in ((lambda c: None, "NoneType None"), (lambda c: ("a photo of", c), "tuple \\('a photo of'")):
        clf = ZeroShotClassifier(model, processor, ["cat", "dog"], ["{}", bad])
        with pytest.raises(TypeError, match=rf"templates\[1\]: expected a callable that returns the prompt \(str\) "
                                            rf"for a class name; for 'cat' it returned {shown}"):  # fmt: skip
            clf.predict(pixels(1))


# ---------------------------------------------------------------------------------------------------- /v1/classify
@pytest.fixture(scope="module")
def http(model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from mmformer.serve.app import create_app
    from mmformer.serve.engine import Engine

    with TestClient(create_app(Engine(model, "m"))) as client:
        yield client


def png() -> str:
    data = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 40, 40)).save(data, "PNG")
    return base64.b64encode(data.getvalue()).decode()


def classify(http, **body):
    return http.post("/v1/classify", json={"model": "m", "input": [{"image": png()}], **body})


def test_classify_takes_repeated_labels(http):
    """The same list as the library: 400 "expected distinct names", echoing the whole list (14,851 characters for
    open_clip's ImageNet names), before."""
    labels = [f"class {i}" for i in range(998)] + ["class 7", "class 500"]
    with pytest.warns(UserWarning, match="repeated names 'class 7' at \\[7, 998\\]"):  # the server's log
        answer = classify(http, labels=labels)
    assert answer.status_code == 200, answer.text[:300]
    (row,) = answer.json()["data"]
    scores = row["scores"]
    assert len(scores) == 1000 and scores[7] == scores[998] and scores[500] == scores[999]
    assert row["label"] == labels[max(range(1000), key=scores.__getitem__)]


def test_classify_refuses_templates_that_are_not_a_list_of_templates(http):
    """null / false / [] / 0 / "" all read as ["{}"] before. Absent or null: the default; anything else that is not
    a non-empty list of strings with '{}': a 400 naming it, its value cut short."""
    default = classify(http, labels=["cat", "dog"], templates=["{}"]).json()["data"][0]["scores"]
    assert classify(http, labels=["cat", "dog"]).json()["data"][0]["scores"] == default
    assert classify(http, labels=["cat", "dog"], templates=None).json()["data"][0]["scores"] == default
    for templates, param in ((False, "templates"), ([], "templates"), (0, "templates"), ("", "templates"),
                             ("x{}" * 5000, "templates"), (["{}", 3], "templates[1]"),
                             (["{}", "a photo"], "templates[1]")):  # fmt: skip
        answer = classify(http, labels=["cat", "dog"], templates=templates)
        assert answer.status_code == 400, (templates, answer.text[:200])
        error = answer.json()["error"]
        assert error["param"] == param and error["message"].startswith(f"{param}: expected"), error
        assert len(error["message"]) < 250, error["message"]


def test_classify_names_the_label_at_fault(http):
    for labels, message in ((["cat", " " * 5000], r"labels\[1\]: expected a non-blank class name"),
                            (["cat", 5], r"labels\[1\]: expected str, got int"),
                            ([], "labels: expected at least one class name"),
                            ("cat" * 5000, "labels: expected a non-empty list of class names")):  # fmt: skip
        answer = classify(http, labels=labels)
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["param"] == message.split(":")[0].replace("\\", "")
        assert error["message"].startswith(message.replace("\\", "")) and len(error["message"]) < 250, error
