"""The command line of the torch-free ONNX runner (:class:`~mmformer.ship.onnx_runner.OnnxModel`)::

    python -m mmformer.ship.onnx_runner out/onnx --classes zero,one,two a.png b.flac     # zero-shot
    python -m mmformer.ship.onnx_runner out/onnx --transcribe a.flac                     # speech to text
    python -m mmformer.ship.onnx_runner out/onnx --caption a.png                         # image captioning

(``python -m mmformer.ship.runner_cli`` is the same command). As the ``mmformer`` commands do, each file is read first,
by the Processor's rules (:mod:`mmformer.preprocess.media`): one that cannot be used — missing, empty, corrupt,
neither audio nor an image, or for ``--transcribe`` longer than a Whisper export's window — is skipped, the others are
answered (one batch per modality and task), and then each skipped file is named on stderr (``...: error: FILE:
reason``) and the exit status is 1, as ``mmformer transcribe`` gives. A bad export folder or option is such a line too,
without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mmformer.preprocess.media import file_modality, read_each, read_image
from mmformer.ship.onnx_runner import OnnxModel

PROG = "python -m mmformer.ship.onnx_runner"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run an ONNX export of mmformer with numpy and onnxruntime.")
    p.add_argument("export", help="folder written by `mmformer export --format onnx`")
    p.add_argument("--classes", help="comma-separated class names: zero-shot classification")
    p.add_argument("--transcribe", action="store_true", help="transcribe the audio files")
    p.add_argument("--caption", action="store_true", help="caption the image files")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--language", help="Whisper: the audio's language code, e.g. en (default: detected)")
    p.add_argument("--task", help="Whisper: transcribe or translate (default: the checkpoint's)")
    p.add_argument("files", nargs="+")
    return p


def usable(items: Sequence[Any], read: Callable[[Any], Any], failed: list[str]) -> tuple[list[Any], list[Any]]:
    """The items ``read`` reads and their values, in order (:func:`~mmformer.preprocess.media.read_each`); the message
    of each one it refuses (naming the file) appended to ``failed``, printed after the answers."""
    values, errors = read_each(items, read)
    failed.extend(errors.values())
    kept = [i for i in range(len(items)) if i not in errors]
    return [items[i] for i in kept], [values[i] for i in kept]


def answer(args: argparse.Namespace, failed: list[str]) -> None:
    """Print the answers for the usable files of ``args`` (tab-separated lines); the others' messages go to
    ``failed``."""
    model = OnnxModel(args.export)
    if args.transcribe:
        model.check_language_task(args.language, args.task)  # before any file is read
    chosen = [flag for flag, on in (("--classes", args.classes), ("--transcribe", args.transcribe),
                                    ("--caption", args.caption)) if on]  # fmt: skip
    wanted = {"image": bool(args.classes or args.caption), "audio": bool(args.classes or args.transcribe)}
    kinds = dict(zip(*usable(args.files, file_modality, failed)))
    for path, kind in kinds.items():
        if not wanted[kind]:
            failed.append(f"{path}: {kind}, which {' '.join(chosen)} does not read")
    files = {kind: [f for f in args.files if kinds.get(f) == kind and wanted[kind]] for kind in wanted}
    images = usable(files["image"], functools.partial(read_image, mode=model.image_mode), failed)
    audio = usable(files["audio"], lambda f: model.load_audio([f])[0], failed)  # at the model's rate
    rate = model.sample_rate if audio[0] else None
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        for modality, (paths, values) in (("image", images), ("audio", audio)):
            if paths:
                probs, labels = model.zeroshot(values, classes, modality=modality, sample_rate=rate)
                for path, label, row in zip(paths, labels, probs):
                    print(f"{path}\t{label}\t{row.max():.3f}")
    if args.transcribe:

        def one_window(item: tuple[str, Any]) -> Any:  # a Whisper export decodes one window: longer files refused
            model.check_one_window([item[0]], [item[1]])
            return item[1]

        kept, waves = usable(list(zip(*audio)), one_window, failed)
        if waves:
            texts = model.transcribe(waves, rate, args.max_new_tokens, language=args.language, task=args.task)
            for (path, _), text in zip(kept, texts):
                print(f"{path}\t{text}")
    if args.caption and images[0]:
        for path, text in zip(images[0], model.caption(images[1], max_new_tokens=args.max_new_tokens)):
            print(f"{path}\t{text}")


def main(argv: Sequence[str] | None = None) -> None:
    """Answer the command line ``argv`` (default: ``sys.argv``); exit status 1, each problem named on stderr, where
    a file could not be used or the export or an option is refused."""
    p = parser()
    args = p.parse_args(argv)
    if not (args.classes or args.transcribe or args.caption):
        p.error("expected a task: --classes, --transcribe or --caption")
    failed: list[str] = []
    try:
        answer(args, failed)
    except (OSError, ValueError, ImportError) as e:  # a bad export folder or option (SampleError is a ValueError)
        failed.append(str(e))
    if failed:
        sys.stdout.flush()  # the answers first, where both streams go to one terminal or file
        for message in failed:
            print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
