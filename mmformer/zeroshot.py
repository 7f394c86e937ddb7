"""Zero-shot classification with a contrastive model, as in CLIP.

Each class name is put into prompt templates ("a photo of a {}."); the class embedding is the normalised mean of
the normalised text embeddings of its prompts (prompt ensembling). A learned prompt (CoOp's context vectors,
:class:`mmformer.adapt.prompts.ContextPrompt`) can take the templates' place. An image or a waveform then belongs to
the class
whose embedding is most similar: ``logits = logit_scale.exp() * features @ class_embeddings.T``.

Shape legend: B inputs, C classes, U distinct class names (C with repeats), K templates, E joint embedding size.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from mmformer.eval_mode import eval_mode
from mmformer.io.weights import model_device
from mmformer.model import MultimodalTransformer
from mmformer.preprocess.media import check_unicode
from mmformer.values import is_int

if TYPE_CHECKING:
    from mmformer.adapt.prompts import ContextPrompt
    from mmformer.compress.pt2e import PT2EModel
    from mmformer.preprocess.processor import Processor
    from mmformer.preprocess.tokenizer import Tokenizer

Template = str | Callable[[str], str]
MODALITIES = ("image", "audio")


# ---------------------------------------------------------------------------------------------------- functions
def check_classnames(classnames: Any, *, distinct: bool = True) -> list[str]:
    """Class names as a list, or a clear error: empty, not strings, blank names; with ``distinct`` (the default)
    repeated names too.

    ``distinct=False`` lets a name appear more than once, as open_clip's ``build_zero_shot_classifier`` does (its
    ``IMAGENET_CLASSNAMES`` holds 'missile' and 'sunglasses' twice, so that its 1,000 columns line up with the data
    set's label indices): each position is a column, and a repeated name's columns are identical
    (:func:`build_class_embeddings`). Where a name must map back to one index (the training task's zero-shot
    accuracy reads a sample's class from its text), keep the default."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames: expected a list of class names (str), got {type(classnames).__name__}")
    names = list(classnames)
    if not names:
        raise ValueError("classnames: expected at least one class name, got an empty list")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"classnames[{i}]: expected str, got {type(name).__name__}")
        if not name.strip():
            raise ValueError(f"classnames[{i}]: expected a non-blank class name, got {name!r:.80}")
        check_unicode(name, f"classnames[{i}]")
    repeated = repeated_names(names)
    if distinct and repeated:
        raise ValueError(f"classnames: expected distinct names, got duplicates {describe_repeated(repeated)}")
    return names


def repeated_names(names: Sequence[str]) -> dict[str, list[int]]:
    """The names that appear more than once, each with its positions, in order of first appearance."""
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        positions.setdefault(name, []).append(i)
    return {name: where for name, where in positions.items() if len(where) > 1}


def describe_repeated(repeated: dict[str, list[int]], shown: int = 4) -> str:
    """``repeated`` (:func:`repeated_names`) for a message, cut short: the first ``shown`` names, each with its first
    ``shown`` positions (an error or a warning never echoes a whole class list)."""

    def cut(items: list[str]) -> str:
        return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")

    return cut([f"{name!r:.40} at [{cut([str(i) for i in where])}]" for name, where in repeated.items()])


def check_templates(templates: Any) -> list[Template]:
    """Templates as a list (a single string is one template); each holds ``{}`` or is a callable (whose prompts are
    checked as they are made: :func:`_fill`)."""
    if isinstance(templates, str) or callable(templates):
        templates = [templates]
    if not isinstance(templates, Sequence) or not templates:
        raise ValueError(
            f"templates: expected a non-empty list of prompt templates such as 'a photo of a {{}}.', "
            f"got {templates!r:.80}"
        )
    for i, t in enumerate(templates):
        if isinstance(t, str):
            if "{}" not in t:
                raise ValueError(
                    f"templates[{i}]: expected a template with '{{}}' where the class name goes, got {t!r:.80}"
                )
        elif not callable(t):
            raise TypeError(
                f"templates[{i}]: expected a str with '{{}}' or a callable name → prompt, got {type(t).__name__}"
            )
    return list(templates)


def _fill(templates: Sequence[Template], k: int, name: str) -> str:
    """The prompt of class ``name`` in ``templates[k]``; a callable template's answer must be a str."""
    template = templates[k]
    prompt = template.replace("{}", name) if isinstance(template, str) else template(name)
    if not isinstance(prompt, str):
        raise TypeError(
            f"templates[{k}]: expected a callable that returns the prompt (str) for a class name; for "
            f"{name!r:.80} it returned {type(prompt).__name__} {prompt!r:.80}"
        )
    return prompt


def build_class_embeddings(
    model: MultimodalTransformer,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template] = ("{}",),
    *,
    batch_size: int = 64,
    prompt: ContextPrompt | None = None,
) -> torch.Tensor:
    """(C, E) class embeddings: per class, the normalised mean over templates of the normalised text embeddings.

    Prompts are tokenized and encoded ``batch_size`` at a time; the model is run in eval mode
    (:func:`~mmformer.eval_mode.eval_mode`: every submodule's mode restored afterwards, safe from several threads).
    Prompts longer than the text context are truncated with a warning (a cut prompt may lose the class name).
    A name that appears more than once (open_clip's ``IMAGENET_CLASSNAMES`` holds two) is encoded once: its rows are
    the same values. Only the result and one batch of prompt embeddings are held (:func:`_template_means`).

    With a learned ``prompt`` (CoOp's context vectors) each class is encoded once as ``[bos] context name [eos]``
    instead of through the templates (leave ``templates`` at its default). Gradients reach the prompt when it
    requires them and grad mode is on (training it); otherwise everything runs under ``torch.no_grad``. Not inference
    mode: a model sharded by FSDP2 (:mod:`mmformer.tasks.parallel`, the training task's validation) gathers its
    parameters by writing into buffers that inference mode would turn into inference tensors, and the next gather
    outside it fails ("Inplace update to inference tensor outside InferenceMode"); the class embeddings are then also
    ordinary tensors, usable in autograd-recording code.
    """
    names, templates = check_classnames(classnames, distinct=False), check_templates(templates)
    if prompt is not None and templates != ["{}"]:
        raise ValueError(
            f"templates: a learned prompt replaces the templates; pass one or the other, got {templates!r:.80}"
        )
    unique = list(dict.fromkeys(names))  # a repeated name is encoded once: its columns are the same tensor rows
    train = prompt is not None and prompt.vectors.requires_grad and torch.is_grad_enabled()
    with torch.set_grad_enabled(train), eval_mode(model):
        if prompt is None:
            means = _template_means(model, tokenizer, unique, templates, batch_size)  # (U, E)
        else:
            ids, mask, embeds = prompt.class_inputs(model, tokenizer, unique)  # (U, T), (U, T), (U, T, D)
            rows = [slice(i, i + batch_size) for i in range(0, len(unique), batch_size)]
            means = torch.cat([model.encode_text(ids[r], mask[r], inputs_embeds=embeds[r]).float() for r in rows])
        embeddings = F.normalize(means, dim=-1)  # (U, E)
        if len(unique) < len(names):
            row = {name: i for i, name in enumerate(unique)}
            embeddings = embeddings[torch.tensor([row[name] for name in names], device=embeddings.device)]
        return embeddings  # (C, E)


def _template_means(
    model: MultimodalTransformer, tokenizer: Tokenizer, names: list[str], templates: list[Template], batch_size: int
) -> torch.Tensor:
    """(C, E) per class, the mean over the templates of the normalised text embeddings of its prompts.

    The C × K prompts run class-major, ``batch_size`` at a time, each batch padded to its own longest prompt (not to
    the context length). The classes whose K embeddings are all in are averaged as each batch comes (as open_clip's
    ``build_zero_shot_classifier`` averages per batch of classes), so that what is held is the result, one batch and
    the embeddings of a class that a batch cut in two; never all C × K embeddings (312 MiB for 1,000 classes × 80
    templates at E = 1024, for a 4 MiB result)."""
    from mmformer.preprocess.processor import tokenize_with_warning

    K, total = len(templates), len(names) * len(templates)
    max_length = min(tokenizer.max_length, model.config.text.max_tokens)
    device = model_device(model)
    means, done = None, 0  # the classes averaged so far
    held, count = [], 0  # the embeddings of the classes after them (count rows, < K between batches)
    for start in range(0, total, batch_size):
        prompts = [_fill(templates, j % K, names[j // K]) for j in range(start, min(start + batch_size, total))]
        tokens = tokenize_with_warning(tokenizer, prompts, max_length, what="prompt")
        held.append(model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float())
        count += len(prompts)
        if count < K:
            continue
        block = torch.cat(held) if len(held) > 1 else held[0]
        n = count // K  # classes complete
        piece = block[: n * K].reshape(n, K, -1).mean(dim=1)  # (n, E)
        if means is None:
            means = piece.new_empty(len(names), piece.shape[1])
        means[done : done + n] = piece
        done, count = done + n, count - n * K
        held = [block[n * K :]] if count else []
    return means


def zero_shot_logits(
    model: MultimodalTransformer, features: torch.Tensor, class_embeddings: torch.Tensor
) -> torch.Tensor:
    """(B, E) normalised input embeddings → (B, C) logits: ``logit_scale.exp() * features @ class_embeddings.T``
    (plus the model's logit bias, if it has one: SigLIP's scores, read through a sigmoid).

    The one zero-shot score: :class:`ZeroShotClassifier`, the training task's zero-shot accuracy
    (:mod:`mmformer.tasks.evaluation`) and CoOp's prompt-training loss (:mod:`mmformer.tasks.adapt`) all call it.
    Gradients flow to ``features`` and ``class_embeddings`` (a prompt being trained)."""
    if features.ndim != 2 or features.shape[1] != class_embeddings.shape[1]:
        raise ValueError(
            f"features: expected shape (B, {class_embeddings.shape[1]}) matching the class embeddings, "
            f"got {tuple(features.shape)}"
        )
    emb = class_embeddings.to(device=features.device, dtype=torch.float32)
    with torch.autocast(features.device.type, enabled=False):  # float32 scores, whatever the caller's autocast
        logits = model.logit_scale.exp().float() * features.float() @ emb.T  # (B, C)
        if model.logit_bias is not None:
            logits = logits + model.logit_bias.float()
    return logits


# ---------------------------------------------------------------------------------------------------- classifier
class ZeroShotClassifier:
    """Classify images or audio among ``classnames`` by their similarity to prompted class names.

    Predictions run in eval mode (no dropout) and give a training model back with every submodule's mode as it was
    (:func:`~mmformer.eval_mode.eval_mode`). Threads may share one classifier: a model in eval mode serves them
    together, a model in train mode one at a time. ``classnames``, ``templates`` and ``prompt`` are read-only (the
    cached class embeddings are built from them): build a new classifier for other ones.

    Args:
        model: a contrastive model with a text route and the ``modality`` route, or its PT2E int8 model
            (:func:`mmformer.compress.pt2e.load`: its encoder graphs).
        processor: turns raw inputs (PIL images, paths, numpy arrays) into tensors and holds the tokenizer;
            defaults to ``model.processor``. A bare :class:`~mmformer.Tokenizer` works when inputs are tensors.
        classnames: the classes, in the order of the output columns. A name may appear more than once, as in
            open_clip's ``IMAGENET_CLASSNAMES`` (so that the columns line up with a data set's label indices), with a
            warning: its columns are identical, they share the probability, and an argmax (:meth:`predict`) gives
            the first.
        templates: prompt templates, each with ``{}`` for the class name (or callables name → prompt).
        modality: "image" or "audio".
        batch_size: inputs (and prompts) encoded per forward pass.
        prompt: a learned prompt (:class:`~mmformer.adapt.prompts.ContextPrompt`, or the path of its file) in place of
            the templates.

    Example:
        >>> clf = ZeroShotClassifier(model, processor, ["cat", "dog"], ["a photo of a {}."])
        >>> clf.predict(images)  # ['cat', 'dog', ...]
    """

    def __init__(
        self,
        model: MultimodalTransformer | PT2EModel,
        processor: Processor | Tokenizer | None = None,
        classnames: Sequence[str] | None = None,
        templates: Sequence[Template] = ("{}",),
        modality: str = "image",
        batch_size: int = 64,
        prompt: ContextPrompt | str | os.PathLike | None = None,
    ):
        from mmformer.compress.pt2e import PT2EModel

        if not isinstance(model, (MultimodalTransformer, PT2EModel)):
            raise TypeError(f"model: expected mmformer.MultimodalTransformer (or its PT2E int8 model), got "
                            f"{type(model).__name__}")  # fmt: skip
        if prompt is not None and isinstance(model, PT2EModel):
            raise ValueError("prompt: a learned prompt is read by the float text encoder; a PT2E int8 model's text "
                             "graph takes ids only (pass its float model, .model)")  # fmt: skip
        if modality not in MODALITIES:
            raise ValueError(f"modality: expected one of {list(MODALITIES)}, got {modality!r}")
        routes = sorted(model.config.routes)
        if modality not in model.config.routes:
            raise ValueError(f"modality={modality!r}: this model has no {modality} encoder; its routes are {routes}")
        if "text" not in model.config.routes:
            raise ValueError(f"model: zero-shot classification needs a text encoder; this model's routes are {routes}")
        if classnames is None:
            raise ValueError("classnames: expected a list of class names, got None")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.model = model
        self.processor = processor if processor is not None else getattr(model, "processor", None)
        if modality == "audio" and _preprocesses(self.processor):
            self.processor.check_audio_rate(model.config.audio.sample_rate)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        vocab = getattr(tokenizer, "vocab_size", None)
        if isinstance(vocab, int) and vocab > model.config.text.vocab_size:
            raise ValueError(
                f"processor: its tokenizer has {vocab} token ids but the model's text vocabulary has "
                f"{model.config.text.vocab_size} (TextConfig.vocab_size); they do not belong together"
            )
        classnames, templates = check_classnames(classnames, distinct=False), check_templates(templates)
        if prompt is not None:
            from mmformer.adapt.prompts import ContextPrompt, load_prompt

            if isinstance(prompt, (str, os.PathLike)):
                prompt = load_prompt(prompt, model, kind=ContextPrompt.kind)
            if not isinstance(prompt, ContextPrompt):
                raise TypeError(f"prompt: expected a ContextPrompt or its file's path, got {type(prompt).__name__}")
            prompt.check_model(model)
            if templates != ["{}"]:
                raise ValueError(f"templates: a learned prompt replaces the templates; got both ({templates!r:.80})")
            prompt = prompt.to(model_device(model))
        repeated = repeated_names(classnames)
        if repeated:
            warnings.warn(
                f"classnames: repeated names {describe_repeated(repeated)}; each position is a column, and the "
                "columns of one name are identical (they share its probability; an argmax gives the first)",
                stacklevel=2,
            )
        self._classnames, self._templates, self._prompt = tuple(classnames), tuple(templates), prompt
        # with repeated names: each name's first position, and each column's place among them (the scores are
        # computed once per name and copied to its columns: a matmul's columns may differ in their last bits)
        self._first = self._column = None
        if repeated:
            first: dict[str, int] = {}
            for i, name in enumerate(classnames):
                first.setdefault(name, i)
            place = {name: j for j, name in enumerate(first)}
            self._first = torch.tensor(list(first.values()))  # (U,)
            self._column = torch.tensor([place[name] for name in classnames])  # (C,)
        self.modality = modality
        self.batch_size = batch_size
        self._class_embeddings: torch.Tensor | None = None

    def __repr__(self) -> str:
        prompts = (
            f"prompt={self.prompt.length} vectors" if self.prompt is not None else f"templates={len(self.templates)}"
        )
        return (
            f"ZeroShotClassifier(modality={self.modality!r}, classes={len(self.classnames)}, {prompts}, "
            f"batch_size={self.batch_size})"
        )

    # what the cached class embeddings are built from: fixed, so that they can never belong to other classes
    @property
    def classnames(self) -> tuple[str, ...]:
        """The classes, in the order of the output columns."""
        return self._classnames

    @classnames.setter
    def classnames(self, value: Any) -> None:
        _read_only("classnames")

    @property
    def templates(self) -> tuple[Template, ...]:
        """The prompt templates (``("{}",)`` with a learned prompt)."""
        return self._templates

    @templates.setter
    def templates(self, value: Any) -> None:
        _read_only("templates")

    @property
    def prompt(self) -> ContextPrompt | None:
        """The learned prompt in place of the templates, if any."""
        return self._prompt

    @prompt.setter
    def prompt(self, value: Any) -> None:
        _read_only("prompt")

    @property
    def tokenizer(self) -> Tokenizer:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer is None or not callable(tokenizer):
            raise ValueError(
                "processor: the class names need a tokenizer; pass processor=Processor(tokenizer=...) (or a "
                "Tokenizer), or load the model with its processor"
            )
        return tokenizer

    @property
    def class_embeddings(self) -> torch.Tensor:
        """(C, E) normalised float32 class embeddings, computed on first use and cached (call :meth:`reset` after the
        model's weights change).

        The cache does not depend on where it was first asked for: it is built outside inference mode (an inference
        tensor could not be used by autograd-recording code later, such as a linear probe initialised from it) and
        with autocast switched off (a first use under bf16 autocast cached bf16-rounded embeddings for every later
        call)."""
        if self._class_embeddings is None:
            grad = torch.is_grad_enabled()  # leaving inference mode switches grad mode on: keep the caller's
            device = model_device(self.model).type
            with torch.inference_mode(False), torch.set_grad_enabled(grad), torch.autocast(device, enabled=False):
                self._class_embeddings = build_class_embeddings(
                    self.model,
                    self.tokenizer,
                    self.classnames,
                    self.templates,
                    batch_size=self.batch_size,
                    prompt=self.prompt,
                )
        return self._class_embeddings

    def reset(self) -> None:
        """Forget the cached class embeddings."""
        self._class_embeddings = None

    # ------------------------------------------------------------------ prediction
    def logits(
        self, inputs: Any, *, lengths: torch.Tensor | None = None, sampling_rate: int | None = None
    ) -> torch.Tensor:
        """(B, C) float32 logits on the CPU.

        Args:
            inputs: images — ``pixel_values`` (B, C, H, W), or PIL images / paths / numpy arrays / a list of them
                (preprocessed by the processor); audio — waveforms (B, S) at the model's sample rate, or a list of
                1-D arrays / paths. A processor output dict works too.
            lengths: real samples per row of a (B, S) waveform tensor.
            sampling_rate: the rate of waveform arrays (default: the model's); they are resampled by the processor.
        """
        class_emb = self.class_embeddings
        if self._first is not None:
            class_emb = class_emb[self._first.to(class_emb.device)]  # (U, E): one row per name
        chunks = []
        with torch.inference_mode(), eval_mode(self.model):
            for features in self._features(inputs, lengths, sampling_rate):
                chunks.append(zero_shot_logits(self.model, features, class_emb).cpu())  # only (b, C) is kept
        logits = torch.cat(chunks)  # concatenated outside inference mode: a normal tensor
        return logits if self._column is None else logits[:, self._column]  # (B, C): a name's columns identical

    def predict_proba(self, inputs: Any, **kwargs: Any) -> torch.Tensor:
        """(B, C) class probabilities: the softmax of :meth:`logits` (rows sum to 1), or for a model with a logit
        bias (SigLIP, trained with a sigmoid loss) their sigmoid: an independent probability per class."""
        logits = self.logits(inputs, **kwargs)
        return logits.sigmoid() if self.model.logit_bias is not None else logits.softmax(dim=-1)

    def predict(self, inputs: Any, **kwargs: Any) -> list[str]:
        """The most likely class name per input."""
        return [self.classnames[i] for i in self.logits(inputs, **kwargs).argmax(dim=-1).tolist()]

    def topk(self, inputs: Any, k: int = 5, **kwargs: Any) -> list[list[tuple[str, float]]]:
        """Per input, the ``k`` most likely (class name, probability) pairs, best first (k is capped at C)."""
        if not is_int(k) or k < 1:
            raise ValueError(f"k: expected a positive int, got {k!r}")
        probs, index = self.predict_proba(inputs, **kwargs).topk(min(k, len(self.classnames)), dim=-1)
        return [
            [(self.classnames[i], p) for i, p in zip(row_i, row_p)]
            for row_i, row_p in zip(index.tolist(), probs.tolist())
        ]

    # ------------------------------------------------------------------ inputs → features, batch by batch
    def _features(self, inputs: Any, lengths: torch.Tensor | None, sampling_rate: int | None) -> Iterator[torch.Tensor]:
        """Yield normalised (b, E) embeddings, ``batch_size`` inputs at a time."""
        device = model_device(self.model)
        if isinstance(inputs, (torch.Tensor, np.ndarray, list, tuple)) and len(inputs) == 0:
            raise ValueError("inputs: expected at least one input, got none")
        if isinstance(inputs, dict):
            key = "pixel_values" if self.modality == "image" else "audio"
            if key not in inputs:
                raise ValueError(f"inputs: expected a batch dict with {key!r}, got keys {sorted(inputs)}")
            if self.modality == "audio" and lengths is None:
                lengths = inputs.get("audio_lengths")
            inputs = inputs[key]
        if self.modality == "image":
            for name, value in (("lengths", lengths), ("sampling_rate", sampling_rate)):
                if value is not None:
                    raise ValueError(f"{name}: only used with modality='audio'; got {name}={value!r} for images")
            if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
                for start in range(0, len(inputs), self.batch_size):
                    yield self.model.encode_image(inputs[start : start + self.batch_size].to(device))
                return
            for chunk in self._chunks(inputs, batch_dims=4):
                pixels = self._processor("images")(images=chunk)["pixel_values"]
                yield self.model.encode_image(pixels.to(device))
            return
        from mmformer.preprocess.processor import check_not_channels_last

        check_not_channels_last(inputs, "inputs")  # soundfile's (S, C) would pass for S one-sample waveforms
        model_rate = self.model.config.audio.sample_rate
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 2:
            if sampling_rate not in (None, model_rate):
                raise ValueError(
                    f"sampling_rate: a (B, S) waveform tensor must already be at the model's rate ({model_rate} Hz), "
                    f"got sampling_rate={sampling_rate}; pass a list of 1-D waveforms to have them resampled"
                )
            if lengths is not None:
                lengths = torch.as_tensor(lengths)
                if lengths.shape != (len(inputs),):
                    raise ValueError(f"lengths: expected shape ({len(inputs)},), got {tuple(lengths.shape)}")
            for start in range(0, len(inputs), self.batch_size):
                rows = slice(start, start + self.batch_size)
                part = None if lengths is None else lengths[rows].to(device)
                yield self.model.encode_audio(inputs[rows].to(device), part)
            return
        if lengths is not None:
            raise ValueError("lengths: only used with a (B, S) waveform tensor; a list of waveforms carries its own")
        processor = self.processor if _preprocesses(self.processor) else None
        for chunk in self._chunks(inputs, batch_dims=2):
            if processor is not None:
                batch = processor(audio=chunk, sampling_rate=sampling_rate or model_rate)
            else:
                batch = _pad(chunk)
            yield self.model.encode_audio(batch["audio"].to(device), batch["audio_lengths"].to(device))

    def _chunks(self, inputs: Any, batch_dims: int) -> Iterator[list]:
        batched = isinstance(inputs, (torch.Tensor, np.ndarray)) and inputs.ndim == batch_dims
        items = list(inputs) if isinstance(inputs, (list, tuple)) or batched else [inputs]  # else: one input
        if not items:
            raise ValueError("inputs: expected at least one input, got an empty list")
        for start in range(0, len(items), self.batch_size):
            yield items[start : start + self.batch_size]

    def _processor(self, what: str) -> Processor:
        if not _preprocesses(self.processor):
            kind = "pixel_values (B, C, H, W)" if what == "images" else "waveforms (B, S) or a list of 1-D arrays"
            raise ValueError(
                f"inputs: raw {what} need a processor (mmformer.Processor) to be preprocessed; pass processor=..., or "
                f"pass {kind}"
            )
        return self.processor


def _read_only(name: str) -> None:
    raise AttributeError(
        f"{name}: read-only, set when the ZeroShotClassifier is built (its class embeddings are computed from it and "
        f"cached); build a new ZeroShotClassifier(model, processor, classnames=..., templates=...) instead"
    )


def _preprocesses(processor: Any) -> bool:
    """A Processor (images/audio → tensors), as opposed to None or a bare Tokenizer."""
    return processor is not None and hasattr(processor, "image") and hasattr(processor, "audio")


def _pad(waves: list) -> dict[str, torch.Tensor]:
    """Without a processor: 1-D waveforms (already at the model's rate) right-padded into a batch."""
    from mmformer.data.collate import pad_audio

    tensors = []
    for i, w in enumerate(waves):
        if isinstance(w, (str, os.PathLike)):
            raise ValueError(f"inputs[{i}]: audio file paths need a processor (mmformer.Processor); got {w!r}")
        t = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w)
        if t.ndim != 1 or not t.is_floating_point() or not t.numel():
            raise ValueError(f"inputs[{i}]: expected a non-empty 1-D float waveform, got {t.dtype} {tuple(t.shape)}")
        tensors.append(t.float())
    audio, lengths = pad_audio(tensors)
    return {"audio": audio, "audio_lengths": lengths}
