"""Compile the loyalty service's own proto at test time: Python messages, gRPC stubs and a descriptor set."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc_tools
from grpc_tools import protoc

__all__ = ["PROTO", "LoyaltyBuild", "build_loyalty", "import_loyalty"]

PROTO = Path(__file__).resolve().with_name("loyalty.proto")
_WELL_KNOWN_TYPES = Path(grpc_tools.__file__).parent / "_proto"
# What protoc names the generated modules after the proto file: loyalty.proto -> loyalty_pb2.
_MESSAGES_MODULE = "loyalty_pb2"
_STUBS_MODULE = "loyalty_pb2_grpc"


@dataclass(frozen=True)
class LoyaltyBuild:
    """Where one compilation put its outputs."""

    out_dir: Path
    messages: Path
    stubs: Path
    # The equivalent of `buf build -o loyalty.binpb`: a FileDescriptorSet with its imports.
    descriptor_set: Path


def build_loyalty(out_dir: Path) -> LoyaltyBuild:
    """Run protoc on loyalty.proto into out_dir; raises RuntimeError when protoc fails."""
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptor_set = out_dir / "loyalty.binpb"
    args = [
        "protoc",
        f"-I{PROTO.parent}",
        f"-I{_WELL_KNOWN_TYPES}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--descriptor_set_out={descriptor_set}",
        "--include_imports",
        "--include_source_info",
        PROTO.name,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return LoyaltyBuild(
        out_dir=out_dir,
        messages=out_dir / f"{_MESSAGES_MODULE}.py",
        stubs=out_dir / f"{_STUBS_MODULE}.py",
        descriptor_set=descriptor_set,
    )


def import_loyalty(build: LoyaltyBuild) -> tuple[ModuleType, ModuleType]:
    """The generated (messages, stubs) modules, imported once per process under the names protoc gave them.

    The stubs import the messages as a top-level `loyalty_pb2`, so that is the name they are registered
    under; a second build in the same process gets the modules imported first (the same proto, and the
    default descriptor pool holds one file of a name).
    """
    modules = []
    for name, path in ((_MESSAGES_MODULE, build.messages), (_STUBS_MODULE, build.stubs)):
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None, path
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]
