"""Generate the committed Python stubs from proto/ (the only way they are made).

    python scripts/gen_stubs.py            # write src/clipserve/**/_pb2*.py(i)
    python scripts/gen_stubs.py --check    # exit 1 if the committed stubs differ (CI)

The proto path mirrors the Python package (`-I proto`, `proto/clipserve/v1/*.proto`), so the
generated modules import each other as `clipserve.v1...` with no rewriting.

One rewrite is made: modules of `PRIVATE_POOLS` register their descriptors in their package's own
descriptor pool instead of protobuf's default one (see `PRIVATE_POOLS`).
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "src"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

#: Stub folders (under src/) -> the module holding their `DESCRIPTOR_POOL`. `clipserve/triton`
#: defines the wire package `inference` of the KServe v2 protocol, which tritonclient, KServe and
#: MLServer register too; protobuf refuses a second definition of a symbol in one pool
#: ("duplicate symbol 'inference.ServerLiveRequest'"), so these modules use a pool of their own
#: and import side by side with those libraries. Wire names are unchanged.
PRIVATE_POOLS = {"clipserve/triton": "clipserve.triton"}
_DEFAULT_POOL_LINE = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_BUILDER_IMPORT = "from google.protobuf.internal import builder as _builder\n"


def _protos() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc for every proto file into out_dir; return the files written."""
    include = str(Path(protoc.__file__).parent / "_proto")
    for proto in _protos():
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto.relative_to(ROOT)}")
    for folder, module in PRIVATE_POOLS.items():
        for path in sorted((out_dir / folder).glob("*_pb2.py")):
            _use_private_pool(path, module)
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def _use_private_pool(path: Path, module: str) -> None:
    """Register the module's descriptors in `module.DESCRIPTOR_POOL` (see `PRIVATE_POOLS`)."""
    text = path.read_text()
    if text.count(_DEFAULT_POOL_LINE) != 1 or text.count(_BUILDER_IMPORT) != 1:
        raise SystemExit(f"{path.name}: unexpected protoc output, cannot use a private pool")
    text = text.replace(
        _BUILDER_IMPORT,
        f"{_BUILDER_IMPORT}from {module} import DESCRIPTOR_POOL as _private_pool\n",
    )
    text = text.replace(_DEFAULT_POOL_LINE, "DESCRIPTOR = _private_pool.AddSerializedFile(")
    path.write_text(text)


def check() -> int:
    """Compare freshly generated stubs with the committed ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp): p.read_text() for p in generate(Path(tmp))}
    committed = {
        p.relative_to(OUT_ROOT): p.read_text()
        for p in OUT_ROOT.rglob("*")
        if p.name.endswith(GENERATED_SUFFIXES)
    }
    drift = 0
    for rel in sorted(set(fresh) | set(committed)):
        a, b = committed.get(rel, ""), fresh.get(rel, "")
        if a != b:
            drift += 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    a.splitlines(True), b.splitlines(True), f"committed/{rel}", f"generated/{rel}"
                )
            )
    if drift:
        print(f"\n{drift} generated file(s) differ: run `python scripts/gen_stubs.py` and commit.")
        return 1
    print(f"stubs up to date ({len(fresh)} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    if args.check:
        return check()
    for path in generate(OUT_ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
