"""COCO captions: ``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmformer.data.base import Record, RecordDataset, resolve
from mmformer.data.io import is_valid_text

if TYPE_CHECKING:
    from mmformer.preprocess.processor import Processor


def find_image_root(json_path: Path, file_name: str) -> Path:
    """Where COCO images live when no root is given: beside the JSON, or in ``../train2017`` for
    ``annotations/captions_train2017.json`` (the official layout)."""
    candidates = [json_path.parent]
    split = re.match(r"captions_(.+)$", json_path.stem)
    if split:
        candidates += [json_path.parent.parent / split.group(1), json_path.parent / split.group(1)]
    for root in candidates:
        if (root / file_name).is_file():
            return root
    return json_path.parent


class CocoCaptions(RecordDataset):
    """Image–caption pairs from a COCO captions JSON.

    Args:
        path: the captions JSON.
        root: the image folder (default: found next to the JSON, see :func:`find_image_root`).
        processor: image transform (default: ``Processor()``).
        one_per_image: one sample per image with a caption drawn at random each time it is read (the usual
            setup for contrastive training); otherwise one sample per caption.
        max_bad_fraction: see :class:`~mmformer.data.BadSampleTracker`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        root: str | os.PathLike | None = None,
        processor: Processor | None = None,
        one_per_image: bool = False,
        max_bad_fraction: float = 0.1,
    ):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
            annotations = [(int(a["image_id"]), a.get("caption")) for a in data["annotations"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"COCO captions {self.path}: expected a JSON object with 'images' [{{id, file_name}}] and "
                f"'annotations' [{{image_id, caption}}]; could not read it ({type(e).__name__}: {e})"
            ) from e
        if not images:
            raise ValueError(f"COCO captions {self.path} lists no images")
        unknown = sorted({i for i, _ in annotations if i not in images})
        if unknown:
            raise ValueError(f"COCO captions {self.path}: annotations refer to unknown image ids {unknown[:10]}")
        root = Path(root) if root is not None else find_image_root(self.path, next(iter(images.values())))
        self.one_per_image = one_per_image
        self.captions: dict[int, list[Any]] = {}
        for image_id, caption in annotations:
            self.captions.setdefault(image_id, []).append(caption)
        if one_per_image:
            # every image with at least one caption, in id order; `label` carries the image id (it is not a
            # field of these samples) so that load() can draw one of its captions
            ids = sorted(self.captions)
            records = [Record(source=resolve(images[i], root), image=resolve(images[i], root), label=i) for i in ids]
        else:
            records = [
                Record(source=resolve(images[i], root), image=resolve(images[i], root), text=caption)
                for i, caption in annotations
            ]
        super().__init__(
            records,
            name=str(self.path),
            fields=("image", "text"),
            processor=processor,
            max_bad_fraction=max_bad_fraction,
        )

    def texts(self) -> list[str]:
        if not self.one_per_image:
            return super().texts()
        return [c.strip() for caps in self.captions.values() for c in caps if is_valid_text(c)]

    def load(self, record: Record) -> dict[str, Any]:
        if self.one_per_image:
            captions = self.captions[record.label]
            # torch's generator: seeded per DataLoader worker, so the draw is reproducible for a given seed
            text = captions[int(torch.randint(len(captions), ()))]
            record = Record(source=record.source, image=record.image, text=text)
        return super().load(record)
