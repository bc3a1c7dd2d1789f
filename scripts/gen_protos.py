"""Generate the Python contracts package `sagasuite` from the protobuf files in proto/."""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
WELL_KNOWN_TYPES = Path(grpc_tools.__file__).parent / "_proto"
# mypy-protobuf's plugin types the gRPC stubs (grpc_tools leaves *_pb2_grpc.py untyped), async stubs included.
MYPY_GRPC_PLUGIN = Path(sysconfig.get_path("scripts")) / "protoc-gen-mypy_grpc"


def generate(out_dir: Path) -> None:
    """Run protoc on every contract, writing messages, stubs and type hints under out_dir."""
    if not MYPY_GRPC_PLUGIN.exists():
        raise SystemExit(f"{MYPY_GRPC_PLUGIN} not found: install the dev extra (pip install -e '.[dev]')")
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{WELL_KNOWN_TYPES}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy_grpc={MYPY_GRPC_PLUGIN}",
        "--mypy_grpc_opt=quiet",
        f"--mypy_grpc_out={out_dir}",
        # The suite's contracts as one descriptor set (what `buf build -o` makes), for YAML sagas.
        f"--descriptor_set_out={out_dir / 'sagasuite' / 'suite.binpb'}",
        "--include_imports",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Packages need __init__.py so the proto package path equals the Python import path.
    for package_dir in {p.parent for p in (out_dir / "sagasuite").rglob("*.py")}:
        current = package_dir
        while current != out_dir:
            (current / "__init__.py").touch()
            current = current.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repo)")
    options = parser.parse_args()
    generate(options.out)
    print(f"generated contracts under {options.out / 'sagasuite'}", file=sys.stderr)


if __name__ == "__main__":
    main()
