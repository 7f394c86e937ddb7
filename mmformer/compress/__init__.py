"""Compressing a model: quantization (torchao, PT2E), its safe file format."""
