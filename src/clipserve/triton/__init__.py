"""Generated stubs of the KServe v2 / Triton gRPC protocol, wire package `inference`.

Made by scripts/gen_stubs.py from proto/clipserve/triton/. The modules register their
descriptors in `DESCRIPTOR_POOL`, not protobuf's default pool, so they import in one process with
tritonclient, KServe or MLServer, which define the same `inference` symbols.
"""

from google.protobuf import descriptor_pool

DESCRIPTOR_POOL = descriptor_pool.DescriptorPool()
