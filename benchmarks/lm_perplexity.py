"""Held-out perplexity of a language model against unigram and bigram baselines on the same tokens.

    python benchmarks/lm_perplexity.py --ckpt runs/lm_shakespeare/checkpoints/last.ckpt     # the text demo

Every figure counts the same predictions: the held-out documents (default: data/shakespeare/test) are tokenized with
the model's tokenizer and packed into blocks of the model's context, as training packed them (``pack_documents``),
and each token after a block's first is predicted from what precedes it in its block — by the model, by a unigram
model (add-one smoothed counts of the training tokens) and by a bigram model (the previous token only: maximum-
likelihood bigram counts interpolated with the unigram, the weight chosen on the validation documents). Perplexity is
``exp(mean negative log-likelihood)`` per token. ``--tiny`` runs an untrained toy model on a slice of the data (a smoke
test of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import record  # noqa: E402
from mmformer.data.text import PackedBlocks, TextDocuments  # noqa: E402

DATA = ROOT / "data" / "shakespeare"
LAMBDAS = [i / 20 for i in range(1, 20)]


def blocks(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """The packed blocks (N, L) of texts, as training packs them."""
    packed = PackedBlocks(texts, tokenizer, block_size)
    return torch.stack([packed[i]["input_ids"] for i in range(len(packed))])


def pairs(rows: torch.Tensor) -> tuple[list[int], list[int]]:
    """(previous, next) token of every prediction in the blocks: each token after a block's first."""
    return rows[:, :-1].flatten().tolist(), rows[:, 1:].flatten().tolist()


class NGram:
    """Unigram (add-one) and interpolated bigram probabilities from the training tokens."""

    def __init__(self, stream: list[int], vocab_size: int):
        self.V = vocab_size
        self.unigrams = Counter(stream)
        self.total = len(stream)
        self.bigrams = Counter(zip(stream[:-1], stream[1:]))
        self.contexts = Counter(stream[:-1])

    def unigram(self, token: int) -> float:
        return (self.unigrams[token] + 1) / (self.total + self.V)

    def bigram(self, previous: int, token: int, weight: float) -> float:
        seen = self.contexts[previous]
        ml = self.bigrams[(previous, token)] / seen if seen else 0.0
        return weight * ml + (1 - weight) * self.unigram(token)

    def perplexity(self, previous: list[int], following: list[int], weight: float | None = None) -> float:
        if weight is None:
            nll = -sum(math.log(self.unigram(t)) for t in following)
        else:
            nll = -sum(math.log(self.bigram(p, t, weight)) for p, t in zip(previous, following))
        return math.exp(nll / len(following))


@torch.inference_mode()
def model_perplexity(model, rows: torch.Tensor, batch_size: int = 32) -> float:
    nll, count = 0.0, 0
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start : start + batch_size]
        logits = model.decode(ids).float()  # (b, L, V)
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        count += ids[:, 1:].numel()
    return math.exp(float(nll) / count)


def tiny_model(train: list[str]):
    """An untrained toy model with a small tokenizer: runs the script in seconds."""
    from mmformer import MultimodalTransformer
    from mmformer.config import ModelConfig, StackConfig, TextConfig
    from mmformer.preprocess.processor import Processor
    from mmformer.preprocess.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(train, vocab_size=300)
    stack = StackConfig(width=32, depth=1, n_heads=2)
    text = TextConfig(vocab_size=tokenizer.vocab_size, max_length=32)
    config = ModelConfig(
        stacks={"d": stack}, routes={"decoder": "d"}, image=None, audio=None, text=text, embed_dim=None
    )
    model = MultimodalTransformer(config).eval()
    model.processor = Processor(tokenizer)
    return model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="a training checkpoint (.ckpt) or an exported model directory")
    parser.add_argument("--train", default=str(DATA / "train"), help="the training documents (.txt file or folder)")
    parser.add_argument("--val", default=str(DATA / "val"), help="documents that choose the bigram's weight")
    parser.add_argument("--test", default=str(DATA / "test"), help="the held-out documents scored")
    parser.add_argument("--tiny", action="store_true", help="an untrained toy model on a slice of the data")
    parser.add_argument("--no-save", action="store_true", help="do not append the figures to results.jsonl")
    args = parser.parse_args(argv)
    texts = {split: TextDocuments(getattr(args, split)).texts() for split in ("train", "val", "test")}
    if args.tiny:
        texts = {split: [t[:4000] for t in docs[:2]] for split, docs in texts.items()}
        model = tiny_model(texts["train"])
    elif args.ckpt:
        from mmformer import from_pretrained

        model = from_pretrained(args.ckpt).eval()
    else:
        parser.error("--ckpt is required (or --tiny)")
    tokenizer = getattr(model.processor, "tokenizer", None)
    if tokenizer is None:
        parser.error(f"{args.ckpt}: the model has no tokenizer to tokenize the documents with")
    block = model.config.text.max_length
    train_stream = [i for t in texts["train"] for i in tokenizer.encode(t)]
    ngram = NGram(train_stream, model.config.text.vocab_size)
    val_prev, val_next = pairs(blocks(texts["val"], tokenizer, block))
    weight = min(LAMBDAS, key=lambda w: ngram.perplexity(val_prev, val_next, w))
    rows = blocks(texts["test"], tokenizer, block)
    previous, following = pairs(rows)
    result = {
        "checkpoint": "tiny (untrained)" if args.tiny else str(args.ckpt),
        "test_tokens": len(following),
        "train_tokens": len(train_stream),
        "vocab_size": model.config.text.vocab_size,
        "block": block,
        "model": model_perplexity(model, rows),
        "bigram": ngram.perplexity(previous, following, weight),
        "bigram_weight": weight,
        "unigram": ngram.perplexity(previous, following),
    }
    print(f"held-out perplexity on {args.test} ({result['test_tokens']:,} predicted tokens; blocks of {block})")
    print(f"  {'model':<28} {result['model']:10.2f}")
    print(f"  {'bigram (interpolated)':<28} {result['bigram']:10.2f}   weight {weight} chosen on {args.val}")
    print(f"  {'unigram (add-one)':<28} {result['unigram']:10.2f}")
    print(f"  vs_bigram {result['bigram'] / result['model']:.2f}x lower perplexity")
    record("lm_perplexity", [result], args)
    return result


if __name__ == "__main__":
    main()
