"""Data: readers for the formats users already have, bad-sample skipping, collation and the DataModule.

A sample is a plain dict ``{"image": (C, H, W), "audio": (S,), "text": str, "label": int | None, "source": str}``
(fields absent where the data has none); :class:`Collator` turns a list of them into a model batch.
"""

from mmformer.data.base import Record, RecordDataset
from mmformer.data.coco import CocoCaptions
from mmformer.data.collate import Collator, pad_audio
from mmformer.data.folders import ImageFolder, LibriSpeech
from mmformer.data.formats import FORMATS, dataset_texts, detect_format, open_dataset
from mmformer.data.io import MissingSampleError, SampleError, read_audio, read_image, resample
from mmformer.data.manifest import ManifestDataset
from mmformer.data.shards import ShardDataset, expand_shards
from mmformer.data.skipping import BadSampleTracker, SkippedSampleWarning, TooManyBadSamplesError
from mmformer.data.text import PackedBlocks, PackedStream, TextDocuments, pack_documents


def __getattr__(name: str):
    # the DataModule pulls in Lightning (seconds to import); inference code that only needs the Processor skips it
    if name == "MultimodalDataModule":
        from mmformer.data.datamodule import MultimodalDataModule

        return MultimodalDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "BadSampleTracker",
    "CocoCaptions",
    "Collator",
    "ImageFolder",
    "LibriSpeech",
    "ManifestDataset",
    "MultimodalDataModule",
    "Record",
    "RecordDataset",
    "MissingSampleError",
    "PackedBlocks",
    "PackedStream",
    "SampleError",
    "ShardDataset",
    "SkippedSampleWarning",
    "TextDocuments",
    "TooManyBadSamplesError",
    "dataset_texts",
    "detect_format",
    "expand_shards",
    "open_dataset",
    "pack_documents",
    "pad_audio",
    "read_audio",
    "read_image",
    "resample",
]
