"""clipserve: CLIP embeddings, zero-shot classification and ranking over gRPC on ONNX Runtime."""

__version__ = "0.1.0"
