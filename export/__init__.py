"""clipserve.export: open_clip (PyTorch) -> ONNX towers -> Triton-style model repository."""
