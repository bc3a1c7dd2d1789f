"""The committed `sagasuite/` package matches its protos, and the protos follow the contract conventions."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
GENERATED_ROOT = REPO_ROOT / "sagasuite"
WELL_KNOWN_TYPES = Path(grpc_tools.__file__).parent / "_proto"
REGENERATE = "python scripts/gen_protos.py"

# Field numbers of the descriptor.proto messages, as used in SourceCodeInfo.Location.path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (bytecode caches left out), by its path relative to root."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = _tree(tmp_path / "sagasuite")
    committed = _tree(GENERATED_ROOT)
    problems = [
        f"stale: sagasuite/{name}" for name in sorted(fresh.keys() & committed.keys()) if fresh[name] != committed[name]
    ]
    problems += [f"missing: sagasuite/{name}" for name in sorted(fresh.keys() - committed.keys())]
    problems += [f"extra (no proto generates it): sagasuite/{name}" for name in sorted(committed.keys() - fresh.keys())]
    assert not problems, (
        "generated code does not match proto/:\n  "
        + "\n  ".join(problems)
        + f"\nregenerate with: {REGENERATE} (and delete the extra files)"
    )


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    """Every contract's descriptor with source info (comments), compiled by grpc_tools' protoc."""
    out = tmp_path_factory.mktemp("descriptors") / "contracts.binpb"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{WELL_KNOWN_TYPES}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"protoc failed:\n{result.stderr}"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert files.file, "no proto files found under proto/"
    return files


def _elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(kind, full name, source path) of every message, field, enum, enum value, service and rpc."""

    def enum(
        enum_type: descriptor_pb2.EnumDescriptorProto, scope: str, path: tuple[int, ...]
    ) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        name = f"{scope}.{enum_type.name}"
        yield "enum", name, path
        for index, value in enumerate(enum_type.value):
            yield "enum value", f"{name}.{value.name}", (*path, _ENUM_VALUE, index)

    def message(
        message_type: descriptor_pb2.DescriptorProto, scope: str, path: tuple[int, ...]
    ) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        name = f"{scope}.{message_type.name}"
        yield "message", name, path
        for index, field in enumerate(message_type.field):
            yield "field", f"{name}.{field.name}", (*path, _MESSAGE_FIELD, index)
        for index, nested in enumerate(message_type.nested_type):
            if not nested.options.map_entry:
                yield from message(nested, name, (*path, _MESSAGE_NESTED, index))
        for index, nested_enum in enumerate(message_type.enum_type):
            yield from enum(nested_enum, name, (*path, _MESSAGE_ENUM, index))

    for index, message_type in enumerate(file.message_type):
        yield from message(message_type, file.package, (_FILE_MESSAGE, index))
    for index, enum_type in enumerate(file.enum_type):
        yield from enum(enum_type, file.package, (_FILE_ENUM, index))
    for index, service in enumerate(file.service):
        service_name = f"{file.package}.{service.name}"
        yield "service", service_name, (_FILE_SERVICE, index)
        for method_index, method in enumerate(service.method):
            yield (
                "rpc",
                f"{service_name}.{method.name}",
                (_FILE_SERVICE, index, _SERVICE_METHOD, method_index),
            )


def _all_enums(
    files: descriptor_pb2.FileDescriptorSet,
) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
    def nested(
        message_type: descriptor_pb2.DescriptorProto, scope: str
    ) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
        name = f"{scope}.{message_type.name}"
        for enum_type in message_type.enum_type:
            yield f"{name}.{enum_type.name}", enum_type
        for inner in message_type.nested_type:
            yield from nested(inner, name)

    for file in files.file:
        for enum_type in file.enum_type:
            yield f"{file.package}.{enum_type.name}", enum_type
        for message_type in file.message_type:
            yield from nested(message_type, file.package)


def test_every_element_has_a_leading_comment(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    missing: list[str] = []
    for file in descriptor_set.file:
        comments = {
            tuple(location.path): location.leading_comments.strip() for location in file.source_code_info.location
        }
        missing += [f"{file.name}: {kind} {name}" for kind, name, path in _elements(file) if not comments.get(path)]
    assert not missing, "elements without a leading comment:\n  " + "\n  ".join(missing)


def test_enum_zero_values_are_unspecified(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    wrong = [
        f"{name}: first value {enum_type.value[0].name} = {enum_type.value[0].number}"
        for name, enum_type in _all_enums(descriptor_set)
        if enum_type.value[0].number != 0 or not enum_type.value[0].name.endswith("_UNSPECIFIED")
    ]
    assert not wrong, "enum zero values must be <ENUM_NAME>_UNSPECIFIED = 0:\n  " + "\n  ".join(wrong)


def test_every_rpc_has_its_own_request_and_response(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    wrong: list[str] = []
    for file in descriptor_set.file:
        for service in file.service:
            for method in service.method:
                expected = (f".{file.package}.{method.name}Request", f".{file.package}.{method.name}Response")
                if (method.input_type, method.output_type) != expected:
                    wrong.append(
                        f"{file.package}.{service.name}.{method.name}: takes {method.input_type} and returns "
                        f"{method.output_type}, expected {expected[0]} and {expected[1]}"
                    )
    assert not wrong, "RPCs must use <Rpc>Request/<Rpc>Response messages:\n  " + "\n  ".join(wrong)


def test_descriptor_set_covers_every_contract(descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
    packages = {file.package for file in descriptor_set.file}
    assert {
        f"sagasuite.{name}.v1" for name in ("common", "inventory", "payment", "shipping", "notify", "orchestrator")
    } <= packages
    services = [service.name for file in descriptor_set.file for service in file.service]
    assert services and all(name.endswith("Service") for name in services)
