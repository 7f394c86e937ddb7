"""Shipping a model: ONNX / torch.export graphs and a torch-free runner."""
