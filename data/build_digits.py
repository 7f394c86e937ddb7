"""Build ``data/digits/`` and ``data/digits_de/``: the small multimodal data sets that ship with mmformer.

Each sample of ``data/digits`` is a string of 1-4 digits seen three ways, so that a fresh clone can train
contrastive learning, image captioning and speech-to-text on a laptop CPU in minutes:

- image: scikit-learn's bundled handwritten digits (8x8, 16 grey levels), each upscaled 2x to 16x16 and placed
  side by side on a black 16x64 greyscale PNG at a random horizontal offset;
- speech: espeak-ng reading the digits as English words with a seeded choice of accent+variant voice, speed and
  pitch, trimmed, resampled and stored as mono 16-bit FLAC at 8 kHz with 8 (train) or 10 (evaluation splits)
  significant bits, which keeps the repository small; the training pipeline resamples to 16 kHz;
- text: the digit words, lowercase, joined by single spaces ("four two nine").

Splits (see ``SPLITS`` and the generated README for every range):

- ``train``: many accent+variant voices, speeds and pitches; ``val`` and ``test`` are those of the first release,
  rebuilt bit-identically (their digests are checked, see ``FROZEN``), so figures stay comparable. ``test`` speaks
  with accent+variant pairs training never uses.
- ``test_hard``: voices from espeak-ng variant families that no training split uses, speeds and pitches outside the
  training ranges, and digit images from the test pool drawn with per-digit shifts, rotations and scales that the
  training images never have. :func:`check_disjoint` asserts all of it before anything is written.

``data/digits_de`` holds the same digit strings spoken in German ("null eins zwei drei vier fünf sechs sieben acht
neun"), audio only, for adapting the English speech-to-text model to a new language; its test voices are variant
families neither data set trains on.

The output is deterministic for a given ``--seed``: every random choice is drawn up front in the parent process
from seeded generators and the workers are pure functions of their arguments.

Build-time requirements only (the mmformer package never imports them)::

    apt-get install -y espeak-ng
    python3 -m venv /tmp/digits-venv
    /tmp/digits-venv/bin/pip install scikit-learn scipy soundfile numpy pillow
    /tmp/digits-venv/bin/python data/build_digits.py --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
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

HERE = Path(__file__).resolve().parent
WORDS = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
}

# espeak-ng's own English accents (the MBROLA ones need extra packages).
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
# The variants of the first release, in the order that seeds its voice split (do not reorder: val and test
# depend on it). Robotic, whispered, echoing and novelty variants are left out everywhere on purpose.
FIRST_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3",
    "f4", "f5", "klatt", "klatt2", "klatt3", "Andy", "Annie", "belinda", "david", "linda",
)  # fmt: skip
# Variants added to training for a wider spread of voices.
MORE_TRAIN_VARIANTS = (
    "m8", "Nguyen", "Lee", "aunty", "klatt4", "adam", "edward", "Mario", "Michael", "gustave", "max", "paul",
    "Denis", "victor", "grandpa", "steph", "steph2", "Alex", "Andrea", "Gene", "Jacky", "Mike", "antonio",
    "boris", "ed", "pedro", "travis",
)  # fmt: skip
# Variants no training split uses: the voices of test_hard (and of the German test split).
HELD_OUT_VARIANTS = (
    "Alicia", "Hugo", "Marco", "anika", "iven", "john", "miguel", "pablo", "quincy", "robert", "sandro", "zac",
)  # fmt: skip
# Many espeak-ng variants are edits of one another (the same formant table with another pitch or voicing). A
# held-out variant must not have a near twin in training, so the split is checked per family: every variant
# above not listed here is a family of its own.
FAMILIES = (
    ("Andy", "AnxiousAndy", "Lee"),
    ("m7", "m8", "Nguyen"),
    ("belinda", "linda", "aunty", "f4"),
    ("klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "david", "adam", "benjamin", "edward", "edward2"),
    ("Diogo", "Henrique", "Hugo", "michel", "miguel", "anika", "anikaRobot"),
    ("iven", "iven2", "iven3", "iven4"),
    ("Mario", "Michael", "gustave", "marcelo"),
    ("robert", "quincy", "rob"),
    ("max", "paul", "RicishayMax", "RicishayMax2", "RicishayMax3", "robosoft7", "robosoft8"),
    ("Denis", "victor", "Storm", "grandpa", "grandma", "shelby"),
    ("john", "norbert", "Tweaky", "Mr serious", "pablo"),
    ("steph", "steph2", "steph3"),
    ("Gene", "Gene2"),
)
TEST_VOICE_PERIOD = 5  # one first-release accent+variant pair in five is held out for the test split
HARD_ACCENTS_PER_VARIANT = 2  # test_hard pairs each held-out variant with this many accents
DE_TEST_VARIANTS = ("Alicia", "Hugo", "john", "miguel", "quincy", "robert")  # held out: unheard in any training

# Speaking rate (words per minute) and pitch (espeak-ng's 0-99 scale) ranges, inclusive.
FIRST_SPEEDS, FIRST_PITCHES = ((130, 200),), ((30, 70),)  # val and test (first release)
TRAIN_SPEEDS, TRAIN_PITCHES = ((125, 205),), ((25, 75),)  # every training split
HARD_SPEEDS, HARD_PITCHES = ((110, 120), (210, 220)), ((10, 20), (80, 90))  # test_hard: outside training

IMAGE_H, IMAGE_W, DIGIT_PX = 16, 64, 16  # canvas and upscaled digit size, in pixels
HARD_SHIFT_PX, HARD_DEGREES, HARD_SCALE = 2.0, 10.0, (0.85, 1.15)  # test_hard's per-digit distortions
ESPEAK_RATE = 22050  # espeak-ng always synthesises at this rate
TRIM_DB = 40.0  # samples this far below the peak count as silence when trimming
TRIM_KEEP_S = 0.05  # silence kept before the first and after the last loud sample
PEAK = 0.89  # peak level after normalisation (about -1 dBFS)

# sha256 (see split_digest) of the first release's val and test splits: rebuilt bit-identically, or the build fails.
FROZEN = {
    "val": "36580b099cc378581714a97c1b50b6cf427d02d5bc8b8333ee90201e16dc863f",
    "test": "333037ee1974b59b3d00e3e6828ad6d0052eab996df791d8b782bca26451a741",
}


@dataclass(frozen=True)
class Split:
    """How one split is drawn: its size, voices, speed and pitch ranges, images and audio precision."""

    name: str
    n: int
    voices: tuple[str, ...]
    speeds: tuple[tuple[int, int], ...]  # inclusive ranges; a clip picks a range uniformly, then a value in it
    pitches: tuple[tuple[int, int], ...]
    images: str | None  # the image pool ("train", "val" or "test"), or None for audio only
    distort: bool  # per-digit shift/rotation/scale of the images (test_hard)
    bits: int  # significant bits kept per audio sample
    stream: int  # index of the split's random stream under the seed
    min_singles_per_class: int


@dataclass(frozen=True)
class Item:
    """One sample: everything needed to render its image and audio, and its manifest row."""

    split: str
    index: int
    language: str
    digits: str
    sources: tuple[int, ...] | None  # indices into scikit-learn's digit images, one per digit (None: no image)
    x0: int  # left edge of the first digit on the canvas
    affines: tuple[tuple[float, float, float, float], ...] | None  # per digit (dx, dy px, degrees, scale)
    voice: str
    speed: int
    pitch: int

    @property
    def text(self) -> str:
        return " ".join(WORDS[self.language][int(d)] for d in self.digits)

    @property
    def image(self) -> str:
        return f"images/{self.split}/{self.index:06d}.png"

    @property
    def audio(self) -> str:
        return f"audio/{self.split}/{self.index:06d}.flac"

    def row(self, duration: float) -> dict:
        """The item's manifest line; paths are relative to the manifest's folder."""
        row = {"image": self.image} if self.sources is not None else {}
        row.update(audio_filepath=self.audio, text=self.text, digits=self.digits, duration=duration)
        row.update(voice=self.voice, speed=self.speed, pitch=self.pitch)
        if self.affines is not None:
            row["affine"] = [[round(v, 3) for v in a] for a in self.affines]
        return row


def variant(voice: str) -> str:
    return voice.split("+", 1)[1]


def family(name: str) -> tuple[str, ...]:
    """The variant family ``name`` belongs to (itself alone when FAMILIES does not list it)."""
    return next((f for f in FAMILIES if name in f), (name,))


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
    """Fail early if a language or variant is missing, since espeak-ng silently falls back to a default voice."""
    data = espeak_data_dir()
    languages = set()
    for lang in ("en", "de"):
        listing = subprocess.run(["espeak-ng", f"--voices={lang}"], capture_output=True, text=True, check=True)
        languages |= {line.split()[1] for line in listing.stdout.splitlines()[1:] if line.strip()}
    variants = FIRST_VARIANTS + MORE_TRAIN_VARIANTS + HELD_OUT_VARIANTS
    missing = [a for a in (*ACCENTS, "de") if a not in languages]
    missing += [v for v in variants if not (data / "voices/!v" / v).exists()]
    if missing:
        raise SystemExit(f"espeak-ng voices not found: {missing} (data folder {data})")


def first_voices(rng: np.random.Generator) -> dict[str, list[str]]:
    """The first release's voices: accent+variant pairs split so that test voices never occur in training.

    Variants are shuffled, then pair (accent a, variant at position p) goes to test when
    (a + p) % TEST_VOICE_PERIOD == 0: every accent and every variant is still heard in training, only the pairings
    are new.
    """
    order = rng.permutation(len(FIRST_VARIANTS))
    train, test = [], []
    for a, accent in enumerate(ACCENTS):
        for p, v in enumerate(order):
            (test if (a + p) % TEST_VOICE_PERIOD == 0 else train).append(f"{accent}+{FIRST_VARIANTS[v]}")
    return {"train": sorted(train), "test": sorted(test)}


def hard_voices(rng: np.random.Generator) -> list[str]:
    """Each held-out variant with HARD_ACCENTS_PER_VARIANT accents drawn without replacement."""
    voices = []
    for v in HELD_OUT_VARIANTS:
        for a in sorted(rng.choice(len(ACCENTS), HARD_ACCENTS_PER_VARIANT, replace=False)):
            voices.append(f"{ACCENTS[a]}+{v}")
    return sorted(voices)


def split_images(labels: np.ndarray, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """Split scikit-learn's digit images 60/20/20 by a seeded permutation; return per-split indices per class."""
    perm = rng.permutation(len(labels))
    n_train, n_val = round(0.6 * len(labels)), round(0.2 * len(labels))
    parts = {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}
    return {s: [np.sort(idx[labels[idx] == c]) for c in range(10)] for s, idx in parts.items()}


def plan_splits(args: argparse.Namespace) -> dict[str, list[Split]]:
    """Every split of both data sets, keyed by data set name."""
    first = first_voices(np.random.default_rng([args.seed, 1]))
    hard = hard_voices(np.random.default_rng([args.seed, 6]))
    train = tuple(sorted(first["train"] + [f"{a}+{v}" for a in ACCENTS for v in MORE_TRAIN_VARIANTS]))
    de_train = tuple(sorted(f"de+{v}" for v in FIRST_VARIANTS + MORE_TRAIN_VARIANTS))
    de_test = tuple(f"de+{v}" for v in DE_TEST_VARIANTS)
    b, tb, m = args.bits, args.train_bits, args.min_singles_per_class
    m_de = args.de_min_singles_per_class
    return {
        "digits": [
            Split("train", args.n_train, train, TRAIN_SPEEDS, TRAIN_PITCHES, "train", False, tb, 2, m),
            Split("val", args.n_val, tuple(first["train"]), FIRST_SPEEDS, FIRST_PITCHES, "val", False, b, 3, m),
            Split("test", args.n_test, tuple(first["test"]), FIRST_SPEEDS, FIRST_PITCHES, "test", False, b, 4, m),
            Split("test_hard", args.n_test_hard, tuple(hard), HARD_SPEEDS, HARD_PITCHES, "test", True, b, 5, m),
        ],
        "digits_de": [
            Split("train", args.n_de_train, de_train, TRAIN_SPEEDS, TRAIN_PITCHES, None, False, tb, 10, m_de),
            Split("val", args.n_de_val, de_train, TRAIN_SPEEDS, TRAIN_PITCHES, None, False, b, 11, m_de),
            Split("test", args.n_de_test, de_test, TRAIN_SPEEDS, TRAIN_PITCHES, None, False, b, 12, m_de),
        ],
    }


def _overlaps(a: tuple[tuple[int, int], ...], b: tuple[tuple[int, int], ...]) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def check_disjoint(plans: dict[str, list[Split]]) -> None:
    """Assert what the held-out splits promise: test voices are never trained on; test_hard's variant families,
    speeds and pitches lie outside every training split's; the German test variants outside both data sets'
    training variants."""
    splits = {(name, s.name): s for name, group in plans.items() for s in group}
    trained = [s for (_, split), s in splits.items() if split in ("train", "val")]
    trained_families = {f for s in trained for f in map(family, map(variant, s.voices))}
    en_train, hard = splits["digits", "train"], splits["digits", "test_hard"]
    assert not set(splits["digits", "test"].voices) & set(en_train.voices), "test voices heard in training"
    assert not {family(variant(v)) for v in hard.voices} & trained_families, "test_hard variant family trained on"
    for s in trained:
        assert not _overlaps(hard.speeds, s.speeds), f"test_hard speeds {hard.speeds} overlap {s.name}'s {s.speeds}"
        assert not _overlaps(hard.pitches, s.pitches), f"test_hard pitches {hard.pitches} overlap {s.name}'s"
    de_test = splits["digits_de", "test"]
    assert not {family(variant(v)) for v in de_test.voices} & trained_families, "German test voices trained on"
    assert hard.images == "test" and en_train.images == "train", "test_hard must draw its images from the test pool"


def draw(ranges: tuple[tuple[int, int], ...], rng: np.random.Generator) -> int:
    """A value from a range picked uniformly among ``ranges`` (one draw only when there is one range, as the first
    release drew)."""
    lo, hi = ranges[0] if len(ranges) == 1 else ranges[int(rng.integers(len(ranges)))]
    return int(rng.integers(lo, hi + 1))


def plan_items(spec: Split, language: str, pools: dict[str, list[np.ndarray]], seed: int, n_singles: int) -> list:
    """Draw the digit strings, source images, offsets, distortions and voice settings of one split."""
    rng = np.random.default_rng([seed, spec.stream])
    if 10 * n_singles > spec.n:
        raise ValueError(f"{spec.name}: {n_singles} single digits per class do not fit in n={spec.n} items")
    strings = [str(c) for c in range(10) for _ in range(n_singles)]
    for _ in range(spec.n - len(strings)):
        strings.append("".join(str(d) for d in rng.integers(0, 10, size=rng.integers(2, 5))))
    items = []
    for index, k in enumerate(rng.permutation(spec.n)):
        digits = strings[k]
        sources, x0, affines = None, 0, None
        if spec.images is not None:
            pool = pools[spec.images]
            sources = tuple(int(rng.choice(pool[int(d)])) for d in digits)
            x0 = int(rng.integers(0, IMAGE_W - DIGIT_PX * len(digits) + 1))
        voice = str(spec.voices[rng.integers(len(spec.voices))])
        speed, pitch = draw(spec.speeds, rng), draw(spec.pitches, rng)
        if spec.distort:
            shifts = rng.uniform(-HARD_SHIFT_PX, HARD_SHIFT_PX, (len(digits), 2))
            degrees = rng.uniform(-HARD_DEGREES, HARD_DEGREES, len(digits))
            scales = rng.uniform(*HARD_SCALE, len(digits))
            affines = tuple((float(s[0]), float(s[1]), float(d), float(c)) for s, d, c in zip(shifts, degrees, scales))
        items.append(Item(spec.name, index, language, digits, sources, x0, affines, voice, speed, pitch))
    return items


def distort(layer: np.ndarray, centre: tuple[float, float], affine: tuple[float, float, float, float]) -> np.ndarray:
    """Rotate and scale ``layer`` about ``centre`` (x, y), then shift it by (dx, dy) pixels; bilinear."""
    dx, dy, degrees, scale = affine
    t = math.radians(degrees)
    cos, sin = math.cos(t) / scale, math.sin(t) / scale
    cx, cy = centre
    # PIL maps each output pixel back to the input: in = centre + R(-t) (out - centre - shift) / scale
    ox, oy = cx + dx, cy + dy
    data = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
    img = Image.fromarray(layer, mode="F").transform(layer.shape[::-1], Image.AFFINE, data, Image.BILINEAR)
    return np.asarray(img)


def render_image(item: Item, images: np.ndarray) -> np.ndarray:
    """Place the item's digits, upscaled 2x and stretched from 0..16 to 0..255, on a black 16x64 canvas; with
    ``item.affines``, each digit shifted, rotated and scaled about its own centre."""
    canvas = np.zeros((IMAGE_H, IMAGE_W), dtype=np.uint8)
    layers = []
    for i, src in enumerate(item.sources):
        digit = np.kron(images[src], np.ones((2, 2)))  # (8, 8) -> (16, 16)
        x = item.x0 + i * DIGIT_PX
        if item.affines is None:
            canvas[:, x : x + DIGIT_PX] = np.round(digit * 255 / 16).astype(np.uint8)
            continue
        layer = np.zeros((IMAGE_H, IMAGE_W), dtype=np.float32)
        layer[:, x : x + DIGIT_PX] = digit * 255 / 16
        layers.append(distort(layer, (x + DIGIT_PX / 2, IMAGE_H / 2), item.affines[i]))
    if layers:
        canvas = np.clip(np.round(np.max(layers, axis=0)), 0, 255).astype(np.uint8)  # strokes that touch merge
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
    the knob that keeps the data sets inside their size budget; the samples stay ordinary int16 for any reader.
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


def split_digest(out: Path, split: str) -> str:
    """sha256 over a split's manifest and, in manifest order, each of its files' path and bytes."""
    h = hashlib.sha256()
    manifest = (out / f"{split}.jsonl").read_bytes()
    h.update(manifest)
    for line in manifest.decode().splitlines():
        row = json.loads(line)
        for key in ("image", "audio_filepath"):
            if key in row:
                h.update(row[key].encode() + b"\0" + (out / row[key]).read_bytes())
    return h.hexdigest()


def build_split(spec: Split, language: str, out: Path, args, pools, images) -> list[dict]:
    """Render and write one split's images, audio and manifest; return its manifest rows."""
    n_singles = max(round(args.single_fraction * spec.n / 10), spec.min_singles_per_class)
    items = plan_items(spec, language, pools, args.seed, n_singles)
    (out / "audio" / spec.name).mkdir(parents=True)
    if spec.images is not None:
        (out / "images" / spec.name).mkdir(parents=True)
        for item in items:
            Image.fromarray(render_image(item, images)).save(out / item.image, optimize=True)
    with Pool(args.jobs) as pool:
        durations = pool.map(render_audio, [(item, out, args.sample_rate, spec.bits) for item in items], chunksize=16)
    rows = [item.row(duration) for item, duration in zip(items, durations)]
    with open(out / f"{spec.name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return rows


def fmt_ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return " or ".join(f"{lo}-{hi}" for lo, hi in ranges)


def contents_table(out: Path, specs: list[Split], rows: dict[str, list[dict]]) -> tuple[list[str], float]:
    """The README's per-split table and the folder's total MB (files of the splits plus manifests)."""
    lines = [
        "| split | items | single digits | of which per class | multi-digit | voices | speed (wpm) | pitch | "
        "audio bits | audio hours | MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0.0
    for s in specs:
        r = rows[s.name]
        singles = [x for x in r if len(x["digits"]) == 1]
        per_class = sorted({sum(x["digits"] == str(c) for x in singles) for c in range(10)})
        per_class_text = str(per_class[0]) if len(per_class) == 1 else f"{per_class[0]}-{per_class[-1]}"
        mb = (folder_bytes(out / "audio" / s.name) + folder_bytes(out / "images" / s.name)) / 1e6
        total += mb + (out / f"{s.name}.jsonl").stat().st_size / 1e6
        hours = sum(x["duration"] for x in r) / 3600
        lines.append(
            f"| {s.name} | {len(r)} | {len(singles)} | {per_class_text} | {len(r) - len(singles)} | {len(s.voices)} "
            f"| {fmt_ranges(s.speeds)} | {fmt_ranges(s.pitches)} | {s.bits} | {hours:.3f} | {mb:.2f} |"
        )
    return lines, total


def audio_notes(args: argparse.Namespace) -> list[str]:
    bits = sorted({args.train_bits, args.bits})
    noise = [f"{20 * math.log10(PEAK * 2 ** (b - 1) * math.sqrt(12)):.0f} dB at {b} bits" for b in bits]
    return [
        f"- `audio/<split>/NNNNNN.flac`: mono 16-bit FLAC at {args.sample_rate} Hz, peak-normalised to about -1 dBFS",
        "  and quantised to the table's significant bits (quantisation noise below the peak: "
        + ", ".join(noise)
        + "),",
        f"  silence trimmed to about {round(TRIM_KEEP_S * 1000)} ms at each end. The rate (bandwidth "
        f"{args.sample_rate / 2000:g} kHz) and precision",
        "  keep the repository small; training resamples to the model's rate. Training splits keep fewer bits, to fit",
        "  the size budget (so training audio carries a little more quantisation noise than evaluation audio, never",
        "  the reverse); evaluation splits keep the first release's 10.",
    ]


def rebuild_block(args: argparse.Namespace, where: str) -> list[str]:
    return [
        "Rebuild both data sets (build-time tools only; mmformer never imports them):",
        "",
        "```",
        "apt-get install -y espeak-ng",
        "python3 -m venv /tmp/digits-venv",
        "/tmp/digits-venv/bin/pip install scikit-learn scipy soundfile numpy pillow",
        f"/tmp/digits-venv/bin/python data/build_digits.py --seed {args.seed}",
        "```",
        "",
        f"The build checks the digests of data/digits' val and test splits against the first release ({where}); a",
        "different espeak-ng (1.51 here) or libsndfile may synthesise or encode differently, and then it stops rather",
        "than silently change the splits today's figures were measured on.",
    ]


LICENCES = [
    "## Licences",
    "",
    '- Digit images: the test part of the UCI "Optical Recognition of Handwritten Digits" data set',
    "  (E. Alpaydin and C. Kaynak, 1998, https://archive.ics.uci.edu/dataset/80, CC BY 4.0 on the UCI",
    "  repository), as bundled with scikit-learn (BSD-3-Clause) and loaded by `sklearn.datasets.load_digits`.",
    "- Audio: synthesised with espeak-ng (GPL-3.0-or-later); the generated speech is program output, not part",
    "  of espeak-ng.",
    "",
]


def voice_list(voices: tuple[str, ...] | list[str]) -> str:
    return f"({len(voices)}): {', '.join(voices)}."


def write_readme_en(out: Path, args, specs: list[Split], rows: dict[str, list[dict]], digests: dict) -> None:
    """Describe data/digits; every number here is computed from the files just written."""
    by = {s.name: s for s in specs}
    table, total_mb = contents_table(out, specs, rows)
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
    lo, hi = HARD_SCALE
    lines = [
        "# digits: a small multimodal data set (image, speech, text)",
        "",
        "Each sample is a string of 1-4 digits as a handwritten-digit image, as synthetic speech and as text",
        '("four two nine"). It ships with mmformer so that a fresh clone can train contrastive learning, image',
        "captioning and speech-to-text on a laptop CPU in minutes. Built by `data/build_digits.py`; do not edit",
        "by hand. Its German sibling, for adapting to a new language, is `data/digits_de/`.",
        "",
        "## Contents",
        "",
        *table,
        "",
        "MB counts file bytes (1 MB = 10^6 bytes) of each split's images and audio. With the manifests the folder",
        f"holds {total_mb:.2f} MB, as `du -s --apparent-size` reports; plain `du` also counts the 4 KiB disk block",
        "that each small file occupies, which git does not store.",
        "",
        "- `{train,val,test,test_hard}.jsonl`: one JSON object per line, paths relative to this folder, `duration`",
        "  in seconds of the stored audio:",
        f"  `{json.dumps(example)}`;",
        "  test_hard rows also carry `affine`: per digit `[dx, dy, degrees, scale]` of its distortion.",
        f"- `images/<split>/NNNNNN.png`: {IMAGE_H}x{IMAGE_W} (HxW) 8-bit greyscale, black background. Each digit",
        "  is one of scikit-learn's 8x8 handwritten digits (16 grey levels) upscaled 2x to 16x16 and stretched",
        "  to 0..255; the digits sit side by side from a random horizontal offset (whole pixels).",
        *audio_notes(args),
        "- `text`: the digit words, lowercase, separated by single spaces; `digits`: the same as numerals.",
        "",
        "## Splits",
        "",
        "- `train`: every first-release training voice plus more variants for a wider spread of voices, speeds and",
        "  pitches. `val` and `test` are the first release's, bit-identical (digests below), so figures measured on",
        "  them stay comparable; val reuses first-release training voices.",
        "- `test`: in-distribution except for its voices: accent+variant pairs never used in training (every",
        "  accent and every variant is heard in training, but not in that pairing).",
        "- `test_hard`: outside the training distribution on every axis, as the build asserts before writing:",
        f"  - voices: {len(HELD_OUT_VARIANTS)} espeak-ng variants from families no training split uses (each with",
        f"    {HARD_ACCENTS_PER_VARIANT} accents); a family groups variants that are edits of one another;",
        f"  - speeds {fmt_ranges(HARD_SPEEDS)} wpm and pitches {fmt_ranges(HARD_PITCHES)}, against training's",
        f"    {fmt_ranges(TRAIN_SPEEDS)} wpm and {fmt_ranges(TRAIN_PITCHES)};",
        "  - images: digits from the test pool (disjoint from training's), each shifted by up to",
        f"    +-{HARD_SHIFT_PX:g} px in x and y, rotated by up to +-{HARD_DEGREES:g} degrees and scaled by {lo}-{hi}",
        "    about its own centre (uniform draws, bilinear); training images are never shifted vertically, rotated or",
        "    scaled.",
        "",
        "## How it was built",
        "",
        f"- Seed {args.seed}. scikit-learn's 1797 digit images are split 60/20/20 by a seeded permutation, so",
        "  train, val and test use disjoint source images (an image may repeat within its own split); test_hard",
        "  draws from the test pool. The 1797 images come from 13 writers whose identities are not recorded, so",
        "  writers may overlap.",
        f"- About {args.single_fraction:.0%} of every split, and at least {args.min_singles_per_class} per class,",
        "  are single digits balanced over the ten classes (for zero-shot classification); the rest have 2-4",
        "  digits drawn uniformly.",
        "- Speech: espeak-ng reads the text with a voice drawn uniformly from the split's voices, a speed range and",
        "  a pitch range picked uniformly among the split's, then a value drawn uniformly in it. A voice is an accent",
        "  plus a variant (`en-us+m3`).",
        f"- Accents ({len(ACCENTS)}): {', '.join(ACCENTS)}.",
        f"- First-release variants ({len(FIRST_VARIANTS)}): {', '.join(FIRST_VARIANTS)}.",
        f"- Variants added to training ({len(MORE_TRAIN_VARIANTS)}): {', '.join(MORE_TRAIN_VARIANTS)}.",
        f"- Held-out variants ({len(HELD_OUT_VARIANTS)}): {', '.join(HELD_OUT_VARIANTS)}.",
        "- Variant families (variants not listed are their own family): "
        + "; ".join(", ".join(f) for f in FAMILIES)
        + ".",
        f"- Train voices {voice_list(by['train'].voices)}",
        f"- Val voices: the first release's training voices {voice_list(by['val'].voices)}",
        f"- Test voices {voice_list(by['test'].voices)}",
        f"- Test_hard voices {voice_list(by['test_hard'].voices)}",
        "",
        *rebuild_block(args, "below"),
        "",
        "sha256 of each split (manifest, then each file's path and bytes in manifest order; see `split_digest`):",
        "",
        *[f"- {s}: `{d}`" for s, d in digests.items()],
        "",
        *LICENCES,
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def write_readme_de(out: Path, args, specs: list[Split], rows: dict[str, list[dict]], digests: dict) -> None:
    """Describe data/digits_de; every number here is computed from the files just written."""
    by = {s.name: s for s in specs}
    table, total_mb = contents_table(out, specs, rows)
    example = {
        "audio_filepath": "audio/train/000000.flac",
        "text": "vier zwei neun",
        "digits": "429",
        "duration": 1.234,
        "voice": "de+m3",
        "speed": 160,
        "pitch": 50,
    }
    lines = [
        "# digits_de: German spoken digit strings (speech, text)",
        "",
        "The digit strings of `data/digits`, spoken in German by espeak-ng, with German transcripts",
        '("vier zwei neun"): a small new-language set for adapting the English speech-to-text model (LoRA or full',
        "fine-tuning from `data/digits_model`) and measuring it on voices never heard in training. Audio and text",
        "only: the manifests have no image column, so `modalities: [audio]` (or the default) loads speech and text.",
        "Built by `data/build_digits.py`; do not edit by hand.",
        "",
        "## Contents",
        "",
        *table,
        "",
        f"With the manifests the folder holds {total_mb:.2f} MB (`du -s --apparent-size`).",
        "",
        "- `{train,val,test}.jsonl`: one JSON object per line, paths relative to this folder, UTF-8:",
        f"  `{json.dumps(example, ensure_ascii=False)}`",
        *audio_notes(args),
        f"- `text`: the German digit words, lowercase, separated by single spaces: {' '.join(WORDS['de'])}.",
        "",
        "## How it was built",
        "",
        f"- Seed {args.seed}. About {args.single_fraction:.0%} of every split, and at least",
        f"  {args.de_min_singles_per_class} per class, are single digits balanced over the ten classes; the rest have",
        "  2-4 digits drawn uniformly.",
        "- Speech: espeak-ng's German voice `de` with a variant; speed and pitch drawn uniformly from",
        f"  {fmt_ranges(TRAIN_SPEEDS)} wpm and {fmt_ranges(TRAIN_PITCHES)} in every split (data/digits' training",
        "  ranges).",
        "- Train and val speak with the variants data/digits trains on, so an adaptation learns the language, not the",
        "  voices. The test voices are variants from families that neither data set trains on (a subset of",
        "  data/digits' test_hard variants): unheard by the English model and by the German training split.",
        f"- Train and val voices {voice_list(by['train'].voices)}",
        f"- Test voices {voice_list(by['test'].voices)}",
        "",
        *rebuild_block(args, "listed in data/digits/README.md"),
        "",
        "sha256 of each split (see `split_digest` in the build script):",
        "",
        *[f"- {s}: `{d}`" for s, d in digests.items()],
        "",
        *LICENCES[:2],
        *LICENCES[-3:],
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def build(args: argparse.Namespace) -> None:
    from sklearn.datasets import load_digits  # build-time only

    check_voices()
    plans = plan_splits(args)
    check_disjoint(plans)
    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) in 0..16, (1797,)
    pools = split_images(labels, np.random.default_rng([args.seed, 0]))
    outs = {"digits": Path(args.out), "digits_de": Path(args.out_de)}
    for name, specs in plans.items():
        out, language = outs[name], "de" if name == "digits_de" else "en"
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("images", "audio"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for stale in out.glob("*.jsonl"):
            stale.unlink()
        rows = {s.name: build_split(s, language, out, args, pools, images) for s in specs}
        digests = {s.name: split_digest(out, s.name) for s in specs}
        if name == "digits" and args.check_frozen:
            changed = {s: (FROZEN[s], digests[s]) for s in FROZEN if digests[s] != FROZEN[s]}
            if changed:
                raise SystemExit(
                    f"the rebuilt {', '.join(changed)} split(s) differ from the first release ({changed}): another "
                    "espeak-ng or libsndfile version, or a change to how they are drawn. They must stay identical so "
                    "that figures stay comparable; pass --no-check-frozen only to build a data set of your own."
                )
        writer = write_readme_en if name == "digits" else write_readme_de
        writer(out, args, specs, rows, digests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "digits"), help="folder of the English data set")
    parser.add_argument("--out-de", default=str(HERE / "digits_de"), help="folder of the German data set")
    parser.add_argument("--n-train", type=int, default=2200)
    parser.add_argument("--n-val", type=int, default=400)
    parser.add_argument("--n-test", type=int, default=400)
    parser.add_argument("--n-test-hard", type=int, default=300)
    parser.add_argument("--n-de-train", type=int, default=600)
    parser.add_argument("--n-de-val", type=int, default=100)
    parser.add_argument("--n-de-test", type=int, default=200)
    parser.add_argument("--single-fraction", type=float, default=0.25, help="share of single-digit items")
    parser.add_argument("--min-singles-per-class", type=int, default=20, help="floor on single digits per class")
    parser.add_argument("--de-min-singles-per-class", type=int, default=5, help="the same, for data/digits_de")
    parser.add_argument("--sample-rate", type=int, default=8000, help="stored audio sample rate in Hz")
    parser.add_argument("--bits", type=int, default=10, help="significant bits per sample, evaluation splits")
    parser.add_argument("--train-bits", type=int, default=8, help="significant bits per sample, training splits")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel espeak-ng processes")
    parser.add_argument(
        "--no-check-frozen",
        dest="check_frozen",
        action="store_false",
        help="do not require data/digits' val and test to equal the first release",
    )
    args = parser.parse_args()
    for name in ("bits", "train_bits"):
        if not 8 <= getattr(args, name) <= 16:
            parser.error(f"--{name.replace('_', '-')} must be in 8..16, got {getattr(args, name)}")
    start = time.perf_counter()
    build(args)
    for out in (Path(args.out), Path(args.out_de)):
        print(f"built {out} ({folder_bytes(out) / 1e6:.2f} MB)")
    print(f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
