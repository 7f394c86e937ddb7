"""Build ``data/digits/``: the small multimodal data set that ships with mmformer.

Each sample is a string of 1-4 digits seen three ways, so that a fresh clone can train contrastive learning,
image captioning and speech-to-text on a laptop CPU in minutes:

- image: scikit-learn's bundled handwritten digits (8x8, 16 grey levels), each upscaled 2x to 16x16 and placed
  side by side on a black 16x64 greyscale PNG at a random horizontal offset;
- speech: espeak-ng reading the digits as English words with a seeded choice of accent+variant voice, speed and
  pitch, trimmed, resampled and stored as mono 16-bit FLAC (by default at 8 kHz with 10 significant bits, which
  keeps the whole folder under 18 MB of files; the training pipeline resamples to 16 kHz);
- text: the digit words, lowercase, joined by single spaces ("four two nine").

Train, val and test draw their digit images from disjoint subsets of the 1797 scikit-learn images, and the test
split speaks with voices (accent+variant combinations) that the training split never uses. About a quarter of each
split (at least ``--min-singles-per-class`` per class) are single digits, balanced over the ten classes, for
zero-shot classification of images and audio.

The output is deterministic for a given ``--seed``: every random choice is drawn up front in the parent process
from seeded generators and the workers are pure functions of their arguments.

Build-time requirements only (the mmformer package never imports them)::

    apt-get install -y espeak-ng
    python3 -m venv /tmp/digits-venv
    /tmp/digits-venv/bin/pip install scikit-learn scipy soundfile numpy pillow
    /tmp/digits-venv/bin/python data/build_digits.py --seed 0 --out data/digits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image
from scipy.signal import resample_poly

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "val", "test")

# espeak-ng's own English accents (the MBROLA ones need extra packages) and a curated set of ordinary-sounding
# variants; robotic, whispered and novelty variants are left out on purpose.
ACCENTS = (
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3",
    "f4", "f5", "klatt", "klatt2", "klatt3", "Andy", "Annie", "belinda", "david", "linda",
)  # fmt: skip
TEST_VOICE_PERIOD = 5  # one accent+variant combination in five is held out for the test split

IMAGE_H, IMAGE_W, DIGIT_PX = 16, 64, 16  # canvas and upscaled digit size, in pixels
ESPEAK_RATE = 22050  # espeak-ng always synthesises at this rate
TRIM_DB = 40.0  # samples this far below the peak count as silence when trimming
TRIM_KEEP_S = 0.05  # silence kept before the first and after the last loud sample
PEAK = 0.89  # peak level after normalisation (about -1 dBFS)


@dataclass(frozen=True)
class Item:
    """One sample: everything needed to render its image and audio, and its manifest row."""

    split: str
    index: int
    digits: str
    sources: tuple[int, ...]  # indices into scikit-learn's digit images, one per digit
    x0: int  # left edge of the first digit on the canvas
    voice: str
    speed: int
    pitch: int

    @property
    def text(self) -> str:
        return " ".join(WORDS[int(d)] for d in self.digits)

    @property
    def image(self) -> str:
        return f"images/{self.split}/{self.index:06d}.png"

    @property
    def audio(self) -> str:
        return f"audio/{self.split}/{self.index:06d}.flac"

    def row(self, duration: float) -> dict:
        """The item's manifest line; paths are relative to the manifest's folder."""
        return {
            "image": self.image,
            "audio_filepath": self.audio,
            "text": self.text,
            "digits": self.digits,
            "duration": duration,
            "voice": self.voice,
            "speed": self.speed,
            "pitch": self.pitch,
        }


def espeak_data_dir() -> Path:
    """Locate espeak-ng's data folder, failing with install instructions when espeak-ng is missing."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found: install it with `apt-get install -y espeak-ng`")
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Data at:\s*(\S+)", out)
    if match is None:
        raise SystemExit(f"cannot find espeak-ng's data folder in {out!r}")
    return Path(match.group(1))


def check_voices() -> None:
    """Fail early if an accent or variant is missing, since espeak-ng silently falls back to a default voice."""
    data = espeak_data_dir()
    listing = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True, check=True).stdout
    languages = {line.split()[1] for line in listing.splitlines()[1:] if line.strip()}
    missing = [a for a in ACCENTS if a not in languages] + [
        v for v in VARIANTS if not (data / "voices/!v" / v).exists()
    ]
    if missing:
        raise SystemExit(f"espeak-ng voices not found: {missing} (data folder {data})")


def split_voices(rng: np.random.Generator) -> dict[str, list[str]]:
    """Partition accent+variant combinations so that test voices never occur in training.

    Variants are shuffled, then combination (accent a, variant at position p) goes to test when
    (a + p) % TEST_VOICE_PERIOD == 0: every accent and every variant is still heard in training, only the
    pairings are new. Val reuses the training voices.
    """
    order = rng.permutation(len(VARIANTS))
    train, test = [], []
    for a, accent in enumerate(ACCENTS):
        for p, v in enumerate(order):
            (test if (a + p) % TEST_VOICE_PERIOD == 0 else train).append(f"{accent}+{VARIANTS[v]}")
    return {"train": sorted(train), "val": sorted(train), "test": sorted(test)}


def split_images(labels: np.ndarray, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Split scikit-learn's digit images 60/20/20 by a seeded permutation; return per-split indices per class."""
    perm = rng.permutation(len(labels))
    n_train, n_val = round(0.6 * len(labels)), round(0.2 * len(labels))
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    return {s: [np.sort(idx[labels[idx] == c]) for c in range(10)] for s, idx in parts.items()}


def plan_split(
    split: str,
    n: int,
    singles_per_class: int,
    pools: list[np.ndarray],
    voices: list[str],
    rng: np.random.Generator,
) -> list[Item]:
    """Draw the digit strings, source images, offsets and voice settings of one split."""
    if 10 * singles_per_class > n:
        raise ValueError(f"{split}: {singles_per_class} single digits per class do not fit in n={n} items")
    strings = [str(c) for c in range(10) for _ in range(singles_per_class)]
    for _ in range(n - len(strings)):
        strings.append("".join(str(d) for d in rng.integers(0, 10, size=rng.integers(2, 5))))
    items = []
    for index, k in enumerate(rng.permutation(n)):
        digits = strings[k]
        items.append(
            Item(
                split=split,
                index=index,
                digits=digits,
                sources=tuple(int(rng.choice(pools[int(d)])) for d in digits),
                x0=int(rng.integers(0, IMAGE_W - DIGIT_PX * len(digits) + 1)),
                voice=str(voices[rng.integers(len(voices))]),
                speed=int(rng.integers(130, 201)),
                pitch=int(rng.integers(30, 71)),
            )
        )
    return items


def render_image(item: Item, images: np.ndarray) -> np.ndarray:
    """Place the item's digits, upscaled 2x and stretched from 0..16 to 0..255, on a black 16x64 canvas."""
    canvas = np.zeros((IMAGE_H, IMAGE_W), dtype=np.uint8)
    for i, src in enumerate(item.sources):
        digit = np.kron(images[src], np.ones((2, 2)))  # (8, 8) -> (16, 16)
        x = item.x0 + i * DIGIT_PX
        canvas[:, x : x + DIGIT_PX] = np.round(digit * 255 / 16).astype(np.uint8)
    return canvas


def synthesise(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """Run espeak-ng and return its 22050 Hz mono waveform as floats in [-1, 1]."""
    cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    wav = subprocess.run(cmd, capture_output=True, check=True).stdout
    # espeak-ng streams a canonical 44-byte PCM header with placeholder sizes, so read the samples directly.
    if wav[:4] != b"RIFF" or wav[36:40] != b"data" or int.from_bytes(wav[24:28], "little") != ESPEAK_RATE:
        raise RuntimeError(f"unexpected espeak-ng output header for {cmd}: {wav[:44]!r}")
    return np.frombuffer(wav[44:], dtype="<i2").astype(np.float64) / 32768.0


def process_audio(wave: np.ndarray, sample_rate: int, bits: int) -> np.ndarray:
    """Trim silence (keeping a little), resample, peak-normalise and quantise to ``bits`` significant bits.

    Quantising below 16 bits (still stored as 16-bit FLAC, whose encoder then spends fewer bits per sample) is
    the knob that keeps the data set inside its size budget; the samples stay ordinary int16 for any reader.
    """
    loud = np.flatnonzero(np.abs(wave) > np.abs(wave).max() * 10 ** (-TRIM_DB / 20))
    keep = round(TRIM_KEEP_S * ESPEAK_RATE)
    wave = wave[max(loud[0] - keep, 0) : loud[-1] + keep + 1]
    g = math.gcd(sample_rate, ESPEAK_RATE)
    wave = resample_poly(wave, sample_rate // g, ESPEAK_RATE // g)
    wave = wave * (PEAK / np.abs(wave).max())
    step = 2 ** (16 - bits)
    return np.clip(np.round(wave * 32768 / step) * step, -32768, 32767).astype(np.int16)


def render_audio(job: tuple[Item, Path, int, int]) -> float:
    """Synthesise, process and write one item's FLAC; return its duration in seconds (a pool worker)."""
    item, out, sample_rate, bits = job
    samples = process_audio(synthesise(item.text, item.voice, item.speed, item.pitch), sample_rate, bits)
    sf.write(out / item.audio, samples, sample_rate, format="FLAC", subtype="PCM_16", compression_level=1.0)
    return round(len(samples) / sample_rate, 3)


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path`` (not disk blocks, which is what git stores)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_readme(
    out: Path, args: argparse.Namespace, rows: dict[str, list[dict]], voices: dict[str, list[str]]
) -> None:
    """Describe the built data set; every number here is computed from the files just written."""
    mb = {s: (folder_bytes(out / "images" / s) + folder_bytes(out / "audio" / s)) / 1e6 for s in SPLITS}
    lines = [
        "# digits: a small multimodal data set (image, speech, text)",
        "",
        "Each sample is a string of 1-4 digits as a handwritten-digit image, as synthetic speech and as text",
        '("four two nine"). It ships with mmformer so that a fresh clone can train contrastive learning, image',
        "captioning and speech-to-text on a laptop CPU in minutes. Built by `data/build_digits.py`; do not edit",
        "by hand.",
        "",
        "## Contents",
        "",
        "| split | items | single digits | of which per class | multi-digit | audio hours | MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in SPLITS:
        singles = [r for r in rows[s] if len(r["digits"]) == 1]
        per_class = sorted({sum(r["digits"] == str(c) for r in singles) for c in range(10)})
        hours = sum(r["duration"] for r in rows[s]) / 3600
        per_class_text = str(per_class[0]) if len(per_class) == 1 else f"{per_class[0]}-{per_class[-1]}"
        lines.append(
            f"| {s} | {len(rows[s])} | {len(singles)} | {per_class_text} | {len(rows[s]) - len(singles)} "
            f"| {hours:.3f} | {mb[s]:.2f} |"
        )
    total_mb = sum(mb.values()) + sum((out / f"{s}.jsonl").stat().st_size for s in SPLITS) / 1e6
    noise_db = 20 * math.log10(PEAK * 2 ** (args.bits - 1) * math.sqrt(12))  # peak over quantisation-noise RMS
    example = {
        "image": "images/train/000000.png",
        "audio_filepath": "audio/train/000000.flac",
        "text": "four two nine",
        "digits": "429",
        "duration": 1.234,
        "voice": "en-us+m3",
        "speed": 160,
        "pitch": 50,
    }
    lines += [
        "",
        "MB counts file bytes (1 MB = 10^6 bytes) of each split's images and audio. With the manifests the folder",
        f"holds {total_mb:.2f} MB, as `du -s --apparent-size` reports; plain `du` also counts the 4 KiB disk block",
        "that each small file occupies, which git does not store.",
        "",
        "- `{train,val,test}.jsonl`: one JSON object per line, paths relative to this folder, `duration` in",
        "  seconds of the stored audio:",
        f"  `{json.dumps(example)}`",
        f"- `images/<split>/NNNNNN.png`: {IMAGE_H}x{IMAGE_W} (HxW) 8-bit greyscale, black background. Each digit",
        "  is one of scikit-learn's 8x8 handwritten digits (16 grey levels) upscaled 2x to 16x16 and stretched",
        "  to 0..255; the digits sit side by side from a random horizontal offset.",
        f"- `audio/<split>/NNNNNN.flac`: mono 16-bit FLAC at {args.sample_rate} Hz, peak-normalised to about",
        f"  -1 dBFS and quantised to {args.bits} significant bits (noise about {noise_db:.0f} dB below the peak),",
        f"  silence trimmed to about {round(TRIM_KEEP_S * 1000)} ms at each end. The rate (bandwidth",
        f"  {args.sample_rate / 2000:g} kHz) and precision keep the repository small; training resamples to the",
        "  model's rate.",
        "- `text`: the digit words, lowercase, separated by single spaces; `digits`: the same as numerals.",
        "",
        "## How it was built",
        "",
        f"- Seed {args.seed}. scikit-learn's 1797 digit images are split 60/20/20 by a seeded permutation, so",
        "  train, val and test use disjoint source images (an image may repeat within its own split). The",
        "  1797 images come from 13 writers whose identities are not recorded, so writers may overlap.",
        f"- About {args.single_fraction:.0%} of every split, and at least {args.min_singles_per_class} per class,",
        "  are single digits balanced over the ten classes (for zero-shot classification); the rest have 2-4",
        "  digits drawn uniformly.",
        "- Speech: espeak-ng reads the text with a voice drawn uniformly from the split's voices, speed drawn",
        "  from 130-200 words per minute and pitch from 30-70. A voice is an accent plus a variant",
        "  (`en-us+m3`). The test split's voices are accent+variant pairs never used in training (every accent",
        "  and every variant is heard in training, but not in that pairing); val reuses the training voices.",
        f"- Accents ({len(ACCENTS)}): {', '.join(ACCENTS)}.",
        f"- Variants ({len(VARIANTS)}): {', '.join(VARIANTS)}.",
        f"- Train and val voices ({len(voices['train'])}): {', '.join(voices['train'])}.",
        f"- Test voices ({len(voices['test'])}): {', '.join(voices['test'])}.",
        "",
        "Rebuild (build-time tools only; mmformer never imports them):",
        "",
        "```",
        "apt-get install -y espeak-ng",
        "python3 -m venv /tmp/digits-venv",
        "/tmp/digits-venv/bin/pip install scikit-learn scipy soundfile numpy pillow",
        f"/tmp/digits-venv/bin/python data/build_digits.py --seed {args.seed} --out data/digits",
        "```",
        "",
        "## Licences",
        "",
        '- Digit images: the test part of the UCI "Optical Recognition of Handwritten Digits" data set',
        "  (E. Alpaydin and C. Kaynak, 1998, https://archive.ics.uci.edu/dataset/80, CC BY 4.0 on the UCI",
        "  repository), as bundled with scikit-learn (BSD-3-Clause) and loaded by `sklearn.datasets.load_digits`.",
        "- Audio: synthesised with espeak-ng (GPL-3.0-or-later); the generated speech is program output, not part",
        "  of espeak-ng.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def build(args: argparse.Namespace) -> None:
    from sklearn.datasets import load_digits  # build-time only

    check_voices()
    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) in 0..16, (1797,)
    pools = split_images(labels, np.random.default_rng([args.seed, 0]))
    voices = split_voices(np.random.default_rng([args.seed, 1]))
    sizes = {"train": args.n_train, "val": args.n_val, "test": args.n_test}

    out = Path(args.out)
    for sub in ("images", "audio"):
        shutil.rmtree(out / sub, ignore_errors=True)
    rows: dict[str, list[dict]] = {}
    for k, split in enumerate(SPLITS):
        singles = max(round(args.single_fraction * sizes[split] / 10), args.min_singles_per_class)
        rng = np.random.default_rng([args.seed, 2 + k])
        items = plan_split(split, sizes[split], singles, pools[split], voices[split], rng)
        (out / "images" / split).mkdir(parents=True)
        (out / "audio" / split).mkdir(parents=True)
        for item in items:
            Image.fromarray(render_image(item, images)).save(out / item.image, optimize=True)
        jobs = [(item, out, args.sample_rate, args.bits) for item in items]
        with Pool(args.jobs) as pool:
            durations = pool.map(render_audio, jobs, chunksize=16)
        rows[split] = [item.row(duration) for item, duration in zip(items, durations)]
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[split])
    write_readme(out, args, rows, voices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "digits"))
    parser.add_argument("--n-train", type=int, default=2200)
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--single-fraction", type=float, default=0.25, help="share of single-digit items")
    parser.add_argument("--min-singles-per-class", type=int, default=20, help="floor on single digits per class")
    parser.add_argument("--sample-rate", type=int, default=8000, help="stored audio sample rate in Hz")
    parser.add_argument("--bits", type=int, default=10, help="significant bits kept per audio sample (<= 16)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel espeak-ng processes")
    args = parser.parse_args()
    if not 8 <= args.bits <= 16:
        parser.error(f"--bits must be in 8..16, got {args.bits}")
    start = time.perf_counter()
    build(args)
    out = Path(args.out)
    print(f"built {out} ({folder_bytes(out) / 1e6:.2f} MB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
