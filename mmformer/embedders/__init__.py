"""Modality embedders: raw input → (B, N, D) tokens and a padding mask. They know nothing about the stack."""

from mmformer.embedders.audio import AudioEmbedder, LogMel
from mmformer.embedders.image import ImageEmbedder
from mmformer.embedders.text import TextEmbedder

__all__ = ["AudioEmbedder", "ImageEmbedder", "LogMel", "TextEmbedder"]
