"""The KServe v2 / Triton gRPC protocol (`inference.GRPCInferenceService`) on clipserve's core.

A second thin adapter next to `clipserve.v1.ClipService`, on the same `ClipModel` and batchers:

- `models`: the four Triton models clipserve serves, their metadata and ModelConfig;
- `codec`: protocol tensors <-> numpy arrays and byte strings;
- `infer`: one model's input tensor -> `ClipModel` -> embeddings;
- `statistics`: Triton's per-model statistics, fed by the batchers and the servicer;
- `servicer`: the gRPC methods.
"""
