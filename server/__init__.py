"""clipserve.server: the gRPC inference server on ONNX Runtime (no torch)."""
