"""Command-line start-up: wall time of ``mmformer --help`` and of ``mmformer zeroshot`` on one image with a small
saved model, each in a fresh process (median of the repeats), and which heavy packages each command imports
(``python -X importtime``).

    python -m benchmarks.startup [--repeats 5]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import base_parser, machine, parse_args, record, table

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "lightning", "pytorch_lightning", "timm", "transformers", "open_clip", "torchaudio", "torchvision")
HELP_BUDGET_S = 2.0


def mmformer_command() -> list[str]:
    """The installed ``mmformer`` console script next to this interpreter, else the same entry point via -c."""
    script = Path(sys.executable).parent / "mmformer"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mmformer.cli import main; sys.exit(main())"]


def wall_time(cmd: list[str], repeats: int) -> float:
    """Median wall seconds of running ``cmd`` to completion (it must succeed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def heavy_imports(argv: list[str]) -> list[str]:
    """Heavy top-level packages the mmformer command ``argv`` imports, from ``python -X importtime``."""
    code = f"import sys; sys.argv = ['mmformer', *{argv!r}]; from mmformer.cli import main; main()"
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, check=True, capture_output=True, text=True
    ).stderr
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in err.splitlines() if line.startswith("import")}
    return sorted(names & set(HEAVY))


def make_model(directory: Path) -> Path:
    """A small image–text model saved with its processor, and one PNG image; returns the image path."""
    import torch
    from PIL import Image

    from mmformer import MultimodalTransformer, Processor, Tokenizer
    from mmformer.config import ImageConfig, ModelConfig, StackConfig, TextConfig
    from mmformer.processor import ImageProcessorConfig

    words = ["a photo of a cat", "a photo of a dog", "a drawing of a bird", "zero one two three"]
    tokenizer = Tokenizer.train(words * 4, vocab_size=300, max_length=16)
    stack = StackConfig(width=64, depth=2, n_heads=4)
    config = ModelConfig(
        stacks={"vision": stack, "text": stack},
        routes={"image": "vision", "text": "text"},
        image=ImageConfig(image_size=[32, 32], patch_size=8),
        audio=None,
        text=TextConfig(
            vocab_size=tokenizer.vocab_size,
            max_length=16,
            pad_id=tokenizer.pad_id,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        ),
        embed_dim=32,
    )
    torch.manual_seed(0)
    model = MultimodalTransformer(config)
    model.save_pretrained(directory / "model", processor=Processor(tokenizer, ImageProcessorConfig(image_size=32)))
    image = directory / "cat.png"
    Image.fromarray((torch.rand(48, 64, 3) * 255).to(torch.uint8).numpy()).save(image)
    return image


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__)
    args = parse_args(p, argv)
    if args.tiny:
        args.repeats = 1
    cli = mmformer_command()
    with tempfile.TemporaryDirectory() as tmp:
        image = make_model(Path(tmp))
        zeroshot = ["zeroshot", "--model", str(Path(tmp) / "model"), "--classes", "cat,dog,bird", str(image)]
        commands = {"mmformer --help": ["--help"], "mmformer zeroshot (1 image)": zeroshot}
        rows = []
        for name, argv in commands.items():
            seconds = wall_time(cli + argv, args.repeats)
            trace = not args.tiny or argv == ["--help"]  # a smoke run skips tracing zeroshot (a second model load)
            rows.append(
                {
                    "command": name,
                    "wall_s": seconds,
                    "heavy_imports": (",".join(heavy_imports(argv)) or "none") if trace else "",
                    **({"under_2s": seconds < HELP_BUDGET_S} if argv == ["--help"] else {}),
                }
            )
    print(f"command-line start-up (fresh process, median of {args.repeats}), {machine()}")
    print(table(rows, ["command", "wall_s", "under_2s", "heavy_imports"]))
    record("startup", rows, args)


if __name__ == "__main__":
    main()
