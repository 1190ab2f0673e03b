"""Shrink a CUDA shared library to the device code one GPU architecture runs.

NVIDIA's fat binaries (the ELF section `.nv_fatbin`) hold one compiled image per GPU
architecture for every compilation unit; the driver loads only the image that matches the GPU.
onnxruntime-gpu's CUDA provider carries images for sm_75 ... sm_120, about 215 MB of its
284 MB. This tool zeroes the payload of every image whose architecture is not `--keep`
(headers stay, so offsets and sizes are unchanged and the file is still a valid library),
which lets the library compress to a fraction of its size for a transfer to a machine with no
package index. It can also zero the units that are compiled for `--keep` alone and whose
kernels match `--drop-only-arch-kernels` (onnxruntime's grouped GEMMs for mixture-of-experts
layers, about 44 MB, which a CLIP tower never calls).

The pruned library runs only on the kept architecture, and only with lazy module loading
(`CUDA_MODULE_LOADING=LAZY`, CUDA's default since 12.2) when units are dropped whole.

    python benchmarks/prune_fatbin.py LIB --keep 90 [--drop-only-arch-kernels GroupProblemShape]
"""

from __future__ import annotations

import argparse
import mmap
import struct
import subprocess
from collections import Counter
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
WRAPPER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries
ENTRY = struct.Struct("<HHIIIIIII")  # kind, version, header size, padded size, -, size, -, -, arch
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def fatbin_section(path: Path) -> tuple[int, int]:
    """File offset and size of `.nv_fatbin` (read with readelf, part of binutils)."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        fields = line.replace("[ ", "[").split()
        if len(fields) > 5 and fields[1] == ".nv_fatbin":
            return int(fields[4], 16), int(fields[5], 16)
    raise SystemExit(f"{path}: no .nv_fatbin section")


def kernel_names(payload: bytes) -> bytes:
    """The image's bytes, decompressed where nvcc compressed them (zstd), to search names in."""
    if payload.startswith(ZSTD_MAGIC):
        return subprocess.run(["zstd", "-d", "-c", "-q"], input=payload, capture_output=True,
                              check=True).stdout
    return payload


def prune(path: Path, keep: int, drop_kernels: bytes | None) -> Counter[str]:
    start, size = fatbin_section(path)
    zeroed: Counter[str] = Counter()
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as data:
        pos, end_of_section = start, start + size
        while pos + WRAPPER.size <= end_of_section:
            magic, _, header_size, entries_size = WRAPPER.unpack_from(data, pos)
            if magic != FATBIN_MAGIC:  # alignment padding between wrappers
                pos += 8
                continue
            entry, end = pos + header_size, pos + header_size + entries_size
            images = []
            while entry < end:
                fields = ENTRY.unpack_from(data, entry)
                images.append((fields[8], entry + fields[2], fields[5], fields[3]))
                entry += fields[2] + fields[3]
            only_keep = all(arch == keep for arch, *_ in images)
            for arch, payload, length, padded in images:
                drop = arch != keep
                if not drop and only_keep and drop_kernels is not None:
                    drop = drop_kernels in kernel_names(bytes(data[payload:payload + length]))
                if drop:
                    data[payload:payload + padded] = bytes(padded)
                    zeroed[f"sm_{arch}" + (" (dropped kernels)" if arch == keep else "")] += padded
            pos = end
        data.flush()
    return zeroed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", type=Path, help="the shared library to prune, in place")
    parser.add_argument("--keep", type=int, required=True, help="architecture, e.g. 90 for H100")
    parser.add_argument("--drop-only-arch-kernels", default=None,
                        help="also zero single-architecture units whose kernels name this")
    args = parser.parse_args()
    drop = args.drop_only_arch_kernels.encode() if args.drop_only_arch_kernels else None
    zeroed = prune(args.library, args.keep, drop)
    for what, count in sorted(zeroed.items()):
        print(f"zeroed {what}: {count / 1e6:.1f} MB")
    print(f"kept sm_{args.keep}; {sum(zeroed.values()) / 1e6:.1f} MB zeroed in {args.library}")


if __name__ == "__main__":
    main()
