"""Start-up: wall time of ``mmformer --help`` and of ``mmformer zeroshot`` on one image with a small saved model,
each in a fresh process (median of the repeats), and which heavy packages each command imports
(``python -X importtime``); and model loading (``--load``): ``load_pretrained`` of a ViT-B/32-size CLIP and a
Whisper-small-size model (random weights saved locally) against the build-then-copy path it replaced (build the
model with random initialisation, then copy the weights in) and against a bare ``safetensors`` read, each in a fresh
process, with its peak resident memory above the process's baseline. Every method ends by reading every weight
once (a sum), so lazily memory-mapped tensors are paid for too.

    python -m benchmarks.startup [--repeats 5] [--load-only]

``--tiny`` (the test suite's smoke run): one repeat, a tiny model for the loading rows (its three methods in one
process), and no import trace of ``zeroshot``.
"""

from __future__ import annotations

import json
import resource
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
    return [sys.executable, "-c", "import sys; from mmformer.cli.main import main; sys.exit(main())"]


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
    code = f"import sys; sys.argv = ['mmformer', *{argv!r}]; from mmformer.cli.main import main; main()"
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
    from mmformer.preprocess.processor import ImageProcessorConfig

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


# ---------------------------------------------------------------------------------------------- loading
LOAD_SIZES = {
    # CLIP ViT-B/32: vision 12 x 768 at 224 px, text 12 x 512, vocab 49,408 (151 M parameters)
    "vit-b-32": dict(
        stacks={"vision": dict(width=768, depth=12, n_heads=12), "text": dict(width=512, depth=12, n_heads=8)},
        routes={"image": "vision", "text": "text"},
        image=dict(image_size=[224, 224], patch_size=32, pre_norm=True, patch_bias=False),
        audio=None,
        text=dict(vocab_size=49408, max_length=77, causal=True),
        embed_dim=512,
    ),
    # Whisper small: encoder and decoder 12 x 768, vocab 51,865 (242 M parameters)
    "whisper-small": dict(
        stacks={
            "encoder": dict(width=768, depth=12, n_heads=12),
            "decoder": dict(width=768, depth=12, n_heads=12, cross_attention=True),
        },
        routes={"audio": "encoder", "decoder": "decoder"},
        image=None,
        audio=dict(n_mels=80, max_frames=3000),
        text=dict(vocab_size=51865, max_length=448, bos_id=50258, eos_id=50257, pad_id=50257),
        embed_dim=None,
    ),
    "tiny": dict(
        stacks={"shared": dict(width=32, depth=2, n_heads=2, cross_attention=True)},
        image=dict(image_size=[32, 32], patch_size=16),
        audio=dict(n_mels=16, n_fft=64, hop_length=32, max_frames=64),
        text=dict(vocab_size=64, max_length=16),
        embed_dim=16,
    ),
}
LOAD_METHODS = ("load_pretrained", "build_then_copy", "safetensors_read")


def save_load_model(size: str, directory: Path) -> Path:
    """A model of ``size`` with random weights, saved with save_pretrained."""
    import torch

    from mmformer import ModelConfig, MultimodalTransformer

    torch.manual_seed(0)
    MultimodalTransformer(ModelConfig.from_dict(LOAD_SIZES[size])).save_pretrained(directory)
    return directory


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def load_worker(method: str, directory: str, repeats: int) -> dict:
    """Run in a fresh process: load ``directory`` by ``method`` ``repeats`` times; seconds (median) and the peak
    resident memory above the baseline after imports."""
    import safetensors.torch

    import mmformer
    from mmformer.io.pretrained import read_config

    weights = Path(directory) / "model.safetensors"

    def run() -> float:
        if method == "load_pretrained":
            tensors = list(mmformer.load_pretrained(directory).state_dict().values())
        elif method == "build_then_copy":  # the path loading took before the meta-device build
            model = mmformer.MultimodalTransformer(read_config(Path(directory) / "config.json"))
            model.load_state_dict(safetensors.torch.load_file(weights), strict=False)
            tensors = list(model.state_dict().values())
        else:
            tensors = list(safetensors.torch.load_file(weights).values())
        return float(sum(float(t.float().sum()) for t in tensors))  # every weight read once

    base = _rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(times), "peak_mb": peak - base}


def load_rows(sizes: list[str], repeats: int, one_process: bool = False) -> list[dict]:
    """The loading rows: each method in a fresh process of its own, or (``one_process``: the smoke run, whose
    figures mean nothing) all three in one, one after the other (each peak then includes the earlier ones')."""
    rows = []
    groups = [list(LOAD_METHODS)] if one_process else [[method] for method in LOAD_METHODS]
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            directory = save_load_model(size, Path(tmp) / "model")
            weights_mb = (directory / "model.safetensors").stat().st_size / 2**20
            results = {}
            for methods in groups:
                code = (
                    "import json, sys; from benchmarks.startup import load_worker; "
                    f"print(json.dumps({{m: load_worker(m, {str(directory)!r}, {repeats}) for m in {methods!r}}}))"
                )
                out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
                results |= json.loads(out.stdout.strip().splitlines()[-1])
            ours, old = results["load_pretrained"], results["build_then_copy"]
            for method in LOAD_METHODS:
                rows.append(
                    {
                        "model": size,
                        "weights_mb": weights_mb,
                        "method": method,
                        "seconds": results[method]["seconds"],
                        "peak_mb": results[method]["peak_mb"],
                        "peak_over_weights": results[method]["peak_mb"] / weights_mb,
                        **(
                            {"speedup_vs_build_then_copy": old["seconds"] / ours["seconds"]}
                            if method == LOAD_METHODS[0]
                            else {}
                        ),  # fmt: skip
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--load-only", action="store_true", help="only the model-loading rows")
    args = parse_args(p, argv)
    if args.tiny:
        args.repeats = 1
    sizes = ["tiny"] if args.tiny else ["vit-b-32", "whisper-small"]
    rows = load_rows(sizes, args.repeats, one_process=args.tiny)
    print(f"model loading (fresh process each, median of {args.repeats}, every weight read once), {machine()}")
    columns = ["model", "weights_mb", "method", "seconds", "speedup_vs_build_then_copy", "peak_mb", "peak_over_weights"]
    print(table(rows, columns))
    record("startup_load", rows, args)
    if args.load_only:
        return
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
