"""Regenerates the committed Python stubs from the .proto files in this package.

    python -m jaxserve.protos.generate           # rewrite the *_pb2*.py / *.pyi files
    python -m jaxserve.protos.generate --check   # exit 1 if they are out of date

Needs grpcio-tools (`pip install grpcio-tools==1.85.1`). The stubs import each other as
`jaxserve.protos...`, so protoc runs from the repository root.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parents[1]  # the directory that holds the `jaxserve` package
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on every .proto file; returns the files written under out_dir."""
    from grpc_tools import protoc

    files = [str(p.relative_to(ROOT)) for p in proto_files()]
    include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {files}")
    return sorted(p for p in out_dir.rglob("*") if p.name.endswith(SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the stubs are up to date")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for new in generate(Path(tmp)):
            target = ROOT / new.relative_to(tmp)
            if not target.is_file() or target.read_bytes() != new.read_bytes():
                stale.append(target)
                if not args.check:
                    target.write_bytes(new.read_bytes())
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path.relative_to(ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
