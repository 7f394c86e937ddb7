"""A sample's result does not depend on the samples batched with it (issue #24), on every path that forms a batch.

Real clips of mixed lengths from the shipped test split, through the shipped model (data/digits_model): each clip's
log-mel features, audio embedding, CTC output, generated ids (greedy and beam search, plain and left-padded
prompts) and zero-shot scores in a random batch equal those of the clip alone; the same for images and texts; a
waveform zero-padded further (with its true length) changes nothing; padded and packed training batches give each
clip the losses it has alone; SpecAugment draws each clip's masks from its own length and seed; Whisper's fixed
window; a decoder-only LM's left-padded prompts; and the ONNX runner, in a fresh process.

Shape legend: B batch, S samples, M mel bins, Nf mel frames, N audio tokens, T text tokens, V vocabulary.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmformer
from mmformer.data.augment import AudioAugmentConfig, FeatureCollator
from mmformer.data.collate import Collator, pad_audio
from mmformer.demos.digits import WORDS, read_manifest
from mmformer.embedders.audio import centre_pad
from mmformer.generation.decoding import generate
from mmformer.layers import Documents
from mmformer.model import MultimodalTransformer
from mmformer.tasks.losses import IGNORE_INDEX, caption_loss, ctc_loss, document_targets, teacher_forcing

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "data" / "digits_model"
SPLIT = ROOT / "data" / "digits" / "test.jsonl"
EMBED_ATOL = 1e-5  # the bound on an embedding's change (they are unit vectors)
LOSS_ATOL = 1e-5


@pytest.fixture(scope="module")
def digits() -> tuple[MultimodalTransformer, list[dict], list[torch.Tensor]]:
    """The shipped model, the test split's rows and their waveforms (each alone, unpadded)."""
    model = mmformer.load_pretrained(MODEL_DIR)
    rows = read_manifest(SPLIT)
    waves = [model.processor(audio=[r["audio_filepath"]])["audio"][0] for r in rows]
    return model, rows, waves


def random_batch(rows: list[dict], seed: int, size: int = 8) -> list[int]:
    """``size`` random rows of the split, the shortest and longest of them at least 3× apart."""
    rng = random.Random(seed)
    while True:
        picked = rng.sample(range(len(rows)), size)
        durations = [rows[i]["duration"] for i in picked]
        if max(durations) >= 3 * min(durations):
            return picked


def batched(waves: list[torch.Tensor], picked: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_audio([waves[i] for i in picked])  # (B, S) zero-padded, lengths (B,)


def alone(wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return wave[None], torch.tensor([wave.shape[0]])


def trim(row: torch.Tensor, pad_id: int) -> list[int]:
    """A generated row without the pad ids after its end (rows of a batch are padded to the longest)."""
    ids = row.tolist()
    while ids and ids[-1] == pad_id:
        ids.pop()
    return ids


def ctc_greedy(logits: torch.Tensor, blank: int) -> list[int]:
    """Best-path CTC decoding of one clip's logits (N, V): repeats merged, blanks dropped."""
    best = logits.argmax(dim=-1).tolist()
    return [t for i, t in enumerate(best) if t != blank and (i == 0 or t != best[i - 1])]


# ---------------------------------------------------------------- the log-mel front end
def test_per_clip_centring_is_torchaudios_for_a_full_length_clip():
    """centre_pad + an uncentred STFT is torchaudio's centred STFT, bit for bit, for rows that fill the batch."""
    import torchaudio.functional as AF

    g = torch.Generator().manual_seed(0)
    window = torch.hann_window(400)
    for S in (401, 16000, 23457):
        x = torch.randn(3, S, generator=g)
        ours = AF.spectrogram(centre_pad(x, None, 200), 0, window, 400, 160, 400, 2.0, False, center=False)
        theirs = AF.spectrogram(x, 0, window, 400, 160, 400, 2.0, False)
        assert torch.equal(ours, theirs), S
    # and a shorter row is reflected at its own end: the same frames as that row alone
    x = torch.randn(2, 5000, generator=g)
    x[1, 3000:] = 0.0
    rows = centre_pad(x, torch.tensor([5000, 3000]), 200)
    assert torch.equal(rows[1, : 3000 + 400], F.pad(x[None, 1, :3000], (200, 200), mode="reflect")[0])
    assert not rows[1, 3400:].any()
    # whatever a row holds past its length is never read; a row of at most `pad` samples repeats its first and last
    x = torch.randn(4, 700, generator=g)
    lengths = torch.tensor([700, 450, 150, 1])
    rows = centre_pad(x, lengths, 200)
    for i, n in enumerate(lengths.tolist()):
        k = torch.arange(-200, 700 + 200)  # each output's source sample, reflected at 0 and at n - 1, clamped
        source = torch.where(k < 0, -k, torch.where(k >= n, 2 * (n - 1) - k, k)).clamp(0, n - 1)
        assert torch.equal(rows[i], torch.where(k < n + 200, x[i, source], 0.0)), n
        if n > 200:
            assert torch.equal(rows[i, : n + 400], F.pad(x[None, i, :n], (200, 200), mode="reflect")[0]), n


def test_the_front_ends_length_groups_give_the_whole_batchs_tokens(digits, monkeypatch):
    """On CPU a batch's waveforms go through the front end in length groups (AudioEmbedder.length_groups): the
    tokens and mask equal those of the whole padded batch at once (the path of exports, compiled models and GPUs)."""
    model, rows, waves = digits
    audio, lengths = batched(waves, random_batch(rows, 3, size=16))
    embed = model.audio_embed
    assert len(embed.length_groups(audio, lengths)) > 1
    with torch.inference_mode():
        grouped, grouped_mask = embed(audio, lengths)
        monkeypatch.setattr(embed, "length_groups", lambda audio, lengths: None)
        whole, whole_mask = embed(audio, lengths)
    assert grouped.shape == whole.shape and torch.equal(grouped_mask, whole_mask)
    real = whole[whole_mask]
    assert float((grouped[grouped_mask] - real).abs().max()) <= 1e-5 * float(real.abs().max())
    # a trace records the whole-batch path: it serves another batch whose groups differ
    monkeypatch.undo()
    other, other_lengths = batched(waves, random_batch(rows, 4, size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(embed, (audio, lengths), check_trace=False)
    with torch.inference_mode():
        expected, mask = embed(other, other_lengths)
        got = traced(other, other_lengths)[0]
    assert float((got[mask] - expected[mask]).abs().max()) <= 1e-5 * float(expected[mask].abs().max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_real_clips_in_a_random_batch_equal_each_clip_alone(digits, seed):
    """Features, embedding (≤ 1e-5), CTC output and generated ids (identical) of each clip: batch == alone."""
    model, rows, waves = digits
    picked = random_batch(rows, seed)
    audio, lengths = batched(waves, picked)
    text = model.config.text
    with torch.inference_mode():
        features = model.audio_embed.features(audio, lengths)  # (B, M, Nf)
        frames = model.audio_embed.features.frames(lengths)
        embeddings = model.encode_audio(audio, lengths)  # (B, E)
        packed = model.encode_audio(audio, lengths, packed=True)
        tokens, mask = model.encode_audio_tokens(audio, lengths)  # (B, N, D), (B, N)
        ctc = model.ctc_head(tokens)  # (B, N, V)
        ids = generate(model, audio=audio, audio_lengths=lengths, max_new_tokens=8)
        for b, i in enumerate(picked):
            one, n = alone(waves[i])
            assert torch.equal(features[b, :, : frames[b]], model.audio_embed.features(one, n)[0]), (seed, i)
            single = model.encode_audio(one, n)[0]
            assert float((embeddings[b] - single).abs().max()) <= EMBED_ATOL, (seed, i)
            assert float((packed[b] - single).abs().max()) <= EMBED_ATOL, (seed, i)
            single_tokens, single_mask = model.encode_audio_tokens(one, n)
            assert int(mask[b].sum()) == single_tokens.shape[1] and bool(single_mask.all())
            single_ctc = model.ctc_head(single_tokens)[0]  # (N_i, V)
            real = ctc[b, mask[b]]
            assert float((real - single_ctc).abs().max()) <= 1e-4 * float(single_ctc.abs().max()), (seed, i)
            assert ctc_greedy(real, text.pad_id) == ctc_greedy(single_ctc, text.pad_id)
            single_ids = generate(model, audio=one, audio_lengths=n, max_new_tokens=8)[0]
            assert trim(ids[b], text.pad_id) == trim(single_ids, text.pad_id), (seed, i)


def test_beam_search_and_left_padded_prompts_over_a_batch_of_clips_equal_each_alone(digits):
    """Beam search over a batch of clips, and prompts of different lengths (left-padded) read with the clips'
    padded memory: every row is what its clip gives alone."""
    model, rows, waves = digits
    picked = random_batch(rows, seed=3, size=6)
    audio, lengths = batched(waves, picked)
    bos = model.config.text.bos_id
    word_ids = [[t for t in model.processor.tokenizer.encode(w) if t not in (bos, model.config.text.eos_id)]
                for w in WORDS]  # fmt: skip
    prompts = [[bos] + [t for w in word_ids[: b % 3] for t in w] for b in range(len(picked))]  # 1 to 3+ tokens
    assert len({len(p) for p in prompts}) > 1
    pad_id = model.config.text.pad_id
    with torch.inference_mode():
        beams = generate(model, audio=audio, audio_lengths=lengths, max_new_tokens=8, num_beams=3)
        prompted = generate(model, audio=audio, audio_lengths=lengths, prompt_ids=prompts, max_new_tokens=6)
        width = max(map(len, prompts))
        for b, i in enumerate(picked):
            one, n = alone(waves[i])
            single = generate(model, audio=one, audio_lengths=n, max_new_tokens=8, num_beams=3)[0]
            assert trim(beams[b], pad_id) == trim(single, pad_id), i
            single = generate(model, audio=one, audio_lengths=n, prompt_ids=[prompts[b]], max_new_tokens=6)[0]
            assert trim(prompted[b, width - len(prompts[b]) :], pad_id) == trim(single, pad_id), i
    # and as text: transcribe (and caption, the same detokenizing) with those prompts, batched and alone — it failed
    # turning the ids into text ("expected sequence of length 1 at dim 1")
    texts = model.transcribe([waves[i] for i in picked], prompt_ids=prompts, max_new_tokens=6)
    assert texts == [model.transcribe([waves[i]], prompt_ids=[p], max_new_tokens=6)[0] for i, p in zip(picked, prompts)]


def test_zero_padding_with_the_true_length_changes_nothing(digits):
    """The issue's measurement: half a second of zeros after a clip, its length given, moved its pooled embedding
    by 0.020; now by at most 1e-5, and the zero-shot scores of the clips batched are those of each alone."""
    model, rows, waves = digits
    picked = random_batch(rows, seed=4, size=6)
    with torch.inference_mode():
        for i in picked:
            one, n = alone(waves[i])
            longer = F.pad(one, (0, model.config.audio.sample_rate // 2))
            moved = (model.encode_audio(longer, n) - model.encode_audio(one, n)).abs().max()
            assert float(moved) <= EMBED_ATOL, i
        clf = mmformer.ZeroShotClassifier(model, classnames=WORDS, templates=["{}"], modality="audio")
        files = [rows[i]["audio_filepath"] for i in picked]
        together = clf.predict_proba(files)
        for b, path in enumerate(files):
            assert float((together[b] - clf.predict_proba([path])[0]).abs().max()) <= EMBED_ATOL, path


def test_images_and_texts_in_a_batch_equal_each_alone(digits):
    model, rows, _ = digits
    picked = random_batch(rows, seed=5, size=8)
    processor, pad_id = model.processor, model.config.text.pad_id
    texts = [rows[i]["text"] for i in picked]
    with torch.inference_mode():
        pixels = processor(images=[rows[i]["image"] for i in picked])["pixel_values"]
        images = model.encode_image(pixels)
        captions = generate(model, image=pixels, max_new_tokens=8)
        tokens = processor(text=texts)
        assert not bool(tokens["attention_mask"].all())  # right padding in the batch
        encoded = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        for b in range(len(picked)):
            assert float((images[b] - model.encode_image(pixels[b : b + 1])[0]).abs().max()) <= EMBED_ATOL
            single = generate(model, image=pixels[b : b + 1], max_new_tokens=8)[0]
            assert trim(captions[b], pad_id) == trim(single, pad_id)
            one = processor(text=[texts[b]])
            single = model.encode_text(one["input_ids"], one["attention_mask"])[0]
            assert float((encoded[b] - single).abs().max()) <= EMBED_ATOL, texts[b]


# ---------------------------------------------------------------- training batches
def per_clip_losses(model: MultimodalTransformer, batch: dict) -> list[tuple[float, float]]:
    """(caption cross-entropy, CTC) of each clip of a padded or packed training batch (Collator's output), computed
    as the training task computes them, one clip's rows at a time."""
    text = model.config.text
    ctc = dict(blank=text.pad_id, special_ids=(text.bos_id, text.eos_id))
    lengths = batch.get("text_lengths")
    if lengths is None:  # padded: every clip a row
        tokens, mask = model.encode_audio_tokens(batch["audio"], batch["audio_lengths"])
        dec_ids, dec_mask, targets = teacher_forcing(batch["input_ids"], batch["attention_mask"])
        logits = model.decode(dec_ids, tokens, mask, dec_mask)  # (B, T-1, V)
        ids, ids_mask, rows, row_mask = batch["input_ids"], batch["attention_mask"], tokens, mask
        per_row = [(logits[b : b + 1], targets[b : b + 1]) for b in range(len(tokens))]
    else:  # packed: texts back to back, audio tokens back to back, attention within each clip
        docs = Documents(lengths)
        tokens, memory_docs = model.encode_audio_documents(batch["audio"], batch["audio_lengths"])  # (1, M, D)
        logits = model.decode(batch["input_ids"], tokens, documents=docs, memory_documents=memory_docs)  # (1, N, V)
        targets = document_targets(batch["input_ids"], docs)
        ids, ids_mask = docs.pad(batch["input_ids"], fill=text.pad_id), docs.mask
        rows, row_mask = memory_docs.pad(tokens), memory_docs.mask
        spans = docs.offsets.tolist()
        per_row = [(logits[:, a:b], targets[:, a:b]) for a, b in zip(spans[:-1], spans[1:])]
    out = []
    for b, (row_logits, row_targets) in enumerate(per_row):
        assert (row_targets != IGNORE_INDEX).any()
        ce = caption_loss(row_logits, row_targets)
        c = ctc_loss(model.ctc_head(rows[b : b + 1]), row_mask[b : b + 1], ids[b : b + 1], ids_mask[b : b + 1], **ctc)
        out.append((float(ce), float(c)))
    return out


def test_padded_and_packed_training_batches_give_each_clip_its_own_losses(digits):
    """Clips of very different lengths (the split's shortest and longest among them) in one batch: each clip's
    caption and CTC losses, padded or packed, are those of the clip alone (≤ 1e-5)."""
    model, rows, waves = digits
    by_duration = sorted(range(len(rows)), key=lambda i: rows[i]["duration"])
    picked = [by_duration[0], by_duration[-1], by_duration[len(rows) // 2], by_duration[1], by_duration[-2]]
    assert rows[picked[1]]["duration"] > 4 * rows[picked[0]]["duration"]
    samples = [{"audio": waves[i], "text": rows[i]["text"]} for i in picked]
    tokenizer = model.processor.tokenizer
    padded, packed = Collator(tokenizer)(samples), Collator(tokenizer, packing=True)(samples)
    with torch.no_grad():
        losses = {"padded": per_clip_losses(model, padded), "packed": per_clip_losses(model, packed)}
        singles = [per_clip_losses(model, Collator(tokenizer)([s]))[0] for s in samples]
    for name, got in losses.items():
        for b, (ours, single) in enumerate(zip(got, singles)):
            assert abs(ours[0] - single[0]) <= LOSS_ATOL and abs(ours[1] - single[1]) <= LOSS_ATOL, (name, b, ours)


def test_spec_augment_masks_each_clip_by_its_own_length_and_seed(digits):
    """The SpecAugment collator: a clip's masked features are those it gets alone with the same seed, whatever
    its batch; masks lie within the clip's own frames, and a time mask covers at most its fraction of them."""
    model, rows, waves = digits
    picked = random_batch(rows, seed=6, size=6)
    config = AudioAugmentConfig(freq_masks=2, freq_mask_bins=8, time_masks=2, time_mask_frames=20)
    collate = FeatureCollator(Collator(), model.config.audio, config)
    samples = [{"audio": waves[i], "text": rows[i]["text"], "augment_seed": 1000 + i} for i in picked]
    batch = collate(samples)
    clean = model.audio_embed.features(*batched(waves, picked))
    for b, sample in enumerate(samples):
        single = collate([sample])
        frames = int(batch["feature_lengths"][b])
        assert frames == int(single["feature_lengths"][0])
        assert torch.equal(batch["audio_features"][b, :, :frames], single["audio_features"][0])
        changed = (batch["audio_features"][b] != clean[b]).any(dim=0)  # (Nf,) frames a mask touched
        assert not changed[frames:].any()
        masked_frames = (batch["audio_features"][b, :, :frames] != clean[b, :, :frames]).all(dim=0)
        assert int(masked_frames.sum()) <= 2 * config.time_mask_max_fraction * frames + 2
    # and the model reads the masked batch per clip too
    with torch.no_grad():
        together = model.encode_audio(audio_features=batch["audio_features"], feature_lengths=batch["feature_lengths"])
        for b, sample in enumerate(samples):
            single = collate([sample])
            one = model.encode_audio(audio_features=single["audio_features"], feature_lengths=single["feature_lengths"])
            assert float((together[b] - one[0]).abs().max()) <= EMBED_ATOL


# ---------------------------------------------------------------- Whisper's window, a decoder-only LM
def test_whisper_window_features_and_tokens_equal_each_clip_alone(make_model_config):
    """With a fixed window (``pad_to_seconds``) every clip is zero-padded to it, as Whisper's feature extractor
    does: batched or alone, the same features and the same encoder states."""
    torch.manual_seed(0)
    model = MultimodalTransformer(make_model_config(audio=dict(pad_to_seconds=0.25, max_frames=128))).eval()
    g = torch.Generator().manual_seed(1)
    waves = [torch.randn(n, generator=g) for n in (2000, 700, 1500)]  # the window is 2000 samples at 8 kHz
    audio, lengths = pad_audio(waves)
    with torch.no_grad():
        features = model.audio_embed.features(audio, lengths)
        states, mask = model.encode_audio_tokens(audio, lengths)
        assert mask is None  # Whisper's encoder attends to its whole window
        for b, wave in enumerate(waves):
            one = model.audio_embed.features(wave[None])
            assert torch.equal(features[b], one[0])
            torch.testing.assert_close(states[b], model.encode_audio_tokens(wave[None])[0][0], atol=1e-5, rtol=0)


def test_decoder_only_lm_left_padded_prompts_equal_each_alone():
    """A small random decoder-only LM: greedy and beam search over left-padded prompts of mixed lengths."""
    from tests.test_text_generation import PROMPTS, language_model

    torch.manual_seed(0)
    model = language_model("rope-gqa")
    for num_beams in (1, 3):
        rows = generate(model, prompt_ids=PROMPTS, max_new_tokens=10, num_beams=num_beams)
        width = max(map(len, PROMPTS))
        for row, prompt in zip(rows, PROMPTS):
            single = generate(model, prompt_ids=[prompt], max_new_tokens=10, num_beams=num_beams)[0]
            assert row[width - len(prompt) :].tolist() == single.tolist(), num_beams


# ---------------------------------------------------------------- the ONNX runner
RUNNER = """
import json, sys
import numpy as np
from mmformer.ship.onnx_runner import OnnxModel
m = OnnxModel(sys.argv[1])
waves = m.load_audio(json.loads(sys.argv[2]))
features, frames = m.log_mel(waves)
embeds, states, mask = m._run("audio_encoder", input_features=features, feature_lengths=frames)
out = {"features": 0.0, "embeds": 0.0, "states": 0.0, "tokens": [], "embeddings": embeds.tolist()}
for b, wave in enumerate(waves):
    one, n = m.log_mel([wave])
    e, s, k = m._run("audio_encoder", input_features=one, feature_lengths=n)
    out["features"] = max(out["features"], float(np.abs(features[b, :, : frames[b]] - one[0]).max()))
    out["embeds"] = max(out["embeds"], float(np.abs(embeds[b] - e[0]).max()))
    out["states"] = max(out["states"], float(np.abs(states[b, mask[b]] - s[0]).max()))
    out["tokens"].append([int(mask[b].sum()), int(k[0].sum()), s.shape[1]])
print(json.dumps(out))
"""


def test_onnx_runner_batches_equal_each_clip_alone(digits, tmp_path):
    """The digits model's audio tower exported to ONNX and run by the torch-free runner in a fresh process: a batch
    of clips gives each clip its features, token states and embedding alone, and the model's embeddings. (The
    runner's decoder graphs read the memory mask: test_export checks their batched ids against the model's.)"""
    pytest.importorskip("onnxruntime")
    from mmformer.ship.export import export

    model, rows, waves = digits
    out = export(model, tmp_path / "onnx", towers=["audio"])
    picked = random_batch(rows, seed=7, size=6)
    files = [rows[i]["audio_filepath"] for i in picked]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(out), json.dumps(files)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["features"] <= 1e-6 and result["embeds"] <= EMBED_ATOL, result
    assert result["states"] <= 1e-4, result
    assert all(batched == alone == width for batched, alone, width in result["tokens"]), result["tokens"]
    with torch.inference_mode():
        reference = model.encode_audio(*batched(waves, picked))
    assert float((torch.tensor(result["embeddings"]) - reference).abs().max()) <= 1e-4
