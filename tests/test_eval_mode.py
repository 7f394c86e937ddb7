"""eval_mode: inference runs a model in eval mode and gives it back with every submodule's mode as it was, also from
several threads at once; and the two places that switch a user's model for inference (zero-shot classification,
long-form transcription) go through it."""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from mmformer import MultimodalTransformer, ZeroShotClassifier
from mmformer.eval_mode import _switches, eval_mode
from mmformer.generation.options import DecodingOptions
from mmformer.longform import transcribe_files
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig, Processor
from mmformer.preprocess.tokenizer import Tokenizer

CLASSES = ["zero", "one", "two", "three"]


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def training_with_a_frozen_part(model: nn.Module, frozen: nn.Module) -> dict[str, bool]:
    """Put ``model`` in train mode with ``frozen`` in eval mode (a part frozen while the rest trains); its modes."""
    model.train()
    frozen.eval()
    before = modes(model)
    assert True in before.values() and False in before.values()
    return before


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))


@pytest.fixture(autouse=True)
def _frequent_thread_switches():
    """Threads handed the interpreter every microsecond, so that a block that is not serialised overlaps others."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["a photo of zero one two three", "the digit four", "the sound of five"], vocab_size=290)


@pytest.fixture
def dropout_model(make_model_config, tokenizer) -> MultimodalTransformer:
    """A tiny model whose dropout shows: a prediction run in train mode differs from one in eval mode."""
    config = make_model_config(stack={"dropout": 0.5}, text={"vocab_size": tokenizer.vocab_size})
    model = MultimodalTransformer(config)
    model.processor = Processor(
        tokenizer, image=ImageProcessorConfig(image_size=16), audio=AudioProcessorConfig(sample_rate=8000)
    )
    return model


# ------------------------------------------------------------------------------------------ the context manager
def test_eval_mode_runs_the_block_in_eval_mode_and_restores_every_submodules_mode():
    net = small_net()
    before = training_with_a_frozen_part(net, net[2])
    with eval_mode(net):
        assert not any(modes(net).values())
    assert modes(net) == before  # not net.train(True): the frozen part stays in eval mode
    with pytest.raises(RuntimeError, match="inside"), eval_mode(net):
        raise RuntimeError("inside")
    assert modes(net) == before


def test_a_nested_block_of_the_same_thread_runs_on_and_leaves_the_restore_to_the_outer_one():
    net = small_net()
    before = training_with_a_frozen_part(net, net[2])
    with eval_mode(net):
        with eval_mode(net):  # the lock is re-entrant: no deadlock
            assert not any(modes(net).values())
        assert not any(modes(net).values())  # the outer block still runs in eval mode
    assert modes(net) == before


def test_a_model_in_eval_mode_is_left_alone_and_its_threads_run_together():
    """The serving case: two threads inside the block at once (a lock would keep the second out and break the
    barrier), no lock made for the model, its modes untouched."""
    net = small_net().eval()
    inside = threading.Barrier(2, timeout=5)

    def block() -> bool:
        with eval_mode(net):
            inside.wait()
            return not any(modes(net).values())

    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(lambda _: block(), range(2))) == [True, True]
    assert net not in _switches
    assert not any(modes(net).values())


def test_a_model_in_train_mode_runs_one_block_at_a_time_in_eval_mode():
    """Sixteen threads released together on a training model, ten times: one block at a time, each in eval mode
    throughout (no thread restores train mode under another's block, nor takes a model another one switched for in
    eval mode of its own), and the modes restored at the end."""
    net = small_net()
    before = training_with_a_frozen_part(net, net[2])
    threads, rounds = 16, 10
    start = threading.Barrier(threads, timeout=5)
    lock = threading.Lock()
    running, most, seen_training = [0], [0], []

    def block() -> None:
        start.wait()
        with eval_mode(net):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            for _ in range(20):
                seen_training.extend(name for name, training in modes(net).items() if training)
                net(torch.zeros(1, 4))
            with lock:
                running[0] -= 1

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: block(), range(threads * rounds)))
    assert most[0] == 1
    assert seen_training == []
    assert modes(net) == before


def test_the_lock_does_not_keep_the_model_alive():
    net = small_net().train()
    with eval_mode(net):
        pass
    assert net in _switches
    gone = weakref.ref(net)
    del net
    gc.collect()
    assert gone() is None


# ------------------------------------------------------------------------------------------ its users
def test_zero_shot_classifier_from_many_threads_on_a_training_model_gives_the_serial_results(dropout_model):
    """A thread pool sharing one classifier while the model trains (dropout on, its image embedder frozen): every
    prediction equals the serial one (no dropout in any), and the model comes back with each submodule's mode.

    Before, each thread saved ``model.training`` and restored it on its own: a thread saved the eval mode another one
    had set and ran while a third restored train mode, so some predictions ran with dropout and the model ended in
    eval mode."""
    model = dropout_model
    clf = ZeroShotClassifier(model, model.processor, CLASSES, ["a photo of {}."])
    before = training_with_a_frozen_part(model, model.image_embed)
    inputs = [torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    serial = [clf.logits(x) for x in inputs]
    model.eval()
    assert all(torch.equal(clf.logits(x), s) for x, s in zip(inputs, serial))  # the serial ones ran in eval mode
    model.train()
    model.image_embed.eval()
    threads, rounds = 16, 3
    start = threading.Barrier(threads, timeout=10)

    def predict(i: int) -> tuple[int, torch.Tensor]:
        start.wait()
        return i % len(inputs), clf.logits(inputs[i % len(inputs)])

    for _ in range(rounds):
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(predict, range(threads)))
        differing = [i for i, logits in results if not torch.equal(logits, serial[i])]
        assert differing == [], f"{len(differing)} of {threads} predictions differ from the serial ones"
        assert modes(model) == before


def test_transcribe_files_gives_a_training_model_back_as_it_was(dropout_model):
    """Transcribing from a training callback: the windows are decoded in eval mode (the same text as the model in eval
    mode gives) and the model trains on afterwards with every submodule's mode as before (it was left in eval mode:
    training went on without dropout)."""
    model = dropout_model
    wave = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 0.1
    options = DecodingOptions(do_sample=False, max_new_tokens=4)
    expected = transcribe_files(model.eval(), [wave], options)
    before = training_with_a_frozen_part(model, model.audio_embed)
    assert transcribe_files(model, [wave], options) == expected
    assert modes(model) == before
