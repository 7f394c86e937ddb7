"""Every adapter ``mmformer fit`` writes works where users load it: trained through the CLI (LoRA with trainable token
rows and DoRA, LoRA with ``modules_to_save``), exported from the run's checkpoint, reloaded in a new process through
``from_pretrained(base, adapter=DIR)`` and through the CLI's ``--adapter``, then decoded (caption, transcribe,
generate with beams, zero-shot) — equal to the adapted model that trained, in the process that trained it; its towers
exported to ONNX give the same zero-shot probabilities in onnxruntime; and ``mmformer merge`` gives the same logits
from a plain model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import torch
from cli_helpers import REPO, WORDS, cli_env, fit_in_process, tiny_config, write_config, write_pairs

from mmformer import ModelConfig, MultimodalTransformer, Processor, from_pretrained
from mmformer.adapt import adapter_state, adapters
from mmformer.adapt.adapters import LoraSettings
from mmformer.io.weights import base_layer
from mmformer.preprocess.processor import AudioProcessorConfig, ImageProcessorConfig
from mmformer.preprocess.tokenizer import Tokenizer
from mmformer.ship.onnx_runner import OnnxModel
from mmformer.zeroshot import ZeroShotClassifier

pytest.importorskip("peft")

KINDS = {
    "modules_to_save": {"r": 2, "target_modules": ["qkv", "mlp"], "modules_to_save": ["image_proj", "lm_head"]},
    "dora+trainable_tokens": {
        "r": 2,
        "target_modules": ["all"],
        "use_dora": True,
        "trainable_token_indices": [5, 6, 7, 8],
    },
}
DECODING = {"max_new_tokens": 5}
CLASSES = WORDS[:4]

# Run in a fresh interpreter: the public API, then the command line (`mmformer transcribe --adapter`, `mmformer merge`)
# through its entry point in the same interpreter (one start-up instead of three); the results as JSON on stdout.
RELOAD = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import torch
    import mmformer
    from mmformer.cli.main import main
    from mmformer.ship.export import export
    from mmformer.zeroshot import ZeroShotClassifier

    torch.set_num_threads(1)
    base, adapter, images, wav, classes, onnx, merged = sys.argv[1], sys.argv[2], sys.argv[3].split(","), *sys.argv[4:8]
    model = mmformer.from_pretrained(base, adapter=adapter)
    export(model, onnx, format="onnx", towers=["image", "text"])
    waveform = torch.from_numpy(__import__("soundfile").read(wav, dtype="float32")[0])[None]
    clf = ZeroShotClassifier(model, model.processor, classnames=classes.split(","), modality="image")
    results = {
        "caption": model.caption(images, max_new_tokens=5),
        "transcribe": model.transcribe([wav], max_new_tokens=5),
        "beams": model.generate(audio=waveform, num_beams=3, max_new_tokens=5).tolist(),
        "zeroshot": clf.predict_proba(images).tolist(),
    }
    greedy = ["--temperature", "0", "--max-new-tokens", "5", "--no-progress"]  # as model.transcribe: no fallback
    with contextlib.redirect_stdout(io.StringIO()) as cli_out:
        main(["transcribe", "--model", base, "--adapter", adapter, *greedy, wav])
    results["cli_transcribe"] = cli_out.getvalue().splitlines()
    with contextlib.redirect_stdout(io.StringIO()):
        main(["merge", "--base", base, "--adapter", adapter, "--out", merged])
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny saved image + audio + text model (one shared stack) with its processor; an image-caption manifest;
    a short 8 kHz waveform file."""
    root = tmp_path_factory.mktemp("reload")
    train = write_pairs(root, n=12)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    tokenizer = Tokenizer.train(texts, vocab_size=280, max_length=8)
    config = tiny_config(root, train)["model"]["model"]
    config["text"] = {**config["text"], "vocab_size": tokenizer.vocab_size}
    config["audio"] = dict(sample_rate=8000, n_mels=8, n_fft=64, hop_length=16, max_frames=128)
    config["routes"] = {"image": "shared", "audio": "shared", "text": "shared", "decoder": "shared"}
    torch.manual_seed(1)
    model = MultimodalTransformer(ModelConfig.from_dict(config))
    image = ImageProcessorConfig(image_size=[16, 16], channels=1, mean=(0.5,), std=(0.5,))
    model.save_pretrained(root / "base", processor=Processor(tokenizer, image, AudioProcessorConfig(sample_rate=8000)))
    wav = root / "speech.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(1600)).astype(np.float32), 8000)
    return root, train, wav


def decoded(model: MultimodalTransformer, processor: Processor, images: list[str], wav) -> dict:
    waveform = torch.from_numpy(sf.read(wav, dtype="float32")[0])[None]
    clf = ZeroShotClassifier(model, processor, classnames=CLASSES, modality="image")
    with torch.no_grad():
        return {
            "caption": model.caption(images, processor=processor, **DECODING),
            "transcribe": model.transcribe([str(wav)], processor=processor, **DECODING),
            "beams": model.generate(audio=waveform, num_beams=3, **DECODING).tolist(),
            "zeroshot": clf.predict_proba(images).tolist(),
        }


def probe(model: MultimodalTransformer) -> torch.Tensor:
    """Image and audio embeddings and decoder logits on fixed inputs (float64 for comparing)."""
    g = torch.Generator().manual_seed(3)
    pixels, audio = torch.randn(2, 1, 16, 16, generator=g), 0.1 * torch.randn(2, 1600, generator=g)
    ids = torch.randint(3, 20, (2, 5), generator=g)
    with torch.no_grad():
        memory, _ = model.encode_audio_tokens(audio)
        parts = [model.encode_image(pixels), model.encode_audio(audio), model.decode(ids, memory)]
    return torch.cat([p.flatten() for p in parts]).double()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapter_written_by_fit_decodes_the_same_in_a_new_process(pretrained, tmp_path, kind):
    root, train, wav = pretrained
    adapt = {"init_from": str(root / "base"), "lora": KINDS[kind]}
    config = tiny_config(tmp_path, train, max_steps=2, model={"model": None, "adapt": adapt})
    cli = fit_in_process(write_config(tmp_path / "config.yaml", config))
    trained = cli.model.model.eval()
    assert adapters.has_adapter(trained)
    processor = from_pretrained(root / "base").processor
    images = [str(train.parent / "img" / f"{i}.png") for i in range(3)]
    expected = decoded(trained, processor, images, wav)

    from mmformer.cli.main import main

    adapter = tmp_path / "adapter"
    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(adapter)])
    base = str(root / "base")

    # the public API and the command line in a fresh interpreter
    args = [base, str(adapter), ",".join(images), str(wav), ",".join(CLASSES), str(tmp_path / "onnx")]
    args.append(str(tmp_path / "merged"))
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert {k: reloaded[k] for k in ("caption", "transcribe", "beams")} == {
        k: expected[k] for k in ("caption", "transcribe", "beams")
    }
    np.testing.assert_allclose(reloaded["zeroshot"], expected["zeroshot"], rtol=1e-5, atol=1e-7)
    # the adapted towers exported there, run by onnxruntime
    probs, _ = OnnxModel(tmp_path / "onnx").zeroshot(images, CLASSES)
    np.testing.assert_allclose(probs, expected["zeroshot"], rtol=1e-4, atol=1e-6)

    # the command line, as the user ran it (`mmformer transcribe --model BASE --adapter DIR ... FILE`)
    assert reloaded["cli_transcribe"] == [f"{wav}\t{expected['transcribe'][0]}"]

    # merged into a plain model by the CLI (`mmformer merge`), reloaded: the adapted model's numbers (merging rounds
    # in float32)
    merged = from_pretrained(tmp_path / "merged")
    assert not adapters.has_adapter(merged)
    want, got = probe(trained), probe(merged)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not torch.allclose(probe(from_pretrained(base)), want, rtol=0, atol=1e-4)  # the adapter does something


@pytest.fixture
def tiny(make_model_config):
    return MultimodalTransformer(make_model_config()).eval()


def perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter_state.adapter_parameters(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.numerics
@pytest.mark.parametrize(
    "settings",
    [
        LoraSettings(r=2, target_modules=["qkv"], trainable_token_indices=[4, 5, 6]),
        LoraSettings(r=2, target_modules=["qkv"], modules_to_save=["lm_head"]),
        LoraSettings(r=2, target_modules=["lm_head"]),  # LoRA on the LM head itself
        LoraSettings(r=2, target_modules=["all"], use_dora=True),
    ],
    ids=["trainable_tokens", "modules_to_save", "lora_head", "dora"],
)
def test_generation_of_an_adapted_model_follows_its_own_logits(tiny, settings):
    """Greedy ids from the cached search are the argmax of the adapted model's full (uncached) forward pass: no code
    path reads the LM head's weight past peft's wrapper (a LoRA head's ``weight`` is the base's)."""
    head, tokens = tiny.lm_head, tiny.text_embed.tokens
    adapters.add_lora(tiny, settings)
    perturb(tiny)
    tiny.eval()
    assert base_layer(tiny.lm_head) is head and base_layer(tiny.text_embed.tokens) is tokens  # under any wrapper
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ids = tiny.generate(image=pixels, max_new_tokens=6)  # (B, 1 + 6): bos, then the chosen ids
    with torch.no_grad():
        logits = tiny.decode(ids[:, :-1], tiny.encode_image_tokens(pixels)[0]).double()  # (B, 6, V)
    chosen = logits.gather(-1, ids[:, 1:, None])[..., 0]  # (B, 6)
    best = logits.max(-1).values
    eos = tiny.config.text.eos_id
    live = torch.cat([torch.ones_like(ids[:, :1]), (ids[:, 1:-1] != eos).long()], 1).cumprod(1).bool()  # up to eos
    gap = (best - chosen)[live]  # 0 where the search took the forward pass's argmax
    assert gap.max() <= 1e-5 * logits.abs().max(), gap
