"""Generated gRPC/protobuf stubs of the `clipserve.v1` API (see scripts/gen_stubs.py)."""
